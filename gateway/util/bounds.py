"""The ranges every number in a config file must fall in.

Each numeric config key is typed with one of these, so that a negative,
infinite or absurdly large value (``attempts: 1e21``, ``max_time: .inf``,
``max_in_flight: 10**18``) is refused at load with the range it must meet,
instead of misbehaving at run time. ``tests/unit/test_config.py`` checks
that no numeric key is left without an upper bound.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

MAX_SECONDS = 7 * 24 * 3600
"""The longest duration any key accepts: a week (no timeout, delay or deadline needs more)."""
MAX_COUNT = 10_000_000
"""The most messages, topics or requests a budget may count."""
MAX_BYTES = 64 << 30
"""The largest byte budget (64 GiB): an in-flight budget is memory the process may fill."""
MAX_PAYLOAD = 1 << 30
"""The largest single message (1 GiB; the brokers' own limits are lower: MQTT 256 MiB, NATS 64 MiB)."""

Seconds = Annotated[float, msgspec.Meta(gt=0, le=MAX_SECONDS)]
"""A duration in seconds, more than 0 and at most a week."""
SecondsOrZero = Annotated[float, msgspec.Meta(ge=0, le=MAX_SECONDS)]
"""A duration in seconds where 0 means "off"."""
Millis = Annotated[int, msgspec.Meta(ge=1, le=MAX_SECONDS * 1000)]
"""A duration in milliseconds (the Kafka client's unit), at least 1."""
MillisOrZero = Annotated[int, msgspec.Meta(ge=0, le=MAX_SECONDS * 1000)]
Count = Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)]
"""How many messages, topics, requests: at least 1."""
Bytes = Annotated[int, msgspec.Meta(ge=1, le=MAX_BYTES)]
"""A byte budget: at least 1, at most 64 GiB."""
PayloadBytes = Annotated[int, msgspec.Meta(ge=1, le=MAX_PAYLOAD)]
"""The size of one message: at least 1 byte, at most 1 GiB."""
