"""config/examples/content-routing.yaml through the ``gateway`` process, with real Mosquitto and nats-server.

Devices publish JSON telemetry, some of it hot, some malformed, some off-schema:
valid readings reach NATS as msgpack with their source topic in a header, hot ones
also reach ``alerts.<id>`` untouched, and everything bad is dead-lettered with
its error, while the route keeps running.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import paho.mqtt.client as mqtt
import pytest
import yaml

from tests.e2e.clients import KafkaCollector, MqttClient, NatsCollector, create_topics, nats_connect
from tests.e2e.gateway_process import (
    GatewayProcess,
    gateway_config,
    kafka_connector,
    mqtt_connector,
    nats_connector,
    run_cli,
)
from tests.support.brokers import Mosquitto, NatsServer, Tansu

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "examples" / "content-routing.yaml"
N = 100


def test_the_example_validates() -> None:
    proc = run_cli("validate", "-c", str(EXAMPLE))
    assert proc.returncode == 0, proc.stderr


async def test_content_routing_example_end_to_end(tmp_path: Path, gateways: Callable[..., GatewayProcess]) -> None:
    with Mosquitto() as mq, NatsServer() as ns:
        config: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
        config["gateway"] = {"id": "gw-content", "http": {"listen": "127.0.0.1:0"}}
        gw = gateways(config, env={"MQTT_URL": mq.url, "NATS_URL": ns.url})
        await gw.astart(30)
        nc = await nats_connect(ns.url)
        got: dict[str, list[Any]] = {"telemetry": [], "alerts": [], "dead": []}

        async def on_msg(msg: Any) -> None:
            got[msg.subject.split(".")[0]].append(msg)

        for prefix in got:
            await nc.subscribe(f"{prefix}.>", cb=on_msg)
        await nc.flush()
        pub = MqttClient(mq.port, "content-pub")
        pub.connect()
        try:
            infos = []
            for i in range(N):
                doc = {"device_id": f"d{i % 4}", "temp": float(i)}
                infos.append(pub.client.publish(f"devices/d{i % 4}/telemetry", msgspec.json.encode(doc), qos=1))
            for bad in (b"\xff\xfe not json", b"{unterminated"):
                infos.append(pub.client.publish("devices/bad/telemetry", bad, qos=1))
            for off in ({"device_id": 7, "temp": 1.0}, {"device_id": "x"}, {"device_id": "x", "temp": "warm"}):
                infos.append(pub.client.publish("devices/off/telemetry", msgspec.json.encode(off), qos=1))
            for info in infos:
                info.wait_for_publish(10)
                assert info.rc == mqtt.MQTT_ERR_SUCCESS
            # valid: N telemetry + 19 alerts (81..99); dead: 2 malformed x 2 routes + 3 off-schema (telemetry)
            await gw.await_until(
                lambda: (len(got["telemetry"]), len(got["alerts"]), len(got["dead"])) == (N, 19, 7),
                30,
                "telemetry, alerts and dead letters",
            )
        finally:
            pub.close()
            await nc.close()

        temps = sorted(msgspec.msgpack.decode(m.data)["temp"] for m in got["telemetry"])
        assert temps == [float(i) for i in range(N)], "every valid reading, as msgpack"
        assert all(m.headers["x-source-topic"].startswith("devices/d") for m in got["telemetry"])
        first = got["telemetry"][0].headers
        assert first["x-device"] == first["x-source-topic"].split("/")[1] and first["x-gateway"] == "gw-content"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["x-received"])
        assert len({m.headers["traceparent"] for m in got["telemetry"]}) == N, "a new trace per reading"
        assert sorted(msgspec.json.decode(m.data)["temp"] for m in got["alerts"]) == [float(i) for i in range(81, N)]
        errors = sorted(m.headers["x-gateway-error-type"] for m in got["dead"])
        assert errors == ["PayloadError"] * 7
        routez = {r["name"]: r for r in await gw_routez(gw)}
        assert routez["alerts"]["filtered"] == N - 19 + 3, "cool readings and off-schema JSON are left out"
        assert routez["telemetry"]["dead_lettered"] == 5 and routez["alerts"]["dead_lettered"] == 2
        await gw.astop()


async def gw_routez(gw: GatewayProcess) -> list[dict[str, Any]]:
    base = gw.http_url
    assert base is not None
    async with aiohttp.ClientSession() as http, http.get(base + "/routez") as resp:
        body: dict[str, Any] = await resp.json()
    return list(body["routes"])


async def test_payload_keys_enrichment_and_a_trace_followed_mqtt_kafka_nats(
    gateways: Callable[..., GatewayProcess],
    mosquitto: Mosquitto,
    nats_server: NatsServer,
    kafka_broker: Tansu,
    unique: str,
) -> None:
    """MQTT → Kafka keyed by a payload field, with header templates and a new traceparent; Kafka → NATS
    carries the same traceparent, so one message can be followed across the three brokers."""
    topic = f"readings-{unique}"
    await create_topics(kafka_broker.bootstrap, [topic], 3)
    config = gateway_config(
        "gw-enrich",
        {
            "devices": mqtt_connector(mosquitto.url, f"gw-enrich-{unique}"),
            "platform": kafka_connector(kafka_broker.bootstrap),
            "services": nats_connector(nats_server.url),
        },
        [
            {
                "name": "to-kafka",
                "from": {"connector": "devices", "topic": f"{unique}/{{site}}/{{device}}", "qos": 1},
                "to": {"connector": "platform", "topic": topic, "key": "{payload.device_id}"},
                "headers": {"x-site": "{site}", "x-gateway": "{gateway}", "x-received": "{received}"},
                "trace": True,
                "dead_letter": {"connector": "services", "subject": f"dead.{unique}"},
            },
            {
                "name": "to-nats",
                "from": {"connector": "platform", "topics": [topic], "group": f"g-{unique}"},
                "to": {"connector": "services", "subject": f"seen.{unique}"},
            },
        ],
    )
    gw = gateways(config)
    await gw.astart(60)
    nc = await nats_connect(nats_server.url)
    seen = await NatsCollector().subscribe(nc, f"seen.{unique}")
    dead = await NatsCollector().subscribe(nc, f"dead.{unique}")
    col = await KafkaCollector(kafka_broker.bootstrap, topic, 3).start()
    pub = MqttClient(mosquitto.port, f"enrich-pub-{unique}")
    try:
        pub.connect()
        infos = [
            pub.client.publish(f"{unique}/north/d{i}", msgspec.json.encode({"device_id": f"dev-{i}", "v": i}), qos=1)
            for i in range(5)
        ]
        infos.append(pub.client.publish(f"{unique}/north/bad", b'{"v": 1}', qos=1))  # no device_id: no key
        for info in infos:
            info.wait_for_publish(10)
        await gw.await_until(lambda: len(seen.messages) == 5 and len(dead.messages) == 1, 60, "5 readings, 1 dead")
    finally:
        pub.close()
        await col.stop()
        await nc.close()
    assert sorted(m.key or b"" for m in col.messages) == [f"dev-{i}".encode() for i in range(5)]
    by_key = {m.key: dict(m.headers) for m in col.messages}
    h = by_key[b"dev-0"]
    assert (h["x-site"], h["x-gateway"]) == ("north", "gw-enrich")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", h["x-received"])
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", h["traceparent"])
    kafka_traces = {dict(m.headers)["traceparent"] for m in col.messages}
    nats_traces = {dict(m.headers)["traceparent"] for m in seen.messages}
    assert len(kafka_traces) == 5 and nats_traces == kafka_traces, "the same trace id on Kafka and on NATS"
    assert "no field 'device_id'" in dict(dead.messages[0].headers)["x-gateway-error"]
    await gw.astop()
