"""The connector extension point: what every broker package provides.

A connector package (``connectors/<kind>/``) exposes a :class:`ConnectorPlugin`:
its config Struct (tagged by ``type``), the Structs of its route endpoints
(``from`` and ``to``), its topic syntax, and the :class:`Connector` class that
talks to the broker. The core knows these shapes and nothing of the broker
libraries behind them.

A :class:`Connector` keeps one or more connections up, each a
:class:`~gateway.core.channel.Channel` running one *session* at a time: connect,
serve, and return or raise :class:`ConnectorError` when the connection is
lost. Most connectors have one channel (:meth:`Connector.session`); MQTT
gives every source route its own session, so that one route can be cut off
without touching the others. The channels own the lifecycle: state,
reconnects with full-jitter backoff, and an orderly close.

What a connector shares with every other lives here, once: the :class:`Dispatcher` of each source, cached
across sessions (:meth:`Connector.dispatcher`); the translation of a broker library's errors into
:class:`ConnectorError` (:meth:`Connector.guard`); the session task that ends a session when its connection
is lost (:meth:`Connector.watch`); and the hooks the gateway calls on a cut route and at shutdown, acting on
the connector's :class:`~gateway.core.source.Source` objects (:meth:`Connector.live_sources`). A connector
package imports all of it from :mod:`gateway.core.contract`.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import structlog

from gateway.config.plugin import ConnectorPlugin
from gateway.core.channel import Channel, ConnectorState
from gateway.core.dispatch import Dispatcher, Route
from gateway.core.sink import Sink
from gateway.core.source import Source
from gateway.errors import ConnectorError
from gateway.util.backoff import Backoff
from gateway.util.tls import describe_ssl_error

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ConnectorContext:
    """What the gateway tells every connector."""

    gateway_id: str
    cache_size: int = 10_000
    backoff: Backoff = field(default_factory=Backoff)


def connector_class(plugin: ConnectorPlugin) -> type[Connector]:
    """The :class:`Connector` class a plugin names, imported now (broker libraries load here)."""
    cls = plugin.load()
    if not (isinstance(cls, type) and issubclass(cls, Connector)):
        raise TypeError(f"{plugin.factory} is not a Connector class")
    return cls


class Connector(ABC):
    """The connections to one broker, serving the routes reading from it and the sink writing to it."""

    def __init__(self, name: str, config: Any, context: ConnectorContext) -> None:
        self.name = name
        self.config = config
        self.context = context
        self.connected = asyncio.Event()
        """Set while every channel that is not held down is connected: what readiness waits on."""
        self._dispatchers: dict[Hashable, Dispatcher] = {}
        self._routes: tuple[Route, ...] = ()
        self.channels: list[Channel] = []
        self.log = structlog.get_logger("gateway.connector").bind(connector=name)
        self._closing = asyncio.Event()
        self._closed = False
        self.intake_stopped = asyncio.Event()
        """Set when the gateway stops taking new messages (shutdown): sources stop reading."""
        self._sink: Sink | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._channel_runs: dict[Channel, tuple[asyncio.Event, asyncio.Task[None]]] = {}
        self._channels_live = 0
        """Channels not held down (what readiness looks at)."""
        self._channels_down = 0
        """Of those, the ones not connected. Counted, not recomputed: with one channel per source route
        (MQTT), a pass over every channel at each connect and disconnect made start and stop quadratic."""

    @property
    def routes(self) -> tuple[Route, ...]:
        """The routes reading from this connector (set by :meth:`run`, changed by :meth:`set_routes`)."""
        return self._routes

    @routes.setter
    def routes(self, routes: tuple[Route, ...]) -> None:
        self._routes = routes
        if self._dispatchers:  # forget the dispatchers of routes that went away (a reload)
            kept = {id(r) for r in routes}
            self._dispatchers = {k: d for k, d in self._dispatchers.items() if all(id(r) in kept for r in d.routes)}

    # -- state, aggregated over the channels ---------------------------------------------------
    @property
    def state(self) -> ConnectorState:
        if self._closed:
            return ConnectorState.CLOSED
        if not self.channels:
            return ConnectorState.NEW
        states = [c.state for c in self.channels if not c.held]
        for worst in (ConnectorState.CLOSING, ConnectorState.BACKOFF, ConnectorState.CONNECTING, ConnectorState.NEW):
            if worst in states:
                return worst
        return ConnectorState.CONNECTED

    @property
    def flapping(self) -> bool:
        """Some channel keeps losing its connection soon after making it (see :attr:`Channel.flapping`)."""
        return any(c.flapping for c in self.channels if not c.held)

    @property
    def healthy(self) -> bool:
        """Connected, and not flapping: what readiness reports."""
        return self.connected.is_set() and not self.flapping

    @property
    def reconnects(self) -> int:
        return sum(c.reconnects for c in self.channels)

    @property
    def last_error(self) -> str | None:
        errors = [c.last_error for c in self.channels if c.last_error]
        return errors[-1] if errors else None

    def channel_changed(self, channel: Channel | None = None) -> None:
        """A channel connected, lost its connection or was held down (``channel``: that one, O(1); None:
        count every channel again)."""
        if channel is None:
            self._channels_live = self._channels_down = 0
            for c in self.channels:
                c.counted = (False, False)
                self._count(c)
        else:
            self._count(channel)
        self._readiness_changed()

    def _readiness_changed(self) -> None:
        if self._channels_live and not self._channels_down:
            self.connected.set()
            if self._sink is not None and self._sink.up_since is None:
                self._sink.up_since = time.monotonic()
        else:
            self.connected.clear()
            if self._sink is not None:
                self._sink.up_since = None

    def _count(self, channel: Channel) -> None:
        live = not channel.held
        down = live and not channel.connected.is_set()
        was_live, was_down = channel.counted
        self._channels_live += live - was_live
        self._channels_down += down - was_down
        channel.counted = (live, down)

    @property
    def backoff(self) -> Backoff:
        """Reconnect delays of this connector's channels."""
        return self.context.backoff

    def endpoint(self) -> str:
        """The broker address(es) for status displays, with any password masked."""
        return ""

    def counters(self) -> dict[str, int]:
        """Connector-specific event counters for monitoring (monotonic), by name."""
        return {}

    # -- sink ----------------------------------------------------------------------------------
    @property
    def sink(self) -> Sink:
        """This connector's sink, created on first use."""
        if self._sink is None:
            self._sink = self.make_sink()
            if self.connected.is_set():
                self._sink.up_since = time.monotonic()
        return self._sink

    @property
    def has_sink(self) -> bool:
        return self._sink is not None

    @abstractmethod
    def make_sink(self) -> Sink: ...

    # -- sources -------------------------------------------------------------------------------
    def dispatcher(self, routes: Sequence[Route], key: Hashable = "") -> Dispatcher:
        """The :class:`Dispatcher` of the source that reads for ``routes`` (not empty), cached under ``key``:
        which of this connector's sources it is (a route's name, a consumer group; "" for a connector with one
        source). Kept across sessions, so a reconnect keeps its plan cache and its flow gate; built again only
        when the routes are not the same objects (a reload changed them); forgotten when they leave
        :attr:`routes`."""
        d = self._dispatchers.get(key)
        if d is None or len(d.routes) != len(routes) or any(a is not b for a, b in zip(d.routes, routes, strict=False)):
            syntax = routes[0].patterns[0].syntax  # the plugin's: every source pattern was compiled with it
            d = self._dispatchers[key] = Dispatcher(syntax, routes, cache_size=self.context.cache_size)
        return d

    def live_sources(self) -> Iterable[Source]:
        """The sources reading for this connector now: what the default :meth:`release_route`,
        :meth:`resume_route` and :meth:`quiesce` act on."""
        return ()

    def sources_of(self, route: Route) -> Iterable[Source]:
        """The live sources that read for ``route`` (override for a lookup cheaper than a scan)."""
        return [s for s in self.live_sources() if route in s.dispatcher.routes]

    @staticmethod
    async def guard(
        aw: Awaitable[T], errors: type[BaseException] | tuple[type[BaseException], ...], what: str = ""
    ) -> T:
        """``await aw``, with the broker library's ``errors`` raised as :class:`ConnectorError`: what ends a
        session (its channel reconnects). ``what`` starts the message (``cannot reach Kafka at …``)."""
        try:
            return await aw
        except errors as exc:
            reason = describe_ssl_error(exc)
            raise ConnectorError(f"{what}: {reason}" if what else reason) from exc

    @staticmethod
    async def watch(lost: Awaitable[T], why: Callable[[T], str]) -> NoReturn:
        """A session task: until ``lost`` completes (the connection is gone, the client must be replaced),
        then end the session with :class:`ConnectorError`, ``why(what lost gave)`` its message."""
        raise ConnectorError(why(await lost))

    # -- hooks -----------------------------------------------------------------------------------
    def stop_intake(self) -> None:
        self.intake_stopped.set()

    async def release_route(self, route: Route) -> None:
        """A route reading from here was cut off as a slow consumer: let go of what it holds.

        Its flights are already released (receipts not acknowledged), and what arrives for it
        meanwhile is released at admission; its sources make sure that what was not acknowledged
        comes back when the route resumes (e.g. close the route's session or rewind its partitions):
        :meth:`Source.release <gateway.core.source.Source.release>`.
        """
        for source in self.sources_of(route):
            await source.release(route)

    async def resume_route(self, route: Route) -> None:
        """The route's backoff is over: read for it again (:meth:`Source.resume
        <gateway.core.source.Source.resume>`)."""
        for source in self.sources_of(route):
            await source.resume(route)

    async def quiesce(self) -> None:
        """After :meth:`stop_intake`: until the sources will dispatch nothing more.

        Most sources stop at once; a pull consumer may have a request in flight
        (:meth:`Source.quiesce <gateway.core.source.Source.quiesce>`).
        """
        for source in list(self.live_sources()):
            await source.quiesce()

    def make_channels(self) -> list[Channel]:
        """The connections to keep up; by default one, running :meth:`session`."""
        return [Channel(self, self.name, self.session, self.finish)]

    @abstractmethod
    async def session(self) -> None:
        """Connect, serve ``self.routes`` and the sink until the connection is lost or closing.

        Call :meth:`mark_connected` once up. Raise :class:`ConnectorError` (or return)
        when the connection is lost; the channel reconnects.
        """

    async def finish(self) -> None:  # noqa: B027 - optional hook, most connectors need it
        """Called inside the last session when closing: final acks/commits, then disconnect."""

    def mark_connected(self, **info: Any) -> None:
        """The default channel's session calls this once the broker accepted it."""
        self.channels[0].mark_connected(**info)

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self, routes: Sequence[Route]) -> None:
        """Keep every channel up until :meth:`close`."""
        self.routes = tuple(routes)
        self.channels = self.make_channels()
        self.channel_changed()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                # Until close: a reload that retires the last channel (the only source route of a connector
                # without a sink, changed) must find the connector still running to add the new one.
                tg.create_task(self._closing.wait(), name=f"connector:{self.name}:open")
                for channel in self.channels:
                    self._start_channel(channel)
        finally:
            self._tg = None
            self._closed = True
            self.connected.clear()

    def _start_channel(self, channel: Channel) -> None:
        """Run ``channel`` until the connector closes or :meth:`retire_channel` retires it."""
        assert self._tg is not None, "the connector is not running"
        closing = asyncio.Event()
        if self._closing.is_set():
            closing.set()
        task = self._tg.create_task(channel.run(closing), name=f"channel:{channel.name}")
        self._channel_runs[channel] = (closing, task)

    def add_channel(self, channel: Channel) -> None:
        """Start one more channel while running (a source route added by a reload)."""
        self.channels.append(channel)
        self.channel_changed(channel)
        self._start_channel(channel)

    async def retire_channel(self, channel: Channel) -> None:
        """Finish and disconnect one channel while the others stay up (a source route removed by a reload)."""
        closing, task = self._channel_runs.pop(channel)
        closing.set()
        await asyncio.gather(task, return_exceptions=True)
        self.channels.remove(channel)
        was_live, was_down = channel.counted
        self._channels_live -= was_live
        self._channels_down -= was_down
        channel.counted = (False, False)
        self._readiness_changed()

    changes_routes_live = False
    """True when :meth:`set_routes` can add and remove source routes while connected; otherwise a reload
    that changes this connector's source routes restarts it (and every route that uses it)."""

    async def set_routes(self, routes: Sequence[Route]) -> None:
        """Serve a new set of source routes without disconnecting what stays (a reload).

        Called only when :attr:`changes_routes_live`, after the routes that go away have drained.
        A route kept by the reload is the same object in ``routes``; a changed one is a new object.
        """
        raise NotImplementedError

    async def close(self) -> None:
        """Finish the sessions (acks, commits), disconnect, and make :meth:`run` return. Idempotent."""
        self.intake_stopped.set()
        self._closing.set()
        for closing, _ in self._channel_runs.values():
            closing.set()
