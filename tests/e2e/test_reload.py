"""Hot reload of a running gateway process, against Mosquitto and nats-server.

While sequence-numbered traffic flows on an unchanged route (MQTT QoS 1 →
NATS), the config file is rewritten to add a route, change one and remove
another, all on the same two connectors, and the gateway is told to reload
(SIGHUP through ``gateway reload --pid-file``). Asserted: the unchanged
route lost nothing and never reconnected (its MQTT session's channel and the
NATS connection keep ``reconnects == 0``, no second ``connector.connected``),
its counters went on (same route object); the changed route delivers to its
new subject, the added one works, the removed one is gone. Then an invalid
file (through ``gateway reload --url``, i.e. ``POST /reload``): rejected with
every problem, the running config untouched.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.support.brokers import Mosquitto, NatsServer
from tests.support.clients.mqtt import MqttCollector, MqttPublisher
from tests.support.clients.nats import NatsCollector, nats_connect
from tests.support.configs import gateway_config, mqtt_connector, nats_connector
from tests.support.gateway_process import GatewayProcess
from tests.support.messages import parse_payload
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.timeout(120)]

RATE = 400
"""Steady-route messages per second, before, during and after the reload."""
SECONDS = 6.0


def routes_v1(u: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "steady",
            "from": {"connector": "mq", "topic": f"rl/{u}/steady/{{dev}}", "qos": 1},
            "to": {"connector": "bus", "subject": f"rl.{u}.steady.{{dev}}"},
        },
        {
            "name": "old",
            "from": {"connector": "bus", "subject": f"rl.{u}.old.>"},
            "to": {"connector": "mq", "topic": f"rlout/{u}/old", "qos": 1},
        },
        {
            "name": "change",
            "from": {"connector": "mq", "topic": f"rl/{u}/chg/{{dev}}", "qos": 1},
            "to": {"connector": "bus", "subject": f"rl.{u}.chg.v1.{{dev}}"},
        },
    ]


def routes_v2(u: str) -> list[dict[str, Any]]:
    steady, _, change = routes_v1(u)
    return [
        steady,
        {**change, "to": {"connector": "bus", "subject": f"rl.{u}.chg.v2.{{dev}}"}},
        {
            "name": "added",
            "from": {"connector": "bus", "subject": f"rl.{u}.new.>"},
            "to": {"connector": "mq", "topic": f"rlout/{u}/new", "qos": 1},
        },
    ]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60, check=False
    )


async def test_reload_keeps_the_unchanged_route_flowing(
    gateways: Callable[..., GatewayProcess], mosquitto: Mosquitto, nats_server: NatsServer, tmp_path: Path, unique: str
) -> None:
    u = unique
    connectors = {"mq": mqtt_connector(mosquitto.url, f"gw-rl-{u}"), "bus": nats_connector(nats_server.url)}
    pid_file = tmp_path / "gateway.pid"
    gw = gateways(gateway_config(f"rl-{u}", connectors, routes_v1(u)), args=["--pid-file", str(pid_file)])
    await gw.astart()
    base = gw.http_url
    assert base is not None

    nc = await nats_connect(nats_server.url)
    steady = await NatsCollector().subscribe(nc, f"rl.{u}.steady.>")
    changed = await NatsCollector().subscribe(nc, f"rl.{u}.chg.>")
    outs = MqttCollector(mosquitto.port, f"col-rl-{u}", f"rlout/{u}/#").start()
    pub = MqttPublisher(mosquitto.port, f"pub-rl-{u}")
    pub.connect()
    stop = threading.Event()

    def publish_steady() -> None:
        t0 = time.monotonic()
        seq = 0
        while not stop.is_set() and time.monotonic() - t0 < SECONDS:
            pub.publish_seq(f"rl/{u}/steady/dev{seq % 4}", seq, 4)
            seq += 1
            ahead = t0 + seq / RATE - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)

    steady_pub = asyncio.ensure_future(asyncio.to_thread(publish_steady))
    try:
        # Before: the routes that will change or go work.
        pub.client.publish(f"rl/{u}/chg/a", b"before", qos=1)
        await nc.publish(f"rl.{u}.old.x", b"old-before")
        await wait_until(lambda: len(changed.messages) >= 1 and len(outs.messages) >= 1, 15, "v1 routes flow")
        assert changed.messages[0].where == f"rl.{u}.chg.v1.a"

        await asyncio.sleep(1.5)  # traffic on the steady route meanwhile
        gw.config_path.write_text(yaml.safe_dump(gateway_config(f"rl-{u}", connectors, routes_v2(u))))
        t_reload = time.monotonic()
        done = await asyncio.to_thread(cli, "reload", "--pid-file", str(pid_file))
        assert done.returncode == 0, done.stderr
        (event,) = await gw.await_event("gateway.reloaded", 30)
        reload_took = time.monotonic() - t_reload
        print(f"\nRELOAD: {event} in {reload_took:.2f} s")
        assert event["routes_kept"] == ["steady"]
        assert event["routes_changed"] == ["change"]
        assert event["routes_added"] == ["added"]
        assert event["routes_removed"] == ["old"]
        assert event["connectors_restarted"] == []

        # After: the changed route uses its new target, the added one works, the removed one is gone.
        n_out = len(outs.messages)
        pub.client.publish(f"rl/{u}/chg/b", b"after", qos=1)
        await nc.publish(f"rl.{u}.new.y", b"new-after")
        await nc.publish(f"rl.{u}.old.z", b"old-after")
        await wait_until(lambda: any(m.where == f"rl.{u}.chg.v2.b" for m in changed.messages), 15, "changed route")
        await wait_until(lambda: any(m.payload == b"new-after" for m in outs.messages[n_out:]), 15, "added route")
        await asyncio.sleep(0.5)
        assert not any(m.payload == b"old-after" for m in outs.messages), "the removed route still delivers"
        assert not any(m.where.startswith(f"rl.{u}.chg.v1.") and m.payload == b"after" for m in changed.messages)

        await steady_pub
        pub.wait_accepted(pub.published)
        accepted = set(pub.accepted)
        await wait_until(
            lambda: accepted <= {parse_payload(m.payload)[1] for m in steady.messages},
            20,
            lambda: f"{len(accepted - {parse_payload(m.payload)[1] for m in steady.messages})} steady messages missing",
        )
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/connz") as resp:
                connz = await resp.json()
            async with http.get(f"{base}/routez") as resp:
                routez = await resp.json()
            async with http.get(f"{base}/varz") as resp:
                varz = await resp.json()
        conns = {c["name"]: c for c in connz["connectors"]}
        channels = {ch["name"]: ch for ch in conns["mq"]["channels"]}
        steady_route = next(r for r in routez["routes"] if r["name"] == "steady")
        got = {parse_payload(m.payload)[1] for m in steady.messages}
        print(
            f"RELOAD: steady route: {len(accepted)} accepted, {len(got)} delivered, "
            f"{len(steady.messages) - len(got)} duplicates; counters {steady_route['received']} received; "
            f"mq channels {sorted(channels)}; reconnects mq/steady={channels['mq/steady']['reconnects']} "
            f"bus={conns['bus']['reconnects']}"
        )
        assert accepted <= got, "the unchanged route lost messages"
        assert channels["mq/steady"]["reconnects"] == 0 and conns["bus"]["reconnects"] == 0
        assert sorted(channels) == ["mq", "mq/change", "mq/steady"]  # the publisher and one session per source route
        assert steady_route["received"] >= len(accepted), "the steady route's counters were reset"
        steady_connects = gw.events("connector.connected", channel="mq/steady")
        assert len(steady_connects) == 1, steady_connects
        assert varz["config"]["reloads"] == 1

        # An invalid file: every problem reported, nothing changed.
        bad = gateway_config(
            f"rl-{u}",
            connectors,
            [
                *routes_v2(u),
                {"name": "broken", "from": {"connector": "nope", "topic": "x"}, "to": {"connector": "bus"}},
            ],
        )
        gw.config_path.write_text(yaml.safe_dump(bad))
        rejected = await asyncio.to_thread(cli, "reload", "--url", base)
        print(f"RELOAD invalid: exit {rejected.returncode}: {rejected.stderr.strip()[:300]}")
        assert rejected.returncode == 2
        answer = json.loads(rejected.stderr)
        assert answer["ok"] is False and len(answer["errors"]) == 2, answer  # every problem, not the first
        assert any("nope" in e for e in answer["errors"]) and any("subject" in e for e in answer["errors"]), answer
        await gw.await_event("gateway.reload_invalid")
        async with aiohttp.ClientSession() as http, http.get(f"{base}/varz") as resp:
            after = await resp.json()
        assert after["config"]["sha256"] == varz["config"]["sha256"] and after["config"]["reloads"] == 1
        assert gw.running
    finally:
        stop.set()
        await asyncio.gather(steady_pub, return_exceptions=True)
        pub.close()
        outs.close()
        await nc.close()
    await gw.astop()
