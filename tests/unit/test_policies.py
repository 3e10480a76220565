"""Overflow policies, slow-consumer disconnection, retries, dead letters and on_error, on in-memory brokers."""

from __future__ import annotations

from connectors.memory.broker import MemoryBroker, Record
from gateway.app import Gateway
from gateway.core.policies import RouteState
from gateway.errors import SinkError, Unavailable
from tests.support.harness import StartGateway, turns, until


def route(extra: str, *, to: str = '{connector: b, topic: "out/{device}"}') -> str:
    return f"""\
  - name: r
    from: {{connector: a, topic: "in/{{device}}"}}
    to: {to}
{extra}"""


def balanced(gw: Gateway) -> None:
    r = gw.routes["r"]
    s = r.stats
    assert s.received == s.acked + s.failed + s.dropped + r.in_flight, s.as_dict()


def publish(n: int, broker: str = "A") -> MemoryBroker:
    b = MemoryBroker.named(broker)
    for i in range(n):
        b.publish(f"in/d{i % 3}", str(i).encode())
    return b


async def test_drop_newest_counts_every_drop_and_acknowledges_it(start_gateway: StartGateway) -> None:
    MemoryBroker.named("B").hold = True
    gw = await start_gateway(route("    max_in_flight: 5\n    overflow: drop_newest"))
    a = publish(20)
    r = gw.routes["r"]
    await until(lambda: r.stats.received == 20, check=lambda: balanced(gw))
    assert (r.in_flight, r.stats.dropped_overflow) == (5, 15)
    assert len(a.acked) == 15, "dropped by policy means acknowledged"
    MemoryBroker.named("B").release()
    await until(lambda: r.stats.acked == 5, check=lambda: balanced(gw))
    assert sorted(int(rec.payload) for rec in MemoryBroker.named("B").received) == [0, 1, 2, 3, 4]


async def test_drop_oldest_keeps_the_newest(start_gateway: StartGateway) -> None:
    b = MemoryBroker.named("B")
    b.hold = True
    gw = await start_gateway(route("    max_in_flight: 5\n    overflow: drop_oldest"))
    r = gw.routes["r"]
    publish(1)  # the writer takes this one and waits on the held broker with it
    await until(lambda: r.in_flight == 1)
    await turns()
    a = MemoryBroker.named("A")
    for i in range(1, 30):
        a.publish(f"in/d{i % 3}", str(i).encode())
    await until(lambda: r.stats.received == 30, check=lambda: balanced(gw))
    b.release()
    await until(lambda: r.in_flight == 0, check=lambda: balanced(gw))
    got = [int(rec.payload) for rec in b.received]
    assert got[0] == 0, "the message the sink already had is not dropped"
    assert got[1:] == [26, 27, 28, 29], got
    assert r.stats.dropped_overflow == 25


async def test_a_route_full_past_its_deadline_is_disconnected_and_resumes(start_gateway: StartGateway) -> None:
    b = MemoryBroker.named("B")
    b.hold = True
    gw = await start_gateway(route("    max_in_flight: 4\n    slow_consumer_deadline: 0.3"))
    r = gw.routes["r"]
    a = publish(1)  # the writer takes this one to the (stalled) broker
    await until(lambda: r.in_flight == 1)
    await turns()
    for i in range(1, 10):
        a.publish(f"in/d{i % 3}", str(i).encode())
    await until(lambda: r.state is RouteState.DISCONNECTED, check=lambda: balanced(gw))
    assert r.stats.slow_consumer_disconnects == 1
    # What waited in the sink was released, not acknowledged (a durable source redelivers it);
    # what the broker already had stays in flight until the broker answers.
    assert r.stats.dropped_released == 3 and a.released == {1, 2, 3}, r.stats.as_dict()
    assert r.in_flight == 1
    b.release()
    await until(lambda: r.state is RouteState.RUNNING and r.in_flight == 0, check=lambda: balanced(gw))


