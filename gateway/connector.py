"""The connector extension point: what every broker package provides.

A connector package (``connectors/<kind>/``) exposes a :class:`ConnectorPlugin`:
its config Struct (tagged by ``type``), the Structs of its route endpoints
(``from`` and ``to``), its topic syntax, and the :class:`Connector` class that
talks to the broker. The core knows these shapes and nothing of the broker
libraries behind them.

A :class:`Connector` runs one connection *session* at a time: connect, serve
the routes that read from it and the sink that writes to it, and return or
raise :class:`ConnectorError` when the connection is lost. The base class
owns the lifecycle around it: state, reconnects with full-jitter backoff, and
an orderly close.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import msgspec
import structlog

from gateway.backoff import Backoff
from gateway.dispatch import Route
from gateway.errors import ConnectorError
from gateway.patterns import SourcePattern, TopicSyntax
from gateway.sink import Sink


class PatternError(ValueError):
    """A source pattern in key ``key`` of a route's ``from`` is invalid."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class SourceSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of a route's ``from`` for one connector kind."""

    connector: str
    """Name of the connector (a key of ``connectors``) to read from."""

    def patterns(self, syntax: TopicSyntax) -> list[SourcePattern]:
        """The compiled source patterns; raise :class:`PatternError` naming the key of a bad one."""
        raise NotImplementedError

    @property
    def at_least_once(self) -> bool:
        """Whether the source redelivers what the gateway did not acknowledge (at-least-once)."""
        return False


class TargetSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of a route's ``to`` entry for one connector kind."""

    connector: str
    """Name of the connector (a key of ``connectors``) to publish to."""

    address_key: ClassVar[str] = "topic"

    def address(self) -> str:
        """The address template (topic or subject)."""
        raise NotImplementedError

    def key_template(self) -> str | None:
        """The record-key template, where the protocol has keys."""
        return None


@dataclass(frozen=True, slots=True)
class ConnectorPlugin:
    """What a connector package registers."""

    kind: str
    config: type[msgspec.Struct]
    source: type[SourceSpec]
    target: type[TargetSpec]
    syntax: TopicSyntax
    factory: str
    """``module:Class`` of the :class:`Connector`, imported only when the gateway runs."""

    def load(self) -> type[Connector]:
        module, _, attr = self.factory.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        if not (isinstance(cls, type) and issubclass(cls, Connector)):
            raise TypeError(f"{self.factory} is not a Connector class")
        return cls


class ConnectorState(Enum):
    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ConnectorContext:
    """What the gateway tells every connector."""

    gateway_id: str
    cache_size: int = 10_000
    backoff: Backoff = field(default_factory=Backoff)


class Connector(ABC):
    """A broker connection that serves the routes reading from it and the sink writing to it."""

    def __init__(self, name: str, config: Any, context: ConnectorContext) -> None:
        self.name = name
        self.config = config
        self.context = context
        self.state = ConnectorState.NEW
        self.reconnects = 0
        self.last_error: str | None = None
        self.connected = asyncio.Event()
        """Set while a session is up: what readiness checks wait on (never sleep for it)."""
        self.routes: tuple[Route, ...] = ()
        self.log = structlog.get_logger("gateway.connector").bind(connector=name)
        self._closing = asyncio.Event()
        self.intake_stopped = asyncio.Event()
        """Set when the gateway stops taking new messages (shutdown): sources stop reading."""
        self._sink: Sink | None = None

    @property
    def sink(self) -> Sink:
        """This connector's sink, created on first use."""
        if self._sink is None:
            self._sink = self.make_sink()
        return self._sink

    @property
    def has_sink(self) -> bool:
        return self._sink is not None

    def stop_intake(self) -> None:
        self.intake_stopped.set()

    async def release_route(self, route: Route) -> None:  # noqa: B027 - optional hook
        """A route reading from here was cut off as a slow consumer: let go of what it holds.

        Its flights are already released (receipts not acknowledged); a connector
        makes sure that what was not acknowledged comes back when the route resumes
        (e.g. closes the route's session or rewinds its partitions).
        """

    async def resume_route(self, route: Route) -> None:  # noqa: B027 - optional hook
        """The route's backoff is over: read for it again."""

    async def quiesce(self) -> None:  # noqa: B027 - optional hook
        """After :meth:`stop_intake`: until the sources will dispatch nothing more.

        Most sources stop at once; a pull consumer may have a request in flight.
        """

    @abstractmethod
    def make_sink(self) -> Sink: ...

    @abstractmethod
    async def session(self) -> None:
        """Connect, serve ``self.routes`` and the sink until the connection is lost or closing.

        Set ``self.connected`` once up. Raise :class:`ConnectorError` (or return)
        when the connection is lost; the base class reconnects.
        """

    async def finish(self) -> None:  # noqa: B027 - optional hook, most connectors need it
        """Called inside the last session when closing: final acks/commits, then disconnect."""

    async def run(self, routes: Sequence[Route]) -> None:
        """Keep a session up until :meth:`close`; reconnect with full-jitter backoff."""
        self.routes = tuple(routes)
        attempt = 0
        while not self._closing.is_set():
            self.state = ConnectorState.CONNECTING
            session = asyncio.ensure_future(self.session())
            closing = asyncio.ensure_future(self._closing.wait())
            try:
                await asyncio.wait({session, closing}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                session.cancel()
                raise
            finally:
                closing.cancel()
            if not session.done():
                # Closing: let the session send its last acks and disconnect, then stop it.
                self.state = ConnectorState.CLOSING
                try:
                    await asyncio.wait_for(self.finish(), timeout=10)
                except Exception as exc:  # a failed goodbye must not stop the shutdown
                    self.log.warning("connector.finish_failed", error=repr(exc))
                finally:
                    session.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await session
            if (
                session.done()
                and not session.cancelled()
                and session.exception() is None
                and self.intake_stopped.is_set()
            ):
                # Its sources finished after intake stopped: not a lost connection; wait to be closed.
                await self._closing.wait()
                continue
            lost = None if session.cancelled() else session.exception()
            while isinstance(lost, BaseExceptionGroup):  # from a session's TaskGroup: report the cause
                lost = lost.exceptions[0]
            if lost is not None and not isinstance(lost, ConnectorError | OSError | TimeoutError):
                # A bug, not a broker problem: say so loudly, then recover like from a lost connection.
                self.log.error("connector.session_crashed", exc_info=lost)
            was_connected = self.connected.is_set()
            self.connected.clear()
            if self._closing.is_set():
                break
            if was_connected:
                attempt = 0
                self.reconnects += 1
            self.last_error = f"{type(lost).__name__}: {lost}" if lost is not None else "connection closed"
            delay = self.context.backoff.delay(attempt)
            attempt += 1
            self.state = ConnectorState.BACKOFF
            self.log.warning(
                "connector.disconnected" if was_connected else "connector.connect_failed",
                error=self.last_error,
                attempt=attempt,
                retry_in=round(delay, 3),
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), timeout=delay)
        self.state = ConnectorState.CLOSED

    def mark_connected(self, **info: Any) -> None:
        """Sessions call this once the broker accepted them."""
        self.state = ConnectorState.CONNECTED
        self.last_error = None
        self.connected.set()
        self.log.info("connector.connected", reconnects=self.reconnects, **info)

    async def close(self) -> None:
        """Finish the session (acks, commits), disconnect, and make :meth:`run` return. Idempotent."""
        self.intake_stopped.set()
        self._closing.set()
