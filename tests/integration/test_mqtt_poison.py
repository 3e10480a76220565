"""One message an MQTT broker cannot take never costs the MQTT connector its connection (real brokers).

- a NATS header value with a bare CR (Mosquitto drops an MQTT 5 connection over it as malformed UTF-8)
  arrives as a ``NAME-bin`` user property, between the other messages, in order, without a reconnect;
- topics rendered from NATS subjects that a broker would refuse (control character, wildcard) are
  dead-lettered, the others delivered;
- a message the checks cannot know is refused (a 3.1.1 broker's ``max_packet_size`` is not told to
  the client) breaks the connection twice, the second time alone, and then fails alone;
- a 64 MB message is read without stalling the event loop;
- the MQTT 5 Content Type and Message Expiry Interval travel as headers both ways.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from connectors.memory.broker import MemoryBroker
from gateway import Gateway
from gateway.config import parse_config
from gateway.core.dispatch import Route
from gateway.ops.monitor import connector_view
from tests.support.brokers import Mosquitto, NatsServer
from tests.support.clients.mqtt import MqttClient
from tests.support.clients.nats import NatsCollector, nats_connect
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(90)]


# ---------------------------------------------------------------- helpers


class Subscriber(MqttClient):
    """MQTT 5, subscribed to ``topic``, keeping each message's topic, payload and properties in ``seen``."""

    def __init__(self, port: int, topic: str) -> None:
        super().__init__(port)
        self.seen: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.connect()
        self.subscribe(topic)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props = msg.properties
        with self._lock:
            self.seen.append(
                {
                    "topic": msg.topic,
                    "payload": bytes(msg.payload),
                    "user": list(getattr(props, "UserProperty", []) or []),
                    "content_type": getattr(props, "ContentType", None),
                    "expiry": getattr(props, "MessageExpiryInterval", None),
                }
            )

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [m["payload"] for m in self.seen]


def first_occurrences(payloads: list[bytes]) -> list[bytes]:
    """In order, each payload once (QoS 1 allows a duplicate after a reconnect)."""
    return list(dict.fromkeys(payloads))


def raw_nats(port: int, commands: list[bytes]) -> None:
    """Publish raw protocol commands (what nats-py would refuse or rewrite) and wait for the server's PONG."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.recv(4096)  # INFO
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n')
        s.sendall(b"".join(commands) + b"PING\r\n")
        reply = b""
        while b"PONG" not in reply:
            chunk = s.recv(4096)
            assert chunk, f"nats-server closed the connection: {reply!r}"
            assert b"-ERR" not in chunk, chunk
            reply += chunk


def hpub(subject: str, headers: bytes, payload: bytes) -> bytes:
    block = b"NATS/1.0\r\n" + headers + b"\r\n"
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (subject.encode(), len(block), len(block) + len(payload), block, payload)


def pub(subject: bytes, payload: bytes) -> bytes:
    return b"PUB %s %d\r\n%s\r\n" % (subject, len(payload), payload)


def assert_invariant(route: Route) -> None:
    s = route.stats
    assert s.received == s.acked + s.failed + s.dropped + s.filtered + route.in_flight, s.as_dict()


async def start(cfg: str) -> Gateway:
    gw = Gateway(parse_config(cfg))
    await gw.start()
    await gw.wait_ready(30)
    return gw


def bus_and_devices(nats: NatsServer, mosquitto: Mosquitto, unique: str) -> str:
    """:func:`header` with a NATS connector ``bus`` and an MQTT connector ``devices``."""
    return header(
        {
            "bus": {"type": "nats", "servers": [nats.url]},
            "devices": {"type": "mqtt", "url": mosquitto.url, "client_id": f"gw-{unique}"},
        },
        unique,
    )


def header(connectors: dict[str, Any], unique: str) -> str:
    return f"""
