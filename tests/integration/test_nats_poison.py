"""Poison isolation on NATS targets: one message nats-server cannot take fails alone; the connection stays.

Before: a 60 000-character MQTT topic level on an MQTT -> NATS route made nats-server close the connection
("maximum control line exceeded"), the gateway resent it after every reconnect, and all NATS traffic
stopped in both directions. Header names NATS cannot carry were silently left out, values with line
breaks rewritten, and the MQTT levels ``a*b`` / ``a>`` published as subjects although the README rejects
them.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from connectors.memory.broker import MemoryBroker
from gateway import Gateway
from gateway.config import parse_config
from tests.support.brokers import Mosquitto, NatsServer
from tests.support.clients.mqtt import MqttClient, MqttCollector
from tests.support.clients.nats import NatsCollector, nats_connect
from tests.support.configs import gateway_config, mqtt_connector, nats_connector
from tests.support.gateway_process import GatewayProcess, routez
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.timeout(90)]

HUGE = "x" * 60_000


def _invariant(route: dict[str, Any]) -> bool:
    return bool(
        route["received"]
        == route["acked"] + route["failed"] + route["dropped"] + route["filtered"] + route["in_flight"]
    )


async def _http_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    made: list[GatewayProcess] = []
    yield made
    for gw in made:
        gw.cleanup()


async def test_a_60000_character_level_fails_alone_and_nats_never_reconnects(
    tmp_path: Path, gateway_process: list[GatewayProcess]
) -> None:
    """The user's report, end to end: MQTT -> NATS with a huge level between good messages, a NATS -> MQTT
    route running meanwhile, and the MQTT levels ``a*b`` / ``a>`` and a header name NATS cannot carry."""
    with Mosquitto(workdir=tmp_path / "mq") as mq, NatsServer(workdir=tmp_path / "ns", jetstream=False) as ns:
        config = gateway_config(
            "gw-npoison",
            {"mqtt": mqtt_connector(mq.url, "gw-npoison"), "nats": nats_connector(ns.url)},
            [
                {
                    "name": "up",
                    "from": {"connector": "mqtt", "topic": "up/#", "qos": 1},
                    "to": {"connector": "nats", "subject": "up.{#}"},
                    "dead_letter": {"connector": "nats", "subject": "dead.up"},
                },
                {  # a header name NATS cannot carry; its dead letter could not carry it either: on_error drop
                    "name": "hdr",
                    "from": {"connector": "mqtt", "topic": "hdr/#", "qos": 1},
                    "to": {"connector": "nats", "subject": "up.hdr"},
                },
                {  # on_error: drop (the default): counted as failed
                    "name": "drop",
                    "from": {"connector": "mqtt", "topic": "drop/#", "qos": 1},
                    "to": {"connector": "nats", "subject": "drop.{#}"},
                },
                {
                    "name": "down",
                    "from": {"connector": "nats", "subject": "down.{n}"},
                    "to": {"connector": "mqtt", "topic": "down/{n}", "qos": 1},
                },
            ],
        )
        gw = GatewayProcess(tmp_path, config, name="npoison")
        gateway_process.append(gw)
        await gw.astart(30)
        nc = await nats_connect(ns.url)
        up = await NatsCollector().subscribe(nc, "up.>")
        dropped = await NatsCollector().subscribe(nc, "drop.>")
        dead = await NatsCollector().subscribe(nc, "dead.>")
        down = MqttCollector(mq.port, "npoison-down", "down/#").start()
        pub = MqttClient(mq.port, "npoison-pub")
        pub.connect()
        bad_name = Properties(PacketTypes.PUBLISH)
        bad_name.UserProperty = [("bad name", "v")]
        try:
            sends: list[tuple[str, bytes, Properties | None]] = [(f"up/s/{i}", b"%d" % i, None) for i in range(10)]
            sends += [
                (f"up/{HUGE}", b"huge", None),
                ("up/a*b", b"star", None),
                ("up/q/a>", b"gt", None),
                ("hdr/1", b"bad-name", bad_name),
                (f"drop/{HUGE}", b"huge", None),
            ]
            sends += [(f"up/s/{i}", b"%d" % i, None) for i in range(10, 20)]
            sends += [("drop/ok", b"ok", None)]
            for n, (topic, body, props) in enumerate(sends):
                info = pub.client.publish(topic, body, qos=1, properties=props)
                info.wait_for_publish(10)
                assert info.rc == mqtt.MQTT_ERR_SUCCESS
                await nc.publish(f"down.{n}", b"%d" % n)  # the other direction, all along
            await nc.flush()
            await wait_until(lambda: len(up.messages) >= 20 and len(dead.messages) >= 3, 30, "20 up, 3 dead")
            await wait_until(lambda: len(down.messages) >= len(sends) and len(dropped.messages) >= 1, 30, "down, drop")
            await asyncio.sleep(0.3)  # nothing more may come
        finally:
            pub.close()
            down.close()
            await nc.close()

        assert [m.payload for m in up.messages] == [b"%d" % i for i in range(20)], "good ones, in order, once"
        assert [m.payload for m in dropped.messages] == [b"ok"]
        assert sorted(m.payload for m in down.messages) == sorted(b"%d" % n for n in range(len(sends)))
        reasons = {m.payload: dict(m.headers)["x-gateway-error"] for m in dead.messages}
        assert set(reasons) == {b"huge", b"star", b"gt"}
        assert "max_control_line of 4096" in reasons[b"huge"], reasons[b"huge"]
        assert "'a*b'" in reasons[b"star"] and "'a>'" in reasons[b"gt"], reasons
        failed = gw.events("route.delivery_failed", route="hdr")
        assert len(failed) == 1 and "header name 'bad name'" in failed[0]["error"], failed

        routes = await routez(gw.http_url)
        for r in routes.values():
            assert _invariant(r) and r["in_flight"] == 0, r
        assert (routes["up"]["failed"], routes["up"]["dead_lettered"], routes["up"]["acked"]) == (3, 3, 20)
        assert (routes["hdr"]["failed"], routes["hdr"]["acked"]) == (1, 0)
        assert (routes["drop"]["failed"], routes["drop"]["dead_lettered"], routes["drop"]["acked"]) == (1, 0, 1)
        assert routes["down"]["received"] == routes["down"]["acked"] == len(sends), "the other route lost nothing"
        _, connz = await _http_json(f"{gw.http_url}/connz")
        nats_conn = next(c for c in connz["connectors"] if c["name"] == "nats")
        assert nats_conn["reconnects"] == 0 and nats_conn["closed_on_message"] == 0, nats_conn
        status, _ = await _http_json(f"{gw.http_url}/readyz")
        assert status == 200
        await gw.astop()


async def _gateway(config: str) -> Gateway:
    gw = Gateway(parse_config(config))
    await gw.start()
    await gw.wait_ready(30)
    return gw


async def test_headers_nats_cannot_carry(nats_server: NatsServer, unique: str) -> None:
    """A value with CR/LF or bytes that are not UTF-8 travels as ``NAME-bin``; a name NATS cannot carry
    fails its message alone, which is neither published nor left without the header."""
    MemoryBroker.reset()
    gw = await _gateway(f"""
