"""The MQTT connector: one connection per session, serving every route that reads or writes here."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

from mqtt5 import ConnAckReasonCode, PublishPacket

from connectors.mqtt.client import MqttConnection, open_connection
from connectors.mqtt.codec import codec_for
from connectors.mqtt.config import MqttConfig, MqttSource
from connectors.mqtt.sink import MqttSink, PacketIds
from connectors.mqtt.source import Subscriber
from gateway.connector import Connector, ConnectorContext
from gateway.dispatch import Dispatcher
from gateway.errors import ConnectorError
from gateway.patterns import MQTT
from gateway.redact import redact_url
from gateway.sink import Sink


class MqttConnector(Connector):
    config: MqttConfig

    def __init__(self, name: str, config: MqttConfig, context: ConnectorContext) -> None:
        super().__init__(name, config, context)
        url = urlsplit(config.url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 1883
        self.client_id = config.client_id or f"{context.gateway_id}-{name}"
        self.address = redact_url(config.url)
        self.username, self.password = config.credentials
        self.codec = codec_for(config.version)
        self.ids = PacketIds()
        self.conn: MqttConnection | None = None
        self._subscriber: Subscriber | None = None
        self._dispatcher: Dispatcher | None = None

    def make_sink(self) -> Sink:
        return MqttSink(self.config, self.codec, self.ids)

    # PacketHandler: the connection calls these for every incoming packet.
    def on_publish(self, packet: PublishPacket) -> None:
        sub = self._subscriber
        if sub is not None:
            sub.on_publish(packet)

    def on_ack(self, kind: int, packet_id: int, reason: int) -> None:
        sink = self._sink
        if isinstance(sink, MqttSink):
            sink.on_ack(kind, packet_id, reason)

    def _filters(self) -> list[tuple[str, int]]:
        qos: dict[str, int] = {}
        for route in self.routes:
            spec: MqttSource = route.spec
            f = route.patterns[0].native_filter()
            if spec.share_group:
                f = f"$share/{spec.share_group}/{f}"
            qos[f] = max(qos.get(f, 0), spec.qos)
        return list(qos.items())

    async def session(self) -> None:
        cfg = self.config
        try:
            conn = await open_connection(self.host, self.port, self.codec, self, timeout=cfg.connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise ConnectorError(f"cannot connect to {self.address}: {type(exc).__name__}: {exc}") from exc
        self.conn = conn
        sink = self._sink if isinstance(self._sink, MqttSink) else None
        if self.routes and self._dispatcher is None:
            self._dispatcher = Dispatcher(MQTT, self.routes, cache_size=self.context.cache_size)
        dispatcher = self._dispatcher

        def on_gate(is_open: bool) -> None:
            if is_open and not self.intake_stopped.is_set():
                conn.resume_reading()
            elif not is_open:
                conn.pause_reading()

        try:
            if dispatcher is not None:
                self._subscriber = Subscriber(conn, dispatcher)
                dispatcher.gate.add_listener(on_gate)
                if not dispatcher.gate.is_open:
                    conn.pause_reading()
            conn.write(
                self.codec.connect(
                    self.client_id,
                    clean_start=cfg.clean_start,
                    keepalive=cfg.keepalive,
                    session_expiry=cfg.session_expiry,
                    receive_maximum=cfg.receive_maximum,
                    username=self.username,
                    password=self.password,
                )
            )
            try:
                async with asyncio.timeout(cfg.connect_timeout):
                    connack = await conn.connack
            except (ConnectionError, TimeoutError) as exc:
                raise ConnectorError(f"no CONNACK from {self.address}: {str(exc) or 'timed out'}") from exc
            if connack.reason_code != ConnAckReasonCode.SUCCESS:
                raise ConnectorError(f"{self.address} refused the connection: {connack.reason_code.name}")
            resent = 0
            if sink is not None:
                resent = sink.attach(conn, connack.receive_max, connack.max_packet_size)
            if dispatcher is not None:
                await self._subscribe(conn)
            self.mark_connected(
                url=self.address, client_id=self.client_id, session_present=connack.session_present, resent=resent
            )
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watch(conn), name=f"{self.name}:watch")
                tg.create_task(conn.keepalive(cfg.keepalive), name=f"{self.name}:keepalive")
                if sink is not None:
                    tg.create_task(sink.run_writer(), name=f"{self.name}:writer")
                if dispatcher is not None:
                    tg.create_task(self._stop_reading_on_intake_stop(conn), name=f"{self.name}:intake")
        finally:
            self.conn = None
            self._subscriber = None
            if dispatcher is not None:
                dispatcher.gate.remove_listener(on_gate)
            if sink is not None:
                sink.detach()
            conn.abort("session ended")

    async def _subscribe(self, conn: MqttConnection) -> None:
        filters = self._filters()
        pid = self.ids.take()
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        conn.subacks[pid] = fut  # type: ignore[assignment]
        conn.write(self.codec.subscribe(pid, filters))
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                suback = await fut
        except (ConnectionError, TimeoutError) as exc:
            raise ConnectorError(f"no SUBACK from {self.address}: {str(exc) or 'timed out'}") from exc
        finally:
            self.ids.free(pid)
        for (flt, _), code in zip(filters, suback.reason_codes, strict=False):  # type: ignore[attr-defined]
            if int(code) >= 0x80:
                self.log.error("connector.subscribe_refused", filter=flt, reason=code.name)

    async def _watch(self, conn: MqttConnection) -> None:
        reason = await asyncio.shield(conn.closed)
        raise ConnectorError(reason)

    async def _stop_reading_on_intake_stop(self, conn: MqttConnection) -> None:
        await self.intake_stopped.wait()
        if self._subscriber is not None:
            self._subscriber.stopped = True
        conn.pause_reading()

    async def finish(self) -> None:
        conn = self.conn
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()
