"""Broker restarts under traffic: each broker, in turn, killed (SIGKILL) or stopped (SIGTERM) and restarted.

Every route starts and ends at a durable endpoint, so nothing a source accepted
may be lost (DESIGN §3). Six scenarios, each once with SIGKILL and once with
SIGTERM; the broker that is restarted (the *victim*) is a dedicated instance in
``tmp_path``, the other end uses the session brokers:

==================  =========================================  ==========================
victim              route                                      end point checked
==================  =========================================  ==========================
Mosquitto (source)  MQTT QoS 1, gateway's persistent session   JetStream stream
                    → JetStream
Mosquitto (sink)    JetStream durable → MQTT QoS 1             paho, persistent session
nats-server (src)   JetStream durable → Kafka                  Kafka topic
nats-server (sink)  Kafka group → JetStream (file store)       the victim's own stream
Tansu s3 (source)   Kafka group → JetStream                    JetStream stream
Tansu s3 (sink)     MQTT QoS 1 → Kafka                         the victim's own topic
==================  =========================================  ==========================

The gateway runs in-process on the test's event loop. ``N`` sequence-numbered
messages are published at a fixed rate by independent clients (paho-mqtt,
nats-py, aiokafka) that keep retrying while their broker is down and record
what the broker *accepted* (PUBACK, PubAck, produce acknowledgement). The
first message is sent alone and must arrive before the rest follow, so that
the route is known to flow (Kafka groups take ~3 s to join on Tansu). Once a
third of the messages are out, the victim is killed or stopped, stays down for
``OUTAGE`` seconds and is started again on the same port and data directory.
The last third waits until the victim is back, so traffic always spans the
restart (Tansu 0.6 keeps serving for ~5 s after a SIGTERM before it exits).

Asserted: every accepted message arrived; duplicates are at most the route's
in-flight window (``max_in_flight``; for MQTT sources the session's receive
window, set to the same value) plus what the test's own clients may cause
(a paho publisher resends up to its in-flight window after a reconnect and
Mosquitto stores a QoS 1 resend as a new message; a paho subscriber gets
redelivered what it had not acknowledged); and the gateway never crashed: its
runner is alive and the victim's connector reconnected. Duplicates, and the
recovery times, are printed (``pytest -s``):

- *outage*: kill → the broker answers again;
- *reconnect*: kill → the gateway's connector is connected again;
- *recovery*: kill → the first message that reached the end point after the
  victim was up again (traffic flows end to end again);
- *drained*: kill → everything accepted reached the end point.

End points are read so that a test client's own redeliveries are not counted
as duplicates: JetStream by stream sequence, Kafka by (partition, offset).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import nats
import paho.mqtt.client as mqtt
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from nats.aio.client import Client as NatsClient
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import Gateway
from gateway.config import parse_config
from tests.e2e.gateway_process import kafka_connector as e2e_kafka
from tests.e2e.gateway_process import mqtt_connector as e2e_mqtt
from tests.e2e.gateway_process import nats_connector as e2e_nats
from tests.support.brokers import BrokerProcess, Mosquitto, NatsServer, Tansu

pytestmark = [pytest.mark.fault, pytest.mark.timeout(180)]

N = 3_000
"""Messages per scenario."""
RATE = 600.0
"""Messages per second: the stream lasts ~5 s, the victim goes down ~1.7 s in."""
KILL_AT = N // 3
RESUME_AT = 2 * N // 3
"""Publishers hold this message and the rest until the victim is up again."""
OUTAGE = 1.0
"""Seconds the victim stays down, so that publishers and the gateway really retry."""
WINDOW = 500
"""The route's ``max_in_flight`` (and, for MQTT sources, the session's ``receive_maximum``)."""
PUB_INFLIGHT = 50
"""paho publisher: QoS 1 publishes awaiting PUBACK (resent after a reconnect)."""
SUB_RECEIVE_MAX = 100
"""paho subscriber: QoS 1 messages the broker may have unacknowledged with it (redelivered after a restart)."""
DRAIN_TIMEOUT = 60.0
STALL = 25.0
HOW = ["sigkill", "sigterm"]


def payload(seq: int) -> bytes:
    return str(seq).encode()


def seq_of(data: bytes | bytearray | memoryview | None) -> int:
    return int(bytes(data or b"-1"))


async def wait_until(check: Callable[[], bool], timeout: float, what: Callable[[], str] | str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s: {what() if callable(what) else what}")
        await asyncio.sleep(0.02)


async def _quiet(*args: Any) -> None:
    """nats-py callbacks: the tests count outcomes themselves; reconnect noise is expected."""


# ------------------------------------------------------------------ the victim


def bounce(victim: BrokerProcess, how: str, outage: float = OUTAGE) -> None:
    """SIGKILL (or SIGTERM) the victim, keep it down ``outage`` s, start it on the same port and data dir.

    ``BrokerProcess`` methods only touch the broker process itself: a durable Tansu's object store
    keeps running (``Tansu.stop`` would stop the store too).
    """
    if how == "sigkill":
        BrokerProcess.kill(victim)
    else:
        BrokerProcess.stop(victim, timeout=20)
    time.sleep(outage)
    victim.start(timeout=30)


def durable_mosquitto(tmp: Any) -> Mosquitto:
    """Saves its DB on every change, so that a SIGKILL keeps (nearly) all it acknowledged."""
    return Mosquitto(workdir=tmp / "mosquitto", autosave_interval=1, extra_config="autosave_on_changes true")


# ------------------------------------------------------------------ publishers


class Publisher(Protocol):
    published: int
    """Messages handed to the client library at least once (first attempts)."""
    accepted: set[int]
    retries: int
    go: asyncio.Event
    up: asyncio.Event
    """Set once the victim is back: the last third waits for it, so traffic always spans the restart."""

    def start(self) -> None: ...

    async def finish(self, timeout: float) -> None: ...

    async def close(self) -> None: ...


class _Paced:
    """Publishes seq 0, waits for ``go``, then seqs 1..N-1 at ``RATE``; one retrying task per message."""

    def __init__(self) -> None:
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
        t0 = loop.time()
        for seq in range(1, N):
            if seq == RESUME_AT and not self.up.is_set():
                await self.up.wait()
                t0 = loop.time() - seq / RATE
            self._spawn(seq)
            if seq % 10 == 0:
                ahead = t0 + seq / RATE - loop.time()
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


class JetStreamPublisher(_Paced):
    """nats-py with its own reconnects; a publish counts once its PubAck came (``Nats-Msg-Id`` dedups retries)."""

    def __init__(self, url: str, subject_of: Callable[[int], str], tag: str) -> None:
        super().__init__()
        self.url = url
        self.subject_of = subject_of
        self.tag = tag
        self.nc: NatsClient | None = None

    async def connect(self) -> JetStreamPublisher:
        self.nc = await nats_client(self.url)
        return self

    async def deliver(self, seq: int) -> None:
        assert self.nc is not None
        await self.nc.jetstream().publish(
            self.subject_of(seq), payload(seq), timeout=2, headers={"Nats-Msg-Id": f"{self.tag}-{seq}"}
        )

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


class KafkaPublisher(_Paced):
    """aiokafka (``acks=all``, no idempotence: Tansu grants no producer ids); a record counts once acknowledged.

    A retry after a lost acknowledgement can store a record twice: such copies are the publisher's, counted
    by reading the topic back, never charged to the gateway.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__()
        self.bootstrap = bootstrap
        self.topic = topic
        self.producer: AIOKafkaProducer | None = None

    async def connect(self) -> KafkaPublisher:
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
        fut = await self.producer.send(self.topic, payload(seq), key=f"dev{seq % 5}".encode())
        await fut

    async def close(self) -> None:
        if self.producer is not None:
            await self.producer.stop()