gateway: {{id: nh-{unique}, shutdown_timeout: 5}}
connectors:
  mem: {{type: memory, broker: m-{unique}}}
  nats: {{type: nats, servers: ["{nats_server.url}"]}}
routes:
  - name: h
    from: {{connector: mem, topic: "in/#"}}
    to: {{connector: nats, subject: "h-{unique}.{{#}}"}}
""")
    nc = await nats.connect(nats_server.url)
    got: list[Any] = []

    async def on_msg(msg: Any) -> None:
        got.append(msg)

    await nc.subscribe(f"h-{unique}.>", cb=on_msg)
    await nc.flush()
    mem = MemoryBroker.named(f"m-{unique}")
    try:
        mem.publish("in/1", b"1", [("crlf", "a\r\nb"), ("raw", "\udcff\udcfe\x00"), ("plain", "v"), ("pad", " x ")])
        mem.publish("in/2", b"2", [("ok", "1"), ("bad name", "x")])
        mem.publish("in/3", b"3", [("k:v", "x")])
        mem.publish("in/4", b"4")
        await wait_until(lambda: len(mem.acked) == 4, 20, "all four acknowledged")
        await wait_until(
            lambda: len(got) == 2,
            10,
            lambda: f"the two good ones; got {[m.data for m in got]}, route {gw.routes['h'].stats.as_dict()}",
        )
        await asyncio.sleep(0.2)
    finally:
        await nc.close()
    assert [m.data for m in got] == [b"1", b"4"]
    headers = got[0].headers
    assert headers["plain"] == "v"
    assert base64.b64decode(headers["crlf-bin"]) == b"a\r\nb"
    assert base64.b64decode(headers["raw-bin"]) == b"\xff\xfe\x00", "the original bytes, as a Kafka source read them"
    assert base64.b64decode(headers["pad-bin"]) == b" x "
    stats = gw.routes["h"].stats
    assert (stats.received, stats.acked, stats.failed) == (4, 2, 2)
    assert gw.connectors["nats"].reconnects == 0
    assert await gw.stop()


@pytest.mark.parametrize("jetstream", [False, True], ids=["core", "jetstream"])
async def test_a_message_the_server_closes_the_connection_on_fails_after_a_probe(
    tmp_path: Path, unique: str, jetstream: bool
) -> None:
    """The safety net for what the checks do not know: with ``max_control_line: 1024`` on the server
    (the gateway assumes 4096), a 1 500-byte subject passes the checks and the server closes the
    connection on it. The next connection writes it alone, the server closes again, and it fails (dead
    letter) with the server's reason; the messages around it are delivered in order and the connection
    settles."""
    MemoryBroker.reset()
    with NatsServer(workdir=tmp_path / "ns", jetstream=jetstream, extra_config="max_control_line: 1024") as ns:
        nc = await nats.connect(ns.url)
        if jetstream:
            await nc.jetstream().add_stream(name=f"P{unique}", subjects=[f"p-{unique}.>"])
        got: list[Any] = []

        async def on_msg(msg: Any) -> None:
            got.append(msg)

        await nc.subscribe(f"p-{unique}.>", cb=on_msg)
        await nc.flush()
        target = {"connector": "nats", "subject": f"p-{unique}.{{#}}", "jetstream": jetstream}
        gw = await _gateway(f"""
