"""What both Kafka consumer drivers share: settled-prefix offset tracking per partition, the receipt of one
record, and each route's backlog from a partition table. Imports no Kafka client."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from gateway.core.contract import Backlog, Dispatcher, Receipt


class Partition(NamedTuple):
    """``(topic, partition)``; equal to (and hashed as) aiokafka's ``TopicPartition``, a tuple as well."""

    topic: str
    partition: int


class PartitionTracker:
    """Settled-prefix tracking of one assigned partition."""

    __slots__ = ("committable", "committed", "next_offset", "pending", "revoked", "rewind", "tp")

    def __init__(self, tp: Partition) -> None:
        self.tp = tp
        self.next_offset: int | None = None
        """Offset after the last record dispatched (set once per fetched batch): where to read again
        from when a fetch was dropped; None until this tracker dispatched one."""
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


def rewound(tracker: PartitionTracker) -> PartitionTracker:
    """A fresh tracker for a partition sought back to its lowest released offset: the old one's receipts settle
    into nothing, its commit position stays."""
    fresh = PartitionTracker(tracker.tp)
    fresh.committable, fresh.committed = tracker.committable, tracker.committed
    fresh.next_offset = tracker.rewind
    return fresh


PROBE_EVERY = 2.0
"""Seconds between two metadata requests that tell whether a broker still answers a consumer."""
PROBE_TIMEOUT = 3.0


class BrokerWatch:
    """Whether any broker answers a consumer group, told to the connector (``report``): lost after two failed
    probes in a row (or at once when the client says so, :meth:`lost`), back at the first answered one."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.down = False
        self.report: Callable[[bool, str], None] | None = None

    def lost(self, why: str) -> None:
        if not self.down:
            self.down = True
            if self.report is not None:
                self.report(False, f"consumer group {self.group}: no Kafka broker answers ({why})")

    async def run(
        self,
        probe: Callable[[], Awaitable[object]],
        errors: tuple[type[Exception], ...],
        report: Callable[[bool, str], None],
    ) -> None:
        """Probe every :data:`PROBE_EVERY` seconds (never per record) until cancelled."""
        self.report = report
        failures = 0
        expected: tuple[type[Exception], ...] = (*errors, TimeoutError)
        while True:
            await asyncio.sleep(PROBE_EVERY)
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    await probe()
            except expected as exc:
                failures += 1
                if failures >= 2:
                    self.lost(type(exc).__name__)
                continue
            failures = 0
            if self.down:
                self.down = False
                report(True, "")


def settled_offsets(trackers: dict[Partition, PartitionTracker], chosen: list[Partition]) -> dict[Partition, int]:
    """The offsets to commit for ``chosen``: each one's settled prefix, where it moved since the last commit."""
    offsets = {}
    for tp in chosen:
        t = trackers.get(tp)
        if t is not None and t.committable > t.committed:
            offsets[tp] = t.committable
    return offsets


def set_backlogs(dispatcher: Dispatcher, table: list[tuple[Partition, int, int, int]]) -> None:
    """Each route's backlog from ``(partition, log end, position, committed)`` rows of its group."""
    now = time.monotonic()
    plan = dispatcher.plan
    for route in dispatcher.routes:
        behind = 0
        partitions: dict[str, dict[str, int | None]] = {}
        for tp, end, position, committed in table:
            if not any(rp.route is route for rp in plan(tp.topic)):
                continue
            partitions[f"{tp.topic}/{tp.partition}"] = {
                "end": end,
                "position": position,
                "committed": committed,
                "lag": end - position,
                "uncommitted": end - committed,
            }
            behind += end - position
        route.backlog = Backlog(behind, {"partitions": partitions}, now)
