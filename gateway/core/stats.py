"""A route's counters and its latency histogram: plain integers, updated on the per-message path."""

from __future__ import annotations

from typing import Any


class RouteStats:
    """Monotonic counters of one route. ``received == acked + failed + dropped + filtered + in flight``."""

    __slots__ = (
        "acked",
        "dead_lettered",
        "dropped_overflow",
        "dropped_released",
        "failed",
        "filtered",
        "received",
        "resubmitted",
        "retried",
        "sent",
        "sharded",
        "slow_consumer_disconnects",
    )

    def __init__(self) -> None:
        self.received = 0
        self.sent = 0
        """Target deliveries the sink broker confirmed (a fan-out message counts once per target)."""
        self.acked = 0
        self.failed = 0
        self.dead_lettered = 0
        """Of ``failed``: written to the dead-letter target."""
        self.retried = 0
        """Target deliveries tried again after a retriable error."""
        self.dropped_overflow = 0
        self.dropped_released = 0
        self.filtered = 0
        """Messages the route's ``where`` left out (acknowledged, not delivered)."""
        self.slow_consumer_disconnects = 0
        self.sharded = 0
        """Messages this worker acknowledged without forwarding: their key is another worker's (``shard_by``).
        Not counted as received: summed over the workers, ``received`` counts each message once."""
        self.resubmitted = 0
        """Messages the watchdog submitted again: in flight past ``stuck_after`` with no confirmation."""

    @property
    def dropped(self) -> int:
        return self.dropped_overflow + self.dropped_released

    def as_dict(self) -> dict[str, int]:
        return {**{k: getattr(self, k) for k in self.__slots__}, "dropped": self.dropped}


_LATENCY_SHIFT = 18
"""The first latency bucket ends at 2**18 ns (0.26 ms); each next one doubles."""
LATENCY_BUCKETS = 18
"""Bounded buckets, up to 2**35 ns (34 s); above that, the unbounded one."""


class Latency:
    """Source receive → last target confirmed, per acknowledged message: a histogram of doubling buckets.

    The bucket is the bit length of the latency in units of 2**18 ns, so recording one costs a
    clock read, a shift and two additions (~0.14 µs; see loadtests/RESULTS.md). The route records
    inline in :meth:`Route.finish`; the monitor reads it, nothing resets it.
    """

    __slots__ = ("counts", "sum_ns")

    def __init__(self) -> None:
        self.counts = [0] * 48
        """Indexed by ``(ns >> 18).bit_length()``; indexes from ``LATENCY_BUCKETS`` up are the unbounded bucket."""
        self.sum_ns = 0

    def observe_ns(self, ns: int) -> None:
        self.counts[(ns >> _LATENCY_SHIFT).bit_length()] += 1
        self.sum_ns += ns

    @property
    def buckets(self) -> list[float]:
        """Upper bounds in seconds of the bounded buckets."""
        return [2 ** (_LATENCY_SHIFT + i) / 1e9 for i in range(LATENCY_BUCKETS)]

    def bucket_counts(self) -> list[int]:
        """Per bounded bucket, then the unbounded one (not cumulative)."""
        return [*self.counts[:LATENCY_BUCKETS], sum(self.counts[LATENCY_BUCKETS:])]

    @property
    def count(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile in seconds, interpolated inside its bucket; None before any message."""
        counts = self.bucket_counts()
        total = sum(counts)
        if total == 0:
            return None
        rank = q * total
        seen = 0
        lower = 0.0
        for upper, n in zip(self.buckets, counts, strict=False):
            if n and seen + n >= rank:
                return lower + (upper - lower) * (rank - seen) / n
            seen += n
            lower = upper
        return lower  # in the unbounded bucket: at least the largest bound


_AGE_SHIFT = 20
AGE_BUCKETS = 24
"""Message-age buckets: doubling from 2**20 ns (~1 ms) up to 2**43 ns (~2.4 h), then unbounded."""


class Ages(Latency):
    """Freshness: the age of each message when its route admits it (the source broker's timestamp to now),
    for sources whose messages carry one (Kafka record timestamps, JetStream message times).

    The same doubling histogram as :class:`Latency`, on a coarser scale: ages run from milliseconds to hours
    (a backlog). A negative age (the producer's clock ahead of ours) counts as 0."""

    __slots__ = ()

    def observe_ns(self, ns: int) -> None:
        self.counts[(ns >> _AGE_SHIFT).bit_length() if ns > 0 else 0] += 1
        self.sum_ns += ns if ns > 0 else 0

    @property
    def buckets(self) -> list[float]:
        return [2 ** (_AGE_SHIFT + i) / 1e9 for i in range(AGE_BUCKETS)]

    def bucket_counts(self) -> list[int]:
        return [*self.counts[:AGE_BUCKETS], sum(self.counts[AGE_BUCKETS:])]


LAG_EVERY = 5.0
"""Seconds between two measurements of a source's backlog at its broker (never per message)."""


class Backlog:
    """What a route's source has not taken yet, as its broker counts it, measured every :data:`LAG_EVERY`
    seconds by the source (a Kafka consumer's offsets, a JetStream consumer's info, a client's buffer).

    ``messages`` is the one figure to watch (``gateway_route_lag_messages``); ``detail`` holds the
    protocol's own counters (per partition, ack pending, ...), shown on ``/routez``."""

    __slots__ = ("detail", "measured", "messages")

    def __init__(self, messages: int | None, detail: dict[str, Any], measured: float) -> None:
        self.messages = messages
        """Messages waiting at the broker for this route; None when the broker cannot say (yet)."""
        self.detail = detail
        self.measured = measured
        """``time.monotonic()`` of the measurement."""
