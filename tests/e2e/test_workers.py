"""``gateway run --workers 2``: one supervisor, two worker processes on one config, one monitoring endpoint.

Every source kind, each split as docs/scaling.md says:

=================  ==========================================  =====================================
route              split                                       checked
=================  ==========================================  =====================================
Kafka → NATS       consumer group, 2 partitions                nothing lost, per-key order
MQTT QoS 1 → NATS  ``shard_by: {device}``                      nothing lost, no duplicate, per-key
                                                               order, both workers forward a share
core NATS → NATS   ``shard_by: {device}``                      the same (nothing is lost at this pace)
JetStream → NATS   ``order: none`` (the shared durable)        nothing lost, both workers take a share
=================  ==========================================  =====================================

and, summed over the workers on the supervisor's ``/metrics``, ``received`` is what was sent (a sharded
message counts once: the other worker counts it as ``sharded``). Then a worker is SIGKILLed mid-run: the
supervisor starts it again (counted), and nothing is lost on the durable routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from tests.support.brokers import Mosquitto, NatsServer, Tansu
from tests.support.clients.kafka import create_topics, kafka_producer
from tests.support.clients.mqtt import MqttClient
from tests.support.clients.nats import NatsCollector, add_stream, nats_connect
from tests.support.configs import gateway_config, kafka_connector, mqtt_connector, nats_connector
from tests.support.gateway_process import GatewayProcess, run_cli
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.timeout(240)]

N = 400
"""Messages per route (4 devices / keys, in sequence per device)."""
DEVICES = 4


def config(mosquitto: Mosquitto, nats_server: NatsServer, kafka_broker: Tansu, u: str) -> dict[str, Any]:
    return gateway_config(
        f"wk-{u}",
        {
            "mq": mqtt_connector(mosquitto.url, f"wk-{u}"),
            "bus": nats_connector(nats_server.url),
            "kafka": kafka_connector(kafka_broker.bootstrap),
        },
        [
            {
                "name": "from-kafka",
                "from": {"connector": "kafka", "topic": f"wk-{u}", "group": f"wk-{u}"},
                "to": {"connector": "bus", "subject": f"out.{u}.kafka"},
            },
            {
                "name": "from-mqtt",
                "from": {"connector": "mq", "topic": f"wk/{u}/{{device}}", "qos": 1},
                "to": {"connector": "bus", "subject": f"out.{u}.mqtt.{{device}}"},
                "shard_by": "{device}",
            },
            {
                "name": "from-core",
                "from": {"connector": "bus", "subject": f"in.{u}.{{device}}"},
                "to": {"connector": "bus", "subject": f"out.{u}.core.{{device}}"},
                "shard_by": "{device}",
            },
            {
                "name": "from-stream",
                "from": {"connector": "bus", "stream": f"WK_{u}", "subject": f"js.{u}.>"},
                "to": {"connector": "bus", "subject": f"out.{u}.js"},
                "order": "none",
            },
        ],
    )


async def scrape(base: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(base + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def series(text: str, name: str) -> dict[tuple[str, str], float]:
    """``name{worker=...,route=...}`` samples by (worker, route)."""
    out: dict[tuple[str, str], float] = {}
    for m in re.finditer(rf'^{name}\{{worker="([^"]+)",route="([^"]+)"\}} (\S+)$', text, re.M):
        out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def per_route(samples: dict[tuple[str, str], float]) -> dict[str, float]:
    total: dict[str, float] = defaultdict(float)
    for (_, route), value in samples.items():
        total[route] += value
    return dict(total)


def in_order(messages: list[Any], group: Callable[[Any], str]) -> bool:
    """Per group, the sequence numbers arrive increasing."""
    last: dict[str, int] = {}
    for m in messages:
        g, seq = group(m), int(m.payload.split(b":")[1])
        if seq <= last.get(g, -1):
            return False
        last[g] = seq
    return True


async def send_all(mosquitto: Mosquitto, nats_server: NatsServer, kafka_broker: Tansu, u: str, start: int) -> None:
    """``N`` messages on each source, ``device:seq`` payloads, sequence increasing per device."""
    items = [(i % DEVICES, i) for i in range(start, start + N)]
    producer = await kafka_producer(kafka_broker.bootstrap, enable_idempotence=False)
    try:
        futs = [await producer.send(f"wk-{u}", b"d%d:%d" % (d, i), key=b"d%d" % d) for d, i in items]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()
    nc = await nats_connect(nats_server.url)
    try:
        js = nc.jetstream()
        acks = [await js.publish_async(f"js.{u}.d{d}", b"d%d:%d" % (d, i)) for d, i in items]
        await asyncio.gather(*acks)
        for d, i in items:
            await nc.publish(f"in.{u}.d{d}", b"d%d:%d" % (d, i))
            if i % 50 == 0:
                await nc.flush()
        await nc.flush()
    finally:
        await nc.close()
    pub = MqttClient(mosquitto.port, f"wk-pub-{u}").connect()
    try:
        await asyncio.to_thread(pub.publish_all, [(f"wk/{u}/d{d}", b"d%d:%d" % (d, i), None) for d, i in items])
    finally:
        pub.close()


@contextlib.asynccontextmanager
async def two_workers(
    gateways: Callable[..., GatewayProcess], mosquitto: Mosquitto, nats_server: NatsServer, kafka_broker: Tansu, u: str
) -> AsyncIterator[tuple[GatewayProcess, str, NatsCollector]]:
    """The sources prepared, a collector on every output subject, and a gateway with 2 workers whose Kafka
    consumers both hold a partition: (gateway, its endpoint's base URL, collector). Stopped with SIGTERM after
    (exit code 0)."""
    await create_topics(kafka_broker.bootstrap, [f"wk-{u}"], 2)
    await add_stream(nats_server.url, f"WK_{u}", [f"js.{u}.>"])
    nc = await nats_connect(nats_server.url)
    out = await NatsCollector().subscribe(nc, f"out.{u}.>")
    gw = gateways(config(mosquitto, nats_server, kafka_broker, u), args=["--workers", "2"])
    try:
        await gw.astart(wait_for=["mq", "bus", "kafka"], timeout=60)
        base = gw.http_url
        assert base is not None
        await gw.await_event("kafka.partitions_assigned", 60, count=2)  # both workers hold a partition
        yield gw, base, out
    finally:
        await nc.close()
    await gw.astop(timeout=60)


async def test_two_workers_split_every_source_kind_and_one_endpoint_sums_them(
    gateways: Callable[..., GatewayProcess],
    mosquitto: Mosquitto,
    nats_server: NatsServer,
    kafka_broker: Tansu,
    unique: str,
) -> None:
    u = unique
    async with two_workers(gateways, mosquitto, nats_server, kafka_broker, u) as (gw, base, out):

        async def ready() -> bool:
            async with aiohttp.ClientSession() as http, http.get(base + "/readyz") as resp:
                return resp.status == 200

        await wait_until(ready, 30, "the supervisor's /readyz says ready")
        await send_all(mosquitto, nats_server, kafka_broker, u, 0)

        def kind(m: Any) -> str:
            return str(m.where).split(".")[2]

        def count() -> dict[str, int]:
            c: dict[str, int] = defaultdict(int)
            for m in out.messages:
                c[kind(m)] += 1
            return c

        await wait_until(
            lambda: all(count()[k] >= N for k in ("kafka", "mqtt", "core", "js")), 60, lambda: str(count())
        )
        await asyncio.sleep(0.5)  # a duplicate would arrive now
        by_kind: dict[str, list[Any]] = defaultdict(list)
        for m in out.messages:
            by_kind[kind(m)].append(m)
        for k, msgs in by_kind.items():
            payloads = [m.payload for m in msgs]
            assert len(set(payloads)) == N, f"{k}: {N - len(set(payloads))} lost"
            if k != "js":  # order: none for the stream
                assert len(payloads) == N, f"{k}: {len(payloads) - N} duplicates"
                assert in_order(msgs, lambda m: m.payload.split(b":")[0].decode()), f"{k}: per-key order broken"

        text = await scrape(base)
        rss = float(re.search(r'^process_resident_memory_bytes\{worker="supervisor"\} (\S+)$', text, re.M)[1])  # type: ignore[index]
        print(f"supervisor RSS after the run and this scrape: {rss / 1e6:.1f} MB")
        assert rss <= 30e6, "the supervisor imports more than it needs (aiohttp? the config model?)"
        received = series(text, "gateway_route_received_total")
        sharded = series(text, "gateway_route_sharded_total")
        assert {w for w, _ in received} == {"0", "1"}, text[:2000]
        totals = per_route(received)
        print(f"received per (worker, route): {sorted(received.items())}")
        print(f"sharded per (worker, route): {sorted(sharded.items())}")
        for route in ("from-kafka", "from-mqtt", "from-core", "from-stream"):
            assert totals[route] == N, (route, totals)
        for route in ("from-mqtt", "from-core"):  # each worker forwarded a share, the other acknowledged it
            assert received[("0", route)] > 0 and received[("1", route)] > 0, received
            assert per_route(sharded)[route] == N, sharded
        assert received[("0", "from-stream")] + received[("1", "from-stream")] == N

        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/varz") as resp:
                varz = await resp.json()
            async with http.get(base + "/routez") as resp:
                routez = {r["name"]: r for r in (await resp.json())["routes"]}
        assert [w["worker"] for w in varz["workers"]] == [0, 1]
        assert varz["totals"]["received"] == 4 * N, varz["totals"]
        assert routez["from-mqtt"]["received"] == N and len(routez["from-mqtt"]["workers"]) == 2

        # SIGHUP to the supervisor: every worker reloads the file.
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        await gw.await_event("gateway.reloaded", 30, count=2)
        # A broken file: refused by the supervisor's check, the workers keep running what they run.
        good = gw.config_path.read_text()
        gw.config_path.write_text(good + "routes: [\n")
        async with aiohttp.ClientSession() as http, http.post(base + "/reload") as resp:
            refused = await resp.json()
        assert resp.status == 400 and "YAML syntax error" in str(refused["errors"]), refused
        gw.config_path.write_text(good)
        # The workers write to the supervisor's stderr: every line is one whole JSON document.
        glued = [line for line in gw.log_text().splitlines() if line.startswith("{") and "}{" in line]
        assert not glued, glued[:3]


async def test_a_killed_worker_is_restarted_and_its_share_taken_over_without_loss(
    gateways: Callable[..., GatewayProcess],
    mosquitto: Mosquitto,
    nats_server: NatsServer,
    kafka_broker: Tansu,
    unique: str,
) -> None:
    u = unique
    async with two_workers(gateways, mosquitto, nats_server, kafka_broker, u) as (gw, base, out):
        async with aiohttp.ClientSession() as http, http.get(base + "/varz") as resp:
            victim = (await resp.json())["workers"][1]["pid"]
        sending = asyncio.create_task(send_all(mosquitto, nats_server, kafka_broker, u, 0))
        await wait_until(lambda: len(out.messages) >= N // 2, 30, "some traffic through")
        os.kill(victim, signal.SIGKILL)
        await sending
        await gw.await_event("worker.exited", 30, worker=1)
        await gw.await_event("worker.started", 30, worker=1, restarts=1)

        def durable_unique() -> dict[str, int]:
            seen: dict[str, set[bytes]] = defaultdict(set)
            for m in out.messages:
                seen[str(m.where).split(".")[2]].add(m.payload)
            return {k: len(v) for k, v in seen.items()}

        # Kafka and JetStream redeliver what the dead worker held; MQTT keeps its session for the restarted one.
        await wait_until(
            lambda: all(durable_unique().get(k, 0) >= N for k in ("kafka", "mqtt", "js")),
            90,
            lambda: str(durable_unique()),
        )
        text = await scrape(base)
        assert 'gateway_worker_restarts_total{worker="1"} 1' in text
        assert 'gateway_worker_up{worker="1"} 1' in text or 'gateway_worker_up{worker="1"} 0' in text
        print(f"unique deliveries per source after the kill: {durable_unique()} of {N} each")


def test_validate_says_how_each_route_splits_and_refuses_a_broker_split_that_loses_order(tmp_path: Any) -> None:
    cfg = {
        "connectors": {
            "mq": {"type": "mqtt"},
            "bus": {"type": "nats"},
            "kafka": {"type": "kafka", "bootstrap_servers": ["127.0.0.1:9092"]},
        },
        "routes": [
            {"name": "k", "from": {"connector": "kafka", "topic": "t"}, "to": {"connector": "bus", "subject": "a"}},
            {
                "name": "m",
                "from": {"connector": "mq", "topic": "d/{device}"},
                "to": {"connector": "bus", "subject": "b.{device}"},
                "shard_by": "{device}",
            },
            {"name": "n", "from": {"connector": "bus", "subject": "x.>"}, "to": {"connector": "mq", "topic": "y"}},
            {
                "name": "j",
                "from": {"connector": "bus", "stream": "S", "subject": "s.>"},
                "to": {"connector": "kafka", "topic": "z"},
                "order": "none",
            },
        ],
    }
    path = tmp_path / "gw.yaml"
    path.write_text(json.dumps(cfg))
    done = run_cli("validate", "-c", str(path), "--workers", "2")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "split over 2 workers:" in out
    assert "route k: partitions of consumer group gateway.k; order kept: per partition" in out
    assert "route m: sharded by {device}" in out and "order kept: per key ({device})" in out
    assert "route n: worker 0 only" in out
    assert "route j: JetStream durable gateway-j shared by the workers; order kept: none" in out
    as_json = json.loads(run_cli("validate", "-c", str(path), "--workers", "2", "--json").stdout)
    assert as_json["workers"] == 2
    assert {r["name"]: r["split"]["mode"] for r in as_json["routes"]} == {
        "k": "partitions",
        "m": "sharded",
        "n": "one",
        "j": "broker",
    }

    cfg["routes"][2]["from"]["queue"] = "q"  # type: ignore[index]
    path.write_text(json.dumps(cfg))
    refused = run_cli("validate", "-c", str(path), "--workers", "2")
    assert refused.returncode == 2
    assert "routes[2].from: the broker splits this source round-robin among the 2 workers (NATS queue group q)" in (
        refused.stderr
    )
    assert run_cli("validate", "-c", str(path)).returncode == 0  # one worker: nothing is split

    cfg["routes"][1]["from"]["share_group"] = "g"  # type: ignore[index]
    path.write_text(json.dumps(cfg))
    both = run_cli("validate", "-c", str(path))
    assert both.returncode == 2 and "routes[1].shard_by:" in both.stderr, both.stderr
    assert "Traceback" not in both.stderr
