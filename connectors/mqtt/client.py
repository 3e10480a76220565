"""The gateway's MQTT connection: an asyncio Protocol over the codecs in ``codec``.

Why not a client library: the gateway needs to send each PUBACK only when
every target confirmed, in arrival order, with thousands of messages in
flight, and to stop reading when a route is full. The libraries measured in
``docs/decisions/mqtt-client.md`` either acknowledge on receipt or serialise
the acknowledgement with the handler, and all are slower. This class is the
transport half only (framing, keepalive, write coalescing, pause/resume);
session state (packet ids, windows, ack order) lives in ``sink`` and
``source``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Protocol, cast

from mqtt5 import (
    ConnAckPacket,
    DisconnectPacket,
    PingRespPacket,
    PubAckPacket,
    PubCompPacket,
    PublishPacket,
    PubRecPacket,
    PubRelPacket,
    SubAckPacket,
)

from connectors.mqtt.codec import DISCONNECT, PINGREQ, PUBACK, PUBCOMP, PUBREC, Codec5, ack


class PacketHandler(Protocol):
    """What the session does with incoming packets."""

    def on_publish(self, packet: PublishPacket) -> None: ...

    def on_ack(self, kind: int, packet_id: int, reason: int) -> None:
        """PUBACK, PUBREC or PUBCOMP (``kind`` is the packet's type byte) for one of our publishes."""


class MqttConnection(asyncio.Protocol):
    """One TCP connection speaking MQTT; framing and writes only."""

    def __init__(self, codec: Codec5, handler: PacketHandler) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.codec = codec
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[ConnAckPacket] = loop.create_future()
        self.closed: asyncio.Future[str] = loop.create_future()
        """Resolves with the reason once the connection is gone."""
        self.subacks: dict[int, asyncio.Future[SubAckPacket]] = {}
        self.last_received = time.monotonic()
        self.reading_paused = False
        self._rest = b""
        self._queued = bytearray()
        self._flush_scheduled = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._disconnect_reason = ""

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self._disconnect_reason or (f"{type(exc).__name__}: {exc}" if exc else "closed by the broker")
        if not self.closed.done():
            self.closed.set_result(reason)
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(reason))
        for fut in self.subacks.values():
            if not fut.done():
                fut.set_exception(ConnectionError(reason))
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        if self._rest:
            data = self._rest + data
        self.last_received = time.monotonic()
        view = memoryview(data)
        n = len(data)
        pos = 0
        read = self.codec.read
        handler = self.handler
        try:
            while pos < n:
                packet, used = read(view[pos:])
                pos += used
                kind = type(packet)
                if kind is PublishPacket:
                    handler.on_publish(packet)  # type: ignore[arg-type]
                elif kind is PubAckPacket:
                    handler.on_ack(PUBACK, packet.packet_id, int(packet.reason_code))  # type: ignore[union-attr,arg-type]
                else:
                    self._control(packet)
        except IndexError:
            pass  # the rest of a packet is still on its way
        except ValueError as exc:
            self.abort(f"malformed packet from the broker: {exc}")
            return
        self._rest = bytes(view[pos:]) if pos < n else b""

    def _control(self, packet: object) -> None:
        if isinstance(packet, PubRecPacket):
            self.handler.on_ack(PUBREC, packet.packet_id, int(packet.reason_code))
        elif isinstance(packet, PubCompPacket):
            self.handler.on_ack(PUBCOMP, packet.packet_id, int(packet.reason_code))
        elif isinstance(packet, PubRelPacket):
            self.queue(ack(PUBCOMP, packet.packet_id))
        elif isinstance(packet, SubAckPacket):
            fut = self.subacks.pop(packet.packet_id, None)
            if fut is not None and not fut.done():
                fut.set_result(packet)
        elif isinstance(packet, ConnAckPacket):
            if not self.connack.done():
                self.connack.set_result(packet)
        elif isinstance(packet, PingRespPacket):
            pass
        elif isinstance(packet, DisconnectPacket):
            self._disconnect_reason = (
                f"broker sent DISCONNECT: {packet.reason_code.name} {packet.reason_str or ''}".strip()
            )
            self.abort(self._disconnect_reason)

    # -- writing --------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.closed.done()

    def write(self, data: bytes | bytearray) -> None:
        if self.transport is not None and not self.closed.done():
            self.transport.write(data)

    def queue(self, data: bytes | bytearray) -> None:
        """Write at the end of this loop iteration, coalesced with other queued packets (acks)."""
        self._queued += data
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._queued:
            data, self._queued = self._queued, bytearray()
            self.write(data)

    async def writable(self) -> None:
        """Until the transport's write buffer drained below its high-water mark."""
        await self._writable.wait()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.reading_paused and not self.closed.done():
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self.reading_paused and not self.closed.done():
            self.reading_paused = False
            self.last_received = time.monotonic()  # silence while paused was ours, not the broker's
            self.transport.resume_reading()

    def abort(self, reason: str) -> None:
        self._disconnect_reason = self._disconnect_reason or reason
        if self.transport is not None:
            self.transport.abort()

    async def disconnect(self, timeout: float = 5.0) -> None:
        """Send queued acks and DISCONNECT, and let the broker close the connection.

        Reading resumes first: closing a socket with unread input makes the kernel
        send RST, and the broker would then drop the last PUBACKs still in its
        receive buffer (their messages would be redelivered as duplicates).
        """
        self._flush()
        self.write(DISCONNECT)
        self._disconnect_reason = "disconnected by the gateway"
        if self.reading_paused and self.transport is not None and not self.closed.done():
            self.reading_paused = False
            self.transport.resume_reading()
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            pass
        finally:
            if self.transport is not None:
                self.transport.close()

    async def keepalive(self, interval: int) -> None:
        """Send PINGREQ every ``interval``/2 s; abort if the broker was silent 1.5 intervals (while reading)."""
        if interval <= 0:
            await self.closed
            return
        while not self.closed.done():
            await asyncio.sleep(interval / 2)
            if not self.reading_paused and time.monotonic() - self.last_received > interval * 1.5:
                self.abort(f"no packet from the broker for {interval * 1.5:.0f} s (keepalive)")
                return
            self.write(PINGREQ)


async def open_connection(
    host: str,
    port: int,
    codec: Codec5,
    handler: PacketHandler,
    *,
    timeout: float,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> MqttConnection:
    """TCP connect (and the TLS handshake with ``tls``); the caller sends CONNECT and awaits ``connack``."""
    loop = asyncio.get_running_loop()
    factory: Callable[[], MqttConnection] = lambda: MqttConnection(codec, handler)  # noqa: E731
    async with asyncio.timeout(timeout):
        if tls is None:
            _, protocol = await loop.create_connection(factory, host, port)
        else:
            _, protocol = await loop.create_connection(
                factory, host, port, ssl=tls, server_hostname=server_name or host, ssl_handshake_timeout=timeout
            )
    return protocol