gateway: {{id: np-{unique}, shutdown_timeout: 5, reconnect: {{initial: 0.05, max: 0.2}}}}
connectors:
  mem: {{type: memory, broker: m-{unique}}}
  nats: {{type: nats, servers: ["{ns.url}"]}}
routes:
  - name: p
    from: {{connector: mem, topic: "in/#"}}
    to: {json.dumps(target)}
    dead_letter: {{connector: mem, topic: dead}}
""")
        mem = MemoryBroker.named(f"m-{unique}")
        try:
            for i in range(5):
                mem.publish(f"in/{i}", b"%d" % i)
            mem.publish("in/" + "y" * 1500, b"long")
            for i in range(5, 10):
                mem.publish(f"in/{i}", b"%d" % i)
            await wait_until(lambda: len(mem.acked) == 11, 30, "all eleven acknowledged")
            await wait_until(lambda: len({m.data for m in got}) == 10, 10, "the ten good ones")
            if jetstream:
                info = await nc.jetstream().stream_info(f"P{unique}")
                assert info.state.messages == 10, "a resend is deduplicated by Nats-Msg-Id; the long one never"
        finally:
            await nc.close()
        firsts: list[bytes] = []
        for m in got:  # at-least-once: what the server took before it closed may come again
            if m.data not in firsts:
                firsts.append(m.data)
        assert firsts == [b"%d" % i for i in range(10)], "in order, the long one never"
        letters = [r for r in mem.received if r.topic == "dead"]
        assert [r.payload for r in letters] == [b"long"]
        error = dict(letters[0].headers or [])["x-gateway-error"]
        assert "maximum control line exceeded" in error and "written alone" in error, error
        stats = gw.routes["p"].stats
        assert (stats.received, stats.acked, stats.failed, stats.dead_lettered) == (11, 10, 1, 1)
        conn = gw.connectors["nats"]
        counters = conn.counters()
        assert counters["closed_on_message"] == 1 and counters["probe_resends"] >= 1, counters
        assert conn.reconnects == 2, "closed once in a batch, once written alone, then it settles"
        assert conn.connected.is_set()
        assert await gw.stop()


ODD = [  # (subject token, header block, payload, headers the route must see)
    (b"1", b"Foo: bar\r\n\r\n", b"no version line", [("Foo", "bar")]),
    (b"2", b"NATS/1.0\r\n: empty name\r\nno colon\r\nok: 1\r\n\r\n", b"odd lines", [("ok", "1")]),
    (b"3", b"NATS/1.0", b"bare version", None),  # nats-py itself raises IndexError in its read loop
    (b"4", b"NATS/1.0\r\nStatus: 404\r\n\r\n", b"", [("Status", "404")]),  # not the end of a JetStream pull
    (b"\xff\xfe", b"NATS/1.0\r\na: b\r\n\r\n", b"not UTF-8", [("a", "b")]),
]


async def _raw_publish(url: str, commands: list[bytes]) -> None:
    """Publish over a raw socket: what other NATS clients may send, that nats-py would not."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await reader.readline()  # INFO
        writer.write(b'CONNECT {"verbose":false,"headers":true}\r\n' + b"".join(commands) + b"PING\r\n")
        await writer.drain()
        assert await reader.readline() == b"PONG\r\n", "the server took every command"
    finally:
        writer.close()
        await writer.wait_closed()


