"""The MQTT sink: pipelined QoS 1/2 publishes within the broker's receive window.

Publishes of a batch are encoded into one buffer and written at once. Each
QoS 1/2 publish holds a packet id until its PUBACK (or PUBREC → PUBREL →
PUBCOMP) completes its flight. The in-flight table survives reconnects: on a
new connection everything unacknowledged is sent again in order (``DUP`` set),
as the MQTT session rules require.
"""

from __future__ import annotations

import asyncio

from connectors.mqtt.client import MqttConnection
from connectors.mqtt.codec import PUBREC, PUBREL, Codec5, ack
from connectors.mqtt.config import MqttConfig, MqttTarget
from gateway.dispatch import Flight
from gateway.errors import ConnectorError, PayloadTooLarge, SinkError
from gateway.sink import Item, Sink


class PacketIds:
    """Packet identifiers in use on one session (publishes and subscribes share the space)."""

    def __init__(self) -> None:
        self.used: set[int] = set()
        self._next = 0

    def take(self) -> int:
        if len(self.used) >= 65535:
            raise RuntimeError("no free MQTT packet identifier")
        pid = self._next
        while True:
            pid = pid % 65535 + 1
            if pid not in self.used:
                break
        self._next = pid
        self.used.add(pid)
        return pid

    def free(self, pid: int) -> None:
        self.used.discard(pid)


class _Outbound:
    __slots__ = ("item", "qos", "released")

    def __init__(self, item: Item, qos: int) -> None:
        self.item = item
        self.qos = qos
        self.released = False
        """QoS 2: PUBREC received, PUBREL sent, awaiting PUBCOMP."""


class MqttSink(Sink):
    def __init__(self, config: MqttConfig, codec: Codec5, ids: PacketIds) -> None:
        super().__init__()
        self.config = config
        self.codec = codec
        self.ids = ids
        self.conn: MqttConnection | None = None
        self.window = config.max_inflight
        self.max_packet = 268_435_455
        self.inflight: dict[int, _Outbound] = {}
        self._room = asyncio.Event()

    def attach(self, conn: MqttConnection, receive_maximum: int, max_packet_size: int | None) -> int:
        """Use a new connection; resend what the last one left unacknowledged. Returns how many."""
        self.conn = conn
        self.window = max(1, min(self.config.max_inflight, receive_maximum))
        self.max_packet = max_packet_size or 268_435_455
        out = bytearray()
        for pid, o in self.inflight.items():
            if o.released:
                out += ack(PUBREL, pid)
            else:
                out += self._encode(o.item, o.qos, pid, duplicate=True)
        if out:
            conn.write(out)
        return len(self.inflight)

    def detach(self) -> None:
        self.conn = None
        self._room.set()

    def _encode(self, item: Item, qos: int, pid: int | None, *, duplicate: bool = False) -> bytes:
        flight, d = item
        env = flight.env
        spec: MqttTarget = d.target.spec
        return self.codec.publish(
            d.address, env.payload, qos, spec.retain, pid, duplicate, env.headers, env.reply, env.correlation
        )

    def on_ack(self, kind: int, pid: int, reason: int) -> None:
        o = self.inflight.get(pid)
        if o is None:
            return
        if kind == PUBREC and reason < 0x80:
            o.released = True
            if self.conn is not None:
                self.conn.queue(ack(PUBREL, pid))
            return
        del self.inflight[pid]
        self.ids.free(pid)
        self._room.set()
        flight, d = o.item
        if reason >= 0x80:
            # 0x97 quota exceeded may pass; not authorized, bad topic or payload will not.
            retriable = reason == 0x97
            flight.fail(d, SinkError(f"MQTT broker refused the publish (reason code {reason})", retriable=retriable))
        else:
            flight.done()

    async def write_batch(self, batch: list[Item]) -> None:
        conn = self.conn
        if conn is None or not conn.is_open:
            self.requeue(batch)
            raise ConnectorError("not connected")
        inflight = self.inflight
        out = bytearray()
        at_most_once: list[Flight] = []
        i = 0
        try:
            for i, item in enumerate(batch):  # noqa: B007 - `i` is read in the except clause
                flight, d = item
                qos = d.target.spec.qos
                size = len(flight.env.payload) + len(d.address) + 64
                if size > self.max_packet:
                    limit = self.max_packet
                    flight.fail(d, PayloadTooLarge(len(flight.env.payload), limit, "MQTT broker maximum packet size"))
                    continue
                if qos == 0:
                    out += self._encode(item, 0, None)
                    at_most_once.append(flight)
                    continue
                while len(inflight) >= self.window:
                    if out:
                        conn.write(out)
                        out = bytearray()
                    self._room.clear()
                    await self._room.wait()
                    if self.conn is not conn:
                        raise ConnectorError("connection lost")
                pid = self.ids.take()
                inflight[pid] = _Outbound(item, qos)
                out += self._encode(item, qos, pid)
            i = len(batch)
        except BaseException:
            self.requeue(batch[i:])
            raise
        finally:
            if out:
                conn.write(out)
            for flight in at_most_once:  # QoS 0: written is all the protocol promises
                flight.done()
        await conn.writable()
