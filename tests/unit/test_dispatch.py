"""gateway/dispatch.py: routing through the public Gateway over in-memory brokers, and the Dispatcher alone."""

from __future__ import annotations

from typing import Any

from connectors.memory.broker import MemoryBroker, Record
from gateway.core.shard import Shard, shard_of
from gateway.errors import SinkError, TemplateError
from gateway.routing.patterns import MQTT, compile_pattern
from gateway.routing.templates import compile_template
from tests.support.harness import RecordingSink, StartGateway, dispatcher_for, envelope, turns, until

TELEMETRY = """\
  - name: telemetry
    from: {connector: a, topic: "devices/{device}/telemetry/#"}
    to: {connector: b, topic: "iot/{device}/{#}"}
"""

FAN_OUT = """\
  - name: telemetry
    from: {connector: a, topic: "devices/{device}/telemetry/#"}
    to:
      - {connector: b, topic: "iot/{device}/{#}"}
      - {connector: c, topic: "archive/{topic}"}
"""


def topics(records: list[Record]) -> list[str]:
    return [r.topic for r in records]


# ---------------------------------------------------------------- through the Gateway


async def test_messages_reach_the_target_broker_with_rendered_topics(start_gateway: StartGateway) -> None:
    gw = await start_gateway(TELEMETRY)
    a, b = MemoryBroker.named("A"), MemoryBroker.named("B")

    a.publish("devices/d1/telemetry/temp", b"21.5")
    a.publish("devices/d2/telemetry/hum/in", b"40")
    a.publish("devices/d1/telemetry", b"parent")
    await until(lambda: len(b.received) == 3)

    # `{#}` with nothing left drops the separator before it: the parent topic maps to the parent.
    assert topics(b.received) == ["iot/d1/temp", "iot/d2/hum/in", "iot/d1"]
    assert [r.payload for r in b.received] == [b"21.5", b"40", b"parent"]
    await until(lambda: a.acked == {0, 1, 2})
    stats = gw.routes["telemetry"].stats
    assert (stats.received, stats.sent, stats.acked, stats.failed, stats.dropped) == (3, 3, 3, 0, 0)


async def test_payload_and_headers_pass_through_untouched(start_gateway: StartGateway) -> None:
    await start_gateway(TELEMETRY)
    a, b = MemoryBroker.named("A"), MemoryBroker.named("B")
    payload = bytes(range(256)) * 4
    headers = [("traceparent", "00-abc-def-01"), ("x", "1"), ("x", "2")]

    a.publish("devices/d1/telemetry/blob", payload, headers)
    await until(lambda: len(b.received) == 1)

    [record] = b.received
    assert record.payload is payload  # zero-copy: the very bytes object the source produced
    assert record.headers == headers
    assert record.key is None


async def test_order_is_kept_per_route(start_gateway: StartGateway) -> None:
    await start_gateway(TELEMETRY)
    a, b = MemoryBroker.named("A"), MemoryBroker.named("B")

    for i in range(600):  # more than one read burst of the memory source
        a.publish(f"devices/d{i % 7}/telemetry/seq", str(i).encode())
    await until(lambda: len(b.received) == 600)

    assert [int(r.payload) for r in b.received] == list(range(600))
    await until(lambda: len(a.acked) == 600)


async def test_fan_out_acks_the_source_only_after_every_target_confirmed(start_gateway: StartGateway) -> None:
    gw = await start_gateway(FAN_OUT)
    a, b, c = MemoryBroker.named("A"), MemoryBroker.named("B"), MemoryBroker.named("C")
    c.hold = True
    route = gw.routes["telemetry"]
    c_sink = gw.connectors["c"].sink

    a.publish("devices/d1/telemetry/temp", b"1")
    a.publish("devices/d2/telemetry/temp", b"2")
    # B confirmed both; C's writer took them and is stalled.
    await until(lambda: len(b.received) == 2 and route.stats.sent == 2 and c_sink.depth == 0)
    await turns()

    assert a.acked == set()
    assert c.received == []
    assert route.in_flight == 2
    assert route.stats.acked == 0

    c.release()
    await until(lambda: a.acked == {0, 1})

    assert topics(c.received) == ["archive/devices/d1/telemetry/temp", "archive/devices/d2/telemetry/temp"]
    assert (route.stats.sent, route.stats.acked, route.in_flight) == (4, 2, 0)


