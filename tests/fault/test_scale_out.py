"""Scale-out on the brokers' own distribution: three gateway processes on ONE config file.

The three processes run ``gateway run -c scale-out.yaml`` on the very same file
and differ only in the environment: ``gateway.id: ${GATEWAY_ID}``, from which
every client identity derives (MQTT client ids ``<id>-mq`` / ``<id>-mq-r``,
NATS connection names, Kafka client ids), and the sink subject
``so.<u>.<kind>.${GATEWAY_ID}``, which tells which gateway delivered a message.
Each source kind splits its messages between them by the broker's own means:

==========  ===============================================  =============
source      how the three share it                           guarantee
==========  ===============================================  =============
MQTT QoS 1  ``share_group`` → ``$share/<group>/<filter>``    at-least-once
core NATS   ``queue`` (queue group)                          at-most-once
JetStream   one ``durable`` consumer, pulled by all three    at-least-once
Kafka       one consumer ``group``, topic of 3 partitions    at-least-once
==========  ===============================================  =============

Every route writes to a JetStream stream (``jetstream: true``: confirmed by the
PubAck, durable, read back exactly at the end). A core subscription of the test
on the same subjects sees every publish, also those the stream deduplicated by
``Nats-Msg-Id`` (JetStream and Kafka sources set it from the source position),
so "raw" duplicates are what the gateways delivered more than once and
"stored" duplicates what the stream kept twice.

1. **Spread**: ``N`` sequence-numbered messages with the three up and the
   distribution settled (Kafka: 1 partition each). Every message arrives (the
   core NATS route may lose, which is reported), no duplicates on the durable
   routes (nothing rebalanced), and every gateway took a share (per gateway:
   first copies in the sink, and its own ``/routez`` ``acked`` counter).
2. **Failover** (durable routes, and core NATS for its loss figure): ``M``
   more messages and one gateway SIGKILLed once a third of them arrived, while
   its route holds messages (``/routez`` ``in_flight`` > 0: the sink is put
   ``SINK_LATENCY_MS`` away behind a proxy for this phase). Publishing spans
   the kill (MQTT, Kafka and core NATS paced; JetStream unpaced, so the stream
   keeps a backlog). Nothing accepted by the source broker may be lost, the
   killed gateway delivers nothing handed over after its death, and
   duplicates are bounded by the route budget and counted. What happens to
   the killed member's share depends on the broker:

   - JetStream: its unacknowledged messages are redelivered to the survivors
     after ``ack_wait`` (2 s here).
   - Kafka: its partition moves to the survivors after the session timeout
     (6 s) and Tansu's join (about half of it); uncommitted offsets are re-read.
   - MQTT: Mosquitto 2.0 keeps a persistent shared-subscription member's
     in-flight messages *and keeps assigning it new ones* round-robin while it
     is offline, in its session; nothing is handed to the other members (see
     eclipse-mosquitto/mosquitto#1747, #2662). The test measures how many wait
     in the dead member's session once the survivors drained theirs, then
     starts the killed gateway again with the same id (same session) and
     requires that everything arrives. (Should the session expire first,
     Mosquitto 2.0.11 discards what it queued there instead of handing it to
     the other members: keep the default ``session_expiry`` of a day, and bring
     a dead member back under the same ``GATEWAY_ID``.)
   - core NATS: the server drops the dead member from the queue group when its
     connection closes; what it held is lost, and reported.

Figures are printed (``pytest -s``): one line per kind and phase with sent,
accepted, delivered unique, duplicates (stored / raw), lost, per-gateway
shares, ``/routez`` acked, and seconds.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka import AIOKafkaProducer
from nats.aio.client import Client as NatsClient

from tests.support.brokers import Mosquitto, NatsServer, Tansu
from tests.support.clients.kafka import create_topics
from tests.support.clients.mqtt import MqttPublisher
from tests.support.clients.nats import JetStreamPublisher, nats_connect, nats_subscriptions, stream_messages
from tests.support.configs import gateway_config, kafka_connector, mqtt_connector, nats_connector
from tests.support.gateway_process import GatewayProcess
from tests.support.messages import Received, device_of, parse_payload, payload
from tests.support.proxy import TcpProxy
from tests.support.waits import wait_progress, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.fault, pytest.mark.timeout(120)]

N = 30_000
"""Messages per source kind in the spread phase (the issue's figure)."""
M = 10_000
"""Messages of the failover phase (seqs N .. N+M-1)."""
GATEWAYS = 3
KILLED = 1
"""The gateway SIGKILLed in the failover phase."""
DEVICES = 6
PARTITIONS = 3
BUDGET = 1_000
"""Each route's ``max_in_flight`` (durable routes): what one gateway can hold when it is killed."""
ACK_WAIT = 2.0
MQTT_RATE = 2_500.0
"""MQTT publishes per second in the failover phase: Mosquitto picks the shared-subscription member when a
message is published, so the stream must span the kill to show who gets the messages published after it."""
KAFKA_RATE = 2_000.0
"""Records per second in Kafka's failover phase: traffic goes on while the group notices the death."""
NATS_RATE = 15_000.0
"""core NATS publishes per second (at-most-once: paced so that no gateway overflows its budget)."""
SINK_LATENCY_MS = 30.0
"""One-way delay to the sink in the failover phase (each direction): PubAcks come ~60 ms after the publish."""
STALL = 6.0
"""A wait for deliveries ends when nothing new arrived for this long (it then names what is missing)."""


# ------------------------------------------------------------------ three gateways, one file


class Trio:
    """Three ``gateway run`` processes on one config file, ``GATEWAY_ID`` = ``so-<u>-<i>``."""

    def __init__(self, workdir: Path, config: dict[str, Any], u: str) -> None:
        self.ids = [f"so-{u}-{i}" for i in range(GATEWAYS)]
        self.config_path = workdir / "scale-out.yaml"
        self.gws = [
            GatewayProcess(workdir, config, name=f"gw{i}", env={"GATEWAY_ID": gid}) for i, gid in enumerate(self.ids)
        ]
        # GatewayProcess writes <name>.yaml; all three run the one shared file instead.
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        for gw in self.gws:
            gw.config_path.unlink(missing_ok=True)
            gw.config_path = self.config_path

    async def start(self, timeout: float = 45.0) -> None:
        for gw in self.gws:
            gw.spawn()
        for gw in self.gws:
            await gw.await_connected(timeout)

    async def stop(self) -> None:
        await asyncio.gather(*(gw.astop() for gw in self.gws if gw.running))

    def cleanup(self) -> None:
        for gw in self.gws:
            gw.cleanup()

    def tails(self) -> str:
        return "\n".join(gw.log_tail(40) for gw in self.gws)

    async def acked(self) -> dict[str, int | None]:
        """Each running gateway's ``/routez`` ``acked`` of route ``r`` (None: not running)."""
        views = await asyncio.gather(*(asyncio.to_thread(route_view, gw) for gw in self.gws))
        return {gid: None if v is None else int(v["acked"]) for gid, v in zip(self.ids, views, strict=True)}

    async def kill(self, i: int) -> int:
        """SIGKILL gateway ``i`` while its route holds messages (or after 2 s); returns its last ``in_flight``."""
        deadline = time.monotonic() + 2.0
        while True:
            view = await asyncio.to_thread(route_view, self.gws[i])
            held = int(view["in_flight"]) if view is not None else -1
            if held != 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.005)
        self.gws[i].kill()
        return held


