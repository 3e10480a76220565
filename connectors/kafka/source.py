"""Kafka sources: one consumer per (connector, group), committing contiguous acknowledged offsets.

Auto-commit is off. Each partition keeps its received-but-unsettled records
in offset order; a record's settle marks it, and the partition's committable
offset advances over the settled prefix only, so a commit never skips a
record whose targets have not all confirmed. Offsets are committed every
``commit_interval_ms``, on revocation and on stop. The route budget bounds
each fetch; while a route is full its partitions are paused (the consumer
keeps polling so the group does not evict it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from gateway.dispatch import Dispatcher
from gateway.envelope import Envelope, Receipt

log = structlog.get_logger("gateway.connector.kafka")


_PAUSE_AFTER = 1.0
"""Seconds a full route may keep its partitions unpaused."""


class PartitionTracker:
    """Settled-prefix tracking of one assigned partition."""

    __slots__ = ("committable", "committed", "pending", "revoked", "rewind", "tp")

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.pending: deque[KafkaReceipt] = deque()
        self.committable = -1
        """Next offset to commit (last settled contiguous offset + 1); -1 until one settled."""
        self.committed = -1
        self.revoked = False
        self.rewind: int | None = None
        """The lowest released offset: where to read again from when the route resumes."""

    def advance(self) -> None:
        pending = self.pending
        while pending and pending[0].settled:
            self.committable = pending.popleft().offset + 1


class KafkaReceipt(Receipt):
    __slots__ = ("offset", "settled", "tracker")

    def __init__(self, tracker: PartitionTracker, offset: int) -> None:
        self.pending = 0  # Receipt.__init__, inlined: one receipt per message
        self.released = False
        self.tracker = tracker
        self.offset = offset
        self.settled = False

    def settle(self) -> None:
        self.settled = True
        tracker = self.tracker
        if tracker.pending and tracker.pending[0] is self:
            tracker.advance()

    def release(self) -> None:
        # Never settled: the committed offset stops below it; the partition is rewound to it on resume.
        tracker = self.tracker
        if tracker.rewind is None or self.offset < tracker.rewind:
            tracker.rewind = self.offset

    def position(self) -> str:
        tp = self.tracker.tp
        return f"{tp.topic}/{tp.partition}/{self.offset}"


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
    ) -> None:
        self.consumer = consumer
        self.group = group
        self.dispatcher = dispatcher
        self.fetch_max_records = fetch_max_records
        self.commit_interval = commit_interval
        self.trackers: dict[TopicPartition, PartitionTracker] = {}
        self.listener = _Listener(self)
        self.stopped = asyncio.Event()
        """Set when the fetch loop ended after intake stopped."""

    async def commit(self, partitions: list[TopicPartition] | None = None, *, final: bool = False) -> None:
        """Commit the settled prefix of ``partitions`` (all if None); ``final`` forgets them after."""
        trackers = self.trackers
        chosen = list(trackers) if partitions is None else [tp for tp in partitions if tp in trackers]
        offsets = {}
        for tp in chosen:
            t = trackers[tp]
            if t.committable > t.committed:
                offsets[tp] = t.committable
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

    async def run(self, intake_stopped: asyncio.Event) -> None:
        try:
            await self._fetch_loop(intake_stopped)
        finally:
            self.stopped.set()

    async def _fetch_loop(self, intake_stopped: asyncio.Event) -> None:
        consumer = self.consumer
        dispatch = self.dispatcher.dispatch
        gate = self.dispatcher.gate
        trackers = self.trackers
        while not intake_stopped.is_set():
            if not gate.is_open:
                await self._paused()
                continue
            n = max(1, min(self.fetch_max_records, self.dispatcher.room()))
            # Records fetched while intake stops are still dispatched (at most the route's room), so
            # that a graceful stop commits everything it read; shutdown waits for `stopped`.
            batches = await consumer.getmany(timeout_ms=200, max_records=n)
            now_ns = time.monotonic_ns()
            for tp, records in batches.items():
                tracker = trackers.get(tp)
                if tracker is None:
                    tracker = trackers[tp] = PartitionTracker(tp)
                append = tracker.pending.append
                for rec in records:
                    receipt = KafkaReceipt(tracker, rec.offset)
                    append(receipt)
                    hdrs = rec.headers
                    dispatch(
                        Envelope(
                            rec.topic,
                            rec.value if rec.value is not None else b"",
                            [(k, v.decode(errors="replace")) for k, v in hdrs] if hdrs else None,
                            rec.key,
                            1,
                            None,
                            None,
                            now_ns,
                            receipt,
                        )
                    )

    def rewind(self) -> int:
        """Read released records again: seek each partition back to its lowest released offset."""
        count = 0
        for tp, tracker in list(self.trackers.items()):
            if tracker.rewind is None or tracker.revoked:
                continue
            self.consumer.seek(tp, tracker.rewind)
            fresh = PartitionTracker(tp)
            fresh.committable, fresh.committed = tracker.committable, tracker.committed
            self.trackers[tp] = fresh  # receipts of the old one settle into nothing
            count += 1
        return count

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
                await consumer.getmany(timeout_ms=0)
        finally:
            consumer.resume(*[tp for tp in assigned if tp in consumer.assignment()])
