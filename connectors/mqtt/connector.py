"""The MQTT connector: a publisher session for the sink, and sessions for the source routes.

Every at-least-once route that reads from MQTT (QoS 1/2) gets its own connection
and persistent session (client id ``<client_id>-<route>``): its own receive
window, its own flow control, and its own backlog at the broker. Stopping one
route's reading (a full budget) or cutting it off (a slow consumer) therefore
never stalls another route, and whatever it did not acknowledge the broker keeps
and redelivers.

Routes that never stop their source share one connection instead
(``<client_id>-shared``, a clean session): QoS 0 routes whose full budget drops
(``overflow: drop_newest`` / ``drop_oldest``, the default for QoS 0), without
``share_group`` or ``retained_only``, and whose filter no topic matches together
with another shared route's (see :mod:`connectors.mqtt.filters`). They have
nothing for the broker to keep, and a full one drops instead of pausing the
connection, so sharing costs them nothing; a thousand of them cost one
connection instead of a thousand. A shared route cut off as a slow consumer is
unsubscribed, and subscribed again when it resumes. The connector's
``client_id`` is the publisher's.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from mqtt5 import ConnAckPacket, ConnAckReasonCode, PublishPacket, SubAckPacket, UnsubAckPacket

from connectors.mqtt.client import MqttConnection, open_connection
from connectors.mqtt.codec import codec_for
from connectors.mqtt.config import MqttConfig, MqttSource
from connectors.mqtt.filters import FilterSet
from connectors.mqtt.sink import MqttSink, PacketIds
from connectors.mqtt.source import RetainedSubscriber, SourceCounters, Subscriber
from gateway.core.channel import Channel
from gateway.core.connector import Connector, ConnectorContext
from gateway.core.dispatch import Dispatcher, Route
from gateway.core.policies import Overflow
from gateway.core.sink import Sink
from gateway.errors import ConnectorError
from gateway.routing.patterns import MQTT
from gateway.util.redact import redact_url
from gateway.util.tls import client_context, describe_ssl_error

_CLIENT_ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_NEVER_PAUSES = (Overflow.DROP_NEWEST, Overflow.DROP_OLDEST)
_FILTERS_PER_PACKET = 256
"""Topic filters per SUBSCRIBE / UNSUBSCRIBE of the shared session."""


class _Publisher:
    """PacketHandler of the publisher session: acknowledgements of our publishes."""

    def __init__(self, sink: MqttSink | None) -> None:
        self.sink = sink

    def on_publish(self, packet: PublishPacket) -> None:
        pass  # the publisher subscribes to nothing

    def on_ack(self, kind: int, packet_id: int, reason: int) -> None:
        if self.sink is not None:
            self.sink.on_ack(kind, packet_id, reason)

    def on_unreadable(self, qos: int, packet_id: int, topic: bytes, payload: bytes, error: str) -> None:
        pass  # nothing is published to the publisher session


class _RouteSession:
    """PacketHandler and state of one source route's session."""

    def __init__(self) -> None:
        self.subscriber: Subscriber | None = None
        self.conn: MqttConnection | None = None

    def on_publish(self, packet: PublishPacket) -> None:
        if self.subscriber is not None:
            self.subscriber.on_publish(packet)

    def on_ack(self, kind: int, packet_id: int, reason: int) -> None:
        pass  # a source session publishes nothing

    def on_unreadable(self, qos: int, packet_id: int, topic: bytes, payload: bytes, error: str) -> None:
        if self.subscriber is not None:
            self.subscriber.on_unreadable(qos, packet_id, topic, payload, error)


