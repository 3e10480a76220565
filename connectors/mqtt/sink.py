"""The MQTT sink: pipelined QoS 1/2 publishes within the broker's receive window.

Publishes of a batch are encoded into one buffer and written at once. Each
QoS 1/2 publish holds a packet id until its PUBACK (or PUBREC → PUBREL →
PUBCOMP) completes its flight. The in-flight table survives reconnects: on a
new connection everything unacknowledged is sent again in order (``DUP`` set),
as the MQTT session rules require.

One message never costs the connection. ``publish.PublishEncoder`` checks
each message against what makes MQTT brokers drop a connection (Mosquitto
says "malformed UTF-8" or "protocol error") before it is encoded: its topic,
its headers as user properties (``NAME-bin`` with base64 for a value MQTT
cannot carry), the 65535-byte string limit and the broker's maximum packet
size. A message that fails a check, or that the codec refuses, fails alone
(non-retriable); nothing of it is written.

For what the checks do not know, the "same message breaks the connection
again" rule (DESIGN §8): when the broker closes a connection while publishes
were written and unconfirmed, each of them gets a strike; on the next
connection those are resent alone, one at a time, each confirmed before the
next is written ("probe mode"), and a message that is followed by the
connection closing again while it was alone fails for good and is not sent
again. A connection the gateway ended itself (keepalive, shutdown) gives no
strikes, nor does a broker that says it is going away (DISCONNECT "server
shutting down" and the like); messages still waiting in the queue were not
written and get none either. A broker outage fails nothing, unless the broker
goes down a second time just while one message is being probed alone (the
rule cannot tell that from a refusal). The cost: one round trip per publish
that was unconfirmed when the broker closed the connection (at most
``max_inflight``), before new messages flow again.
"""

from __future__ import annotations

import asyncio

from connectors.mqtt.client import MqttConnection
from connectors.mqtt.codec import PUBREC, PUBREL, Codec5, ack, publish_refusal
from connectors.mqtt.config import MqttConfig
from connectors.mqtt.publish import PublishEncoder
from gateway.core.contract import Flight, Item, Sink
from gateway.errors import ConnectorError, GatewayError, SinkError

_COALESCE = 65536
"""Packets smaller than this are gathered into one write per batch; larger ones are written on their own."""


class NoPacketId(GatewayError):
    """All 65 535 MQTT packet identifiers are in use: more unacknowledged publishes and subscribes than
    MQTT can number. The windows (``max_inflight``, the broker's Receive Maximum) keep far below it, so
    reaching it is a bug, not a broker problem: the session ends and says so loudly."""


