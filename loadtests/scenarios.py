"""One measurement of one route: prepare the brokers, run a bridge, count what arrives.

``throughput`` preloads durable sources (Kafka topic, JetStream stream, a
queued persistent MQTT session) before the bridge starts, so the load
generator does not share the CPU during the measurement; core NATS sources are
offered at a fixed rate instead and report loss. ``latency`` offers a fixed
rate through the bridge, then the same rate straight into the sink broker
(no bridge): the difference is what the bridge adds. ``direct`` is the sink
broker's own limit with the same clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from loadtests.bridges import BridgeProcess, Endpoints, base_route, gateway_process, peer_process
from loadtests.drivers import (
    Counter,
    KafkaCount,
    Mqtt,
    Nats,
    NatsCount,
    kafka_create,
    kafka_produce,
    mqtt_session,
    wait_count,
    wait_until,
)


@dataclass(frozen=True)
class Route:
    name: str
    label: str
    source: str
    sinks: tuple[str, ...]
    offered: float | None = None
    """Core NATS sources: the fixed offered rate of the throughput measurement (msgs/s)."""
    gateway_only: bool = False
    """A variant of the gateway's own settings (no peer run)."""
    scale: float = 1.0
    """Messages per run relative to the harness's per-size counts, so that the steady window of the faster
    bridge lasts seconds on this route (fast routes move more per run, slow ones less)."""
    huge: bool = False
    """Also measured at 64 KiB."""
    workers: int = 1
    """Gateway worker processes (``gateway.workers``)."""
    keys: int = 0
    """MQTT sources: publish round-robin to this many topics ``<src>/d<k>`` (the key of ``shard_by``)."""


ROUTES = [
    Route("kafka_to_nats", "Kafka → NATS", "kafka", ("nats",), scale=2.0, huge=True),
    Route(
        "kafka_to_nats_kafkadriver_aiokafka", "Kafka → NATS, `driver: aiokafka`", "kafka", ("nats",), gateway_only=True
    ),
    Route("jetstream_to_kafka", "JetStream → Kafka", "jetstream", ("kafka",), scale=0.75),
    Route("corenats_to_kafka", "core NATS → Kafka", "corenats", ("kafka",), offered=20_000, scale=0.25),
    Route("mqtt_to_kafka", "MQTT QoS 1 → Kafka", "mqtt", ("kafka",), huge=True),
    # 400 000 queued messages: the peer's MQTT source degrades past that (1 000 000 queued: ~11 000 msgs/s,
    # 12 CPU s per 100k, 1.3 GB), which would measure its backlog handling, not its bridging.
    Route("mqtt_to_nats", "MQTT QoS 1 → NATS", "mqtt", ("nats",), huge=True),
    Route("kafka_to_mqtt", "Kafka → MQTT QoS 1", "kafka", ("mqtt",), scale=0.25),
    Route("corenats_to_mqtt", "core NATS → MQTT QoS 1", "corenats", ("mqtt",), offered=10_000, scale=0.25),
    Route("fanout_mqtt", "MQTT QoS 1 → Kafka + NATS", "mqtt", ("kafka", "nats"), scale=0.75),
    Route(
        "mqtt_to_kafka_compression_none",
        "MQTT QoS 1 → Kafka, `compression: none`",
        "mqtt",
        ("kafka",),
        gateway_only=True,
        huge=True,
    ),
    Route("mqtt_to_kafka_spool", "MQTT QoS 1 → Kafka, `spool` (fsync)", "mqtt", ("kafka",), gateway_only=True),
    # Several workers (issue 17): beside the one-worker rows and the peer rows of the same routes above.
    Route(
        "kafka_to_nats_workers_2",
        "Kafka → NATS, 2 workers",
        "kafka",
        ("nats",),
        gateway_only=True,
        scale=2.0,
        workers=2,
    ),
    Route(
        "jetstream_to_kafka_workers_2",
        "JetStream → Kafka, 2 workers (`order: none`)",
        "jetstream",
        ("kafka",),
        gateway_only=True,
        scale=0.75,
        workers=2,
    ),
    Route(
        "mqtt_to_kafka_workers_2",
        "MQTT QoS 1 → Kafka, 2 workers (`order: none`: shared subscription)",
        "mqtt",
        ("kafka",),
        gateway_only=True,
        workers=2,
    ),
    Route(
        "mqtt_to_kafka_keyed",
        "MQTT QoS 1 → Kafka, 16 keys, 1 worker",
        "mqtt",
        ("kafka",),
        gateway_only=True,
        keys=16,
    ),
    Route(
        "mqtt_to_kafka_keyed_workers_2",
        "MQTT QoS 1 → Kafka, 16 keys, 2 workers (`shard_by`)",
        "mqtt",
        ("kafka",),
        gateway_only=True,
        keys=16,
        workers=2,
    ),
    Route(
        "mqtt_to_kafka_kafkadriver_aiokafka",
        "MQTT QoS 1 → Kafka, `driver: aiokafka`",
        "mqtt",
        ("kafka",),
        gateway_only=True,
    ),
]
BY_NAME = {r.name: r for r in ROUTES}

