"""Flow gates: how a full route tells its source to stop reading.

A source owns one :class:`FlowGate` per delivery channel (an MQTT connection,
a Kafka consumer, a NATS subscription). Each route fed by the channel closes
the gate while it is over its budget and opens it when it drains below half
of it. Pull sources ``await gate.wait_open()`` before each fetch; push sources
register a listener and pause the socket (MQTT) or stop taking messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class FlowGate:
    """Open while no route behind it is saturated."""

    __slots__ = ("_closed_by", "_event", "_listeners")

    def __init__(self) -> None:
        self._closed_by = 0
        self._event = asyncio.Event()
        self._event.set()
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def is_open(self) -> bool:
        return self._closed_by == 0

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        """``listener(open)`` is called on every transition."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[bool], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def close(self) -> None:
        self._closed_by += 1
        if self._closed_by == 1:
            self._event.clear()
            for listener in self._listeners:
                listener(False)

    def open(self) -> None:
        if self._closed_by == 0:
            return
        self._closed_by -= 1
        if self._closed_by == 0:
            self._event.set()
            for listener in self._listeners:
                listener(True)

    async def wait_open(self) -> None:
        if self._closed_by:
            await self._event.wait()
