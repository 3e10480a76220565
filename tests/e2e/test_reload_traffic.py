"""Many reloads of a changed core-NATS route under steady traffic lose nothing (issue 20, finding 6).

A core NATS → MQTT QoS 1 route carries ``RATE`` sequence-numbered messages per
second while its config flips between two budgets, so that every reload
*changes* the route: first ``SIGHUPS`` SIGHUPs a tenth of a second apart, then
``POST /reload`` back to back for ``POST_SECONDS``. Core NATS is at-most-once,
so a message the gateway misses is gone: the subscription must survive the
reload (the changed route takes it over, with what the client buffered while
the old route drained), and whatever is dropped must be counted.

Asserted: every published message reached the MQTT collector (published =
delivered, "lost uncounted" = 0), the route's counters went on across the
reloads (``received`` = everything published, nothing dropped or failed, the
invariant ``received = acked + failed + dropped + filtered + in_flight`` on the
final ``/routez``), and ``/varz`` counts every reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.support.brokers import Mosquitto, NatsServer
from tests.support.clients.mqtt import MqttCollector
from tests.support.clients.nats import nats_connect
from tests.support.configs import gateway_config, mqtt_connector, nats_connector
from tests.support.gateway_process import GatewayProcess, routez
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.timeout(120)]

RATE = 300
"""Messages per second on the changed route, all along."""
SIGHUPS = 30
POST_SECONDS = 3.0


def config(u: str, connectors: dict[str, Any], budget: int) -> dict[str, Any]:
    route = {
        "name": "cmd",
        "from": {"connector": "bus", "subject": f"rt.{u}.>"},
        "to": {"connector": "mq", "topic": f"rtout/{u}/{{>}}", "qos": 1},
        "max_in_flight": budget,
    }
    return gateway_config(f"rt-{u}", connectors, [route])


async def test_a_changed_core_nats_route_loses_nothing_over_many_reloads(
    gateways: Callable[..., GatewayProcess], mosquitto: Mosquitto, nats_server: NatsServer, unique: str
) -> None:
    u = unique
    connectors = {"mq": mqtt_connector(mosquitto.url, f"gw-rt-{u}"), "bus": nats_connector(nats_server.url)}
    versions = [yaml.safe_dump(config(u, connectors, budget)) for budget in (100, 200)]
    gw = gateways(config(u, connectors, 100))
    await gw.astart()
    base = gw.http_url
    assert base is not None and gw.pid is not None
    pid = gw.pid
    out = MqttCollector(mosquitto.port, f"col-rt-{u}", f"rtout/{u}/#").start()
    nc = await nats_connect(nats_server.url)
    published = 0
    stop = asyncio.Event()

    async def publish() -> None:
        nonlocal published
        t0 = time.monotonic()
        while not stop.is_set():
            await nc.publish(f"rt.{u}.d{published % 4}", str(published).encode())
            published += 1
            ahead = t0 + published / RATE - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)

    reloads = 0

    def flip() -> None:
        nonlocal reloads
        reloads += 1
        Path(gw.config_path).write_text(versions[reloads % 2])

    publisher = asyncio.ensure_future(publish())
    try:
        await wait_until(lambda: len(out.messages) >= 10, 15, "the route flows")
        for _ in range(SIGHUPS):
            flip()
            os.kill(pid, signal.SIGHUP)
            await asyncio.sleep(0.1)
        await gw.await_event("gateway.reloaded", 30, count=SIGHUPS)
        answers: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as http:
            t0 = time.monotonic()
            while time.monotonic() - t0 < POST_SECONDS:
                flip()
                async with http.post(f"{base}/reload") as resp:
                    assert resp.status == 200, await resp.text()
                    answers.append(await resp.json())
        await asyncio.sleep(0.5)  # traffic after the last reload too
    finally:
        stop.set()
        await publisher
    await nc.flush()
    with contextlib.suppress(AssertionError):  # reported below, with the figures
        await wait_until(lambda: len({m.payload for m in out.messages}) >= published, 20, "every message delivered")
    got = {int(m.payload) for m in out.messages}
    route = (await routez(base))["cmd"]
    async with aiohttp.ClientSession() as http, http.get(f"{base}/varz") as resp:
        varz = await resp.json()
    changed = [e for e in gw.events("gateway.reloaded") if e.get("routes_changed") == ["cmd"]]
    lost = published - len(got & set(range(published)))
    counted = route["dropped"] + route["failed"]
    print(
        f"\nRELOAD TRAFFIC: {reloads} reloads ({SIGHUPS} SIGHUP + {len(answers)} POST), {len(changed)} changed the "
        f"route; published {published}, delivered {len(got)} ({len(out.messages) - len(got)} duplicates), "
        f"lost {lost}, counted drops {counted}, lost uncounted {lost - counted}; route received {route['received']} "
        f"acked {route['acked']} in_flight {route['in_flight']}"
    )
    assert lost - counted <= 0, "messages lost without being counted"
    assert lost == 0, "a reload lost messages of the changed route"
    assert len(changed) >= reloads // 2, "the reloads did not change the route"
    assert all(a["routes_changed"] == ["cmd"] or a["routes_kept"] == ["cmd"] for a in answers), answers[:3]
    assert varz["config"]["reloads"] == reloads
    assert route["received"] == published, "the route's counters did not go on across the reloads"
    assert route["received"] == (
        route["acked"] + route["failed"] + route["dropped"] + route["filtered"] + route["in_flight"]
    ), route
    assert route["dropped"] == 0 and route["failed"] == 0, route
    assert not gw.problems(), gw.problems()[:5]
    out.close()
    await nc.close()
    await gw.astop()
