"""Hostile payloads through the ``gateway`` process: each fails alone, the MQTT session never drops.

Before: JSON nested 100 000 deep on a route with ``where`` (or msgpack nested as deep
with ``codec: msgpack_to_json``, or a 3-byte msgpack ext) raised inside the MQTT
client's ``data_received``; the session aborted, the broker redelivered, it failed
again, and nothing after it arrived.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import paho.mqtt.client as mqtt
import pytest

from tests.support.brokers import Mosquitto, NatsServer
from tests.support.clients.mqtt import MqttClient
from tests.support.clients.nats import NatsCollector, nats_connect
from tests.support.configs import gateway_config, mqtt_connector, nats_connector
from tests.support.gateway_process import GatewayProcess, routez

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.timeout(120)]

DEEP_JSON = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
DEEP_MSGPACK = b"\x91" * 100_000 + b"\x01"
MSGPACK_EXT = b"\xd4\x01\x00"


async def test_hostile_payloads_are_dead_lettered_and_the_session_goes_on(
    gateways: Callable[..., GatewayProcess],
) -> None:
    with Mosquitto() as mq, NatsServer() as ns:
        dlq = {"connector": "nats", "subject": "dead.{#}"}
        config = gateway_config(
            "gw-poison",
            {"mqtt": mqtt_connector(mq.url, "gw-poison"), "nats": nats_connector(ns.url)},
            [
                {
                    "name": "json",
                    "from": {"connector": "mqtt", "topic": "j/#", "qos": 1},
                    "to": {"connector": "nats", "subject": "out.j"},
                    "where": {"payload.temp": {"exists": True}},
                    "dead_letter": dlq,
                },
                {
                    "name": "packed",
                    "from": {"connector": "mqtt", "topic": "m/#", "qos": 1},
                    "to": {"connector": "nats", "subject": "out.m"},
                    "codec": "msgpack_to_json",
                    "dead_letter": dlq,
                },
            ],
        )
        gw = gateways(config)
        await gw.astart(30)
        nc = await nats_connect(ns.url)
        out = await NatsCollector().subscribe(nc, "out.>")
        dead = await NatsCollector().subscribe(nc, "dead.>")
        pub = MqttClient(mq.port, "poison-pub")
        pub.connect()
        try:
            sends = [
                ("j/1", b'{"temp": 1}'),
                ("j/1", DEEP_JSON),
                ("j/1", b'{"temp": 2}'),
                ("m/1", msgspec.msgpack.encode({"temp": 3})),
                ("m/1", DEEP_MSGPACK),
                ("m/1", MSGPACK_EXT),
                ("m/1", msgspec.msgpack.encode({"temp": 4})),
            ]
            for topic, body in sends:
                info = pub.client.publish(topic, body, qos=1)
                info.wait_for_publish(10)
                assert info.rc == mqtt.MQTT_ERR_SUCCESS
            await gw.await_until(lambda: (len(out.messages), len(dead.messages)) == (4, 3), 30, "4 good, 3 dead")
        finally:
            pub.close()
            await nc.close()

        temps = [msgspec.json.decode(m.payload)["temp"] for m in out.messages]
        assert [t for t in temps if t < 3] == [1, 2] and [t for t in temps if t >= 3] == [3, 4], "in order per route"
        reasons = sorted(dict(m.headers)["x-gateway-error"] for m in dead.messages)
        assert sum("nested too deeply" in r for r in reasons) == 2 and "Ext is unsupported" in reasons[0]
        routes = await routez(gw.http_url)
        for r in routes.values():
            assert r["received"] == r["acked"] + r["failed"] + r["dropped"] + r["filtered"] + r["in_flight"], r
            assert r["in_flight"] == 0
        assert (routes["json"]["dead_lettered"], routes["packed"]["dead_lettered"]) == (1, 2)
        async with aiohttp.ClientSession() as http:
            async with http.get(gw.http_url + "/connz") as resp:
                connz: dict[str, Any] = await resp.json()
            async with http.get(gw.http_url + "/readyz") as resp:
                assert resp.status == 200
        mqtt_conn = next(c for c in connz["connectors"] if c["name"] == "mqtt")
        assert mqtt_conn["reconnects"] == 0, "no message made the MQTT session drop"
        await gw.astop()
