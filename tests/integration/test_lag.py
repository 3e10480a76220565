"""Consumer lag per route (the seeds' first golden signal): a Kafka and a JetStream source whose target
holds every message. The route fills its budget, its source stops reading, and what stays at the broker
shows as the route's lag on ``/routez`` (``Route.backlog``) and ``/metrics``, measured by the source every
few seconds from the broker's own counters; once the target confirms, the lag falls to 0."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from connectors.memory.broker import MemoryBroker
from gateway import Gateway
from gateway.config import parse_config
from gateway.ops.metrics import exposition
from gateway.ops.monitor import route_view
from tests.support.brokers import Mosquitto, NatsServer, Tansu
from tests.support.clients.kafka import create_topics, produce_all
from tests.support.clients.mqtt import MqttClient
from tests.support.clients.nats import js_publish_all, nats_connect
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(90)]

N = 300
BUDGET = 20


@contextlib.asynccontextmanager
async def held_gateway(unique: str, source_connector: str, source: str) -> AsyncIterator[tuple[Gateway, MemoryBroker]]:
    """A gateway whose one route ``r`` reads ``source`` into a memory target that holds every message."""
    MemoryBroker.reset()
    held = MemoryBroker.named("held")
    held.hold = True
    gw = Gateway(_config(unique, source_connector, source))
    await gw.start()
    try:
        yield gw, held
    finally:
        await gw.stop(5)
        MemoryBroker.reset()


async def _drains(gw: Gateway, held: MemoryBroker, settled: Callable[[dict[str, Any]], bool], what: str) -> None:
    """Let the target confirm: everything is delivered and the source's backlog falls to 0."""
    held.release()
    route = gw.routes["r"]
    await wait_until(lambda: route.stats.acked == N, 30, "all delivered")
    await wait_until(
        lambda: route.backlog is not None and route.backlog.messages == 0 and settled(route.backlog.detail), 30, what
    )


def _config(unique: str, source_connector: str, source: str) -> Any:
    return parse_config(
        f"""
gateway: {{id: lag-{unique}}}
connectors:
  {source_connector}
  held: {{type: memory, broker: held}}
routes:
  - name: r
    from: {source}
    to: {{connector: held, topic: "out"}}
    max_in_flight: {BUDGET}
    overflow: block
    slow_consumer_deadline: 0
""",
        source="test",
    )


def _metric(text: str, name: str, labels: str) -> float | None:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def _assert_fresh_ages(view: dict[str, Any], text: str, *, produced_before: float) -> None:
    """Freshness: every admitted message's age, from the broker's timestamp, is at least the pause between
    producing and starting the gateway (and at most the whole test so far)."""
    age = view["age"]
    assert age["count"] == view["received"]
    bound = time.monotonic() - produced_before + 1.0 + 10.0
    assert 0.5 <= age["p50"] <= age["p99"] <= bound * 2, age  # doubling buckets: each figure within a factor of 2
    assert _metric(text, "gateway_route_message_age_seconds_count", 'route="r"') == age["count"]


async def _lag_while_held(gw: Gateway) -> tuple[dict[str, Any], str]:
    route = gw.routes["r"]
    await wait_until(lambda: route.in_flight >= BUDGET, 30, "the route full")
    await wait_until(
        lambda: route.backlog is not None and (route.backlog.messages or 0) >= N - 2 * BUDGET, 30, "the lag measured"
    )
    return route_view(route), "".join(exposition(gw))


