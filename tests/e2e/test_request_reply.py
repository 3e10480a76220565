"""Request/reply across protocols through the ``gateway`` process, with real Mosquitto and nats-server.

config/examples/request-reply.yaml as written: NATS requests answered by an MQTT 5 device and by an
MQTT 3.1.1 device (topic convention), an MQTT 5 request answered by a NATS service. Then what goes
wrong: a device that never answers (the requester gets code 504 in time, never silence), answers
nobody waits for, one-way messages on a request route, and a flood of 100 000 requests against a
table of 1 000 (every requester hears back, 503 or 504, and the table never holds more).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.brokers import Mosquitto, NatsServer
from tests.support.clients.mqtt import MqttClient
from tests.support.clients.nats import nats_connect
from tests.support.configs import gateway_config, mqtt_connector, nats_connector
from tests.support.gateway_process import GatewayProcess, routez, run_cli

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.timeout(180)]

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "examples" / "request-reply.yaml"


class Device(MqttClient):
    """An MQTT device answering every request on ``topic_filter``; ``answer`` None means never answer."""

    def __init__(
        self,
        port: int,
        client_id: str,
        topic_filter: str,
        answer: Callable[[str, bytes], bytes] | None,
        *,
        protocol: int = mqtt.MQTTv5,
        reply_topic: Callable[[str], str] | None = None,
    ) -> None:
        super().__init__(port, client_id, protocol=protocol)
        self.topic_filter = topic_filter
        self.answer = answer
        self.reply_topic = reply_topic
        self.requests: list[tuple[str, bytes, Any]] = []

    def start(self) -> Device:
        self.connect()
        self.subscribe(self.topic_filter)
        return self

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        self.requests.append((msg.topic, bytes(msg.payload), props))
        if self.answer is None:
            return
        body = self.answer(msg.topic, bytes(msg.payload))
        if self.reply_topic is not None:  # MQTT 3.1.1: the convention names the topic
            client.publish(self.reply_topic(msg.topic), body, qos=1)
            return
        out = Properties(PacketTypes.PUBLISH)
        out.CorrelationData = props.CorrelationData
        out.UserProperty = [("answered-by", "device")]
        client.publish(props.ResponseTopic, body, qos=1, properties=out)


def test_the_example_validates() -> None:
    proc = run_cli("validate", "-c", str(EXAMPLE))
    assert proc.returncode == 0, proc.stderr


async def test_request_reply_example_end_to_end(gateways: Callable[..., GatewayProcess]) -> None:
    with Mosquitto() as mq, NatsServer() as ns:
        config: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
        config["gateway"] = {"id": "gw-rr", "http": {"listen": "127.0.0.1:0"}}
        gw = gateways(config, env={"MQTT_URL": mq.url, "NATS_URL": ns.url})
        await gw.astart(30)
        device = Device(mq.port, "dev-5", "devices/+/cmd", lambda t, p: b"done:" + t.encode() + b":" + p).start()
        legacy = Device(
            mq.port,
            "dev-311",
            "legacy/+/cmd/+",
            lambda t, p: b"legacy:" + p,
            protocol=mqtt.MQTTv311,
            reply_topic=lambda t: "legacy/replies/" + t.rsplit("/", 1)[1],
        ).start()
        nc = await nats_connect(ns.url)
        try:
            # NATS request → MQTT 5 device → NATS reply, concurrently, each to its own requester
            answers = await asyncio.gather(*(nc.request(f"cmd.d{i}", f"op{i}".encode(), timeout=10) for i in range(50)))
            for i, msg in enumerate(answers):
                assert msg.data == f"done:devices/d{i}/cmd:op{i}".encode()
                assert msg.headers is not None and msg.headers.get("answered-by") == "device"
            _, _, props = device.requests[0]
            assert props.ResponseTopic == "gateway/gw-rr/replies/device-commands"

            # NATS request → MQTT 3.1.1 device (request id in the topic) → NATS reply
            answers = await asyncio.gather(*(nc.request(f"legacy.cmd.l{i}", b"x%d" % i, timeout=10) for i in range(20)))
            assert sorted(m.data for m in answers) == sorted(b"legacy:x%d" % i for i in range(20))
            assert all(t.startswith(f"legacy/{t.split('/')[1]}/cmd/") for t, _, _ in legacy.requests)

            # MQTT 5 request → NATS service → the device's response topic, with its correlation data
            async def service(msg: Any) -> None:
                await msg.respond(b"geo:" + msg.data)

            await nc.subscribe("svc.geo", cb=service)
            await nc.flush()
            got: list[tuple[str, bytes, bytes]] = []
            asker = MqttClient(mq.port, "asker")
            asker.client.on_message = lambda c, u, m: got.append(
                (m.topic, bytes(m.payload), m.properties.CorrelationData)
            )
            asker.connect()
            asker.client.subscribe("me/answers", qos=1)
            await asyncio.sleep(0)
            try:
                for i in range(10):
                    props = Properties(PacketTypes.PUBLISH)
                    props.ResponseTopic = "me/answers"
                    props.CorrelationData = b"corr-%d" % i
                    asker.client.publish("lookup/geo", b"where-%d" % i, qos=1, properties=props)
                await gw.await_until(lambda: len(got) == 10, 20, "10 answers on the response topic")
            finally:
                asker.close()
            assert sorted(got[:10]) == sorted(("me/answers", b"geo:where-%d" % i, b"corr-%d" % i) for i in range(10))

            # No NATS service listens: the server's no-responders status becomes an error reply at once.
            errors: list[tuple[bytes, dict[str, str]]] = []
            asker2 = MqttClient(mq.port, "asker-2")
            asker2.client.on_message = lambda c, u, m: errors.append(
                (m.properties.CorrelationData, dict(getattr(m.properties, "UserProperty", [])))
            )
            asker2.connect()
            asker2.client.subscribe("me/errors", qos=1)
            await asyncio.sleep(0.2)
            try:
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = "me/errors"
                props.CorrelationData = b"nobody-1"
                asker2.client.publish("lookup/nobody", b"?", qos=1, properties=props)
                await gw.await_until(lambda: len(errors) == 1, 20, "the no-responders error reply")
            finally:
                asker2.close()
            assert errors[0][0] == b"nobody-1" and errors[0][1]["Nats-Service-Error-Code"] == "503"

            routes = await routez(gw.http_url)
            assert routes["device-commands"]["requests"]["replied"] == 50
            assert routes["device-commands"]["requests"]["pending"] == 0
            assert routes["legacy-commands"]["requests"]["replied"] == 20
            assert routes["device-lookups"]["requests"]["replied"] == 10
        finally:
            device.close()
            legacy.close()
            await nc.close()
        await gw.astop()


def _config(mq: Mosquitto, ns: NatsServer, request: dict[str, Any]) -> dict[str, Any]:
    return gateway_config(
        "gw-rr-faults",
        {"devices": mqtt_connector(mq.url, "gw-rr-faults"), "services": nats_connector(ns.url)},
        [
            {
                "name": "commands",
                "from": {"connector": "services", "subject": "cmd.{device}"},
                "to": {"connector": "devices", "topic": "devices/{device}/cmd", "qos": 1},
                "request": request,
            }
        ],
    )


async def test_a_device_that_never_answers_gets_the_requester_an_error_reply(
    gateways: Callable[..., GatewayProcess],
) -> None:
    with Mosquitto() as mq, NatsServer() as ns:
        gw = gateways(_config(mq, ns, {"timeout": 1.0}))
        await gw.astart(30)
        silent = Device(mq.port, "silent", "devices/+/cmd", None).start()
        nc = await nats_connect(ns.url)
        try:
            started = time.monotonic()
            msg = await nc.request("cmd.silent", b"reboot", timeout=10)
            waited = time.monotonic() - started
            assert msg.headers is not None
            assert msg.headers.get("Nats-Service-Error-Code") == "504"
            assert "no answer within 1 s" in msg.headers.get("Nats-Service-Error", "")
            assert waited < 9, "the error reply comes when the route's timeout expires, not the requester's"
            assert len(silent.requests) == 1, "the device did get the request"

            # A late answer (after the timeout) and one nobody asked for are counted, not delivered.
            _, _, props = silent.requests[0]
            out = Properties(PacketTypes.PUBLISH)
            out.CorrelationData = props.CorrelationData
            silent.client.publish(props.ResponseTopic, b"too late", qos=1, properties=out).wait_for_publish(5)
            out2 = Properties(PacketTypes.PUBLISH)
            out2.CorrelationData = b"\xff\x00 garbage"
            silent.client.publish(props.ResponseTopic, b"stray", qos=1, properties=out2).wait_for_publish(5)
            silent.client.publish(props.ResponseTopic, b"no correlation", qos=1).wait_for_publish(5)

            # A one-way message on the request route is forwarded as it is, without a response topic.
            await nc.publish("cmd.silent", b"fire-and-forget")
            await nc.flush()
            await gw.await_until(lambda: len(silent.requests) == 2, 10, "the one-way message")
            assert silent.requests[1][1] == b"fire-and-forget"
            assert getattr(silent.requests[1][2], "ResponseTopic", None) is None

            async def late_counted() -> bool:
                r = await routez(gw.http_url)
                return bool(r["commands"]["requests"]["late"] == 3)

            deadline = time.monotonic() + 10
            while not await late_counted():
                assert time.monotonic() < deadline, "late answers not counted"
                await asyncio.sleep(0.1)
            r = await routez(gw.http_url)
            assert r["commands"]["requests"]["timed_out"] == 1
            assert r["commands.replies"]["filtered"] == 3 and r["commands.replies"]["acked"] == 1
        finally:
            silent.close()
            await nc.close()
        await gw.astop()


async def test_a_flood_of_100000_requests_stays_within_the_table(gateways: Callable[..., GatewayProcess]) -> None:
    """100 000 requests, nobody answers, a table of 1 000: each requester gets exactly one error reply."""
    n, bound = 100_000, 1_000
    with Mosquitto() as mq, NatsServer() as ns:
        gw = gateways(_config(mq, ns, {"timeout": 2.0, "max_pending": bound}))
        await gw.astart(30)
        nc = await nats_connect(ns.url)
        replies: dict[str, int] = {}
        codes: dict[str, int] = {}
        peak = 0

        async def on_reply(msg: Any) -> None:
            replies[msg.subject] = replies.get(msg.subject, 0) + 1
            code = msg.headers.get("Nats-Service-Error-Code", "none") if msg.headers else "none"
            codes[code] = codes.get(code, 0) + 1

        await nc.subscribe("flood.>", cb=on_reply, pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30)
        await nc.flush()
        try:
            for start in range(0, n, 2_000):
                for i in range(start, start + 2_000):
                    await nc.publish(f"cmd.d{i % 50}", b"x", reply=f"flood.{i}")
                await nc.flush()
                if start % 20_000 == 0:
                    pending = (await routez(gw.http_url))["commands"]["requests"]["pending"]
                    peak = max(peak, pending)
                while sum(replies.values()) < start - 20_000:  # keep the flood within what the gateway drains
                    await asyncio.sleep(0.01)
            await gw.await_until(lambda: sum(replies.values()) >= n, 60, f"{n} replies")
            await asyncio.sleep(0.5)  # nothing more may come
        finally:
            await nc.close()
        stats = (await routez(gw.http_url))["commands"]["requests"]
        assert len(replies) == n and set(replies.values()) == {1}, "every requester heard back exactly once"
        assert set(codes) <= {"503", "504"} and sum(codes.values()) == n, codes
        assert stats["forwarded"] + stats["rejected"] == n
        assert stats["timed_out"] == stats["forwarded"] == codes["504"]
        assert stats["pending"] == 0 and peak <= bound
        assert stats["forwarded"] >= bound
        await gw.astop()
