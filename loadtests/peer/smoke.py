#!/usr/bin/env python3
"""Smoke test of loadtests/peer/run_mqbridge.py: every route, N messages, count arrivals.

Run with the MAIN venv (it starts throwaway brokers through
tests/support/brokers.py and uses nats-py, aiokafka and paho-mqtt)::

    .venv/bin/python loadtests/peer/smoke.py [--messages 10000] [--routes a,b] [--rate 5000]

For every route it starts a destination counter first, then

* preloads the source where the protocol keeps messages (Kafka topic,
  JetStream stream, MQTT persistent session of the bridge's client id),
  then starts the bridge and waits for its ``{"ready": true}`` line; or
* for core NATS sources (nothing to preload) starts the bridge, waits for
  ready, then publishes at ``--rate`` msgs/s;

then waits until everything arrived, or nothing arrived for ``--idle`` s,
or the route's ``--budget`` (<= 60 s) is spent; SIGTERMs the bridge (only
the process it started) and checks that it exits 0.

Prints a table: route, sent, received (distinct payloads; duplicates are
shown apart), seconds (first to last arrival at the destination), startup
(bridge spawn to its ready line), total (bridge spawn to last arrival) and
the bridge's exit code after SIGTERM.  ``--json FILE`` also
writes the rows.  Exit status 0 only if every route delivered everything
and every bridge exited 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

import nats  # noqa: E402
import paho.mqtt.client as paho  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402
from nats.js.api import StreamConfig  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from tests.support.brokers import Mosquitto, NatsServer, Tansu  # noqa: E402

PEER_PY = ROOT / "loadtests" / ".venv-peer" / "bin" / "python"
RUNNER = HERE / "run_mqbridge.py"

ROUTES = [
    "kafka_to_nats",
    "jetstream_to_kafka",
    "corenats_to_kafka",
    "mqtt_to_kafka",
    "mqtt_to_nats",
    "kafka_to_mqtt",
    "corenats_to_mqtt",
    "fanout_mqtt",
]

PAYLOAD_SIZE = 128


def payload(i: int) -> bytes:
    head = b"%010d|" % i
    return head + b"x" * (PAYLOAD_SIZE - len(head))


def seq_of(p: bytes) -> int:
    try:
        return int(p[:10])
    except ValueError:
        return -1


# --------------------------------------------------------------------------
# Counting at a destination
# --------------------------------------------------------------------------


@dataclass
class Counter:
    name: str
    n: int
    seen: bytearray = field(init=False)
    distinct: int = 0
    dups: int = 0
    foreign: int = 0
    first: float | None = None
    last: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.seen = bytearray(self.n)

    def add(self, p: bytes) -> None:
        now = time.monotonic()
        i = seq_of(p)
        with self.lock:
            if self.first is None:
                self.first = now
            self.last = now
            if 0 <= i < self.n:
                if self.seen[i]:
                    self.dups += 1
                else:
                    self.seen[i] = 1
                    self.distinct += 1
            else:
                self.foreign += 1

    def missing_sample(self, k: int = 5) -> list[int]:
        return [i for i in range(self.n) if not self.seen[i]][:k]


def kafka_reader_backend() -> str:
    """Which client can read what mq-bridge writes: its producer compresses with lz4.

    aiokafka decodes lz4 only with the optional ``lz4`` package; confluent-kafka
    (librdkafka) always can.  "none" means neither: the bridge is then told
    ``compression.type=none`` (and the table says so).
    """
    from aiokafka.codec import has_lz4

    if has_lz4():
        return "aiokafka"
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        return "none"
    return "confluent"


class KafkaSink:
    """Reads partition 0 of a 1-partition topic from the beginning (no group join)."""

    def __init__(self, bootstrap: str, topic: str, counter: Counter, backend: str) -> None:
        self.bootstrap, self.topic, self.counter = bootstrap, topic, counter
        self.backend = backend
        self.consumer: AIOKafkaConsumer | None = None
        self.task: asyncio.Task[None] | None = None
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    async def start(self) -> None:
        await create_topic(self.bootstrap, self.topic)
        if self.backend == "confluent":
            started = threading.Event()
            self.thread = threading.Thread(target=self._run_confluent, args=(started,), daemon=True)
            self.thread.start()
            await asyncio.to_thread(started.wait, 10)
            return
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 << 20,
        )
        await self.consumer.start()
        tp = TopicPartition(self.topic, 0)
        self.consumer.assign([tp])
        await self.consumer.seek_to_beginning(tp)
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self.consumer is not None
        try:
            while True:
                batches = await self.consumer.getmany(timeout_ms=200, max_records=20000)
                for records in batches.values():
                    for r in records:
                        self.counter.add(r.value or b"")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # surfaced in the result row
            self.error = exc

    def _run_confluent(self, started: threading.Event) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer
        from confluent_kafka import TopicPartition as CTP

        try:
            c = Consumer(
                {
                    "bootstrap.servers": self.bootstrap,
                    "group.id": f"smoke-{uuid.uuid4().hex}",
                    "enable.auto.commit": False,
                }
            )
            c.assign([CTP(self.topic, 0, OFFSET_BEGINNING)])
            started.set()
            while not self.stopping.is_set():
                for m in c.consume(10000, 0.2):
                    if m.error():
                        continue
                    self.counter.add(m.value() or b"")
            c.close()
        except BaseException as exc:
            self.error = exc
            started.set()

    async def stop(self) -> None:
        self.stopping.set()
        if self.thread:
            await asyncio.to_thread(self.thread.join, 5)
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        if self.consumer:
            await self.consumer.stop()


class NatsSink:
    def __init__(self, url: str, subject: str, counter: Counter) -> None:
        self.url, self.subject, self.counter = url, subject, counter
        self.nc: Any = None

    async def start(self) -> None:
        self.nc = await nats.connect(self.url)

        async def cb(msg: Any) -> None:
            self.counter.add(msg.data)

        await self.nc.subscribe(self.subject, cb=cb, pending_msgs_limit=2_000_000, pending_bytes_limit=1 << 30)
        await self.nc.flush()

    async def stop(self) -> None:
        if self.nc:
            await self.nc.close()


def _mqtt_client(client_id: str = "", v5: bool = True) -> paho.Client:
    c = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5 if v5 else paho.MQTTv311
    )
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    return c


def _mqtt_connect(c: paho.Client, port: int, *, clean: bool, expiry: int = 0, v5: bool = True) -> None:
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    if v5:
        props = Properties(PacketTypes.CONNECT)
        if expiry:
            props.SessionExpiryInterval = expiry
        c.connect("127.0.0.1", port, clean_start=clean, properties=props)
    else:
        c.connect("127.0.0.1", port)
    c.loop_start()
    if not connected.wait(10):
        raise RuntimeError("MQTT connect timed out")


def _mqtt_subscribe(c: paho.Client, topic: str, qos: int = 1) -> None:
    done = threading.Event()
    c.on_subscribe = lambda *a: done.set()
    c.subscribe(topic, qos=qos)
    if not done.wait(10):
        raise RuntimeError(f"no SUBACK for {topic}")


class MqttSink:
    def __init__(self, port: int, topic: str, counter: Counter) -> None:
        self.port, self.topic, self.counter = port, topic, counter
        self.c = _mqtt_client(f"smoke-sink-{uuid.uuid4().hex[:8]}")

    async def start(self) -> None:
        self.c.on_message = lambda _c, _u, msg: self.counter.add(bytes(msg.payload))
        await asyncio.to_thread(_mqtt_connect, self.c, self.port, clean=True)
        await asyncio.to_thread(_mqtt_subscribe, self.c, self.topic, 1)

    async def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------


async def create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        with contextlib.suppress(Exception):  # already exists
            await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def kafka_preload(bootstrap: str, topic: str, n: int) -> None:
    await create_topic(bootstrap, topic)
    prod = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, acks="all", enable_idempotence=False, max_batch_size=1 << 20
    )
    await prod.start()
    try:
        for lo in range(0, n, 2000):
            futs = [await prod.send(topic, payload(i)) for i in range(lo, min(n, lo + 2000))]
            await asyncio.gather(*futs)
    finally:
        await prod.stop()


async def jetstream_preload(url: str, stream: str, subject: str, n: int) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"]))
        for lo in range(0, n, 1000):
            await asyncio.gather(*(js.publish(subject, payload(i)) for i in range(lo, min(n, lo + 1000))))
    finally:
        await nc.close()


def mqtt_preload(port: int, session_client_id: str, topic: str, n: int, v5: bool, expiry: int) -> None:
    # 1. create the bridge's persistent session and its subscription, then leave
    if v5:
        sess = _mqtt_client(session_client_id)
    else:
        sess = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=session_client_id, protocol=paho.MQTTv311, clean_session=False
        )
    _mqtt_connect(sess, port, clean=False, expiry=expiry, v5=v5)
    _mqtt_subscribe(sess, topic, 1)
    sess.disconnect()
    sess.loop_stop()
    # 2. publish n QoS 1 messages, at most `window` un-acked (paho slows down
    #    badly with a long queue of its own), and wait for every PUBACK
    window = 1000
    pub = _mqtt_client(f"smoke-pub-{uuid.uuid4().hex[:8]}")
    free = threading.Semaphore(window)
    pub.on_publish = lambda *a: free.release()
    _mqtt_connect(pub, port, clean=True)
    for i in range(n + window):
        if not free.acquire(timeout=30):
            raise RuntimeError(f"MQTT preload: no PUBACK for 30 s after {i - window} messages")
        if i < n:
            pub.publish(topic, payload(i), qos=1)
    pub.disconnect()
    pub.loop_stop()


async def corenats_publish(url: str, subject: str, n: int, rate: float) -> float:
    nc = await nats.connect(url)
    try:
        t0 = time.monotonic()
        step = 100
        for lo in range(0, n, step):
            for i in range(lo, min(n, lo + step)):
                await nc.publish(subject, payload(i))
            if rate > 0:
                ahead = (lo + step) / rate - (time.monotonic() - t0)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await nc.flush()
        return time.monotonic() - t0
    finally:
        await nc.close()


# --------------------------------------------------------------------------
# One route
# --------------------------------------------------------------------------


@dataclass
class Result:
    route: str
    sent: int
    received: dict[str, int]
    dups: dict[str, int]
    seconds: float | None
    startup: float | None
    rc: int | None
    note: str = ""
    total: float | None = None  # bridge spawn -> last arrival

    @property
    def ok(self) -> bool:
        return self.rc == 0 and all(v == self.sent for v in self.received.values())


async def run_route(route: str, b: dict[str, Any], a: argparse.Namespace, logdir: Path) -> Result:
    tag = f"{route.replace('_', '')}{uuid.uuid4().hex[:6]}"
    n = a.messages
    mqtt_port = b["mqtt"].port
    src = f"src_{tag}"
    dst = f"dst_{tag}"
    dst2 = f"dst2_{tag}"
    client_id = f"mqb-src-{tag}"
    stream = f"S_{tag}"
    js_subject = f"{stream}.in"
    v5 = a.mqtt_protocol == "v5"

    args = [
        "--route",
        route,
        "--mqtt-url",
        b["mqtt"].url,
        "--nats-url",
        b["nats"].url,
        "--kafka",
        b["kafka"].bootstrap,
        "--dst",
        dst,
        "--mqtt-protocol",
        a.mqtt_protocol,
    ]
    if route == "jetstream_to_kafka":
        args += ["--src", stream, "--src-subject", js_subject]
    else:
        args += ["--src", src]
    if route.startswith("mqtt") or route == "fanout_mqtt":
        args += ["--client-id", client_id]
    if route == "fanout_mqtt":
        args += ["--dst2", dst2]
    if a.kafka_reader == "none":
        args += ["--kafka-producer-option", "compression.type=none"]
    args += a.bridge_arg

    # destinations first
    counters: dict[str, Counter] = {}
    sinks: list[Any] = []
    dst_kind = route.split("_to_")[-1] if "_to_" in route else "kafka+nats"
    if dst_kind == "nats":
        counters["nats"] = Counter("nats", n)
        sinks.append(NatsSink(b["nats"].url, dst, counters["nats"]))
    elif dst_kind == "kafka":
        counters["kafka"] = Counter("kafka", n)
        sinks.append(KafkaSink(b["kafka"].bootstrap, dst, counters["kafka"], a.kafka_reader))
    elif dst_kind == "mqtt":
        counters["mqtt"] = Counter("mqtt", n)
        sinks.append(MqttSink(mqtt_port, dst, counters["mqtt"]))
    else:
        counters["kafka"] = Counter("kafka", n)
        counters["nats"] = Counter("nats", n)
        sinks.append(KafkaSink(b["kafka"].bootstrap, dst, counters["kafka"], a.kafka_reader))
        sinks.append(NatsSink(b["nats"].url, dst2, counters["nats"]))
    for s in sinks:
        await s.start()

    # preload
    live = route.startswith("corenats")
    if route.startswith("kafka"):
        await kafka_preload(b["kafka"].bootstrap, src, n)
    elif route == "jetstream_to_kafka":
        await jetstream_preload(b["nats"].url, stream, js_subject, n)
    elif route.startswith("mqtt") or route == "fanout_mqtt":
        await asyncio.to_thread(mqtt_preload, mqtt_port, client_id, src, n, v5, a.mqtt_session_expiry)

    budget_end = time.monotonic() + a.budget
    log_path = logdir / f"{route}.stderr.log"
    logf = open(log_path, "wb")  # noqa: SIM115 - closed in the finally below
    t_spawn = time.monotonic()
    proc = subprocess.Popen(
        [str(PEER_PY), str(RUNNER), *args], stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL, cwd=ROOT
    )
    rc: int | None = None
    note = ""
    startup: float | None = None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout=40)  # type: ignore[union-attr]
        ready = json.loads(line or b"{}")
        if not ready.get("ready"):
            note = f"not ready: {ready.get('error', line)!r}"
            raise RuntimeError(note)
        startup = time.monotonic() - t_spawn

        if live:
            pub_s = await corenats_publish(b["nats"].url, src, n, a.rate)
            note = f"published at {n / pub_s:,.0f}/s"

        last_total, last_change = -1, time.monotonic()
        while time.monotonic() < budget_end:
            total = sum(c.distinct for c in counters.values())
            if total >= n * len(counters):
                break
            if total != last_total:
                last_total, last_change = total, time.monotonic()
            elif time.monotonic() - last_change > a.idle:
                note = (note + "; " if note else "") + f"idle {a.idle:.0f}s"
                break
            await asyncio.sleep(0.05)
        else:
            note = (note + "; " if note else "") + "budget spent"
        # short grace for late duplicates
        await asyncio.sleep(0.3)
    except Exception as exc:
        if not note:
            note = f"{type(exc).__name__}: {exc}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = None
                note = (note + "; " if note else "") + "killed after SIGTERM timeout"
        else:
            rc = proc.returncode
        logf.close()
        for s in sinks:
            with contextlib.suppress(Exception):
                await s.stop()

    firsts = [c.first for c in counters.values() if c.first is not None]
    lasts = [c.last for c in counters.values() if c.last is not None]
    seconds = (max(lasts) - min(firsts)) if firsts and lasts else None
    total_s = (max(lasts) - t_spawn) if lasts else None
    for s in sinks:
        if getattr(s, "error", None) is not None:
            note = (note + "; " if note else "") + f"kafka reader failed: {s.error!r}"
    for c in counters.values():
        if c.distinct < n:
            note = (note + "; " if note else "") + f"{c.name} missing e.g. {c.missing_sample()}"
        if c.foreign:
            note = (note + "; " if note else "") + f"{c.name} {c.foreign} foreign"
    if rc not in (0, None) or (note and "not ready" in note):
        tail = log_path.read_text(errors="replace").splitlines()[-5:]
        note = (note + "; " if note else "") + "stderr: " + " | ".join(tail)
    return Result(
        route,
        n,
        {k: c.distinct for k, c in counters.items()},
        {k: c.dups for k, c in counters.items()},
        seconds,
        startup,
        rc,
        note,
        total_s,
    )


def print_table(rows: list[Result]) -> None:
    hdr = (
        f"{'route':<20} {'sent':>7} {'received':>17} {'dups':>6} {'seconds':>8} {'startup':>8} {'total':>7}"
        f" {'rc':>4}  note"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        rec = (
            " ".join(f"{k}={v}" for k, v in r.received.items())
            if len(r.received) > 1
            else str(next(iter(r.received.values())))
        )
        dups = str(sum(r.dups.values()))
        sec = f"{r.seconds:.2f}" if r.seconds is not None else "-"
        st = f"{r.startup:.2f}" if r.startup is not None else "-"
        tot = f"{r.total:.2f}" if r.total is not None else "-"
        print(f"{r.route:<20} {r.sent:>7} {rec:>17} {dups:>6} {sec:>8} {st:>8} {tot:>7} {r.rc!s:>4}  {r.note}")


async def amain(a: argparse.Namespace) -> int:
    if not PEER_PY.exists():
        print(f"peer venv missing: {PEER_PY} (see loadtests/peer/NOTES.md)", file=sys.stderr)
        return 2
    routes = a.routes.split(",") if a.routes else ROUTES
    logdir = Path(a.logdir or tempfile.mkdtemp(prefix="mqb-smoke-"))
    logdir.mkdir(parents=True, exist_ok=True)
    rows: list[Result] = []
    a.kafka_reader = kafka_reader_backend()
    with Mosquitto() as mq, NatsServer(jetstream=True) as ns, Tansu() as tk:
        b = {"mqtt": mq, "nats": ns, "kafka": tk}
        print(
            f"brokers: {mq.url} {ns.url} kafka={tk.bootstrap}; bridge logs in {logdir}; kafka reader: {a.kafka_reader}",
            flush=True,
        )
        if a.kafka_reader == "none":
            print("  no lz4-capable Kafka reader: bridges run with compression.type=none", flush=True)
        for route in routes:
            t0 = time.monotonic()
            try:
                r = await run_route(route, b, a, logdir)
            except Exception as exc:
                r = Result(route, a.messages, {"-": 0}, {}, None, None, None, f"{type(exc).__name__}: {exc}")
            rows.append(r)
            print(
                f"  {route}: {r.received} of {r.sent} in {time.monotonic() - t0:.1f}s (rc={r.rc}) {r.note}", flush=True
            )
    print()
    print_table(rows)
    if a.json:
        Path(a.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 0 if all(r.ok for r in rows) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=10_000)
    p.add_argument("--routes", help="comma-separated subset (default: all)")
    p.add_argument(
        "--rate", type=float, default=5000.0, help="core NATS publish rate, msgs/s (0 = as fast as possible)"
    )
    p.add_argument("--idle", type=float, default=5.0, help="give up after this long with no arrival")
    p.add_argument("--budget", type=float, default=45.0, help="max seconds per route after spawn")
    p.add_argument("--mqtt-protocol", default="v5", choices=["v5", "v3"])
    p.add_argument("--mqtt-session-expiry", type=int, default=86400)
    p.add_argument(
        "--bridge-arg",
        action="append",
        default=[],
        help="extra argument passed to run_mqbridge.py (repeatable, use --bridge-arg=--x)",
    )
    p.add_argument("--logdir", help="where the bridges' stderr goes (default: a temp dir)")
    p.add_argument("--json", help="also write the rows to this file")
    a = p.parse_args()
    a.budget = min(a.budget, 60.0)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(amain(a))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
