"""The NATS sink: core publishes confirmed by one flush per batch; JetStream publishes pipelined.

JetStream publishes carry a reply subject under one private inbox per
connection; the PubAcks complete their flights as they arrive (no task or
future per message). ``Nats-Msg-Id`` is set from the source position when
the source has one, so a resend after a lost connection is deduplicated by
the stream.
"""

from __future__ import annotations

import time

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from connectors.nats.config import NatsConfig, NatsTarget
from gateway.errors import ConnectorError, PayloadTooLarge, SinkError
from gateway.sink import Item, Sink


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_decode_puback = msgspec.json.Decoder(_PubAck).decode


class NatsSink(Sink):
    def __init__(self, config: NatsConfig) -> None:
        super().__init__()
        self.config = config
        self.nc: Client | None = None
        self._prefix = ""
        self._next = 0
        self._pending: dict[str, tuple[Item, float]] = {}
        """JetStream publishes awaiting their PubAck, by reply token, in send order."""

    async def attach(self, nc: Client) -> None:
        """Start publishing on a new connection."""
        self._prefix = nc.new_inbox() + "."
        await nc.subscribe(self._prefix + "*", cb=self._on_puback)
        self.nc = nc

    def detach(self) -> None:
        """The connection is gone: what awaited a PubAck is sent again on the next one."""
        self.nc = None
        if self._pending:
            items = [item for item, _ in self._pending.values()]
            self._pending.clear()
            self.requeue(items)

    def expire(self) -> int:
        """Requeue JetStream publishes whose PubAck is overdue; returns how many."""
        if not self._pending:
            return 0
        limit = time.monotonic() - self.config.publish_timeout
        late = [token for token, (_, sent) in self._pending.items() if sent < limit]
        if late:
            self.requeue([self._pending.pop(t)[0] for t in late])
        return len(late)

    async def _on_puback(self, msg: Msg) -> None:
        entry = self._pending.pop(msg.subject[len(self._prefix) :], None)
        if entry is None:
            return  # a late PubAck for something already requeued
        flight = entry[0][0]
        if not msg.data:
            status = msg.headers.get("Status", "") if msg.headers else ""
            flight.done(SinkError(f"no JetStream stream answered (status {status or 'none'})", retriable=False))
            return
        try:
            ack = _decode_puback(msg.data)
        except msgspec.DecodeError:
            flight.done(SinkError("unreadable JetStream PubAck", retriable=False))
            return
        if ack.error is not None:
            flight.done(
                SinkError(
                    f"JetStream refused the message: {ack.error.description} (err_code {ack.error.err_code})",
                    retriable=False,
                )
            )
        else:
            flight.done()

    async def write_batch(self, batch: list[Item]) -> None:
        nc = self.nc
        if nc is None:
            self.requeue(batch)
            raise ConnectorError("not connected")
        max_payload = nc.max_payload
        core: list[Item] = []
        sent = 0
        try:
            for item in batch:
                flight, d = item
                env = flight.env
                spec: NatsTarget = d.target.spec
                size = len(env.payload)
                if size > max_payload:
                    sent += 1
                    flight.done(PayloadTooLarge(size, max_payload, "NATS server max_payload"))
                    continue
                headers = dict(env.headers) if env.headers else None
                if spec.jetstream:
                    receipt = env.receipt
                    if receipt is not None and (pos := receipt.position()):
                        headers = headers or {}
                        headers["Nats-Msg-Id"] = f"{pos}/{flight.route.name}/{d.target.index}"
                    token = str(self._next)
                    self._next += 1
                    self._pending[token] = (item, time.monotonic())
                    sent += 1
                    await nc.publish(d.address, env.payload, reply=self._prefix + token, headers=headers)
                else:
                    await nc.publish(d.address, env.payload, headers=headers)
                    sent += 1
                    core.append(item)
            if core:
                await nc.flush(self.config.flush_timeout)  # type: ignore[arg-type]  # nats-py annotates int
        except BaseException as exc:
            # Nothing of `core` is confirmed; the rest was never sent. Pending JetStream ones go on detach.
            self.requeue(core + batch[sent:])
            if isinstance(exc, NatsError | OSError | TimeoutError):
                raise ConnectorError(f"NATS publish failed: {type(exc).__name__}: {exc}") from exc
            raise
        for flight, _ in core:
            flight.done()