async def test_a_message_matching_two_routes_is_acked_after_both(start_gateway: StartGateway) -> None:
    routes = (
        TELEMETRY
        + """\
  - name: everything
    from: {connector: a, topic: "#"}
    to: {connector: c, topic: "all/{topic}"}
"""
    )
    gw = await start_gateway(routes)
    a, b, c = MemoryBroker.named("A"), MemoryBroker.named("B"), MemoryBroker.named("C")
    c.hold = True

    a.publish("devices/d1/telemetry/temp", b"1")
    a.publish("other/topic", b"2")
    await until(lambda: len(b.received) == 1 and gw.connectors["c"].sink.depth == 0)
    await turns()

    assert a.acked == set()  # "everything" still holds both

    c.release()
    await until(lambda: a.acked == {0, 1})

    assert topics(c.received) == ["all/devices/d1/telemetry/temp", "all/other/topic"]
    assert gw.routes["telemetry"].stats.acked == 1
    assert gw.routes["everything"].stats.acked == 2


async def test_a_rejected_message_counts_failed_and_the_source_is_still_acked(start_gateway: StartGateway) -> None:
    gw = await start_gateway(TELEMETRY)
    a, b = MemoryBroker.named("A"), MemoryBroker.named("B")

    def reject(record: Record) -> Exception | None:
        return SinkError("poison", retriable=False) if record.payload == b"bad" else None

    b.reject = reject
    a.publish("devices/d1/telemetry/t", b"good")
    a.publish("devices/d1/telemetry/t", b"bad")
    a.publish("devices/d1/telemetry/t", b"good again")
    await until(lambda: a.acked == {0, 1, 2})

    assert [r.payload for r in b.received] == [b"good", b"good again"]
    stats = gw.routes["telemetry"].stats
    assert (stats.received, stats.sent, stats.acked, stats.failed) == (3, 2, 2, 1)
    assert gw.routes["telemetry"].in_flight == 0


async def test_a_fan_out_message_rejected_by_one_target_fails_once(start_gateway: StartGateway) -> None:
    gw = await start_gateway(FAN_OUT)
    a, b, c = MemoryBroker.named("A"), MemoryBroker.named("B"), MemoryBroker.named("C")
    c.reject = lambda record: SinkError("no", retriable=False)

    a.publish("devices/d1/telemetry/t", b"1")
    await until(lambda: a.acked == {0})

    assert len(b.received) == 1
    stats = gw.routes["telemetry"].stats
    assert (stats.received, stats.sent, stats.acked, stats.failed) == (1, 1, 0, 1)


async def test_a_topic_the_target_cannot_carry_counts_failed_and_is_acked(start_gateway: StartGateway) -> None:
    gw = await start_gateway(TELEMETRY)
    a, b = MemoryBroker.named("A"), MemoryBroker.named("B")

    a.publish("devices/d+1/telemetry/t", b"1")  # '+' cannot be an MQTT topic level of the target
    a.publish("devices/d1/telemetry/t", b"2")
    await until(lambda: a.acked == {0, 1})

    assert topics(b.received) == ["iot/d1/t"]
    stats = gw.routes["telemetry"].stats
    assert (stats.acked, stats.failed) == (1, 1)


async def test_unrouted_topics_are_acked(start_gateway: StartGateway) -> None:
    gw = await start_gateway(TELEMETRY)
    a, b = MemoryBroker.named("A"), MemoryBroker.named("B")

    a.publish("unrelated/topic", b"1")
    a.publish("devices/d1/status", b"2")
    a.publish("devices/d1/telemetry/t", b"3")
    await until(lambda: a.acked == {0, 1, 2})

    assert topics(b.received) == ["iot/d1/t"]
    assert gw.routes["telemetry"].stats.received == 1


