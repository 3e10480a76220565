"""Kafka sources: one consumer per (connector, group), committing contiguous acknowledged offsets.

Auto-commit is off. Each partition keeps its received-but-unsettled records
in offset order; a record's settle marks it, and the partition's committable
offset advances over the settled prefix only, so a commit never skips a
record whose targets have not all confirmed. Offsets are committed every
``commit_interval_ms``, on revocation and on stop. The route budget bounds
each fetch; while a route is full its partitions are paused (the consumer
keeps polling so the group does not evict it).

Every record Kafka holds is read: batches in any codec (gzip, snappy, lz4,
zstd; aiokafka decodes the last three with ``cramjam``), null keys, values and
header values, repeated header names. Header values become ``str`` by
:func:`gateway.routing.headers.from_bytes` (binary values survive, byte for byte, to a
Kafka target); a record without headers pays nothing for it.

A batch aiokafka cannot decode (a header name that is not UTF-8, a corrupt
compressed batch, a codec it lacks) must not stop the group: aiokafka raises
from ``getmany`` and drops what that call had decoded, so the source reads
again from what it dispatched, finds the partition and the first record that
cannot be read, fails that record through its routes' policy (dead letter or
``on_error``, with its position) and reads on after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import time
import zlib
from collections.abc import Callable
from typing import Any, Literal

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import ConsumerStoppedError, CorruptRecordException, KafkaError, UnsupportedCodecError
from aiokafka.structs import ConsumerRecord

from connectors.kafka.offsets import (
    PROBE_TIMEOUT,
    BrokerWatch,
    KafkaReceipt,
    PartitionTracker,
    rewound,
    set_backlogs,
    settled_offsets,
)
from gateway.core.contract import LAG_EVERY, Dispatcher, Envelope, Route, Source
from gateway.errors import SinkError
from gateway.routing.headers import from_bytes
from gateway.util.flood import Flood

log = structlog.get_logger("gateway.connector.kafka")


_PAUSE_AFTER = 1.0
"""Seconds a full route may keep its partitions unpaused."""
_PROBE_MS = 500
"""While looking for an unreadable record: how long to wait for one partition's records after a seek."""
_FRUITLESS = 3
"""Rounds of reading partition by partition that found no record to blame before the error is the session's."""
_LOG_INTERVAL = 5.0
"""Seconds between two ``kafka.record_unreadable`` log lines (a whole unreadable batch fails record by record)."""


def unreadable(exc: BaseException) -> bool:
    """An error aiokafka raised while decoding fetched records, not one of the connection or the group.

    aiokafka raises its own errors for a bad CRC or a missing codec, and lets others through
    as they come: ``UnicodeDecodeError`` for a header name that is not UTF-8, the codec's
    error for a corrupt compressed batch (``gzip.BadGzipFile`` is an ``OSError``; cramjam's),
    ``struct.error`` / ``IndexError`` for a truncated one. What is not a record's fault shows
    when reading partition by partition blames no record (``_FRUITLESS``).
    """
    if isinstance(exc, CorruptRecordException | UnsupportedCodecError | gzip.BadGzipFile | zlib.error):
        return True
    return isinstance(exc, Exception) and not isinstance(exc, KafkaError | OSError | ConsumerStoppedError)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: GroupSource) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.source.commit(revoked, final=True)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("kafka.partitions_assigned", group=self.source.group, partitions=len(assigned))


