"""Test clients that ride out an outage of their broker, for the broker restart tests.

Publishers send ``n`` sequence-numbered messages at a fixed rate and keep retrying while their
broker is down; ``accepted`` holds what the broker acknowledged (PUBACK, PubAck, produce
acknowledgement). Seq 0 goes alone; the rest follows once ``go`` is set (the route is known to
flow), and ``hold_at`` and later wait for ``up`` (the broker is back), so that traffic always spans
a restart. Collectors read an end point so that their own redeliveries are not counted as
duplicates (JetStream by stream sequence, Kafka by partition and offset); ``first_seen`` maps each
seq to its first arrival (monotonic seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaProducer
from nats.aio.client import Client as NatsClient
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.clients.kafka import KafkaCollector
from tests.support.clients.mqtt import MqttClient, MqttPublisher
from tests.support.clients.nats import nats_connect
from tests.support.messages import device_of, parse_payload, payload

DEVICES = 5


def seq_of(data: bytes | bytearray | memoryview | None) -> int:
    return parse_payload(bytes(data or b"-:-1"))[1]


@dataclass(frozen=True)
class Pace:
    """How a publisher sends: ``n`` messages at ``rate`` per second, holding ``hold_at`` and later until ``up``."""

    n: int
    rate: float
    hold_at: int


# ------------------------------------------------------------------ publishers


class Publisher(Protocol):
    published: int
    """Messages handed to the client library at least once (first attempts)."""
    accepted: set[int]
    retries: int
    go: asyncio.Event
    up: asyncio.Event
    """Set once the broker is back: messages from ``hold_at`` on wait for it."""

    def start(self) -> None: ...

    async def finish(self, timeout: float) -> None: ...

    async def close(self) -> None: ...


class _Paced:
    """Publishes seq 0, waits for ``go``, then seqs 1..n-1 at the rate; one retrying task per message."""

    def __init__(self, pace: Pace) -> None:
        self.pace = pace
        self.published = 0
        self.accepted: set[int] = set()
        self.retries = 0
        self.go = asyncio.Event()
        self.up = asyncio.Event()
        self._stop = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None

    async def deliver(self, seq: int) -> None:
        raise NotImplementedError

    async def _one(self, seq: int) -> None:
        while not self._stop:
            try:
                await self.deliver(seq)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.retries += 1
                await asyncio.sleep(0.2)
                continue
            self.accepted.add(seq)
            return

    def _spawn(self, seq: int) -> None:
        task = asyncio.create_task(self._one(seq))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.published = seq + 1

    async def _run(self) -> None:
        self._spawn(0)
        await self.go.wait()
        loop = asyncio.get_running_loop()
        rate = self.pace.rate
        t0 = loop.time()
        for seq in range(1, self.pace.n):
            if seq == self.pace.hold_at and not self.up.is_set():
                await self.up.wait()
                t0 = loop.time() - seq / rate
            self._spawn(seq)
            if seq % 10 == 0:
                ahead = t0 + seq / rate - loop.time()
                if ahead > 0:
                    await asyncio.sleep(ahead)

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run())

    async def finish(self, timeout: float) -> None:
        """Until every message was accepted, or ``timeout``; then stop retrying."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                if self._runner is not None:
                    await self._runner
                while self._tasks:
                    await asyncio.wait(set(self._tasks))
        self._stop = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)


class PacedJetStreamPublisher(_Paced):
    """nats-py with its own reconnects; a publish counts once its PubAck came (``Nats-Msg-Id`` dedups retries)."""

    def __init__(self, pace: Pace, url: str, subject_of: Callable[[int], str], tag: str) -> None:
        super().__init__(pace)
        self.url = url
        self.subject_of = subject_of
        self.tag = tag
        self.nc: NatsClient | None = None

    async def connect(self) -> PacedJetStreamPublisher:
        self.nc = await nats_connect(self.url, reconnect=True)
        return self

    async def deliver(self, seq: int) -> None:
        assert self.nc is not None
        await self.nc.jetstream().publish(
            self.subject_of(seq), payload(seq, DEVICES), timeout=2, headers={"Nats-Msg-Id": f"{self.tag}-{seq}"}
        )

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


