"""A route's flow-control and error settings, resolved from its config, and its states."""

from __future__ import annotations

from enum import Enum

import msgspec

from gateway.config.options import RetryPolicy
from gateway.util.backoff import Backoff


class Overflow(Enum):
    BLOCK = "block"
    DROP_NEWEST = "drop_newest"
    DROP_OLDEST = "drop_oldest"
    DISCONNECT = "disconnect"


class RouteState(Enum):
    RUNNING = "running"
    DISCONNECTED = "disconnected"
    """Cut off as a slow consumer; reconnects after a backoff."""
    STOPPED = "stopped"
    """Stopped by ``on_error: stop``; needs an operator."""


NO_LIMIT = 1 << 62
"""``max_payload`` when none is set: one integer comparison per message either way."""


class RoutePolicy(msgspec.Struct, frozen=True):
    """The flow-control and error settings of one route, resolved from its config."""

    max_in_flight: int = 10_000
    max_in_flight_bytes: int = 16 * 1024 * 1024
    overflow: Overflow = Overflow.BLOCK
    slow_consumer_deadline: float | None = 30.0
    retry: RetryPolicy = RetryPolicy()
    on_error: str = "drop"
    reconnect: Backoff = Backoff(initial=0.5, max=30.0)
    max_payload: int | None = None
    """The route's own limit and its source connector's, the smaller; None: none."""
    max_headers: int = 64
    max_header_bytes: int = 16 * 1024
    stuck_after: float | None = None
    """Seconds a message may stay in flight, its targets connected, before the watchdog submits it again;
    None: :data:`STUCK_FACTOR` times the slowest target sink's own timeout."""