class MqttConnector(Connector):
    config: MqttConfig

    def __init__(self, name: str, config: MqttConfig, context: ConnectorContext) -> None:
        super().__init__(name, config, context)
        url = urlsplit(config.url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (8883 if config.uses_tls else 1883)
        self.client_id = config.client_id or f"{context.gateway_id}-{name}"
        self.address = redact_url(config.url)
        self.codec = codec_for(config.version)
        self.ids = PacketIds()
        self._publisher: MqttConnection | None = None
        self._sessions: dict[str, _RouteSession] = {}
        self._dispatchers: dict[str, Dispatcher] = {}
        self._channels: dict[str, Channel] = {}
        self.source_counters = SourceCounters()
        self._shared: tuple[Route, ...] = ()
        """The source routes on the shared session (see the module's doc)."""
        self._shared_channel: Channel | None = None
        self._shared_session = _RouteSession()
        self._shared_dispatcher: Dispatcher | None = None
        self._shared_filters: dict[str, int] = {}
        """Filters subscribed on the shared connection now, with their QoS."""
        self._cut: set[str] = set()
        """Shared routes cut off as slow consumers: unsubscribed until they resume."""
        self._filters_lock = asyncio.Lock()
        """One change of the shared connection's subscriptions at a time (connect, reload, cut, resume)."""

    def endpoint(self) -> str:
        return redact_url(self.config.url)

    def counters(self) -> dict[str, int]:
        out = {
            "unreadable_publishes": self.source_counters.unreadable_publishes,
            "dispatch_errors": self.source_counters.dispatch_errors,
        }
        if isinstance(self._sink, MqttSink):
            out["probe_resends"] = self._sink.probe_resends
            out["closed_on_message"] = self._sink.closed_on_message
        return out

    def make_sink(self) -> Sink:
        return MqttSink(self.config, self.codec, self.ids)

    def _tls_context(self) -> ssl.SSLContext | None:
        """A fresh context per connect (renewed certificate files are picked up), or None for plaintext."""
        return client_context(self.config.tls, self.log) if self.config.uses_tls else None

    def route_client_id(self, route: Route) -> str:
        return f"{self.client_id}-{_CLIENT_ID_CHARS.sub('_', route.name)}"

    def make_channels(self) -> list[Channel]:
        channels: list[Channel] = []
        if self.has_sink:
            channels.append(Channel(self, self.name, self.session, self.finish))
        shared, own = self.sessions_of(self.routes)
        self._set_shared(shared)
        if shared:
            channels.append(self._make_shared_channel())
        channels.extend(self._route_channel(route) for route in own)
        return channels

    @staticmethod
    def sessions_of(routes: Sequence[Route]) -> tuple[list[Route], list[Route]]:
        """``routes`` split into those that share one session and those with a session of their own."""
        shared: list[Route] = []
        own: list[Route] = []
        filters = FilterSet()
        for route in routes:
            spec: MqttSource = route.spec
            if (
                spec.qos == 0
                and spec.share_group is None
                and not spec.retained_only
                and route.policy.overflow in _NEVER_PAUSES
                and filters.add(route.patterns[0].native_filter())
            ):
                shared.append(route)
            else:
                own.append(route)
        return shared, own

    def shared_client_id(self) -> str:
        base = f"{self.client_id}-shared"
        taken = {self.route_client_id(r) for r in self.routes}
        n = 0
        while (cid := base if n == 0 else f"{base}-{n}") in taken:
            n += 1
        return cid

    def _set_shared(self, routes: Sequence[Route]) -> None:
        self._shared = tuple(routes)
        self._shared_dispatcher = (
            Dispatcher(MQTT, self._shared, cache_size=self.context.cache_size) if self._shared else None
        )

    def _make_shared_channel(self) -> Channel:
        self._shared_channel = Channel(
            self,
            f"{self.name}/shared",
            self._run_shared_session,
            lambda: _disconnect(self._shared_session.conn),
        )
        return self._shared_channel

    def _wanted_filters(self) -> dict[str, int]:
        return {r.patterns[0].native_filter(): 0 for r in self._shared if r.name not in self._cut}

    def _route_channel(self, route: Route) -> Channel:
        spec: MqttSource = route.spec
        if spec.retained_only and self.config.version != 5:
            # 3.1.1 brokers clear the retain flag on what they forward live: only the state sent at
            # subscribe time is seen, so updates and clears wait for the next connect.
            self.log.warning("connector.retained_only_needs_mqtt5", route=route.name)
        rs = self._sessions[route.name] = _RouteSession()
        ch = self._channels[route.name] = Channel(
            self,
            f"{self.name}/{route.name}",
            lambda: self._route_session(route, rs),
            lambda: _disconnect(rs.conn),
        )
        return ch

    changes_routes_live = True

    async def set_routes(self, routes: Sequence[Route]) -> None:
        """Routes with a session of their own: open those added, close those removed, keep the rest. The
        shared session changes its subscriptions on its live connection: the new ones are taken before the
        old ones are dropped, and a changed route takes over its filter without a resubscribe. (The gateway
        calls this after the old routes drained and stopped: a QoS 0 message that arrives for a stopped route
        in between is counted as dropped; the shared session cannot pause one route.)"""
        shared, own = self.sessions_of(routes)
        keep = {r.name: r for r in own}
        for name, old in list(self._channels.items()):
            route = next((r for r in self.routes if r.name == name), None)
            if keep.get(name) is not route:  # removed, changed, or moved to the shared session
                del self._channels[name]
                self._sessions.pop(name, None)
                self._dispatchers.pop(name, None)
                await self.retire_channel(old)
        self.routes = tuple(routes)
        # A cut route stays cut only as the same object: a changed one is a new, running route.
        self._cut &= {r.name for r in shared if any(r is s for s in self._shared)}
        if [id(r) for r in shared] != [id(r) for r in self._shared]:
            self._set_shared(shared)
            if shared and self._shared_channel is None:
                self.add_channel(self._make_shared_channel())
            elif not shared and self._shared_channel is not None:
                channel, self._shared_channel = self._shared_channel, None
                await self.retire_channel(channel)
            else:
                await self._resubscribe_shared()
        for route in own:
            if route.name not in self._channels:
                self.add_channel(self._route_channel(route))

    async def _connect(
        self,
        client_id: str,
        handler: _Publisher | _RouteSession,
        prepare: Callable[[MqttConnection], None] | None = None,
        *,
        clean: bool = False,
    ) -> tuple[MqttConnection, ConnAckPacket]:
        """TCP connect, CONNECT, CONNACK. ``prepare`` runs before CONNECT goes out: a resumed session's
        backlog can arrive in the same read as the CONNACK, so whoever takes it must be there first.
        ``clean``: a clean session that the broker forgets at disconnect, whatever the config says."""
        cfg = self.config
        try:
            username, password = cfg.credentials  # a password_file is read at each connect
            tls = self._tls_context()
        except (OSError, ValueError) as exc:
            raise ConnectorError(f"cannot connect to {self.address}: {describe_ssl_error(exc)}") from exc
        try:
            conn = await open_connection(
                self.host,
                self.port,
                self.codec,
                handler,
                timeout=cfg.connect_timeout,
                tls=tls,
                server_name=cfg.tls.server_name if cfg.tls is not None else None,
            )
        except (OSError, TimeoutError) as exc:
            why = describe_ssl_error(exc)
            if tls is not None and isinstance(exc, ConnectionResetError | ssl.SSLEOFError):
                why += " during the TLS handshake (does this port speak TLS?)"
            raise ConnectorError(f"cannot connect to {self.address}: {why}") from exc
        try:
            if prepare is not None:
                prepare(conn)
            conn.write(
                self.codec.connect(
                    client_id,
                    clean_start=cfg.clean_start or clean,
                    keepalive=cfg.keepalive,
                    session_expiry=0 if clean else cfg.session_expiry,
                    receive_maximum=cfg.receive_maximum,
                    username=username,
                    password=password,
                )
            )
            try:
                async with asyncio.timeout(cfg.connect_timeout):
                    connack = await conn.connack
            except (ConnectionError, TimeoutError) as exc:
                raise ConnectorError(f"no CONNACK from {self.address}: {str(exc) or 'timed out'}") from exc
            if connack.reason_code != ConnAckReasonCode.SUCCESS:
                raise ConnectorError(f"{self.address} refused the connection: {connack.reason_code.name}")
        except BaseException:
            conn.abort("connect failed")
            raise
        return conn, connack

    async def session(self) -> None:
        """The publisher session (the sink)."""
        sink = self._sink if isinstance(self._sink, MqttSink) else None
        try:
            conn, connack = await self._connect(self.client_id, _Publisher(sink))
        except ConnectorError:
            if sink is not None:
                sink.forgive()
            raise
        self._publisher = conn
        try:
            resent = 0
            extra = {}
            if sink is not None:
                resent = sink.attach(conn, connack.receive_max, connack.max_packet_size)
                if sink.probing:  # the broker closed the last connection on unconfirmed publishes
                    extra["probing"] = sink.probing
            self.mark_connected(
                url=self.address,
                client_id=self.client_id,
                session_present=connack.session_present,
                resent=resent,
                **extra,
            )
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_watch(conn), name=f"{self.name}:watch")
                tg.create_task(conn.keepalive(self.config.keepalive), name=f"{self.name}:keepalive")
                if sink is not None:
                    tg.create_task(sink.run_writer(), name=f"{self.name}:writer")
        finally:
            self._publisher = None
            if sink is not None:
                sink.detach()
            conn.abort("session ended")

    async def finish(self) -> None:
        await _disconnect(self._publisher)

    async def _route_session(self, route: Route, rs: _RouteSession) -> None:
        """One source route's persistent session."""
        spec: MqttSource = route.spec
        dispatcher = self._dispatchers.get(route.name)
        if dispatcher is None:
            dispatcher = self._dispatchers[route.name] = Dispatcher(MQTT, [route], cache_size=self.context.cache_size)
        client_id = self.route_client_id(route)
        subscriber = RetainedSubscriber if spec.retained_only else Subscriber

        def prepare(conn: MqttConnection) -> None:
            rs.conn = conn
            rs.subscriber = subscriber(conn, dispatcher, self.source_counters)

        try:
            conn, connack = await self._connect(client_id, rs, prepare)
        except BaseException:
            rs.subscriber = rs.conn = None
            raise

        subscribed = False

        def on_gate(is_open: bool) -> None:
            if not subscribed:
                return  # the SUBACK must be read first (see below)
            if is_open and not self.intake_stopped.is_set():
                conn.resume_reading()
            elif not is_open:
                conn.pause_reading()

        dispatcher.gate.add_listener(on_gate)
        try:
            topic = route.patterns[0].native_filter()
            if spec.share_group:
                topic = f"$share/{spec.share_group}/{topic}"
            # Read until the SUBACK came, even while the route is full: paused, the SUBACK (and the backlog a
            # persistent session sends before it) would never be read, and the session would time out and
            # start over and over. What arrives meanwhile is bounded by the session's receive window.
            await self._subscribe(conn, topic, spec.qos)
            subscribed = True
            if not dispatcher.gate.is_open:
                conn.pause_reading()
            self._channels[route.name].mark_connected(
                url=self.address, client_id=client_id, session_present=connack.session_present, topic=topic
            )
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_watch(conn), name=f"{self.name}/{route.name}:watch")
                tg.create_task(conn.keepalive(self.config.keepalive), name=f"{self.name}/{route.name}:keepalive")
                tg.create_task(self._stop_on_intake_stop(rs), name=f"{self.name}/{route.name}:intake")
        finally:
            dispatcher.gate.remove_listener(on_gate)
            rs.subscriber = None
            rs.conn = None
            conn.abort("session ended")

    async def _subscribe(self, conn: MqttConnection, topic: str, qos: int) -> None:
        await self._request(conn, self.codec.subscribe, [(topic, qos)], "SUBACK")

    async def _request(
        self, conn: MqttConnection, encode: Callable[[int, Any], bytes], items: list[Any], ack: str
    ) -> None:
        """One SUBSCRIBE or UNSUBSCRIBE of ``items`` and its acknowledgement."""
        pid = self.ids.take()
        fut: asyncio.Future[SubAckPacket | UnsubAckPacket] = asyncio.get_running_loop().create_future()
        conn.subacks[pid] = fut
        conn.write(encode(pid, items))
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                reply = await fut
        except (ConnectionError, TimeoutError) as exc:
            raise ConnectorError(f"no {ack} from {self.address}: {str(exc) or 'timed out'}") from exc
        finally:
            conn.subacks.pop(pid, None)
            self.ids.free(pid)
        for item, code in zip(items, reply.reason_codes, strict=False):
            if int(code) >= 0x80 and ack == "SUBACK":
                # A refused subscription (ACL) is a configuration problem, not a connection one.
                self.log.error("connector.subscribe_refused", filter=item[0], reason=code.name)

    async def _change_filters(self, conn: MqttConnection, add: dict[str, int], drop: list[str]) -> None:
        """Subscribe ``add`` then unsubscribe ``drop`` on the shared connection, a packet per 256 filters."""
        items = list(add.items())
        for i in range(0, len(items), _FILTERS_PER_PACKET):
            await self._request(conn, self.codec.subscribe, items[i : i + _FILTERS_PER_PACKET], "SUBACK")
        for i in range(0, len(drop), _FILTERS_PER_PACKET):
            await self._request(conn, self.codec.unsubscribe, drop[i : i + _FILTERS_PER_PACKET], "UNSUBACK")

    async def _resubscribe_shared(self) -> None:
        """Bring the live shared connection's subscriptions and dispatcher to the current shared routes."""
        rs = self._shared_session
        conn = rs.conn
        dispatcher = self._shared_dispatcher
        if dispatcher is not None and rs.subscriber is not None:
            rs.subscriber.dispatch = dispatcher.dispatch  # a changed route takes its messages from now on
            rs.subscriber.fail = dispatcher.fail
        async with self._filters_lock:
            if conn is None or not conn.is_open or rs.conn is not conn:
                return  # the next connection subscribes what is wanted then
            wanted = self._wanted_filters()
            add = {f: q for f, q in wanted.items() if f not in self._shared_filters}
            drop = [f for f in self._shared_filters if f not in wanted]
            self._shared_filters = wanted
            try:
                await self._change_filters(conn, add, drop)
            except ConnectorError as exc:
                conn.abort(str(exc))  # the reconnect subscribes afresh

    async def _run_shared_session(self) -> None:
        """The session of the routes that share one connection (a clean session: they are QoS 0)."""
        rs = self._shared_session
        client_id = self.shared_client_id()

        def prepare(conn: MqttConnection) -> None:
            rs.conn = conn
            dispatcher = self._shared_dispatcher
            assert dispatcher is not None
            rs.subscriber = Subscriber(conn, dispatcher, self.source_counters)

        try:
            conn, connack = await self._connect(client_id, rs, prepare, clean=True)
        except BaseException:
            rs.subscriber = rs.conn = None
            raise
        try:
            async with self._filters_lock:
                self._shared_filters = wanted = self._wanted_filters()
                await self._change_filters(conn, wanted, [])
            assert self._shared_channel is not None
            self._shared_channel.mark_connected(
                url=self.address, client_id=client_id, session_present=connack.session_present, routes=len(self._shared)
            )
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_watch(conn), name=f"{self.name}/shared:watch")
                tg.create_task(conn.keepalive(self.config.keepalive), name=f"{self.name}/shared:keepalive")
                tg.create_task(self._stop_on_intake_stop(rs), name=f"{self.name}/shared:intake")
        finally:
            rs.subscriber = None
            rs.conn = None
            self._shared_filters = {}
            conn.abort("session ended")

    async def _stop_on_intake_stop(self, rs: _RouteSession) -> None:
        await self.intake_stopped.wait()
        if rs.subscriber is not None:
            rs.subscriber.stopped = True
        if rs.conn is not None:
            rs.conn.pause_reading()

    async def release_route(self, route: Route) -> None:
        """Close the route's session: the broker keeps what it did not acknowledge, and resends it. A route
        on the shared session is unsubscribed instead (QoS 0: nothing is kept for it)."""
        channel = self._channels.get(route.name)
        if channel is not None:
            channel.cut()
        elif route in self._shared:
            self._cut.add(route.name)
            await self._resubscribe_shared()

    async def resume_route(self, route: Route) -> None:
        channel = self._channels.get(route.name)
        if channel is not None:
            channel.resume()
        elif route.name in self._cut:
            self._cut.discard(route.name)
            await self._resubscribe_shared()


async def _watch(conn: MqttConnection) -> None:
    reason = await asyncio.shield(conn.closed)
    raise ConnectorError(reason)


async def _disconnect(conn: MqttConnection | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            await conn.disconnect()