def _hpub(subject: bytes, block: bytes, payload: bytes) -> bytes:
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (subject, len(block), len(block) + len(payload), block, payload)


async def test_odd_header_blocks_and_subjects_reach_the_route(tmp_path: Path, unique: str) -> None:
    """What nats-server forwards as it is (header blocks without ``NATS/1.0``, empty names, lines without
    ':', a bare ``NATS/1.0``, subjects that are not UTF-8) becomes an envelope on a core and on a JetStream
    source: no header has an empty name, odd lines are left out and counted, nothing stops reading."""
    MemoryBroker.reset()
    with NatsServer(workdir=tmp_path / "ns") as ns:
        nc = await nats.connect(ns.url)
        await nc.jetstream().add_stream(name=f"ODD{unique}", subjects=[f"oddjs-{unique}.>"])
        await nc.close()
        gw = await _gateway(f"""
gateway: {{id: no-{unique}, shutdown_timeout: 5}}
connectors:
  mem: {{type: memory, broker: m-{unique}}}
  nats: {{type: nats, servers: ["{ns.url}"]}}
routes:
  - name: core
    from: {{connector: nats, subject: "odd-{unique}.>"}}
    to: {{connector: mem, topic: core}}
  - name: js
    from: {{connector: nats, stream: ODD{unique}, subject: "oddjs-{unique}.>"}}
    to: {{connector: mem, topic: js}}
""")
        mem = MemoryBroker.named(f"m-{unique}")
        try:
            await _raw_publish(
                ns.url,
                [
                    _hpub(f"{prefix}-{unique}.".encode() + token, block, payload)
                    for prefix in ("odd", "oddjs")
                    for token, block, payload, _ in ODD
                ],
            )
            await wait_until(lambda: len(mem.received) == 2 * len(ODD), 20, "every odd message, on both routes")
            for topic in ("core", "js"):
                got = [(r.payload, r.headers) for r in mem.received if r.topic == topic]
                assert got == [(payload, headers) for _, _, payload, headers in ODD], topic
            for name in ("core", "js"):
                stats = gw.routes[name].stats
                assert (stats.received, stats.acked, stats.failed) == (len(ODD), len(ODD), 0), name
            conn = gw.connectors["nats"]
            assert conn.reconnects == 0 and conn.connected.is_set()
            assert conn.counters()["header_lines_dropped"] == 4, "': empty name' and 'no colon', on each route"
        finally:
            assert await gw.stop()