Progress = Callable[[str], None]


class Brokers:
    """Broker addresses for the whole run (and their PIDs, to say who used the CPU)."""

    def __init__(
        self, mqtt_port: int, nats_url: str, kafka: str, workdir: Path, pids: dict[str, int] | None = None
    ) -> None:
        self.mqtt_port, self.nats_url, self.kafka, self.workdir = mqtt_port, nats_url, kafka, workdir
        self.pids = pids or {}

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each broker and of this harness process."""
        out = {"harness": _cpu(psutil.Process())}
        for name, pid in self.pids.items():
            with contextlib.suppress(psutil.Error):
                out[name] = _cpu(psutil.Process(pid))
        return out

    def endpoints(self) -> Endpoints:
        return Endpoints(self.mqtt_port, self.nats_url, self.kafka, uuid.uuid4().hex[:10])


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


class Sinks:
    """Counting consumers on every sink of a route, started before the bridge."""

    def __init__(self, route: Route, ep: Endpoints, n: int) -> None:
        self.route, self.ep = route, ep
        self.counters = {s: Counter(n) for s in route.sinks}
        self._closers: list[Any] = []

    async def start(self) -> None:
        ep = self.ep
        for sink, counter in self.counters.items():
            if sink == "kafka":
                await kafka_create(ep.kafka, ep.kafka_dst)
                kc = KafkaCount(ep.kafka, ep.kafka_dst, 4, counter)
                await kc.start()
                self._closers.append(kc.stop)
            elif sink == "nats":
                nc = NatsCount(ep.nats_url, ep.nats_dst, counter)
                await nc.start()
                self._closers.append(nc.stop)
            else:
                mq = Mqtt(ep.mqtt_port, f"lt-sink-{ep.u}")
                mq.on_message = counter.add
                await mq.connect()
                await mq.subscribe(ep.mqtt_dst, 1)
                self._closers.append(mq.close)

    @property
    def slowest(self) -> Counter:
        """The leg with the fewest arrivals, then the lowest steady rate."""
        return min(self.counters.values(), key=lambda c: (c.count, c.steady_rate()))

    async def close(self) -> None:
        for close in self._closers:
            with contextlib.suppress(Exception):  # tearing down after a measurement
                await close()


async def _prepare_source(route: Route, ep: Endpoints, kind: str = "gateway") -> None:
    if route.source == "kafka":
        await kafka_create(ep.kafka, ep.kafka_src)
    elif route.source == "jetstream":
        nc = await Nats(ep.nats_url).connect()
        await nc.add_stream(ep.js_stream, [ep.js_subject])
        await nc.close()
    elif route.source == "mqtt":
        # The gateway reads each MQTT source route through its own session, <client_id>-<route>; worker k of
        # several through <client_id>-w<k>-<route>, each reading every key (shard_by).
        # Without keys, several workers share one subscription (order: none): the broker splits the backlog.
        topic = f"{ep.mqtt_src}/+" if route.keys else ep.mqtt_src
        if kind != "gateway":
            await mqtt_session(ep.mqtt_port, ep.client_id, topic)
        elif route.workers == 1:
            await mqtt_session(ep.mqtt_port, f"{ep.client_id}-{base_route(route.name)}", topic)
        else:
            name = base_route(route.name)
            shared = topic if route.keys else f"$share/gateway.{name}/{topic}"
            for k in range(route.workers):
                await mqtt_session(ep.mqtt_port, f"{ep.client_id}-w{k}-{name}", shared)


async def _publish(route: Route, ep: Endpoints, n: int, size: int, rate: float | None) -> float:
    if route.source == "kafka":
        return await asyncio.to_thread(kafka_produce, ep.kafka, ep.kafka_src, n, size, rate=rate)
    if route.source == "mqtt":
        pub = await Mqtt(ep.mqtt_port, f"lt-pub-{ep.u}").connect()
        try:
            return await pub.publish(ep.mqtt_src, n, size, rate=rate, keys=route.keys)
        finally:
            await pub.close()
    nc = await Nats(ep.nats_url).connect()
    try:
        if route.source == "jetstream":
            return await nc.js_publish(ep.js_subject, n, size, rate=rate)
        return await nc.publish(ep.nats_src, n, size, rate=rate)
    finally:
        await nc.close()


def _bridge(kind: str, route: Route, ep: Endpoints, workdir: Path) -> BridgeProcess:
    make = gateway_process if kind == "gateway" else peer_process
    return make(route.name, ep, workdir / f"{kind}-{route.name}-{ep.u}")


async def throughput(
    kind: str,
    route: Route,
    brokers: Brokers,
    *,
    n: int,
    size: int,
    progress: Progress,
    profile: Path | None = None,
) -> dict[str, Any]:
    ep = brokers.endpoints()
    await _prepare_source(route, ep, kind)
    sinks = Sinks(route, ep, n)
    await sinks.start()
    preload = None
    if route.offered is None:
        progress("preloading")
        preload = await _publish(route, ep, n, size, None)
    bridge = _bridge(kind, route, ep, brokers.workdir)
    try:
        await bridge.start()
        assert bridge.sampler is not None and bridge.proc is not None
        spy = start_profiler(bridge.proc.pid, profile) if profile is not None else None
        idle_rss = bridge.sampler.rss()
        own_idle_rss = bridge.sampler.own_rss()
        cpu0 = bridge.sampler.cpu()
        others0, wall0 = brokers.cpu(), time.monotonic()
        publisher = None
        if route.offered is not None:
            publisher = asyncio.create_task(_publish(route, ep, n, size, route.offered))
        for counter in sinks.counters.values():  # a fan-out is done when its slowest leg is

            def tick(count: int, counter: Counter = counter) -> None:
                if count > 1:
                    elapsed = (counter.arrivals[-1] - counter.arrivals[0]) / 1e9
                    progress(f"{count}/{n} arrived, {count / max(elapsed, 1e-3):,.0f} msgs/s so far")

            await wait_count(counter, timeout=120, idle=8 if route.offered is None else 5, progress=tick)
        if publisher is not None:
            await publisher
            for counter in sinks.counters.values():
                await wait_count(counter, timeout=10, idle=2)
        cpu = bridge.sampler.cpu() - cpu0
        wall = time.monotonic() - wall0
        others = {k: round(100 * (v - others0.get(k, 0.0)) / wall) for k, v in brokers.cpu().items()}
        others[kind] = round(100 * cpu / wall)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            await asyncio.to_thread(spy.wait, 30)
        received = {s: c.count for s, c in sinks.counters.items()}
        slow = sinks.slowest
        return {
            "kind": kind,
            "route": route.name,
            "size": size,
            "n": n,
            "offered": route.offered,
            "received": min(received.values()),
            "received_per_sink": received,
            "lost": n - min(received.values()),
            "duplicates": max(c.duplicates for c in sinks.counters.values()),
            "steady_msgs_s": round(slow.steady_rate()),
            "steady_window_s": round(slow.steady_window(), 2),
            "overall_msgs_s": round(slow.overall_rate()),
            "preload_msgs_s": round(preload) if preload else None,
            "idle_rss_mb": round(idle_rss / 2**20, 1),
            "peak_rss_mb": round(bridge.sampler.peak_rss / 2**20, 1),
            "cpu_s_per_100k": round(cpu / max(1, slow.count) * 100_000, 2),
            "workers": route.workers,
            "supervisor_idle_rss_mb": round(own_idle_rss / 2**20, 1) if route.workers > 1 else None,
            "cpu_percent": others,
        }
    finally:
        rc = await bridge.stop()
        await sinks.close()
        if rc not in (0, -15):
            progress(f"{kind} exited with {rc}: {bridge.tail(5)}")


def start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the bridge until SIGINT; collapsed stacks go to ``out``."""
    spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen(
        [str(spy), "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--nonblocking", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6

    return {"p50_ms": round(at(0.5), 2), "p99_ms": round(at(0.99), 2), "max_ms": round(ordered[-1] / 1e6, 2)}


async def latency(
    kind: str, route: Route, brokers: Brokers, *, rate: float, seconds: float, size: int, progress: Progress
) -> dict[str, Any]:
    """Latency through the bridge at ``rate``, and the same clients straight to the sink broker."""
    n = int(rate * seconds)
    ep = brokers.endpoints()
    await _prepare_source(route, ep, kind)
    sinks = Sinks(route, ep, n)
    await sinks.start()
    bridge = _bridge(kind, route, ep, brokers.workdir)
    try:
        await bridge.start()
        # Idle RSS: connected, nothing to move yet (the throughput runs start on a preloaded backlog).
        await asyncio.sleep(1.0)
        assert bridge.sampler is not None
        idle_rss = bridge.sampler.rss()
        # Let a consumer group settle before offering load (Kafka sources join after ~3 s on Tansu).
        if route.source == "kafka":
            await _publish(route, ep, 1, size, None)
            await wait_until(lambda: sinks.slowest.count >= 1, timeout=30)
            for c in sinks.counters.values():
                c.reset(n)
        progress(f"{rate:,.0f} msgs/s for {seconds:.0f} s")
        await _publish(route, ep, n, size, rate)
        await wait_count(sinks.slowest, timeout=30, idle=3)
    finally:
        await bridge.stop()
        await sinks.close()
    lat = sinks.counters[route.sinks[0]].latencies_ns
    warm = lat[len(lat) // 10 :]
    direct = await direct_latency(route.sinks[0], brokers, rate=rate, seconds=seconds, size=size)
    got = sinks.counters[route.sinks[0]].count
    result = {
        "kind": kind,
        "route": route.name,
        "rate": rate,
        "size": size,
        "n": n,
        "received": got,
        "idle_rss_mb": round(idle_rss / 2**20, 1),
        **_percentiles(warm),
        "direct": direct,
    }
    result["added_p50_ms"] = round(result["p50_ms"] - direct["p50_ms"], 2)
    result["added_p99_ms"] = round(result["p99_ms"] - direct["p99_ms"], 2)
    if route.source == "kafka":
        # The Kafka hop itself (producer -> Tansu -> consumer), which the sink-direct baseline lacks.
        result["source_hop"] = await direct_latency("kafka", brokers, rate=rate, seconds=seconds, size=size)
    return result


async def _direct(
    sink: str, brokers: Brokers, *, n: int, size: int, rate: float | None, timeout: float, idle: float
) -> tuple[Counter, float]:
    """The harness's own clients straight into the sink broker, counted like a bridge's output.

    Publishes ``n`` messages at ``rate`` (``None``: as fast as the client can); returns the counter
    and the publisher's own rate.
    """
    ep = brokers.endpoints()
    counter = Counter(n)
    closers: list[Any] = []
    try:
        if sink == "kafka":
            await kafka_create(ep.kafka, ep.kafka_dst)
            kc = KafkaCount(ep.kafka, ep.kafka_dst, 4, counter)
            await kc.start()
            closers.append(kc.stop)
            await asyncio.sleep(0.5)  # the consumer is assigned its partitions
            published = await asyncio.to_thread(kafka_produce, ep.kafka, ep.kafka_dst, n, size, rate=rate)
        elif sink == "nats":
            nc = NatsCount(ep.nats_url, ep.nats_dst, counter)
            await nc.start()
            closers.append(nc.stop)
            pub = await Nats(ep.nats_url).connect()
            closers.append(pub.close)
            published = await pub.publish(ep.nats_dst, n, size, rate=rate)
        else:
            sub = Mqtt(ep.mqtt_port, f"lt-dsub-{ep.u}")
            sub.on_message = counter.add
            await sub.connect()
            closers.append(sub.close)
            await sub.subscribe(ep.mqtt_dst, 1)
            mpub = await Mqtt(ep.mqtt_port, f"lt-dpub-{ep.u}").connect()
            closers.append(mpub.close)
            published = await mpub.publish(ep.mqtt_dst, n, size, rate=rate)
        await wait_count(counter, timeout=timeout, idle=idle)
    finally:
        for close in reversed(closers):
            await close()
    return counter, published


async def direct_latency(sink: str, brokers: Brokers, *, rate: float, seconds: float, size: int) -> dict[str, float]:
    counter, _ = await _direct(sink, brokers, n=int(rate * seconds), size=size, rate=rate, timeout=30, idle=3)
    return _percentiles(counter.latencies_ns[len(counter.latencies_ns) // 10 :])


async def direct_throughput(sink: str, brokers: Brokers, *, n: int, size: int) -> dict[str, Any]:
    """The sink broker's limit with the harness's own clients: publish as fast as they can, count."""
    counter, rate = await _direct(sink, brokers, n=n, size=size, rate=None, timeout=60, idle=5)
    return {
        "sink": sink,
        "size": size,
        "n": n,
        "publish_msgs_s": round(rate),
        "end_to_end_msgs_s": round(counter.steady_rate()),
        "received": counter.count,
    }


def median_of(results: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else 0.0
