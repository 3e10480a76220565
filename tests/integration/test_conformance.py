"""One conformance suite that every connector passes, as a source and as a sink, against real brokers.

The other side of each route is the in-memory connector, so each case tests
exactly one real connector: what it delivers (all messages, per-key order,
headers, keys), and when it acknowledges (only after the target confirmed:
a message held at the target is redelivered after a restart; one confirmed
is not).
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from connectors.memory.broker import MemoryBroker
from gateway import Gateway
from gateway.config import parse_config
from tests.support.brokers import Mosquitto, NatsServer, Tansu
from tests.support.clients.kafka import as_received, create_topics, produce_all, read_records
from tests.support.clients.mqtt import MqttClient
from tests.support.clients.nats import (
    NatsCollector,
    add_stream,
    js_publish_all,
    nats_connect,
    publish_all,
    stream_messages,
)
from tests.support.messages import Received
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

N = 2000
OUT_PARTITIONS = 3
DEVICES = ["d0", "d1", "d2", "d3"]


def messages(n: int = N) -> list[tuple[str, int, bytes, list[tuple[str, str]]]]:
    """(device, seq, payload, headers), sequence numbers per device."""
    out = []
    seq: dict[str, int] = defaultdict(int)
    for i in range(n):
        dev = DEVICES[i % len(DEVICES)]
        out.append((dev, seq[dev], f"{dev}:{seq[dev]}".encode(), [("seq", str(seq[dev])), ("device", dev)]))
        seq[dev] += 1
    return out


def check_delivery(got: list[Received], sent: int, *, headers: bool, keys: bool = False) -> None:
    """Every message exactly once, in order per device, with its headers and key."""
    by_dev: dict[str, list[int]] = defaultdict(list)
    for r in got:
        dev, seq = r.payload.decode().split(":")
        by_dev[dev].append(int(seq))
        if headers:
            assert ("seq", seq) in r.headers and ("device", dev) in r.headers, r.headers
        if keys:
            assert r.key == dev.encode(), r.key
    assert sum(len(v) for v in by_dev.values()) == sent, f"got {len(got)} of {sent}"
    for dev, seqs in by_dev.items():
        assert seqs == list(range(len(seqs))), f"{dev}: out of order or duplicated"


@dataclass
class Kind:
    """How to drive one connector kind from a test."""

    name: str
    connector: Callable[[], dict[str, Any]]
    source: Callable[[str], dict[str, Any]]
    target: Callable[[str], dict[str, Any]]
    publish: Callable[[str, list[tuple[str, int, bytes, list[tuple[str, str]]]]], Awaitable[None]]
    collect: Callable[[str, int], Awaitable[list[Received]]]
    prepare_target: Callable[[str], Awaitable[None]]
    headers: bool = True
    keys: bool = False
    durable: bool = True
    preload: bool = False
    """Whether messages may be published before the gateway subscribed."""


def _yaml(d: dict[str, Any]) -> str:
    return json.dumps(d)  # JSON is YAML's flow style


def config(kind: Kind, unique: str, *, as_source: bool, max_in_flight: int = 4096) -> str:
    other = {"type": "memory", "broker": f"mem-{unique}"}
    if as_source:
        frm = {"connector": "real", **kind.source(unique)}
        to = {"connector": "mem", "topic": "in/{device}"}
    else:
        frm = {"connector": "mem", "topic": "in/{device}"}
        to = {"connector": "real", **kind.target(unique)}
    return f"""
gateway: {{id: conf-{unique}, shutdown_timeout: 10, reconnect: {{initial: 0.05, max: 1}}}}
connectors:
  real: {_yaml(kind.connector())}
  mem: {_yaml(other)}
routes:
  - name: r
    from: {_yaml(frm)}
    to: {_yaml(to)}
    max_in_flight: {max_in_flight}
