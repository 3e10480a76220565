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

One message never costs the connection. Before anything of a message is
written, what nats-server closes the connection over is checked: the subject
(once per distinct subject, cached), the control line against the server's
``max_control_line``, header names and values, ``max_payload``; a message that
fails a check fails alone, through its route's policy. For causes nobody
knows in advance, the *probe* rule: what was written but not confirmed when
the server closed the connection gets a strike and is written again alone,
each one confirmed before the next; one that the connection breaks on again,
written alone, fails (its route's dead letter or ``on_error``) instead of
breaking every connection after it. A stop or a stall (a PING or a flush
unanswered) strikes nothing, and neither does an outage: what is requeued
while not connected was not written.
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
from gateway.core.contract import Item, Sink
from gateway.errors import ConnectorError, GatewayError, PayloadTooLarge, SinkError, TemplateError, Unavailable

_MAX_UNCONFIRMED = 4
"""Batches of core publishes written but not yet confirmed by a PONG."""
_KV_DELETE = ("KV-Operation", "DEL")
"""The header that makes a publish to ``$KV.<bucket>.<key>`` a delete (what ``kv.delete()`` sends)."""
_SUBJECT_CACHE = 4096
"""Checked subjects kept (the oldest goes first): a subject is checked once while it stays in use."""


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


def _key(item: Item) -> tuple[int, int]:
    return id(item[0]), item[1].target.index


class NatsSink(Sink):
    def __init__(self, config: NatsConfig) -> None:
        super().__init__()
        self.config = config
        self.timeout = max(config.publish_timeout, config.flush_timeout)
        self.nc: Client | None = None
        self._prefix = ""
        self._next = 0
        self._pending: dict[str, tuple[Item, float]] = {}
        """JetStream publishes awaiting their PubAck, by reply token, in send order."""
        self._unconfirmed: deque[tuple[asyncio.Task[None], list[Item]]] = deque()
        """Core batches written, each with the flush that confirms it, oldest first."""
        self._writing: list[Item] = []
        """Core publishes being handed to the client: on a lost connection they count as written."""
        self._confirmed = asyncio.Event()
        self.max_control_line = wire.MAX_CONTROL_LINE
        self._subjects: dict[str, bytes] = {}
        """Checked subjects, encoded, whose control line fits with any reply of up to ``REPLY_ROOM`` bytes."""
        self._strikes: dict[tuple[int, int], Item] = {}
        """Items written on a connection that the server then closed, by (flight, target); the item is held,
        so its flight's id cannot be reused while the entry lives."""
        self.probes = 0
        """Items written alone (probe mode) after a connection was closed with them unconfirmed."""
        self.poisoned = 0
        """Items failed because the connection was closed on them again when they were written alone."""

    async def attach(self, nc: Client) -> None:
        """Start publishing on a new connection."""
        wire.check(nc)
        info = getattr(nc, "_server_info", None) or {}
        limit = info.get("max_control_line")  # not in nats-server's INFO today; the default then
        limit = limit if isinstance(limit, int) and limit > wire.LINE_SLACK else wire.MAX_CONTROL_LINE
        if limit != self.max_control_line:
            self.max_control_line = limit
            self._subjects.clear()
        self._prefix = nc.new_inbox() + "."
        await nc.subscribe(self._prefix + "*", cb=self._on_puback)
        self.nc = nc

    def forgive(self) -> None:
        """A connect attempt failed after the loss: the server was down (a restart, an outage), not closing
        the connection on a message, so nothing is struck and nothing is probed alone."""
        self._strikes.clear()

    def detach(self, blame: str | None = None) -> None:
        """The connection is gone: what was not confirmed is sent again on the next one, in order.

        ``blame``: the server's reason when the loss may be a message's doing (``client.loss_blame``);
        then each item written and not confirmed gets a strike, and one struck before (the item being
        probed alone) fails instead of going again.
        """
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
        items.extend(self._writing)
        self._writing = []
        items.extend(item for item, _ in self._pending.values())
        self._pending.clear()
        if blame is not None and items:
            items = self._strike(items, blame)
        if items:
            self.requeue(items)
        self._confirmed.set()

    def _strike(self, items: list[Item], blame: str) -> list[Item]:
        """Strike ``items``; those struck twice fail. Returns those to send again."""
        strikes = self._strikes
        again: list[Item] = []
        for item in items:
            key = _key(item)
            if key not in strikes:
                strikes[key] = item
                again.append(item)
                continue
            del strikes[key]
            self.poisoned += 1
            flight, d = item
            flight.fail(
                d,
                SinkError(
                    f"the NATS server closed the connection on this message, twice ({blame}); "
                    "the second time it was written alone, so it is not sent again",
                    retriable=False,
                ),
            )
        return again

    def expire(self) -> int:
        """Requeue JetStream publishes whose PubAck is overdue; returns how many."""
        if not self._pending:
            return 0
        limit = time.monotonic() - self.config.publish_timeout
        late = [token for token, (_, sent) in self._pending.items() if sent < limit]
        if late:
            self.requeue([self._pending.pop(t)[0] for t in late])
            self._confirmed.set()
        return len(late)

    async def _on_puback(self, msg: Msg) -> None:
        entry = self._pending.pop(msg.subject[len(self._prefix) :], None)
        if entry is None:
            return  # a late PubAck for something already requeued
        if not self._pending:
            self._confirmed.set()  # nothing is waiting now (a probe waits for that)
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
            why = f"JetStream refused the message: {e.description} (err_code {e.err_code})"
            # 503: JetStream is temporarily unavailable (no quorum, a leader election): an outage, waited out.
            flight.fail(d, Unavailable(why) if e.code == 503 else SinkError(why, retriable=False))
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
                self.confirmed(batch)
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
        if self._strikes:  # only after a connection was closed on unconfirmed messages
            batch = await self._probe(nc, batch)
        if batch:
            await self._write(nc, batch)

    async def _probe(self, nc: Client, batch: list[Item]) -> list[Item]:
        """Write each struck item of ``batch`` alone, confirmed before anything after it is written;
        returns what follows the last struck item (written as usual by the caller)."""
        strikes = self._strikes
        start = 0
        try:
            for i, item in enumerate(batch):
                if _key(item) not in strikes:
                    continue
                run, start = batch[start:i], i
                if run:
                    await self._write(nc, run)
                await self._quiet(nc)  # nothing else unconfirmed: if the connection breaks now, it is on this one
                self.probes += 1
                start = i + 1
                await self._write(nc, [item])
                await self._quiet(nc)
                strikes.pop(_key(item), None)  # confirmed, or refused by the broker: either way settled
        except BaseException:
            self.requeue(batch[start:])  # not written; what was is resent by detach, ahead of these
            raise
        if start == 0 and strikes:
            self._forget_stale(batch)
        return batch[start:]

    def _forget_stale(self, batch: list[Item]) -> None:
        """Drop strikes of items no longer here (a released route took them out of the queue)."""
        live = {_key(item) for item in batch}
        live.update(_key(item) for item in self._queue)
        for key in [k for k in self._strikes if k not in live]:
            del self._strikes[key]

    async def _quiet(self, nc: Client) -> None:
        """Until nothing written on ``nc`` waits for its confirmation."""
        while self._unconfirmed or self._pending:
            self._confirmed.clear()
            await self._confirmed.wait()
            if self.nc is not nc:
                raise ConnectorError("connection lost")

    def _subject(self, address: str, reply: str, block: bytes | None, payload: int) -> bytes:
        """``address`` checked and encoded (cached when its control line fits with any short reply)."""
        problem = wire.subject_problem(address)
        if problem is not None:
            raise TemplateError(f"{address[:200]!r} cannot be published to on NATS: {problem}")
        subject = address.encode()
        limit = self.max_control_line
        if len(subject) <= limit - wire.LINE_SLACK:
            subjects = self._subjects
            if len(subjects) >= _SUBJECT_CACHE:
                del subjects[next(iter(subjects))]
            subjects[address] = subject
            return subject
        self._check_line(subject, reply, block, payload)
        return subject

    def _check_line(self, subject: bytes, reply: str, block: bytes | None, payload: int) -> None:
        limit = self.max_control_line
        line = wire.control_line_length(
            len(subject), len(reply.encode()), len(block) if block is not None else None, payload
        )
        if line > limit:
            raise SinkError(
                f"the NATS control line would be {line} bytes (subject of {len(subject)} bytes), over the "
                f"server's max_control_line of {limit}: nats-server would close the connection",
                retriable=False,
            )

    async def _write(self, nc: Client, batch: list[Item]) -> None:
        max_payload = nc.max_payload
        prefix = self._prefix
        pending = self._pending
        subjects = self._subjects
        now = time.monotonic()
        out = bytearray()
        parts: list[bytes | bytearray] = []
        large = wire.LARGE
        core: list[Item] = []
        for item in batch:
            flight, d = item
            env = flight.env
            spec: NatsTarget = d.target.spec
            try:
                headers = env.headers
                reply = ""
                if spec.jetstream:
                    receipt = env.receipt
                    if receipt is not None and (pos := receipt.position()):
                        headers = [*(headers or ()), ("Nats-Msg-Id", f"{pos}/{flight.route.name}/{d.target.index}")]
                    if spec.kv is not None:  # kv targets only; jetstream ones pay this one test
                        if not is_kv_key(key := d.address[len(spec.kv) + 5 :]):  # after `$KV.<bucket>.`
                            raise TemplateError(f"{key!r} is not a key-value key (letters, digits, -/_=.)")
                        if not env.payload:  # an empty value clears the key: a KV delete marker
                            headers = [*(headers or ()), _KV_DELETE]
                    reply = prefix + str(self._next)
                block = wire.encode_headers(headers) if headers else None
                payload = env.payload
                subject = subjects.get(d.address)
                if subject is None:
                    subject = self._subject(d.address, reply, block, len(payload))
                if d.replies and env.reply:  # a request route: the requester's reply subject
                    reply = env.reply
                    if (problem := wire.subject_problem(reply)) is not None:
                        raise TemplateError(f"reply subject {reply[:200]!r} cannot be carried by NATS: {problem}")
                    if len(reply) > wire.REPLY_ROOM or len(subject) > self.max_control_line - wire.LINE_SLACK:
                        self._check_line(subject, reply, block, len(payload))
                size = len(payload) + (len(block) if block is not None else 0)
                if size > max_payload:
                    raise PayloadTooLarge(size, max_payload, "NATS server max_payload")
            except GatewayError as exc:
                flight.fail(d, exc)  # nothing of it is written
                continue
            except Exception as exc:  # one message's surprise must not end the connection
                flight.fail(d, SinkError(f"cannot write to NATS: {type(exc).__name__}: {exc}", retriable=False))
                continue
            if spec.jetstream:
                pending[str(self._next)] = (item, now)
                self._next += 1
            else:
                core.append(item)
            if len(payload) < large:
                wire.append_pub(out, subject, payload, reply, block)
            else:
                out = wire.append_large_pub(parts, out, subject, payload, reply, block)
        if out:
            parts.append(out)
        if not parts:
            return
        self._writing = core  # from here on, a lost connection counts them as written (see detach)
        try:
            await wire.send(nc, parts)
        except (NatsError, OSError, TimeoutError) as exc:
            # Nothing of `core` is confirmed; detach sends it again, JetStream ones too (still pending).
            raise ConnectorError(f"NATS publish failed: {type(exc).__name__}: {exc}") from exc
        self._writing = []
        if self.nc is not nc:
            # Detached while the batch was being written: nothing of it can be confirmed any more.
            self.requeue(core)
            raise ConnectorError("connection lost")
        if core:
            flush = asyncio.ensure_future(nc.flush(self.config.flush_timeout))  # type: ignore[arg-type]
            self._unconfirmed.append((flush, core))
            self._confirmed.set()