class PacedKafkaPublisher(_Paced):
    """aiokafka (``acks=all``, no idempotence: Tansu grants no producer ids); a record counts once acknowledged.

    A retry after a lost acknowledgement can store a record twice: such copies are the publisher's, counted
    by reading the topic back, never charged to the gateway.
    """

    def __init__(self, pace: Pace, bootstrap: str, topic: str) -> None:
        super().__init__(pace)
        self.bootstrap = bootstrap
        self.topic = topic
        self.producer: AIOKafkaProducer | None = None

    async def connect(self) -> PacedKafkaPublisher:
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            enable_idempotence=False,
            acks="all",
            linger_ms=5,
            request_timeout_ms=5000,
            retry_backoff_ms=100,
        )
        await self.producer.start()
        return self

    async def deliver(self, seq: int) -> None:
        assert self.producer is not None
        fut = await self.producer.send(self.topic, payload(seq, DEVICES), key=device_of(seq, DEVICES).encode())
        await fut

    async def close(self) -> None:
        if self.producer is not None:
            await self.producer.stop()


class PacedMqttPublisher(MqttPublisher):
    """paho-mqtt QoS 1 in its own thread; reconnects by itself and resends what was not acknowledged.

    ``accepted`` holds the seqs whose PUBACK came back. While the broker is down paho keeps the
    publishes (at most ``inflight`` unacknowledged) and sends them after the reconnect.
    """

    def __init__(self, pace: Pace, port: int, client_id: str, topic_of: Callable[[int], str], *, inflight: int) -> None:
        # Clean start on the first connect only (paho's default): a reconnect resumes the session.
        super().__init__(
            port, client_id, keepalive=5, max_inflight=inflight, clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY
        )
        self.pace = pace
        self.topic_of = topic_of
        self.client.reconnect_delay_set(0.1, 0.5)
        self.retries = 0
        """Reconnects of the publisher (paho counts no resends)."""
        self.connects = 0
        self.go = asyncio.Event()
        self.up = asyncio.Event()
        self._go = threading.Event()
        self._up = threading.Event()
        self._stop = threading.Event()
        self._thread: asyncio.Future[None] | None = None
        self._relay: asyncio.Task[None] | None = None

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if not reason_code.is_failure:
            self.connects += 1
            self.retries = self.connects - 1
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _publish(self, seq: int) -> None:
        info = self.publish(self.topic_of(seq), payload(seq, DEVICES), qos=1)
        self.track(info, seq, allow=(mqtt.MQTT_ERR_NO_CONN,))  # NO_CONN: kept, sent on reconnect

    def _run(self) -> None:
        self._publish(0)
        while not self._go.wait(0.1):
            if self._stop.is_set():
                return
        rate = self.pace.rate
        t0 = time.monotonic()
        for seq in range(1, self.pace.n):
            if self._stop.is_set():
                return
            if seq == self.pace.hold_at:
                while not self._up.wait(0.1):
                    if self._stop.is_set():
                        return
                t0 = time.monotonic() - seq / rate
            self._publish(seq)
            if seq % 10 == 0:
                ahead = t0 + seq / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)

    async def _relay_go(self) -> None:
        await self.go.wait()
        self._go.set()
        await self.up.wait()
        self._up.set()

    def start(self) -> None:
        self._relay = asyncio.create_task(self._relay_go())
        self._thread = asyncio.ensure_future(asyncio.to_thread(self._run))

    async def _end_threads(self) -> None:
        if self._thread is not None:
            await asyncio.gather(self._thread, return_exceptions=True)
        if self._relay is not None:
            self._relay.cancel()
            await asyncio.gather(self._relay, return_exceptions=True)

    async def finish(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                if self._thread is not None:
                    await asyncio.shield(self._thread)
        while len(self.accepted) < self.published and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stop.set()
        await self._end_threads()

    async def close(self) -> None:  # async, unlike MqttClient.close: it ends the publishing thread first
        self._stop.set()
        self._go.set()
        self._up.set()
        await self._end_threads()
        await asyncio.to_thread(super().close)


# ------------------------------------------------------------------ end points


class Collector(Protocol):
    first_seen: dict[int, float]
    """seq -> when the test client first got it (monotonic)."""

    def copies(self) -> Counter[int]:
        """How many distinct copies of each seq the end point holds (or delivered)."""
        ...

    async def close(self) -> None: ...


class DurableJetStreamCollector:
    """A durable pull consumer on the end stream; copies are counted by stream sequence.

    Survives a restart of its server (nats-py reconnects; the durable keeps its place), and its own
    redeliveries (an ack lost in a kill) are not duplicates: the stream sequence tells them apart.
    """

    def __init__(self, url: str, stream: str, subject: str, durable: str) -> None:
        self.url = url
        self.stream = stream
        self.subject = subject
        self.durable = durable
        self.by_stream_seq: dict[int, int] = {}
        self.first_seen: dict[int, float] = {}
        self.errors = 0
        self.nc: NatsClient | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> DurableJetStreamCollector:
        self.nc = await nats_connect(self.url, reconnect=True)
        sub = await self.nc.jetstream().pull_subscribe(self.subject, durable=self.durable, stream=self.stream)
        self._task = asyncio.create_task(self._run(sub))
        return self

    async def _run(self, sub: Any) -> None:
        while True:
            try:
                msgs = await sub.fetch(500, timeout=1)
            except asyncio.CancelledError:
                raise
            except Exception:  # nothing new, or the server is down: ask again
                self.errors += 1
                await asyncio.sleep(0.05)
                continue
            now = time.monotonic()
            for m in msgs:
                seq = seq_of(m.data)
                self.by_stream_seq[m.metadata.sequence.stream] = seq
                self.first_seen.setdefault(seq, now)
            for m in msgs:
                with contextlib.suppress(Exception):
                    await m.ack()

    def copies(self) -> Counter[int]:
        return Counter(self.by_stream_seq.values())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.nc is not None:
            await self.nc.close()


class KafkaSeqCollector(KafkaCollector):
    """A :class:`KafkaCollector` that rebuilds its consumer when its broker restarts, read by seq:
    copies are counted by (partition, offset)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int = 1) -> None:
        super().__init__(bootstrap, topic, partitions, reconnect=True)
        self._first: dict[int, float] = {}
        self._read = 0

    @property
    def first_seen(self) -> dict[int, float]:
        end = len(self.messages)
        for m in self.messages[self._read : end]:
            self._first.setdefault(m.seq, m.at)
        self._read = end
        return self._first

    def copies(self) -> Counter[int]:
        return Counter({(m.partition, m.offset): m.seq for m in list(self.messages)}.values())

    async def close(self) -> None:
        await self.stop()


class SessionMqttCollector(MqttClient):
    """paho-mqtt QoS 1 subscriber with a persistent session (never clean start, session expiry,
    ``receive_maximum``) that reconnects by itself.

    MQTT gives no identity to tell a redelivery to this client from a second copy the gateway
    published, so every delivery counts; redeliveries to this client are bounded by its receive window.
    """

    def __init__(self, port: int, client_id: str, topic_filter: str, *, receive_maximum: int) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        props.ReceiveMaximum = receive_maximum
        # Never clean start, not even the first time (the client id is new): Mosquitto 2.0 does not
        # persist a session that began with clean start, so a SIGKILL would lose it and what it queued.
        super().__init__(port, client_id, clean_start=False, keepalive=5, connect_properties=props)
        self.topic_filter = topic_filter
        self.client.reconnect_delay_set(0.1, 0.5)
        self.deliveries: list[int] = []
        self.marked_dup = 0
        self.first_seen: dict[int, float] = {}
        self.sessions_resumed = 0
        self.connects = 0
        self._lock = threading.Lock()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            return
        self.connects += 1
        if flags.session_present:
            self.sessions_resumed += 1
        else:
            client.subscribe(self.topic_filter, qos=1)
        self._connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        seq = seq_of(msg.payload)
        now = time.monotonic()
        with self._lock:
            self.deliveries.append(seq)
            self.marked_dup += bool(msg.dup)
            self.first_seen.setdefault(seq, now)

    def start(self) -> SessionMqttCollector:
        self.connect()
        if not self._subscribed.wait(10):
            raise AssertionError(f"paho subscriber got no SUBACK for {self.topic_filter}")
        return self

    def copies(self) -> Counter[int]:
        with self._lock:
            return Counter(self.deliveries)

    async def close(self) -> None:  # async, unlike MqttClient.close: the restart tests close all alike
        await asyncio.to_thread(super().close)


async def close_all(*things: Any) -> None:
    """Close every client given (None skipped), whatever fails: teardown goes on."""
    for thing in things:
        if thing is not None:
            with contextlib.suppress(Exception):
                await thing.close()
