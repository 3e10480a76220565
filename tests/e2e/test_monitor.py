"""The monitoring endpoint of a running gateway process, against real brokers.

1. A mixed run (deliveries, failures, overflow drops) on two routes: every
   snapshot of ``/routez`` taken while traffic flows satisfies
   ``received = acked + failed + dropped + in_flight``; at the end ``/metrics``
   (parsed with prometheus-client's own parser), ``/routez`` and ``/varz`` agree,
   the latency histogram counted every acknowledged message, and the password
   in the MQTT URL appears nowhere: not in the log, not in any endpoint.
2. ``/readyz`` is 503 and names the connector that cannot connect, ``/healthz``
   stays 200, and readiness turns 200 once the broker comes up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.brokers import Mosquitto, NatsServer, free_port
from tests.support.clients.mqtt import MqttClient
from tests.support.clients.nats import nats_connect
from tests.support.configs import gateway_config, mqtt_connector, nats_connector
from tests.support.gateway_process import GatewayProcess
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.timeout(120)]

SECRET = "Zq7-monitor-secret-9xK"
"""The MQTT password of the run: Mosquitto (anonymous allowed) ignores it; it must never be printed."""
N_MQTT = 1_000
OVERSIZE = {17, 300, 777}
"""MQTT messages larger than nats-server's max_payload: they fail at the NATS sink (no dead letter)."""
N_BURST = 5_000
"""Core NATS messages sent at once into a route with a budget of 20 and ``overflow: drop_newest``."""


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        return resp.status, await resp.json()


