"""MQTT wire codecs: version 5 on the ``mqtt5`` Rust codec, 3.1.1 written here.

Both produce and consume the ``mqtt5`` packet classes, so the client above
them handles one set of packet types whatever the protocol version. MQTT 3.1.1
is a small subset of 5 without properties; ``mqtt5`` only speaks 5, and no
maintained sans-IO 3.1.1 codec exists on PyPI, hence the ~120 lines below.

Acknowledgement packets (PUBACK, PUBREC, PUBREL, PUBCOMP with reason
"success") are byte-identical in both versions and encoded with one
``struct.pack``.
"""

from __future__ import annotations

import struct

import mqtt5
from mqtt5 import (
    ConnAckPacket,
    ConnAckReasonCode,
    Packet,
    PingRespPacket,
    PubAckPacket,
    PubCompPacket,
    PublishPacket,
    PubRecPacket,
    PubRelPacket,
    QoS,
    SubAckPacket,
    SubAckReasonCode,
    TopicFilter,
    UnsubAckPacket,
    UnsubAckReasonCode,
    UnsubscribePacket,
)

_ACK = struct.Struct(">BBH")
PUBACK, PUBREC, PUBREL, PUBCOMP = 0x40, 0x50, 0x62, 0x70
PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"

CONTENT_TYPE = "content-type"
"""The header that carries the MQTT 5 Content Type property (both ways: source and sink)."""
MESSAGE_EXPIRY = "message-expiry-interval"
"""The header that carries the MQTT 5 Message Expiry Interval, in seconds (both ways)."""


def ack(kind: int, packet_id: int) -> bytes:
    """PUBACK / PUBREC / PUBREL / PUBCOMP with success, same bytes in 3.1.1 and 5."""
    return _ACK.pack(kind, 2, packet_id)


def varint(view: memoryview, at: int, end: int) -> tuple[int, int] | None:
    """(value, length in bytes) of the variable byte integer at ``at``; None if it does not end before
    ``end``. ValueError if it is longer than four bytes."""
    value = 0
    shift = 0
    i = at
    while i < end:
        b = view[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i - at
        shift += 7
        if shift > 21:
            raise ValueError("malformed variable byte integer")
    return None


def frame(view: memoryview, pos: int) -> tuple[int, int] | None:
    """(fixed header length, remaining length) of the packet at ``pos``; None while its fixed header
    is incomplete. ValueError if the remaining length is not a valid variable byte integer."""
    length = varint(view, pos + 1, len(view))
    return None if length is None else (1 + length[1], length[0])


def is_codec_panic(exc: BaseException) -> bool:
    """A Rust panic inside ``mqtt5`` (pyo3's PanicException derives from BaseException, not Exception):
    ``mqtt5.read`` panics on a string that is not UTF-8, ``PublishPacket.write`` on a packet over 256 MB."""
    return type(exc).__name__ == "PanicException"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">H", len(b)) + b


class Codec5:
    """MQTT 5 through the ``mqtt5`` package."""

    version = 5

    def connect(
        self,
        client_id: str,
        *,
        clean_start: bool,
        keepalive: int,
        session_expiry: int,
        receive_maximum: int,
        username: str | None,
        password: str | None,
    ) -> bytes:
        return mqtt5.ConnectPacket(
            client_id,
            clean_start=clean_start,
            keep_alive=keepalive,
            session_expiry_interval=session_expiry,
            receive_max=receive_maximum,
            username=username,
            password=password.encode() if password is not None else None,
        ).write()

    def subscribe(self, packet_id: int, filters: list[tuple[str, int]]) -> bytes:
        return mqtt5.SubscribePacket(
            packet_id, [TopicFilter(f, max_qos=QoS(q), retain_as_published=True) for f, q in filters]
        ).write()

    def unsubscribe(self, packet_id: int, filters: list[str]) -> bytes:
        return UnsubscribePacket(packet_id, filters).write()

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        packet_id: int | None,
        duplicate: bool,
        user_properties: list[tuple[str, str]] | None,
        response_topic: str | None,
        correlation_data: bytes | None,
        content_type: str | None = None,
        message_expiry: int | None = None,
    ) -> bytes:
        if content_type is None and message_expiry is None:  # two keyword arguments fewer: ~0.1 us a message
            return PublishPacket(
                topic,
                payload,
                qos=QoS(qos),
                retain=retain,
                packet_id=packet_id,
                duplicate=duplicate,
                user_properties=user_properties,
                response_topic=response_topic,
                correlation_data=correlation_data,
            ).write()
        return PublishPacket(
            topic,
            payload,
            qos=QoS(qos),
            retain=retain,
            packet_id=packet_id,
            duplicate=duplicate,
            user_properties=user_properties,
            response_topic=response_topic,
            correlation_data=correlation_data,
            content_type=content_type,
            message_expiry_interval=message_expiry,
        ).write()

    @staticmethod
    def read(view: memoryview) -> tuple[Packet, int]:
        """One packet from the start of ``view``; IndexError if incomplete, ValueError if malformed."""
        return mqtt5.read(view)