"""


@pytest.fixture
async def kinds(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[dict[str, Kind]]:
    """Lazily built adapters; only the brokers a test's kind needs are started."""
    closers: list[Callable[[], Awaitable[None]]] = []
    MemoryBroker.reset()

    def mqtt(version: int) -> Kind:
        broker: Mosquitto = request.getfixturevalue("mosquitto")
        sub = MqttClient(broker.port, protocol=version).connect()

        async def close_sub() -> None:
            sub.close()

        closers.append(close_sub)

        async def publish(u: str, msgs: list[tuple[str, int, bytes, list[tuple[str, str]]]]) -> None:
            pub = MqttClient(broker.port, protocol=version).connect()
            try:
                await asyncio.to_thread(pub.publish_all, [(f"src/{u}/{d}/t", p, h) for d, _, p, h in msgs])
            finally:
                pub.close()

        async def prepare(u: str) -> None:
            sub.subscribe(f"out/{u}/#")

        async def collect(u: str, n: int) -> list[Received]:
            await wait_until(lambda: len(sub.messages) >= n, 60, f"{n} MQTT messages")
            return sub.messages

        return Kind(
            f"mqtt{version}",
            lambda: {
                "type": "mqtt",
                "url": broker.url,
                "client_id": f"gw-{unique}",
                "protocol": 5 if version == 5 else "3.1.1",
            },
            lambda u: {"topic": f"src/{u}/{{device}}/t", "qos": 1},
            lambda u: {"topic": f"out/{u}/{{device}}", "qos": 1},
            publish,
            collect,
            prepare,
            headers=version == 5,
        )

    async def nats_kind(jetstream: bool) -> Kind:
        server: NatsServer = request.getfixturevalue("nats_server")
        nc = await nats_connect(server.url)
        closers.append(nc.close)
        sub = NatsCollector()

        async def publish(u: str, msgs: list[tuple[str, int, bytes, list[tuple[str, str]]]]) -> None:
            items = [(f"src.{u}.{d}.t", p, h) for d, _, p, h in msgs]
            await (js_publish_all(nc, items) if jetstream else publish_all(nc, items))

        async def prepare(u: str) -> None:
            if jetstream:
                await nc.jetstream().add_stream(name=f"OUT_{u}", subjects=[f"out.{u}.>"])
            else:
                await sub.subscribe(nc, f"out.{u}.>")

        async def collect(u: str, n: int) -> list[Received]:
            if jetstream:
                return await stream_messages(nc, f"OUT_{u}", f"out.{u}.>", n, timeout=60)
            await wait_until(lambda: len(sub.messages) >= n, 60, f"{n} NATS messages")
            return sub.messages

        return Kind(
            "jetstream" if jetstream else "nats",
            lambda: {"type": "nats", "servers": [server.url]},
            (lambda u: {"subject": f"src.{u}.{{device}}.t", "stream": f"SRC_{u}", "durable": f"gw_{u}"})
            if jetstream
            else (lambda u: {"subject": f"src.{u}.{{device}}.t"}),
            (lambda u: {"subject": f"out.{u}.{{device}}", "jetstream": True})
            if jetstream
            else (lambda u: {"subject": f"out.{u}.{{device}}"}),
            publish,
            collect,
            prepare,
            durable=jetstream,
            preload=jetstream,
        )

    def kafka(driver: str) -> Kind:
        broker: Tansu = request.getfixturevalue("kafka_broker")
        bootstrap = broker.bootstrap

        async def publish(u: str, msgs: list[tuple[str, int, bytes, list[tuple[str, str]]]]) -> None:
            for dev in DEVICES:  # one topic per device: the source pattern captures it
                await produce_all(bootstrap, f"src.{u}.{dev}", [(d.encode(), p, h) for d, _, p, h in msgs if d == dev])

        async def prepare(u: str) -> None:
            await create_topics(bootstrap, [f"out-{u}"], OUT_PARTITIONS)

        async def collect(u: str, n: int) -> list[Received]:
            records = await read_records(bootstrap, f"out-{u}", n, partitions=OUT_PARTITIONS, timeout=60)
            return [as_received(r) for r in records]

        return Kind(
            f"kafka-{driver}",
            lambda: {
                "type": "kafka",
                "driver": driver,
                "bootstrap_servers": [broker.bootstrap],
                "session_timeout_ms": 6000,
                "idempotent": False,
            },
            lambda u: {"topic": f"src.{u}.{{device}}", "group": f"g-{u}"},
            lambda u: {"topic": f"out-{u}", "key": "{device}"},
            publish,
            collect,
            prepare,
            keys=True,
            preload=True,
        )

    class Lazy(dict[str, Kind]):
        async def get_kind(self, name: str) -> Kind:
            if name not in self:
                if name in ("mqtt5", "mqtt311"):
                    self[name] = mqtt(5 if name == "mqtt5" else 4)
                elif name in ("nats", "jetstream"):
                    self[name] = await nats_kind(name == "jetstream")
                else:
                    self[name] = kafka(name.partition("-")[2])
            return self[name]

    lazy = Lazy()
    yield lazy
    for close in closers:
        await close()


