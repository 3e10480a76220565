"""QoS 0 MQTT routes share one connection; at-least-once routes keep their own (real Mosquitto, both versions).

- 300 QoS 0 routes and 2 QoS 1 routes on one connector: 1 shared connection + 2 route sessions + the
  publisher, counted as the process's TCP connections to the broker; every route delivers;
- a QoS 0 route whose filter overlaps a shared one (``a/#`` beside ``a/b``) gets a session of its own,
  and each route gets each message once;
- reload adds, removes and changes shared routes on the live connection (no reconnect): the added one
  delivers, the removed one's filter is unsubscribed, the changed one takes over its filter;
- a shared route cut off as a slow consumer is unsubscribed (the others keep flowing) and resumes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import yaml

from connectors.mqtt.connector import MqttConnector
from connectors.mqtt.filters import FilterSet
from gateway import Gateway
from gateway.config import parse_config
from gateway.ops.monitor import connector_view
from tests.support.brokers import Mosquitto
from tests.support.clients.mqtt import MqttClient
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

SHARED = 300


def broker_connections(port: int) -> int:
    """This process's established TCP connections to the broker."""
    conns = psutil.Process(os.getpid()).net_connections(kind="tcp")
    return sum(1 for c in conns if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def config(port: int, u: str, version: int, routes: list[dict[str, Any]]) -> str:
    return yaml.safe_dump(
        {
            "gateway": {"id": f"sh-{u}", "http": {"listen": ""}, "reconnect": {"initial": 0.05, "max": 0.5}},
            "connectors": {
                "mq": {
                    "type": "mqtt",
                    "url": f"mqtt://127.0.0.1:{port}",
                    "client_id": f"sh-{u}",
                    "protocol": 5 if version == 5 else "3.1.1",
                    "connect_timeout": 5,
                }
            },
            "routes": routes,
        }
    )


def route(name: str, source: str, target: str, qos: int = 0) -> dict[str, Any]:
    return {
        "name": name,
        "from": {"connector": "mq", "topic": source, "qos": qos},
        "to": {"connector": "mq", "topic": target, "qos": qos},
    }


def shared_route(u: str, i: int, out: str = "out") -> dict[str, Any]:
    return route(f"s{i}", f"sh/{u}/{i}/{{dev}}", f"{out}/{u}/{i}/{{dev}}")


def own_route(u: str, i: int) -> dict[str, Any]:
    return route(f"q{i}", f"q1/{u}/{i}/{{dev}}", f"out/{u}/q{i}/{{dev}}", qos=1)


@pytest.fixture
def listener(mosquitto: Mosquitto, unique: str) -> Iterator[MqttClient]:
    client = MqttClient(mosquitto.port, client_id=f"listen-{unique}")
    client.connect()
    client.subscribe(f"+/{unique}/#", qos=1)
    yield client
    client.close()


def topics(client: MqttClient, prefix: str) -> list[str]:
    return [r.where for r in list(client.messages) if r.where.startswith(prefix)]


def test_filter_sets_keep_overlapping_filters_apart() -> None:
    s = FilterSet()
    assert s.add("a/b") and s.add("a/c/+") and s.add("x/#") and s.add("b/+/d")
    for overlapping in ("a/b", "a/+", "a/#", "#", "+/b", "x", "x/y/z", "a/c/d", "+/+/+", "b/q/d", "b/#"):
        assert s.overlaps(overlapping), overlapping
    for apart in ("a", "a/b/c", "a/c", "y/+", "a/+/e/f", "b/+/e"):
        assert not s.overlaps(apart), apart
    assert not s.add("a//b")


@pytest.mark.parametrize("version", [5, 4])
async def test_qos0_routes_share_one_connection_and_all_deliver(
    mosquitto: Mosquitto, unique: str, listener: MqttClient, version: int
) -> None:
    u = unique
    routes = [shared_route(u, i) for i in range(SHARED)] + [own_route(u, 0), own_route(u, 1)]
    gw = Gateway(parse_config(config(mosquitto.port, u, version, routes)))
    await gw.start()
    try:
        await gw.wait_ready(60)
        view = connector_view(gw, "mq")
        assert len(view["channels"]) == 4, [c["name"] for c in view["channels"]]  # publisher, shared, 2 own
        await wait_until(lambda: broker_connections(mosquitto.port) >= 4 + 1, 10, "connections")
        assert broker_connections(mosquitto.port) == 4 + 1  # + the listener
        items: list[tuple[str, bytes, Any]] = [(f"sh/{u}/{i}/d", b"%d" % i, None) for i in range(SHARED)]
        listener.publish_all(items, qos=0)
        listener.publish_all([(f"q1/{u}/{i}/d", b"q", None) for i in range(2)], qos=1)
        await wait_until(lambda: len(topics(listener, f"out/{u}/")) >= SHARED + 2, 30, f"{SHARED + 2} deliveries")
        got = topics(listener, f"out/{u}/")
        assert sorted(got) == sorted([f"out/{u}/{i}/d" for i in range(SHARED)] + [f"out/{u}/q{i}/d" for i in range(2)])
        for name in ("s0", f"s{SHARED - 1}", "q0"):
            s = gw.routes[name].stats  # a QoS 1 delivery can reach the listener before its PUBACK reaches us
            await wait_until(lambda s=s: s.acked == 1, 10, f"{name} acknowledged")
            assert s.received == s.acked == 1, (name, s.as_dict())
    finally:
        await gw.stop()


async def test_an_overlapping_filter_gets_its_own_session_and_nothing_twice(
    mosquitto: Mosquitto, unique: str, listener: MqttClient
) -> None:
    u = unique
    routes = [
        route("exact", f"ov/{u}/a/b", f"out/{u}/exact"),
        route("wide", f"ov/{u}/a/#", f"out/{u}/wide"),
        route("other", f"ov/{u}/c", f"out/{u}/other"),
    ]
    gw = Gateway(parse_config(config(mosquitto.port, u, 5, routes)))
    shared, own = MqttConnector.sessions_of(list(gw.routes.values()))
    assert [r.name for r in shared] == ["exact", "other"] and [r.name for r in own] == ["wide"]
    await gw.start()
    try:
        await gw.wait_ready(30)
        listener.publish_all([(f"ov/{u}/a/b", b"1", None), (f"ov/{u}/c", b"2", None)], qos=0)
        await wait_until(lambda: len(topics(listener, f"out/{u}/")) >= 3, 20, "3 deliveries")
        await asyncio.sleep(0.5)  # a duplicate would arrive right behind
        assert sorted(topics(listener, f"out/{u}/")) == [f"out/{u}/exact", f"out/{u}/other", f"out/{u}/wide"]
    finally:
        await gw.stop()


async def test_reload_changes_the_shared_subscriptions_live_and_a_cut_route_resumes(
    mosquitto: Mosquitto, unique: str, listener: MqttClient
) -> None:
    u = unique
    routes = [shared_route(u, i) for i in range(4)]
    gw = Gateway(parse_config(config(mosquitto.port, u, 5, routes)))
    await gw.start()
    try:
        await gw.wait_ready(30)
        shared = next(c for c in gw.connectors["mq"].channels if c.name == "mq/shared")
        # v2: s0 kept, s1 removed, s2 changed (new target), s3 kept, s4 added
        v2 = [shared_route(u, 0), shared_route(u, 2, out="out2"), shared_route(u, 3), shared_route(u, 4)]
        summary = await gw.reload(parse_config(config(mosquitto.port, u, 5, v2)))
        assert summary["routes_added"] == ["s4"] and summary["routes_removed"] == ["s1"], summary
        assert shared.reconnects == 0 and shared in gw.connectors["mq"].channels
        listener.publish_all([(f"sh/{u}/{i}/d", b"x", None) for i in range(5)], qos=0)
        want = sorted([f"out/{u}/0/d", f"out2/{u}/2/d", f"out/{u}/3/d", f"out/{u}/4/d"])
        await wait_until(lambda: len(topics(listener, "out")) >= 4, 20, "4 deliveries")
        assert sorted(topics(listener, "out")) == want
        assert gw.connectors["mq"]._shared_filters.keys() == {f"sh/{u}/{i}/+" for i in (0, 2, 3, 4)}

        conn = gw.connectors["mq"]
        cut = gw.routes["s3"]
        await conn.release_route(cut)
        listener.messages.clear()
        listener.publish_all([(f"sh/{u}/3/d", b"cut", None), (f"sh/{u}/0/d", b"on", None)], qos=0)
        await wait_until(lambda: len(topics(listener, "out")) >= 1, 20, "the uncut route")
        assert topics(listener, "out") == [f"out/{u}/0/d"] and cut.stats.received == 1
        await conn.resume_route(cut)
        listener.publish_all([(f"sh/{u}/3/d", b"back", None)], qos=0)
        await wait_until(lambda: f"out/{u}/3/d" in topics(listener, "out"), 20, "the resumed route")
        assert shared.reconnects == 0
    finally:
        await gw.stop()


async def test_a_cut_shared_route_changed_by_a_reload_is_subscribed_again(
    mosquitto: Mosquitto, unique: str, listener: MqttClient
) -> None:
    """The changed route is a new, running route: the cut of its predecessor must not keep its filter away."""
    u = unique
    gw = Gateway(parse_config(config(mosquitto.port, u, 5, [shared_route(u, 0), shared_route(u, 1)])))
    await gw.start()
    try:
        await gw.wait_ready(30)
        conn = gw.connectors["mq"]
        await conn.release_route(gw.routes["s1"])
        assert f"sh/{u}/1/+" not in conn._shared_filters
        changed = [shared_route(u, 0), {**shared_route(u, 1, out="out2"), "max_in_flight": 500}]
        await gw.reload(parse_config(config(mosquitto.port, u, 5, changed)))
        assert f"sh/{u}/1/+" in conn._shared_filters
        listener.publish_all([(f"sh/{u}/1/d", b"x", None)], qos=0)
        await wait_until(lambda: f"out2/{u}/1/d" in topics(listener, "out2"), 20, "the changed route")
    finally:
        await gw.stop()