async def get_text(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as resp:
        return resp.status, await resp.text()


def balanced(route: dict[str, Any]) -> bool:
    return bool(
        route["received"] == route["acked"] + route["failed"] + route["dropped"] + route["in_flight"]
        and route["dropped"] == route["dropped_overflow"] + route["dropped_released"]
    )


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


async def test_endpoints_account_for_every_message(
    gateways: Callable[..., GatewayProcess], mosquitto: Mosquitto, nats_server: NatsServer, unique: str
) -> None:
    u = unique
    url = f"mqtt://monitor:{SECRET}@127.0.0.1:{mosquitto.port}"
    config = gateway_config(
        f"mon-{u}",
        {"mq": mqtt_connector(url, f"gw-mon-{u}"), "bus": nats_connector(nats_server.url)},
        [
            {
                "name": "telemetry",
                "from": {"connector": "mq", "topic": f"mon/{u}/{{dev}}", "qos": 1},
                "to": {"connector": "bus", "subject": f"mon.{u}.out.{{dev}}"},
            },
            {
                "name": "burst",
                "from": {"connector": "bus", "subject": f"mon.{u}.in.>"},
                "to": {"connector": "mq", "topic": f"burst/{u}/out", "qos": 1},
                "max_in_flight": 20,
                "overflow": "drop_newest",
            },
        ],
    )
    gw = gateways(config)
    await gw.astart()
    base = gw.http_url
    assert base is not None, gw.log_tail()

    pub = MqttClient(mosquitto.port, f"pub-mon-{u}")
    pub.connect()
    nc = await nats_connect(nats_server.url)
    snapshots = 0
    unbalanced: list[dict[str, Any]] = []
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as http:

        async def watch() -> None:
            nonlocal snapshots
            while not stop.is_set():
                _, body = await get_json(http, f"{base}/routez")
                snapshots += 1
                unbalanced.extend(r for r in body["routes"] if not balanced(r))
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        try:
            for seq in range(N_MQTT):
                size = 2 * 1024 * 1024 if seq in OVERSIZE else 64
                pub.client.publish(f"mon/{u}/dev{seq % 4}", str(seq).encode().ljust(size, b"."), qos=1)
                if seq % 100 == 99:
                    await asyncio.sleep(0.01)
            for seq in range(N_BURST):
                await nc.publish(f"mon.{u}.in.d{seq % 3}", b"b" * 32)
            await nc.flush()

            last: dict[str, Any] = {}

            async def settled() -> bool:
                _, body = await get_json(http, f"{base}/routez")
                r = {x["name"]: x for x in body["routes"]}
                last.update(r)
                return bool(
                    r["telemetry"]["received"] == N_MQTT
                    and r["burst"]["received"] == N_BURST
                    and all(x["in_flight"] == 0 for x in r.values())
                )

            await wait_until(settled, 30, lambda: f"every message received and settled: {last}")
        finally:
            stop.set()
            await watcher
        status, routez = await get_json(http, f"{base}/routez")
        _, varz = await get_json(http, f"{base}/varz")
        _, connz = await get_json(http, f"{base}/connz")
        ready_status, ready = await get_json(http, f"{base}/readyz")
        health_status, _ = await get_json(http, f"{base}/healthz")
        metrics_status, metrics = await get_text(http, f"{base}/metrics")
        _, page = await get_text(http, f"{base}/")
    await nc.close()
    pub.close()

    routes = {r["name"]: r for r in routez["routes"]}
    tel, burst = routes["telemetry"], routes["burst"]
    print(
        f"\nMONITOR: {snapshots} /routez snapshots during traffic, all balanced; telemetry {tel['received']} received "
        f"{tel['acked']} acked {tel['failed']} failed, p99 {tel['latency']['p99']}; burst {burst['received']} received "
        f"{burst['acked']} acked {burst['dropped_overflow']} dropped (overflow)"
    )
    assert snapshots >= 5, "too few snapshots to say anything"
    assert not unbalanced, f"received != acked + failed + dropped + in_flight in {unbalanced[:3]}"
    assert (tel["received"], tel["acked"], tel["failed"], tel["dropped"]) == (
        N_MQTT,
        N_MQTT - len(OVERSIZE),
        len(OVERSIZE),
        0,
    )
    assert burst["dropped_overflow"] > 0 and burst["acked"] + burst["dropped_overflow"] == N_BURST, burst
    assert tel["latency"]["count"] == tel["acked"] and tel["latency"]["p99"] is not None
    assert status == 200 and ready_status == 200 and ready["ready"] is True and health_status == 200
    assert varz["totals"]["received"] == N_MQTT + N_BURST and varz["routes"] == 2 and varz["ready"] is True

    assert metrics_status == 200
    m = samples(metrics)
    for name, r in routes.items():
        lab = frozenset({("route", name)})
        assert m[("gateway_route_received_total", lab)] == r["received"]
        assert m[("gateway_route_acked_total", lab)] == r["acked"]
        assert m[("gateway_route_failed_total", lab)] == r["failed"]
        assert m[("gateway_route_dropped_total", lab | {("reason", "overflow")})] == r["dropped_overflow"]
        assert m[("gateway_route_in_flight", lab)] == 0
        assert m[("gateway_route_latency_seconds_count", lab)] == r["acked"]
        assert m[("gateway_route_latency_seconds_bucket", lab | {("le", "+Inf")})] == r["acked"]
    conns = {c["name"]: c for c in connz["connectors"]}
    assert conns["mq"]["state"] == "connected" and conns["bus"]["state"] == "connected"
    assert m[("gateway_connector_up", frozenset({("connector", "mq"), ("kind", "mqtt")}))] == 1
    assert "process_resident_memory_bytes" in metrics
    assert "<html" in page.lower()

    # The password: masked in the endpoint address, and nowhere else.
    assert "monitor:***@" in conns["mq"]["endpoint"], conns["mq"]["endpoint"]
    for where, text in (
        ("log", gw.log_text()),
        ("/connz", str(connz)),
        ("/varz", str(varz)),
        ("/routez", str(routez)),
        ("/metrics", metrics),
    ):
        assert SECRET not in text, f"the MQTT password appears in the {where}"


async def test_readyz_names_the_connector_that_is_down(
    gateways: Callable[..., GatewayProcess], mosquitto: Mosquitto, tmp_path: Path, unique: str
) -> None:
    port = free_port()
    config = gateway_config(
        f"ready-{unique}",
        {
            "mq": mqtt_connector(mosquitto.url, f"gw-ready-{unique}"),
            "bus": nats_connector(f"nats://127.0.0.1:{port}", connect_timeout=1),
        },
        [
            {
                "name": "r",
                "from": {"connector": "mq", "topic": f"ready/{unique}/#", "qos": 1},
                "to": {"connector": "bus", "subject": f"ready.{unique}"},
            }
        ],
    )
    gw = gateways(config)
    await gw.astart(wait_for=["mq"])
    await gw.await_event("http.listening")
    base = gw.http_url
    assert base is not None
    async with aiohttp.ClientSession() as http:
        await gw.await_event("connector.connect_failed", connector="bus")
        status, body = await get_json(http, f"{base}/readyz")
        health, _ = await get_json(http, f"{base}/healthz")
        _, metrics = await get_text(http, f"{base}/metrics")
        print(f"\nREADYZ while NATS is down: {status} {body}")
        assert health == 200
        assert status == 503 and body["ready"] is False
        assert list(body["not_ready"]) == ["bus"], body
        assert "cannot connect" in body["not_ready"]["bus"], body
        m = samples(metrics)
        assert m[("gateway_ready", frozenset())] == 0
        assert m[("gateway_connector_up", frozenset({("connector", "bus"), ("kind", "nats")}))] == 0

        with NatsServer(port=port, jetstream=False, workdir=tmp_path / "late-nats"):

            async def ready() -> bool:
                return (await get_json(http, f"{base}/readyz"))[0] == 200

            await wait_until(ready, 30, "ready once the NATS server is up")
            _, connz = await get_json(http, f"{base}/connz")
            bus = next(c for c in connz["connectors"] if c["name"] == "bus")
            assert bus["state"] == "connected" and bus["reconnects"] == 0, bus
            await gw.astop()
