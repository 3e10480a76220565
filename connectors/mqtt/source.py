"""The MQTT source: PUBLISH → envelope, and PUBACK/PUBREC in arrival order once settled.

MQTT requires acknowledgements in the order the PUBLISHes arrived. Targets
confirm out of order (fan-out, several sinks), so each connection keeps its
unacknowledged QoS 1/2 receipts in a deque and releases the settled prefix.
A receipt of a connection that is gone is never acknowledged: the broker
redelivers its message on the next connection (persistent session).
"""

from __future__ import annotations

import time
from collections import deque

from mqtt5 import PublishPacket

from connectors.mqtt.client import MqttConnection
from connectors.mqtt.codec import PUBACK, PUBREC, ack
from gateway.dispatch import Dispatcher, RouteStats
from gateway.envelope import Envelope, Receipt


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
        if acks.pending[0] is self:
            acks.release()


class Subscriber:
    """Turns one connection's PUBLISH packets into dispatched envelopes."""

    __slots__ = ("acks", "dispatch", "stopped")

    def __init__(self, conn: MqttConnection, dispatcher: Dispatcher) -> None:
        self.acks = InboundAcks(conn)
        self.dispatch = dispatcher.dispatch
        self.stopped = False
        """Shutting down: take nothing more (unacknowledged QoS 1/2 messages come back next session)."""

    def on_publish(self, p: PublishPacket) -> None:
        if self.stopped:
            return
        qos = int(p.qos)
        receipt = None
        if qos:
            receipt = MqttReceipt(self.acks, p.packet_id or 0, qos)
            self.acks.pending.append(receipt)
        self.dispatch(
            Envelope(
                p.topic,
                p.payload,
                p.user_properties or None,
                None,
                qos,
                p.response_topic,
                p.correlation_data,
                time.monotonic_ns(),
                receipt,
            )
        )


class RetainedSubscriber(Subscriber):
    """A ``retained_only`` route's subscriber: messages without the retain flag are acknowledged, not routed.

    A separate class, chosen when the session starts, so that other routes test nothing more per message.
    """

    __slots__ = ("stats",)

    def __init__(self, conn: MqttConnection, dispatcher: Dispatcher) -> None:
        super().__init__(conn, dispatcher)
        self.stats: RouteStats = dispatcher.routes[0].stats

    def on_publish(self, p: PublishPacket) -> None:
        if p.retain or self.stopped:
            super().on_publish(p)
            return
        stats = self.stats
        stats.received += 1
        stats.filtered += 1
        qos = int(p.qos)
        if qos:  # acknowledged in arrival order, like every other message of the session
            receipt = MqttReceipt(self.acks, p.packet_id or 0, qos)
            self.acks.pending.append(receipt)
            receipt.settle()
