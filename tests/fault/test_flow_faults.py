"""Flow control under faults: stalled sinks, at-most-once losses, poison messages, a slow-consumer cut.

Real brokers (Mosquitto, nats-server, Tansu) and a TCP fault proxy between the
gateway and the broker it must not be able to reach (DESIGN §3-§4):

1. **A stalled sink is cut off and does not stall its neighbour.** Route A
   (MQTT QoS 1 -> NATS through a blackholed proxy) and route B (MQTT QoS 1 ->
   NATS direct) share one gateway process. During a 30 s stall B keeps its
   rate, the gateway's RSS stays within A's byte budget plus a constant, A is
   disconnected as a slow consumer after its deadline, and once the proxy
   resumes A catches up without losing anything the broker accepted.
2. **At-most-once losses are counted exactly.** Core NATS -> NATS through a
   blackholed proxy with a small budget: every message the publisher sent and
   the subscriber behind the gateway never saw is accounted for by a counter.
3. **A poison message goes to the dead letter.** Oversized messages
   (nats-server ``max_payload``) land in a Kafka dead-letter topic with the
   error headers; the others are delivered; the MQTT source is acknowledged
   for every message, so a restart redelivers nothing.
4. **nats-server cuts the gateway off as a slow consumer** (tiny
   ``max_pending``, short ``write_deadline``, a bandwidth-limited proxy): the
   server records the reason, the gateway reconnects and recovers.

Every wait is bounded; every test prints its measured figures (``-s``).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import re
import statistics
import threading
import time
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import uvloop
import yaml
from nats.aio.client import Client as NatsClient

from connectors.memory.broker import MemoryBroker
from gateway import Gateway
from gateway.config import parse_config
from tests.support.brokers import Mosquitto, NatsServer, Tansu
from tests.support.clients.kafka import create_topics, read_records
from tests.support.clients.mqtt import MqttPublisher
from tests.support.clients.nats import nats_closed_connections, nats_connect, nats_connection, wait_nats_subscription
from tests.support.configs import gateway_config, mqtt_connector, nats_connector
from tests.support.gateway_process import GatewayProcess
from tests.support.proxy import TcpProxy
from tests.support.waits import wait_progress, wait_until, wait_until_blocking

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.fault]

SEQ_DIGITS = 9


# ---------------------------------------------------------------------------- helpers


def make_payload(seq: int, size: int) -> bytes:
    """``000000042:`` then filler up to ``size`` bytes; the sequence number is the first 9 bytes."""
    head = b"%09d:" % seq
    return head + b"." * max(0, size - len(head))


def seq_of(data: bytes) -> int:
    return int(data[:SEQ_DIGITS])


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (Linux ``/proc``; psutil elsewhere)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except FileNotFoundError:
        psutil = pytest.importorskip("psutil")
        return int(psutil.Process(pid).memory_info().rss)


def parse_rfc3339(text: str) -> float:
    """nats-server's timestamps carry nanoseconds; Python 3.11 wants at most microseconds."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


async def sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def settle(value: Callable[[], int], *, quiet: float, timeout: float) -> int:
    """Until ``value()`` did not change for ``quiet`` seconds (at most ``timeout``); returns it."""
    deadline = time.monotonic() + timeout
    last, since = value(), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        now_value = value()
        if now_value != last:
            last, since = now_value, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


async def wait_all_seen(first: dict[int, float], wanted: set[int], timeout: float) -> None:
    """Until every seq of ``wanted`` was seen (``first``: seq -> first arrival), or nothing new arrived for 20 s."""
    await wait_progress(lambda: len(first), lambda _: wanted <= first.keys(), timeout=timeout, stall=20, interval=0.1)


