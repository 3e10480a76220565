"""Independent broker clients for tests: what a device, a service or a data job would use.

The gateway's own connectors are never used to check the gateway: MQTT goes
through paho-mqtt, NATS through nats-py, Kafka through aiokafka. Each
adapter offers the same four operations so that one conformance suite runs
against every connector kind.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import confluent_kafka as ck
import nats
import paho.mqtt.client as paho
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from nats.js.api import StreamConfig
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

Headers = list[tuple[str, str]]


@dataclass
class Received:
    topic: str
    payload: bytes
    headers: Headers = field(default_factory=list)
    key: bytes | None = None


async def wait_for(predicate: Any, timeout: float, what: str = "condition") -> None:
    """Poll ``predicate()`` on the event loop until true; fail with ``what`` after ``timeout`` s."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


class MqttClient:
    """paho-mqtt in its own network thread; received messages are appended to ``received``."""

    def __init__(self, url_port: int, *, client_id: str = "", version: int = 5) -> None:
        proto = paho.MQTTv5 if version == 5 else paho.MQTTv311
        self.version = version
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.port = url_port

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        headers = list(getattr(props, "UserProperty", []) or []) if props is not None else []
        with self._lock:
            self.received.append(Received(msg.topic, bytes(msg.payload), headers))

    def connect(self) -> None:
        if self.version == 5:
            self.client.connect("127.0.0.1", self.port, clean_start=True)
        else:
            self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic, qos=qos)
        if not self._subscribed.wait(10):
            raise AssertionError(f"no SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes, qos: int = 1, headers: Headers | None = None) -> paho.MQTTMessageInfo:
        props = None
        if headers and self.version == 5:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = headers
        return self.client.publish(topic, payload, qos=qos, properties=props)

    def publish_all(self, items: list[tuple[str, bytes, Headers | None]], qos: int = 1) -> None:
        infos = [self.publish(t, p, qos, h) for t, p, h in items]
        for info in infos:
            info.wait_for_publish(30)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class NatsClient:
    def __init__(self, url: str) -> None:
        self.url = url
        self.nc: Any = None
        self.received: list[Received] = []

    async def connect(self) -> None:
        self.nc = await nats.connect(self.url)

    async def subscribe(self, subject: str) -> None:
        async def cb(msg: Any) -> None:
            self.received.append(Received(msg.subject, msg.data, list((msg.headers or {}).items())))

        await self.nc.subscribe(subject, cb=cb)
        await self.nc.flush()

    async def publish_all(self, items: list[tuple[str, bytes, Headers | None]]) -> None:
        for i, (subject, payload, headers) in enumerate(items):
            await self.nc.publish(subject, payload, headers=dict(headers) if headers else None)
            if i % 500 == 499:
                await self.nc.flush()
        await self.nc.flush()

    async def add_stream(self, name: str, subjects: list[str]) -> None:
        await self.nc.jetstream().add_stream(StreamConfig(name=name, subjects=subjects))

    async def js_publish_all(self, items: list[tuple[str, bytes, Headers | None]]) -> None:
        js = self.nc.jetstream()
        futs = [await js.publish_async(s, p, headers=dict(h) if h else None) for s, p, h in items]
        await asyncio.gather(*futs)

    async def js_read(self, stream: str, subject: str, n: int, timeout: float = 20) -> list[Received]:
        js = self.nc.jetstream()
        sub = await js.pull_subscribe(subject, stream=stream)
        out: list[Received] = []
        async with asyncio.timeout(timeout):
            while len(out) < n:
                try:
                    msgs = await sub.fetch(min(500, n - len(out)), timeout=2)
                except nats.errors.TimeoutError:
                    continue
                for m in msgs:
                    out.append(Received(m.subject, m.data, list((m.headers or {}).items())))
                    await m.ack()
        return out

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


class KafkaClient:
    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap

    async def create_topic(self, name: str, partitions: int = 3) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        finally:
            await admin.close()

    async def produce_all(self, topic: str, items: list[tuple[bytes | None, bytes, Headers | None]]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5)
        await producer.start()
        try:
            futs = [
                await producer.send(topic, p, key=k, headers=[(a, b.encode()) for a, b in h] if h else None)
                for k, p, h in items
            ]
            await asyncio.gather(*futs)
        finally:
            await producer.stop()

    async def consume(self, topic: str, n: int, timeout: float = 30) -> list[Received]:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
        )
        await consumer.start()
        out: list[Received] = []
        try:
            async with asyncio.timeout(timeout):
                while len(out) < n:
                    batches = await consumer.getmany(timeout_ms=500)
                    for records in batches.values():
                        for r in records:
                            hdrs = [(k, v.decode()) for k, v in r.headers]
                            out.append(Received(r.topic, r.value or b"", hdrs, r.key))
        finally:
            await consumer.stop()
        return out


def kafka_roundtrip(conf: dict[str, Any], topic: str, payload: bytes) -> bytes:
    """Produce ``payload`` to partition 0 of ``topic`` with librdkafka settings ``conf`` and read it back
    (assign(), no group join: Tansu's joins are slow)."""
    producer = ck.Producer(conf)
    delivered: list[ck.KafkaError | None] = []
    producer.produce(topic, payload, partition=0, on_delivery=lambda err, msg: delivered.append(err))
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
