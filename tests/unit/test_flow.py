"""Flow control: route budgets stop the source, gates reopen at half, graceful stop drains (gateway/flow.py, app.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from connectors.memory.broker import MemoryBroker
from gateway.app import Gateway, GatewayState
from gateway.config.loader import parse_config
from gateway.core.dispatch import Route
from gateway.core.flow import FlowGate
from tests.support.harness import StartGateway, dispatcher_for, envelope, memory_config, turns, until


def budget_route(max_in_flight: int = 10, max_in_flight_bytes: int = 16 * 1024 * 1024) -> str:
    return f"""\
  - name: r
    from: {{connector: a, topic: "in/#"}}
    to: {{connector: b, topic: "out/{{#}}"}}
    max_in_flight: {max_in_flight}
    max_in_flight_bytes: {max_in_flight_bytes}
"""


def state_of(gw: Gateway) -> GatewayState:
    return gw.state  # read through a call: the state changes behind the type checker's back


def check_balance(route: Route, seen: list[int]) -> Callable[[], None]:
    """The route's books balance at every observation; records in_flight for a later bound check."""

    def check() -> None:
        s = route.stats
        assert s.received == s.acked + s.failed + s.dropped + route.in_flight, s.as_dict()
        assert route.in_flight >= 0
        seen.append(route.in_flight)

    return check


# ---------------------------------------------------------------- budgets through the Gateway


async def test_route_budget_stops_the_source_at_exactly_the_budget(start_gateway: StartGateway) -> None:
    """The memory source checks the route's gate before each single message it dispatches, and a route
    closes the gate as soon as admitting a message brings it to ``max_in_flight``. One read admits one
    message, so with the sink held exactly ``max_in_flight`` messages get in and no more."""
    gw = await start_gateway(budget_route(max_in_flight=10))
    a, b = MemoryBroker.named("A"), MemoryBroker.named("B")
    b.hold = True
    route = gw.routes["r"]
    seen: list[int] = []
    check = check_balance(route, seen)

    for i in range(50):
        a.publish(f"in/{i}", str(i).encode())
    await until(lambda: route.stats.received >= 10 and route.gate is not None and not route.gate.is_open, check=check)
    for _ in range(50):
        await turns(1)
        check()

    assert route.stats.received == 10
    assert route.in_flight == 10
    assert a.acked == set()
    assert b.received == []

    b.release()
    await until(lambda: len(a.acked) == 50, check=check)

    assert a.acked == set(range(50))
    assert [int(r.payload) for r in b.received] == list(range(50))
    assert max(seen) == 10
    assert (route.stats.received, route.stats.acked, route.in_flight) == (50, 50, 0)


async def test_byte_budget_stops_the_source(start_gateway: StartGateway) -> None:
    # 30-byte payloads against a 100-byte budget: the 4th message brings it to 120 >= 100 and closes the gate.
    gw = await start_gateway(budget_route(max_in_flight=1000, max_in_flight_bytes=100))
    a, b = MemoryBroker.named("A"), MemoryBroker.named("B")
    b.hold = True
    route = gw.routes["r"]
    seen: list[int] = []
    check = check_balance(route, seen)

    for i in range(20):
        a.publish(f"in/{i}", b"%030d" % i)
    await until(lambda: route.gate is not None and not route.gate.is_open, check=check)
    await turns()

    assert route.stats.received == 4
    assert route.in_flight_bytes == 120

    b.release()
    await until(lambda: len(a.acked) == 20, check=check)
    assert route.in_flight_bytes == 0


async def test_a_message_larger_than_the_byte_budget_still_passes(start_gateway: StartGateway) -> None:
    gw = await start_gateway(budget_route(max_in_flight=10, max_in_flight_bytes=16))
    a, b = MemoryBroker.named("A"), MemoryBroker.named("B")

    a.publish("in/big", b"x" * 1000)
    a.publish("in/small", b"y")
    await until(lambda: a.acked == {0, 1})

    assert [len(r.payload) for r in b.received] == [1000, 1]
    assert gw.routes["r"].gate is not None
    assert gw.routes["r"].gate.is_open


async def test_a_budget_of_one_moves_one_message_at_a_time(start_gateway: StartGateway) -> None:
    gw = await start_gateway(budget_route(max_in_flight=1))
    a, b = MemoryBroker.named("A"), MemoryBroker.named("B")
    route = gw.routes["r"]
    seen: list[int] = []

    for i in range(30):
        a.publish(f"in/{i}", b"%d" % i)
    await until(lambda: len(a.acked) == 30, check=check_balance(route, seen))

    assert max(seen) == 1
    assert [int(r.payload) for r in b.received] == list(range(30))


async def test_a_held_sink_does_not_stall_a_route_from_another_source(start_gateway: StartGateway) -> None:
    routes = (
        budget_route(max_in_flight=5)
        + """\
  - name: other
    from: {connector: c, topic: "#"}
    to: {connector: a, topic: "from-c/{topic}"}
"""
    )
    gw = await start_gateway(routes)
    a, b, c = MemoryBroker.named("A"), MemoryBroker.named("B"), MemoryBroker.named("C")
    b.hold = True

    for i in range(20):
        a.publish(f"in/{i}", b"x")
    await until(lambda: gw.routes["r"].stats.received == 5)
    for i in range(20):
        c.publish(f"t/{i}", b"y")
    await until(lambda: len(c.acked) == 20)

    assert len(a.received) == 20
    assert gw.routes["r"].stats.received == 5
    assert a.acked == set()


# ---------------------------------------------------------------- the gate's hysteresis (Route + FlowGate)


