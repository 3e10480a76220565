"""The sink side of a connector: a bounded hand-off from routes to one writer task.

Routes call :meth:`Sink.submit` without awaiting; the sink's writer drains
what accumulated as one batch (one flush, one produce batch, one window of
pipelined publishes) and calls :meth:`Flight.done` per message once the broker
confirmed. The queue needs no bound of its own: every item in it holds a slot
of its route's budget (``max_in_flight`` / ``max_in_flight_bytes``), and a full
route stops its source, so the queue is bounded by the budgets of the routes
that target this sink.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from itertools import repeat

from gateway.core.flight import Delivery, Flight, Owner

Item = tuple[Flight, Delivery]


class Sink(ABC):
    """Publishes envelopes to one broker and reports each outcome to its flight."""

    timeout: float = 30.0
    """Seconds within which this sink's broker confirms or refuses a message it was handed (its client's
    own delivery or publish timeout): a route's watchdog resubmits what stays unconfirmed far longer."""

    def __init__(self, *, max_batch: int = 1024) -> None:
        self.max_batch = max_batch
        self.up_since: float | None = None
        """``time.monotonic()`` since when the connector is connected; None while it is not."""
        self._queue: deque[Item] = deque()
        self._waiter: asyncio.Future[None] | None = None
        """Set while the writer sleeps on an empty queue (cheaper per message than an Event)."""

    @property
    def depth(self) -> int:
        """Messages waiting for the writer."""
        return len(self._queue)

    def submit(self, flight: Flight, delivery: Delivery) -> None:
        """Queue one message for delivery. Never blocks; the route's budget bounds the queue."""
        self._queue.append((flight, delivery))
        if self._waiter is not None:
            self._wake()

    def submit_many(self, flights: list[Flight], delivery: Delivery) -> None:
        """:meth:`submit` for a run of messages to the same target."""
        self._queue.extend(zip(flights, repeat(delivery)))
        if self._waiter is not None:
            self._wake()

    @staticmethod
    def confirmed(items: list[Item]) -> None:
        """The broker confirmed ``items``: ``flight.done()`` for each, in order. Runs of one route's flights
        that this completes (their last target, nothing failed) finish together (``Route.finish_run``)."""
        run: list[Flight] = []
        owner: Owner | None = None
        for flight, _ in items:
            if (
                type(flight) is Flight
                and flight.pending == 1
                and flight.error is None
                and not flight.released
                and not flight.closed
            ):
                if flight.route is not owner:
                    if run:
                        run[0].route.finish_run(run)
                        run = []
                    owner = flight.route
                run.append(flight)
                continue
            if run:
                run[0].route.finish_run(run)
                run = []
                owner = None
            flight.done()
        if run:
            run[0].route.finish_run(run)

    def requeue(self, items: list[Item]) -> None:
        """Put items back at the head of the queue, in order (after a lost connection).

        A copy the route's watchdog replaced meanwhile is dropped (its new flight is on its way); the
        others' age for the watchdog starts over (cold path: once per lost connection or refusal)."""
        now = time.monotonic()
        live = []
        for item in items:
            flight = item[0]
            if not flight.closed:
                flight.route.handed_over(flight, now)
                live.append(item)
        self._queue.extendleft(reversed(live))
        self._wake()

    def queued(self) -> list[Item]:
        """What waits for the writer (not yet handed to the broker): a snapshot."""
        return list(self._queue)

    def take_first(self, match: Callable[[Item], bool]) -> Item | None:
        """Remove and return the oldest waiting item that ``match`` accepts (overflow: drop_oldest)."""
        for i, item in enumerate(self._queue):
            if match(item):
                del self._queue[i]
                return item
        return None

    def take_all(self, match: Callable[[Item], bool]) -> list[Item]:
        """Remove and return every waiting item that ``match`` accepts (a route being released)."""
        keep: deque[Item] = deque()
        taken: list[Item] = []
        for item in self._queue:
            (taken if match(item) else keep).append(item)
        if taken:
            self._queue.clear()
            self._queue.extend(keep)
        return taken

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def run_writer(self) -> None:
        """Drain the queue in batches until cancelled. Owned by the connector's task group."""
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            if not queue:
                self._waiter = loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                continue
            n = min(len(queue), self.max_batch)
            batch = [queue.popleft() for _ in range(n)]
            await self.write_batch(batch)

    @abstractmethod
    async def write_batch(self, batch: list[Item]) -> None:
        """Send ``batch``; every item must end in ``flight.done(...)`` or be requeued.

        May return before the broker confirmed (pipelining), but must wait for
        window space so that the sink never holds more than it may.
        """