async def test_snapshot_reports_route_counters(start_gateway: StartGateway) -> None:
    gw = await start_gateway(TELEMETRY)
    MemoryBroker.named("A").publish("devices/d1/telemetry/t", b"12345")
    await until(lambda: gw.routes["telemetry"].stats.acked == 1)

    snap = gw.snapshot()

    assert snap["routes"]["telemetry"] == {
        "received": 1,
        "sent": 1,
        "acked": 1,
        "failed": 0,
        "dead_lettered": 0,
        "retried": 0,
        "dropped": 0,
        "dropped_overflow": 0,
        "dropped_released": 0,
        "filtered": 0,
        "slow_consumer_disconnects": 0,
        "resubmitted": 0,
        "sharded": 0,
        "in_flight": 0,
        "in_flight_bytes": 0,
        "state": "running",
    }
    assert snap["connectors"]["a"]["state"] == "connected"
    assert gw.ready


# ---------------------------------------------------------------- the Dispatcher alone


def test_dispatcher_counts_and_settles_unrouted_messages() -> None:
    dispatcher, routes, sinks = dispatcher_for(TELEMETRY)

    env, receipt = envelope("nowhere/x")
    dispatcher.dispatch(env)
    env2, receipt2 = envelope("nowhere/x")
    dispatcher.dispatch(env2)

    assert dispatcher.unrouted == 2
    assert (receipt.settled, receipt2.settled) == (1, 1)
    assert routes["telemetry"].stats.received == 0
    assert sinks["b"].items == []


def test_dispatcher_settles_after_every_target_of_every_route() -> None:
    routes_yaml = (
        FAN_OUT
        + """\
  - name: second
    from: {connector: a, topic: "devices/+/telemetry/temp"}
    to: {connector: b, topic: "second"}
"""
    )
    dispatcher, routes, sinks = dispatcher_for(routes_yaml)
    env, receipt = envelope("devices/d1/telemetry/temp")

    dispatcher.dispatch(env)

    assert [d.address for _, d in sinks["b"].items] == ["iot/d1/temp", "second"]
    assert [d.address for _, d in sinks["c"].items] == ["archive/devices/d1/telemetry/temp"]
    assert receipt.pending == 2  # two routes
    sinks["b"].confirm()
    assert receipt.settled == 0  # telemetry still waits for c
    assert routes["second"].stats.acked == 1
    sinks["c"].confirm()
    assert receipt.settled == 1
    assert routes["telemetry"].stats.acked == 1


def test_dispatcher_render_errors_fail_the_target_without_reaching_the_sink() -> None:
    dispatcher, routes, sinks = dispatcher_for(FAN_OUT.replace("archive/{topic}", "archive/all"))
    env, receipt = envelope("devices/d#1/telemetry/x")

    dispatcher.dispatch(env)

    assert [d.address for _, d in sinks["c"].items] == ["archive/all"]
    assert sinks["b"].items == []
    assert receipt.settled == 0
    sinks["c"].confirm()
    assert receipt.settled == 1
    stats = routes["telemetry"].stats
    assert (stats.sent, stats.failed, stats.acked) == (1, 1, 0)


def test_dispatcher_plan_renders_once_per_topic_and_is_reused() -> None:
    dispatcher, routes, _ = dispatcher_for(FAN_OUT)

    first = dispatcher.plan("devices/d1/telemetry/a/b")
    again = dispatcher.plan("devices/d1/telemetry/a/b")

    assert first is again
    [rp] = first
    assert rp.route is routes["telemetry"]
    assert rp.dead_letter is None
    assert [(d.address, d.key, d.error) for d in rp.deliveries] == [
        ("iot/d1/a/b", None, None),
        ("archive/devices/d1/telemetry/a/b", None, None),
    ]


