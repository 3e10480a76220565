"""The MQTT sink's "same message breaks the connection again" rule, step by step (no broker).

The sink runs over real ``MqttConnection`` objects whose transport only records
what is written; the broker's side is played by the test: acknowledgements are
``on_ack`` calls, a broker that closes the connection is ``connection_lost``
without the gateway having aborted it. tests/integration/test_mqtt_poison.py
runs the same rule against Mosquitto.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import mqtt5
import pytest
from mqtt5 import DisconnectPacket, DisconnectReasonCode, PublishPacket

from connectors.mqtt.client import MqttConnection
from connectors.mqtt.codec import PUBACK, PUBCOMP, PUBREC, Codec5
from connectors.mqtt.config import MqttConfig, MqttTarget
from connectors.mqtt.sink import MqttSink, PacketIds
from gateway.core.envelope import Envelope
from gateway.errors import ConnectorError, SinkError
from tests.support.harness import FakeDelivery, FakeFlight, FakeTarget, FakeTransport, turns


class Transport(FakeTransport):
    def publishes(self) -> list[bytes]:
        """Payloads of the PUBLISH packets written so far."""
        view = memoryview(bytes(self.written))
        out = []
        while view:
            packet, used = mqtt5.read(view)
            if isinstance(packet, PublishPacket):
                out.append(packet.payload)
            view = view[used:]
        return out


class NoHandler:
    def on_publish(self, p: PublishPacket) -> None:
        pass

    def on_publishes(self, packets: list[PublishPacket]) -> None:
        pass

    def on_ack(self, kind: int, packet_id: int, reason: int) -> None:
        pass

    def on_unreadable(self, qos: int, packet_id: int, error: str) -> None:
        pass


def connect() -> tuple[MqttConnection, FakeTransport]:
    conn = MqttConnection(Codec5(), NoHandler())
    transport = Transport()
    conn.connection_made(cast(Any, transport))
    return conn, transport


def items(*payloads: bytes, qos: int = 1) -> list[Any]:
    target = FakeTarget(MqttTarget(connector="m", topic="t", qos=qos))
    return [(FakeFlight(Envelope("t", p)), FakeDelivery("t", target)) for p in payloads]


class Session:
    """The sink on one connection at a time, with its writer task, as the connector runs it."""

    def __init__(self, sink: MqttSink) -> None:
        self.sink = sink
        self.conn: MqttConnection | None = None
        self.transport = Transport()
        self.writer: asyncio.Task[None] | None = None

    async def open(self) -> Transport:
        self.conn, self.transport = connect()
        self.sink.attach(self.conn, 65535, None)
        self.writer = asyncio.create_task(self.sink.run_writer())
        await turns()
        return self.transport

    async def lose(self, *, by_broker: bool = True) -> None:
        """The connection ends: the broker closed it, or the gateway did (keepalive, shutdown)."""
        assert self.conn is not None and self.writer is not None
        if by_broker:
            self.conn.connection_lost(ConnectionResetError("Connection reset by peer"))
        else:
            self.conn.abort("keepalive")
            self.conn.connection_lost(None)
        self.writer.cancel()
        await asyncio.gather(self.writer, return_exceptions=True)
        self.sink.detach()
        self.writer = None

    def pid_of(self, payload: bytes) -> int:
        return next(pid for pid, o in self.sink.inflight.items() if o.item[0].env.payload == payload)

    async def ack(self, payload: bytes, kind: int = PUBACK) -> None:
        self.sink.on_ack(kind, self.pid_of(payload), 0)
        await turns()


@pytest.fixture
async def session() -> AsyncIterator[Session]:
    s = Session(MqttSink(MqttConfig(), Codec5(), PacketIds()))
    yield s
    if s.writer is not None:
        s.writer.cancel()
        await asyncio.gather(s.writer, return_exceptions=True)


async def test_an_outage_strikes_nothing(session: Session) -> None:
    sink = session.sink
    batch = items(b"a", b"b")
    with pytest.raises(ConnectorError):
        await sink.write_batch(batch)  # not connected: nothing written, all back in the queue
    assert sink.depth == 2
    t1 = await session.open()
    assert t1.publishes() == [b"a", b"b"]
    await session.lose(by_broker=False)  # the gateway ended it: no strikes
    t2 = await session.open()
    assert t2.publishes() == [b"a", b"b"]  # resent at once, in one write
    assert sink.probe_resends == 0


async def test_a_broker_that_was_down_after_the_loss_strikes_nothing(session: Session) -> None:
    """A failed connect attempt after the loss means a restart or an outage, not a message: no probing."""
    sink = session.sink
    await session.open()
    for item in items(b"a", b"b", b"c"):
        sink.submit(*item)
    await turns()
    await session.lose()  # closed by the broker, with three unconfirmed
    assert sink.probing == 3
    sink.forgive()  # what the connector does when the next connect attempt is refused
    t2 = await session.open()
    assert t2.publishes() == [b"a", b"b", b"c"], "resent at once, in one write"
    assert sink.probe_resends == 0


async def test_what_was_unconfirmed_when_the_broker_closed_is_resent_alone_then_batching_resumes(
    session: Session,
) -> None:
    sink = session.sink
    await session.open()
    batch = items(b"a", b"b", b"c")
    for item in batch:
        sink.submit(*item)
    await turns()
    await session.lose()
    t2 = await session.open()
    assert t2.publishes() == [b"a"]  # alone
    await session.ack(b"a")
    assert t2.publishes() == [b"a", b"b"]
    await session.ack(b"b")
    assert t2.publishes() == [b"a", b"b", b"c"]
    for item in items(b"d", b"e"):  # new work waits until the last probe is confirmed
        sink.submit(*item)
    await turns()
    assert t2.publishes() == [b"a", b"b", b"c"]
    await session.ack(b"c")
    assert t2.publishes() == [b"a", b"b", b"c", b"d", b"e"]  # batched again
    assert sink.probe_resends == 3
    assert [f.done_count for f, _ in batch] == [1, 1, 1]


async def test_a_message_that_breaks_the_connection_alone_fails_and_is_never_sent_again(session: Session) -> None:
    sink = session.sink
    await session.open()
    batch = items(b"a", b"poison", b"c")
    for item in batch:
        sink.submit(*item)
    await turns()
    await session.lose()  # first strike for all three
    t2 = await session.open()
    await session.ack(b"a")
    assert t2.publishes() == [b"a", b"poison"]
    await session.lose()  # while "poison" was alone: its second strike
    poison = batch[1][0]
    assert len(poison.failed) == 1
    error = poison.failed[0]
    assert isinstance(error, SinkError) and not error.retriable
    assert "closed the connection on this message" in str(error) and "reset by peer" in str(error)
    assert sink.closed_on_message == 1
    t3 = await session.open()
    assert t3.publishes() == [b"c"]  # "c" was never written on the second connection: still one strike
    await session.ack(b"c")
    assert [f.done_count for f, _ in batch] == [1, 0, 1]
    assert not sink.inflight and not sink.ids.used


async def test_a_probe_lost_by_the_gateway_is_probed_again(session: Session) -> None:
    sink = session.sink
    await session.open()
    [item] = items(b"a")
    sink.submit(*item)
    await turns()
    await session.lose()
    await session.open()
    await session.lose(by_broker=False)  # keepalive, while "a" was alone: no second strike
    t3 = await session.open()
    assert t3.publishes() == [b"a"]
    await session.ack(b"a")
    assert item[0].done_count == 1 and not item[0].failed


async def test_qos2_probe_is_confirmed_by_pubrec(session: Session) -> None:
    sink = session.sink
    await session.open()
    batch = items(b"a", b"b", qos=2)
    for item in batch:
        sink.submit(*item)
    await turns()
    await session.lose()
    t2 = await session.open()
    assert t2.publishes() == [b"a"]
    await session.ack(b"a", PUBREC)
    assert t2.publishes() == [b"a", b"b"]
    await session.ack(b"b", PUBREC)
    await session.ack(b"a", PUBCOMP)
    await session.ack(b"b", PUBCOMP)
    assert [f.done_count for f, _ in batch] == [1, 1]


@pytest.mark.parametrize(
    ("reason", "strikes"),
    [(DisconnectReasonCode.SERVER_SHUTTING_DOWN, False), (DisconnectReasonCode.MALFORMED_PACKET, True)],
)
async def test_a_broker_disconnect_strikes_only_when_it_is_about_what_was_sent(
    session: Session, reason: DisconnectReasonCode, strikes: bool
) -> None:
    sink = session.sink
    await session.open()
    for item in items(b"a", b"b"):
        sink.submit(*item)
    await turns()
    conn = session.conn
    assert conn is not None and session.writer is not None
    conn.data_received(DisconnectPacket(reason_code=reason).write())
    conn.connection_lost(None)
    session.writer.cancel()
    await asyncio.gather(session.writer, return_exceptions=True)
    sink.detach()
    t2 = await session.open()
    assert t2.publishes() == ([b"a"] if strikes else [b"a", b"b"])
