"""Exponential backoff with full jitter, the cure for reconnect storms (seeds, loop R4)."""

from __future__ import annotations

import random

import msgspec

from gateway.util.bounds import Seconds


class Backoff(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Reconnect delays: attempt *n* waits a uniform random time in ``[0, min(max, initial * 2**n)]``."""

    initial: Seconds = 0.1
    """Seconds; the cap of the first delay."""
    max: Seconds = 30.0
    """Seconds; no delay is longer."""

    def delay(self, attempt: int) -> float:
        cap = min(self.max, self.initial * (2 ** min(attempt, 32)))
        return random.uniform(0.0, cap)  # noqa: S311 - jitter, not cryptography