async def test_kafka_lag_per_partition_while_the_target_holds(kafka_broker: Tansu, unique: str) -> None:
    topic = f"lag-{unique}"
    await create_topics(kafka_broker.bootstrap, [topic], 2)
    await produce_all(kafka_broker.bootstrap, topic, [(b"k%d" % (i % 7), b"%d" % i, None) for i in range(N)])
    await asyncio.sleep(1.0)  # every record is at least this old when the gateway admits it
    start = time.monotonic()
    source = f'kafka: {{type: kafka, bootstrap_servers: ["{kafka_broker.bootstrap}"], session_timeout_ms: 6000}}'
    async with held_gateway(unique, source, f'{{connector: kafka, topic: "{topic}", group: "g-{unique}"}}') as (
        gw,
        held,
    ):
        view, text = await _lag_while_held(gw)
        partitions = view["backlog"]["partitions"]
        assert set(partitions) == {f"{topic}/0", f"{topic}/1"}
        assert sum(p["end"] for p in partitions.values()) == N, "log-end offsets of both partitions"
        assert (
            view["lag"]
            == sum(p["lag"] for p in partitions.values())
            == N - sum(p["position"] for p in partitions.values())
        )
        assert all(p["uncommitted"] >= p["lag"] for p in partitions.values()), "nothing settled: nothing committed"
        assert _metric(text, "gateway_route_lag_messages", 'route="r"') == view["lag"]
        _assert_fresh_ages(view, text, produced_before=start)
        for name, p in partitions.items():
            labels = f'route="r",partition="{name}",of="position"'
            assert _metric(text, "gateway_route_partition_lag_messages", labels) == p["lag"]
        # The target confirms: the route drains, the source reads the rest and commits.
        await _drains(
            gw,
            held,
            lambda d: all(p["uncommitted"] == 0 for p in d["partitions"].values()),
            "lag and uncommitted back to 0",
        )


async def test_jetstream_pending_and_ack_pending_while_the_target_holds(nats_server: NatsServer, unique: str) -> None:
    nc = await nats_connect(nats_server.url)
    try:
        await nc.jetstream().add_stream(name=f"LAG_{unique}", subjects=[f"lag.{unique}.>"])
        await js_publish_all(nc, [(f"lag.{unique}.d{i % 3}", b"%d" % i, None) for i in range(N)])
    finally:
        await nc.close()
    await asyncio.sleep(1.0)
    start = time.monotonic()
    source = f'{{connector: bus, subject: "lag.{unique}.>", stream: "LAG_{unique}", durable: "gw_{unique}"}}'
    async with held_gateway(unique, f'bus: {{type: nats, servers: ["{nats_server.url}"]}}', source) as (gw, held):
        view, text = await _lag_while_held(gw)
        backlog = view["backlog"]
        assert view["lag"] == backlog["pending"] == N - backlog["stream_sequence"]
        assert backlog["ack_pending"] >= BUDGET, "delivered to the gateway, held by the target, not acknowledged"
        assert _metric(text, "gateway_route_lag_messages", 'route="r"') == backlog["pending"]
        assert _metric(text, "gateway_route_ack_pending_messages", 'route="r"') == backlog["ack_pending"]
        _assert_fresh_ages(view, text, produced_before=start)
        await _drains(gw, held, lambda d: d["ack_pending"] == 0, "pending and ack pending back to 0")


async def test_core_nats_lag_is_what_the_client_buffers(nats_server: NatsServer, unique: str) -> None:
    connector = f'bus: {{type: nats, servers: ["{nats_server.url}"]}}'
    async with held_gateway(unique, connector, f'{{connector: bus, subject: "c.{unique}.>"}}') as (gw, _):
        nc = await nats_connect(nats_server.url)
        try:
            await gw.wait_ready(10)
            for i in range(N):
                await nc.publish(f"c.{unique}.d", b"%d" % i)
            await nc.flush()
            view, text = await _lag_while_held(gw)
        finally:
            await nc.close()
        assert view["backlog"]["pending_bytes"] > 0
        assert _metric(text, "gateway_route_lag_messages", 'route="r"') == view["lag"]
        assert "age" not in view, "core NATS messages carry no timestamp"


async def test_mqtt_lag_is_the_receive_window_in_use(mosquitto: Mosquitto, unique: str) -> None:
    connector = f'mq: {{type: mqtt, url: "{mosquitto.url}", client_id: "lag-{unique}"}}'
    async with held_gateway(unique, connector, f'{{connector: mq, topic: "m/{unique}/#", qos: 1}}') as (gw, _):
        pub = MqttClient(mosquitto.port)
        try:
            await gw.wait_ready(10)
            pub.connect()
            for i in range(BUDGET * 3):
                pub.publish(f"m/{unique}/d", b"%d" % i, qos=1)
            route = gw.routes["r"]
            await wait_until(lambda: route.in_flight >= BUDGET, 30, "the route full")
            await wait_until(
                lambda: route.backlog is not None and (route.backlog.messages or 0) >= BUDGET, 30, "measured"
            )
            view = route_view(route)
        finally:
            pub.close()
        assert view["backlog"]["receive_window_in_use"] == view["lag"]
        assert "age" not in view, "MQTT messages carry no timestamp"