class Publisher(MqttPublisher):
    """paho MQTT 5, QoS 1, publishing ``make_payload(seq, size)`` to ``topic(seq)``.

    :meth:`start_paced` publishes ``seq = 0, 1, ...`` at a fixed rate from its own thread
    (paho's network loop runs in another) and remembers when each one was handed to paho.
    """

    def __init__(self, port: int, client_id: str, topic: Callable[[int], str], *, size: int) -> None:
        super().__init__(port, client_id)
        self.topic = topic
        self.size = size
        self.sent_at = array("d")
        """Monotonic time each paced seq was published (index = seq)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def send(self, seq: int, *, size: int | None = None, headers: list[tuple[str, str]] | None = None) -> None:
        data = make_payload(seq, self.size if size is None else size)
        self.track(self.publish(self.topic(seq), data, 1, headers), seq)

    def start_paced(self, rate: float, seconds: float) -> None:
        def run() -> None:
            t0 = time.monotonic()
            seq = 0
            while not self._stop.is_set():
                now = time.monotonic()
                if now - t0 >= seconds:
                    return
                due = int((now - t0) * rate)
                while seq < due:
                    self.send(seq)
                    self.sent_at.append(time.monotonic())
                    seq += 1
                self._stop.wait(0.005)

        self._thread = threading.Thread(target=run, name="paced-publisher", daemon=True)
        self._thread.start()

    def stop_paced(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def wait_acks(self, timeout: float = 15.0) -> None:
        """Until every publish got its PUBACK (or was refused), at most ``timeout`` s: the test judges what came."""
        with contextlib.suppress(AssertionError):
            wait_until_blocking(lambda: self.unacknowledged() == 0, timeout)

    def close(self) -> None:
        self.stop_paced()
        super().close()


class SeqCollector:
    """A core NATS subscription recording each sequence number's first arrival and every arrival time."""

    def __init__(self) -> None:
        self.first: dict[int, float] = {}
        self.times = array("d")
        self.payloads: dict[int, bytes] = {}
        self.keep_payloads = False

    async def cb(self, msg: Any) -> None:
        now = time.monotonic()
        self.times.append(now)
        seq = seq_of(msg.data)
        if seq not in self.first:
            self.first[seq] = now
            if self.keep_payloads:
                self.payloads[seq] = msg.data

    async def subscribe(self, nc: NatsClient, subject: str) -> SeqCollector:
        await nc.subscribe(subject, cb=self.cb, pending_msgs_limit=2_000_000, pending_bytes_limit=1 << 31)
        await nc.flush()
        return self

    def count(self, start: float, end: float) -> int:
        """Arrivals in ``[start, end)`` (times are appended in order)."""
        return bisect.bisect_left(self.times, end) - bisect.bisect_left(self.times, start)

    def rate(self, start: float, end: float) -> float:
        return self.count(start, end) / (end - start)


async def close_quietly(nc: NatsClient | None) -> None:
    if nc is not None and not nc.is_closed:
        try:
            await asyncio.wait_for(nc.close(), 10)
        except Exception as exc:  # teardown must go on
            print(f"closing a test NATS client failed: {exc!r}")


# ---------------------------------------------------------------------------- 1. stalled sink

RATE = 2_000.0
"""Messages per second published to each of routes A and B."""
SIZE = 512
"""Payload bytes: A's byte budget holds 512 of them."""
A_BUDGET = 256 * 1024
A_DEADLINE = 2.0
WARM, PRE, STALL, POST = 3.0, 10.0, 30.0, 17.0
"""Seconds: warm-up, the unstalled measuring window, the stall, publishing after the heal (60 s in all)."""
RSS_ALLOWANCE = 30 * 1024 * 1024
"""The constant above A's byte budget that the gateway's RSS may grow by during the stall."""