def route_view(gw: GatewayProcess) -> dict[str, Any] | None:
    """Route ``r`` as the gateway's ``/routez`` shows it (None: not running)."""
    url = gw.http_url
    if not gw.running or url is None:
        return None
    with urllib.request.urlopen(url + "/routez", timeout=5) as resp:
        routes = json.load(resp)["routes"]
    return dict(next(r for r in routes if r["name"] == "r"))


# ------------------------------------------------------------------ the sink


class Sink:
    """The JetStream stream all three write to, and a core subscription of the test on the same subjects.

    The gateways reach the sink's nats-server through a proxy (connector ``bus``), so that the failover
    phase can put the sink ``SINK_LATENCY_MS`` away: each gateway then holds messages in flight (received,
    not yet confirmed by the PubAck) when it is killed. The test's own connection is direct.
    """

    def __init__(self, nc: NatsClient, u: str, kind: str, server: NatsServer) -> None:
        self.nc = nc
        self.proxy = TcpProxy(server.address)
        self.stream = f"SO_{u}_{kind.upper()}"
        self.prefix = f"so.{u}.{kind}"
        self.copies: Counter[int] = Counter()
        """seq -> copies the gateways published (raw: before the stream's deduplication)."""
        self.seen: set[int] = set()
        self.last_at = 0.0
        """When the last copy arrived (monotonic)."""

    def connector(self) -> dict[str, Any]:
        return nats_connector(self.proxy.url("nats"))

    def far_away(self) -> None:
        self.proxy.latency(SINK_LATENCY_MS)

    def target(self) -> dict[str, Any]:
        return {"connector": "bus", "subject": self.prefix + ".${GATEWAY_ID}", "jetstream": True}

    async def start(self) -> Sink:
        await asyncio.to_thread(self.proxy.start)
        await self.nc.jetstream().add_stream(name=self.stream, subjects=[self.prefix + ".>"])
        await self.nc.subscribe(
            self.prefix + ".>", cb=self._on_msg, pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30
        )
        await self.nc.flush()
        return self

    async def _on_msg(self, msg: Any) -> None:
        seq = parse_payload(msg.data)[1]
        self.copies[seq] += 1
        self.seen.add(seq)
        self.last_at = time.monotonic()

    def count_in(self, seqs: range) -> int:
        return sum(1 for s in self.seen if s in seqs)

    async def close(self) -> None:
        await asyncio.to_thread(self.proxy.stop)

    async def stored(self) -> list[Received]:
        n = (await self.nc.jetstream().stream_info(self.stream)).state.messages
        return await stream_messages(self.nc, self.stream, self.prefix + ".>", n, timeout=60)


