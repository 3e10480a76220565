"""The MQTT source: PUBLISH → envelope, and PUBACK/PUBREC in arrival order once settled.

MQTT requires acknowledgements in the order the PUBLISHes arrived. Targets
confirm out of order (fan-out, several sinks), so each connection keeps its
unacknowledged QoS 1/2 receipts in a deque and releases the settled prefix.
A receipt of a connection that is gone is never acknowledged: the broker
redelivers its message on the next connection (persistent session).

MQTT 5 properties that have a meaning beyond MQTT travel as headers, after
the user properties: ``content-type`` (the Content Type property) and
``message-expiry-interval`` (seconds left when the gateway received it). A
PUBLISH the gateway cannot represent (a topic or property that is not UTF-8)
fails alone through its route's policy (dead letter or ``on_error``, with
``Dispatcher.fail``), is acknowledged in arrival order like any other and
counted as ``unreadable_publishes`` on the connector: never a reason to drop
the session (the broker would only send it again).
"""

from __future__ import annotations

import time
from collections import deque

import structlog
from mqtt5 import PublishPacket

from connectors.mqtt.client import MqttConnection
from connectors.mqtt.codec import PUBACK, PUBREC, ack
from gateway.core.dispatch import Dispatcher, RouteStats
from gateway.core.envelope import Envelope, Headers, Receipt
from gateway.errors import SinkError
from gateway.util.flood import Flood

log = structlog.get_logger("gateway.connector")

CONTENT_TYPE = "content-type"
"""The header that carries the MQTT 5 Content Type property (both ways)."""
MESSAGE_EXPIRY = "message-expiry-interval"
"""The header that carries the MQTT 5 Message Expiry Interval, in seconds (both ways)."""


class SourceCounters:
    """Per connector, across sessions: what its sources could not hand to a route (``/connz``, ``/metrics``)."""

    __slots__ = ("dispatch_errors", "flood", "unreadable_publishes")

    def __init__(self) -> None:
        self.unreadable_publishes = 0
        """PUBLISH packets whose content could not be decoded (failed through the route's policy, acknowledged)."""
        self.dispatch_errors = 0
        """Messages whose dispatch raised (a bug): acknowledged, never allowed to end the session."""
        self.flood = Flood()

    def note(self, event: str, **fields: object) -> None:
        """Log the first of a flood, then a count every few seconds."""
        if n := self.flood.count():
            log.warning(event, count=n, **fields)


class InboundAcks:
    """The unacknowledged QoS 1/2 messages of one connection, in arrival order."""

    __slots__ = ("conn", "pending")

    def __init__(self, conn: MqttConnection) -> None:
        self.conn = conn
        self.pending: deque[MqttReceipt] = deque()

    def release(self) -> None:
        pending = self.pending
        conn = self.conn
        if not conn.is_open:
            return
        out = bytearray()
        while pending and pending[0].settled:
            r = pending.popleft()
            out += ack(PUBACK if r.qos == 1 else PUBREC, r.packet_id)
        conn.queue(out)


class MqttReceipt(Receipt):
    __slots__ = ("acks", "packet_id", "qos", "settled")

    def __init__(self, acks: InboundAcks, packet_id: int, qos: int) -> None:
        self.pending = 0  # Receipt.__init__, inlined: one receipt per message
        self.released = False
        self.acks = acks
        self.packet_id = packet_id
        self.qos = qos
        self.settled = False

    def settle(self) -> None:
        self.settled = True
        acks = self.acks
        if acks.pending[0] is self:  # not settled before, so still in the deque
            acks.release()


