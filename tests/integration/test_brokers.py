"""Smoke tests proving the broker fixtures and tests/support/brokers.py work.

Needs (pytest config): pytest-asyncio (tests carry ``pytest.mark.asyncio``, so
strict or auto mode both work), pytest-timeout, and the ``broker`` marker
registered (``--strict-markers``).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import nats
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.support.brokers import Mosquitto, NatsServer, Tansu, recv_exact
from tests.support.clients.kafka import create_topics

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.timeout(60)]


# ---------------------------------------------------------------- raw MQTT 3.1.1


def _mqtt_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def _mqtt_packet(first: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([first, len(body)]) + body


def _mqtt_connect(port: int, client_id: str, *, clean: bool = True) -> tuple[socket.socket, bool]:
    """CONNECT and return (socket, session_present); asserts CONNACK return code 0."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    flags = 0x02 if clean else 0x00
    variable_header = _mqtt_str("MQTT") + bytes([4, flags]) + b"\x00\x3c"  # level 4, keepalive 60
    sock.sendall(_mqtt_packet(0x10, variable_header + _mqtt_str(client_id)))
    connack = recv_exact(sock, 4)
    assert connack[:2] == b"\x20\x02", connack
    assert connack[3] == 0, f"CONNACK return code {connack[3]}"
    return sock, bool(connack[2] & 0x01)


def _mqtt_disconnect(sock: socket.socket) -> None:
    sock.sendall(b"\xe0\x00")
    sock.close()


def test_mqtt_connect_subscribe_publish(mosquitto: Mosquitto, unique: str) -> None:
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    sock, _ = _mqtt_connect(mosquitto.port, f"t-{unique}")
    topic = f"test/{unique}"
    # SUBSCRIBE (packet id 1, QoS 0) -> SUBACK granting QoS 0
    sock.sendall(_mqtt_packet(0x82, b"\x00\x01" + _mqtt_str(topic) + b"\x00"))
    assert recv_exact(sock, 5) == b"\x90\x03\x00\x01\x00"
    # PUBLISH QoS 0 to ourselves and read it back
    publish = _mqtt_packet(0x30, _mqtt_str(topic) + b"hello")
    sock.sendall(publish)
    assert recv_exact(sock, len(publish)) == publish
    _mqtt_disconnect(sock)


def test_mosquitto_restart_same_port_keeps_sessions(tmp_path: Path, unique: str) -> None:
    with Mosquitto(workdir=tmp_path) as broker:
        port = broker.port
        client_id = f"persistent-{unique}"
        sock, present = _mqtt_connect(port, client_id, clean=False)
        assert not present
        sock.sendall(_mqtt_packet(0x82, b"\x00\x01" + _mqtt_str(f"p/{unique}") + b"\x01"))
        assert recv_exact(sock, 5) == b"\x90\x03\x00\x01\x01"
        _mqtt_disconnect(sock)

        old_pid = broker.pid
        broker.restart()
        assert broker.port == port
        assert broker.pid != old_pid
        assert broker.running
        # graceful stop wrote the DB: the persistent session survived
        sock, present = _mqtt_connect(port, client_id, clean=False)
        assert present
        _mqtt_disconnect(sock)

        broker.restart(hard=True)
        assert broker.port == port
        assert broker.ping()
        sock, _ = _mqtt_connect(port, f"after-kill-{unique}")
        _mqtt_disconnect(sock)
    assert not broker.running
    assert broker.pid is None
    assert not broker.ping()


# ---------------------------------------------------------------- NATS


@pytest.mark.asyncio
async def test_nats_pubsub_and_jetstream(nats_server: NatsServer, unique: str) -> None:
    nc = await nats.connect(nats_server.url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        sub = await nc.subscribe(f"core.{unique}")
        await nc.publish(f"core.{unique}", b"hi")
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"hi"

        js = nc.jetstream()
        stream = f"S_{unique}"
        await js.add_stream(name=stream, subjects=[f"js.{unique}.>"])
        ack = await js.publish(f"js.{unique}.a", b"persisted")
        assert ack.stream == stream
        assert ack.seq == 1
        info = await js.stream_info(stream)
        assert info.state.messages == 1
        await js.delete_stream(stream)
    finally:
        await nc.close()


@pytest.mark.asyncio
async def test_nats_hard_restart_keeps_jetstream_data(tmp_path: Path, unique: str) -> None:
    broker = NatsServer(workdir=tmp_path)
    await asyncio.to_thread(broker.start)
    try:
        stream = f"D_{unique}"
        nc = await nats.connect(broker.url, connect_timeout=5, max_reconnect_attempts=0)
        try:
            js = nc.jetstream()
            await js.add_stream(name=stream, subjects=[f"d.{unique}"])
            for i in range(20):
                await js.publish(f"d.{unique}", str(i).encode())
        finally:
            await nc.close()

        port = broker.port
        await asyncio.to_thread(broker.restart, hard=True)
        assert broker.port == port

        nc = await nats.connect(broker.url, connect_timeout=5, max_reconnect_attempts=0)
        try:
            js = nc.jetstream()
            info = await js.stream_info(stream)
            assert info.state.messages == 20
            last = await js.get_last_msg(stream, f"d.{unique}")
            assert last.data == b"19"
        finally:
            await nc.close()
    finally:
        await asyncio.to_thread(broker.stop)


# ---------------------------------------------------------------- Kafka (Tansu)


@pytest.mark.asyncio
async def test_kafka_produce_and_group_consume(kafka_broker: Tansu, unique: str) -> None:
    topic = f"t-{unique}"
    await create_topics(kafka_broker.bootstrap, [topic], 1)

    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(topic, f"m{i}".encode())
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_broker.bootstrap,
        group_id=f"g-{unique}",
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    await consumer.start()
    try:
        got: list[bytes] = []
        async with asyncio.timeout(30):
            while len(got) < 10:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    got.extend(r.value for r in records if r.value is not None)
        assert got == [f"m{i}".encode() for i in range(10)]
    finally:
        await consumer.stop()