async def wait_delivered(sink: Sink, expected: set[int], *, timeout: float = 90.0, stall: float = STALL) -> float:
    """Until every expected seq reached the sink, or nothing new came for ``stall`` s. Returns seconds."""
    return await wait_progress(lambda: len(sink.seen), lambda _: expected <= sink.seen, timeout=timeout, stall=stall)


# ------------------------------------------------------------------ outcome


@dataclass
class Outcome:
    label: str
    seqs: range
    accepted: set[int]
    stored: list[Received]
    raw: Counter[int]
    gateway_ids: list[str]
    seconds: float
    acked: dict[str, int | None]
    notes: str = ""

    def __post_init__(self) -> None:
        mine = [m for m in self.stored if m.seq in self.seqs]
        self.first_by: dict[int, str] = {}
        for m in mine:
            self.first_by.setdefault(m.seq, m.where.rsplit(".", 1)[1])
        self.stored_copies = len(mine)
        self.raw_copies = sum(c for s, c in self.raw.items() if s in self.seqs)
        self.raw_unique = sum(1 for s in self.raw if s in self.seqs)

    @property
    def unique(self) -> int:
        return len(self.first_by)

    @property
    def lost(self) -> list[int]:
        return sorted(self.accepted - self.first_by.keys())

    @property
    def duplicates(self) -> int:
        return self.stored_copies - self.unique

    @property
    def raw_duplicates(self) -> int:
        return self.raw_copies - self.raw_unique

    def shares(self) -> Counter[str]:
        return Counter(self.first_by.values())

    def report(self) -> str:
        shares = self.shares()
        share = " ".join(f"{g[-1]}={shares[g]}" for g in self.gateway_ids)
        acked = " ".join(f"{g[-1]}={self.acked.get(g)}" for g in self.gateway_ids)
        rate = self.unique / self.seconds if self.seconds > 0 else 0.0
        return (
            f"SCALE-OUT {self.label}: sent={len(self.seqs)} accepted={len(self.accepted)} "
            f"delivered_unique={self.unique} duplicates={self.duplicates} (raw {self.raw_duplicates}) "
            f"lost={len(self.lost)} shares[{share}] routez_acked[{acked}] "
            f"{self.seconds:.1f}s ({rate:,.0f} msg/s) {self.notes}".rstrip()
        )


async def outcome(
    label: str,
    sink: Sink,
    seqs: range,
    accepted: set[int],
    trio: Trio,
    seconds: float,
    notes: str = "",
) -> Outcome:
    # /routez counts a message once its PubAck is back, a moment after the test saw the publish: settle.
    acked = await trio.acked()
    for _ in range(25):
        await asyncio.sleep(0.2)
        again = await trio.acked()
        if again == acked:
            break
        acked = again
    result = Outcome(label, seqs, accepted, await sink.stored(), Counter(sink.copies), trio.ids, seconds, acked, notes)
    print(result.report())
    return result


def assert_none_lost(result: Outcome) -> None:
    assert not result.lost, f"{result.label}: {len(result.lost)} lost (first {result.lost[:20]})"


def assert_spread(result: Outcome, *, min_share: float, durable: bool = True) -> None:
    """Phase 1: all accepted arrived (durable), no duplicates, and every gateway took part."""
    if durable:
        assert_none_lost(result)
        assert result.duplicates == 0 and result.raw_duplicates == 0, f"{result.label}: duplicates without rebalance"
    shares = result.shares()
    for gid in result.gateway_ids:
        assert shares[gid] >= min_share * len(result.seqs), f"{result.label}: {gid} took {shares[gid]} ({shares})"
        assert (result.acked.get(gid) or 0) > 0, f"{result.label}: {gid} acked nothing per /routez"


