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

import msgspec
import paho.mqtt.client as mqtt
import pytest
import yaml

from tests.support.brokers import Mosquitto, NatsServer
from tests.support.clients.mqtt import MqttClient
from tests.support.clients.nats import nats_connect
from tests.support.gateway_process import GatewayProcess, routez, run_cli

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.timeout(120)]

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
        routes = await routez(gw.http_url)
        assert routes["alerts"]["filtered"] == N - 19 + 3, "cool readings and off-schema JSON are left out"
        assert routes["telemetry"]["dead_lettered"] == 5 and routes["alerts"]["dead_lettered"] == 2
        await gw.astop()