@pytest.mark.timeout(170)
async def test_stalled_sink_is_cut_off_without_stalling_its_neighbour(tmp_path: Path, unique: str) -> None:
    with (
        Mosquitto(workdir=tmp_path / "mqtt") as mosq,
        NatsServer(workdir=tmp_path / "nats", jetstream=False) as nats,
        TcpProxy(nats.address) as proxy,
    ):
        config = gateway_config(
            f"stall-{unique}",
            {
                "mqtt": mqtt_connector(mosq.url, f"gw-stall-{unique}"),
                "nats_a": nats_connector(proxy.url("nats")),
                "nats_b": nats_connector(nats.url),
            },
            [
                {
                    "name": "A",
                    "from": {"connector": "mqtt", "topic": f"a/{unique}/#", "qos": 1},
                    "to": {"connector": "nats_a", "subject": f"fa.{unique}"},
                    "max_in_flight_bytes": A_BUDGET,
                    "slow_consumer_deadline": A_DEADLINE,
                },
                {
                    "name": "B",
                    "from": {"connector": "mqtt", "topic": f"b/{unique}/#", "qos": 1},
                    "to": {"connector": "nats_b", "subject": f"fb.{unique}"},
                },
            ],
        )
        config["gateway"]["reconnect"] = {"initial": 0.1, "max": 1.0}
        gw = GatewayProcess(tmp_path / "gw", config)
        nc: NatsClient | None = None
        pubs: list[Publisher] = []
        sampler: asyncio.Task[None] | None = None
        try:
            nc = await nats_connect(nats.url)
            col_a = await SeqCollector().subscribe(nc, f"fa.{unique}")
            col_b = await SeqCollector().subscribe(nc, f"fb.{unique}")
            await gw.astart(30)
            assert gw.pid is not None
            pid = gw.pid
            pub_a = Publisher(mosq.port, f"pub-a-{unique}", lambda s: f"a/{unique}/d{s % 4}", size=SIZE)
            pub_b = Publisher(mosq.port, f"pub-b-{unique}", lambda s: f"b/{unique}/d{s % 4}", size=SIZE)
            pubs = [pub_a, pub_b]
            for p in pubs:
                p.connect()

            samples: list[tuple[float, int]] = []

            async def sample_rss() -> None:
                while True:
                    samples.append((time.monotonic(), rss_bytes(pid)))
                    await asyncio.sleep(0.5)

            sampler = asyncio.create_task(sample_rss())
            t0 = time.monotonic()
            total = WARM + PRE + STALL + POST
            pub_a.start_paced(RATE, total)
            pub_b.start_paced(RATE, total)

            await sleep_until(t0 + WARM + PRE)
            s0 = time.monotonic()
            await asyncio.to_thread(proxy.blackhole)
            await sleep_until(s0 + STALL)
            h0 = time.monotonic()
            await asyncio.to_thread(proxy.resume)
            await sleep_until(t0 + total)
            for p in pubs:
                p.stop_paced()
            await asyncio.to_thread(pub_a.wait_acks)
            await asyncio.to_thread(pub_b.wait_acks)
            sampler.cancel()

            await wait_all_seen(col_b.first, set(pub_b.accepted), 60)
            await wait_all_seen(col_a.first, set(pub_a.accepted), 60)
            end = time.monotonic()

            # -- B's rate, before and during the stall
            pre_b = col_b.rate(t0 + WARM, s0)
            w0 = s0 + A_DEADLINE + 1.0
            stall_b = col_b.rate(w0, w0 + 10.0)
            whole_stall_b = col_b.rate(s0, h0)
            pre_a = col_a.rate(t0 + WARM, s0)
            # -- RSS
            pre_rss = statistics.median(r for t, r in samples if t0 + WARM <= t < s0)
            stall_rss = [r for t, r in samples if s0 <= t <= h0]
            growth = max(stall_rss) - pre_rss
            # -- A: disconnections, state changes, recovery
            cuts = gw.events("route.slow_consumer_disconnected", route="A")
            resumes = gw.events("route.resumed", route="A")
            cuts_b = gw.events("route.slow_consumer_disconnected", route="B")
            before_heal = {s for s in pub_a.accepted if pub_a.sent_at[s] < h0}
            i = bisect.bisect_left(col_a.times, h0)
            first_after_heal = col_a.times[i] - h0 if i < len(col_a.times) else None
            caught_up = max((col_a.first[s] for s in before_heal if s in col_a.first), default=h0) - h0
            lost_a = sorted(set(pub_a.accepted) - col_a.first.keys())
            lost_b = sorted(set(pub_b.accepted) - col_b.first.keys())
            dup_a = len(col_a.times) - len(col_a.first)
            dup_b = len(col_b.times) - len(col_b.first)
            stats = proxy.stats()
            first_txt = "never" if first_after_heal is None else f"{first_after_heal:.2f}"
            print(
                f"\nSTALL: publish {RATE:.0f}/s per route for {total:.0f} s, stall {STALL:.0f} s; "
                f"A published={pub_a.published} accepted={len(pub_a.accepted)} distinct={len(col_a.first)} "
                f"dup={dup_a} lost={len(lost_a)}; B published={pub_b.published} accepted={len(pub_b.accepted)} "
                f"distinct={len(col_b.first)} dup={dup_b} lost={len(lost_b)}\n"
                f"STALL: A pre-stall {pre_a:.0f}/s; B pre-stall {pre_b:.0f}/s, during stall "
                f"[{w0 - s0:.0f}s..{w0 - s0 + 10:.0f}s] {stall_b:.0f}/s ({stall_b / pre_b:.1%}), "
                f"whole stall {whole_stall_b:.0f}/s ({whole_stall_b / pre_b:.1%})\n"
                f"STALL: gateway RSS pre-stall median {pre_rss / 2**20:.1f} MiB, stall max "
                f"{max(stall_rss) / 2**20:.1f} MiB, growth {growth / 2**20:+.2f} MiB "
                f"(allowed {(A_BUDGET + RSS_ALLOWANCE) / 2**20:.2f} MiB)\n"
                f"STALL: A slow-consumer disconnects={len(cuts)} (full_for {[c.get('full_for') for c in cuts[:5]]}, "
                f"released {[c.get('released') for c in cuts[:5]]}) resumes={len(resumes)}; "
                f"B disconnects={len(cuts_b)}\n"
                f"STALL: A first delivery {first_txt} s after resume, caught up with {len(before_heal)} "
                f"accepted pre-heal messages {caught_up:.2f} s "
                f"after resume; all delivered {end - h0:.1f} s after resume; proxy {stats}"
            )

            assert pre_a >= 0.9 * RATE, f"A did not flow before the stall: {pre_a:.0f}/s"
            assert pre_b >= 0.9 * RATE, f"B did not flow before the stall: {pre_b:.0f}/s"
            assert stall_b >= 0.9 * pre_b, f"B slowed down by A's stall: {stall_b:.0f}/s vs {pre_b:.0f}/s"
            assert whole_stall_b >= 0.9 * pre_b, f"B slowed down: {whole_stall_b:.0f}/s vs {pre_b:.0f}/s"
            assert growth <= A_BUDGET + RSS_ALLOWANCE, f"RSS grew by {growth / 2**20:.1f} MiB during the stall"
            assert cuts, f"A was never disconnected as a slow consumer\n{gw.log_tail()}"
            assert all(float(c["full_for"]) >= A_DEADLINE for c in cuts), f"cut before its deadline: {cuts}"
            assert resumes, "A was never resumed"
            assert not cuts_b, f"B was disconnected: {cuts_b}"
            assert not lost_b, f"B lost {len(lost_b)} accepted messages (first {lost_b[:10]})"
            assert not lost_a, f"A lost {len(lost_a)} accepted messages (first {lost_a[:10]})"
            assert first_after_heal is not None, "A delivered nothing after the proxy resumed"
            await gw.astop()
            assert not gw.problems(), gw.problems()[:5]
        finally:
            if sampler is not None:
                sampler.cancel()
            for p in pubs:
                p.close()
            await close_quietly(nc)
            gw.cleanup()