class PacketIds:
    """Packet identifiers in use on one session (publishes and subscribes share the space)."""

    def __init__(self) -> None:
        self.used: set[int] = set()
        self._next = 0

    def take(self) -> int:
        if len(self.used) >= 65535:
            raise NoPacketId("no free MQTT packet identifier")
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
        self.encoder = PublishEncoder(codec)
        self.inflight: dict[int, _Outbound] = {}
        self._room = asyncio.Event()
        self._struck: set[_Outbound] = set()
        """In-flight publishes with a strike (unconfirmed when the broker closed a connection): while any,
        the writer probes them, alone, before it takes new work. Kept here, not per publish: the hot path
        pays nothing for it."""
        self._probe: _Outbound | None = None
        """The publish written alone and not yet confirmed."""
        self.probe_resends = 0
        """Publishes resent alone after the broker closed a connection while they were unconfirmed."""
        self.closed_on_message = 0
        """Publishes failed because the broker closed the connection again while they were written alone."""

    @property
    def probing(self) -> int:
        """Publishes with a strike, to be resent alone on the next (or this) connection."""
        return len(self._struck)

    def forgive(self) -> None:
        """A connect attempt failed after the loss: the broker was down (a restart, an outage), not closing
        the connection on a message, so nothing is struck and nothing is probed alone."""
        self._struck.clear()

    # -- connection lifecycle ---------------------------------------------------------------
    def attach(self, conn: MqttConnection, receive_maximum: int, max_packet_size: int | None) -> int:
        """Use a new connection; resend what the last one left unacknowledged. Returns how many.

        With struck publishes among them only the PUBRELs go now: :meth:`run_writer` probes the rest.
        """
        self.conn = conn
        self.window = max(1, min(self.config.max_inflight, receive_maximum))
        self.encoder.limit(max_packet_size)
        if self._struck:
            self._struck.intersection_update(self.inflight.values())  # settled meanwhile
        out = bytearray()
        for pid, o in list(self.inflight.items()):
            if o.released:
                out += ack(PUBREL, pid)
            elif not self._struck:
                data = self._resend(pid, o)
                if data is not None:
                    out += data
        if out:
            conn.write(out)
        return len(self.inflight)

    def detach(self) -> None:
        """The connection ended. If the broker closed it, what it left unconfirmed gets a strike, and a
        publish that was alone on it (a probe that already had one) fails: the broker refuses that message."""
        conn, self.conn = self.conn, None
        probe, self._probe = self._probe, None
        self._room.set()
        if conn is None or not conn.broker_closed:
            return
        struck = self._struck
        for pid, o in list(self.inflight.items()):
            if o.released:
                continue  # QoS 2 past PUBREC: the broker has it
            if o is probe and o in struck:
                self._drop(
                    pid,
                    o,
                    SinkError(
                        "the MQTT broker closed the connection on this message, also when it was sent alone; "
                        f"it is not sent again (last: {conn.close_reason})",
                        retriable=False,
                    ),
                )
                self.closed_on_message += 1
            else:
                struck.add(o)

    def _drop(self, pid: int, o: _Outbound, error: GatewayError) -> None:
        """Give up an in-flight publish: free its packet id and fail its flight."""
        del self.inflight[pid]
        self.ids.free(pid)
        self._struck.discard(o)
        self._room.set()
        flight, d = o.item
        flight.fail(d, error)

    def _resend(self, pid: int, o: _Outbound) -> bytes | None:
        try:
            return self._encode(o.item, o.qos, pid, duplicate=True)
        except GatewayError as exc:  # e.g. it expired while the broker was away
            self._drop(pid, o, exc)
            return None

    async def run_writer(self) -> None:
        if self._struck:
            await self._probe_struck()
        await super().run_writer()

    async def _probe_struck(self) -> None:
        """Probe mode: resend in order, one at a time, each confirmed before the next, until no publish
        with a strike is left; what follows goes in one write, and new work batches as usual."""
        conn = self.conn
        if conn is None:
            raise ConnectorError("not connected")
        inflight = self.inflight
        rest = bytearray()
        for pid, o in list(inflight.items()):
            if self.conn is not conn:
                raise ConnectorError("connection lost")
            if inflight.get(pid) is not o or o.released:
                continue  # settled meanwhile, or QoS 2 past PUBREC (its PUBREL went out in attach)
            data = self._resend(pid, o)
            if data is None:
                continue
            if not self._struck:
                rest += data
                continue
            self.probe_resends += 1
            self._probe = o
            conn.write(data)
            while inflight.get(pid) is o and not o.released and self.conn is conn:
                self._room.clear()
                await self._room.wait()
            if self.conn is not conn:
                raise ConnectorError("connection lost")
            self._probe = None
            self._struck.discard(o)  # confirmed (or refused by a reason code): the strike is cleared
        if rest:
            conn.write(rest)

    def _encode(self, item: Item, qos: int, pid: int | None, *, duplicate: bool = False) -> bytes:
        flight, d = item
        return self.encoder.encode(flight.env, d.address, qos, d.target.spec.retain, pid, duplicate)

    # -- the broker's acknowledgements ---------------------------------------------------------
    def on_ack(self, kind: int, pid: int, reason: int) -> None:
        o = self.inflight.get(pid)
        if o is None:
            return
        if kind == PUBREC and reason < 0x80:
            o.released = True
            if self.conn is not None:
                self.conn.queue(ack(PUBREL, pid))
            self._room.set()  # a probe is confirmed by PUBREC
            return
        del self.inflight[pid]
        self.ids.free(pid)
        self._room.set()
        flight, d = o.item
        if reason >= 0x80:
            # 0x97 quota exceeded may pass; not authorized, bad topic or payload will not.
            retriable = reason == 0x97
            flight.fail(d, SinkError(publish_refusal(reason), retriable=retriable))
        else:
            flight.done()

    # -- writing --------------------------------------------------------------------------------
    async def write_batch(self, batch: list[Item]) -> None:
        conn = self.conn
        if conn is None or not conn.is_open:
            self.requeue(batch)
            raise ConnectorError("not connected")
        inflight = self.inflight
        encode = self.encoder.encode
        out = bytearray()
        at_most_once: list[Flight] = []
        i = 0
        try:
            for i, item in enumerate(batch):  # noqa: B007 - `i` is read in the except clause
                flight, d = item
                qos = d.target.spec.qos
                if qos == 0:
                    try:
                        data = encode(flight.env, d.address, 0, d.target.spec.retain, None)
                    except GatewayError as exc:
                        flight.fail(d, exc)
                        continue
                    at_most_once.append(flight)
                    if len(data) < _COALESCE:
                        out += data
                    else:
                        out = self._write_large(conn, out, data)
                    continue
                while len(inflight) >= self.window:
                    if out:
                        conn.write(out)
                        out = bytearray()
                    self._room.clear()
                    await self._room.wait()
                    if self.conn is not conn or not conn.is_open:
                        raise ConnectorError("connection lost")
                pid = self.ids.take()
                try:
                    data = encode(flight.env, d.address, qos, d.target.spec.retain, pid)
                except GatewayError as exc:
                    self.ids.free(pid)
                    flight.fail(d, exc)
                    continue
                inflight[pid] = _Outbound(item, qos)
                if len(data) < _COALESCE:
                    out += data
                else:
                    out = self._write_large(conn, out, data)
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

    @staticmethod
    def _write_large(conn: MqttConnection, out: bytearray, data: bytes) -> bytearray:
        """A large packet goes to the transport as it is: copied into the batch buffer it would be held twice."""
        if out:
            conn.write(out)
        conn.write(data)
        return bytearray()