KINDS = ["mqtt5", "mqtt311", "nats", "jetstream", "kafka-confluent", "kafka-aiokafka"]


async def _gateway(cfg: str) -> Gateway:
    gw = Gateway(parse_config(cfg))
    await gw.start()
    await gw.wait_ready(30)
    return gw


@pytest.mark.parametrize("name", KINDS)
async def test_as_sink_delivers_all_in_order_with_headers(kinds: Any, name: str, unique: str) -> None:
    kind: Kind = await kinds.get_kind(name)
    await kind.prepare_target(unique)
    mem = MemoryBroker.named(f"mem-{unique}")
    sent = messages()
    for dev, _, payload, headers in sent:
        mem.publish(f"in/{dev}", payload, headers)
    gw = await _gateway(config(kind, unique, as_source=False))
    try:
        got = await kind.collect(unique, N)
        check_delivery(got, N, headers=kind.headers, keys=kind.keys)
        await wait_until(lambda: len(mem.acked) == N, 30, "every source message acked")
        stats = gw.routes["r"].stats
        assert (stats.received, stats.acked, stats.failed) == (N, N, 0)
    finally:
        assert await gw.stop()


@pytest.mark.parametrize("name", KINDS)
async def test_as_source_delivers_and_acknowledges(kinds: Any, name: str, unique: str) -> None:
    kind: Kind = await kinds.get_kind(name)
    if name == "jetstream":
        await add_stream(kind.connector()["servers"][0], f"SRC_{unique}", [f"src.{unique}.>"])
    mem = MemoryBroker.named(f"mem-{unique}")
    cfg = config(kind, unique, as_source=True)
    sent = messages()
    if kind.preload:
        await kind.publish(unique, sent)
    gw = await _gateway(cfg)
    try:
        if not kind.preload:
            await kind.publish(unique, sent)
        await wait_until(lambda: len(mem.received) >= N, 60, f"{N} messages at the memory sink")
        got = [Received(r.topic, r.payload, r.headers or []) for r in mem.received]
        check_delivery(got, N, headers=kind.headers)
        assert {r.topic for r in mem.received} == {f"in/{d}" for d in DEVICES}
    finally:
        assert await gw.stop()
    if not kind.durable:
        return
    # Acknowledged means gone: a restart delivers the next messages, not the old ones again.
    mem.received.clear()
    marker = [(d, N, f"{d}:{N}".encode(), [("seq", str(N)), ("device", d)]) for d in DEVICES]
    gw = await _gateway(cfg)
    try:
        await kind.publish(unique, marker)
        await wait_until(lambda: len(mem.received) >= len(DEVICES), 60, "the marker messages")
        assert sorted(r.payload for r in mem.received) == sorted(p for _, _, p, _ in marker), "redelivered"
    finally:
        assert await gw.stop()


@pytest.mark.parametrize("name", ["mqtt5", "mqtt311", "jetstream", "kafka-confluent"])
async def test_source_not_acknowledged_before_target_confirmed(kinds: Any, name: str, unique: str) -> None:
    kind: Kind = await kinds.get_kind(name)
    if name == "jetstream":
        await add_stream(kind.connector()["servers"][0], f"SRC_{unique}", [f"src.{unique}.>"])
    mem = MemoryBroker.named(f"mem-{unique}")
    mem.hold = True  # the target accepts but never confirms
    cfg = config(kind, unique, as_source=True, max_in_flight=100)
    sent = messages(400)
    if kind.preload:
        await kind.publish(unique, sent)
    gw = await _gateway(cfg)
    if not kind.preload:
        await kind.publish(unique, sent)
    route = gw.routes["r"]
    await wait_until(lambda: route.in_flight >= 100, 30, "the route budget to fill")
    assert route.in_flight <= 100 + 2000, "budget ignored"  # one fetch may overshoot, never unbounded
    assert route.stats.acked == 0
    assert not await gw.stop(timeout=0.5), "a held target cannot drain"
    # Restart with a working target: everything comes (again), nothing is lost.
    mem.received.clear()
    mem.release()
    gw = await _gateway(cfg)
    try:
        await wait_until(lambda: len({r.payload for r in mem.received}) >= 400, 60, "all 400 after restart")
    finally:
        assert await gw.stop()