# ---------------------------------------------------------------------------- 2. at-most-once accounting


@dataclass(frozen=True)
class AmoCase:
    overflow: str
    deadline: float = 0.0
    """``slow_consumer_deadline``; 0 disables the cut."""
    flush_timeout: float = 10.0
    """1 s: the stalled sink connection is given up and the gateway reconnects (through the stalled proxy)."""
    cut: bool = False
    """End the stall with ``cut()`` + ``heal()``: bytes written to a connection the gateway gave up are
    discarded, never delivered. (With ``resume()`` they may still reach the server: a message the gateway
    requeued and then evicted as overflow could be delivered after all, and counted as dropped.)"""


AMO_CASES = [
    pytest.param(AmoCase("drop_newest"), id="drop_newest"),
    pytest.param(AmoCase("block"), id="block"),
    pytest.param(AmoCase("drop_oldest", flush_timeout=1.0, cut=True), id="drop_oldest-reconnect"),
    pytest.param(AmoCase("drop_newest", deadline=1.0), id="drop_newest-slow_consumer_cut"),
    pytest.param(AmoCase("block", deadline=1.0), id="block-slow_consumer_cut"),
]

AMO_BEFORE = 500
"""Published (and all delivered) before the stall."""
AMO_DURING = 3_000
AMO_RATE = 2_000.0
AMO_STALL = 3.0
AMO_BUDGET = 100
AMO_PENDING = 200


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", AMO_CASES)
async def test_at_most_once_losses_are_all_counted(tmp_path: Path, unique: str, case: AmoCase) -> None:
    """Every message sent but never delivered is counted: sent - distinct delivered ==
    route.dropped + route.failed + src.slow_consumer_events + (sent - server out_msgs to the gateway).

    The last term is what nats-server never handed the gateway (published while a cut-off route was
    unsubscribed: not the gateway's messages); it is 0 unless the slow-consumer cut is enabled. The
    server's ``out_msgs`` for the source connection checks the gateway's own books: everything the
    server handed it was either dropped by nats-py's pending limits (``slow_consumer_events``) or
    received by the route (``received``).
    """
    with (
        NatsServer(workdir=tmp_path / "nats", jetstream=False) as nats,
        TcpProxy(nats.address) as proxy,
    ):
        src_name = f"amo-src-{unique}"
        cfg = {
            "gateway": {"id": f"amo-{unique}", "shutdown_timeout": 5, "reconnect": {"initial": 0.1, "max": 0.5}},
            "connectors": {
                "src": {"type": "nats", "servers": [nats.url], "name": src_name, "pending_msgs_limit": AMO_PENDING},
                "dst": {
                    "type": "nats",
                    "servers": [proxy.url("nats")],
                    "flush_timeout": case.flush_timeout,
                    "connect_timeout": 1.0,
                },
            },
            "routes": [
                {
                    "name": "amo",
                    "from": {"connector": "src", "subject": f"in.{unique}"},
                    "to": {"connector": "dst", "subject": f"out.{unique}"},
                    "max_in_flight": AMO_BUDGET,
                    "overflow": case.overflow,
                    "slow_consumer_deadline": case.deadline,
                }
            ],
        }
        gw = Gateway(parse_config(yaml.safe_dump(cfg)))
        pub: NatsClient | None = None
        sub: NatsClient | None = None
        await gw.start()
        try:
            await gw.wait_ready(30)
            await wait_nats_subscription(nats.monitor_url, f"in.{unique}")
            route = gw.routes["amo"]
            src: Any = gw.connectors["src"]
            sub = await nats_connect(nats.url)
            col = await SeqCollector().subscribe(sub, f"out.{unique}")
            pub = await nats_connect(nats.url)
            sent = 0

            async def publish(n: int, rate: float) -> None:
                nonlocal sent
                t0 = time.monotonic()
                for i in range(n):
                    await pub.publish(f"in.{unique}", make_payload(sent, 64))
                    sent += 1
                    if i % 50 == 49:
                        await pub.flush()
                        await sleep_until(t0 + (i + 1) / rate)
                await pub.flush()

            await publish(AMO_BEFORE, AMO_RATE)
            await wait_until(lambda: len(col.first) >= AMO_BEFORE, 15, lambda: f"{len(col.first)} of {AMO_BEFORE}")

            await asyncio.to_thread(proxy.blackhole)
            stalled_at = time.monotonic()
            await publish(AMO_DURING, AMO_RATE)
            await sleep_until(stalled_at + AMO_STALL)
            if case.cut:
                await asyncio.to_thread(proxy.cut)
                await asyncio.to_thread(proxy.heal)
            else:
                await asyncio.to_thread(proxy.resume)

            def accounted() -> bool:
                return (
                    route.in_flight == 0 and route.state.value == "running" and gw.connectors["dst"].connected.is_set()
                )

            await wait_until(accounted, 30, lambda: f"in_flight={route.in_flight} state={route.state.value}")
            await sub.flush()
            await settle(lambda: len(col.times), quiet=1.0, timeout=10)
            conn = await asyncio.to_thread(nats_connection, nats.monitor_url, src_name)
            assert conn is not None, "the gateway's source connection is gone"
            out_msgs = int(conn["out_msgs"])

            s = route.stats
            distinct = len(col.first)
            client_drops = src.slow_consumer_events
            never_handed = sent - out_msgs
            counted = s.dropped + s.failed + client_drops + never_handed
            print(
                f"\nAMO {case}: sent={sent} distinct_delivered={distinct} duplicates={len(col.times) - distinct} "
                f"| server out_msgs to gateway={out_msgs} never_handed={never_handed} "
                f"| route received={s.received} acked={s.acked} failed={s.failed} "
                f"dropped_overflow={s.dropped_overflow} dropped_released={s.dropped_released} "
                f"slow_consumer_disconnects={s.slow_consumer_disconnects} in_flight={route.in_flight} "
                f"| src slow_consumer_events={client_drops} | dst reconnects={gw.connectors['dst'].reconnects} "
                f"| lost={sent - distinct} counted={counted} uncounted={sent - distinct - counted} "
                f"| gateway-side uncounted={out_msgs - s.received - client_drops}"
            )
            assert s.received == s.acked + s.failed + s.dropped, s.as_dict()
            assert sent - distinct > 0, "the stall caused no loss: the test proves nothing"
            assert out_msgs == s.received + client_drops, (
                f"nats-server handed the gateway {out_msgs} messages, the gateway accounts for "
                f"{s.received} received + {client_drops} client-side drops"
            )
            assert distinct == s.acked, f"acked {s.acked} but {distinct} distinct messages delivered"
            assert sent - distinct == counted, f"lost {sent - distinct}, counted {counted}"
            if case.flush_timeout < AMO_STALL:
                assert gw.connectors["dst"].reconnects >= 1, "the stalled sink connection was never given up"
            if case.deadline:
                assert s.slow_consumer_disconnects >= 1, s.as_dict()
            else:
                assert never_handed == 0, never_handed
        finally:
            await close_quietly(pub)
            await close_quietly(sub)
            await gw.stop(5)


