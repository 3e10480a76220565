"""The source side of a connector: what every source gives the core.

A *source* reads one subscription, consumer or session of a broker for one or more routes: the NATS
``CoreSource`` (a core subscription) and ``JetStreamSource`` (a durable pull consumer), the Kafka
``GroupSource`` (a consumer-group member), the MQTT ``RouteSource`` / ``SharedSource`` (a session), the
``MemorySource`` of the reference connector. They differ in how they read; this is what they share:

- **its routes and their dispatcher** (:attr:`Source.dispatcher`, from :meth:`Connector.dispatcher
  <gateway.core.connector.Connector.dispatcher>`, cached across sessions): every message becomes an
  :class:`~gateway.core.envelope.Envelope` with a :class:`~gateway.core.envelope.Receipt` (``None`` for an
  at-most-once message) handed to ``dispatcher.dispatch``; one the source cannot read whole goes to
  ``dispatcher.fail`` (it fails alone through its routes' policy); one it leaves out on purpose, to
  ``dispatcher.leave_out``. The dispatcher and the routes count all of these; the receipt acknowledges at
  the source once settled. (A source counts on its route only what it lost before it could dispatch it:
  core NATS, what the client still buffered when a subscription ends.)
- **flow control**: it reads only while ``dispatcher.gate`` is open. A pull source asks for at most
  ``dispatcher.room()`` messages and waits for the gate before the next request; a push source pauses its
  socket (MQTT), stops taking from its client (core NATS) or pauses its partitions (Kafka) while the gate
  is closed, and what it had already taken is admitted all the same.
- **start, then run**: :meth:`Source.start` subscribes or makes sure the durable consumer exists, before
  its connector reports itself connected; :meth:`Source.run` serves until intake stops, and raises (a
  broker library's error, which the connector's :meth:`~gateway.core.connector.Connector.guard` turns into
  :class:`~gateway.errors.ConnectorError`) when the connection is lost: the channel reconnects, and the
  next session starts its sources again.
- **stop and drain**: once intake stopped, a source dispatches nothing new; :meth:`Source.quiesce` returns
  when a pull or fetch that was in flight ended (its messages dispatched, so that a graceful stop leaves
  nothing delivered but unacknowledged). What was dispatched drains through the routes.
- **release and resume of a cut route** (slow-consumer disconnection, see
  :mod:`gateway.core.supervisor`): :meth:`Source.release` lets go of what the route holds so that what it
  did not acknowledge comes back (close the route's session, unsubscribe, or nothing where unacknowledged
  messages come back by themselves); :meth:`Source.resume` reads for it again (subscribe again, rewind).

The default hooks of :class:`~gateway.core.connector.Connector` (``release_route``, ``resume_route``,
``quiesce``) act on the sources a connector lists in ``live_sources()``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from gateway.core.dispatch import Dispatcher, Route
from gateway.core.stats import LAG_EVERY


class Source(Protocol):
    """One subscription, consumer or session of a broker, reading for the routes of its dispatcher."""

    @property
    def dispatcher(self) -> Dispatcher:
        """Its routes (``dispatcher.routes``), their plan cache and the flow gate they close when full."""
        ...

    async def start(self) -> None:
        """Subscribe, or make sure the consumer exists: before the connector reports itself connected."""
        ...

    async def run(self, intake_stopped: asyncio.Event) -> None:
        """Read and dispatch while ``dispatcher.gate`` is open, until ``intake_stopped``; raise when the
        connection is lost."""
        ...

    async def quiesce(self) -> None:
        """After intake stopped: until this source dispatches nothing more (a pull in flight ended)."""
        ...

    async def release(self, route: Route) -> None:
        """``route`` was cut off as a slow consumer: let go of what it holds, so that it comes back."""
        ...

    async def resume(self, route: Route) -> None:
        """``route``'s backoff is over: read for it again."""
        ...


async def measure_until(stopped: asyncio.Event, measure: Callable[[], None]) -> None:
    """Call ``measure`` every :data:`~gateway.core.stats.LAG_EVERY` seconds until ``stopped`` is set: how a
    push source whose backlog is a local counter (a client's buffer, a receive window) keeps it current."""
    while not stopped.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LAG_EVERY):
                await stopped.wait()
        measure()
