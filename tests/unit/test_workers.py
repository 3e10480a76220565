"""Several workers: the split planned at load, each worker's config, key-affine sharding in the dispatcher,
and the merged Prometheus exposition of the supervisor (the processes themselves: tests/e2e/test_workers.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import parse_config
from gateway.config.workers import for_worker, plan
from gateway.core.envelope import Envelope
from gateway.core.shard import Shard, shard_of
from gateway.errors import ConfigError
from gateway.ops.fleet import merge_expositions
from gateway.routing.patterns import MQTT, compile_pattern
from gateway.routing.templates import compile_template
from gateway.workers import check
from tests.support.harness import dispatcher_for, envelope

CONNECTORS = """\
gateway: {id: edge}
connectors:
  mq: {type: mqtt, client_id: edge-mq}
  bus: {type: nats, name: edge-bus}
  kafka: {type: kafka, bootstrap_servers: ["127.0.0.1:9092"]}
routes:
"""

ROUTES = """\
  - name: k
    from: {connector: kafka, topic: t}
    to: {connector: bus, subject: a}
  - name: m
    from: {connector: mq, topic: "d/{device}"}
    to: {connector: bus, subject: "b.{device}"}
    shard_by: "{device}"
  - name: n
    from: {connector: bus, subject: "x.>"}
    to: {connector: mq, topic: y}
  - name: j
    from: {connector: bus, stream: S, subject: "s.>"}
    to: {connector: kafka, topic: z}
    order: none
  - name: js
    from: {connector: bus, stream: S, subject: "t.{device}"}
    to: {connector: kafka, topic: z2}
    shard_by: "{device}"
  - name: shared
    from: {connector: mq, topic: "e/#"}
    to: {connector: kafka, topic: e}
    order: none
    spool: {path: /tmp/spool-e}
"""


def test_plan_says_how_each_route_splits() -> None:
    config = parse_config(CONNECTORS + ROUTES, environ={})
    modes = {s.route: s.mode for s in plan(config, 2)}
    assert modes == {"k": "partitions", "m": "sharded", "n": "one", "j": "broker", "js": "sharded", "shared": "broker"}
    assert {s.mode for s in plan(config, 1)} == {"partitions", "one"}  # one worker: nothing is split


def test_each_worker_gets_its_own_names_and_its_share_of_the_routes() -> None:
    config = parse_config(CONNECTORS + ROUTES, environ={}, worker=1)
    assert config.gateway.id == "edge-w1"  # what derives from the id (default client ids, reply inboxes) follows
    w1 = for_worker(config, 1, 2, http_token="t" * 24)
    assert w1.worker == (1, 2)
    assert w1.connectors["mq"].client_id == "edge-mq-w1"
    assert w1.connectors["bus"].name == "edge-bus-w1"
    assert w1.connectors["kafka"].client_id == ""  # the default derives from the worker's id
    routes = {rc.name: rc for rc in w1.routes}
    assert "n" not in routes  # worker 0 only
    assert routes["shared"].source.share_group == "gateway.shared"
    assert routes["shared"].section.spool is not None and routes["shared"].section.spool.path == "/tmp/spool-e-w1"
    assert routes["js"].source.durable == "gateway-js-w1"  # its own durable: every worker reads the whole stream
    assert routes["j"].source.durable is None  # the shared durable (gateway-j)
    assert routes["m"].source.share_group is None and routes["m"].shard_key is not None
    assert w1.gateway.http.listen == "127.0.0.1:0" and w1.gateway.http.token == "t" * 24
    w0 = for_worker(parse_config(CONNECTORS + ROUTES, environ={}, worker=0), 0, 2, http_token="t" * 24)
    assert "n" in {rc.name for rc in w0.routes}


@pytest.mark.parametrize(
    ("route", "problem"),
    [
        (
            "  - {name: q, from: {connector: bus, subject: q.x, queue: g}, to: {connector: mq, topic: y}}\n",
            "routes[0].from: the broker splits this source round-robin among the 2 workers (NATS queue group g)",
        ),
        (
            "  - {name: q, from: {connector: mq, topic: q/x, retained_only: true}, to: {connector: bus, subject: y},"
            " order: none}\n",
            "routes[0].order: this source cannot be split by its broker (retained_only)",
        ),
    ],
)
def test_a_split_that_would_lose_order_or_cannot_happen_is_refused(route: str, problem: str) -> None:
    config = parse_config(CONNECTORS + route, environ={})
    with pytest.raises(ConfigError) as err:
        plan(config, 2)
    assert problem in str(err.value)


@pytest.mark.parametrize(
    ("route", "problem"),
    [
        ("  - {name: s, from: {connector: kafka, topic: t}, to: {connector: bus, subject: a}, shard_by: '{topic}'}",
         "routes[0].shard_by: this source is split among workers by partition"),
        ("  - {name: s, from: {connector: mq, topic: 'd/{x}', share_group: g}, to: {connector: bus, subject: a},"
         " shard_by: '{x}'}", "which the broker's split (MQTT shared subscription $share/g/d/{x}) would undo"),
        ("  - {name: s, from: {connector: mq, topic: 'd/{x}'}, to: {connector: bus, subject: a}, shard_by: '{y}'}",
         "{y} is not a capture of the source pattern"),
        ("  - {name: s, from: {connector: mq, topic: 'd/{x}'}, to: {connector: bus, subject: a}, shard_by: 'k'}",
         "a constant key sends every message to one worker"),
        ("  - {name: s, from: {connector: mq, topic: 'd/{x}'}, to: {connector: bus, subject: a},"
         " shard_by: '{x}', order: none}", "shard_by keeps per-key order: it does not go with order: none"),
    ],
)  # fmt: skip
def test_shard_by_mistakes_are_config_errors(route: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(CONNECTORS + route + "\n", environ={})
    assert problem in str(err.value)


def test_keys_spread_over_the_workers_the_same_way_in_every_process() -> None:
    spread = Counter(shard_of(f"d{i}", 2) for i in range(1000))
    assert set(spread) == {0, 1} and 400 < spread[0] < 600, spread
    assert {shard_of(f"d{i}", 2) for i in range(4)} == {0, 1}  # sequential ids do not all land on one worker
    assert [shard_of("device-42", 3) for _ in range(3)] == [shard_of("device-42", 3)] * 3


TWO_ROUTES = """\
  - name: telemetry
    from: {connector: a, topic: "devices/{device}/telemetry/#"}
    to: {connector: b, topic: "iot/{device}/{#}"}
  - name: second
    from: {connector: a, topic: "devices/+/telemetry/temp"}
    to: {connector: b, topic: "second"}
