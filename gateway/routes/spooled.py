"""Store-and-forward routes: the source is acknowledged once a message is on local disk.

A route with ``spool:`` splits in two halves joined by a :class:`~gateway.routes.spool.Spool`:

* **in**: :meth:`SpooledRoute.admit` (called by the source's dispatcher) buffers the
  encoded message; the writer appends each buffer to the spool in one write, fsyncs
  it in a thread, and only then acknowledges the sources (PUBACK, JetStream ack,
  Kafka offset). A full spool applies the route's overflow policy: ``block`` pauses
  the source, ``drop_newest`` / ``drop_oldest`` drop (counted as ``spool_dropped``).
* **out**: the reader replays the spool in order through the ordinary route
  machinery (targets, retries, dead letter) within the route's in-flight budget.
  Each record is committed once its delivery ended; the committed offset is saved
  every 200 ms and at stop, so a restart replays what was not confirmed
  (at-least-once: a crash can repeat the last ~200 ms of deliveries).

While the targets are unreachable the backlog grows on disk instead of in the
source broker; when they return it drains in order. The route's counters
(``received``, ``acked`` ...) describe the out half; ``spooled``,
``spool_dropped``, ``spool_backlog`` and ``spool_backlog_bytes`` the in half.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Sequence
from typing import Any

import structlog

from gateway.config.options import SpoolConfig
from gateway.core.dispatch import Dispatcher
from gateway.core.envelope import Envelope, Receipt
from gateway.core.flight import RoutePlan
from gateway.core.policies import NO_LIMIT, Overflow, RoutePolicy, RouteState
from gateway.core.route import Route
from gateway.routes.spool import Pending, Spool, SpoolError
from gateway.routing.patterns import SourcePattern

log = structlog.get_logger("gateway.spool")

_READ_BATCH = 256
_COMMIT_INTERVAL = 0.2


class SpoolReceipt(Receipt):
    """The receipt of a replayed record: settling it commits the record."""

    __slots__ = ("end", "route")

    def __init__(self, route: SpooledRoute, end: int) -> None:
        super().__init__()
        self.pending = 1
        self.route = route
        self.end = end

    def settle(self) -> None:
        self.route.delivered(self.end)

    def release(self) -> None:
        self.route.rewind_later()

    def position(self) -> str:
        return f"spool:{self.end}"


class SpooledRoute(Route):
    def __init__(
        self,
        name: str,
        source: str,
        spec: Any,
        patterns: Sequence[SourcePattern],
        policy: RoutePolicy,
        spool: SpoolConfig,
    ) -> None:
        super().__init__(name, source, spec, patterns, policy)
        self.spool_config = spool
        self.spool: Spool | None = None
        # The replay half keeps the budget itself (see _replay): the base admission must never saturate,
        # which would pause the source, nor drop, which is the spool's business.
        self._budget = (self.max_in_flight, self.max_in_flight_bytes)
        self.max_in_flight = self.max_in_flight_bytes = NO_LIMIT
        self._drop = False
        self.spooled = 0
        """Messages written to the spool (this run)."""
        self.spool_dropped = 0
        """Messages dropped because the spool was full (``drop_newest`` / ``drop_oldest``)."""
        self._buffer: list[bytes] = []
        self._acks: list[Receipt | None] = []
        self._buffered = 0
        self._pending = Pending()
        self._rewind = False
        self._reading = True
        self._blocked = False
        self._wake_writer = asyncio.Event()
        self._wake_reader = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._plans: Dispatcher | None = None
        self._task: asyncio.Task[None] | None = None

    admits_runs = False  # every message goes to the spool through admit

    # -- in: the source side -------------------------------------------------------------------
    def admit(self, env: Envelope, plan: RoutePlan) -> None:
        if self.state is RouteState.STOPPED:
            self._settle(env.receipt, released=True)
            return
        record = Spool.encode(env)
        spool = self.spool
        if spool is not None and spool.full(self._buffered + len(record)):
            overflow = self.policy.overflow
            if overflow is Overflow.DROP_NEWEST:
                self.spool_dropped += 1
                self._settle(env.receipt, released=False)
                return
            if overflow is Overflow.DROP_OLDEST:
                entry = spool.skip()
                if entry is not None:
                    self.spool_dropped += 1
                    self._pending.add(entry.end)
                    self.delivered(entry.end)
            elif not self._blocked:  # block: pause the source; what is already on its way is still written
                self._blocked = True
                self.hold_gate()
        self._buffer.append(record)
        self._acks.append(env.receipt)
        self._buffered += len(record)
        self.spooled += 1
        self._wake_writer.set()

    def room(self) -> int:
        """Pull sources fetch by this: the spool takes what fits in it."""
        return 0 if self._blocked else self._budget[0]

    # -- the spool's two loops -----------------------------------------------------------------
    def open_spool(self) -> None:
        """Open (and recover) the spool; before the sources start, so that its limit holds from the first message."""
        cfg = self.spool_config
        try:
            self.spool = Spool(cfg.path, max_bytes=cfg.max_bytes, fsync=cfg.fsync)
        except (OSError, SpoolError) as exc:
            self.stop(f"cannot open spool {cfg.path}: {exc}")

    async def run_spool(self) -> None:
        """Write and replay until cancelled (owned by the gateway's task group)."""
        if self.spool is None:
            return
        cfg = self.spool_config
        saved_gate = self.gate
        # Plans for replayed topics; whatever the key, what the spool holds is this worker's to deliver.
        self._plans = Dispatcher(self.patterns[0].syntax, [self], shards=False)
        self.gate = saved_gate  # a Dispatcher claims its routes' gate: this one only plans
        log.info("spool.opened", route=self.name, path=cfg.path, backlog=self.spool.records)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._write_loop(self.spool), name=f"spool-writer:{self.name}")
            tg.create_task(self._read_loop(self.spool), name=f"spool-reader:{self.name}")

    async def _write_loop(self, spool: Spool) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_COMMIT_INTERVAL):
                    await self._wake_writer.wait()
            self._wake_writer.clear()
            await self._flush(spool)
            spool.save_commit()

    async def _flush(self, spool: Spool) -> None:
        async with self._flushing:  # the writer loop and stop_spool: one write (and its fsync) at a time
            await self._write_buffered(spool)

    async def _write_buffered(self, spool: Spool) -> None:
        while self._buffer:
            records, acks = self._buffer, self._acks
            self._buffer, self._acks, self._buffered = [], [], 0
            try:
                fd = spool.write(records)
                if spool.fsync:
                    await asyncio.to_thread(os.fsync, fd)
            except OSError as exc:  # disk full, say: not acknowledged, durable sources send it again
                log.error("spool.write_failed", route=self.name, error=str(exc), messages=len(records))
                for receipt in acks:
                    self._settle(receipt, released=True)
                continue
            for receipt in acks:
                self._settle(receipt, released=False)
            self._wake_reader.set()

    async def _read_loop(self, spool: Spool) -> None:
        while True:
            self._wake_reader.clear()
            if self._rewind and self.in_flight == 0:
                spool.rewind()
                self._pending.clear()
                self._rewind = False
            if self._reading and not self._rewind and self.state is RouteState.RUNNING:
                self._replay(spool)
            if self._blocked and not spool.full() and spool.backlog_bytes <= spool.max_bytes // 2:
                self._blocked = False
                self.free_gate()
            await self._wake_reader.wait()

    def _replay(self, spool: Spool) -> None:
        max_n, max_bytes = self._budget
        assert self._plans is not None
        while spool.unread and self.in_flight < max_n and self.in_flight_bytes < max_bytes:
            for entry in spool.read(min(_READ_BATCH, max_n - self.in_flight)):
                self._pending.add(entry.end)
                plan = self._plans.plan(entry.topic)
                if not plan:  # cannot happen for a topic this route spooled; commit it anyway
                    self.delivered(entry.end)
                    continue
                env = Envelope(
                    entry.topic,
                    entry.payload,
                    entry.headers,
                    entry.key,
                    received_ns=time.monotonic_ns(),
                    receipt=SpoolReceipt(self, entry.end),
                )
                Route.admit(self, env, plan[0])

    # -- commits ---------------------------------------------------------------------------------
    def delivered(self, end: int) -> None:
        """A replayed record is done with (delivered, dead-lettered or dropped by policy)."""
        moved = self._pending.done(end)
        if moved is not None and self.spool is not None:
            self.spool.commit(*moved)
        self._wake_reader.set()

    def rewind_later(self) -> None:
        """A replayed record was given back (the route was cut off): read again from the committed offset."""
        self._rewind = True
        self._wake_reader.set()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, tg: asyncio.TaskGroup) -> None:
        self.open_spool()
        self._task = tg.create_task(self.run_spool(), name=f"spool:{self.name}")

    async def stop_spool(self) -> None:
        """Stop: write and acknowledge what is buffered, stop replaying, and (once drained) close."""
        if self.spool is not None:
            await self._flush(self.spool)
        self._reading = False

    async def close_spool(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.spool is not None:
            self.spool.close()
            log.info("spool.closed", route=self.name, backlog=self.spool.records)
            self.spool = None

    def spool_view(self) -> dict[str, Any]:
        spool = self.spool
        return {
            "path": self.spool_config.path,
            "spooled": self.spooled,
            "spool_dropped": self.spool_dropped,
            "backlog": spool.records if spool is not None else 0,
            "backlog_bytes": spool.backlog_bytes if spool is not None else 0,
            "max_bytes": self.spool_config.max_bytes,
            "blocked": self._blocked,
        }