class MqttPublisher:
    """paho-mqtt QoS 1 in its own thread; reconnects by itself and resends what was not acknowledged.

    ``accepted`` holds the seqs whose PUBACK came back. While the broker is down paho keeps the
    publishes and sends them after the reconnect.
    """

    def __init__(self, port: int, client_id: str, topic_of: Callable[[int], str]) -> None:
        self.port = port
        self.topic_of = topic_of
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(PUB_INFLIGHT)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_publish = self._on_publish
        self.client.on_connect = self._on_connect
        self.published = 0
        self.accepted: set[int] = set()
        self.retries = 0
        """Reconnects of the publisher (paho counts no resends)."""
        self.connects = 0
        self.go = asyncio.Event()
        self.up = asyncio.Event()
        self._go = threading.Event()
        self._up = threading.Event()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._mid_seq: dict[int, int] = {}
        self._early: set[int] = set()
        self._thread: asyncio.Future[None] | None = None
        self._relay: asyncio.Task[None] | None = None

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if not reason_code.is_failure:
            self.connects += 1
            self.retries = self.connects - 1
            self._connected.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._lock:
            seq = self._mid_seq.pop(mid, None)
            if seq is None:
                self._early.add(mid)  # the PUBACK raced ahead of publish() returning the mid
            elif not reason_code.is_failure:
                self.accepted.add(seq)

    def connect(self) -> MqttPublisher:
        self.client.connect("127.0.0.1", self.port, keepalive=5)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise AssertionError(f"paho publisher could not connect to port {self.port}")
        return self

    def _publish(self, seq: int) -> None:
        info = self.client.publish(self.topic_of(seq), payload(seq), qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: kept, sent on reconnect
            raise AssertionError(f"paho publish failed: {mqtt.error_string(info.rc)}")
        with self._lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
                self.accepted.add(seq)
            else:
                self._mid_seq[info.mid] = seq
        self.published = seq + 1

    def _run(self) -> None:
        self._publish(0)
        while not self._go.wait(0.1):
            if self._stop.is_set():
                return
        t0 = time.monotonic()
        for seq in range(1, N):
            if self._stop.is_set():
                return
            if seq == RESUME_AT:
                while not self._up.wait(0.1):
                    if self._stop.is_set():
                        return
                t0 = time.monotonic() - seq / RATE
            self._publish(seq)
            if seq % 10 == 0:
                ahead = t0 + seq / RATE - time.monotonic()
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

    async def finish(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                if self._thread is not None:
                    await asyncio.shield(self._thread)
        while len(self.accepted) < self.published and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stop.set()
        if self._thread is not None:
            await asyncio.gather(self._thread, return_exceptions=True)
        if self._relay is not None:
            self._relay.cancel()
            await asyncio.gather(self._relay, return_exceptions=True)

    async def close(self) -> None:
        self._stop.set()
        self._go.set()
        self._up.set()
        if self._thread is not None:
            await asyncio.gather(self._thread, return_exceptions=True)
        if self._relay is not None:
            self._relay.cancel()
            await asyncio.gather(self._relay, return_exceptions=True)
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)


# ------------------------------------------------------------------ end points


class Collector(Protocol):
    first_seen: dict[int, float]
    """seq -> when the test client first got it (monotonic)."""

    def copies(self) -> Counter[int]:
        """How many distinct copies of each seq the end point holds (or delivered)."""
        ...

    async def close(self) -> None: ...


async def nats_client(url: str) -> NatsClient:
    return await nats.connect(
        url,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.1,
        connect_timeout=2,
        error_cb=_quiet,
        disconnected_cb=_quiet,
        reconnected_cb=_quiet,
        closed_cb=_quiet,
    )


class JetStreamCollector:
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

    async def start(self) -> JetStreamCollector:
        self.nc = await nats_client(self.url)
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


class KafkaCollector:
    """Reads the end topic with manual assignment (no group); copies are counted by (partition, offset).

    Rebuilds its consumer if it fails (its broker may be the one being restarted) and goes on from
    the next offset it had not read.
    """

    def __init__(self, bootstrap: str, topic: str, partitions: int = 1) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.partitions = partitions
        self.records: dict[tuple[int, int], int] = {}
        self.first_seen: dict[int, float] = {}
        self.errors: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> KafkaCollector:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        position: dict[TopicPartition, int] = {}
        while True:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                request_timeout_ms=5000,
                fetch_max_wait_ms=100,
            )
            try:
                await consumer.start()
                consumer.assign(tps)
                for tp, offset in position.items():
                    consumer.seek(tp, offset)
                while True:
                    batches = await consumer.getmany(timeout_ms=200, max_records=5000)
                    now = time.monotonic()
                    for tp, recs in batches.items():
                        for r in recs:
                            seq = seq_of(r.value)
                            self.records[(tp.partition, r.offset)] = seq
                            self.first_seen.setdefault(seq, now)
                        if recs:
                            position[tp] = recs[-1].offset + 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.2)
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()

    def copies(self) -> Counter[int]:
        return Counter(self.records.values())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class MqttCollector:
    """paho-mqtt QoS 1 subscriber with a persistent session (never clean start, session expiry,
    ``receive_maximum`` = ``SUB_RECEIVE_MAX``) that reconnects by itself.

    MQTT gives no identity to tell a redelivery to this client from a second copy the gateway
    published, so every delivery counts; redeliveries to this client are bounded by its receive window.
    """

    def __init__(self, port: int, client_id: str, topic_filter: str) -> None:
        self.port = port
        self.topic_filter = topic_filter
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.deliveries: list[int] = []
        self.marked_dup = 0
        self.first_seen: dict[int, float] = {}
        self.sessions_resumed = 0
        self.connects = 0
        self._subscribed = threading.Event()
        self._lock = threading.Lock()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            return
        self.connects += 1
        if flags.session_present:
            self.sessions_resumed += 1
        else:
            client.subscribe(self.topic_filter, qos=1)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        seq = seq_of(msg.payload)
        now = time.monotonic()
        with self._lock:
            self.deliveries.append(seq)
            self.marked_dup += bool(msg.dup)
            self.first_seen.setdefault(seq, now)

    def connect(self) -> MqttCollector:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        props.ReceiveMaximum = SUB_RECEIVE_MAX
        # Never clean start, not even the first time (the client id is new): Mosquitto 2.0 does not
        # persist a session that began with clean start, so a SIGKILL would lose it and what it queued.
        self.client.connect("127.0.0.1", self.port, keepalive=5, properties=props, clean_start=False)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError(f"paho subscriber got no SUBACK for {self.topic_filter}")
        return self

    def copies(self) -> Counter[int]:
        with self._lock:
            return Counter(self.deliveries)

    async def close(self) -> None:
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)