# ------------------------------------------------------------------ publishers


def mqtt_publish(pub: MqttPublisher, u: str, seqs: Iterable[int], rate: float | None) -> None:
    pub.publish_paced(lambda seq: f"so/{u}/{device_of(seq, DEVICES)}", seqs, DEVICES, rate=rate)


CHUNK = 100


class Handed:
    """Seqs below ``upto`` were handed to the publishing client (a chunk in progress may be partly)."""

    upto = 0

    def after_kill(self, end: int) -> range:
        """Seqs surely handed over after this moment: a gateway killed now can never have seen them."""
        return range(self.upto + CHUNK, end)


async def paced(
    seqs: Sequence[int], rate: float | None, send: Callable[[Sequence[int]], Any], handed: Handed | None = None
) -> None:
    """``await send(chunk)`` for chunks of ``CHUNK`` seqs, at ``rate`` messages per second (None: at once)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i in range(0, len(seqs), CHUNK):
        await send(seqs[i : i + CHUNK])
        if handed is not None:
            handed.upto = seqs[min(i + CHUNK, len(seqs)) - 1] + 1
        if rate is not None:
            ahead = t0 + (i + CHUNK) / rate - loop.time()
            if ahead > 0:
                await asyncio.sleep(ahead)


async def kafka_send(producer: AIOKafkaProducer, topic: str, seqs: Sequence[int], accepted: set[int]) -> None:
    futs = [
        (
            seq,
            await producer.send(
                topic, payload(seq, DEVICES), key=device_of(seq, DEVICES).encode(), partition=seq % PARTITIONS
            ),
        )
        for seq in seqs
    ]
    for seq, fut in futs:
        await fut
        accepted.add(seq)


async def wait_for_share(sink: Sink, seqs: range, fraction: float, trio: Trio) -> None:
    """Until ``fraction`` of ``seqs`` reached the sink (the moment to kill a gateway)."""
    want = int(len(seqs) * fraction)
    await wait_until(
        lambda: sink.count_in(seqs) >= want,
        60,
        lambda: f"only {sink.count_in(seqs)} of {want} arrived\n{trio.tails()}",
    )


# ------------------------------------------------------------------ the scenario, once for every kind


class ScaleOut:
    """One source kind on three gateways: ``run`` is the sequence they share, the methods above it its hooks.

    ``run``: the sink; the kind's own clients and source (``open``); the three on one config (the kind's
    ``connectors``, route ``r`` reading ``source`` into the sink); the distribution settled (``ready``); the
    spread and failover phases; everything stopped and closed (the gateways' log tails printed on any
    failure); then the kind's assertions on both outcomes (``check``). A phase publishes (``send`` in
    chunks, paced at the phase's rate), takes what the broker ``accepted`` and waits until that reached the
    sink; the failover phase kills gateway ``KILLED`` meanwhile (``before_kill``, ``on_kill``) and ends
    with ``after_failover``, which returns the figures printed with its outcome.
    """

    kind: str
    """The sink's name for it: ``so.<u>.<kind>.<gateway id>``."""
    label: str
    """The start of its printed lines."""
    min_share: float
    """The least fraction of the spread phase each gateway must deliver."""
    durable = True
    """Not at-most-once: the route has a ``max_in_flight`` budget and the spread phase may lose nothing."""
    spread_rate: float | None = None
    failover_rate: float | None = None
    """Publishes per second in each phase (None: at once)."""
    spread_stall = failover_stall = STALL
    spread_notes = ""
    connectors: dict[str, Any]
    source: dict[str, Any]
    """Route ``r``'s ``from``."""

    nc: NatsClient
    sink: Sink
    trio: Trio
    started_at: float
    held_at_kill: int
    """The killed gateway's last ``/routez`` ``in_flight``."""
    t_kill: float
    after_kill: range
    """Failover seqs handed over once the killed gateway was dead: it cannot have received them."""

    def __init__(self, tmp_path: Path, nats_server: NatsServer, u: str) -> None:
        self.tmp_path, self.nats_server, self.u = tmp_path, nats_server, u

    @property
    def killed(self) -> GatewayProcess:
        return self.trio.gws[KILLED]

    @property
    def killed_id(self) -> str:
        return self.trio.ids[KILLED]

    def late(self, failover: Outcome) -> int:
        """First copies of ``after_kill`` delivered by the killed gateway (must be none once it is dead)."""
        return sum(1 for s in self.after_kill if failover.first_by.get(s) == self.killed_id)

    # -------------------------------------------------------------- hooks

    async def open(self) -> None:
        """The kind's own clients and source (stream, topic)."""

    async def close(self) -> None:
        """Whatever ``open`` or the constructor made."""

    async def ready(self) -> None:
        """After the three started: until the broker's distribution settled."""

    async def send(self, chunk: Sequence[int]) -> None:
        raise NotImplementedError

    async def publish(self, seqs: range, rate: float | None, handed: Handed | None = None) -> None:
        await paced(list(seqs), rate, self.send, handed)

    async def accepted(self, seqs: range) -> set[int]:
        """Once ``seqs`` were published: those the source broker accepted (its acks awaited)."""
        raise NotImplementedError

    def check_spread(self, spread: Outcome) -> None:
        assert_spread(spread, min_share=self.min_share, durable=self.durable)

    def before_kill(self) -> None:
        """Before the failover phase publishes."""

    async def on_kill(self) -> None:
        """Right after the kill, while publishing goes on."""

    async def after_failover(self, accepted: set[int]) -> str:
        """Once the survivors delivered: the failover figures to print."""
        raise NotImplementedError

    def check(self, spread: Outcome, failover: Outcome) -> None:
        raise NotImplementedError

    # -------------------------------------------------------------- the sequence

    async def run(self) -> None:
        self.nc = await nats_connect(self.nats_server.url)
        self.sink = sink = await Sink(self.nc, self.u, self.kind, self.nats_server).start()
        await self.open()
        route = {"name": "r", "max_in_flight": BUDGET, "from": self.source, "to": sink.target()}
        if not self.durable:
            del route["max_in_flight"]
        config = gateway_config("${GATEWAY_ID}", {**self.connectors, "bus": sink.connector()}, [route])
        self.trio = trio = Trio(self.tmp_path, config, self.u)
        try:
            self.started_at = time.monotonic()
            await trio.start()  # all three at once (JetStream: they race to create the one durable)
            await self.ready()
            spread = await self.spread()
            failover = await self.failover()
            await trio.stop()
        except BaseException:
            print(trio.tails())
            raise
        finally:
            trio.cleanup()
            await self.close()
            await sink.close()
            await self.nc.close()
        self.check(spread, failover)

    async def spread(self) -> Outcome:
        """Phase 1: ``N`` messages with the three up and the distribution settled."""
        seqs = range(N)
        t0 = time.monotonic()
        await self.publish(seqs, self.spread_rate)
        accepted = await self.accepted(seqs)
        await wait_delivered(self.sink, accepted, stall=self.spread_stall)
        seconds = time.monotonic() - t0
        spread = await outcome(f"{self.label} spread", self.sink, seqs, accepted, self.trio, seconds, self.spread_notes)
        self.check_spread(spread)
        return spread

    async def failover(self) -> Outcome:
        """Phase 2: ``M`` more messages, gateway ``KILLED`` SIGKILLed a third into them, the sink far away."""
        sink, trio = self.sink, self.trio
        sink.far_away()
        seqs = range(N, N + M)
        self.before_kill()
        t0 = time.monotonic()
        handed = Handed()
        publisher = asyncio.ensure_future(self.publish(seqs, self.failover_rate, handed))
        await wait_for_share(sink, seqs, 1 / 3, trio)
        self.held_at_kill = await trio.kill(KILLED)
        self.t_kill = time.monotonic()
        self.after_kill = handed.after_kill(N + M)  # the process is reaped: what is handed over now never reaches it
        await self.on_kill()
        await publisher
        accepted = await self.accepted(seqs)
        await wait_delivered(sink, accepted, stall=self.failover_stall)
        notes = await self.after_failover(accepted)
        return await outcome(f"{self.label} failover", sink, seqs, accepted, trio, time.monotonic() - t0, notes)


