"""A process-local broker with a durable log, acknowledgements and a controllable sink.

Tests publish into it, watch what the gateway acknowledges, and hold or fail
the gateway's publishes to exercise flow control without a network. In the
reference connector (:mod:`connectors.memory.connector`) it stands where a
broker connector has its client library or wire format.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar


@dataclass(slots=True)
class Record:
    topic: str
    payload: bytes
    headers: list[tuple[str, str]] | None = None
    key: bytes | None = None


@dataclass
class MemoryBroker:
    """One named in-process broker."""

    name: str
    log: list[Record] = field(default_factory=list)
    """What producers published, in order; the gateway's sources read it."""
    acked: set[int] = field(default_factory=set)
    """Positions in ``log`` the gateway acknowledged."""
    released: set[int] = field(default_factory=set)
    """Positions the gateway gave back undelivered (a real broker would redeliver them)."""
    received: list[Record] = field(default_factory=list)
    """What the gateway's sinks published and the broker confirmed."""
    hold: bool = False
    """While True, sink publishes are accepted but not confirmed (a stalled broker)."""
    reject: Callable[[Record], Exception | None] | None = None
    """Return an exception to refuse a publish with it."""
    swallow: Callable[[Record], bool] | None = None
    """Return True to take a publish and never answer it (a client that lost it without a report)."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    _brokers: ClassVar[dict[str, MemoryBroker]] = {}

    @classmethod
    def named(cls, name: str = "default") -> MemoryBroker:
        broker = cls._brokers.get(name)
        if broker is None:
            broker = cls._brokers[name] = cls(name)
        return broker

    @classmethod
    def reset(cls) -> None:
        cls._brokers.clear()

    def publish(self, topic: str, payload: bytes, headers: list[tuple[str, str]] | None = None) -> int:
        self.log.append(Record(topic, payload, headers))
        self.changed.set()
        return len(self.log) - 1

    def release(self) -> None:
        """Stop holding: confirm everything held."""
        self.hold = False
        self.changed.set()