async def create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name=topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def read_topic(bootstrap: str, topic: str, partitions: int = 1, timeout: float = 30.0) -> Counter[int]:
    """Every record of ``topic`` (no group, from the beginning): copies per seq."""
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    copies: Counter[int] = Counter()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        async with asyncio.timeout(timeout):
            while True:
                batches = await consumer.getmany(timeout_ms=300, max_records=10_000)
                for recs in batches.values():
                    copies.update(seq_of(r.value) for r in recs)
                # The fetch high watermark (Tansu's ListOffsets "latest" is off, see test_tansu_durable).
                marks = [consumer.highwater(tp) for tp in tps]
                if all(m is not None for m in marks) and all(
                    [await consumer.position(tp) >= m for tp, m in zip(tps, marks, strict=True)]
                ):
                    return copies
    finally:
        await consumer.stop()


async def add_stream(url: str, name: str, subjects: list[str]) -> None:
    nc = await nats_client(url)
    try:
        await nc.jetstream().add_stream(name=name, subjects=subjects)
    finally:
        await nc.close()


# ------------------------------------------------------------------ the gateway


def gateway_config(u: str, connectors: dict[str, Any], route: dict[str, Any]) -> str:
    return yaml.safe_dump(
        {
            "gateway": {"id": f"fault-{u}", "shutdown_timeout": 10, "reconnect": {"initial": 0.1, "max": 1.0}},
            "connectors": connectors,
            "routes": [{"name": "r", "max_in_flight": WINDOW, **route}],
        },
        sort_keys=False,
    )