_V311_CONNACK = {
    0: ConnAckReasonCode.SUCCESS,
    1: ConnAckReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
    2: ConnAckReasonCode.CLIENT_ID_NOT_VALID,
    3: ConnAckReasonCode.SERVER_UNAVAILABLE,
    4: ConnAckReasonCode.BAD_USER_NAME_OR_PASSWORD,
    5: ConnAckReasonCode.NOT_AUTHORIZED,
}
_V311_SUBACK = {
    0: SubAckReasonCode.GRANTED_QOS_AT_MOST_ONCE,
    1: SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE,
    2: SubAckReasonCode.GRANTED_QOS_EXACTLY_ONCE,
}


class Codec311(Codec5):
    """MQTT 3.1.1 (protocol level 4). Properties (headers, response topic) do not exist and are dropped."""

    version = 4

    def connect(
        self,
        client_id: str,
        *,
        clean_start: bool,
        keepalive: int,
        session_expiry: int,
        receive_maximum: int,
        username: str | None,
        password: str | None,
    ) -> bytes:
        flags = 0x02 if clean_start else 0
        body = bytearray(_str("MQTT"))
        body.append(4)
        tail = bytearray(_str(client_id))
        if username is not None:
            flags |= 0x80
            tail += _str(username)
            if password is not None:
                flags |= 0x40
                tail += _str(password)
        body.append(flags)
        body += struct.pack(">H", keepalive)
        body += tail
        return b"\x10" + _varint(len(body)) + bytes(body)

    def subscribe(self, packet_id: int, filters: list[tuple[str, int]]) -> bytes:
        body = bytearray(struct.pack(">H", packet_id))
        for f, q in filters:
            body += _str(f)
            body.append(q)
        return b"\x82" + _varint(len(body)) + bytes(body)

    def unsubscribe(self, packet_id: int, filters: list[str]) -> bytes:
        body = bytearray(struct.pack(">H", packet_id))
        for f in filters:
            body += _str(f)
        return b"\xa2" + _varint(len(body)) + bytes(body)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        packet_id: int | None,
        duplicate: bool,
        *_: object,
        **__: object,
    ) -> bytes:
        """A PUBLISH without what MQTT 5 adds (user properties, response topic, correlation data, content
        type, message expiry): those arguments are taken, and dropped."""
        t = topic.encode()
        head = 0x30 | (qos << 1) | (1 if retain else 0) | (0x08 if duplicate and qos else 0)
        var = struct.pack(">H", len(t)) + t
        if qos:
            var += struct.pack(">H", packet_id)
        return bytes((head,)) + _varint(len(var) + len(payload)) + var + payload

    @staticmethod
    def read(view: memoryview) -> tuple[Packet, int]:
        """One packet from the start of ``view``; IndexError if incomplete, ValueError if malformed
        (UnicodeDecodeError, a ValueError, for a topic that is not UTF-8)."""
        n = len(view)
        if n < 2:
            raise IndexError("Not enough bytes")
        b0 = view[0]
        length = 0
        shift = 0
        i = 1
        while True:
            if i >= n:
                raise IndexError("Not enough bytes")
            b = view[i]
            i += 1
            length |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift > 21:
                raise ValueError("malformed remaining length")
        end = i + length
        if end > n:
            raise IndexError("Not enough bytes")
        kind = b0 >> 4
        if kind == 3:
            qos = (b0 >> 1) & 3
            if length < 2:
                raise ValueError("PUBLISH without a topic")
            tl = (view[i] << 8) | view[i + 1]
            j = i + 2 + tl
            if qos == 3 or j + (2 if qos else 0) > end:
                raise ValueError("malformed PUBLISH (QoS 3, or the topic overruns the packet)")
            topic = bytes(view[i + 2 : j]).decode()
            pid = None
            if qos:
                pid = (view[j] << 8) | view[j + 1]
                j += 2
            pkt: Packet = PublishPacket(
                topic, bytes(view[j:end]), qos=QoS(qos), retain=bool(b0 & 1), packet_id=pid, duplicate=bool(b0 & 8)
            )
            return pkt, end
        if kind in (4, 5, 6, 7):
            pid = (view[i] << 8) | view[i + 1]
            cls = (PubAckPacket, PubRecPacket, PubRelPacket, PubCompPacket)[kind - 4]
            return cls(pid), end
        if kind == 2:
            code = _V311_CONNACK.get(view[i + 1], ConnAckReasonCode.UNSPECIFIED_ERROR)
            return ConnAckPacket(session_present=bool(view[i] & 1), reason_code=code), end
        if kind == 9:
            pid = (view[i] << 8) | view[i + 1]
            codes = [_V311_SUBACK.get(c, SubAckReasonCode.UNSPECIFIED_ERROR) for c in bytes(view[i + 2 : end])]
            return SubAckPacket(pid, codes), end
        if kind == 11:  # UNSUBACK: 3.1.1 has no reason codes; every filter counts as removed
            return UnsubAckPacket((view[i] << 8) | view[i + 1], [UnsubAckReasonCode.SUCCESS]), end
        if kind == 13:
            return PingRespPacket(), end
        raise ValueError(f"unexpected MQTT 3.1.1 packet type {kind}")


