"""The in-memory source: reads a :class:`MemoryBroker`'s log, one receipt per record.

Part of the reference connector (see :mod:`connectors.memory.connector`): the smallest source that keeps
the :class:`~gateway.core.contract.Source` contract. It reads only while its dispatcher's gate is open (a
pull source: the gate is its credit), dispatches each record as an envelope whose receipt acknowledges the
record's position in the broker (or gives it back, released), and stops reading when intake stops.
"""

from __future__ import annotations

import asyncio
import time

from connectors.memory.broker import MemoryBroker
from gateway.core.contract import Dispatcher, Envelope, Receipt, Route, Source, first

YIELD_EVERY = 256
"""Records dispatched in a row before the loop lets the sinks run (a burst, not one record per iteration)."""


class MemoryReceipt(Receipt):
    """Acknowledges one record of the log: its position goes to ``acked`` (or ``released``)."""

    __slots__ = ("broker", "index")

    def __init__(self, broker: MemoryBroker, index: int) -> None:
        super().__init__()
        self.broker = broker
        self.index = index

    def settle(self) -> None:
        self.broker.acked.add(self.index)

    def release(self) -> None:
        self.broker.released.add(self.index)

    def position(self) -> str:
        return str(self.index)


class MemorySource:
    """Reads the broker's log from its start, for the routes of ``dispatcher``."""

    def __init__(self, broker: MemoryBroker, dispatcher: Dispatcher) -> None:
        self.broker = broker
        self.dispatcher = dispatcher
        self.cursor = 0
        """The next position of the log to read."""

    async def start(self) -> None:
        """Nothing to subscribe: the log is there."""

    async def run(self, intake_stopped: asyncio.Event) -> None:
        broker, dispatcher = self.broker, self.dispatcher
        dispatch, gate = dispatcher.dispatch, dispatcher.gate
        while not intake_stopped.is_set():
            if not gate.is_open:  # a route is full: read nothing until it drained (or shutdown)
                await first(gate.wait_open(), intake_stopped.wait())
                continue
            cursor = self.cursor
            if cursor >= len(broker.log):
                broker.changed.clear()
                await first(broker.changed.wait(), intake_stopped.wait())
                continue
            rec = broker.log[cursor]
            dispatch(
                Envelope(
                    rec.topic,
                    rec.payload,
                    headers=rec.headers,
                    received_ns=time.monotonic_ns(),
                    receipt=MemoryReceipt(broker, cursor),
                )
            )
            self.cursor = cursor + 1
            if self.cursor % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # let sinks run between bursts

    async def quiesce(self) -> None:
        """Dispatches nothing once intake stopped: nothing to wait for."""

    async def release(self, route: Route) -> None:
        """Nothing to let go of: the route's flights are released (their records go to ``released``)."""

    async def resume(self, route: Route) -> None:
        """Reads on where it was: released records are not read again (a test looks at ``released``)."""


_: type[Source] = MemorySource
"""mypy checks here that :class:`MemorySource` keeps the :class:`Source` contract."""
