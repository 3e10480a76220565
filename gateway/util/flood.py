"""Rate-limited reporting of events that come in floods."""

from __future__ import annotations

import math
import time


class Flood:
    """Events that can come in floods (a poison topic, a connection storm): the first is logged, then at most
    one summary per ``interval`` seconds with how many came since. Never a line per event."""

    __slots__ = ("_count", "_last", "interval")

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last = -math.inf
        self._count = 0

    def count(self) -> int:
        """Count one event: how many to report if a line is due now (counted since the last line), else 0."""
        self._count += 1
        now = time.monotonic()
        if now - self._last < self.interval:
            return 0
        n, self._count, self._last = self._count, 0, now
        return n
