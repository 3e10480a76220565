"""Test-side broker clients and checks for the e2e suite.

Independent of the gateway's code: paho-mqtt (threaded, MQTT 5), nats-py and
aiokafka only. Messages are sequence-numbered: payload ``b"<device>:<seq>"``
with ``seq`` global and ``device = dev<seq % devices>``, plus headers
``x-seq``/``x-device``/``x-origin`` so that each message's metadata can be
matched to its payload on the other side.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import nats
import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from nats.aio.client import Client as NatsClient
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ORIGIN = "e2e"


# ------------------------------------------------------------------ messages


def device_of(seq: int, devices: int) -> str:
    return f"dev{seq % devices}"


def payload(seq: int, devices: int) -> bytes:
    return f"{device_of(seq, devices)}:{seq}".encode()


def headers(seq: int, devices: int) -> list[tuple[str, str]]:
    return [("x-seq", str(seq)), ("x-device", device_of(seq, devices)), ("x-origin", ORIGIN)]


def parse_payload(data: bytes) -> tuple[str, int]:
    device, _, seq = data.decode().partition(":")
    return device, int(seq)


@dataclass
class Received:
    """One message as a test client received it."""

    group: str
    """What order is promised within: MQTT topic, NATS subject, or Kafka key."""
    payload: bytes
    headers: list[tuple[str, str]]
    key: bytes | None = None
    where: str = ""
    """MQTT topic / NATS subject / Kafka topic."""
    partition: int | None = None
    offset: int | None = None
    """Kafka record offset: tells a duplicate record from a record read twice."""
    at: float = field(default_factory=time.monotonic)
    """When the test client got it (monotonic seconds)."""

    @property
    def seq(self) -> int:
        return parse_payload(self.payload)[1]

    @property
    def device(self) -> str:
        return parse_payload(self.payload)[0]


@dataclass
class Analysis:
    """Loss, duplicates and per-group order of a received stream against what was sent."""

    expected: int
    received: int
    distinct: int
    lost: list[int]
    unexpected: list[int]
    duplicates: int
    order_violations: list[tuple[str, int, int]] = field(default_factory=list)
    """(group, previous first-occurrence seq, this seq) where a first occurrence went backwards."""

    def summary(self) -> str:
        return (
            f"expected={self.expected} received={self.received} distinct={self.distinct} "
            f"lost={len(self.lost)} (first: {self.lost[:10]}) unexpected={len(self.unexpected)} "
            f"duplicates={self.duplicates} order_violations={len(self.order_violations)} "
            f"(first: {self.order_violations[:5]})"
        )


def analyse(received: Iterable[Received], sent: Iterable[int]) -> Analysis:
    """Order is judged on first occurrences per group (a redelivered duplicate may come late)."""
    sent_set = set(sent)
    seen: set[int] = set()
    last: dict[str, int] = {}
    violations: list[tuple[str, int, int]] = []
    total = 0
    for r in received:
        total += 1
        seq = r.seq
        if seq in seen:
            continue
        seen.add(seq)
        prev = last.get(r.group)
        if prev is not None and seq < prev:
            violations.append((r.group, prev, seq))
        last[r.group] = seq if prev is None else max(prev, seq)
    return Analysis(
        expected=len(sent_set),
        received=total,
        distinct=len(seen),
        lost=sorted(sent_set - seen),
        unexpected=sorted(seen - sent_set),
        duplicates=total - len(seen),
        order_violations=violations,
    )


def check_metadata(messages: Sequence[Received], *, devices: int, exact: bool = False) -> list[str]:
    """Each message's headers are its own (x-seq matches the payload); returns problems.

    ``exact``: the received headers are exactly ours, in order; otherwise ours must
    appear in order among them (the gateway may add its own, e.g. ``Nats-Msg-Id``).
    """
    problems: list[str] = []
    for m in messages:
        want = headers(m.seq, devices)
        got = list(m.headers)
        ok = got == want if exact else [h for h in got if h[0] in {"x-seq", "x-device", "x-origin"}] == want
        if not ok:
            problems.append(f"seq {m.seq} at {m.where}: headers {got!r}, expected {want!r}")
        if len(problems) >= 5:
            break
    return problems


def throughput(n: int, seconds: float) -> str:
    return f"{n} msgs in {seconds:.2f}s = {n / seconds:,.0f} msg/s" if seconds > 0 else f"{n} msgs"


def flow_rate(messages: Sequence[Received]) -> str:
    """Rate between the first and the last arrival (startup excluded)."""
    if len(messages) < 2:
        return "n/a"
    span = max(m.at for m in messages) - min(m.at for m in messages)
    return f"flow {len(messages) / span:,.0f} msg/s over {span:.2f}s" if span > 0 else "n/a"


async def wait_until(check: Callable[[], bool], timeout: float, what: Callable[[], str] | str) -> None:
    """Poll ``check`` (short, backing-off intervals) until true; AssertionError with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not check():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s: {what() if callable(what) else what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


# ------------------------------------------------------------------ MQTT (paho, threaded)


def _user_properties(props: Any) -> list[tuple[str, str]]:
    if props is None:
        return []
    return [(str(k), str(v)) for k, v in getattr(props, "UserProperty", [])]


class MqttClient:
    """A paho client running its network loop in a thread; MQTT 5 unless ``protocol`` says otherwise."""

    def __init__(self, port: int, client_id: str, *, protocol: int = mqtt.MQTTv5, clean_start: bool = True) -> None:
        self.port = port
        self.protocol = protocol
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.client.max_inflight_messages_set(0)  # unlimited: the broker's window applies
        self.client.max_queued_messages_set(0)
        self._clean_start = clean_start
        self._connected = threading.Event()
        self.client.on_connect = self._on_connect

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if not reason_code.is_failure:
            self._connected.set()

    def connect(self, timeout: float = 10.0) -> None:
        if self.protocol == mqtt.MQTTv5:
            self.client.connect("127.0.0.1", self.port, keepalive=30, clean_start=self._clean_start)
        else:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise AssertionError(f"MQTT client could not connect to port {self.port}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class MqttPublisher(MqttClient):
    """Publishes and records which messages the broker acknowledged (PUBACK)."""

    def __init__(self, port: int, client_id: str, **kwargs: Any) -> None:
        super().__init__(port, client_id, **kwargs)
        self._lock = threading.Lock()
        self._mid_seq: dict[int, int] = {}
        self._early: set[int] = set()
        self.accepted: set[int] = set()
        """Sequence numbers the broker acknowledged."""
        self.published = 0
        self.client.on_publish = self._on_publish

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._lock:
            seq = self._mid_seq.pop(mid, None)
            if seq is None:
                self._early.add(mid)  # PUBACK raced ahead of publish() returning the mid
            elif not reason_code.is_failure:
                self.accepted.add(seq)

    def publish(self, topic: str, seq: int, devices: int, *, qos: int = 1) -> None:
        props = None
        if self.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = headers(seq, devices)
        info = self.client.publish(topic, payload(seq, devices), qos=qos, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise AssertionError(f"paho publish failed: {mqtt.error_string(info.rc)}")
        with self._lock:
            self.published += 1
            if info.mid in self._early:
                self._early.discard(info.mid)
                self.accepted.add(seq)
            else:
                self._mid_seq[info.mid] = seq

    def wait_accepted(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.accepted) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"broker acknowledged {len(self.accepted)} of {n} publishes")
            time.sleep(0.01)


class MqttCollector(MqttClient):
    """Subscribes (QoS 1 by default) and collects what arrives, grouped by topic."""

    def __init__(self, port: int, client_id: str, topic_filter: str, *, qos: int = 1, **kwargs: Any) -> None:
        super().__init__(port, client_id, **kwargs)
        self.topic_filter = topic_filter
        self.qos = qos
        self.messages: list[Received] = []
        self._subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        self.messages.append(Received(msg.topic, bytes(msg.payload), _user_properties(props), where=msg.topic))

    def start(self, timeout: float = 10.0) -> MqttCollector:
        self.connect(timeout)
        self.client.subscribe(self.topic_filter, qos=self.qos)
        if not self._subscribed.wait(timeout):
            raise AssertionError(f"no SUBACK for {self.topic_filter}")
        return self

    def distinct(self) -> int:
        return len({m.payload for m in list(self.messages)})


# ------------------------------------------------------------------ NATS


async def nats_connect(url: str) -> NatsClient:
    return await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0, allow_reconnect=False)


class NatsCollector:
    """A core subscription collecting messages grouped by subject."""

    def __init__(self) -> None:
        self.messages: list[Received] = []

    async def cb(self, msg: Any) -> None:
        hdrs = [(k, v) for k, v in (msg.headers or {}).items()]
        self.messages.append(Received(msg.subject, msg.data, hdrs, where=msg.subject))

    async def subscribe(self, nc: NatsClient, subject: str) -> NatsCollector:
        await nc.subscribe(subject, cb=self.cb, pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30)
        await nc.flush()
        return self


def nats_subscriptions(monitor_url: str) -> list[dict[str, Any]]:
    """Every client subscription the server knows (``/connz?subs=detail``), with the client's name."""
    with urllib.request.urlopen(monitor_url + "/connz?subs=detail&limit=1000", timeout=5) as resp:
        data = json.load(resp)
    subs = []
    for conn in data.get("connections", []):
        for s in conn.get("subscriptions_list_detail", []) or []:
            subs.append({**s, "client": conn.get("name", "")})
    return subs


def nats_connection(monitor_url: str, name: str) -> dict[str, Any] | None:
    """The server's /connz entry of the client connection called ``name`` (counters: in_msgs, out_msgs)."""
    with urllib.request.urlopen(monitor_url + "/connz?limit=1000", timeout=5) as resp:
        data = json.load(resp)
    return next((c for c in data.get("connections", []) if c.get("name") == name), None)


async def wait_nats_subscription(monitor_url: str, subject: str, timeout: float = 20.0) -> None:
    """Until some client subscribed exactly ``subject`` (the gateway's core source is live)."""

    def check() -> bool:
        return any(s["subject"] == subject for s in nats_subscriptions(monitor_url))

    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"nobody subscribed {subject!r} within {timeout}s")
        await asyncio.sleep(0.05)


