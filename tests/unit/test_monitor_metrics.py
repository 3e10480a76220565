"""/metrics, /routez and /varz of a gateway with 2 000 routes, built in process on memory connectors.

The exposition is written directly (gateway/metrics.py), a slice of routes at a time: it must parse with
prometheus-client's own parser, hold every series the README names, agree with /routez, and leave the
event loop running while it is built. Speed itself is measured by ``loadtests/monitor_scrape.py``.
"""

from __future__ import annotations

import asyncio
import gzip
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from connectors.memory.broker import MemoryBroker
from gateway.app import Gateway
from gateway.config import parse_config
from gateway.core.policies import RouteState
from gateway.core.stats import Latency
from gateway.ops.metrics import ROUTES_PER_CHUNK, exposition
from gateway.ops.monitor import Monitor, quantiles

N_ROUTES = 2_000
ACTIVE = range(0, N_ROUTES, 2)
"""Routes that get a message (the others stay idle)."""
ODD_NAME = 'we"ird\\name'


def config(unique: str) -> str:
    routes = [
        f"  - {{name: r{i}, from: {{connector: src, topic: 'r{i}/#'}}, to: {{connector: dst, topic: 'o{i}'}}}}"
        for i in range(N_ROUTES - 1)
    ]
    routes.append(
        "  - {name: 'we\"ird\\name', from: {connector: src, topic: 'odd/#'}, to: {connector: dst, topic: odd}}"
    )
    return (
        f"gateway: {{id: 'many-{unique}'}}\n"
        f"connectors:\n  src: {{type: memory, broker: in-{unique}}}\n  dst: {{type: memory, broker: out-{unique}}}\n"
        "routes:\n" + "\n".join(routes) + "\n"
    )


@pytest.fixture
async def many(unique: str) -> AsyncIterator[tuple[Gateway, Monitor]]:
    MemoryBroker.reset()
    gw = Gateway(parse_config(config(unique), environ={}))
    assert list(gw.routes)[-1] == ODD_NAME
    await gw.start()
    await gw.wait_ready(10)
    src = MemoryBroker.named(f"in-{unique}")
    for i in ACTIVE:
        src.publish(f"r{i}/x", b"m")
    src.publish("odd/x", b"m")
    async with asyncio.timeout(30):
        while len(src.acked) < len(ACTIVE) + 1:
            await asyncio.sleep(0.01)
    monitor = Monitor(gw, "127.0.0.1:0")
    await monitor.start()
    try:
        yield gw, monitor
    finally:
        await monitor.stop()
        assert await gw.stop(5)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


async def get(http: aiohttp.ClientSession, url: str, **headers: str) -> tuple[aiohttp.ClientResponse, bytes]:
    async with http.get(url, headers=headers, auto_decompress=False) as resp:
        return resp, await resp.read()


