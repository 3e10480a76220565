"""The NATS sink: core publishes confirmed by a flush per batch; JetStream publishes pipelined.

Core publishes of a batch are written, then a PING goes out behind them; the
server's PONG proves it processed every PUB before it, so it confirms the
whole batch. Up to ``_MAX_UNCONFIRMED`` batches wait for their PONG while the
next ones are written (the flush round trip is not on the critical path); a
confirmer completes them in order.

JetStream publishes carry a reply subject under one private inbox per
connection; the PubAcks complete their flights as they arrive (no task or
future per message). ``Nats-Msg-Id`` is set from the source position when the
source has one, so a resend after a lost connection is deduplicated by the stream.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from connectors.nats import wire
from connectors.nats.config import NatsConfig, NatsTarget, is_kv_key
from gateway.errors import ConnectorError, PayloadTooLarge, SinkError, TemplateError
from gateway.sink import Item, Sink

_MAX_UNCONFIRMED = 4
"""Batches of core publishes written but not yet confirmed by a PONG."""
_KV_DELETE = ("KV-Operation", "DEL")
"""The header that makes a publish to ``$KV.<bucket>.<key>`` a delete (what ``kv.delete()`` sends)."""


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
        self._unconfirmed: deque[tuple[asyncio.Task[None], list[Item]]] = deque()
        """Core batches written, each with the flush that confirms it, oldest first."""
        self._confirmed = asyncio.Event()

    async def attach(self, nc: Client) -> None:
        """Start publishing on a new connection."""
        wire.check(nc)
        self._prefix = nc.new_inbox() + "."
        await nc.subscribe(self._prefix + "*", cb=self._on_puback)
        self.nc = nc

    def detach(self) -> None:
        """The connection is gone: what was not confirmed is sent again on the next one, in order."""
        self.nc = None
        items: list[Item] = []
        while self._unconfirmed:
            flush, batch = self._unconfirmed.popleft()
            if flush.done():
                if not flush.cancelled():
                    flush.exception()  # retrieved: the session already reported the failure
            else:
                flush.cancel()
            items.extend(batch)
        items.extend(item for item, _ in self._pending.values())
        self._pending.clear()
        if items:
            self.requeue(items)
        self._confirmed.set()

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
        flight, d = entry[0]
        if not msg.data:
            # 503 no responders: no stream captures the subject (yet): worth another try.
            status = msg.headers.get("Status", "") if msg.headers else ""
            why = f"no JetStream stream answered (status {status or 'none'})"
            if (bucket := d.target.spec.kv) is not None:
                why = f"key-value bucket {bucket!r} not found: {why}"
            flight.fail(d, SinkError(why, retriable=True))
            return
        try:
            ack = _decode_puback(msg.data)
        except msgspec.DecodeError:
            flight.fail(d, SinkError("unreadable JetStream PubAck", retriable=False))
            return
        if ack.error is not None:
            e = ack.error
            flight.fail(
                d,
                SinkError(
                    f"JetStream refused the message: {e.description} (err_code {e.err_code})",
                    retriable=e.code == 503,
                ),
            )
        else:
            flight.done()

    async def run_confirmer(self) -> None:
        """Complete core batches as their PONGs arrive, in order. Owned by the session."""
        unconfirmed = self._unconfirmed
        while True:
            if not unconfirmed:
                self._confirmed.clear()
                await self._confirmed.wait()
                continue
            flush, batch = unconfirmed[0]
            try:
                await asyncio.shield(flush)
            except (NatsError, OSError, TimeoutError) as exc:
                raise ConnectorError(f"NATS flush failed: {type(exc).__name__}: {exc}") from exc
            if unconfirmed and unconfirmed[0][0] is flush:
                unconfirmed.popleft()
                for flight, _ in batch:
                    flight.done()
                self._confirmed.set()

    async def write_batch(self, batch: list[Item]) -> None:
        nc = self.nc
        if nc is None:
            self.requeue(batch)
            raise ConnectorError("not connected")
        try:
            while len(self._unconfirmed) >= _MAX_UNCONFIRMED:
                self._confirmed.clear()
                await self._confirmed.wait()
                if self.nc is not nc:
                    raise ConnectorError("connection lost")
        except BaseException:
            self.requeue(batch)  # nothing of it was sent; cancelled with its session or cut off
            raise
        max_payload = nc.max_payload
        prefix = self._prefix
        pending = self._pending
        now = time.monotonic()
        out = bytearray()
        core: list[Item] = []
        for item in batch:
            flight, d = item
            env = flight.env
            spec: NatsTarget = d.target.spec
            headers = env.headers
            reply = (env.reply or "") if d.replies else ""
            if spec.jetstream:
                receipt = env.receipt
                if receipt is not None and (pos := receipt.position()):
                    headers = [*(headers or ()), ("Nats-Msg-Id", f"{pos}/{flight.route.name}/{d.target.index}")]
                if spec.kv is not None:  # kv targets only; jetstream ones pay this one test
                    if not is_kv_key(key := d.address[len(spec.kv) + 5 :]):  # after `$KV.<bucket>.`
                        flight.fail(d, TemplateError(f"{key!r} is not a key-value key (letters, digits, -/_=.)"))
                        continue
                    if not env.payload:  # an empty value clears the key: a KV delete marker
                        headers = [*(headers or ()), _KV_DELETE]
                reply = prefix + str(self._next)
            block = wire.encode_headers(headers) if headers else None
            size = len(env.payload) + (len(block) if block is not None else 0)
            if size > max_payload:
                flight.fail(d, PayloadTooLarge(size, max_payload, "NATS server max_payload"))
                continue
            if spec.jetstream:
                pending[str(self._next)] = (item, now)
                self._next += 1
            else:
                core.append(item)
            wire.append_pub(out, d.address, env.payload, reply, block)
        try:
            if out:
                await wire.send(nc, out)
        except BaseException as exc:
            # Nothing of `core` is confirmed; JetStream ones stay pending and go again on detach.
            self.requeue(core)
            if isinstance(exc, NatsError | OSError | TimeoutError):
                raise ConnectorError(f"NATS publish failed: {type(exc).__name__}: {exc}") from exc
            raise
        if self.nc is not nc:
            # Detached while the batch was being written: nothing of it can be confirmed any more.
            self.requeue(core)
            raise ConnectorError("connection lost")
        if core:
            flush = asyncio.ensure_future(nc.flush(self.config.flush_timeout))  # type: ignore[arg-type]
            self._unconfirmed.append((flush, core))
            self._confirmed.set()