def codec_for(version: int) -> Codec5:
    return Codec5() if version == 5 else Codec311()


# -- refusals in words ------------------------------------------------------------------------------
REASONS = {
    0x80: "Unspecified error",
    0x81: "Malformed Packet",
    0x82: "Protocol Error",
    0x83: "Implementation specific error",
    0x84: "Unsupported Protocol Version",
    0x85: "Client Identifier not valid",
    0x86: "Bad User Name or Password",
    0x87: "Not authorized",
    0x88: "Server unavailable",
    0x89: "Server busy",
    0x8A: "Banned",
    0x8B: "Server shutting down",
    0x8C: "Bad authentication method",
    0x8D: "Keep Alive timeout",
    0x8E: "Session taken over",
    0x8F: "Topic Filter invalid",
    0x90: "Topic Name invalid",
    0x91: "Packet Identifier in use",
    0x93: "Receive Maximum exceeded",
    0x94: "Topic Alias invalid",
    0x95: "Packet too large",
    0x96: "Message rate too high",
    0x97: "Quota exceeded",
    0x98: "Administrative action",
    0x99: "Payload format invalid",
    0x9A: "Retain not supported",
    0x9B: "QoS not supported",
    0x9C: "Use another server",
    0x9D: "Server moved",
    0x9E: "Shared Subscriptions not supported",
    0x9F: "Connection rate exceeded",
    0xA0: "Maximum connect time",
    0xA1: "Subscription Identifiers not supported",
    0xA2: "Wildcard Subscriptions not supported",
}
"""MQTT 5 reason codes of failures, by the names the specification gives them."""

