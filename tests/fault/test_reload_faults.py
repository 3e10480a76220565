"""Reload and shutdown under faults (issue 20, findings 5 and 7).

**Reload while a broker is down.** nats-server is stopped; the config changes
a core NATS → MQTT route (its budget) and adds another one on the same NATS
connector; ``POST /reload``. The answer is a clean 200 JSON (no 500, no
traceback in the log) that says which routes changed and that ``bus`` is not
connected yet, and ``/varz`` counts the reload. When nats-server is back, both
routes deliver ``N`` of ``N`` without a second reload, and the changed route's
counters went on from before the reload.

**Shutdown with many routes.** ``ROUTES`` MQTT source routes (one MQTT
session each) into NATS, ``shutdown_timeout: 5``. SIGTERM with the brokers
healthy, and SIGTERM while nats-server is frozen (SIGSTOP) with messages in
flight towards it: the drain gives up after ``shutdown_timeout``, the close
after ``gateway.app.CLOSE_TIMEOUT``, and the process exits within both plus
``SLACK`` seconds (exit 0 when drained, 1 when the drain timed out).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.app import CLOSE_TIMEOUT
from tests.support.brokers import BrokerProcess, Mosquitto, NatsServer
from tests.support.clients.mqtt import MqttCollector, MqttPublisher
from tests.support.clients.nats import NatsCollector, nats_connect, wait_nats_subscription
from tests.support.configs import gateway_config, mqtt_connector, nats_connector
from tests.support.gateway_process import GatewayProcess, routez
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.fault, pytest.mark.timeout(120)]

N = 5
ROUTES = 2000
SHUTDOWN_TIMEOUT = 5
SLACK = 3.0
"""Seconds allowed beyond the drain and close bounds (signal handling, the monitor, process exit)."""


def nats_to_mqtt(u: str, name: str, prefix: str, budget: int) -> dict[str, Any]:
    return {
        "name": name,
        "from": {"connector": "bus", "subject": f"{prefix}.{u}.>"},
        "to": {"connector": "mq", "topic": f"{prefix}out/{u}/{{>}}", "qos": 1},
        "max_in_flight": budget,
    }


async def test_a_reload_while_nats_is_down_applies_and_flows_when_it_returns(
    gateways: Callable[..., GatewayProcess], mosquitto: Mosquitto, tmp_path: Path, unique: str
) -> None:
    u = unique
    with NatsServer(workdir=tmp_path / "nats", jetstream=False) as nats_server:
        connectors = {"mq": mqtt_connector(mosquitto.url, f"gw-rf-{u}"), "bus": nats_connector(nats_server.url)}
        v1 = [nats_to_mqtt(u, "cmd", "rf", 100)]
        v2 = [nats_to_mqtt(u, "cmd", "rf", 200), nats_to_mqtt(u, "added", "rfa", 100)]
        gw = gateways(gateway_config(f"rf-{u}", connectors, v1))
        await gw.astart()
        base = gw.http_url
        assert base is not None
        out = MqttCollector(mosquitto.port, f"col-rf-{u}", f"+/{u}/#").start()
        try:
            nc = await nats_connect(nats_server.url)
            await nc.publish(f"rf.{u}.before", b"before")
            await nc.flush()
            await wait_until(lambda: len(out.messages) == 1, 15, "the route flows before the reload")
            await nc.close()

            BrokerProcess.stop(nats_server, timeout=10)
            await gw.await_event("connector.disconnected", 15, connector="bus")
            gw.config_path.write_text(yaml.safe_dump(gateway_config(f"rf-{u}", connectors, v2)))
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{base}/reload") as resp:
                    status, text = resp.status, await resp.text()
                async with http.get(f"{base}/varz") as resp:
                    varz = await resp.json()
            print(f"\nRELOAD WHILE NATS IS DOWN: {status} {text}")
            assert status == 200, text
            answer = json.loads(text)
            assert answer["ok"] is True and answer["routes_changed"] == ["cmd"], answer
            assert answer["routes_added"] == ["added"] and answer["connectors_down"] == ["bus"], answer
            assert answer["connectors_failed"] == [], answer
            assert varz["config"]["reloads"] == 1
            assert not gw.problems(), gw.problems()[:5]

            await asyncio.to_thread(nats_server.start, 30)
            await gw.await_event("connector.connected", 30, connector="bus", count=2)
            for subject in (f"rf.{u}.>", f"rfa.{u}.>"):
                await wait_nats_subscription(nats_server.monitor_url, subject)
            nc = await nats_connect(nats_server.url)
            for i in range(N):
                await nc.publish(f"rf.{u}.after", f"changed-{i}".encode())
                await nc.publish(f"rfa.{u}.after", f"added-{i}".encode())
            await nc.flush()
            await nc.close()
            await wait_until(
                lambda: len(out.messages) >= 1 + 2 * N, 15, lambda: f"{len(out.messages) - 1} of {2 * N} delivered"
            )
            routes = await routez(base)
            async with aiohttp.ClientSession() as http, http.get(f"{base}/varz") as resp:
                varz = await resp.json()
        finally:
            out.close()
    payloads = sorted(m.payload for m in out.messages)
    assert payloads == sorted(
        [b"before", *(f"changed-{i}".encode() for i in range(N))] + [f"added-{i}".encode() for i in range(N)]
    )
    cmd = routes["cmd"]
    print(f"RELOAD WHILE NATS IS DOWN: after the return, cmd {cmd['state']} received {cmd['received']}")
    assert cmd["state"] == "running" and cmd["max_in_flight"] == 200
    assert cmd["received"] == cmd["acked"] == 1 + N, "the changed route's counters did not go on"
    assert routes["added"]["acked"] == N
    assert varz["config"]["reloads"] == 1, "it took a second reload"
    assert not gw.problems(), gw.problems()[:5]
    await gw.astop()


async def test_a_reload_while_the_target_is_down_gives_what_it_held_to_the_changed_route(
    gateways: Callable[..., GatewayProcess], mosquitto: Mosquitto, tmp_path: Path, unique: str
) -> None:
    """MQTT QoS 1 → NATS, the MQTT connector's only source route (no sink: one channel), changed while
    nats-server is down with ``HELD`` messages in flight: the drain gives up after ``shutdown_timeout``, what
    the route held is released (counted, not acknowledged), and Mosquitto redelivers it to the changed route,
    which reads the same session, once NATS is back."""
    u = unique
    held = 20
    with NatsServer(workdir=tmp_path / "nats", jetstream=False) as nats_server:
        connectors = {"mq": mqtt_connector(mosquitto.url, f"gw-rt-{u}"), "bus": nats_connector(nats_server.url)}

        def config(budget: int) -> dict[str, Any]:
            route = {
                "name": "up",
                "from": {"connector": "mq", "topic": f"rt/{u}/#", "qos": 1},
                "to": {"connector": "bus", "subject": f"rt.{u}.{{#}}"},
                "max_in_flight": budget,
            }
            c = gateway_config(f"rt-{u}", connectors, [route])
            c["gateway"]["shutdown_timeout"] = 2
            return c

        gw = gateways(config(100))
        await gw.astart()
        base = gw.http_url
        assert base is not None
        pub = MqttPublisher(mosquitto.port, f"pub-rt-{u}")
        pub.connect()
        try:
            BrokerProcess.stop(nats_server, timeout=10)
            await gw.await_event("connector.disconnected", 15, connector="bus")
            for i in range(held):
                pub.publish_seq(f"rt/{u}/d", i, 1)
            pub.wait_accepted(held)
            await wait_until(lambda: _in_flight(gw) == held, 15, "the route holds what it received")
            gw.config_path.write_text(yaml.safe_dump(config(200)))
            async with aiohttp.ClientSession() as http, http.post(f"{base}/reload") as resp:
                status, answer = resp.status, await resp.json()
            print(f"\nRELOAD WHILE THE TARGET IS DOWN: {status} {answer}")
            assert status == 200 and answer["routes_changed"] == ["up"], answer
            assert answer["connectors_down"] == ["bus"] and answer["connectors_failed"] == [], answer

            await asyncio.to_thread(nats_server.start, 30)
            nc = await nats_connect(nats_server.url)
            collector = await NatsCollector().subscribe(nc, f"rt.{u}.>")
            await wait_until(
                lambda: {m.seq for m in collector.messages} >= set(range(held)),
                30,
                lambda: f"{len({m.seq for m in collector.messages})} of {held} redelivered",
            )
            await nc.close()
            route = (await routez(base))["up"]
        finally:
            pub.close()
    print(f"RELOAD WHILE THE TARGET IS DOWN: after the return {route}")
    assert route["state"] == "running" and route["max_in_flight"] == 200
    assert route["dropped"] == held, "what the old route held is counted as released"
    assert route["received"] == 2 * held and route["acked"] == held, route
    assert not gw.problems(), gw.problems()[:5]
    await gw.astop()


@pytest.mark.parametrize("nats_frozen", [False, True], ids=["healthy", "sink-frozen"])
async def test_sigterm_with_thousands_of_routes_exits_within_the_shutdown_timeout(
    gateways: Callable[..., GatewayProcess], mosquitto: Mosquitto, tmp_path: Path, unique: str, nats_frozen: bool
) -> None:
    u = unique
    with NatsServer(workdir=tmp_path / "nats", jetstream=False) as nats_server:
        connectors = {
            "mq": mqtt_connector(mosquitto.url, f"gw-sd-{u}", connect_timeout=30),
            "bus": nats_connector(nats_server.url),
        }
        routes = [
            {
                "name": f"r{i}",
                "from": {"connector": "mq", "topic": f"sd/{u}/{i}", "qos": 1},
                "to": {"connector": "bus", "subject": f"sd.{u}.{i}"},
            }
            for i in range(ROUTES)
        ]
        config = gateway_config(f"sd-{u}", connectors, routes)
        config["gateway"]["shutdown_timeout"] = SHUTDOWN_TIMEOUT
        gw = gateways(config)
        t0 = time.monotonic()
        gw.spawn()
        await gw.await_until(
            lambda: len(gw.events("connector.connected", connector="mq")) >= ROUTES and gw.http_url is not None,
            90,
            f"{ROUTES} route sessions connected",
        )
        started = time.monotonic() - t0
        pub = MqttPublisher(mosquitto.port, f"pub-sd-{u}")
        pub.connect()
        try:
            for i in range(200):
                pub.publish_seq(f"sd/{u}/{i % 50}", i, 1)
            pub.wait_accepted(200)
            await wait_until(lambda: _acked(gw) >= 200, 30, "the routes deliver")
            if nats_frozen:
                assert nats_server.pid is not None
                os.kill(nats_server.pid, signal.SIGSTOP)
                for i in range(200, 400):
                    pub.publish_seq(f"sd/{u}/{i % 50}", i, 1)
                pub.wait_accepted(400)
            t1 = time.monotonic()
            rc = await gw.astop(60, expect_rc=None)
            took = time.monotonic() - t1
        finally:
            if nats_frozen and nats_server.pid is not None:
                os.kill(nats_server.pid, signal.SIGCONT)
            pub.close()
    bound = SHUTDOWN_TIMEOUT + CLOSE_TIMEOUT + SLACK
    print(
        f"\nSHUTDOWN {ROUTES} routes ({'NATS frozen' if nats_frozen else 'healthy'}): started in {started:.1f} s; "
        f"SIGTERM -> exit {rc} in {took:.1f} s (bound {bound:g} s); drain_timeout "
        f"{len(gw.events('gateway.drain_timeout'))}, close_timeout {len(gw.events('gateway.close_timeout'))}"
    )
    assert took <= bound, f"SIGTERM took {took:.1f} s with shutdown_timeout {SHUTDOWN_TIMEOUT}"
    assert rc == (1 if nats_frozen else 0), gw.log_tail()
    if not nats_frozen:
        assert took <= SLACK, "a healthy shutdown waited for nothing"


def _totals(gw: GatewayProcess) -> dict[str, int]:
    """Counters over every route, from /varz (synchronous: called from wait_until's checks)."""
    assert gw.http_url is not None
    with urllib.request.urlopen(gw.http_url + "/varz", timeout=5) as resp:
        totals: dict[str, int] = json.load(resp)["totals"]
    return totals


def _acked(gw: GatewayProcess) -> int:
    return _totals(gw)["acked"]


def _in_flight(gw: GatewayProcess) -> int:
    return _totals(gw)["in_flight"]