def test_dispatcher_plan_carries_render_errors() -> None:
    dispatcher, _, _ = dispatcher_for(TELEMETRY)

    [rp] = dispatcher.plan("devices/d#1/telemetry/x")
    [delivery] = rp.deliveries

    assert isinstance(delivery.error, TemplateError)
    assert delivery.address == ""


def test_dispatcher_cache_is_bounded_and_evicted_plans_are_recomputed() -> None:
    dispatcher, _, sinks = dispatcher_for(TELEMETRY, cache_size=2)

    for device in ("d1", "d2", "d3", "d1"):
        env, _ = envelope(f"devices/{device}/telemetry/t")
        dispatcher.dispatch(env)

    assert [d.address for _, d in sinks["b"].items] == ["iot/d1/t", "iot/d2/t", "iot/d3/t", "iot/d1/t"]


def test_dispatcher_room_is_the_smallest_route_budget_left() -> None:
    routes_yaml = """\
  - name: small
    from: {connector: a, topic: "x/#"}
    to: {connector: b, topic: "y"}
    max_in_flight: 3
  - name: big
    from: {connector: a, topic: "#"}
    to: {connector: b, topic: "z"}
    max_in_flight: 100
"""
    dispatcher, _, sinks = dispatcher_for(routes_yaml)
    assert dispatcher.room() == 3

    env, _ = envelope("x/1")
    dispatcher.dispatch(env)
    assert dispatcher.room() == 2

    sinks["b"].confirm()
    assert dispatcher.room() == 3


# ---------------------------------------------------------------- runs: messages of one topic that arrived together

RUN_ROUTES = """\
  - name: telemetry
    from: {connector: a, topic: "devices/{device}/telemetry/#"}
    to:
      - {connector: b, topic: "iot/{device}/{#}"}
      - {connector: c, topic: "archive/{topic}"}
    overflow: block
    max_in_flight: 3
    max_payload: 100
  - name: second
    from: {connector: a, topic: "devices/+/telemetry/temp"}
    to: {connector: b, topic: "second"}
    overflow: drop_newest
    max_in_flight: 2
"""


def test_a_run_is_admitted_as_its_messages_would_be_one_by_one() -> None:
    """Fan-out, two routes (one blocking, one dropping), a payload over the route's limit in the middle:
    the same sinks' contents per route, receipts, counters and budget as dispatching each message."""

    def run(batch: bool) -> tuple[object, ...]:
        dispatcher, routes, sinks = dispatcher_for(RUN_ROUTES)
        pairs = [envelope("devices/d1/telemetry/temp", b"x" * (500 if i == 2 else 10)) for i in range(5)]
        envs = [env for env, _ in pairs]
        if batch:
            dispatcher.dispatch_run(envs)
        else:
            for env in envs:
                dispatcher.dispatch(env)
        telemetry, second = routes["telemetry"], routes["second"]
        submitted = {  # per route and sink: the order between two routes' messages is not kept, nor needed
            (name, route): [(f.env.payload, d.address) for f, d in sink.items if f.route.name == route]
            for name, sink in sinks.items()
            for route in routes
        }
        state = (
            submitted,
            [r.pending for _, r in pairs],
            (telemetry.in_flight, telemetry.saturated, telemetry.stats.received, telemetry.stats.failed),
            (second.in_flight, second.stats.received, second.stats.dropped_overflow),
            dispatcher.gate.is_open,
        )
        for sink in sinks.values():
            sink.confirm()
        return (*state, [(r.settled, r.released) for _, r in pairs], telemetry.in_flight, second.in_flight)

    one_by_one, as_run = run(False), run(True)
    assert as_run == one_by_one
    submitted, _, (in_flight, saturated, received, failed), *_ = as_run
    assert [p for p, _ in submitted["c", "telemetry"]] == [b"x" * 10] * 4  # the big one failed alone
    assert (in_flight, saturated, received, failed) == (4, True, 5, 1)  # the budget counts what was on its way