# ------------------------------------------------------------------ MQTT: share_group


class MqttShareGroup(ScaleOut):
    """The killed member's session keeps its share (and new ones) until it is back under its id."""

    kind, label, min_share = "mqtt", "mqtt share_group", 0.25
    failover_rate = MQTT_RATE
    failover_stall = 4.0  # the survivors deliver what Mosquitto gives them; the dead member's session keeps its part

    def __init__(self, tmp_path: Path, nats_server: NatsServer, u: str, mosquitto: Mosquitto) -> None:
        super().__init__(tmp_path, nats_server, u)
        self.connectors = {"mq": mqtt_connector(mosquitto.url, "${GATEWAY_ID}-mq")}
        self.source = {"connector": "mq", "topic": f"so/{u}/{{device}}", "qos": 1, "share_group": f"g-{u}"}
        self.pub = MqttPublisher(mosquitto.port, f"so-pub-{u}")

    async def close(self) -> None:
        await asyncio.to_thread(self.pub.close)

    async def ready(self) -> None:
        for gw in self.trio.gws:
            topic = gw.events("connector.connected", connector="mq")[-1]["topic"]
            assert topic == f"$share/g-{self.u}/so/{self.u}/+", topic
        await asyncio.to_thread(self.pub.connect)

    async def publish(self, seqs: range, rate: float | None, handed: Handed | None = None) -> None:
        # paho publishes from a thread and counts what it published itself (``on_kill``)
        await asyncio.to_thread(mqtt_publish, self.pub, self.u, seqs, rate)

    async def accepted(self, seqs: range) -> set[int]:
        await asyncio.to_thread(self.pub.wait_accepted, seqs.stop, 60)
        return set(seqs) & self.pub.accepted

    async def on_kill(self) -> None:
        self.published_at_kill = self.pub.published - N
        self.after_kill = range(N + self.published_at_kill, N + M)

    async def after_failover(self, accepted: set[int]) -> str:
        sink = self.sink
        survivors_done = sink.last_at - self.t_kill
        self.held = accepted - sink.seen
        self.by_survivors = sum(1 for s in self.after_kill if s in sink.seen)
        acked_before_restart = list((await self.trio.acked()).values())
        t_restart = time.monotonic()
        await self.killed.astart()
        resumed = self.killed.events("connector.connected", connector="mq")[-1]
        assert resumed.get("session_present") is True, f"the killed member's session was not kept: {resumed}"
        await wait_delivered(sink, accepted)
        waited = sink.last_at - t_restart
        return (
            f"published_at_kill={self.published_at_kill} in_flight_at_kill={self.held_at_kill} "
            f"survivors_last_delivery_after_kill={survivors_done:.1f}s "
            f"published_after_kill={len(self.after_kill)} (survivors delivered {self.by_survivors}) "
            f"routez_acked_before_restart={acked_before_restart} "
            f"held_in_dead_session={len(self.held)} (all delivered {waited:.1f}s after the restart began)"
        )

    def check(self, spread: Outcome, failover: Outcome) -> None:
        held, after_kill = self.held, self.after_kill
        by_restarted = sum(1 for s in held if failover.first_by.get(s) == self.killed_id)
        print(
            f"SCALE-OUT mqtt: of the {len(held)} messages held in the dead member's session, {by_restarted} came "
            f"through it after its restart; {sum(1 for s in held if s < N + self.published_at_kill)} were published "
            f"before the kill"
        )
        assert_none_lost(failover)
        assert failover.duplicates <= BUDGET, f"mqtt failover: {failover.duplicates} duplicates > the route budget"
        # Mosquitto hands the survivors their round-robin turns (2 of 3), not the dead member's.
        assert len(after_kill) >= M // 3, f"only {len(after_kill)} published after the kill: the stream must span it"
        assert self.by_survivors >= len(after_kill) // 2, (
            f"survivors delivered {self.by_survivors} of {len(after_kill)}"
        )


