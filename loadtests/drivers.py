"""Load generators and counting consumers for each protocol, fast enough not to be the bottleneck.

Every payload starts with a 16-byte stamp: the sequence number and the
``time.monotonic_ns()`` of the send (CLOCK_MONOTONIC is system-wide on Linux,
so a receiver in another process can compute the latency). The rest is filler
up to the payload size: JSON telemetry records (device, temperature, humidity), one of 64 variants per
message, so that a compressing bridge meets text that compresses like real readings (about 2-3x with
lz4), not one repeated byte.

MQTT load uses the gateway's own transport (``connectors.mqtt``) as a plain
client: it is the fastest Python MQTT client measured here
(``docs/decisions/mqtt-client.md``), and the harness needs a generator that
outruns the bridges it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from nats.js.api import StreamConfig

from connectors.mqtt.client import MqttConnection, open_connection
from connectors.mqtt.codec import PUBACK, codec_for
from connectors.mqtt.source import InboundAcks, MqttReceipt

_STAMP = struct.Struct(">QQ")


def payload(seq: int, size: int, filler: tuple[bytes, ...]) -> bytes:
    return _STAMP.pack(seq, time.monotonic_ns()) + filler[seq & 63]


def filler_for(size: int) -> tuple[bytes, ...]:
    """64 fillers of ``size - 16`` bytes: JSON telemetry records, different in each."""
    rng = random.Random(size)
    out = []
    for _ in range(64):
        text, length = [], 0
        while length < size:
            record = (
                f'{{"device":"sensor-{rng.randrange(100_000):05d}","t":{rng.uniform(-20, 45):.2f},'
                f'"h":{rng.uniform(0, 100):.1f},"ok":{"true" if rng.random() < 0.9 else "false"}}},'
            )
            text.append(record)
            length += len(record)
        out.append("".join(text).encode()[: max(0, size - 16)])
    return tuple(out)


@dataclass
class Counter:
    """Arrivals at a sink: count, first/last times, latencies, duplicates."""

    expected: int
    arrivals: list[int] = field(default_factory=list)
    """monotonic_ns of each arrival (for steady-state rates)."""
    latencies_ns: list[int] = field(default_factory=list)
    seen: bytearray = field(default_factory=bytearray)
    duplicates: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None
    """Set by a counting consumer that died: its count is then meaningless, not a measured loss."""

    def __post_init__(self) -> None:
        self.seen = bytearray(self.expected)

    def reset(self, expected: int) -> None:
        """Start counting afresh (after a warm-up message)."""
        self.expected = expected
        self.arrivals.clear()
        self.latencies_ns.clear()
        self.seen = bytearray(expected)
        self.duplicates = 0
        self.done.clear()

    @property
    def count(self) -> int:
        return len(self.arrivals)

    def add(self, data: bytes) -> None:
        now = time.monotonic_ns()
        seq, sent = _STAMP.unpack_from(data)
        if seq < self.expected:
            if self.seen[seq]:
                self.duplicates += 1
                return
            self.seen[seq] = 1
        self.arrivals.append(now)
        self.latencies_ns.append(now - sent)
        if len(self.arrivals) >= self.expected:
            self.done.set()

    def steady_rate(self) -> float:
        """Messages/s between the 10th and the 90th percentile arrival (excludes warm-up and tail)."""
        n = len(self.arrivals)
        if n < 10:
            return 0.0
        a, b = self.arrivals[n // 10], self.arrivals[(9 * n) // 10]
        return ((9 * n) // 10 - n // 10) / ((b - a) / 1e9) if b > a else 0.0

    def steady_window(self) -> float:
        """Seconds between the 10th and the 90th percentile arrival: how long the steady rate was measured over."""
        n = len(self.arrivals)
        return (self.arrivals[(9 * n) // 10] - self.arrivals[n // 10]) / 1e9 if n >= 10 else 0.0

    def overall_rate(self) -> float:
        n = len(self.arrivals)
        return (n - 1) / ((self.arrivals[-1] - self.arrivals[0]) / 1e9) if n > 1 else 0.0


async def wait_count(
    counter: Counter, timeout: float, idle: float = 5.0, progress: Callable[[int], None] | None = None
) -> None:
    """Until every expected message arrived, ``timeout`` passed, or nothing arrived for ``idle`` s."""
    deadline = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    while not counter.done.is_set():
        if counter.error is not None:
            raise RuntimeError(f"sink reader failed: {counter.error!r}") from counter.error
        now = time.monotonic()
        if now > deadline or now - last_change > idle:
            return
        if counter.count != last:
            last, last_change = counter.count, now
            if progress is not None:
                progress(counter.count)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(counter.done.wait()), 0.25)


async def wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------ Kafka
async def kafka_create(bootstrap: str, topic: str, partitions: int = 4) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


def kafka_produce(bootstrap: str, topic: str, n: int, size: int, *, rate: float | None = None) -> float:
    """Produce ``n`` records with librdkafka (blocking; run in a thread). Returns msgs/s of the produce.

    At a fixed ``rate`` (latency runs) records are sent at once (``linger.ms`` 0): the load generator's
    own batching delay must not be counted against the bridge. Preloads batch (5 ms).
    """
    from confluent_kafka import Producer

    linger = 0 if rate is not None else 5
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": linger, "enable.idempotence": False, "acks": "all"})
    filler = filler_for(size)
    t0 = time.monotonic()
    for seq in range(n):
        while True:
            try:
                p.produce(topic, payload(seq, size, filler), key=str(seq % 16).encode())
                break
            except BufferError:
                p.poll(0.01)
        if seq % 1000 == 999:
            p.poll(0)
        if rate is not None and seq % 50 == 49:
            ahead = t0 + (seq + 1) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    p.flush(60)
    return n / (time.monotonic() - t0)


def kafka_reader_check() -> None:
    """Raise unless the harness's Kafka reader (aiokafka) can decode lz4 batches.

    mq-bridge's Kafka producer compresses with lz4 by default. aiokafka >= 0.12 decodes
    lz4 (and snappy, zstd) through ``cramjam`` (its ``lz4`` extra), not the ``lz4``
    package; without it every fetch of such a batch raises ``UnsupportedCodecError``.
    """
    from aiokafka.codec import has_lz4

    if not has_lz4():
        raise RuntimeError(
            "aiokafka cannot decode lz4-compressed Kafka batches (the peer's producer default): "
            "install cramjam>=2.8 (aiokafka[lz4]) in this venv"
        )


class KafkaCount:
    """Reads a topic from the beginning, no group (manual assignment).

    A fetch error (e.g. a codec aiokafka cannot decode) ends the reader: it is put on
    ``counter.error`` so that the measurement fails instead of reporting 0 received.
    """

    def __init__(self, bootstrap: str, topic: str, partitions: int, counter: Counter) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=5,
        )
        self.topic, self.partitions, self.counter = topic, partitions, counter
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        self.consumer.assign([TopicPartition(self.topic, p) for p in range(self.partitions)])
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        add = self.counter.add
        try:
            while True:
                batches = await self.consumer.getmany(timeout_ms=100, max_records=10_000)
                for records in batches.values():
                    for r in records:
                        add(r.value)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # surfaced by wait_count / the measurement
            self.counter.error = exc

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.consumer.stop()


# ------------------------------------------------------------------------------------- NATS
class _NatsCountProtocol(asyncio.Protocol):
    """A minimal NATS subscriber that only parses MSG/HMSG frames and counts them.

    nats-py spends ~4 µs per delivered message (a Msg object and a coroutine
    call); at 100 000 msgs/s that made the harness itself the bottleneck, and
    nats-server then stalls the fast publisher (the bridge) behind it. This
    parser costs well under a microsecond per message.
    """

    def __init__(self, subject: str, on_payload: Callable[[bytes], None]) -> None:
        self.subject = subject
        self.on_payload = on_payload
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, n = 0, len(buf)
        on_payload = self.on_payload
        while pos < n:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            op = buf[pos : pos + 4]
            if op == b"MSG " or op == b"HMSG":
                parts = buf[pos:eol].split()
                size = int(parts[-1])
                hdr = int(parts[-2]) if op == b"HMSG" else 0
                end = eol + 2 + size
                if end + 2 > n:
                    break
                on_payload(buf[eol + 2 + hdr : end])
                pos = end + 2
                continue
            line = buf[pos:eol]
            pos = eol + 2
            if line.startswith(b"INFO"):
                assert self.transport is not None
                self.transport.write(
                    b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n'
                    + b"SUB %s 1\r\nPING\r\n" % self.subject.encode()
                )
            elif line == b"PING":
                assert self.transport is not None
                self.transport.write(b"PONG\r\n")
            elif line == b"PONG" and not self.ready.done():
                self.ready.set_result(None)
        self.buf = buf[pos:]


class NatsCount:
    """Counts a core subject with :class:`_NatsCountProtocol`."""

    def __init__(self, url: str, subject: str, counter: Counter) -> None:
        self.url, self.subject, self.counter = url, subject, counter
        self.transport: asyncio.BaseTransport | None = None

    async def start(self) -> None:
        host, _, port = self.url.removeprefix("nats://").partition(":")
        loop = asyncio.get_running_loop()
        self.transport, proto = await loop.create_connection(
            lambda: _NatsCountProtocol(self.subject, self.counter.add), host, int(port)
        )
        await asyncio.wait_for(proto.ready, 10)

    async def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Nats:
    def __init__(self, url: str) -> None:
        self.url = url
        self.nc: Any = None

    async def connect(self) -> Nats:
        self.nc = await nats.connect(self.url, max_reconnect_attempts=1)
        return self

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()

    async def count(self, subject: str, counter: Counter) -> None:
        add = counter.add

        async def cb(msg: Any) -> None:
            add(msg.data)

        await self.nc.subscribe(subject, cb=cb, pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30)
        await self.nc.flush()

    async def publish(self, subject: str, n: int, size: int, *, rate: float | None = None) -> float:
        """Core publishes, one flush per 1000 (or paced at ``rate`` msgs/s)."""
        nc, filler = self.nc, filler_for(size)
        t0 = time.monotonic()
        for seq in range(n):
            await nc.publish(subject, payload(seq, size, filler))
            if seq % 100 == 99:
                if rate is not None:
                    ahead = t0 + (seq + 1) / rate - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                elif seq % 1000 == 999:
                    await nc.flush()
        await nc.flush()
        return n / (time.monotonic() - t0)

    async def add_stream(self, name: str, subjects: list[str]) -> None:
        await self.nc.jetstream().add_stream(StreamConfig(name=name, subjects=subjects))

    async def js_publish(self, subject: str, n: int, size: int, *, rate: float | None = None) -> float:
        """JetStream publishes with up to 2000 PubAcks outstanding."""
        js, filler = self.nc.jetstream(), filler_for(size)
        t0 = time.monotonic()
        pending: list[Any] = []
        for seq in range(n):
            pending.append(await js.publish_async(subject, payload(seq, size, filler)))
            if len(pending) >= 2000:
                await asyncio.gather(*pending)
                pending.clear()
            if rate is not None and seq % 50 == 49:
                ahead = t0 + (seq + 1) / rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await asyncio.gather(*pending)
        return n / (time.monotonic() - t0)

    async def js_count(self, stream: str, subject: str, counter: Counter) -> None:
        """Counts a stream by an ordered push consumer (what landed in it)."""
        add = counter.add

        async def cb(msg: Any) -> None:
            add(msg.data)

        await self.nc.jetstream().subscribe(subject, stream=stream, cb=cb, ordered_consumer=True)


# ------------------------------------------------------------------------------------- MQTT
class Mqtt:
    """A plain MQTT 5 client on the gateway's transport: QoS 1 publish window, in-order acks."""

    def __init__(self, port: int, client_id: str, *, window: int = 1000) -> None:
        self.port, self.client_id, self.window = port, client_id, window
        self.codec = codec_for(5)
        self.conn: MqttConnection | None = None
        self.inflight = 0
        self.room = asyncio.Event()
        self.on_message: Callable[[bytes], None] | None = None
        self._pid = 0

    # PacketHandler
    def on_publishes(self, packets: list[Any]) -> None:
        for p in packets:
            self.on_publish(p)

    def on_publish(self, p: Any) -> None:
        if self.on_message is not None:
            self.on_message(p.payload)
        if int(p.qos):
            r = MqttReceipt(self.acks, p.packet_id, int(p.qos))
            self.acks.pending.append(r)
            r.settle()

    def on_ack(self, kind: int, pid: int, reason: int) -> None:
        if kind == PUBACK:
            self.inflight -= 1
            self.room.set()

    async def connect(self, *, clean_start: bool = True, session_expiry: int = 0) -> Mqtt:
        self.conn = await open_connection("127.0.0.1", self.port, self.codec, self, timeout=10)
        self.acks = InboundAcks(self.conn)
        self.conn.write(
            self.codec.connect(
                self.client_id,
                clean_start=clean_start,
                keepalive=60,
                session_expiry=session_expiry,
                receive_maximum=65535,
                username=None,
                password=None,
            )
        )
        await asyncio.wait_for(self.conn.connack, 10)
        return self

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        assert self.conn is not None
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.conn.subacks[65000] = fut
        self.conn.write(self.codec.subscribe(65000, [(topic, qos)]))
        await asyncio.wait_for(fut, 10)

    async def publish(
        self, topic: str, n: int, size: int, *, qos: int = 1, rate: float | None = None, keys: int = 0
    ) -> float:
        """``n`` PUBLISHes to ``topic``, or with ``keys`` round-robin to ``topic/d0`` .. ``topic/d<keys-1>``."""
        conn, codec, filler = self.conn, self.codec, filler_for(size)
        topics = [f"{topic}/d{k}" for k in range(keys)] if keys else [topic]
        assert conn is not None
        t0 = time.monotonic()
        out = bytearray()
        for seq in range(n):
            pid = None
            if qos:
                while self.inflight >= self.window:
                    if out:
                        conn.write(out)
                        out = bytearray()
                    self.room.clear()
                    await self.room.wait()
                self._pid = self._pid % 64000 + 1
                pid = self._pid
                self.inflight += 1
            out += codec.publish(
                topics[seq % len(topics)], payload(seq, size, filler), qos, False, pid, False, None, None, None
            )
            if seq % 100 == 99:
                conn.write(out)
                out = bytearray()
                await conn.writable()
                if rate is not None:
                    ahead = t0 + (seq + 1) / rate - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                else:
                    await asyncio.sleep(0)
        if out:
            conn.write(out)
        while self.inflight > 0:
            self.room.clear()
            await asyncio.wait_for(self.room.wait(), 30)
        return n / (time.monotonic() - t0)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.disconnect()


async def mqtt_session(port: int, client_id: str, topic: str) -> None:
    """Create a persistent QoS 1 session for ``client_id`` on ``topic`` and leave it offline (for preloading)."""
    c = await Mqtt(port, client_id).connect(clean_start=True, session_expiry=3600)
    await c.subscribe(topic, 1)
    await c.close()
