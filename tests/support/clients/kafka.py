"""Kafka test clients: aiokafka for topics, producers and readers; librdkafka (confluent-kafka) for
the connection checks of the secure brokers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Mapping
from typing import Any

import confluent_kafka as ck
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.support.messages import Received, device_of, headers, payload

Headers = list[tuple[str, str]]


async def create_topics(
    bootstrap: str, names: Iterable[str], partitions: int = 3, *, configs: Mapping[str, str] | None = None
) -> None:
    """Create the topics (``configs``: topic settings such as ``cleanup.policy``)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name=n, num_partitions=partitions, replication_factor=1, topic_configs=dict(configs or {}))
                for n in names
            ]
        )
    finally:
        await admin.close()


async def kafka_producer(bootstrap: str, **options: Any) -> AIOKafkaProducer:
    """A started producer: ``acks=all``, ``linger_ms=5`` unless ``options`` say otherwise."""
    producer = AIOKafkaProducer(**{"bootstrap_servers": bootstrap, "acks": "all", "linger_ms": 5, **options})
    await producer.start()
    return producer


async def produce(producer: AIOKafkaProducer, records: Iterable[tuple[str, int]], *, devices: int) -> set[int]:
    """Send (topic, seq) records keyed by device; returns the seqs the broker acknowledged."""
    futs = []
    for topic, seq in records:
        fut = await producer.send(
            topic,
            payload(seq, devices),
            key=device_of(seq, devices).encode(),
            headers=[(k, v.encode()) for k, v in headers(seq, devices)],
        )
        futs.append((seq, fut))
    accepted: set[int] = set()
    for seq, fut in futs:
        await fut
        accepted.add(seq)
    return accepted


async def produce_all(bootstrap: str, topic: str, items: Iterable[tuple[bytes | None, bytes, Headers | None]]) -> None:
    """Send (key, payload, headers) records with a producer of their own; returns once all were acknowledged."""
    producer = await kafka_producer(bootstrap)
    try:
        futs = [
            await producer.send(topic, p, key=k, headers=[(a, b.encode()) for a, b in h] if h else None)
            for k, p, h in items
        ]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


def as_received(record: ConsumerRecord[Any, Any]) -> Received:
    """A record as the tests compare it: grouped by key, headers decoded, ``where`` its topic."""
    key = record.key
    hdrs = [(k, (v or b"").decode()) for k, v in (record.headers or ())]
    return Received(
        key.decode() if key is not None else "",
        record.value or b"",
        hdrs,
        key=key,
        where=record.topic,
        partition=record.partition,
        offset=record.offset,
    )


async def read_records(
    bootstrap: str, topic: str, n: int | None = None, *, partitions: int = 1, timeout: float = 30.0
) -> list[ConsumerRecord[Any, Any]]:
    """The records of ``topic`` from the beginning (no group), as aiokafka gives them (``None`` kept).

    Until ``n`` records, or (``n`` None) up to the fetch high watermark of every partition, or
    ``timeout`` s: the caller asserts on what came. The high watermark and not ``end_offsets``:
    a durable Tansu's ListOffsets "latest" is off (see ``test_tansu_durable``).
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    out: list[ConsumerRecord[Any, Any]] = []
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while n is None or len(out) < n:
                    for records in (await consumer.getmany(timeout_ms=300, max_records=10_000)).values():
                        out.extend(records)
                    if n is None and await _at_high_watermark(consumer, tps):
                        break
    finally:
        await consumer.stop()
    return out


async def _at_high_watermark(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> bool:
    marks = [consumer.highwater(tp) for tp in tps]
    if any(m is None for m in marks):
        return False
    return all([await consumer.position(tp) >= m for tp, m in zip(tps, marks, strict=True)])


class KafkaCollector:
    """Reads every partition of a topic from the beginning (manual assignment, no group) into ``messages``.

    ``reconnect``: a failing consumer (its broker restarted) is rebuilt and goes on from the next
    offset it had not read, the failures counted in ``errors``; otherwise the first failure ends the
    collector and is raised by :meth:`distinct` and :meth:`stop`.
    """

    def __init__(self, bootstrap: str, topic: str, partitions: int, *, reconnect: bool = False) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.partitions = partitions
        self.reconnect = reconnect
        self.messages: list[Received] = []
        self.errors: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> KafkaCollector:
        consumer = self._consumer()
        await consumer.start()  # the first start fails the test at once if the broker is not there
        self._task = asyncio.create_task(self._run(consumer))
        return self

    def _consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            request_timeout_ms=5000,
            fetch_max_wait_ms=100,
        )

    async def _run(self, first: AIOKafkaConsumer) -> None:
        tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        position: dict[TopicPartition, int] = {}
        consumer: AIOKafkaConsumer | None = first
        while True:
            try:
                if consumer is None:
                    consumer = self._consumer()
                    await consumer.start()
                consumer.assign(tps)
                for tp, offset in position.items():
                    consumer.seek(tp, offset)
                while True:
                    batches = await consumer.getmany(timeout_ms=200, max_records=5000)
                    for tp, records in batches.items():
                        self.messages.extend(as_received(r) for r in records)
                        if records:
                            position[tp] = records[-1].offset + 1
            except Exception as exc:
                if not self.reconnect:
                    raise
                self.errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.2)
            finally:
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        await consumer.stop()
                consumer = None

    def distinct(self) -> int:
        task = self._task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise AssertionError(f"Kafka collector failed: {task.exception()!r}")
        return len({m.payload for m in self.messages})

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # surface a consumer failure instead of hiding it
                raise AssertionError(f"Kafka collector failed: {exc!r}") from exc


# ------------------------------------------------------------------ librdkafka (confluent-kafka)


def kafka_roundtrip(conf: dict[str, Any], topic: str, value: bytes) -> bytes:
    """Produce ``value`` to partition 0 of ``topic`` with librdkafka settings ``conf`` and read it back
    (assign(), no group join: Tansu's joins are slow)."""
    producer = ck.Producer(conf)
    delivered: list[ck.KafkaError | None] = []
    producer.produce(topic, value, partition=0, on_delivery=lambda err, msg: delivered.append(err))
    assert producer.flush(15) == 0
    assert delivered == [None]
    consumer = ck.Consumer({**conf, "group.id": f"g-{topic}", "enable.auto.commit": False})
    try:
        consumer.assign([ck.TopicPartition(topic, 0, ck.OFFSET_BEGINNING)])
        msg = consumer.poll(15)
        assert msg is not None and msg.error() is None, msg and msg.error()
        return bytes(msg.value() or b"")
    finally:
        consumer.close()


def kafka_errors(conf: dict[str, Any], timeout: float = 10.0) -> list[ck.KafkaError]:
    """The errors librdkafka reports for a producer with ``conf`` once it reports any (fails if none)."""
    errors: list[ck.KafkaError] = []
    producer = ck.Producer({**conf, "error_cb": errors.append, "log_level": 0})
    deadline = time.monotonic() + timeout
    while not errors and time.monotonic() < deadline:
        producer.poll(0.05)
    assert errors, "expected the connection to fail"
    return errors