_V311_RETURN_CODES = {
    1: "Connection Refused, unacceptable protocol version",
    2: "Connection Refused, identifier rejected",
    3: "Connection Refused, Server unavailable",
    4: "Connection Refused, bad user name or password",
    5: "Connection Refused, not authorized",
}
"""MQTT 3.1.1 CONNACK return codes, as the 3.1.1 specification names them."""
_V311_CODE_OF = {int(reason): code for code, reason in _V311_CONNACK.items()}
"""A 3.1.1 return code by the MQTT 5 reason code :meth:`Codec311.read` gave it."""

_SAID = {
    0x80: "the broker refused it without saying why",
    0x81: "the broker found a packet from the gateway malformed",
    0x82: "the broker found a protocol error in what the gateway sent",
    0x83: "the broker refused it for a reason of its own",
    0x84: 'the broker does not speak this MQTT version: set the connector\'s protocol to 5 or "3.1.1"',
    0x85: "the broker refused the client id",
    0x86: "the broker refused the user name or password",
    0x87: "the broker refused the user name or password, or does not authorize this client",
    0x88: "the broker is unavailable",
    0x89: "the broker is busy",
    0x8A: "the broker has banned this client",
    0x8B: "the broker is shutting down",
    0x8C: "the broker does not support the authentication method",
    0x8D: "the broker heard nothing from the gateway within the keepalive",
    0x8E: "another client connected with the same client id and took the session over",
    0x8F: "the broker refused the topic filter",
    0x90: "the broker refused the topic name",
    0x95: "the broker refused a packet as too large",
    0x96: "the broker refused the message rate as too high",
    0x97: "the broker's quota for this client is exceeded",
    0x98: "an administrator of the broker disconnected this client",
    0x99: "the broker refused the payload format",
    0x9A: "the broker does not support retained messages",
    0x9B: "the broker does not support this QoS",
    0x9C: "the broker sends this client to another server",
    0x9D: "the broker has moved to another server",
    0x9E: "the broker does not support shared subscriptions",
    0x9F: "the broker refuses connections this fast",
    0xA0: "the broker's maximum connect time is over",
    0xA2: "the broker does not support wildcard subscriptions",
}
"""What a failure reason code means to an operator, in one sentence (the packet's context aside)."""
_ON_PUBLISH = {
    0x87: "the broker does not authorize this client to publish to this topic",
    0x80: "the broker refused the publish without saying why",
    0x83: "the broker refused the publish for a reason of its own",
}


def refusal_code(reason: int) -> str:
    return f"0x{reason:02X}"


def connack_refusal(version: int, reason: ConnAckReasonCode) -> tuple[str, dict[str, str]]:
    """A refused CONNECT in words, and the protocol's own code for the log (``code``, ``reason``)."""
    code = int(reason)
    if version != 5:
        raw = _V311_CODE_OF.get(code)
        if raw is not None and raw in _V311_RETURN_CODES:
            said = _SAID[{1: 0x84, 2: 0x85, 3: 0x88, 4: 0x86, 5: 0x87}[raw]]
            return said, {"code": refusal_code(raw), "reason": _V311_RETURN_CODES[raw]}
    said = _SAID.get(code, "the broker refused the connection")
    return said, {"code": refusal_code(code), "reason": REASONS.get(code, reason.name)}


def publish_refusal(reason: int) -> str:
    """A PUBACK / PUBREC failure reason in words, with its code: the message of the publish's error."""
    said = _ON_PUBLISH.get(reason) or _SAID.get(reason, "the broker refused the publish")
    return f"{said} (reason code {refusal_code(reason)} {REASONS.get(reason, 'unknown')})"


def disconnect_reason(reason: int, text: str | None) -> str:
    """A DISCONNECT from the broker in words, with its code (and the broker's own reason string)."""
    said = _SAID.get(reason, "the broker closed the connection") if reason else "the broker closed the connection"
    detail = f"DISCONNECT {refusal_code(reason)} {REASONS.get(reason, 'Normal disconnection' if not reason else '')}"
    return f"{said} ({detail.strip()}{': ' + text if text else ''})"
