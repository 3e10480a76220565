"""A payload larger than the target accepts is counted as failed, is not sent, and does not stop the route."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.memory.broker import MemoryBroker
from gateway import Gateway
from gateway.config import parse_config
from tests.support.brokers import Mosquitto, NatsServer, Tansu
from tests.support.clients.kafka import create_topics, read_records
from tests.support.clients.mqtt import MqttClient
from tests.support.clients.nats import NatsCollector, nats_connect
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(90)]


@pytest.fixture
def small_nats(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(workdir=tmp_path / "nats", jetstream=False, extra_config="max_payload: 2048\n") as server:
        yield server


@pytest.fixture
def small_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(workdir=tmp_path / "mqtt", extra_config="max_packet_size 2048\n") as broker:
        yield broker


async def _run(connector: dict[str, object], target: dict[str, object], unique: str) -> Gateway:
    MemoryBroker.reset()
    cfg = f"""
gateway: {{id: lim-{unique}, shutdown_timeout: 5}}
connectors:
  real: {json.dumps(connector)}
  mem: {{type: memory, broker: m-{unique}}}
routes:
  - name: r
    from: {{connector: mem, topic: "in/#"}}
    to: {json.dumps({"connector": "real", **target})}
"""
    gw = Gateway(parse_config(cfg))
    await gw.start()
    await gw.wait_ready(30)
    return gw


def _publish(unique: str) -> MemoryBroker:
    mem = MemoryBroker.named(f"m-{unique}")
    mem.publish("in/a", b"small-1")
    mem.publish("in/a", b"x" * 8192)
    mem.publish("in/a", b"small-2")
    return mem


async def _check(gw: Gateway, mem: MemoryBroker, received: list[bytes]) -> None:
    route = gw.routes["r"]
    await wait_until(lambda: len(mem.acked) == 3, 20, "all three source messages acknowledged")
    assert received == [b"small-1", b"small-2"], "the oversized message must not be sent"
    assert (route.stats.received, route.stats.acked, route.stats.failed) == (3, 2, 1)
    assert await gw.stop()


async def test_nats_refuses_payload_over_server_max_payload(small_nats: NatsServer, unique: str) -> None:
    nc = await nats_connect(small_nats.url)
    sub = await NatsCollector().subscribe(nc, f"out.{unique}")
    gw = await _run({"type": "nats", "servers": [small_nats.url]}, {"subject": f"out.{unique}"}, unique)
    mem = _publish(unique)
    try:
        await wait_until(lambda: len(sub.messages) >= 2, 20, "the two small messages")
        await _check(gw, mem, [r.payload for r in sub.messages])
    finally:
        await nc.close()


async def test_kafka_refuses_record_over_max_request_size(kafka_broker: Tansu, unique: str) -> None:
    await create_topics(kafka_broker.bootstrap, [f"out-{unique}"], partitions=1)
    gw = await _run(
        {"type": "kafka", "bootstrap_servers": [kafka_broker.bootstrap], "idempotent": False, "max_request_size": 4096},
        {"topic": f"out-{unique}"},
        unique,
    )
    mem = _publish(unique)
    await wait_until(lambda: len(mem.acked) == 3, 20, "all three acknowledged")
    got = await read_records(kafka_broker.bootstrap, f"out-{unique}", 2)
    await _check(gw, mem, [r.value for r in got])


async def test_mqtt_refuses_payload_over_broker_maximum_packet_size(small_mosquitto: Mosquitto, unique: str) -> None:
    sub = MqttClient(small_mosquitto.port).connect()
    sub.subscribe(f"out/{unique}")
    gw = await _run(
        {"type": "mqtt", "url": small_mosquitto.url, "client_id": f"gw-{unique}"}, {"topic": f"out/{unique}"}, unique
    )
    mem = _publish(unique)
    try:
        await wait_until(lambda: len(sub.messages) >= 2, 20, "the two small messages")
        await _check(gw, mem, [r.payload for r in sub.messages])
    finally:
        sub.close()
