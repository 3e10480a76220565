"""Gateway.reload over in-memory brokers: what is kept, restarted, added and removed.

Memory connectors cannot change their source routes live (MQTT and NATS can: see
tests/e2e/test_reload.py), so they also exercise the restart path.
"""

from __future__ import annotations

import pytest

from connectors.memory.broker import MemoryBroker
from gateway.app import Gateway
from gateway.config import Config
from gateway.config.loader import parse_config
from tests.support.harness import memory_config, until

BROKERS = ("A", "B", "C", "D")
R1 = """\
  - name: r1
    from: {connector: a, topic: "dev/#"}
    to: {connector: b, topic: "out/{#}"}
"""
R2 = """\
  - name: r2
    from: {connector: d, topic: "x/#"}
    to: {connector: b, topic: "x/{#}"}
"""
R3 = """\
  - name: r3
    from: {connector: a, topic: "cmd/#"}
    to: {connector: c, topic: "cmd/{#}"}
"""


def config(routes: str) -> Config:
    return parse_config(memory_config(routes, BROKERS), environ={})


async def test_a_route_on_untouched_connectors_keeps_running() -> None:
    gw = Gateway(config(R1))
    await gw.start()
    try:
        await gw.wait_ready(5)
        a, b, d = MemoryBroker.named("A"), MemoryBroker.named("B"), MemoryBroker.named("D")
        a.publish("dev/1", b"before")
        await until(lambda: len(b.received) == 1)
        r1, conn_a, conn_b = gw.routes["r1"], gw.connectors["a"], gw.connectors["b"]

        summary = await gw.reload(config(R1 + R2))

        assert summary["routes_kept"] == ["r1"] and summary["routes_added"] == ["r2"]
        assert summary["connectors_restarted"] == [] and summary["routes_restarted"] == []
        assert gw.routes["r1"] is r1 and gw.connectors["a"] is conn_a and gw.connectors["b"] is conn_b
        assert conn_a.reconnects == 0 and conn_b.reconnects == 0
        a.publish("dev/2", b"after")
        d.publish("x/9", b"new route")
        await until(lambda: len(b.received) == 3)
        assert sorted(r.topic for r in b.received) == ["out/1", "out/2", "x/9"]
        assert r1.stats.received == 2, "the kept route's counters go on"
        assert gw.reloads == 1
    finally:
        await gw.stop(5)


async def test_a_connector_that_cannot_change_its_routes_live_restarts_with_them() -> None:
    gw = Gateway(config(R1 + R2))
    await gw.start()
    try:
        await gw.wait_ready(5)
        r2 = gw.routes["r2"]
        old_a = gw.connectors["a"]

        summary = await gw.reload(config(R1 + R3))  # r2 goes, r3 reads from a: a restarts, and r1 with it

        assert summary["routes_removed"] == ["r2"] and summary["routes_added"] == ["r3"]
        assert summary["connectors_restarted"] == ["a"] and summary["routes_restarted"] == ["r1"]
        assert summary["connectors_stopped"] == ["d"], "d has no route left"
        assert gw.connectors["a"] is not old_a and "r2" not in gw.routes
        assert r2.state.value == "stopped"
        await gw.wait_ready(5)
        MemoryBroker.named("A").publish("cmd/reboot", b"go")
        await until(lambda: [r.topic for r in MemoryBroker.named("C").received] == ["cmd/reboot"])
        MemoryBroker.named("D").publish("x/1", b"nobody reads D now")
        assert not [r for r in MemoryBroker.named("B").received if r.topic.startswith("x/")]
    finally:
        await gw.stop(5)


async def test_reload_refuses_a_stopped_gateway() -> None:
    gw = Gateway(config(R1))
    with pytest.raises(RuntimeError, match="new"):
        await gw.reload(config(R1))


async def test_a_running_connector_that_becomes_a_target_restarts_with_a_sink() -> None:
    r4 = """\
  - name: r4
    from: {connector: d, topic: "back/#"}
    to: {connector: a, topic: "back/{#}"}
"""
    gw = Gateway(config(R1))
    await gw.start()
    try:
        await gw.wait_ready(5)
        assert not gw.connectors["a"].has_sink

        summary = await gw.reload(config(R1 + r4))

        assert summary["connectors_restarted"] == ["a"] and summary["routes_restarted"] == ["r1"]
        assert summary["connectors_added"] == [] and summary["routes_added"] == ["r4"]
        await gw.wait_ready(5)
        MemoryBroker.named("D").publish("back/1", b"to a")
        await until(lambda: [r.topic for r in MemoryBroker.named("A").received] == ["back/1"])
    finally:
        await gw.stop(5)
