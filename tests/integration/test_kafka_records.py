"""Kafka records as real producers write them, and records one route cannot carry, against real Tansu.

The gateway runs in-process with the in-memory connector on the other side
(as the conformance suite does), so each case tests the Kafka connector alone:

- partitions holding batches that cannot be decoded (a header name that is
  not UTF-8, corrupt gzip and snappy batches) between good records, with both
  consumer drivers (librdkafka and aiokafka): the good records
  of every partition arrive in order, each unreadable record is dead-lettered
  with its position, the consumer never reconnects, and the group's commit
  goes past them;
- the sink's ``compression``, each codec with both drivers: every record read
  back by a plain consumer, and the stored batches really carry the codec;
- messages the sink cannot produce (an illegal topic name, a header name or
  value it cannot encode, a tombstone without a key, a payload over
  ``max_request_size``) fail alone, with both drivers: the others arrive in
  order, and the producer session is never restarted for them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from connectors.memory.broker import MemoryBroker
from gateway import Gateway
from gateway.config import parse_config
from gateway.core.stats import RouteStats
from tests.support.brokers import Tansu
from tests.support.clients.kafka import create_topics, read_records
from tests.support.kafka_batches import CODEC_IDS, CODECS, Rec, batch_codecs, raw_batch, send_raw
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(90)]


def kafka_connector(broker: Tansu, **extra: Any) -> dict[str, Any]:
    return {
        "type": "kafka",
        "bootstrap_servers": [broker.bootstrap],
        "idempotent": False,  # Tansu grants no producer ids
        "session_timeout_ms": 6000,  # Tansu completes a join after about half of it
        "heartbeat_interval_ms": 1000,
        **extra,
    }


def config(unique: str, connectors: dict[str, Any], routes: list[dict[str, Any]]) -> str:
    body = {
        "gateway": {"id": f"kr-{unique}", "shutdown_timeout": 10, "reconnect": {"initial": 0.05, "max": 1}},
        "connectors": connectors,
        "routes": routes,
    }
    return json.dumps(body)  # JSON is YAML's flow style


async def running(cfg: str) -> Gateway:
    gw = Gateway(parse_config(cfg))
    await gw.start()
    await gw.wait_ready(30)
    return gw


def balanced(stats: RouteStats, in_flight: int = 0) -> bool:
    s = stats
    dropped = s.dropped_overflow + s.dropped_released
    return s.received == s.acked + s.failed + dropped + s.filtered + in_flight


@pytest.fixture
def memory(unique: str) -> AsyncIterator[MemoryBroker]:
    MemoryBroker.reset()
    yield MemoryBroker.named(f"mem-{unique}")
    MemoryBroker.reset()


# ---------------------------------------------------------------- source: records aiokafka cannot decode


@pytest.mark.parametrize("driver", ["confluent", "aiokafka"])
async def test_unreadable_records_fail_alone(
    kafka_broker: Tansu, memory: MemoryBroker, unique: str, driver: str
) -> None:
    """p0: 10 good records, a batch marked gzip that is not, 10 good; p1: 10 good, a batch whose second
    record has a header name that is not UTF-8, 10 good; p2: 10 good, a batch marked snappy that is not,
    10 good. Both drivers: librdkafka refetches the gzip batch forever and skips the snappy one whole,
    aiokafka raises for either; each record of them fails alone all the same."""
    topic = f"kr-poison-{unique}"
    await create_topics(kafka_broker.bootstrap, [topic], 3)

    def good(p: int, seqs: range) -> list[tuple[int, Rec]]:
        return [(p, (None, f"p{p}-{i}".encode(), [("seq", str(i).encode())])) for i in seqs]

    async def produce(items: list[tuple[int, Rec]]) -> None:
        for p, rec in items:  # one batch each, in this order
            await send_raw(kafka_broker.bootstrap, topic, p, raw_batch([rec]))

    await produce(good(0, range(10)) + good(1, range(10)) + good(2, range(10)))
    await send_raw(kafka_broker.bootstrap, topic, 0, raw_batch([(None, b"p0-gz", [])], codec=CODEC_IDS["gzip"]))
    bad_name = "@@NAME@@"
    await send_raw(
        kafka_broker.bootstrap,
        topic,
        1,
        raw_batch(
            [(None, b"p1-mixed-a", []), (None, b"p1-bad", [(bad_name, b"v")]), (None, b"p1-mixed-b", [])],
            header_name_bytes={bad_name: b"\xff" * len(bad_name)},
        ),
    )
    await send_raw(
        kafka_broker.bootstrap,
        topic,
        2,
        raw_batch([(None, b"p2-s1", []), (None, b"p2-s2", [])], codec=CODEC_IDS["snappy"]),
    )
    await produce(good(0, range(10, 20)) + good(1, range(10, 20)) + good(2, range(10, 20)))

    cfg = config(
        unique,
        {"k": kafka_connector(kafka_broker, driver=driver), "mem": {"type": "memory", "broker": memory.name}},
        [
            {
                "name": "r",
                "from": {"connector": "k", "topic": topic, "group": f"g-{unique}"},
                "to": {"connector": "mem", "topic": "got"},
                "dead_letter": {"connector": "mem", "topic": "dead"},
            }
        ],
    )
    gw = await running(cfg)
    route = gw.routes["r"]
    try:
        # 60 good records, and the unreadable ones dead-lettered (how many of the p1 batch depends on
        # how far aiokafka decodes it; the snappy batch is unreadable as a whole).
        await wait_until(lambda: sum(r.topic == "got" for r in memory.received) >= 60, 40, "the good records")
        await wait_until(lambda: route.in_flight == 0 and route.stats.received >= 65, 20, "the unreadable ones")
        got = [r.payload.decode() for r in memory.received if r.topic == "got"]
        dead = [r for r in memory.received if r.topic == "dead"]
        for p in range(3):
            expected = [f"p{p}-{i}" for i in range(20)]
            assert [x for x in got if x in expected] == expected, f"partition {p} out of order or incomplete"
        assert "p1-bad" not in got
        positions = [dict(r.headers or [])["x-gateway-source-position"] for r in dead]
        assert f"{topic}/1/11" in positions, positions  # the record with the bad header name
        assert f"{topic}/2/10" in positions and f"{topic}/2/11" in positions, positions  # the snappy batch
        assert f"{topic}/0/10" in positions, positions  # the gzip one
        for r in dead:
            h = dict(r.headers or [])
            assert r.payload == b"" and "cannot be read" in h["x-gateway-error"], h
        # In the p1 batch (offsets 10-12) the record before the bad one arrives; the one after it is
        # dead-lettered too, as aiokafka decodes a batch from its start to skip to an offset (and so
        # stumbles on 11 again): each of them exactly once, one way or the other.
        assert "p1-mixed-a" in got and f"{topic}/1/10" not in positions
        assert ("p1-mixed-b" in got) != (f"{topic}/1/12" in positions)
        stats = route.stats
        assert stats.failed == stats.dead_lettered == len(dead) >= 4
        assert stats.received == len(got) + len(dead) == 60 + 1 + 3 + 2
        assert balanced(stats, route.in_flight)
        kafka = gw.connectors["k"]
        assert kafka.reconnects == 0, kafka.last_error
        assert kafka.counters()["unreadable_records"] == len(dead)
    finally:
        assert await gw.stop()
    # Committed past everything: a restart of the group reads nothing again.
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, group_id=f"g-{unique}")
    await consumer.start()
    try:
        committed = [await consumer.committed(TopicPartition(topic, p)) for p in range(3)]
    finally:
        await consumer.stop()
    assert committed == [21, 23, 22], committed


# ---------------------------------------------------------------- sink: compression, both drivers

N_COMPRESSED = 500


async def read_values(bootstrap: str, topic: str) -> list[tuple[bytes, list[tuple[str, bytes]]]]:
    return [(r.value or b"", list(r.headers)) for r in await read_records(bootstrap, topic)]


@pytest.mark.parametrize("driver", ["confluent", "aiokafka"])
async def test_sink_compression_read_back(kafka_broker: Tansu, memory: MemoryBroker, unique: str, driver: str) -> None:
    """One Kafka connector per codec; a plain consumer reads every record back with its headers, and the
    stored batches carry the codec."""
    topics = {codec: f"kr-z-{driver}-{codec}-{unique}" for codec in CODECS}
    await create_topics(kafka_broker.bootstrap, topics.values(), 1)
    connectors: dict[str, Any] = {"mem": {"type": "memory", "broker": memory.name}}
    routes = []
    for codec, topic in topics.items():
        connectors[f"k_{codec}"] = kafka_connector(kafka_broker, driver=driver, compression=codec, linger_ms=20)
        routes.append(
            {
                "name": f"r-{codec}",
                "from": {"connector": "mem", "topic": "in/#"},
                "to": {"connector": f"k_{codec}", "topic": topic},
            }
        )
    for i in range(N_COMPRESSED):
        memory.publish(f"in/{i % 4}", f"reading {i:05d} ".encode() * 8, [("seq", str(i)), ("bin", "\udcff\x00")])
    gw = await running(config(unique, connectors, routes))
    try:
        await wait_until(lambda: len(memory.acked) == N_COMPRESSED, 40, "every message acknowledged")
        for codec, topic in topics.items():
            got = await read_values(kafka_broker.bootstrap, topic)
            assert [int(dict(r[1])["seq"]) for r in got] == list(range(N_COMPRESSED)), f"{codec}: order or loss"
            assert all(dict(r[1])["bin"] == b"\xff\x00" for r in got), f"{codec}: binary header altered"
            assert all(r[0] == f"reading {int(dict(r[1])['seq']):05d} ".encode() * 8 for r in got)
            codecs = set(await batch_codecs(kafka_broker.bootstrap, topic))
            assert codecs == {CODEC_IDS[codec]}, f"{codec}: stored batches have codecs {codecs}"
            stats = gw.routes[f"r-{codec}"].stats
            assert (stats.received, stats.acked, stats.failed) == (N_COMPRESSED, N_COMPRESSED, 0)
    finally:
        assert await gw.stop()


# ---------------------------------------------------------------- sink: messages it cannot produce


@pytest.mark.parametrize("driver", ["confluent", "aiokafka"])
async def test_sink_fails_only_the_message_it_cannot_produce(
    kafka_broker: Tansu, memory: MemoryBroker, unique: str, driver: str
) -> None:
    topic = f"kr-bad-{driver}-{unique}"
    await create_topics(kafka_broker.bootstrap, [topic, f"{topic}.ok"], 1)
    cfg = config(
        unique,
        {
            "k": kafka_connector(kafka_broker, driver=driver, max_request_size=4096),
            "mem": {"type": "memory", "broker": memory.name},
        },
        [
            {  # "a\n" passes the core's name check (a regex `$` matches before a final newline): the
                # sink's own check stops it
                "name": "named",
                "from": {"connector": "mem", "topic": "named/{x}"},
                "to": {"connector": "k", "topic": f"{topic}.{{x}}"},
            },
            {
                "name": "plain",
                "from": {"connector": "mem", "topic": "plain/#"},
                "to": {"connector": "k", "topic": topic, "tombstones": True},
            },
        ],
    )
    good = named_good = 0
    for i in range(60):
        kind = i % 6
        if kind == 1:
            memory.publish("named/a\n", f"bad-topic {i}".encode())
        elif kind == 2:
            # no UTF-8 for a lone surrogate: in a value it cannot be encoded; in a name, librdkafka would
            # crash the process (a segfault), so the sink must refuse it first
            bad = ("h", "\ud800") if i % 12 == 2 else ("h\udcff", "x")
            memory.publish("plain/x", f"bad-header {i}".encode(), [bad])
        elif kind == 3:
            memory.publish("plain/x", b"")  # a tombstone, but no key
        elif kind == 4:
            memory.publish("plain/x", b"x" * 5000)  # over max_request_size
        elif kind == 5:
            memory.publish("named/ok", f"good {named_good}".encode())
            named_good += 1
        else:
            memory.publish("plain/x", f"good {good}".encode(), [("seq", str(good))])
            good += 1
    gw = await running(cfg)
    try:
        await wait_until(lambda: len(memory.acked) == 60, 40, "every message settled")
        got = await read_values(kafka_broker.bootstrap, topic)
        assert [v.decode() for v, _ in got] == [f"good {i}" for i in range(good)]
        got = await read_values(kafka_broker.bootstrap, f"{topic}.ok")
        assert [v.decode() for v, _ in got] == [f"good {i}" for i in range(named_good)]
        named, plain = gw.routes["named"].stats, gw.routes["plain"].stats
        assert (named.failed, plain.failed) == (10, 30), (named, plain)
        assert (named.acked, plain.acked) == (10, 10)
        assert balanced(named) and balanced(plain)
        assert gw.connectors["k"].reconnects == 0, gw.connectors["k"].last_error
    finally:
        assert await gw.stop()