# ---------------------------------------------------------------------------- 3. poison -> dead letter

POISON_N = 200
POISON_EVERY = 10
"""Every 10th message (seq % 10 == 3) is larger than the NATS server's max_payload."""
MAX_PAYLOAD = 4096


async def read_letters(bootstrap: str, topic: str, n: int, timeout: float) -> list[tuple[bytes, dict[str, str]]]:
    """The first ``n`` records of ``topic`` (values and headers)."""
    records = await read_records(bootstrap, topic, n, timeout=timeout)
    return [(r.value or b"", {k: (v or b"").decode() for k, v in r.headers}) for r in records]


@pytest.mark.timeout(120)
async def test_poison_messages_go_to_the_dead_letter(tmp_path: Path, unique: str, kafka_broker: Tansu) -> None:
    dlq = f"dlq-{unique}"
    await create_topics(kafka_broker.bootstrap, [dlq], partitions=1)
    with (
        Mosquitto(workdir=tmp_path / "mqtt") as mosq,
        NatsServer(workdir=tmp_path / "nats", jetstream=False, extra_config=f"max_payload: {MAX_PAYLOAD}") as nats,
    ):
        cfg = {
            "gateway": {"id": f"dlq-{unique}", "shutdown_timeout": 10},
            "connectors": {
                "mqtt": {"type": "mqtt", "url": mosq.url, "client_id": f"gw-dlq-{unique}", "connect_timeout": 3},
                "nats": {"type": "nats", "servers": [nats.url]},
                "kafka": {
                    "type": "kafka",
                    "bootstrap_servers": [kafka_broker.bootstrap],
                    "idempotent": False,
                    "session_timeout_ms": 6000,
                    "heartbeat_interval_ms": 1000,
                },
            },
            "routes": [
                {
                    "name": "poison",
                    "from": {"connector": "mqtt", "topic": f"dev/{unique}/+", "qos": 1},
                    "to": {"connector": "nats", "subject": f"ok.{unique}"},
                    "dead_letter": {"connector": "kafka", "topic": dlq},
                }
            ],
        }
        text = yaml.safe_dump(cfg)
        poison = {s for s in range(POISON_N) if s % POISON_EVERY == 3}
        good = set(range(POISON_N)) - poison
        nc = await nats_connect(nats.url)
        col = await SeqCollector().subscribe(nc, f"ok.{unique}")
        pub = Publisher(mosq.port, f"pub-dlq-{unique}", lambda s: f"dev/{unique}/d{s % 4}", size=100)
        gw = Gateway(parse_config(text))
        gw2: Gateway | None = None
        await gw.start()
        try:
            await gw.wait_ready(30)
            pub.connect()
            for seq in range(POISON_N):
                pub.send(seq, size=8192 if seq in poison else 100, headers=[("x-seq", str(seq))])
            await asyncio.to_thread(pub.wait_acks)
            assert pub.accepted == set(range(POISON_N)), f"broker accepted {len(pub.accepted)}"
            route = gw.routes["poison"]
            await wait_until(
                lambda: route.stats.received == POISON_N and route.in_flight == 0,
                30,
                lambda: f"received={route.stats.received} in_flight={route.in_flight} {route.stats.as_dict()}",
            )
            await wait_until(lambda: good.issubset(col.first), 15, lambda: f"{len(col.first)} of {len(good)}")
            letters = await read_letters(kafka_broker.bootstrap, dlq, len(poison), 30)
            s = route.stats
            print(
                f"\nDLQ: sent={POISON_N} poison={len(poison)} delivered={len(col.first)} dead letters={len(letters)} "
                f"stats={s.as_dict()}\nDLQ: first letter headers: "
                f"{ {k: v[:80] for k, v in letters[0][1].items()} if letters else None }"
            )
            assert set(col.first) == good, f"poison delivered: {sorted(set(col.first) & poison)[:10]}"
            assert (s.received, s.acked, s.failed, s.dead_lettered, s.dropped) == (
                POISON_N,
                len(good),
                len(poison),
                len(poison),
                0,
            ), s.as_dict()
            assert s.retried == 0, "a payload over max_payload is not worth a retry"
            assert len(letters) == len(poison), f"{len(letters)} dead letters for {len(poison)} poison messages"
            assert {seq_of(v) for v, _ in letters} == poison
            for value, hdrs in letters:
                seq = seq_of(value)
                assert value == make_payload(seq, 8192), "the dead letter carries the original payload"
                assert hdrs.get("x-seq") == str(seq), "the source's own headers travel with it"
                assert hdrs.get("x-gateway-route") == "poison"
                assert "4096" in hdrs.get("x-gateway-error", ""), hdrs
                assert hdrs.get("x-gateway-error-type") == "PayloadTooLarge", hdrs
                assert hdrs.get("x-gateway-source-topic") == f"dev/{unique}/d{seq % 4}", hdrs
                assert "x-gateway-source-position" in hdrs, hdrs
            positions = {hdrs["x-gateway-source-position"] for _, hdrs in letters}
            print(f"DLQ: x-gateway-source-position values: {sorted(positions)[:5]}")

            # The source acknowledged everything: a restart gets only what was published meanwhile.
            assert await gw.stop(), "the gateway did not drain"
            pub.send(POISON_N, headers=[("x-seq", str(POISON_N))])
            await asyncio.to_thread(pub.wait_acks)
            gw2 = Gateway(parse_config(text))
            await gw2.start()
            await gw2.wait_ready(30)
            route2 = gw2.routes["poison"]
            await wait_until(lambda: POISON_N in col.first, 15, "the message published while the gateway was down")
            await asyncio.sleep(2.0)  # anything redelivered would have arrived by now
            print(f"DLQ: after restart: {route2.stats.as_dict()}")
            assert route2.stats.received == 1, f"the restarted gateway got {route2.stats.received} (redeliveries)"
        finally:
            pub.close()
            await close_quietly(nc)
            if gw2 is not None:
                await gw2.stop(10)
            await gw.stop(10)