gateway: {{id: poison-{unique}, shutdown_timeout: 5, reconnect: {{initial: 0.05, max: 0.5}}}}
connectors: {json.dumps(connectors)}
routes:
"""


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(workdir=tmp_path / "nats", jetstream=False) as server:
        yield server


@pytest.fixture
async def nats_client(nats: NatsServer) -> AsyncIterator[NatsClient]:
    nc = await nats_connect(nats.url)
    try:
        yield nc
    finally:
        await nc.close()


# ---------------------------------------------------------------- NATS -> MQTT 5


async def test_a_bare_cr_in_a_nats_header_travels_as_name_bin_and_the_connection_stays(
    mosquitto: Mosquitto, nats: NatsServer, unique: str
) -> None:
    sub = Subscriber(mosquitto.port, f"cr-{unique}/#")
    cfg = (
        bus_and_devices(nats, mosquitto, unique)
        + f"""
  - name: r
    from: {{connector: bus, subject: "cr.{unique}.>"}}
    to: {{connector: devices, topic: "cr-{unique}/{{>}}", qos: 1}}
"""
    )
    gw = await start(cfg)
    try:
        commands = [hpub(f"cr.{unique}.t", b"X-Seq: %d\r\n" % i, b"good-%d" % i) for i in range(5)]
        commands.append(hpub(f"cr.{unique}.t", b"X-A: a\rb\r\nX-B: ok\r\n", b"bad"))
        commands += [hpub(f"cr.{unique}.t", b"X-Seq: %d\r\n" % i, b"good-%d" % i) for i in range(5, 10)]
        raw_nats(nats.port, commands)
        await wait_until(lambda: len(sub.payloads()) >= 11, 20, "all eleven messages")
        want = [b"good-%d" % i for i in range(5)] + [b"bad"] + [b"good-%d" % i for i in range(5, 10)]
        assert sub.payloads() == want
        bad = sub.seen[5]
        assert bad["user"] == [("X-A-bin", base64.b64encode(b"a\rb").decode()), ("X-B", "ok")]
        assert sub.seen[0]["user"] == [("X-Seq", "0")]
        view = connector_view(gw, "devices")  # what /connz shows
        assert view["reconnects"] == 0, view
        assert view["closed_on_message"] == 0, view
        route = gw.routes["r"]
        await wait_until(lambda: route.stats.acked == 11, 10, "all acknowledged")
        assert (route.stats.received, route.stats.failed) == (11, 0)
        assert_invariant(route)
    finally:
        sub.close()
        assert await gw.stop()


async def test_topics_a_broker_would_refuse_are_dead_lettered_and_the_others_delivered(
    mosquitto: Mosquitto, nats: NatsServer, nats_client: NatsClient, unique: str
) -> None:
    dead = await NatsCollector().subscribe(nats_client, f"dead.{unique}")
    sub = Subscriber(mosquitto.port, f"tp-{unique}/#")
    cfg = (
        bus_and_devices(nats, mosquitto, unique)
        + f"""
  - name: r
    from: {{connector: bus, subject: "tp.{unique}.>"}}
    to: {{connector: devices, topic: "tp-{unique}/{{>}}", qos: 1}}
    dead_letter: {{connector: bus, subject: "dead.{unique}"}}