def mqtt_connector(url: str, client_id: str) -> dict[str, Any]:
    return e2e_mqtt(url, client_id, keepalive=5, receive_maximum=WINDOW)


def nats_connector(url: str) -> dict[str, Any]:
    return e2e_nats(url, connect_timeout=2)


def kafka_connector(bootstrap: str) -> dict[str, Any]:
    return e2e_kafka(bootstrap, request_timeout_ms=10000)


@contextlib.asynccontextmanager
async def running_gateway(config: str) -> AsyncIterator[tuple[Gateway, asyncio.Future[None]]]:
    """The gateway in-process; ``runner`` completes only if the gateway stopped (or crashed)."""
    gw = Gateway(parse_config(config, source="tests/fault"))
    await gw.start()
    runner = asyncio.ensure_future(gw.wait())
    try:
        await gw.wait_ready(30)
        yield gw, runner
    finally:
        with contextlib.suppress(Exception):
            await gw.stop(10)
        await asyncio.gather(runner, return_exceptions=True)


# ------------------------------------------------------------------ one fault run


@dataclass
class Result:
    label: str
    accepted: set[int]
    copies: Counter[int]
    source_copies: Counter[int] | None
    """Copies each seq has at the source, where the test can read them (a Kafka topic)."""
    allowance: int
    """Duplicates the test's own clients may cause (see the module docstring)."""
    timings: dict[str, float] = field(default_factory=dict)
    reconnects: int = 0
    disconnected_seen: bool = False
    runner_alive: bool = True
    stats: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    library_reconnects: bool = False
    """The victim is the source Kafka broker: aiokafka reconnects without the connector noticing (the
    confluent sink reports a lost broker, so a Tansu sink restart is checked like the others)."""

    @property
    def lost(self) -> list[int]:
        return sorted(s for s in self.accepted if self.copies[s] == 0)

    @property
    def unexpected(self) -> list[int]:
        return sorted(s for s in self.copies if not 0 <= s < N)

    @property
    def duplicates(self) -> int:
        """Copies beyond the first at the end point."""
        return sum(c - 1 for c in self.copies.values() if c > 1)

    @property
    def gateway_duplicates(self) -> int:
        """Copies beyond those the source itself holds (a source-side duplicate is not the gateway's)."""
        if self.source_copies is None:
            return self.duplicates
        return sum(max(0, c - max(1, self.source_copies[s])) for s, c in self.copies.items())

    def report(self) -> str:
        t = self.timings
        src = (
            f" source_duplicates={sum(c - 1 for c in self.source_copies.values() if c > 1)}"
            if self.source_copies is not None
            else ""
        )
        return (
            f"FAULT {self.label}: accepted={len(self.accepted)}/{N} arrived={len(self.copies)} "
            f"lost={len(self.lost)} (first {self.lost[:10]}) duplicates={self.duplicates} "
            f"gateway_duplicates={self.gateway_duplicates}{src} bound={WINDOW}+{self.allowance} | "
            f"outage={t.get('outage', -1):.2f}s reconnect={t.get('reconnect', -1):.2f}s "
            f"recovery={t.get('recovery', -1):.2f}s drained={t.get('drained', -1):.2f}s | "
            f"victim_reconnects={self.reconnects} route={self.stats} {self.notes}"
        )