# ---------------------------------------------------------------------------- 4. server-side slow consumer

BURST = 16_000
BURST_SIZE = 1024
BANDWIDTH = 16_000
"""Bytes per second from the server to the gateway, through the proxy, during the burst."""
PING_INTERVAL = 1.0


@dataclass
class SlowConsumerRun:
    reason: str = ""
    server_stop: float = 0.0
    """Wall-clock time the server closed the gateway's connection."""
    noticed_at: float = 0.0
    """Wall-clock time the gateway's NATS connector had reconnected."""
    reconnects: int = 0
    server_closed: int = 0
    slow_consumer_events: int = 0
    last_error: str | None = None
    burst_delivered: int = 0
    after_sent: int = 0
    after_delivered: int = 0
    route: dict[str, int] = field(default_factory=dict)
    server_log: str = ""


async def _slow_consumer_scenario(workdir: Path, unique: str) -> SlowConsumerRun:
    run = SlowConsumerRun()
    extra = 'max_pending: 65536\nmax_payload: 32768\nwrite_deadline: "250ms"'
    with (
        NatsServer(workdir=workdir / "nats", jetstream=False, extra_config=extra) as server,
        TcpProxy(server.address, buffer_bytes=16 * 1024, chunk_bytes=4096) as proxy,
    ):
        name = f"slow-src-{unique}"
        mem = MemoryBroker.named(f"slow-{unique}")
        cfg = {
            "gateway": {"id": f"slow-{unique}", "shutdown_timeout": 5, "reconnect": {"initial": 0.1, "max": 1.0}},
            "connectors": {
                "src": {
                    "type": "nats",
                    "servers": [proxy.url("nats")],
                    "name": name,
                    "ping_interval": PING_INTERVAL,
                    "max_outstanding_pings": 2,
                },
                "mem": {"type": "memory", "broker": f"slow-{unique}"},
            },
            "routes": [
                {
                    "name": "burst",
                    "from": {"connector": "src", "subject": f"burst.{unique}"},
                    "to": {"connector": "mem", "topic": f"out/{unique}"},
                }
            ],
        }
        gw = Gateway(parse_config(yaml.safe_dump(cfg)))
        pub: NatsClient | None = None
        await gw.start()
        try:
            await gw.wait_ready(30)
            await wait_nats_subscription(server.monitor_url, f"burst.{unique}")
            src: Any = gw.connectors["src"]
            await asyncio.to_thread(proxy.bandwidth, BANDWIDTH, "downstream")
            pub = await nats_connect(server.url)
            data = make_payload(0, BURST_SIZE)
            for i in range(BURST):
                await pub.publish(f"burst.{unique}", data)
                if i % 500 == 499:
                    await pub.flush()
            await pub.flush()

            async def cut() -> list[dict[str, Any]]:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    found = await asyncio.to_thread(nats_closed_connections, server.monitor_url, name)
                    if found:
                        return found
                    await asyncio.sleep(0.2)
                return []

            closed = await cut()
            if closed:
                run.reason = str(closed[0].get("reason", ""))
                run.server_stop = parse_rfc3339(str(closed[0]["stop"]))
            with contextlib.suppress(AssertionError):
                await wait_until(lambda: src.reconnects >= 1 and src.connected.is_set(), 30, "the gateway reconnected")
                run.noticed_at = time.time()
            run.reconnects = src.reconnects
            run.server_closed = src.server_closed
            run.slow_consumer_events = src.slow_consumer_events
            run.last_error = src.channels[0].last_error if src.channels else None
            run.burst_delivered = len(mem.received)

            await asyncio.to_thread(proxy.heal)
            await wait_nats_subscription(server.monitor_url, f"burst.{unique}")
            for i in range(200):
                await pub.publish(f"burst.{unique}", make_payload(1_000_000 + i, 64))
            await pub.flush()
            run.after_sent = 200

            def after() -> int:
                return sum(1 for r in mem.received if seq_of(r.payload) >= 1_000_000)

            with contextlib.suppress(AssertionError):
                await wait_until(lambda: after() >= 200, 20, "messages after the heal")
            run.after_delivered = after()
            run.route = gw.routes["burst"].stats.as_dict()
            run.server_log = "\n".join(
                line for line in server.log_tail(200).splitlines() if "Slow Consumer" in line or "slow" in line.lower()
            )
        finally:
            await close_quietly(pub)
            await gw.stop(5)
    return run