async def stream_messages(
    nc: NatsClient, stream: str, subject: str, expected: int, timeout: float = 30.0
) -> list[Received]:
    """Everything in ``stream`` under ``subject``, read with an ephemeral pull consumer."""
    js = nc.jetstream()
    psub = await js.pull_subscribe(subject, stream=stream)
    out: list[Received] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            try:
                msgs = await psub.fetch(batch=1000, timeout=2)
            except TimeoutError:
                continue
            for m in msgs:
                hdrs = [(k, v) for k, v in (m.headers or {}).items()]
                out.append(Received(m.subject, m.data, hdrs, where=m.subject))
            await asyncio.gather(*(m.ack() for m in msgs))
    finally:
        await psub.unsubscribe()
    return out


class JetStreamPublisher:
    """Pipelined JetStream publishes: each carries a reply subject, PubAcks are tallied as they come.

    Much faster than awaiting ``js.publish`` one by one, and still exact: ``accepted`` holds the
    seqs whose PubAck (without error) came back.
    """

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.inbox = nc.new_inbox()
        self.accepted: set[int] = set()
        self.refused: list[str] = []
        self._sub: Any = None

    async def _on_ack(self, msg: Any) -> None:
        seq = int(msg.subject.rsplit(".", 1)[1])
        try:
            ack = json.loads(msg.data) if msg.data else {"error": f"status {(msg.headers or {}).get('Status')}"}
        except ValueError:
            ack = {"error": msg.data}
        if "error" in ack:
            self.refused.append(f"{seq}: {ack['error']}")
        else:
            self.accepted.add(seq)

    async def start(self) -> JetStreamPublisher:
        self._sub = await self.nc.subscribe(self.inbox + ".*", cb=self._on_ack, pending_msgs_limit=1_000_000)
        return self

    async def publish(self, messages: Iterable[tuple[str, int]], *, devices: int, flush_every: int = 1000) -> None:
        """Publish (subject, seq) pairs; returns once the server has them (PubAcks may still be on their way)."""
        for i, (subject, seq) in enumerate(messages, start=1):
            await self.nc.publish(
                subject, payload(seq, devices), reply=f"{self.inbox}.{seq}", headers=dict(headers(seq, devices))
            )
            if i % flush_every == 0:
                await self.nc.flush()
        await self.nc.flush()

    async def wait_acks(self, n: int, timeout: float = 30.0) -> None:
        await wait_until(
            lambda: len(self.accepted) + len(self.refused) >= n,
            timeout,
            lambda: f"{len(self.accepted)} PubAcks of {n}, refused: {self.refused[:5]}",
        )

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()


