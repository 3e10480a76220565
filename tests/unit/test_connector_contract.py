"""The connector contract (gateway/core/contract.py): what the base Connector does for every connector, once.

The dispatcher cache (kept across sessions, rebuilt only when the routes change), the error translation
(``guard``) and the lost-connection task (``watch``), the sources' hooks, and ``Dispatcher.leave_out`` for
what a source leaves out on purpose. The connectors' source classes are checked against the ``Source``
protocol by mypy (a ``_: type[Source] = ...`` line in each ``source.py``).
"""

from __future__ import annotations

import asyncio

import pytest

from connectors.memory.broker import MemoryBroker
from connectors.memory.config import MemoryConfig
from connectors.memory.connector import MemoryConnector
from connectors.mqtt.sink import PacketIds
from connectors.nats import wire
from gateway.app import build_routes
from gateway.config.loader import parse_config
from gateway.core.contract import Connector, ConnectorContext, Route
from gateway.errors import ConnectorError, GatewayError
from tests.support.harness import StartGateway, dispatcher_for, envelope, memory_config, until

ROUTES = """\
  - name: r
    from: {connector: a, topic: "in/{x}"}
    to: {connector: b, topic: "out/{x}"}
  - name: s
    from: {connector: a, topic: "other/#"}
    to: {connector: b, topic: "out2/{#}"}
"""


def routes_of(text: str = ROUTES) -> dict[str, Route]:
    return build_routes(parse_config(memory_config(text), environ={}))


def memory_connector() -> MemoryConnector:
    return MemoryConnector("a", MemoryConfig(broker="A"), ConnectorContext(gateway_id="t"))


def test_a_dispatcher_is_cached_per_source_and_built_again_only_when_its_routes_change() -> None:
    conn = memory_connector()
    routes = routes_of()
    r, s = routes["r"], routes["s"]
    conn.routes = (r, s)

    both = conn.dispatcher([r, s])
    one = conn.dispatcher([r], key="r")

    assert conn.dispatcher([r, s]) is both and conn.dispatcher([r], key="r") is one
    assert both is not one and r.gate is one.gate, "the last dispatcher built for a route holds its gate"
    changed = routes_of()["r"]  # a reload: same name, a new route object
    conn.routes = (changed, s)
    assert conn.dispatcher([changed], key="r") is not one
    assert conn.dispatcher([changed], key="r").routes == (changed,)
    assert conn.dispatcher([changed, s]) is not both, "the routes are not the same objects any more"


def test_a_dispatcher_is_forgotten_when_its_routes_leave_the_connector() -> None:
    conn = memory_connector()
    r = routes_of()["r"]
    conn.routes = (r,)
    first = conn.dispatcher([r], key="r")

    conn.routes = ()
    conn.routes = (r,)  # the same route object back: the forgotten dispatcher is not reused

    assert conn.dispatcher([r], key="r") is not first


async def test_the_memory_connector_keeps_its_dispatcher_across_sessions(start_gateway: StartGateway) -> None:
    gw = await start_gateway(ROUTES)
    conn = gw.connectors["a"]
    a = MemoryBroker.named("A")
    a.publish("in/1", b"one")
    await until(lambda: 0 in a.acked)
    [source] = conn.live_sources()
    dispatcher = source.dispatcher

    channel = conn.channels[0]
    channel.cut()  # the session ends (as a lost connection would end it) ...
    await until(lambda: not conn.connected.is_set())
    channel.resume()  # ... and a new one starts
    await until(lambda: conn.connected.is_set() and [s for s in conn.live_sources() if s is not source] != [])

    [again] = conn.live_sources()
    assert again.dispatcher is dispatcher, "a new session reads through the same dispatcher (plan cache, gate)"
    assert gw.routes["r"].gate is dispatcher.gate
    a.publish("in/2", b"two")
    await until(lambda: 1 in a.acked)


def test_leave_out_counts_on_the_routes_of_the_topic_and_settles_the_receipt() -> None:
    dispatcher, routes, sinks = dispatcher_for("""\
  - name: one
    from: {connector: a, topic: "t/#"}
    to: {connector: b, topic: "x"}
  - name: two
    from: {connector: a, topic: "t/+"}
    to: {connector: b, topic: "y"}
""")
    env, receipt = envelope("t/1")

    dispatcher.leave_out(env.topic, receipt)

    for name in ("one", "two"):
        s = routes[name].stats
        assert (s.received, s.filtered, s.acked, routes[name].in_flight) == (1, 1, 0, 0)
    assert receipt.settled == 1 and sinks["b"].items == []
    other, other_receipt = envelope("elsewhere")
    dispatcher.leave_out(other.topic, other_receipt)
    assert other_receipt.settled == 1 and dispatcher.unrouted == 1
    assert routes["one"].stats.received == 1


async def test_guard_turns_the_library_errors_into_connector_errors() -> None:
    async def fails(exc: BaseException) -> None:
        raise exc

    with pytest.raises(ConnectorError, match=r"^cannot reach X: KeyError: 'k'$") as info:
        await Connector.guard(fails(KeyError("k")), (KeyError, IndexError), "cannot reach X")
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(ConnectorError, match=r"^IndexError: i$"):
        await Connector.guard(fails(IndexError("i")), IndexError)
    with pytest.raises(ValueError, match="a bug"):  # not the library's: it stays what it is (and is loud)
        await Connector.guard(fails(ValueError("a bug")), KeyError)

    async def answer() -> int:
        return 42

    assert await Connector.guard(answer(), KeyError) == 42


async def test_watch_ends_the_session_once_the_connection_is_lost() -> None:
    lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(Connector.watch(lost, lambda reason: f"lost: {reason}"))
    await asyncio.sleep(0)
    assert not task.done()

    lost.set_result("reset by peer")

    with pytest.raises(ConnectorError, match=r"^lost: reset by peer$"):
        await task


def test_broker_edge_errors_are_gateway_errors() -> None:
    class Bare:
        pass

    with pytest.raises(wire.UnsupportedClient) as info:
        wire.check(Bare())
    assert isinstance(info.value, GatewayError) and isinstance(info.value, RuntimeError)
    ids = PacketIds()
    ids.used = set(range(1, 65536))
    with pytest.raises(GatewayError, match="no free MQTT packet identifier"):
        ids.take()