@pytest.fixture(scope="module")
def slow_consumer_run(tmp_path_factory: pytest.TempPathFactory) -> SlowConsumerRun:
    """Runs the scenario once (on uvloop, bounded) for the two tests that judge it."""

    async def bounded() -> SlowConsumerRun:
        async with asyncio.timeout(90):
            return await _slow_consumer_scenario(tmp_path_factory.mktemp("slow"), uuid.uuid4().hex[:12])

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        run = runner.run(bounded())
    detect = run.noticed_at - run.server_stop if run.noticed_at and run.server_stop else None
    print(
        f"\nSLOW CONSUMER: server reason={run.reason!r}; gateway reconnects={run.reconnects} "
        f"(noticed ~{detect if detect is None else round(detect, 2)} s after the server's cut, "
        f"ping_interval={PING_INTERVAL}) last_error={run.last_error!r}; server_closed="
        f"{run.server_closed}; client-side slow_consumer_events={run.slow_consumer_events}; "
        f"burst delivered before the cut {run.burst_delivered}/{BURST}; after heal {run.after_delivered}/"
        f"{run.after_sent}; route {run.route}\nSLOW CONSUMER: server log:\n{run.server_log}"
    )
    return run


@pytest.mark.timeout(120)
def test_nats_server_cuts_the_slow_gateway_and_it_recovers(slow_consumer_run: SlowConsumerRun) -> None:
    run = slow_consumer_run
    assert "Slow Consumer" in run.reason, f"nats-server closed the gateway's connection for {run.reason!r}"
    assert run.reconnects >= 1, "the gateway did not notice that the server cut it off"
    assert run.after_delivered == run.after_sent, f"{run.after_delivered} of {run.after_sent} after the heal"


@pytest.mark.timeout(120)
def test_gateway_counts_the_server_closed_cut(slow_consumer_run: SlowConsumerRun) -> None:
    """nats-server closes a slow consumer without a reason (no -ERR): the gateway counts that the server
    dropped it (``server_closed``: end of stream or unanswered PINGs) and says what to look for."""
    assert "Slow Consumer" in slow_consumer_run.reason
    assert slow_consumer_run.server_closed >= 1