class GroupSource:
    """A consumer-group member feeding the routes that share its group."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        group: str,
        dispatcher: Dispatcher,
        *,
        fetch_max_records: int,
        commit_interval: float,
        offset_reset: Literal["earliest", "latest"] = "earliest",
        topics: list[str] | None = None,
        pattern: str | None = None,
        logger: Any = None,
    ) -> None:
        self.log = logger if logger is not None else log
        """The connector's logger (its lines carry ``connector=``)."""
        self.consumer = consumer
        self.group = group
        self.dispatcher = dispatcher
        self.topics = topics
        """The exact topic names it subscribes; or, when None, every topic ``pattern`` (a regex) matches."""
        self.pattern = pattern
        self.fetch_max_records = fetch_max_records
        self.commit_interval = commit_interval
        self.trackers: dict[TopicPartition, PartitionTracker] = {}
        self.listener = _Listener(self)
        self.stopped = asyncio.Event()
        """Set when the fetch loop ended after intake stopped."""
        self.offset_reset = offset_reset
        self.unreadable = 0
        """Records failed because aiokafka could not decode them."""
        self._flood = Flood(_LOG_INTERVAL)

    async def commit(self, partitions: list[TopicPartition] | None = None, *, final: bool = False) -> None:
        """Commit the settled prefix of ``partitions`` (all if None); ``final`` forgets them after."""
        trackers = self.trackers
        chosen = list(trackers) if partitions is None else [tp for tp in partitions if tp in trackers]
        offsets = settled_offsets(trackers, chosen)
        if offsets:
            try:
                await self.consumer.commit(offsets)
            except KafkaError as exc:
                # A rebalance took the partition; its new owner re-reads from the last commit.
                log.warning("kafka.commit_failed", group=self.group, error=f"{type(exc).__name__}: {exc}")
            else:
                for tp, off in offsets.items():
                    trackers[tp].committed = off
        if final:
            for tp in chosen:
                trackers.pop(tp).revoked = True

    async def start(self) -> None:
        """Subscribe and join the group (the client's errors go through the connector's guard)."""
        if self.topics is not None:
            self.consumer.subscribe(topics=self.topics, listener=self.listener)
        else:
            assert self.pattern is not None
            self.consumer.subscribe(pattern=f"^(?:{self.pattern})$", listener=self.listener)
        await self.consumer.start()

    async def close(self) -> None:
        """Leave the group and close the consumer (whatever it raises: the session is over)."""
        with contextlib.suppress(Exception):
            await self.consumer.stop()

    async def run(self, intake_stopped: asyncio.Event) -> None:
        lag = asyncio.create_task(self._watch_lag(), name=f"kafka:{self.group}:lag")  # one per session
        try:
            await self._fetch_loop(intake_stopped)
        finally:
            lag.cancel()
            await asyncio.wait([lag])
            self.stopped.set()

    # -- consumer lag, measured every LAG_EVERY seconds (never per record) -------------------------
    async def _watch_lag(self) -> None:
        while True:
            await asyncio.sleep(LAG_EVERY)
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    await self.measure_lag()
            except (KafkaError, OSError, TimeoutError):
                continue  # the broker probe says when no broker answers; the last figures stay

    async def measure_lag(self) -> None:
        """Each route's backlog from the log-end offsets of its assigned partitions (one ListOffsets
        request): behind its position (the record after the last one dispatched) and its committed
        offset. A partition this member has not read yet counts from the group's committed offset."""
        consumer = self.consumer
        assigned = sorted(consumer.assignment(), key=lambda tp: (tp.topic, tp.partition))
        ends = await consumer.end_offsets(assigned) if assigned else {}
        rows: list[tuple[TopicPartition, int, int | None, int | None]] = []
        for tp in assigned:
            tracker = self.trackers.get(tp)
            committed = tracker.committed if tracker is not None and tracker.committed >= 0 else None
            if committed is None:
                committed = await consumer.committed(tp)
            # Tansu answers ListOffsets(latest) with the last batch's base offset: the high watermark of
            # the last fetch response is the better figure there, and the fresher one while reading.
            end = max(ends[tp], consumer.highwater(tp) or 0)
            position = tracker.next_offset if tracker is not None and tracker.next_offset is not None else None
            rows.append((tp, end, position, committed))
        fresh = [tp for tp, _, position, committed in rows if committed is None]
        starts: dict[TopicPartition, int] = {}  # nothing committed: the group starts where offset_reset says
        if fresh:
            starts = await consumer.beginning_offsets(fresh) if self.offset_reset == "earliest" else ends
        table: list[tuple[TopicPartition, int, int, int]] = []
        for tp, end, position, committed in rows:
            base = committed if committed is not None else starts[tp]
            table.append((tp, end, position if position is not None else base, base))
        set_backlogs(self.dispatcher, table)

    async def quiesce(self) -> None:
        """Until the fetch loop ended (what it fetched last is dispatched)."""
        await self.stopped.wait()

    async def release(self, route: Route) -> None:
        """Nothing to do now: a released record is never committed past, and :meth:`resume` rewinds to it."""

    async def resume(self, route: Route) -> None:
        """Read the route's released records again (:meth:`rewind`)."""
        if n := self.rewind():
            self.log.info("kafka.rewound", route=route.name, group=self.group, partitions=n)

    async def _fetch_loop(self, intake_stopped: asyncio.Event) -> None:
        consumer = self.consumer
        gate = self.dispatcher.gate
        fruitless = 0
        while not intake_stopped.is_set():
            if not gate.is_open:
                await self._paused()
                continue
            n = max(1, min(self.fetch_max_records, self.dispatcher.room()))
            # Records fetched while intake stops are still dispatched (at most the route's room), so
            # that a graceful stop commits everything it read; shutdown waits for `stopped`.
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=n)
            except Exception as exc:
                if not unreadable(exc):
                    raise
                # Not a record's fault after all if reading partition by partition moves nothing on
                # (an aiokafka bug, say): then the session starts again, as for any other error.
                fruitless = 0 if await self._read_past(n) else fruitless + 1
                if fruitless >= _FRUITLESS:
                    raise
                continue
            self._dispatch(batches)

    def _dispatch(self, batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        dispatch_run = self.dispatcher.dispatch_run  # a partition's records are one run (one topic)
        trackers = self.trackers
        now_ns = time.monotonic_ns()
        wall_ms = time.time_ns() // 1_000_000  # freshness: each record's age from its timestamp, one clock read
        for tp, records in batches.items():
            tracker = trackers.get(tp)
            if tracker is None:
                tracker = trackers[tp] = PartitionTracker(tp)
            append = tracker.pending.append
            run: list[Envelope] = []
            add = run.append
            for rec in records:
                receipt = KafkaReceipt(tracker, rec.offset)
                append(receipt)
                hdrs = rec.headers
                value = rec.value
                add(
                    Envelope(
                        rec.topic,
                        value if value is not None else b"",
                        [(k, from_bytes(v)) for k, v in hdrs] if hdrs else None,
                        rec.key,
                        1,
                        None,
                        None,
                        now_ns,
                        receipt,
                        (wall_ms - rec.timestamp) * 1_000_000 if rec.timestamp > 0 else -1,
                    )
                )
            dispatch_run(run)
            if records:
                tracker.next_offset = records[-1].offset + 1

    # -- records aiokafka cannot decode (off the per-record path) -------------------------------
    async def _read_past(self, n: int) -> bool:
        """A fetch of up to ``n`` records raised while decoding: read each partition on its own, and
        where one raises, read it record by record to the one that cannot be read, fail it, skip it.
        Returns whether anything was read or failed."""
        consumer = self.consumer
        active = sorted(consumer.assignment() - consumer.paused(), key=lambda tp: (tp.topic, tp.partition))
        await self._seek_dispatched(active)  # the failed call dropped what it had decoded, positions moved
        progress = False
        for tp in active:
            if tp not in consumer.assignment():
                break  # revoked meanwhile: the new owner reads it
            hw = consumer.highwater(tp)
            tracker = self.trackers.get(tp)
            if hw is not None and tracker is not None and tracker.next_offset is not None and tracker.next_offset >= hw:
                continue  # read up to the end: nothing there to fail
            try:
                batches = await consumer.getmany(tp, timeout_ms=_PROBE_MS, max_records=n)
            except Exception as exc:
                if not unreadable(exc):
                    raise
                await self._seek_dispatched([tp])
                progress = await self._locate(tp, n) or progress
                continue
            self._dispatch(batches)
            progress = progress or bool(batches)
        return progress

    async def _locate(self, tp: TopicPartition, n: int) -> bool:
        """Read ``tp`` one record at a time (the bad one is among its next ``n``); fail the first one
        aiokafka cannot decode and seek past it. Returns whether anything was read or failed."""
        consumer = self.consumer
        progress = False
        for _ in range(n + 1):
            try:
                got = await consumer.getmany(tp, timeout_ms=_PROBE_MS, max_records=1)
            except Exception as exc:
                if not unreadable(exc):
                    raise
                offset = await consumer.position(tp)  # not advanced by the call that raised
                self._fail_unreadable(tp, offset, exc)
                consumer.seek(tp, offset + 1)
                return True
            if not got:
                break  # nothing raised this time: the main loop carries on
            self._dispatch(got)
            progress = True
        return progress

    async def _seek_dispatched(self, partitions: list[TopicPartition]) -> None:
        """Seek each partition back to the record after the last one dispatched (for one that dispatched
        nothing since it was assigned: its committed offset, or ``auto_offset_reset``)."""
        consumer = self.consumer
        for tp in partitions:
            tracker = self.trackers.get(tp)
            offset = tracker.next_offset if tracker is not None else None
            if offset is None:
                offset = await consumer.committed(tp)
            if offset is not None:
                consumer.seek(tp, offset)
            elif self.offset_reset == "earliest":
                await consumer.seek_to_beginning(tp)
            else:
                await consumer.seek_to_end(tp)

    def _fail_unreadable(self, tp: TopicPartition, offset: int, exc: BaseException) -> None:
        """Fail the record at ``offset`` on every route that takes its topic, as a target would refuse it:
        dead letter (empty payload, the error and position in its headers) or ``on_error``."""
        self.unreadable += 1
        tracker = self.trackers.get(tp)
        if tracker is None:
            tracker = self.trackers[tp] = PartitionTracker(tp)
        tracker.next_offset = offset + 1
        receipt = KafkaReceipt(tracker, offset)
        tracker.pending.append(receipt)
        error = SinkError(
            f"Kafka record {tp.topic}/{tp.partition}/{offset} cannot be read: {type(exc).__name__}: {exc}",
            retriable=False,
        )
        self._log(tp, offset, error)
        self.dispatcher.fail(Envelope(tp.topic, b"", None, None, 1, None, None, time.monotonic_ns(), receipt), error)

    def _log(self, tp: TopicPartition, offset: int, error: SinkError) -> None:
        if n := self._flood.count():
            log.warning(
                "kafka.record_unreadable",
                group=self.group,
                topic=tp.topic,
                partition=tp.partition,
                offset=offset,
                error=str(error),
                count=n,
            )

    def rewind(self) -> int:
        """Read released records again: seek each partition back to its lowest released offset."""
        count = 0
        for tp, tracker in list(self.trackers.items()):
            if tracker.rewind is None or tracker.revoked:
                continue
            self.consumer.seek(tp, tracker.rewind)
            self.trackers[tp] = rewound(tracker)
            count += 1
        return count

    async def watch_brokers(self, report: Callable[[bool, str], None]) -> None:
        """Tell ``report`` when no broker answers this consumer any more, and when one does again: aiokafka
        reconnects by itself and says nothing, so a metadata request every two seconds (never per message)
        shows an outage within seconds (:class:`~connectors.kafka.offsets.BrokerWatch`)."""
        await BrokerWatch(self.group).run(self.consumer.topics, (KafkaError, OSError), report)

    async def run_committer(self) -> None:
        """Commit the settled prefix every ``commit_interval`` until cancelled (also while paused or stopping)."""
        while True:
            await asyncio.sleep(self.commit_interval)
            await self.commit()

    async def _paused(self) -> None:
        """A route is full: wait for it to drain; if that takes long, pause the partitions and keep
        polling (group liveness) until it does. Short waits do not pause: resuming discards the
        fetcher's prefetched records and costs a round trip."""
        gate = self.dispatcher.gate
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_PAUSE_AFTER):
                await gate.wait_open()
        if gate.is_open:
            return
        consumer = self.consumer
        assigned = list(consumer.assignment())
        consumer.pause(*assigned)
        try:
            while not self.dispatcher.gate.is_open:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self.dispatcher.gate.wait_open()
                try:
                    await consumer.getmany(timeout_ms=0)  # paused: returns nothing, keeps the group alive
                except Exception as exc:
                    if not unreadable(exc):
                        raise
        finally:
            consumer.resume(*[tp for tp in assigned if tp in consumer.assignment()])


_: type[Source] = GroupSource
"""mypy checks here that :class:`GroupSource` keeps the :class:`Source` contract."""