class Subscriber:
    """Turns one connection's PUBLISH packets into dispatched envelopes."""

    __slots__ = ("acks", "counters", "dispatch", "fail", "stats", "stopped")

    def __init__(self, conn: MqttConnection, dispatcher: Dispatcher, counters: SourceCounters | None = None) -> None:
        self.acks = InboundAcks(conn)
        self.dispatch = dispatcher.dispatch
        self.fail = dispatcher.fail
        self.stats: RouteStats = dispatcher.routes[0].stats
        self.counters = counters if counters is not None else SourceCounters()
        self.stopped = False
        """Shutting down: take nothing more (unacknowledged QoS 1/2 messages come back next session)."""

    def on_publish(self, p: PublishPacket) -> None:
        if self.stopped:
            return
        qos = p.qos.value  # 25 ns less than int(p.qos): the enum is a pyo3 class
        receipt = None
        if qos:
            receipt = MqttReceipt(self.acks, p.packet_id or 0, qos)
            self.acks.pending.append(receipt)
        headers: Headers | None = p.user_properties or None
        content_type = p.content_type
        expiry = p.message_expiry_interval
        if content_type is not None or expiry is not None:
            headers = with_properties(headers, content_type, expiry)
        env = Envelope(
            p.topic,
            p.payload,
            headers,
            None,
            qos,
            p.response_topic,
            p.correlation_data,
            time.monotonic_ns(),
            receipt,
        )
        try:
            self.dispatch(env)
        except Exception as exc:  # a bug below; it must not end the session (the broker would resend it)
            self._dispatch_failed(env, exc)

    def _dispatch_failed(self, env: Envelope, exc: Exception) -> None:
        counters = self.counters
        counters.dispatch_errors += 1
        counters.note("mqtt.dispatch_failed", topic=env.topic, error=f"{type(exc).__name__}: {exc}")
        receipt = env.receipt
        if receipt is None or receipt.pending == 0:  # no route took it: it is ours to count and acknowledge
            self.stats.received += 1
            self.stats.failed += 1
        if isinstance(receipt, MqttReceipt) and not receipt.settled:
            receipt.pending = -1  # a route that still finishes it will not settle it a second time
            receipt.settle()

    def on_unreadable(self, qos: int, packet_id: int, topic: bytes, payload: bytes, error: str) -> None:
        """A PUBLISH the codec could not decode fails alone through its route's policy (dead letter or
        ``on_error``), acknowledged in arrival order like any other; its topic is read with U+FFFD for the
        bytes that are not UTF-8, its properties are lost."""
        if self.stopped:
            return
        counters = self.counters
        counters.unreadable_publishes += 1
        counters.note("mqtt.publish_unreadable", error=error, packet_id=packet_id, qos=qos)
        receipt = None
        if qos:
            receipt = MqttReceipt(self.acks, packet_id, qos)
            self.acks.pending.append(receipt)
        env = Envelope(
            topic.decode("utf-8", "replace"), payload, None, None, qos, None, None, time.monotonic_ns(), receipt
        )
        try:
            self.fail(env, SinkError(f"the MQTT PUBLISH cannot be read: {error}", retriable=False))
        except Exception as exc:  # a bug below; it must not end the session
            self._dispatch_failed(env, exc)


def with_properties(headers: Headers | None, content_type: str | None, expiry: int | None) -> Headers:
    """The user properties followed by the Content Type and Message Expiry Interval as headers."""
    out = list(headers) if headers else []
    if content_type is not None:
        out.append((CONTENT_TYPE, content_type))
    if expiry is not None:
        out.append((MESSAGE_EXPIRY, str(expiry)))
    return out


class RetainedSubscriber(Subscriber):
    """A ``retained_only`` route's subscriber: messages without the retain flag are acknowledged, not routed.

    A separate class, chosen when the session starts, so that other routes test nothing more per message.
    """

    __slots__ = ()

    def on_publish(self, p: PublishPacket) -> None:
        if p.retain or self.stopped:
            super().on_publish(p)
            return
        stats = self.stats
        stats.received += 1
        stats.filtered += 1
        qos = p.qos.value  # 25 ns less than int(p.qos): the enum is a pyo3 class
        if qos:  # acknowledged in arrival order, like every other message of the session
            receipt = MqttReceipt(self.acks, p.packet_id or 0, qos)
            self.acks.pending.append(receipt)
            receipt.settle()