async def test_mqtt_share_group(tmp_path: Path, mosquitto: Mosquitto, nats_server: NatsServer, unique: str) -> None:
    await MqttShareGroup(tmp_path, nats_server, unique, mosquitto).run()


# ------------------------------------------------------------------ core NATS: queue group


class NatsQueueGroup(ScaleOut):
    """At-most-once, paced so that nobody overflows: losses are reported, not forbidden.

    When a member is killed, the server drops it from the group; what it held is lost (reported).
    """

    kind, label, min_share = "nats", "nats queue", 0.25
    durable = False
    spread_rate = failover_rate = NATS_RATE
    spread_stall = failover_stall = 3.0

    def __init__(self, tmp_path: Path, nats_server: NatsServer, u: str) -> None:
        super().__init__(tmp_path, nats_server, u)
        self.connectors = {"src": nats_connector(nats_server.url)}
        self.source = {"connector": "src", "subject": f"sq.{u}.{{device}}", "queue": f"q-{u}"}

    async def open(self) -> None:
        self.pub_nc = await nats_connect(self.nats_server.url)

    async def close(self) -> None:
        await self.pub_nc.close()

    def queue_members(self) -> int:
        return sum(1 for s in nats_subscriptions(self.nats_server.monitor_url) if s.get("qgroup") == f"q-{self.u}")

    async def ready(self) -> None:
        deadline = time.monotonic() + 20
        while await asyncio.to_thread(self.queue_members) < GATEWAYS:
            assert time.monotonic() < deadline, f"queue group incomplete\n{self.trio.tails()}"
            await asyncio.sleep(0.05)

    async def send(self, chunk: Sequence[int]) -> None:
        for seq in chunk:
            await self.pub_nc.publish(f"sq.{self.u}.{device_of(seq, DEVICES)}", payload(seq, DEVICES))

    async def accepted(self, seqs: range) -> set[int]:
        await self.pub_nc.flush()
        return set(seqs)

    def check_spread(self, spread: Outcome) -> None:
        super().check_spread(spread)
        assert spread.duplicates == 0, "a queue group delivers each message to one member"

    async def after_failover(self, accepted: set[int]) -> str:
        handed_at_kill = self.after_kill.start - N
        return f"in_flight_at_kill={self.held_at_kill} handed_to_client_at_kill~{handed_at_kill} (at-most-once)"

    def check(self, spread: Outcome, failover: Outcome) -> None:
        # Once it is dead, only the survivors deliver.
        late = self.late(failover)
        assert late == 0, f"the killed gateway delivered {late} messages sent after its death"
        assert len(failover.lost) <= M // 2, f"nats failover: survivors did not take over: {failover.report()}"