async def fault_run(
    label: str,
    victim: BrokerProcess,
    how: str,
    gw: Gateway,
    runner: asyncio.Future[None],
    victim_connector: str,
    publisher: Publisher,
    collector: Collector,
    outage: float = OUTAGE,
) -> tuple[set[int], dict[str, float], int, bool]:
    """Publish, restart the victim a third of the way in, wait until everything accepted arrived."""
    conn = gw.connectors[victim_connector]
    timings: dict[str, float] = {}
    publisher.start()
    await wait_until(lambda: 0 in collector.first_seen, 45, f"{label}: the first message never arrived")
    publisher.go.set()
    await wait_until(lambda: publisher.published >= KILL_AT, 30, f"{label}: publisher stuck")

    disconnected_seen = False
    t_kill = time.monotonic()

    async def watch() -> None:
        nonlocal disconnected_seen
        while True:
            if not conn.connected.is_set():
                disconnected_seen = True
            elif conn.reconnects >= 1 and "reconnect" not in timings:
                timings["reconnect"] = time.monotonic() - t_kill
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.to_thread(bounce, victim, how, outage)
        t_up = time.monotonic()
        timings["outage"] = t_up - t_kill
        publisher.up.set()
        await publisher.finish(timeout=60)
        accepted = set(publisher.accepted)

        def arrived() -> set[int]:
            return set(collector.first_seen)

        # Bounded: until all accepted arrived, the deadline passed, or nothing new came for STALL s.
        deadline = time.monotonic() + DRAIN_TIMEOUT
        last, last_change = -1, time.monotonic()
        while not accepted <= arrived():
            now = time.monotonic()
            if len(collector.first_seen) != last:
                last, last_change = len(collector.first_seen), now
            if now > deadline or now - last_change > STALL:
                break
            await asyncio.sleep(0.05)
        timings["drained"] = time.monotonic() - t_kill
        await asyncio.sleep(1.0)  # late duplicates, if any, land in the count
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    after = [t for t in collector.first_seen.values() if t >= t_up]
    timings["recovery"] = (min(after) - t_kill) if after else -1.0
    assert not runner.done(), f"{label}: the gateway stopped running: {runner!r}"
    return accepted, timings, conn.reconnects, disconnected_seen


