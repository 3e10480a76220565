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
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from mqtt5 import ConnAckPacket, ConnAckReasonCode, PublishPacket

from connectors.mqtt.client import MqttConnection, PacketHandler, open_connection
from connectors.mqtt.codec import codec_for, connack_refusal
from connectors.mqtt.config import MqttConfig, MqttSource
from connectors.mqtt.filters import FilterSet
from connectors.mqtt.sink import MqttSink, PacketIds
from connectors.mqtt.source import Requests, RouteSource, SharedSource, SourceCounters
from gateway.core.contract import Channel, Connector, ConnectorContext, Overflow, Route, Sink, Source
from gateway.errors import BrokerRefusal, ConnectorError
from gateway.util.redact import redact_url
from gateway.util.tls import client_context, describe_ssl_error

_CLIENT_ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_NEVER_PAUSES = (Overflow.DROP_NEWEST, Overflow.DROP_OLDEST)
_SHARED = ("shared",)
"""The shared session's key for its cached dispatcher (a tuple: never a route's name)."""


class _Publisher:
    """PacketHandler of the publisher session: acknowledgements of our publishes."""

    def __init__(self, sink: MqttSink | None) -> None:
        self.sink = sink

    def on_publish(self, packet: PublishPacket) -> None:
        pass  # the publisher subscribes to nothing

    def on_publishes(self, packets: list[PublishPacket]) -> None:
        pass

    def on_ack(self, kind: int, packet_id: int, reason: int) -> None:
        if self.sink is not None:
            self.sink.on_ack(kind, packet_id, reason)

    def on_unreadable(self, qos: int, packet_id: int, topic: bytes, payload: bytes, error: str) -> None:
        pass  # nothing is published to the publisher session


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
        self.requests = Requests(self.codec, self.ids, config.connect_timeout, self.address, self.log)
        self._publisher: MqttConnection | None = None
        self._sources: dict[str, RouteSource] = {}
        """The routes with a session of their own, by name."""
        self._shared: SharedSource | None = None
        """The session of the routes that share one (see the module's doc); None while there are none."""
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

    def live_sources(self) -> Iterable[Source]:
        sources: list[Source] = list(self._sources.values())
        if self._shared is not None:
            sources.append(self._shared)
        return sources

    def sources_of(self, route: Route) -> Iterable[Source]:
        own = self._sources.get(route.name)
        if own is not None:
            return (own,)
        if self._shared is not None and route in self._shared.routes:
            return (self._shared,)
        return ()

    @property
    def _shared_filters(self) -> dict[str, int]:
        """Filters subscribed on the shared connection now."""
        return self._shared.filters if self._shared is not None else {}

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
        if shared:
            channels.append(self._shared_channel(tuple(shared)))
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

    def _shared_channel(self, routes: tuple[Route, ...]) -> Channel:
        source = self._shared = SharedSource(
            routes, self.dispatcher(routes, _SHARED), self.source_counters, self.requests, self.intake_stopped
        )
        source.channel = Channel(
            self,
            f"{self.name}/shared",
            lambda: self._source_session(source, self.shared_client_id(), clean=True, routes=len(source.routes)),
            lambda: _disconnect(source.conn),
        )
        return source.channel

    def _route_channel(self, route: Route) -> Channel:
        spec: MqttSource = route.spec
        if spec.retained_only and self.config.version != 5:
            # 3.1.1 brokers clear the retain flag on what they forward live: only the state sent at
            # subscribe time is seen, so updates and clears wait for the next connect.
            self.log.warning("connector.retained_only_needs_mqtt5", route=route.name)
        dispatcher = self.dispatcher([route], route.name)
        source = self._sources[route.name] = RouteSource(
            route, dispatcher, self.source_counters, self.requests, self.intake_stopped
        )
        source.channel = Channel(
            self,
            f"{self.name}/{route.name}",
            lambda: self._source_session(source, self.route_client_id(route), topic=source.filter),
            lambda: _disconnect(source.conn),
        )
        return source.channel

    changes_routes_live = True

    async def set_routes(self, routes: Sequence[Route]) -> None:
        """Routes with a session of their own: open those added, close those removed, keep the rest. The
        shared session changes its subscriptions on its live connection: the new ones are taken before the
        old ones are dropped, and a changed route takes over its filter without a resubscribe. (The gateway
        calls this after the old routes drained and stopped: a QoS 0 message that arrives for a stopped route
        in between is counted as dropped; the shared session cannot pause one route.)"""
        shared, own = self.sessions_of(routes)
        keep = {r.name: r for r in own}
        for name, source in list(self._sources.items()):
            if keep.get(name) is not source.route:  # removed, changed, or moved to the shared session
                del self._sources[name]
                assert source.channel is not None
                await self.retire_channel(source.channel)
        self.routes = tuple(routes)
        old = self._shared
        if old is None:
            if shared:
                self.add_channel(self._shared_channel(tuple(shared)))
        elif not shared:
            self._shared = None
            assert old.channel is not None
            await self.retire_channel(old.channel)
        elif [id(r) for r in shared] != [id(r) for r in old.routes]:
            old.use(tuple(shared), self.dispatcher(shared, _SHARED))
            await old.resubscribe()
        for route in own:
            if route.name not in self._sources:
                self.add_channel(self._route_channel(route))

    async def _connect(
        self,
        client_id: str,
        handler: PacketHandler,
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
                said, fields = connack_refusal(self.codec.version, connack.reason_code)
                refusal = BrokerRefusal(f"{said} ({self.address} refused the connection: {fields['reason']})", **fields)
                self.log.warning("connector.refused", error=str(refusal), client_id=client_id, **fields)
                raise refusal
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
                tg.create_task(self.watch(asyncio.shield(conn.closed), str), name=f"{self.name}:watch")
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

    async def _source_session(
        self, source: RouteSource | SharedSource, client_id: str, *, clean: bool = False, **info: Any
    ) -> None:
        """A source's session (a route's own, persistent; or the shared one, ``clean``): connect, subscribe,
        serve until the connection is lost or intake stops."""
        channel = source.channel
        assert channel is not None
        try:
            conn, connack = await self._connect(client_id, source, source.attach, clean=clean)
            await source.start()
            channel.mark_connected(
                url=self.address, client_id=client_id, session_present=connack.session_present, **info
            )
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.watch(asyncio.shield(conn.closed), str), name=f"{channel.name}:watch")
                tg.create_task(conn.keepalive(self.config.keepalive), name=f"{channel.name}:keepalive")
                tg.create_task(source.run(self.intake_stopped), name=f"{channel.name}:intake")
        finally:
            source.detach()


async def _disconnect(conn: MqttConnection | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            await conn.disconnect()