"""
    )
    gw = await start(cfg)
    try:
        p = f"tp.{unique}.".encode()
        raw_nats(
            nats.port,
            [
                pub(p + b"a", b"1"),
                pub(p + b"b\x01c", b"control"),  # U+0001: Mosquitto drops the connection (malformed UTF-8)
                pub(p + b"d\xc2\x85e", b"c1"),  # U+0085 (NEL), a C1 control character: the same
                pub(p + b"x+y", b"wildcard"),  # '+' is fine in NATS, a wildcard in MQTT
                pub(p + b"z", b"2"),
            ],
        )
        await wait_until(lambda: len(dead.messages) >= 3, 20, "three dead letters")
        await wait_until(lambda: len(sub.payloads()) >= 2, 20, "the two good messages")
        assert sub.payloads() == [b"1", b"2"]
        assert [m["topic"] for m in sub.seen] == [f"tp-{unique}/a", f"tp-{unique}/z"]
        assert sorted(r.payload for r in dead.messages) == [b"c1", b"control", b"wildcard"]
        errors = {r.payload: dict(r.headers)["x-gateway-error"] for r in dead.messages}
        assert "control character" in errors[b"control"], errors
        assert "control character" in errors[b"c1"], errors
        route = gw.routes["r"]
        await wait_until(lambda: route.stats.acked + route.stats.failed == 5, 10, "all five settled")
        assert (route.stats.acked, route.stats.failed, route.stats.dead_lettered) == (2, 3, 3)
        assert_invariant(route)
        assert connector_view(gw, "devices")["reconnects"] == 0
    finally:
        sub.close()
        assert await gw.stop()


# ---------------------------------------------------------------- "the same message breaks it again"


@pytest.fixture
def small_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(workdir=tmp_path / "mqtt", extra_config="max_packet_size 2048\n") as broker:
        yield broker


async def test_a_message_the_broker_closes_the_connection_on_twice_fails_alone_and_the_rest_flows(
    small_mosquitto: Mosquitto, unique: str
) -> None:
    """MQTT 3.1.1 cannot tell the client the broker's maximum packet size: only the broker knows, and it
    drops the connection. The oversized message is then sent alone, breaks it again, and fails."""
    MemoryBroker.reset()
    sub = Subscriber(small_mosquitto.port, f"pr-{unique}/#")
    cfg = (
        header(
            {
                "mem": {"type": "memory", "broker": f"m-{unique}"},
                "devices": {
                    "type": "mqtt",
                    "url": small_mosquitto.url,
                    "client_id": f"gw-{unique}",
                    "protocol": "3.1.1",
                },
            },
            unique,
        )
        + f"""
  - name: r
    from: {{connector: mem, topic: "in/#"}}
    to: {{connector: devices, topic: "pr-{unique}/x", qos: 1}}
    dead_letter: {{connector: mem, topic: "dead"}}
"""
    )
    gw = await start(cfg)
    mem = MemoryBroker.named(f"m-{unique}")
    try:
        want = []
        for i in range(40):
            if i == 20:
                mem.publish("in/a", b"B" * 8192)
            mem.publish("in/a", b"small-%d" % i)
            want.append(b"small-%d" % i)
        await wait_until(lambda: len(mem.acked) == 41, 30, "all 41 source messages acknowledged")
        assert first_occurrences(sub.payloads()) == want
        assert b"B" * 8192 not in sub.payloads()
        route = gw.routes["r"]
        assert (route.stats.acked, route.stats.failed, route.stats.dead_lettered) == (40, 1, 1)
        assert_invariant(route)
        [letter] = mem.received
        error = dict(letter.headers or [])["x-gateway-error"]
        assert "closed the connection on this message" in error, error
        view = connector_view(gw, "devices")
        assert view["closed_on_message"] == 1, view
        assert view["probe_resends"] >= 1, view
        assert view["reconnects"] == 2, view  # once with the batch, once with the message alone
        assert view["state"] == "connected", view
        # and the connection settled: later messages go through without another reconnect
        mem.publish("in/a", b"after")
        await wait_until(lambda: b"after" in sub.payloads(), 10, "a message after the poison one")
        assert connector_view(gw, "devices")["reconnects"] == 2
    finally:
        sub.close()
        assert await gw.stop()


# ---------------------------------------------------------------- large messages


async def test_a_64_mb_message_is_read_with_the_event_loop_responsive(
    mosquitto: Mosquitto, tmp_path: Path, unique: str
) -> None:
    MemoryBroker.reset()
    size = 64 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)
    path = tmp_path / "payload.bin"
    path.write_bytes(payload)
    cfg = (
        header(
            {
                "mem": {"type": "memory", "broker": f"m-{unique}"},
                "devices": {"type": "mqtt", "url": mosquitto.url, "client_id": f"gw-{unique}"},
            },
            unique,
        )
        + f"""
  - name: big
    from: {{connector: devices, topic: "big-{unique}/#", qos: 1}}
    to: {{connector: mem, topic: "out"}}