async def test_metrics_of_2000_routes_parse_and_hold_every_series(many: tuple[Gateway, Monitor]) -> None:
    gw, monitor = many
    base = f"http://127.0.0.1:{monitor.port}"
    async with aiohttp.ClientSession() as http:
        plain_resp, plain = await get(http, f"{base}/metrics", **{"Accept-Encoding": "identity"})
        zipped_resp, zipped = await get(http, f"{base}/metrics", **{"Accept-Encoding": "gzip, deflate"})
        async with http.get(f"{base}/routez") as resp:
            routez = {r["name"]: r for r in (await resp.json())["routes"]}
        async with http.get(f"{base}/varz") as resp:
            varz = await resp.json()
    assert plain_resp.status == zipped_resp.status == 200
    assert plain_resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "Content-Encoding" not in plain_resp.headers and zipped_resp.headers["Content-Encoding"] == "gzip"
    assert len(zipped) * 5 < len(plain)
    text = gzip.decompress(zipped).decode()
    m = samples(text)
    assert samples(plain.decode()).keys() == m.keys()
    print(f"\n{N_ROUTES} routes: /metrics {len(plain) / 1e6:.2f} MB, gzip {len(zipped) / 1e6:.2f} MB, {len(m)} series")

    assert len(routez) == N_ROUTES and varz["routes"] == N_ROUTES
    assert varz["totals"]["received"] == varz["totals"]["acked"] == len(ACTIVE) + 1
    active = {f"r{i}" for i in ACTIVE} | {ODD_NAME}
    for name, r in routez.items():
        lab = frozenset({("route", name)})
        for key in ("received", "sent", "acked", "failed", "dead_lettered", "retried", "filtered"):
            assert m[(f"gateway_route_{key}_total", lab)] == r[key], (name, key)
        for key in ("slow_consumer_disconnects", "resubmitted"):
            assert m[(f"gateway_route_{key}_total", lab)] == r[key] == 0
        for reason in ("overflow", "released"):
            assert m[("gateway_route_dropped_total", lab | {("reason", reason)})] == r[f"dropped_{reason}"]
        for key in ("in_flight", "in_flight_bytes", "max_in_flight", "max_in_flight_bytes"):
            assert m[(f"gateway_route_{key}", lab)] == r[key], (name, key)
        assert m[("gateway_route_oldest_in_flight_seconds", lab)] == 0
        for st in RouteState:
            assert m[("gateway_route_state", lab | {("state", st.value)})] == (st.value == r["state"])
        if name in active:
            assert r["acked"] == 1
            assert m[("gateway_route_latency_seconds_count", lab)] == 1
            assert m[("gateway_route_latency_seconds_bucket", lab | {("le", "+Inf")})] == 1
            assert m[("gateway_route_latency_seconds_sum", lab)] == pytest.approx(r["latency"]["sum_seconds"])
            buckets = [k for k in m if k[0] == "gateway_route_latency_seconds_bucket" and ("route", name) in k[1]]
            assert len(buckets) == len(Latency().buckets) + 1
        else:  # idle: no histogram until its first acknowledged message
            assert r["acked"] == 0 and ("gateway_route_latency_seconds_count", lab) not in m
    # The histogram's buckets keep the bounds they always had (series continue across the upgrade).
    assert ("gateway_route_latency_seconds_bucket", frozenset({("route", "r0"), ("le", "0.000262144")})) in m
    assert ("gateway_route_latency_seconds_bucket", frozenset({("route", "r0"), ("le", "34.359738368")})) in m

    info = [k for k in m if k[0] == "gateway_info"]
    assert len(info) == 1 and dict(info[0][1])["id"] == gw.config.gateway.id
    assert m[("gateway_ready", frozenset())] == 1 and m[("gateway_config_reloads_total", frozenset())] == 0
    for name, kind in (("src", "memory"), ("dst", "memory")):
        lab = frozenset({("connector", name), ("kind", kind)})
        assert m[("gateway_connector_up", lab)] == 1
        assert m[("gateway_connector_state", lab | {("state", "connected")})] == 1
        assert m[("gateway_connector_reconnects_total", lab)] == 0
        assert m[("gateway_connector_flapping", lab)] == 0
    assert ("gateway_sink_queue_depth", frozenset({("connector", "dst"), ("kind", "memory")})) in m
    assert m[("gateway_http_max_connections", frozenset())] == monitor.guard.limit
    assert m[("gateway_http_connections", frozenset())] >= 1
    assert m[("gateway_http_connections_closed_total", frozenset({("reason", "timeout")}))] == 0
    assert m[("process_open_fds", frozenset())] > 0


async def test_the_exposition_lets_the_loop_run_while_it_is_built(many: tuple[Gateway, Monitor]) -> None:
    gw, monitor = many
    chunks = list(exposition(gw))
    pauses = sum(1 for c in chunks if not c)
    assert pauses == -(-N_ROUTES // ROUTES_PER_CHUNK)  # one per slice of routes
    turns = 0
    done = False

    async def ticker() -> None:
        nonlocal turns
        while not done:
            await asyncio.sleep(0)
            turns += 1

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = turns
    await monitor.exposition()
    done = True
    await task
    assert turns > before, "the event loop did not run while 2 000 routes were written"


async def test_scrapes_at_the_same_time_share_one_rendering(many: tuple[Gateway, Monitor]) -> None:
    _, monitor = many
    first, second = await asyncio.gather(monitor.exposition(), monitor.exposition())
    assert first is second
    assert (await monitor.exposition()) is not first  # a later scrape renders anew


def test_label_values_are_escaped() -> None:
    from gateway.ops.metrics import escape

    assert escape('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    text = f'gateway_route_acked_total{{route="{escape(ODD_NAME)}"}} 1\n'
    [family] = text_string_to_metric_families(text)
    assert family.samples[0].labels == {"route": ODD_NAME}


@pytest.mark.parametrize("seed", range(20))
def test_quantiles_agree_with_the_latency_quantile(seed: int) -> None:
    rng = random.Random(seed)
    lat = Latency()
    for _ in range(rng.randrange(0, 200)):
        lat.observe_ns(int(rng.expovariate(1 / rng.choice([1e5, 1e7, 1e9, 1e11]))))
    expected: list[Any] = [lat.quantile(q) for q in (0.5, 0.9, 0.99)]
    assert quantiles(lat) == expected