async def test_nats_queue_group(tmp_path: Path, nats_server: NatsServer, unique: str) -> None:
    await NatsQueueGroup(tmp_path, nats_server, unique).run()


# ------------------------------------------------------------------ JetStream: one shared durable


class JetStreamSharedDurable(ScaleOut):
    """The killed member's unacknowledged messages go to the survivors after ``ack_wait``.

    The failover phase is unpaced, so that the killed gateway holds a full pull when it dies (and the stream
    keeps a backlog); the sink deduplicates the redeliveries by ``Nats-Msg-Id``.
    """

    kind, label, min_share = "js", "jetstream durable", 0.15

    def __init__(self, tmp_path: Path, nats_server: NatsServer, u: str) -> None:
        super().__init__(tmp_path, nats_server, u)
        self.stream, self.consumer = f"SJ_{u}", f"shared-{u}"
        self.connectors = {"src": nats_connector(nats_server.url)}
        self.source = {
            "connector": "src",
            "stream": self.stream,
            "subject": f"sj.{u}.{{device}}",
            "durable": self.consumer,
            "ack_wait": ACK_WAIT,
        }

    async def open(self) -> None:
        self.pub_nc = await nats_connect(self.nats_server.url)
        await self.nc.jetstream().add_stream(name=self.stream, subjects=[f"sj.{self.u}.>"])
        self.jspub = await JetStreamPublisher(self.pub_nc).start()

    async def close(self) -> None:
        await self.jspub.close()
        await self.pub_nc.close()

    async def send(self, chunk: Sequence[int]) -> None:
        await self.jspub.publish(((f"sj.{self.u}.{device_of(s, DEVICES)}", s) for s in chunk), devices=DEVICES)

    async def accepted(self, seqs: range) -> set[int]:
        await self.jspub.wait_acks(seqs.stop, timeout=60)
        return set(seqs) & self.jspub.accepted

    async def consumer_info(self) -> Any:
        return await self.nc.jetstream().consumer_info(self.stream, self.consumer)

    async def on_kill(self) -> None:
        self.pending_at_kill = (await self.consumer_info()).num_ack_pending

    async def after_failover(self, accepted: set[int]) -> str:
        last_after_kill = self.sink.last_at - self.t_kill
        info = await self.consumer_info()
        deadline = time.monotonic() + 10
        while (info.num_pending or info.num_ack_pending) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            info = await self.consumer_info()
        self.info = info
        return (
            f"in_flight_at_kill={self.held_at_kill} durable_ack_pending_at_kill={self.pending_at_kill} "
            f"last_delivery_after_kill={last_after_kill:.1f}s (ack_wait {ACK_WAIT:g}s) "
            f"durable_after=(pending {info.num_pending}, ack_pending {info.num_ack_pending}) "
            "stored duplicates deduplicated by Nats-Msg-Id"
        )

    def check(self, spread: Outcome, failover: Outcome) -> None:
        assert_none_lost(failover)
        assert failover.duplicates == 0, "Nats-Msg-Id from the stream sequence should dedup the redeliveries"
        assert failover.raw_duplicates <= BUDGET, "more redelivered than the killed gateway could hold"
        info = self.info
        assert info.num_pending == 0 and info.num_ack_pending == 0, f"durable not fully acknowledged: {info}"
        late = self.late(failover)
        assert late == 0, f"the killed gateway delivered {late} messages published after its death"


