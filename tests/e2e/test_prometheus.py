"""A real Prometheus (the Debian package's server) scraping a gateway process under traffic, with the
SHIPPED alert rules loaded, read back through Prometheus' HTTP API.

The gateway runs three routes: ``flow`` (core NATS → core NATS, delivering), and ``orders`` (Kafka, on
Tansu) and ``events`` (a JetStream durable) whose target is an MQTT connector whose port has nothing
listening, so no message of theirs is ever confirmed: each fills its budget and what keeps arriving
stays at its broker. Prometheus scrapes every second and evaluates the rules every second. The rules
are ``deploy/prometheus/alerts.yaml`` with one change, in this test's copy only: every ``for:``
duration is rewritten to 2 s, so an alert can fire within the test's bounds (the expressions, windows
and thresholds are the shipped ones).

It checks that Prometheus returns the rate series of the flowing route, the consumer-lag series of the
Kafka and the JetStream route (and their values grow past the lag alert's floor), that the stalled
and lag-growth alerts fire for the held routes and not for the flowing one, and that every expression
of the dashboard (``deploy/grafana/gateway.json``) is accepted by Prometheus. A second test scrapes
the gateway itself and checks that every metric the dashboard and the rules name is in its exposition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.brokers import NatsServer, Prometheus, Tansu, free_port
from tests.support.clients.kafka import create_topics, kafka_producer
from tests.support.clients.nats import nats_connect
from tests.support.configs import gateway_config, kafka_connector, mqtt_connector, nats_connector
from tests.support.gateway_process import GatewayProcess
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.timeout(90)]

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "gateway.json"
BUDGET = 20
LAG_FLOOR = 1000
"""The shipped GatewayRouteLagGrowing threshold: the held routes must get past it."""
MADE_BY_PROMETHEUS = {"up", "ALERTS", "ALERTS_FOR_STATE"}
"""Series Prometheus makes itself; every other name in the dashboard and the rules is the gateway's."""
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    """Every query of the dashboard: panel targets, template variables, annotations."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dash["panels"] for t in panel["targets"]]
    exprs += [var["query"]["query"] for var in dash["templating"]["list"] if var["type"] == "query"]
    exprs += [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    return exprs


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Prometheus takes it: variables replaced, ``label_values(M, L)`` as ``M``."""
    expr = expr.replace("$__rate_interval", "5s").replace("$instance", ".*").replace("$route", ".*")
    m = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr)
    return m.group(1) if m else expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (strings, label matchers, ranges, grouping clauses and
    function names left out)."""
    expr = grafana_to_promql(expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)\s*(\()?", expr):
        if m.group(2) is None and m.group(1) not in _KEYWORDS:
            names.add(m.group(1))
    return names


def with_short_for(text: str, seconds: int = 2) -> str:
    """The shipped rules with every ``for:`` set to ``seconds`` (this test's copy only, see the docstring)."""
    shortened, n = re.subn(r"(?m)^(\s+for:) \S+$", rf"\1 {seconds}s", text)
    assert n >= 5, "the rules have for: durations"
    return shortened


async def query(prom: Prometheus, expr: str) -> list[dict[str, Any]]:
    data = await asyncio.to_thread(prom.api, "query", query=expr)
    assert isinstance(data, dict)
    result: list[dict[str, Any]] = data["result"]
    return result


async def firing(prom: Prometheus) -> set[tuple[str, str]]:
    data = await asyncio.to_thread(prom.api, "alerts")
    assert isinstance(data, dict)
    return {(a["labels"]["alertname"], a["labels"].get("route", "")) for a in data["alerts"] if a["state"] == "firing"}


def by_route(result: list[dict[str, Any]]) -> dict[str, float]:
    return {r["metric"].get("route", ""): float(r["value"][1]) for r in result}


@contextlib.contextmanager
def gateway_with_held_routes(
    gateways: Callable[..., GatewayProcess], nats_server: NatsServer, kafka_broker: Tansu, u: str
) -> Iterator[GatewayProcess]:
    nowhere = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens: the held routes' target never confirms
    held = {"connector": "held", "topic": f"held/{u}", "qos": 1}
    config = gateway_config(
        f"prom-{u}",
        {
            "bus": nats_connector(nats_server.url),
            "kafka": kafka_connector(kafka_broker.bootstrap),
            "held": mqtt_connector(nowhere, f"prom-{u}"),
        },
        [
            {
                "name": "flow",
                "from": {"connector": "bus", "subject": f"p.{u}.in"},
                "to": {"connector": "bus", "subject": f"p.{u}.out"},
            },
            {
                "name": "orders",
                "from": {"connector": "kafka", "topic": f"orders-{u}", "group": f"g-{u}"},
                "to": held,
                "max_in_flight": BUDGET,
            },
            {
                "name": "events",
                "from": {"connector": "bus", "stream": f"EV_{u}", "subject": f"ev.{u}.>", "durable": f"gw_{u}"},
                "to": held,
                "max_in_flight": BUDGET,
            },
        ],
    )
    config["gateway"]["shutdown_timeout"] = 1  # the held messages can never drain: stop soon (exit code 1)
    yield gateways(config)


async def produce(kafka_broker: Tansu, nats_server: NatsServer, u: str, stop: asyncio.Event) -> None:
    """Until ``stop``: 300 Kafka records, 300 JetStream messages and 50 core NATS messages every 0.2 s."""
    producer = await kafka_producer(kafka_broker.bootstrap, enable_idempotence=False)
    nc = await nats_connect(nats_server.url)
    js = nc.jetstream()
    try:
        while not stop.is_set():
            futs = [await producer.send(f"orders-{u}", b"%d" % i, key=b"k%d" % (i % 7)) for i in range(300)]
            acks = [await js.publish_async(f"ev.{u}.d{i % 3}", b"%d" % i) for i in range(300)]
            for i in range(50):
                await nc.publish(f"p.{u}.in", b"%d" % i)
            await asyncio.gather(*futs, *acks)
            await nc.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
    finally:
        await producer.stop()
        await nc.close()


async def start_held_gateway(gw: GatewayProcess, kafka_broker: Tansu, nats_server: NatsServer, u: str) -> str:
    await create_topics(kafka_broker.bootstrap, [f"orders-{u}"], 2)
    nc = await nats_connect(nats_server.url)
    try:
        await nc.jetstream().add_stream(name=f"EV_{u}", subjects=[f"ev.{u}.>"])
    finally:
        await nc.close()
    await gw.astart(wait_for=["bus", "kafka"])
    base = gw.http_url
    assert base is not None, gw.log_tail()
    return base


async def test_prometheus_sees_rates_lag_and_fires_the_shipped_alerts(
    gateways: Callable[..., GatewayProcess],
    prometheus: Prometheus,
    nats_server: NatsServer,
    kafka_broker: Tansu,
    unique: str,
) -> None:
    u = unique
    with gateway_with_held_routes(gateways, nats_server, kafka_broker, u) as gw:
        base = await start_held_gateway(gw, kafka_broker, nats_server, u)
        await asyncio.to_thread(prometheus.load_rules, {"alerts.yaml": with_short_for(RULES.read_text())})
        prometheus.scrape(base.removeprefix("http://"))
        stop = asyncio.Event()
        traffic = asyncio.create_task(produce(kafka_broker, nats_server, u, stop))
        lags: list[dict[str, float]] = []
        try:
            await wait_until(lambda: query(prometheus, 'up{job="gateway"} == 1'), 20, "Prometheus scrapes the gateway")

            async def lag_past_floor() -> bool:
                lag = by_route(await query(prometheus, "gateway_route_lag_messages"))
                lags.append(lag)
                return lag.get("orders", 0) > LAG_FLOOR and lag.get("events", 0) > LAG_FLOOR

            await wait_until(lag_past_floor, 40, lambda: f"lag past {LAG_FLOOR} on both held routes: {lags[-3:]}")

            rates: list[tuple[dict[str, float], dict[str, float]]] = []

            async def flow_has_rates() -> bool:  # two scrapes of it within the window: the held routes may be first
                rate_in = by_route(await query(prometheus, "rate(gateway_route_received_total[5s])"))
                rate_out = by_route(await query(prometheus, "rate(gateway_route_acked_total[5s])"))
                rates.append((rate_in, rate_out))
                return rate_in.get("flow", 0) > 0 and rate_out.get("flow", 0) > 0

            await wait_until(flow_has_rates, 20, lambda: f"rates of the flowing route: {rates[-2:]}")
            rate_out = rates[-1][1]
            assert rate_out["orders"] == rate_out["events"] == 0, rate_out
            in_flight = by_route(await query(prometheus, "gateway_route_in_flight"))
            assert in_flight["orders"] == in_flight["events"] == BUDGET, in_flight

            wanted = {("GatewayRouteStalled", "orders"), ("GatewayRouteStalled", "events")}
            seen: set[tuple[str, str]] = set()

            async def alerts_fire() -> bool:
                nonlocal seen
                seen = await firing(prometheus)
                return wanted <= seen and any(name == "GatewayRouteLagGrowing" for name, _ in seen)

            await wait_until(alerts_fire, 25, lambda: f"stalled and lag-growth alerts firing; firing: {sorted(seen)}")
            assert not {alert for alert in seen if alert[1] == "flow"}, f"the flowing route is healthy: {sorted(seen)}"
            print(f"lag series as Prometheus returned them (route: messages), in order: {lags}")
            print(f"firing: {sorted(seen)}")

            for expr in dashboard_exprs():
                await query(prometheus, grafana_to_promql(expr))  # raises with Prometheus' error if refused
        finally:
            stop.set()
            await traffic
        await gw.astop(expect_rc=1)  # a drain that timed out: the held routes' messages were never confirmed


async def test_every_metric_of_the_dashboard_and_the_rules_is_exported(
    gateways: Callable[..., GatewayProcess], nats_server: NatsServer, kafka_broker: Tansu, unique: str
) -> None:
    u = unique
    with gateway_with_held_routes(gateways, nats_server, kafka_broker, u) as gw:
        base = await start_held_gateway(gw, kafka_broker, nats_server, u)
        used = set().union(*(metric_names(e) for e in rule_exprs() + dashboard_exprs()))
        assert {"gateway_route_message_age_seconds_bucket", "process_resident_memory_bytes"} <= used
        stop = asyncio.Event()
        traffic = asyncio.create_task(produce(kafka_broker, nats_server, u, stop))
        missing: list[str] = []
        try:
            async with aiohttp.ClientSession() as http:

                async def everything_exported() -> bool:
                    # lag is measured every few seconds, latency appears once flow acknowledged a message,
                    # message age once a Kafka/JetStream route admitted one: wait for all of them
                    nonlocal missing
                    async with http.get(base + "/metrics") as resp:
                        text = await resp.text()
                    samples = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
                    missing = sorted(used - samples - MADE_BY_PROMETHEUS)
                    return not missing

                await wait_until(
                    everything_exported, 30, lambda: f"named by deploy/ but not exported by the gateway: {missing}"
                )
        finally:
            stop.set()
            await traffic
        await gw.astop(expect_rc=1)  # a drain that timed out: the held routes' messages were never confirmed