"""


def test_another_workers_key_is_acknowledged_and_counted_as_sharded_not_received() -> None:
    dispatcher, routes, sinks = dispatcher_for(TWO_ROUTES)
    key = compile_template("{device}", compile_pattern("devices/{device}/telemetry/#", MQTT), None)
    elsewhere = 1 - shard_of("d1", 2)
    routes["telemetry"].shard = Shard(elsewhere, 2, (key,))

    env, receipt = envelope("devices/d1/telemetry/temp")
    dispatcher.dispatch(env)
    assert receipt.pending == 1 and receipt.settled == 0  # the other route still holds it
    sinks["b"].confirm()
    assert receipt.settled == 1
    t = routes["telemetry"].stats
    assert (t.received, t.sharded, t.acked) == (0, 1, 0)
    assert routes["second"].stats.acked == 1

    run = [envelope("devices/d1/telemetry/x") for _ in range(3)]
    dispatcher.dispatch_run([e for e, _ in run])
    assert [r.settled for _, r in run] == [1, 1, 1]  # nothing else takes that topic: settled at once
    assert (t.received, t.sharded) == (0, 4)

    routes["telemetry"].shard = Shard(1 - elsewhere, 2, (key,))  # this worker's key
    dispatcher._plans.clear()
    env, receipt = envelope("devices/d1/telemetry/y")
    dispatcher.dispatch(env)
    assert t.received == 1


WORKER_0 = """\
# HELP gateway_route_received_total Messages the route took
# TYPE gateway_route_received_total counter
gateway_route_received_total{route="a"} 3
gateway_route_received_total{route="b"} 1
# HELP gateway_route_latency_seconds End-to-end latency
# TYPE gateway_route_latency_seconds histogram
gateway_route_latency_seconds_bucket{route="a",le="0.1"} 2
gateway_route_latency_seconds_bucket{route="a",le="+Inf"} 3
gateway_route_latency_seconds_sum{route="a"} 0.2
gateway_route_latency_seconds_count{route="a"} 3
# HELP gateway_uptime_seconds Seconds since start
# TYPE gateway_uptime_seconds gauge
gateway_uptime_seconds 12.5
"""


def test_the_expositions_of_the_workers_merge_into_one_valid_text() -> None:
    merged = merge_expositions([("0", WORKER_0), ("1", WORKER_0.replace("} 3", "} 5"))])
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    received = {(s.labels["worker"], s.labels["route"]): s.value for s in families["gateway_route_received"].samples}
    assert received == {("0", "a"): 3, ("0", "b"): 1, ("1", "a"): 5, ("1", "b"): 1}
    uptime = {s.labels["worker"]: s.value for s in families["gateway_uptime_seconds"].samples}
    assert uptime == {"0": 12.5, "1": 12.5}
    buckets = [s for s in families["gateway_route_latency_seconds"].samples if s.name.endswith("_count")]
    assert {s.labels["worker"]: s.value for s in buckets} == {"0": 3, "1": 5}
    assert merged.count("# HELP gateway_route_received_total") == 1
    assert merged.count("# TYPE gateway_route_latency_seconds histogram") == 1


def test_in_process_sources_run_on_every_worker() -> None:
    config = parse_config(
        "connectors:\n  a: {type: memory}\n  b: {type: memory}\nroutes:\n"
        "  - {name: r, from: {connector: a, topic: x}, to: {connector: b, topic: y}}\n",
        environ={},
    )
    [split] = plan(config, 3)
    assert split.mode == "each" and all(split.runs_on(k) for k in range(3))


def test_a_shared_reply_address_is_refused_when_the_workers_split_the_requests() -> None:
    route = (
        "  - name: ask\n    from: {connector: bus, subject: 'req.>'}\n    to: {connector: mq, topic: 'dev/cmd'}\n"
        "    order: none\n    request: {reply_to: 'dev/answers'}\n"
    )
    config = parse_config(CONNECTORS + route, environ={})
    with pytest.raises(ConfigError) as err:
        plan(config, 2)
    assert "routes[0].request.reply_to: the 2 workers would share one reply address" in str(err.value)
    assert {s.mode for s in plan(parse_config(CONNECTORS + route.replace("    order: none\n", ""), environ={}), 2)} == {
        "one"
    }  # the route and its answers on worker 0


def test_a_reload_may_not_change_how_keys_map_to_workers(tmp_path: Path) -> None:
    """The supervisor's check of a reloaded file (``python -m gateway.workers check``, called here in-process):
    a changed ``shard_by`` is refused and the workers' copy is left as it was; a good file replaces the copy
    and the verdict carries what the supervisor keeps."""
    before = parse_config(CONNECTORS + ROUTES, environ={})
    keys = {rc.name: rc.section.shard_by for rc in before.routes}
    path, snapshot = tmp_path / "gateway.yaml", tmp_path / "copy.yaml"
    snapshot.write_text("the copy as it was")
    path.write_text(
        CONNECTORS + ROUTES.replace('shard_by: "{device}"\n  - name: n', 'shard_by: "d-{device}"\n  - name: n')
    )
    verdict = check(str(path), 2, snapshot, keys)
    assert verdict["ok"] is False
    assert any("route 'm': shard_by changed: restart the gateway" in e for e in verdict["errors"])  # type: ignore[attr-defined]
    assert snapshot.read_text() == "the copy as it was"
    path.write_text(CONNECTORS + ROUTES + "  # edited\n")
    verdict = check(str(path), 2, snapshot, keys)
    assert verdict["ok"] is True and verdict["shard_keys"] == keys
    assert snapshot.read_text() == path.read_text()
    path.write_text("routes: [")
    verdict = check(str(path), 2, snapshot, keys)
    assert verdict["ok"] is False and snapshot.read_text() == CONNECTORS + ROUTES + "  # edited\n"


def test_a_header_key_is_read_per_message_and_each_worker_forwards_its_own() -> None:
    dispatcher, routes, sinks = dispatcher_for(TWO_ROUTES)
    routes["telemetry"].shard = Shard(0, 2, header="Device-Id")
    mine = next(f"k{i}" for i in range(100) if shard_of(f"k{i}", 2) == 0)
    theirs = next(f"k{i}" for i in range(100) if shard_of(f"k{i}", 2) == 1)

    def env(key: str | None) -> tuple[Envelope, Any]:
        e, receipt = envelope("devices/d1/telemetry/x")
        return Envelope(e.topic, e.payload, [("device-id", key)] if key else None, receipt=receipt), receipt

    run = [env(mine), env(theirs), env(mine), env(None)]
    dispatcher.dispatch_run([e for e, _ in run])
    t = routes["telemetry"].stats
    nobody_key_mine = shard_of("", 2) == 0
    assert t.received == 2 + nobody_key_mine and t.sharded == 2 - nobody_key_mine
    assert [r.settled for _, r in run] == [0, 1, 0, 0 if nobody_key_mine else 1]
    sinks["b"].confirm()
    assert all(r.settled == 1 for _, r in run)
    single, receipt = env(theirs)
    dispatcher.dispatch(single)
    assert receipt.settled == 1 and t.sharded == 3 - nobody_key_mine


def test_a_header_key_needs_a_header_name() -> None:
    route = (
        "  - {name: s, from: {connector: mq, topic: 'd/#'}, to: {connector: bus, subject: a}, shard_by: 'header.'}\n"
    )
    with pytest.raises(ConfigError) as err:
        parse_config(CONNECTORS + route, environ={})
    assert "routes[0].shard_by: header.NAME: a header name" in str(err.value)
    ok = parse_config(CONNECTORS + route.replace("header.'", "header.device-id'"), environ={})
    assert ok.routes[0].shard_header == "device-id" and {s.mode for s in plan(ok, 2)} == {"sharded"}