async def test_retriable_errors_are_retried_then_delivered(start_gateway: StartGateway) -> None:
    b = MemoryBroker.named("B")
    calls = {"n": 0}

    def flaky(rec: Record) -> Exception | None:
        calls["n"] += 1
        return SinkError("busy", retriable=True) if calls["n"] <= 2 else None

    b.reject = flaky
    gw = await start_gateway(route("    retry: {attempts: 5, initial: 0.01, max: 0.02}"))
    a = publish(1)
    r = gw.routes["r"]
    await until(lambda: r.stats.acked == 1, check=lambda: balanced(gw))
    assert r.stats.retried == 2
    assert a.acked == {0}


async def test_poison_goes_to_the_dead_letter_with_error_headers_then_is_acknowledged(
    start_gateway: StartGateway,
) -> None:
    MemoryBroker.named("B").reject = lambda rec: SinkError("refused: bad record", retriable=False)
    gw = await start_gateway(route('    dead_letter: {connector: c, topic: "dlq/{device}"}'))
    a = publish(1)
    r = gw.routes["r"]
    c = MemoryBroker.named("C")
    await until(lambda: r.stats.dead_lettered == 1, check=lambda: balanced(gw))
    [letter] = c.received
    headers = dict(letter.headers or [])
    assert letter.topic == "dlq/d0" and letter.payload == b"0"
    assert headers["x-gateway-route"] == "r"
    assert "refused: bad record" in headers["x-gateway-error"]
    assert headers["x-gateway-error-type"] == "SinkError"
    assert headers["x-gateway-source-position"] == "0"
    assert (r.stats.failed, r.stats.acked, a.acked) == (1, 0, {0})


async def test_retries_exhausted_then_dead_lettered(start_gateway: StartGateway) -> None:
    MemoryBroker.named("B").reject = lambda rec: SinkError("busy", retriable=True)
    gw = await start_gateway(
        route("    retry: {attempts: 2, initial: 0.01, max: 0.01}\n    dead_letter: {connector: c, topic: dlq}")
    )
    publish(1)
    r = gw.routes["r"]
    await until(lambda: r.stats.dead_lettered == 1, check=lambda: balanced(gw))
    assert r.stats.retried == 2


async def test_an_unavailable_target_is_waited_out_past_the_retry_budget(start_gateway: StartGateway) -> None:
    b = MemoryBroker.named("B")
    calls = {"n": 0}

    def down(rec: Record) -> Exception | None:
        calls["n"] += 1
        return Unavailable("no stream answered") if calls["n"] <= 12 else None

    b.reject = down
    gw = await start_gateway(
        route(
            "    retry: {attempts: 2, initial: 0.001, max: 0.002, max_time: 0.01}\n"
            "    dead_letter: {connector: c, topic: dlq}"
        )
    )
    a = publish(1)
    r = gw.routes["r"]
    await until(lambda: r.stats.acked == 1, check=lambda: balanced(gw))
    assert calls["n"] == 13, "tried past attempts and max_time: an outage is no poison"
    assert (r.stats.failed, r.stats.dead_lettered, a.acked) == (0, 0, {0})


async def test_on_error_stop_stops_the_route_and_leaves_the_message_unacknowledged(
    start_gateway: StartGateway,
) -> None:
    MemoryBroker.named("B").reject = lambda rec: SinkError("refused", retriable=False)
    gw = await start_gateway(route("    on_error: stop"))
    a = publish(5)
    r = gw.routes["r"]
    await until(lambda: r.state is RouteState.STOPPED, check=lambda: balanced(gw))
    await turns()
    assert 0 in a.released and not a.acked
    assert r.stats.received < 5 or r.in_flight == 0, "a stopped route takes nothing more"
    assert gw.routes["r"].gate is not None and not gw.routes["r"].gate.is_open


async def test_on_error_drop_acknowledges_and_counts(start_gateway: StartGateway) -> None:
    MemoryBroker.named("B").reject = lambda rec: SinkError("refused", retriable=False)
    gw = await start_gateway(route(""))
    a = publish(3)
    r = gw.routes["r"]
    await until(lambda: r.stats.failed == 3, check=lambda: balanced(gw))
    assert a.acked == {0, 1, 2} and r.state is RouteState.RUNNING