async def test_jetstream_shared_durable(tmp_path: Path, nats_server: NatsServer, unique: str) -> None:
    await JetStreamSharedDurable(tmp_path, nats_server, unique).run()


# ------------------------------------------------------------------ Kafka: one consumer group


def last_assignment(gw: GatewayProcess) -> int | None:
    found = gw.events("kafka.partitions_assigned")
    return int(found[-1]["partitions"]) if found else None


class KafkaConsumerGroup(ScaleOut):
    """One partition each, produced evenly.

    The killed member's partition moves to the survivors after the session timeout and the group's join;
    the sink deduplicates the re-read records by ``Nats-Msg-Id``.
    """

    kind, label, min_share = "kafka", "kafka group", 0.25
    failover_rate = KAFKA_RATE

    def __init__(self, tmp_path: Path, nats_server: NatsServer, u: str, kafka_broker: Tansu) -> None:
        super().__init__(tmp_path, nats_server, u)
        self.topic, self.bootstrap = f"sk-{u}", kafka_broker.bootstrap
        self.connectors = {"kafka": kafka_connector(self.bootstrap)}
        self.source = {"connector": "kafka", "topic": self.topic, "group": f"g-{u}"}
        self.accepted_all: set[int] = set()

    async def open(self) -> None:
        await create_topics(self.bootstrap, [self.topic], PARTITIONS)
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        await self.producer.start()

    async def close(self) -> None:
        await self.producer.stop()

    def assignments(self) -> list[int | None]:
        return [last_assignment(gw) for gw in self.trio.gws]

    async def ready(self) -> None:
        await wait_until(
            lambda: self.assignments() == [1] * GATEWAYS,
            60,
            lambda: f"group not settled: {self.assignments()}\n{self.trio.tails()}",
        )
        self.spread_notes = f"group_settled_after_start={time.monotonic() - self.started_at:.1f}s"

    async def send(self, chunk: Sequence[int]) -> None:
        await kafka_send(self.producer, self.topic, chunk, self.accepted_all)

    async def accepted(self, seqs: range) -> set[int]:
        return set(seqs) & self.accepted_all

    def before_kill(self) -> None:
        self.survivors = [gw for gw in self.trio.gws if gw is not self.killed]
        self.events_before = {gw.name: len(gw.events("kafka.partitions_assigned")) for gw in self.survivors}

    async def on_kill(self) -> None:
        def taken_over() -> bool:
            if any(len(gw.events("kafka.partitions_assigned")) <= self.events_before[gw.name] for gw in self.survivors):
                return False
            return sum(last_assignment(gw) or 0 for gw in self.survivors) == PARTITIONS

        await wait_until(taken_over, 45, lambda: f"no rebalance to the survivors\n{self.trio.tails()}")
        self.rebalanced = time.monotonic() - self.t_kill

    async def after_failover(self, accepted: set[int]) -> str:
        recovered = self.sink.last_at - self.t_kill
        return (
            f"in_flight_at_kill={self.held_at_kill} rebalanced_after_kill={self.rebalanced:.1f}s "
            f"last_delivery_after_kill={recovered:.1f}s "
            f"survivor_partitions={[last_assignment(gw) for gw in self.survivors]}"
        )

    def check(self, spread: Outcome, failover: Outcome) -> None:
        assert_none_lost(failover)
        assert failover.duplicates == 0, "Nats-Msg-Id from the Kafka offset should dedup the re-read records"
        # The killed member's partition (the one it read in the spread phase) moved to the survivors.
        killed_id = self.killed_id
        parts = {s % PARTITIONS for s, g in spread.first_by.items() if g == killed_id}
        assert len(parts) == 1, f"{killed_id} read partitions {parts} in the spread phase"
        seqs = failover.seqs
        moved = Counter(failover.first_by[s] for s in seqs if s % PARTITIONS in parts and s in failover.first_by)
        print(
            f"SCALE-OUT kafka partition {parts.pop()} of {killed_id} in the failover phase, by gateway: {dict(moved)}"
        )
        assert set(moved) - {killed_id}, "the killed member's partition was not taken over"
        late = self.late(failover)
        assert late == 0, f"the killed gateway delivered {late} records produced after its death"


async def test_kafka_consumer_group(tmp_path: Path, nats_server: NatsServer, kafka_broker: Tansu, unique: str) -> None:
    await KafkaConsumerGroup(tmp_path, nats_server, unique, kafka_broker).run()