async def preload_stream(
    nc: NatsClient, stream: str, subjects: list[str], messages: Sequence[tuple[str, int]], *, devices: int
) -> set[int]:
    """Create ``stream`` and store the messages (subject, seq); returns the seqs the stream acknowledged."""
    await nc.jetstream().add_stream(name=stream, subjects=subjects)
    pub = await JetStreamPublisher(nc).start()
    try:
        await pub.publish(messages, devices=devices)
        await pub.wait_acks(len(messages))
    finally:
        await pub.close()
    return pub.accepted


# ------------------------------------------------------------------ Kafka (aiokafka)


async def create_topics(bootstrap: str, names: Iterable[str], partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name=n, num_partitions=partitions, replication_factor=1) for n in names])
    finally:
        await admin.close()


async def kafka_producer(bootstrap: str) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
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


class KafkaCollector:
    """Reads every partition of a topic from the beginning (manual assignment, no group)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.topic = topic
        self.partitions = partitions
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        self.messages: list[Received] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> KafkaCollector:
        await self.consumer.start()
        self.consumer.assign([TopicPartition(self.topic, p) for p in range(self.partitions)])
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=200, max_records=5000)
            for tp, records in batches.items():
                for r in records:
                    key = r.key
                    hdrs = [(k, v.decode()) for k, v in (r.headers or ())]
                    self.messages.append(
                        Received(
                            key.decode() if key is not None else "",
                            r.value or b"",
                            hdrs,
                            key=key,
                            where=tp.topic,
                            partition=tp.partition,
                            offset=r.offset,
                        )
                    )

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
        await self.consumer.stop()


async def routez(http_url: str | None) -> dict[str, dict[str, Any]]:
    """The gateway's ``/routez``, by route name."""
    assert http_url is not None, "the gateway has no HTTP endpoint"
    async with aiohttp.ClientSession() as http, http.get(http_url + "/routez") as resp:
        body: dict[str, Any] = await resp.json()
    return {r["name"]: r for r in body["routes"]}