def check(result: Result) -> None:
    print(result.report())
    lost = result.lost
    assert not lost, f"{result.label}: {len(lost)} accepted messages lost (first {lost[:20]})"
    assert not result.unexpected, f"{result.label}: unexpected payloads {result.unexpected[:10]}"
    assert result.gateway_duplicates <= WINDOW + result.allowance, (
        f"{result.label}: {result.gateway_duplicates} duplicates exceed the in-flight window "
        f"{WINDOW} (+{result.allowance} the test clients may cause)"
    )
    assert result.runner_alive, f"{result.label}: the gateway crashed"
    if result.library_reconnects:
        # The Kafka clients (librdkafka, aiokafka) reconnect inside the library; the connection
        # itself stays up, so the proof of recovery is traffic once the victim was back.
        assert result.timings.get("recovery", -1) >= 0, f"{result.label}: nothing arrived after the restart"
    else:
        assert result.reconnects >= 1, (
            f"{result.label}: the victim's connector never reconnected (disconnect seen: {result.disconnected_seen})"
        )


def route_stats(gw: Gateway) -> dict[str, int]:
    r = gw.routes["r"]
    s = r.stats
    return {
        "received": s.received,
        "acked": s.acked,
        "failed": s.failed,
        "dropped": s.dropped,
        "in_flight": r.in_flight,
        "resubmitted": s.resubmitted,
    }


async def close_all(*things: Any) -> None:
    for thing in things:
        if thing is not None:
            with contextlib.suppress(Exception):
                await thing.close()


async def restart_scenario(
    label: str,
    victim: BrokerProcess,
    how: str,
    config: str,
    collector: Collector,
    connect: Callable[[], Awaitable[Any]],
    *,
    allowance: int,
    notes: Callable[[Any], str],
    read_source: Callable[[], Awaitable[Counter[int]]] | None = None,
    library_reconnects: bool = False,
    outage: float = OUTAGE,
) -> Result:
    """The gateway on ``config``; the publisher ``connect()`` makes; the victim restarted; the outcome.

    ``allowance``: duplicates the test's own clients may cause; ``read_source``: the source's own
    copies where it can be read (a Kafka topic); ``notes``: figures of the publisher worth printing.
    """
    publisher = None
    try:
        async with running_gateway(config) as (gw, runner):
            publisher = await connect()
            accepted, timings, reconnects, seen_down = await fault_run(
                label, victim, how, gw, runner, "victim", publisher, collector, outage
            )
            return Result(
                label,
                accepted,
                collector.copies(),
                await read_source() if read_source is not None else None,
                allowance=allowance,
                timings=timings,
                reconnects=reconnects,
                disconnected_seen=seen_down,
                runner_alive=not runner.done(),
                stats=route_stats(gw),
                notes=notes(publisher),
                library_reconnects=library_reconnects,
            )
    finally:
        await close_all(publisher)


# ------------------------------------------------------------------ the scenarios


@pytest.mark.parametrize("how", HOW)
async def test_mosquitto_source_restart(tmp_path: Any, nats_server: NatsServer, unique: str, how: str) -> None:
    """Mosquitto (victim) → JetStream: MQTT QoS 1 through the gateway's persistent session."""
    u = unique
    stream = f"FA_{u}"
    victim = durable_mosquitto(tmp_path)
    victim.start()
    collector: JetStreamCollector | None = None
    try:
        await add_stream(nats_server.url, stream, [f"fa.{u}.>"])
        collector = await JetStreamCollector(nats_server.url, stream, f"fa.{u}.>", f"col-{u}").start()
        config = gateway_config(
            u,
            {"victim": mqtt_connector(victim.url, f"gw-{u}"), "js": nats_connector(nats_server.url)},
            {
                "from": {"connector": "victim", "topic": f"fa/{u}/{{dev}}", "qos": 1},
                "to": {"connector": "js", "subject": f"fa.{u}.{{dev}}", "jetstream": True},
            },
        )
        result = await restart_scenario(
            f"mosquitto-source {how}",
            victim,
            how,
            config,
            collector,
            lambda: asyncio.to_thread(MqttPublisher(victim.port, f"pub-{u}", lambda s: f"fa/{u}/dev{s % 5}").connect),
            allowance=PUB_INFLIGHT,  # paho resends its unacknowledged window; Mosquitto stores QoS 1 twice
            notes=lambda pub: f"publisher_reconnects={pub.retries}",
        )
    finally:
        await close_all(collector)
        await asyncio.to_thread(victim.stop)
    check(result)