def test_route_closes_the_gate_at_the_budget_and_reopens_at_half() -> None:
    dispatcher, routes, sinks = dispatcher_for(budget_route(max_in_flight=10))
    route, gate = routes["r"], dispatcher.gate

    for i in range(9):
        dispatcher.dispatch(envelope(f"in/{i}")[0])
    assert gate.is_open
    assert route.room() == 1

    dispatcher.dispatch(envelope("in/9")[0])
    assert not gate.is_open
    assert route.saturated
    assert route.room() == 0

    sinks["b"].confirm(4)  # 6 in flight: above half
    assert not gate.is_open

    sinks["b"].confirm(1)  # 5 in flight: half
    assert gate.is_open
    assert not route.saturated


def test_two_saturated_routes_keep_the_shared_gate_closed_until_both_drain() -> None:
    routes_yaml = """\
  - name: r1
    from: {connector: a, topic: "x/#"}
    to: {connector: b, topic: "y"}
    max_in_flight: 2
  - name: r2
    from: {connector: a, topic: "x/#"}
    to: {connector: c, topic: "z"}
    max_in_flight: 2
"""
    dispatcher, _, sinks = dispatcher_for(routes_yaml)

    for i in range(2):
        dispatcher.dispatch(envelope(f"x/{i}")[0])
    assert not dispatcher.gate.is_open

    sinks["b"].confirm()
    assert not dispatcher.gate.is_open  # r2 is still full

    sinks["c"].confirm()
    assert dispatcher.gate.is_open


def test_failed_flights_release_budget_too() -> None:
    dispatcher, routes, sinks = dispatcher_for(budget_route(max_in_flight=2))

    dispatcher.dispatch(envelope("in/1")[0])
    dispatcher.dispatch(envelope("in/2")[0])
    assert not dispatcher.gate.is_open

    sinks["b"].confirm(error=RuntimeError("refused"))

    assert dispatcher.gate.is_open
    stats = routes["r"].stats
    assert (stats.received, stats.failed, stats.acked, routes["r"].in_flight) == (2, 2, 0, 0)


def test_flow_gate_counts_closers_and_notifies_on_transitions() -> None:
    gate = FlowGate()
    events: list[bool] = []
    gate.add_listener(events.append)

    gate.close()
    gate.close()
    gate.open()
    assert not gate.is_open
    gate.open()
    assert gate.is_open
    gate.open()  # one open too many is ignored
    gate.close()
    assert not gate.is_open

    assert events == [False, True, False]
    gate.remove_listener(events.append)
    gate.open()
    assert events == [False, True, False]


async def test_flow_gate_wait_open_blocks_until_opened() -> None:
    gate = FlowGate()
    await asyncio.wait_for(gate.wait_open(), timeout=5)  # open: returns at once

    gate.close()
    waiter = asyncio.create_task(gate.wait_open())
    await turns(10)
    assert not waiter.done()

    gate.open()
    await asyncio.wait_for(waiter, timeout=5)


# ---------------------------------------------------------------- graceful stop


async def test_stop_drains_in_flight_messages_and_returns_true(start_gateway: StartGateway) -> None:
    gw = await start_gateway(budget_route(max_in_flight=100))
    a, b = MemoryBroker.named("A"), MemoryBroker.named("B")
    b.hold = True
    route = gw.routes["r"]
    for i in range(5):
        a.publish(f"in/{i}", b"x")
    await until(lambda: route.in_flight == 5)

    stopping = asyncio.create_task(gw.stop(timeout=5))
    await until(lambda: gw.state is GatewayState.STOPPING)
    a.publish("in/late", b"after stop began")  # intake is stopped: not read
    await turns()
    assert not stopping.done()  # waiting for the held sink
    b.release()

    assert await asyncio.wait_for(stopping, timeout=5) is True
    assert gw.state is GatewayState.STOPPED
    assert a.acked == set(range(5))
    assert len(b.received) == 5
    assert route.stats.received == 5
    assert route.in_flight == 0


async def test_stop_with_a_held_sink_and_a_short_timeout_returns_false(start_gateway: StartGateway) -> None:
    gw = await start_gateway(budget_route(max_in_flight=100))
    a, b = MemoryBroker.named("A"), MemoryBroker.named("B")
    b.hold = True
    route = gw.routes["r"]
    for i in range(3):
        a.publish(f"in/{i}", b"x")
    await until(lambda: route.in_flight == 3)

    assert await gw.stop(timeout=0.05) is False

    assert gw.state is GatewayState.STOPPED
    assert a.acked == set()  # not confirmed, so not acknowledged: the broker redelivers
    assert route.in_flight == 3
    assert route.stats.acked == 0


async def test_stop_is_idempotent_and_a_new_gateway_stops_at_once() -> None:
    gw = Gateway(parse_config(memory_config(budget_route()), environ={}))
    assert await gw.stop() is True  # never started
    assert gw.state is GatewayState.NEW

    await gw.start()
    await gw.wait_ready(timeout=5)
    assert await gw.stop(timeout=5) is True
    assert await gw.stop(timeout=5) is True
    assert state_of(gw) is GatewayState.STOPPED
    with pytest.raises(RuntimeError, match="already stopped"):
        await gw.start()


async def test_gateway_as_an_async_context_manager() -> None:
    a, b = MemoryBroker.named("A"), MemoryBroker.named("B")
    async with Gateway(parse_config(memory_config(budget_route()), environ={})) as gw:
        await gw.wait_ready(timeout=5)
        assert gw.state is GatewayState.RUNNING
        a.publish("in/1", b"x")
        await until(lambda: a.acked == {0})

    assert state_of(gw) is GatewayState.STOPPED
    assert len(b.received) == 1
    assert all(c.state.value == "closed" for c in gw.used_connectors)
