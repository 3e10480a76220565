"""Broker restarts under traffic, as one table of scenarios and one way to run each.

A scenario is a route from a *source* end to a *sink* end, each a durable endpoint (MQTT QoS 1
with persistent sessions, JetStream, Kafka), and which end's broker is restarted: the *victim*, a
dedicated instance in the test's directory; the other end uses the session's broker. The table,
:data:`SCENARIOS`, is what ``tests/fault/test_broker_restarts.py`` runs with SIGKILL and SIGTERM
and ``tests/fault/test_long_outages.py`` runs (its sink rows) with a long outage.

One run (:func:`run_scenario`): the gateway in-process on the test's event loop, ``N``
sequence-numbered messages published at ``RATE`` by independent clients that keep retrying while
their broker is down (:mod:`tests.support.outage_clients`); the first message alone, the rest once it
arrived; the victim killed or stopped once ``KILL_AT`` are out, down for ``outage`` s, started again
on the same port and data directory; the last third held until it is back. :func:`check` asserts
the outcome: nothing accepted lost, duplicates within the route's window plus what the test's own
clients may cause, the gateway alive and the victim's connector reconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gateway import Gateway
from gateway.config import parse_config
from tests.support.brokers import BrokerProcess, Mosquitto, NatsServer, Tansu
from tests.support.clients.kafka import create_topics, read_records
from tests.support.clients.nats import add_stream
from tests.support.configs import kafka_connector as kafka_entry
from tests.support.configs import mqtt_connector as mqtt_entry
from tests.support.configs import nats_connector as nats_entry
from tests.support.messages import device_of
from tests.support.outage_clients import (
    DEVICES,
    Collector,
    DurableJetStreamCollector,
    KafkaSeqCollector,
    Pace,
    PacedJetStreamPublisher,
    PacedKafkaPublisher,
    PacedMqttPublisher,
    Publisher,
    SessionMqttCollector,
    close_all,
    seq_of,
)
from tests.support.waits import wait_progress, wait_until

N = 3_000
"""Messages per scenario."""
RATE = 600.0
"""Messages per second: the stream lasts ~5 s, the victim goes down ~1.7 s in."""
KILL_AT = N // 3
RESUME_AT = 2 * N // 3
"""Publishers hold this message and the rest until the victim is up again."""
PACE = Pace(n=N, rate=RATE, hold_at=RESUME_AT)
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


async def create_topic(bootstrap: str, topic: str) -> None:
    """One partition: the order of the whole stream is the order of the partition."""
    await create_topics(bootstrap, [topic], partitions=1)


async def topic_copies(bootstrap: str, topic: str) -> Counter[int]:
    """Copies per seq in ``topic`` (a Kafka source can be read back: a publisher's own duplicates show)."""
    return Counter(seq_of(r.value) for r in await read_records(bootstrap, topic))


# ------------------------------------------------------------------ the gateway


def gateway_config(u: str, connectors: dict[str, Any], route: dict[str, Any]) -> str:
    """One route ``r`` with the in-flight window ``WINDOW``; reconnects retried within a second."""
    return yaml.safe_dump(
        {
            "gateway": {"id": f"fault-{u}", "shutdown_timeout": 10, "reconnect": {"initial": 0.1, "max": 1.0}},
            "connectors": connectors,
            "routes": [{"name": "r", "max_in_flight": WINDOW, **route}],
        },
        sort_keys=False,
    )


def mqtt_connector(url: str, client_id: str) -> dict[str, Any]:
    return mqtt_entry(url, client_id, keepalive=5, receive_maximum=WINDOW)


def nats_connector(url: str) -> dict[str, Any]:
    return nats_entry(url, connect_timeout=2)


def kafka_connector(bootstrap: str) -> dict[str, Any]:
    return kafka_entry(bootstrap, request_timeout_ms=10000)


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


# ------------------------------------------------------------------ the ends of a route


@dataclass(frozen=True)
class End:
    """One kind of durable endpoint: how a scenario makes, feeds, routes and reads it."""

    kind: Literal["mqtt", "jetstream", "kafka"]
    connector_name: str
    """The connector's name when this end is not the victim (the victim's connector is ``victim``)."""
    fixture: str
    """The session broker's fixture, when this end is not the victim."""

    def victim(self, workdir: Path) -> BrokerProcess:
        if self.kind == "mqtt":
            # Saves its DB on every change, so that a SIGKILL keeps (nearly) all it acknowledged.
            return Mosquitto(
                workdir=workdir / "mosquitto", autosave_interval=1, extra_config="autosave_on_changes true"
            )
        if self.kind == "jetstream":
            return NatsServer(workdir=workdir / "nats")
        return Tansu(storage="s3", workdir=workdir / "tansu")

    def connector(self, broker: Any, u: str) -> dict[str, Any]:
        if self.kind == "mqtt":
            return mqtt_connector(broker.url, f"gw-{u}")
        if self.kind == "jetstream":
            return nats_connector(broker.url)
        return kafka_connector(broker.bootstrap)

    async def prepare(self, broker: Any, ids: Ids) -> None:
        if self.kind == "jetstream":
            await add_stream(broker.url, ids.stream, [f"{ids.prefix}.>"])
        elif self.kind == "kafka":
            await create_topic(broker.bootstrap, ids.topic)

    def source(self, connector: str, ids: Ids) -> dict[str, Any]:
        if self.kind == "mqtt":
            return {"connector": connector, "topic": f"{ids.path}/{{dev}}", "qos": 1}
        if self.kind == "jetstream":
            return {"connector": connector, "subject": f"{ids.prefix}.{{dev}}", "stream": ids.stream, "ack_wait": 5}
        return {"connector": connector, "topic": ids.topic, "group": f"g-{ids.u}"}

    def sink(self, connector: str, ids: Ids, *, captured: bool) -> dict[str, Any]:
        """``captured``: the source pattern captures ``{dev}`` (a Kafka source's topic does not)."""
        if self.kind == "mqtt":
            return {"connector": connector, "topic": f"{ids.path}/{{dev}}", "qos": 1}
        if self.kind == "jetstream":
            subject = f"{ids.prefix}.{{dev}}" if captured else f"{ids.prefix}.data"
            return {"connector": connector, "subject": subject, "jetstream": True}
        return {"connector": connector, "topic": ids.topic, "key": "{dev}"}

    async def publisher(self, broker: Any, ids: Ids) -> Publisher:
        u = ids.u
        if self.kind == "mqtt":
            pub = PacedMqttPublisher(PACE, broker.port, f"pub-{u}", ids.topic_of, inflight=PUB_INFLIGHT)
            return await asyncio.to_thread(pub.connect)
        if self.kind == "jetstream":
            return await PacedJetStreamPublisher(PACE, broker.url, ids.subject_of, u).connect()
        return await PacedKafkaPublisher(PACE, broker.bootstrap, ids.topic).connect()

    async def collector(self, broker: Any, ids: Ids) -> Collector:
        if self.kind == "mqtt":
            col = SessionMqttCollector(broker.port, f"col-{ids.u}", f"{ids.path}/#", receive_maximum=SUB_RECEIVE_MAX)
            return await asyncio.to_thread(col.start)
        if self.kind == "jetstream":
            return await DurableJetStreamCollector(broker.url, ids.stream, f"{ids.prefix}.>", f"col-{ids.u}").start()
        return await KafkaSeqCollector(broker.bootstrap, ids.topic).start()

    async def copies(self, broker: Any, ids: Ids) -> Counter[int] | None:
        """Copies per seq this end holds as a source, where the test can read them (a Kafka topic)."""
        return await topic_copies(broker.bootstrap, ids.topic) if self.kind == "kafka" else None


MQTT = End("mqtt", "mq", "mosquitto")
JETSTREAM = End("jetstream", "js", "nats_server")
KAFKA = End("kafka", "kafka", "kafka_broker")


@dataclass(frozen=True)
class Ids:
    """The names one run uses: MQTT topics under ``path``, subjects under ``prefix``, a stream, a topic."""

    u: str
    path: str
    prefix: str
    stream: str
    topic: str

    @classmethod
    def of(cls, tag: str, u: str) -> Ids:
        return cls(u, path=f"{tag}/{u}", prefix=f"{tag}.{u}", stream=f"{tag.upper()}_{u}", topic=f"{tag}-{u}")

    def topic_of(self, seq: int) -> str:
        """The MQTT topic a publisher sends ``seq`` to (its device's)."""
        return f"{self.path}/{device_of(seq, DEVICES)}"

    def subject_of(self, seq: int) -> str:
        return f"{self.prefix}.{device_of(seq, DEVICES)}"


@dataclass(frozen=True)
class Scenario:
    """A route from ``source`` to ``sink``, with the broker of the ``victim`` end restarted."""

    name: str
    source: End
    sink: End
    victim: Literal["source", "sink"]
    allowance: int
    """Duplicates the test's own clients may cause (beyond the route's window)."""
    library_reconnects: bool = False
    """The victim is the source Kafka broker: aiokafka reconnects without the connector noticing (the
    confluent sink reports a lost broker, so a Tansu sink restart is checked like the others)."""

    @property
    def other(self) -> End:
        """The end on the session's broker."""
        return self.sink if self.victim == "source" else self.source

    def __str__(self) -> str:
        return self.name


SCENARIOS = [
    # paho resends its unacknowledged window after a reconnect; Mosquitto stores such a QoS 1 resend again.
    Scenario("mosquitto-source", MQTT, JETSTREAM, "source", allowance=PUB_INFLIGHT),
    # redelivered to the test's subscriber: what it had not acknowledged.
    Scenario("mosquitto-sink", JETSTREAM, MQTT, "sink", allowance=SUB_RECEIVE_MAX),
    # Nats-Msg-Id dedups the publisher's retries: one copy per seq in the source stream.
    Scenario("nats-source", JETSTREAM, KAFKA, "source", allowance=0),
    # JetStream's file store keeps what it acknowledged.
    Scenario("nats-sink", KAFKA, JETSTREAM, "sink", allowance=0),
    # the consumer group resumes from its committed offset (S3 storage).
    Scenario("tansu-source", KAFKA, JETSTREAM, "source", allowance=0, library_reconnects=True),
    # records Tansu acknowledged survive (S3 storage), the rest is resent; the publisher's broker stays up.
    Scenario("tansu-sink", MQTT, KAFKA, "sink", allowance=0),
]


# ------------------------------------------------------------------ one run


@dataclass
class Result:
    label: str
    accepted: set[int]
    copies: Counter[int]
    source_copies: Counter[int] | None
    """Copies each seq has at the source, where the test can read them (a Kafka topic)."""
    allowance: int
    """Duplicates the test's own clients may cause (see :class:`Scenario`)."""
    timings: dict[str, float] = field(default_factory=dict)
    reconnects: int = 0
    disconnected_seen: bool = False
    runner_alive: bool = True
    stats: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    library_reconnects: bool = False

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


async def fault_run(
    label: str,
    victim: BrokerProcess,
    how: str,
    gw: Gateway,
    runner: asyncio.Future[None],
    publisher: Publisher,
    collector: Collector,
    outage: float = OUTAGE,
) -> tuple[set[int], dict[str, float], int, bool]:
    """Publish, restart the victim a third of the way in, wait until everything accepted arrived."""
    conn = gw.connectors["victim"]
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
        # Bounded: until all accepted arrived, the deadline passed, or nothing new came for STALL s.
        await wait_progress(
            lambda: len(collector.first_seen),
            lambda _: accepted <= collector.first_seen.keys(),
            timeout=DRAIN_TIMEOUT,
            stall=STALL,
        )
        timings["drained"] = time.monotonic() - t_kill
        await asyncio.sleep(1.0)  # late duplicates, if any, land in the count
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    after = [t for t in collector.first_seen.values() if t >= t_up]
    timings["recovery"] = (min(after) - t_kill) if after else -1.0
    assert not runner.done(), f"{label}: the gateway stopped running: {runner!r}"
    return accepted, timings, conn.reconnects, disconnected_seen


def _notes(publisher: Any, collector: Any) -> str:
    notes = f"publisher_retries={publisher.retries}"
    if isinstance(collector, SessionMqttCollector):
        notes += f" subscriber: DUP-flagged={collector.marked_dup} sessions_resumed={collector.sessions_resumed}"
    if isinstance(collector, KafkaSeqCollector):
        notes += f" collector_errors={len(collector.errors)}"
    return notes


async def run_scenario(
    scenario: Scenario, how: str, workdir: Path, other: Any, u: str, *, outage: float = OUTAGE
) -> Result:
    """One run of ``scenario``: its victim in ``workdir``, the other end on the session broker ``other``."""
    on_source = scenario.victim == "source"
    victim = (scenario.source if on_source else scenario.sink).victim(workdir)
    src, dst = (victim, other) if on_source else (other, victim)
    src_name = "victim" if on_source else scenario.source.connector_name
    dst_name = scenario.sink.connector_name if on_source else "victim"
    ids = Ids.of(scenario.name.replace("-", ""), u)
    label = f"{scenario.name} {how}"
    victim.start()
    collector: Collector | None = None
    publisher: Publisher | None = None
    try:
        await scenario.source.prepare(src, ids)
        await scenario.sink.prepare(dst, ids)
        collector = await scenario.sink.collector(dst, ids)
        config = gateway_config(
            u,
            {src_name: scenario.source.connector(src, u), dst_name: scenario.sink.connector(dst, u)},
            {
                "from": scenario.source.source(src_name, ids),
                "to": scenario.sink.sink(dst_name, ids, captured=scenario.source is not KAFKA),
            },
        )
        async with running_gateway(config) as (gw, runner):
            publisher = await scenario.source.publisher(src, ids)
            accepted, timings, reconnects, seen_down = await fault_run(
                label, victim, how, gw, runner, publisher, collector, outage
            )
            return Result(
                label,
                accepted,
                collector.copies(),
                await scenario.source.copies(src, ids),
                allowance=scenario.allowance,
                timings=timings,
                reconnects=reconnects,
                disconnected_seen=seen_down,
                runner_alive=not runner.done(),
                stats=route_stats(gw),
                notes=_notes(publisher, collector),
                library_reconnects=scenario.library_reconnects,
            )
    finally:
        await close_all(publisher, collector)
        await asyncio.to_thread(victim.stop)