@pytest.mark.parametrize("how", HOW)
async def test_mosquitto_sink_restart(tmp_path: Any, nats_server: NatsServer, unique: str, how: str) -> None:
    """JetStream → Mosquitto (victim), collected by a paho client with a persistent session."""
    check(await mosquitto_sink(tmp_path, nats_server, unique, how))


async def mosquitto_sink(tmp_path: Any, nats_server: NatsServer, u: str, how: str, outage: float = OUTAGE) -> Result:
    stream = f"FB_{u}"
    victim = durable_mosquitto(tmp_path)
    victim.start()
    collector: MqttCollector | None = None
    try:
        await add_stream(nats_server.url, stream, [f"fb.{u}.>"])
        collector = await asyncio.to_thread(MqttCollector(victim.port, f"col-{u}", f"fb/{u}/#").connect)
        col = collector
        config = gateway_config(
            u,
            {"js": nats_connector(nats_server.url), "victim": mqtt_connector(victim.url, f"gw-{u}")},
            {
                "from": {"connector": "js", "subject": f"fb.{u}.{{dev}}", "stream": stream, "ack_wait": 5},
                "to": {"connector": "victim", "topic": f"fb/{u}/{{dev}}", "qos": 1},
            },
        )
        result = await restart_scenario(
            f"mosquitto-sink {how}",
            victim,
            how,
            config,
            collector,
            lambda: JetStreamPublisher(nats_server.url, lambda s: f"fb.{u}.dev{s % 5}", u).connect(),
            allowance=SUB_RECEIVE_MAX,  # redelivered to the subscriber: what it had not acknowledged
            notes=lambda pub: (
                f"subscriber: DUP-flagged={col.marked_dup} sessions_resumed={col.sessions_resumed} "
                f"publisher_retries={pub.retries}"
            ),
            outage=outage,
        )
    finally:
        await close_all(collector)
        await asyncio.to_thread(victim.stop)
    return result


@pytest.mark.parametrize("how", HOW)
async def test_nats_source_restart(tmp_path: Any, kafka_broker: Tansu, unique: str, how: str) -> None:
    """JetStream on nats-server (victim) → Kafka: the durable consumer resumes after the restart."""
    u = unique
    stream, topic = f"FC_{u}", f"fc-{u}"
    victim = NatsServer(workdir=tmp_path / "nats")
    victim.start()
    collector: KafkaCollector | None = None
    try:
        await add_stream(victim.url, stream, [f"fc.{u}.>"])
        await create_topic(kafka_broker.bootstrap, topic)
        collector = await KafkaCollector(kafka_broker.bootstrap, topic).start()
        config = gateway_config(
            u,
            {"victim": nats_connector(victim.url), "kafka": kafka_connector(kafka_broker.bootstrap)},
            {
                "from": {"connector": "victim", "subject": f"fc.{u}.{{dev}}", "stream": stream, "ack_wait": 5},
                "to": {"connector": "kafka", "topic": topic, "key": "{dev}"},
            },
        )
        result = await restart_scenario(
            f"nats-source {how}",
            victim,
            how,
            config,
            collector,
            lambda: JetStreamPublisher(victim.url, lambda s: f"fc.{u}.dev{s % 5}", u).connect(),
            allowance=0,  # Nats-Msg-Id dedups the publisher's retries: one copy per seq in the source stream
            notes=lambda pub: f"publisher_retries={pub.retries}",
        )
    finally:
        await close_all(collector)
        await asyncio.to_thread(victim.stop)
    check(result)


@pytest.mark.parametrize("how", HOW)
async def test_nats_sink_restart(tmp_path: Any, kafka_broker: Tansu, unique: str, how: str) -> None:
    """Kafka → JetStream on nats-server (victim): the stream's file store keeps what it acknowledged."""
    check(await nats_sink(tmp_path, kafka_broker, unique, how))