def test_an_unrouted_run_is_settled_and_counted() -> None:
    dispatcher, _, sinks = dispatcher_for(RUN_ROUTES)
    pairs = [envelope("nowhere/x") for _ in range(3)]

    dispatcher.dispatch_run([env for env, _ in pairs])
    dispatcher.dispatch_run([])

    assert dispatcher.unrouted == 3
    assert [r.settled for _, r in pairs] == [1, 1, 1]
    assert all(sink.items == [] for sink in sinks.values())


def test_confirming_a_batch_ends_as_confirming_each_item() -> None:
    """Sink.confirmed: a fan-out's first target (not finished yet), single-target flights of two routes
    finished as runs, one failed before: the same counters, receipts and budgets as ``done()`` one by one."""

    def run(together: bool) -> tuple[object, ...]:
        dispatcher, routes, sinks = dispatcher_for(RUN_ROUTES)
        pairs = [envelope("devices/d1/telemetry/temp", b"x" * 10) for _ in range(4)]
        dispatcher.dispatch_run([env for env, _ in pairs])
        b = sinks["b"]
        b.items[0][0].fail(b.items[0][1], SinkError("refused", retriable=False))
        items, b.items = b.items[1:], []
        if together:
            RecordingSink.confirmed(items)
        else:
            for flight, _ in items:
                flight.done()
        telemetry, second = routes["telemetry"], routes["second"]
        return (
            [(r.pending, r.settled) for _, r in pairs],
            [
                (s.stats.sent, s.stats.acked, s.stats.failed, s.in_flight, s.in_flight_bytes)
                for s in (telemetry, second)
            ],
            (telemetry.saturated, dispatcher.gate.is_open, telemetry.latency.count, second.latency.count),
        )

    one_by_one, together = run(False), run(True)
    assert together == one_by_one
    assert together[1][1][:3] == (2, 2, 0)  # the second route's two flights: done


def test_a_run_of_messages_all_over_the_limit_fails_each_alone() -> None:
    """A poison run (every payload over the route's max_payload, longer than Python's recursion limit): each
    fails alone, none is submitted, every receipt is settled."""
    dispatcher, routes, sinks = dispatcher_for(RUN_ROUTES)
    pairs = [envelope("devices/d1/telemetry/temp", b"x" * 500) for _ in range(3000)]

    dispatcher.dispatch_run([env for env, _ in pairs])

    telemetry = routes["telemetry"]
    assert (telemetry.stats.received, telemetry.stats.failed, telemetry.in_flight) == (3000, 3000, 0)
    assert all(f.route.name != "telemetry" for sink in sinks.values() for f, _ in sink.items)


# ---------------------------------------------------------------- a socket read of many topics (dispatch_mixed)

DEVICES = """\
  - name: plain
    from: {connector: a, topic: "dev/{device}/t"}
    to: {connector: b, topic: "all"}
  - name: per-device
    from: {connector: a, topic: "per/{device}"}
    to: {connector: b, topic: "out-{device}"}
  - name: staged
    from: {connector: a, topic: "st/{device}"}
    to: {connector: b, topic: "st-all"}
    headers: {device: "{device}"}
"""


