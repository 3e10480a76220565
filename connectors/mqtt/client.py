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
    UnsubAckPacket,
)

from connectors.mqtt.codec import (
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBREC,
    Codec5,
    ack,
    disconnect_reason,
    frame,
    is_codec_panic,
    varint,
)


class PacketHandler(Protocol):
    """What the session does with incoming packets."""

    def on_publish(self, packet: PublishPacket) -> None: ...

    def on_publishes(self, packets: list[PublishPacket]) -> None:
        """The PUBLISH packets of one read, in order (what :meth:`on_publish` does for each, at once)."""

    def on_ack(self, kind: int, packet_id: int, reason: int) -> None:
        """PUBACK, PUBREC or PUBCOMP (``kind`` is the packet's type byte) for one of our publishes."""

    def on_unreadable(self, qos: int, packet_id: int, topic: bytes, payload: bytes, error: str) -> None:
        """A PUBLISH whose frame is intact but whose content the codec cannot decode (e.g. a topic or a
        property that is not UTF-8): its raw topic and payload. The stream stays in step: the session fails
        that message alone rather than aborting, which would only make the broker send it again."""


_NOT_ABOUT_A_MESSAGE = frozenset({0x00, 0x04, 0x89, 0x8B, 0x8D, 0x8E, 0x98, 0x9C, 0x9D, 0x9F, 0xA0})
"""DISCONNECT reason codes that say nothing about what we sent: normal, server busy, shutting down,
keepalive timeout, session taken over, administrative action, use another server, server moved,
connection rate exceeded, connection time limit."""


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
        self.subacks: dict[int, asyncio.Future[SubAckPacket | UnsubAckPacket]] = {}
        """SUBACK and UNSUBACK waiters by packet id."""
        self.last_received = time.monotonic()
        self.reading_paused = False
        self.broker_closed = False
        """The connection ended from the broker's side (EOF, reset, or a DISCONNECT about what we sent),
        not by the gateway (keepalive, shutdown): what the sink's "same message breaks it again" rule reads."""
        self._head = b""
        """The first bytes of a packet whose fixed header is not complete yet (at most 4)."""
        self._partial: bytearray | None = None
        """A packet larger than what arrived so far, allocated at its full size once its fixed header was read."""
        self._have = 0
        """Bytes of ``_partial`` filled."""
        self._queued = bytearray()
        self._flush_scheduled = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._disconnect_reason = ""
        self._aborted = False

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self._disconnect_reason or (f"{type(exc).__name__}: {exc}" if exc else "closed by the broker")
        if not self._aborted:
            self.broker_closed = True
        self._partial = None
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
        """Frame and dispatch; linear in what arrives.

        Complete packets are decoded straight from ``data``. The tail of a packet that is not
        complete yet goes into a buffer allocated at the packet's full size (its fixed header says
        it), which each later chunk fills with one copy until the packet can be decoded: a large
        message costs one pass over its bytes, never a re-parse per chunk, and the event loop runs
        between chunks.
        """
        self.last_received = time.monotonic()
        partial = self._partial
        if partial is not None:
            have = self._have
            need = len(partial) - have
            n = len(data)
            if n < need:
                partial[have : have + n] = data
                self._have = have + n
                return
            self._partial = None
            if n == need:
                partial[have:] = data
                self._parse(memoryview(partial))
                return
            view = memoryview(data)
            partial[have:] = view[:need]
            self._parse(memoryview(partial))
            if self._partial is None and not self._aborted:
                self._parse(view[need:])
            return
        if self._head:
            data = self._head + data
            self._head = b""
        self._parse(memoryview(data))

    def _parse(self, view: memoryview) -> None:
        """Decode what ``view`` holds; the PUBLISH packets of it go to the handler together, in order
        (:meth:`PacketHandler.on_publishes`), before any other packet that follows them is handled."""
        n = len(view)
        pos = 0
        read = self.codec.read
        handler = self.handler
        publishes: list[PublishPacket] = []
        add = publishes.append
        try:
            while pos < n:
                try:
                    packet, used = read(view[pos:])
                except IndexError:
                    self._keep(view, pos)  # the rest of a packet is still on its way
                    return
                except BaseException as exc:  # the mqtt5 codec panics (BaseException) on strings that are not UTF-8
                    if not (isinstance(exc, ValueError) or is_codec_panic(exc)):
                        raise
                    if publishes:
                        handler.on_publishes(publishes)
                        publishes = []
                        add = publishes.append
                    skipped = self._unreadable(view, pos, exc)
                    if skipped is None:
                        return
                    pos += skipped
                    continue
                pos += used
                kind = type(packet)
                if kind is PublishPacket:
                    add(packet)  # type: ignore[arg-type]
                else:
                    if publishes:  # every packet in its order: what came before it is handed over first
                        handler.on_publishes(publishes)
                        publishes = []
                        add = publishes.append
                    if kind is PubAckPacket:
                        handler.on_ack(PUBACK, packet.packet_id, int(packet.reason_code))  # type: ignore[union-attr,arg-type]
                        continue
                    self._control(packet)
                    if self._aborted:  # the broker sent DISCONNECT: what follows is not ours to take
                        return
        finally:
            if publishes:
                handler.on_publishes(publishes)

    def _keep(self, view: memoryview, pos: int) -> None:
        """Hold the incomplete packet at ``pos`` until the rest arrives."""
        try:
            framed = frame(view, pos)
        except ValueError as exc:
            self.abort(f"malformed packet from the broker: {exc}")
            return
        if framed is None:
            self._head = bytes(view[pos:])
            return
        total = framed[0] + framed[1]
        have = len(view) - pos
        if total <= have:  # all there, yet the codec wants more: its own lengths are wrong
            self.abort("malformed packet from the broker: inner lengths exceed the remaining length")
            return
        partial = bytearray(total)
        partial[:have] = view[pos:]
        self._partial = partial
        self._have = have

    def _unreadable(self, view: memoryview, pos: int, exc: BaseException) -> int | None:
        """A packet at ``pos`` the codec refused: skip a PUBLISH whose frame and packet id are intact
        (returns its length) and hand the handler what can be read of it; anything else is a protocol
        error (abort, None)."""
        why = "a string is not valid UTF-8" if is_codec_panic(exc) else f"{type(exc).__name__}: {exc}"
        try:
            framed = frame(view, pos)
        except ValueError:
            framed = None
        if framed is not None and view[pos] >> 4 == 3 and pos + framed[0] + framed[1] <= len(view):
            header, remaining = framed
            end = pos + header + remaining
            qos = (view[pos] >> 1) & 3
            at = pos + header
            if qos < 3 and at + 2 <= end:
                topic_end = at + 2 + ((view[at] << 8) | view[at + 1])
                if topic_end + (2 if qos else 0) <= end:
                    topic = bytes(view[at + 2 : topic_end])
                    packet_id = (view[topic_end] << 8) | view[topic_end + 1] if qos else 0
                    body = topic_end + (2 if qos else 0)
                    if self.codec.version == 5:  # skip the properties (if they cannot be, no payload)
                        try:
                            props = varint(view, body, end)
                        except ValueError:
                            props = None
                        body = min(end, body + props[1] + props[0]) if props is not None else end
                    self.handler.on_unreadable(qos, packet_id, topic, bytes(view[body:end]), why)
                    return header + remaining
        self.abort(f"malformed packet from the broker: {why}")
        return None

    def _control(self, packet: object) -> None:
        if isinstance(packet, PubRecPacket):
            self.handler.on_ack(PUBREC, packet.packet_id, int(packet.reason_code))
        elif isinstance(packet, PubCompPacket):
            self.handler.on_ack(PUBCOMP, packet.packet_id, int(packet.reason_code))
        elif isinstance(packet, PubRelPacket):
            self.queue(ack(PUBCOMP, packet.packet_id))
        elif isinstance(packet, SubAckPacket | UnsubAckPacket):
            fut = self.subacks.pop(packet.packet_id, None)
            if fut is not None and not fut.done():
                fut.set_result(packet)
        elif isinstance(packet, ConnAckPacket):
            if not self.connack.done():
                self.connack.set_result(packet)
        elif isinstance(packet, PingRespPacket):
            pass
        elif isinstance(packet, DisconnectPacket):
            self._disconnect_reason = disconnect_reason(int(packet.reason_code), packet.reason_str)
            self.abort(self._disconnect_reason)
            self.broker_closed = int(packet.reason_code) not in _NOT_ABOUT_A_MESSAGE

    # -- writing --------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.closed.done()

    @property
    def close_reason(self) -> str:
        """Why the connection ended (the broker's DISCONNECT reason, the socket error), or ""."""
        return self.closed.result() if self.closed.done() else self._disconnect_reason

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
        self._aborted = True
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
        self._aborted = True
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