"""
    )
    gw = await start(cfg)
    mem = MemoryBroker.named(f"m-{unique}")
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    try:
        t0 = time.monotonic()
        proc = await asyncio.to_thread(
            subprocess.run,
            [
                *("mosquitto_pub", "-h", "127.0.0.1", "-p", str(mosquitto.port), "-V", "mqttv5", "-q", "1"),
                *("-t", f"big-{unique}/x", "-f", str(path)),
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        await wait_until(lambda: len(mem.received) == 1, 60, "the 64 MB message")
        took = time.monotonic() - t0
        stop.set()
        await tick
        got = mem.received[0].payload
        assert len(got) == size and hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        route = gw.routes["big"]
        await wait_until(lambda: route.stats.acked == 1, 10, "acknowledged")
        worst = max(gaps)
        print(
            f"64 MB through Mosquitto into the MQTT source: {took:.2f} s, longest event-loop gap {worst * 1000:.0f} ms"
        )
        assert worst < 1.5, f"the event loop stalled {worst:.2f} s"  # generous: a shared machine
        assert connector_view(gw, "devices")["reconnects"] == 0
    finally:
        stop.set()
        await asyncio.gather(tick, return_exceptions=True)
        assert await gw.stop()


# ---------------------------------------------------------------- properties as headers


async def test_content_type_and_expiry_travel_mqtt5_to_nats_headers_and_back(
    mosquitto: Mosquitto, nats: NatsServer, nats_client: NatsClient, unique: str
) -> None:
    on_nats = await NatsCollector().subscribe(nats_client, f"ct.{unique}.>")
    sub = Subscriber(mosquitto.port, f"ctout-{unique}/#")
    cfg = (
        bus_and_devices(nats, mosquitto, unique)
        + f"""
  - name: up
    from: {{connector: devices, topic: "ctin-{unique}/#", qos: 1}}
    to: {{connector: bus, subject: "ct.{unique}.{{#}}"}}
  - name: down
    from: {{connector: bus, subject: "ct.{unique}.>"}}
    to: {{connector: devices, topic: "ctout-{unique}/{{>}}", qos: 1}}
"""
    )
    gw = await start(cfg)
    pub = MqttClient(mosquitto.port).connect()
    try:
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        props.MessageExpiryInterval = 120
        props.UserProperty = [("u", "1")]
        pub.client.publish(f"ctin-{unique}/a", b'{"x":1}', qos=1, properties=props).wait_for_publish(10)
        await nats_client.publish(f"ct.{unique}.b", b"plain", headers={"Content-Type": "text/plain", "v": "2"})
        await wait_until(lambda: len(sub.seen) >= 2, 20, "both messages back on MQTT")
        headers = {r.where: dict(r.headers) for r in on_nats.messages}
        assert headers[f"ct.{unique}.a"] == {
            "u": "1",
            "content-type": "application/json",
            "message-expiry-interval": "120",
        }
        by_topic = {m["topic"]: m for m in sub.seen}
        a = by_topic[f"ctout-{unique}/a"]
        assert a["content_type"] == "application/json"
        assert a["user"] == [("u", "1")]  # not also as user properties
        assert 110 <= a["expiry"] <= 120, a
        b = by_topic[f"ctout-{unique}/b"]
        assert b["content_type"] == "text/plain"
        assert b["user"] == [("v", "2")]
        assert b["expiry"] is None
        for name in ("up", "down"):
            assert_invariant(gw.routes[name])
    finally:
        pub.close()
        sub.close()
        assert await gw.stop()
