"""The MQTT connector: a publisher session for the sink, and one persistent session per source route.

Every route that reads from MQTT gets its own connection and persistent session
(client id ``<client_id>-<route>``): its own receive window, its own flow
control, and its own backlog at the broker. Stopping one route's reading (a
full budget) or cutting it off (a slow consumer) therefore never stalls
another route, and whatever it did not acknowledge the broker keeps and
redelivers. The connector's ``client_id`` is the publisher's.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from mqtt5 import ConnAckPacket, ConnAckReasonCode, PublishPacket

from connectors.mqtt.client import MqttConnection, open_connection
from connectors.mqtt.codec import codec_for
from connectors.mqtt.config import MqttConfig, MqttSource
from connectors.mqtt.sink import MqttSink, PacketIds
from connectors.mqtt.source import RetainedSubscriber, SourceCounters, Subscriber
from gateway.channel import Channel
from gateway.connector import Connector, ConnectorContext
from gateway.dispatch import Dispatcher, Route
from gateway.errors import ConnectorError
from gateway.patterns import MQTT
from gateway.redact import redact_url
from gateway.sink import Sink
from gateway.tls import client_context, describe_ssl_error

_CLIENT_ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


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
        channels.extend(self._route_channel(route) for route in self.routes)
        return channels

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
        """Each source route has its own session: open those added, close those removed, keep the rest."""
        keep = {r.name: r for r in routes}
        for name, old in list(self._channels.items()):
            route = next((r for r in self.routes if r.name == name), None)
            if keep.get(name) is not route:  # removed, or replaced by a changed route of the same name
                del self._channels[name]
                self._sessions.pop(name, None)
                self._dispatchers.pop(name, None)
                await self.retire_channel(old)
        for route in routes:
            if route.name not in self._channels:
                self.add_channel(self._route_channel(route))
        self.routes = tuple(routes)

    async def _connect(
        self,
        client_id: str,
        handler: _Publisher | _RouteSession,
        prepare: Callable[[MqttConnection], None] | None = None,
    ) -> tuple[MqttConnection, ConnAckPacket]:
        """TCP connect, CONNECT, CONNACK. ``prepare`` runs before CONNECT goes out: a resumed session's
        backlog can arrive in the same read as the CONNACK, so whoever takes it must be there first."""
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
                    clean_start=cfg.clean_start,
                    keepalive=cfg.keepalive,
                    session_expiry=cfg.session_expiry,
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
        pid = self.ids.take()
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        conn.subacks[pid] = fut  # type: ignore[assignment]
        conn.write(self.codec.subscribe(pid, [(topic, qos)]))
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                suback = await fut
        except (ConnectionError, TimeoutError) as exc:
            raise ConnectorError(f"no SUBACK from {self.address}: {str(exc) or 'timed out'}") from exc
        finally:
            self.ids.free(pid)
        code = suback.reason_codes[0]  # type: ignore[attr-defined]
        if int(code) >= 0x80:
            # A refused subscription (ACL) is a configuration problem, not a connection one.
            self.log.error("connector.subscribe_refused", filter=topic, reason=code.name)

    async def _stop_on_intake_stop(self, rs: _RouteSession) -> None:
        await self.intake_stopped.wait()
        if rs.subscriber is not None:
            rs.subscriber.stopped = True
        if rs.conn is not None:
            rs.conn.pause_reading()

    async def release_route(self, route: Route) -> None:
        """Close the route's session: the broker keeps what it did not acknowledge, and resends it."""
        channel = self._channels.get(route.name)
        if channel is not None:
            channel.cut()

    async def resume_route(self, route: Route) -> None:
        channel = self._channels.get(route.name)
        if channel is not None:
            channel.resume()


async def _watch(conn: MqttConnection) -> None:
    reason = await asyncio.shield(conn.closed)
    raise ConnectorError(reason)


async def _disconnect(conn: MqttConnection | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            await conn.disconnect()
