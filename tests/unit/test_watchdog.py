"""The in-flight watchdog: no message stays in a route without a delivery attempt in progress."""

from __future__ import annotations

import time

from connectors.memory.broker import MemoryBroker, Record
from gateway.app import Gateway
from gateway.core.flight import MAX_RESUBMITS
from gateway.errors import SinkError, Unavailable
from tests.support.harness import StartGateway, turns, until

ROUTE = """\
  - name: r
    from: {connector: a, topic: "in/#"}
    to: {connector: b, topic: "out/{#}"}
    stuck_after: 5
"""
DLQ = '    dead_letter: {connector: c, topic: "dlq/{#}"}\n'


def swallow_first(topic: str, times: int) -> None:
    """Broker B takes the first ``times`` publishes to ``topic`` and never answers them."""
    left = [times]

    def swallow(record: Record) -> bool:
        if record.topic == topic and left[0] > 0:
            left[0] -= 1
            return True
        return False

    MemoryBroker.named("B").swallow = swallow


def invariant(gw: Gateway) -> None:
    r = gw.routes["r"]
    s = r.stats
    assert s.received == s.acked + s.failed + s.dropped + s.filtered + r.in_flight


async def test_a_message_a_sink_swallowed_is_resubmitted_and_counted(start_gateway: StartGateway) -> None:
    gw = await start_gateway(ROUTE)
    swallow_first("out/1", 1)
    a = MemoryBroker.named("A")
    for i in range(3):
        a.publish(f"in/{i}", b"m%d" % i)
    r = gw.routes["r"]
    await until(lambda: r.stats.acked == 2, check=lambda: invariant(gw))
    now = time.monotonic()
    assert r.oldest_in_flight(time.monotonic_ns()) > 0, "the swallowed one is in flight"
    assert r.watch(now) == 0, "not yet older than stuck_after"
    assert r.watch(now + 60) == 1
    await until(lambda: r.stats.acked == 3, check=lambda: invariant(gw))
    assert r.stats.resubmitted == 1 and r.in_flight == 0 and r.oldest_in_flight(time.monotonic_ns()) == 0.0
    assert sorted(rec.topic for rec in MemoryBroker.named("B").received) == ["out/0", "out/1", "out/2"]
    assert a.acked == {0, 1, 2}


async def test_a_message_never_confirmed_fails_visibly_after_the_last_resubmission(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(ROUTE + DLQ)
    swallow_first("out/1", MAX_RESUBMITS + 1)
    MemoryBroker.named("A").publish("in/1", b"m")
    r = gw.routes["r"]
    await until(lambda: r.in_flight == 1 and r.stats.received == 1)
    now = time.monotonic()
    for i in range(1, MAX_RESUBMITS + 1):
        assert r.watch(now + 60 * i) == 1
        await turns()  # the sink takes it (and swallows it again)
    assert r.watch(now + 60 * (MAX_RESUBMITS + 1)) == 0, "given up"
    await until(lambda: r.stats.dead_lettered == 1, check=lambda: invariant(gw))
    [letter] = MemoryBroker.named("C").received
    assert "no target confirmed the message within 5 s" in dict(letter.headers or [])["x-gateway-error"]
    assert r.stats.resubmitted == MAX_RESUBMITS and r.in_flight == 0


async def test_an_outage_is_waited_out_not_resubmitted(start_gateway: StartGateway) -> None:
    gw = await start_gateway(ROUTE)
    swallow_first("out/1", 1)
    MemoryBroker.named("A").publish("in/1", b"m")
    r = gw.routes["r"]
    await until(lambda: r.in_flight == 1 and r.stats.received == 1)
    sink = r.targets[0].sink
    assert sink is not None
    since, sink.up_since = sink.up_since, None  # the target's connector lost its broker
    assert r.watch(time.monotonic() + 600) == 0, "a target that is down is waited for, however long"
    sink.up_since = time.monotonic()
    assert r.watch(time.monotonic() + 1) == 0, "nor just after it came back"
    sink.up_since = since
    assert r.watch(time.monotonic() + 600) == 1
    await until(lambda: r.stats.acked == 1)


async def test_a_message_whose_dead_letter_is_under_way_is_left_to_it(start_gateway: StartGateway) -> None:
    gw = await start_gateway(ROUTE + DLQ)
    r = gw.routes["r"]
    MemoryBroker.named("B").reject = lambda rec: SinkError("refused", retriable=False)
    dlq = MemoryBroker.named("C")
    dlq.hold = True  # the dead-letter broker is connected but slow to confirm
    MemoryBroker.named("A").publish("in/1", b"m")
    await until(lambda: r.stats.received == 1)
    await turns()
    assert r.watch(time.monotonic() + 60) == 0, "its outcome is decided: the dead letter finishes it"
    dlq.release()
    await until(lambda: r.stats.dead_lettered == 1, check=lambda: invariant(gw))
    assert (r.stats.failed, r.in_flight, r.stats.resubmitted) == (1, 0, 0)


async def test_age_counts_from_the_last_hand_over_to_the_sink(start_gateway: StartGateway) -> None:
    gw = await start_gateway(ROUTE)
    r = gw.routes["r"]
    b = MemoryBroker.named("B")
    b.reject = lambda rec: Unavailable("no leader")
    MemoryBroker.named("A").publish("in/1", b"m")
    await until(lambda: r.stats.retried >= 1)
    now = time.monotonic()
    assert r.watch(now + 60) == 0, "waiting for a retry"
    b.reject = None
    b.hold = True  # the broker is slow to answer the attempt that follows
    await until(lambda: not r._timers)
    await turns()
    assert r.watch(now + 61) == 0, "handed over within the last pass: not stuck"
    assert r.watch(now + 63) == 0, "nor two seconds later (stuck_after is 5)"
    assert r.watch(now + 70) == 1, "but after stuck_after without an answer"


async def test_a_replaced_copy_that_comes_back_to_a_queue_is_dropped(start_gateway: StartGateway) -> None:
    gw = await start_gateway(ROUTE)
    r = gw.routes["r"]
    swallow_first("out/1", 1)
    MemoryBroker.named("A").publish("in/1", b"m")
    await until(lambda: r.stats.received == 1)
    await turns()
    [old] = [f for f in r._flights if not f.closed]
    assert r.watch(time.monotonic() + 60) == 1
    sink = r.targets[0].sink
    assert sink is not None
    sink.requeue([(old, old.plan.deliveries[0])])  # the client gives the old attempt back (a purge, say)
    assert all(f is not old for f, _ in sink.queued()), "the replaced copy is not sent again"
    await until(lambda: r.stats.acked == 1, check=lambda: invariant(gw))
    assert r.in_flight == 0 and len(MemoryBroker.named("B").received) == 1