async def nats_sink(tmp_path: Any, kafka_broker: Tansu, u: str, how: str, outage: float = OUTAGE) -> Result:
    stream, topic = f"FD_{u}", f"fd-{u}"
    victim = NatsServer(workdir=tmp_path / "nats")
    victim.start()
    collector: JetStreamCollector | None = None
    try:
        await add_stream(victim.url, stream, [f"fd.{u}.>"])
        await create_topic(kafka_broker.bootstrap, topic)
        collector = await JetStreamCollector(victim.url, stream, f"fd.{u}.>", f"col-{u}").start()
        config = gateway_config(
            u,
            {"kafka": kafka_connector(kafka_broker.bootstrap), "victim": nats_connector(victim.url)},
            {
                "from": {"connector": "kafka", "topic": topic, "group": f"g-{u}"},
                "to": {"connector": "victim", "subject": f"fd.{u}.data", "jetstream": True},
            },
        )
        result = await restart_scenario(
            f"nats-sink {how}",
            victim,
            how,
            config,
            collector,
            lambda: KafkaPublisher(kafka_broker.bootstrap, topic).connect(),
            allowance=0,
            notes=lambda pub: f"publisher_retries={pub.retries}",
            read_source=lambda: read_topic(kafka_broker.bootstrap, topic),
            outage=outage,
        )
    finally:
        await close_all(collector)
        await asyncio.to_thread(victim.stop)
    return result


@pytest.mark.parametrize("how", HOW)
async def test_tansu_source_restart(tmp_path: Any, nats_server: NatsServer, unique: str, how: str) -> None:
    """Durable Tansu (victim, S3 storage) → JetStream: the consumer group resumes from its committed offset."""
    u = unique
    stream, topic = f"FE_{u}", f"fe-{u}"
    victim = Tansu(storage="s3", workdir=tmp_path / "tansu")
    victim.start()
    collector: JetStreamCollector | None = None
    try:
        await create_topic(victim.bootstrap, topic)
        await add_stream(nats_server.url, stream, [f"fe.{u}.>"])
        collector = await JetStreamCollector(nats_server.url, stream, f"fe.{u}.>", f"col-{u}").start()
        config = gateway_config(
            u,
            {"victim": kafka_connector(victim.bootstrap), "js": nats_connector(nats_server.url)},
            {
                "from": {"connector": "victim", "topic": topic, "group": f"g-{u}"},
                "to": {"connector": "js", "subject": f"fe.{u}.data", "jetstream": True},
            },
        )
        result = await restart_scenario(
            f"tansu-source {how}",
            victim,
            how,
            config,
            collector,
            lambda: KafkaPublisher(victim.bootstrap, topic).connect(),
            allowance=0,
            notes=lambda pub: f"publisher_retries={pub.retries}",
            read_source=lambda: read_topic(victim.bootstrap, topic),
            library_reconnects=True,
        )
    finally:
        await close_all(collector)
        await asyncio.to_thread(victim.stop)
    check(result)


@pytest.mark.parametrize("how", HOW)
async def test_tansu_sink_restart(tmp_path: Any, mosquitto: Mosquitto, unique: str, how: str) -> None:
    """MQTT QoS 1 → durable Tansu (victim, S3 storage): records it acknowledged survive, the rest is resent."""
    check(await tansu_sink(tmp_path, mosquitto, unique, how))


async def tansu_sink(tmp_path: Any, mosquitto: Mosquitto, u: str, how: str, outage: float = OUTAGE) -> Result:
    topic = f"ff-{u}"
    victim = Tansu(storage="s3", workdir=tmp_path / "tansu")
    victim.start()
    collector: KafkaCollector | None = None
    try:
        await create_topic(victim.bootstrap, topic)
        collector = await KafkaCollector(victim.bootstrap, topic).start()
        col = collector
        config = gateway_config(
            u,
            {"mq": mqtt_connector(mosquitto.url, f"gw-{u}"), "victim": kafka_connector(victim.bootstrap)},
            {
                "from": {"connector": "mq", "topic": f"ff/{u}/{{dev}}", "qos": 1},
                "to": {"connector": "victim", "topic": topic, "key": "{dev}"},
            },
        )
        result = await restart_scenario(
            f"tansu-sink {how}",
            victim,
            how,
            config,
            collector,
            lambda: asyncio.to_thread(
                MqttPublisher(mosquitto.port, f"pub-{u}", lambda s: f"ff/{u}/dev{s % 5}").connect
            ),
            allowance=0,  # the publisher's broker stays up: it never resends
            notes=lambda pub: f"collector_errors={len(col.errors)}",
            outage=outage,
        )
    finally:
        await close_all(collector)
        await asyncio.to_thread(victim.stop)
    return result