class RunSink(RecordingSink):
    """Records each ``submit_many`` call (a run) besides the items."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[list[str]] = []

    def submit_many(self, flights: list[Any], delivery: Any) -> None:
        self.runs.append([f.env.topic for f in flights])
        super().submit_many(flights, delivery)


def _mixed(routes_yaml: str) -> tuple[Any, dict[str, Any], RunSink]:
    dispatcher, routes, _ = dispatcher_for(routes_yaml)
    sink = RunSink()
    for route in routes.values():
        for target in route.targets:
            target.sink = sink
    return dispatcher, routes, sink


def _fail_test(run: list[Any], exc: Exception) -> None:
    raise AssertionError(f"dispatch raised: {exc!r}")


def test_one_read_of_many_topics_with_the_same_plan_is_one_run_in_arrival_order() -> None:
    dispatcher, routes, sink = _mixed(DEVICES)
    topics = [f"dev/d{i % 5}/t" for i in range(20)]
    pairs = [envelope(t, str(i).encode()) for i, t in enumerate(topics)]
    dispatcher.dispatch_mixed([e for e, _ in pairs], _fail_test)
    assert sink.runs == [topics], "five device topics, one plan: one run, in arrival order"
    assert len({id(dispatcher.plan(t)) for t in set(topics)}) == 1
    sink.confirm()
    assert [r.settled for _, r in pairs] == [1] * 20
    assert routes["plain"].stats.acked == 20


def test_topics_whose_targets_differ_or_whose_route_reads_the_captures_keep_their_own_plans() -> None:
    dispatcher, _, sink = _mixed(DEVICES)
    per = [f"per/d{i % 2}" for i in range(4)]
    dispatcher.dispatch_mixed([envelope(t)[0] for t in per], _fail_test)
    assert sink.runs == [[t] for t in per]
    assert [d.address for _, d in sink.items] == ["out-d0", "out-d1", "out-d0", "out-d1"]
    sink.items.clear()
    staged = ["st/d0", "st/d1", "st/d0"]
    dispatcher.dispatch_mixed([envelope(t)[0] for t in staged], _fail_test)
    assert [dict(f.env.headers or ())["device"] for f, _ in sink.items] == ["d0", "d1", "d0"], "each its own capture"


def test_another_workers_keys_are_set_aside_and_this_workers_keys_stay_one_run() -> None:
    dispatcher, routes, sink = _mixed(DEVICES)
    key = compile_template("{device}", compile_pattern("dev/{device}/t", MQTT), None)
    routes["plain"].shard = Shard(0, 2, (key,))
    devices = [f"d{i}" for i in range(8)]
    mine = {d for d in devices if shard_of(d, 2) == 0}
    assert mine and len(mine) < len(devices)
    topics = [f"dev/{devices[i % 8]}/t" for i in range(32)]
    pairs = [envelope(t) for t in topics]
    dispatcher.dispatch_mixed([e for e, _ in pairs], _fail_test)
    assert sink.runs == [[t for t in topics if t.split("/")[1] in mine]], "one run, in arrival order"
    theirs = [r for (e, r) in pairs if e.topic.split("/")[1] not in mine]
    assert all(r.settled == 1 for r in theirs), "another worker's: acknowledged at once"
    stats = routes["plain"].stats
    assert (stats.received, stats.sharded) == (32 - len(theirs), len(theirs))


def test_a_run_whose_dispatch_raises_goes_to_the_source_and_the_rest_of_the_read_goes_on() -> None:
    dispatcher, routes, sink = _mixed(DEVICES)
    broken = routes["per-device"]

    def boom(envs: list[Any], plan: Any) -> None:
        raise RuntimeError("a bug")

    broken.admit_run = boom  # type: ignore[method-assign]
    failed: list[tuple[list[str], str]] = []
    envs = [envelope(t)[0] for t in ("dev/d1/t", "per/d1", "dev/d2/t")]
    dispatcher.dispatch_mixed(envs, lambda run, exc: failed.append(([e.topic for e in run], str(exc))))
    assert failed == [(["per/d1"], "a bug")]
    assert sink.runs == [["dev/d1/t"], ["dev/d2/t"]]

    def no_plan(topic: str) -> Any:
        raise RuntimeError("no plan")

    dispatcher.plan = no_plan  # type: ignore[method-assign]
    failed.clear()
    dispatcher.dispatch_mixed(
        [envelope("dev/new/t")[0], envelope("dev/d1/t")[0]],
        lambda run, exc: failed.append(([e.topic for e in run], str(exc))),
    )
    assert failed == [(["dev/new/t"], "no plan")], "a topic whose plan cannot be made fails alone"
    assert sink.runs[-1] == ["dev/d1/t"]
