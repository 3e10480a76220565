"""Stop the gateway mid-stream (SIGKILL, and SIGTERM), restart it: nothing a durable source accepted is lost.

Per durable source kind (MQTT QoS 1 with the gateway's persistent session, a
JetStream durable consumer, a Kafka consumer group): N sequence-numbered
messages are published while the gateway runs (paced, so the stream spans the
crash), the gateway is SIGKILLed once about a third arrived at the sink,
publishing goes on while it is down, then it is restarted. Every message the
source broker acknowledged must arrive at least once. Duplicates are allowed
and reported; the order of first occurrences per key is asserted where the
protocols promise it (MQTT session redelivery is in order, Kafka re-reads a
partition from its committed offset) and only reported for JetStream (a
message redelivered after ``ack_wait`` legitimately comes after newer ones).

The SIGTERM variants must exit 0 and, having drained (DESIGN §3, §5: stop
intake, drain in flight, ack/commit, close), cause no duplicate at all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from tests.support.brokers import Mosquitto, NatsServer, Tansu
from tests.support.clients.kafka import KafkaCollector, create_topics, kafka_producer
from tests.support.clients.mqtt import MqttCollector, MqttPublisher
from tests.support.clients.nats import JetStreamPublisher, nats_connect, nats_connection, stream_messages
from tests.support.configs import gateway_config, kafka_connector, mqtt_connector, nats_connector
from tests.support.gateway_process import GatewayProcess
from tests.support.messages import Analysis, Received, analyse, device_of, headers, payload
from tests.support.waits import wait_progress, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.fault, pytest.mark.timeout(180)]

N = 10_000
DEVICES = 5
MQTT_RATE = 4_000.0
"""MQTT publishes per second (paho): the stream lasts ~2.5 s and spans the crash. JetStream and Kafka
publishers run unpaced, faster than the gateway drains, so it holds a full window when killed."""


async def wait_for_all(
    seen: Callable[[], set[int]], accepted: set[int], *, timeout: float = 60.0, stall: float = 15.0
) -> float:
    """Until every accepted seq was seen, or nothing new came for ``stall`` s. Returns seconds waited."""
    got: set[int] = set()

    def count() -> int:
        got.update(seen())
        return len(got)

    return await wait_progress(count, lambda _: accepted <= got, timeout=timeout, stall=stall)


async def stop_after_a_third(gw: GatewayProcess, arrived: Callable[[], int], how: str) -> int:
    """SIGKILL (or SIGTERM, asserting exit 0) once a third of N reached the sink; returns how many had."""
    await wait_until(lambda: arrived() >= N // 3, 45, lambda: f"only {arrived()} of {N} arrived\n{gw.log_tail()}")
    if how == "sigkill":
        gw.kill()
    else:
        await gw.astop()
    return arrived()


def report(label: str, result: Analysis, accepted: set[int], at_kill: int, extra: str = "") -> None:
    print(
        f"E2E restart {label}: accepted={len(accepted)} arrived_at_kill={at_kill} {result.summary()} "
        f"duplicate_rate={result.duplicates / max(1, result.distinct):.2%} {extra}"
    )


def reread(messages: Sequence[Received]) -> int:
    """Kafka records the test client read more than once (same partition and offset): not the gateway's."""
    at = [(m.where, m.partition, m.offset) for m in messages if m.offset is not None]
    return len(at) - len(set(at))


def assert_at_least_once(
    label: str,
    result: Analysis,
    accepted: set[int],
    *,
    ordered: bool,
    graceful: bool = False,
    reread: int = 0,
) -> None:
    lost = sorted(accepted & set(result.lost))
    assert not lost, f"{label}: {len(lost)} accepted messages lost (first {lost[:20]}): {result.summary()}"
    assert not result.unexpected, f"{label}: {result.summary()}"
    if ordered:
        assert not result.order_violations, f"{label}: first occurrences out of order per key: {result.summary()}"
    if graceful:
        # SIGTERM drains: what the gateway took was confirmed and acknowledged before it exited.
        dup = result.duplicates - reread
        assert dup == 0, f"{label}: duplicates after a graceful stop: {result.summary()} (re-read: {reread})"


def seen_seqs(messages: Sequence[Received]) -> set[int]:
    return {m.seq for m in list(messages)}


# ------------------------------------------------------------------ MQTT QoS 1 -> Kafka


def paced_mqtt_publish(pub: MqttPublisher, topic_of: Callable[[int], str]) -> None:
    pub.publish_paced(topic_of, range(N), DEVICES, rate=MQTT_RATE)
    pub.wait_accepted(N, timeout=30)


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
async def test_stop_mqtt_source_to_kafka(
    gateways: Any, mosquitto: Mosquitto, kafka_broker: Tansu, unique: str, how: str
) -> None:
    u = unique
    topic = f"rm2k-{u}"
    await create_topics(kafka_broker.bootstrap, [topic], 3)
    gw = gateways(
        gateway_config(
            f"gw-{u}",
            {
                "mq": mqtt_connector(mosquitto.url, f"gw-{u}-mq"),
                # Records wait up to 100 ms for their batch: the gateway holds unacknowledged
                # messages (PUBACK withheld until Kafka confirms) at any moment, also at the kill.
                "kafka": kafka_connector(kafka_broker.bootstrap, linger_ms=100),
            },
            [
                {
                    "name": "mqtt-to-kafka",
                    "from": {"connector": "mq", "topic": f"rm2k/{u}/{{device}}/up", "qos": 1},
                    "to": {"connector": "kafka", "topic": topic, "key": "{device}"},
                }
            ],
        )
    )
    col = await KafkaCollector(kafka_broker.bootstrap, topic, 3).start()
    pub = MqttPublisher(mosquitto.port, f"pub-{u}")
    await asyncio.to_thread(pub.connect)
    publisher: asyncio.Future[None] | None = None
    try:
        await gw.astart()
        publisher = asyncio.ensure_future(
            asyncio.to_thread(paced_mqtt_publish, pub, lambda s: f"rm2k/{u}/{device_of(s, DEVICES)}/up")
        )
        at_kill = await stop_after_a_third(gw, col.distinct, how)
        await publisher
        accepted = set(pub.accepted)
        await gw.astart()
        resumed = gw.events("connector.connected", connector="mq")[0]
        assert resumed.get("session_present") is True, f"persistent session lost: {resumed}"
        waited = await wait_for_all(lambda: seen_seqs(col.messages), accepted)
        await gw.astop()
    finally:
        if publisher is not None and not publisher.done():
            await asyncio.wait({publisher}, timeout=30)
        await asyncio.to_thread(pub.close)
        await col.stop()
    result = analyse(col.messages, range(N))
    report(f"{how} mqtt->kafka", result, accepted, at_kill, f"recovered_in={waited:.2f}s")
    assert_at_least_once(
        "mqtt->kafka", result, accepted, ordered=True, graceful=how == "sigterm", reread=reread(col.messages)
    )


# ------------------------------------------------------------------ JetStream -> MQTT


class LeftUnacknowledged(AssertionError):
    """A graceful stop left delivered JetStream messages unacknowledged on the durable."""


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
async def test_stop_jetstream_source_to_mqtt(
    gateways: Any, mosquitto: Mosquitto, nats_server: NatsServer, unique: str, how: str
) -> None:
    u = unique
    stream, durable = f"RJ2M_{u}", f"gw-{u}"
    nc = await nats_connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"rj2m.{u}.>"])
    gw = gateways(
        gateway_config(
            f"gw-{u}",
            {"bus": nats_connector(nats_server.url), "mq": mqtt_connector(mosquitto.url, f"gw-{u}-mq")},
            [
                {
                    "name": "jetstream-to-mqtt",
                    "from": {
                        "connector": "bus",
                        "stream": stream,
                        "subject": f"rj2m.{u}.{{device}}",
                        "durable": durable,
                        "ack_wait": 2,
                    },
                    "to": {"connector": "mq", "topic": f"rj2m/{u}/{{device}}", "qos": 1},
                }
            ],
        )
    )
    col = await asyncio.to_thread(MqttCollector(mosquitto.port, f"sub-{u}", f"rj2m/{u}/#").start)
    jspub = await JetStreamPublisher(nc).start()

    async def publish() -> None:
        await jspub.publish(((f"rj2m.{u}.{device_of(s, DEVICES)}", s) for s in range(N)), devices=DEVICES)
        await jspub.wait_acks(N)

    publisher: asyncio.Task[None] | None = None
    try:
        await gw.astart()
        publisher = asyncio.create_task(publish())
        # The test's MQTT subscriber lags behind Mosquitto (which PUBACKs the gateway at once), so
        # "arrived at the sink" is read at the source: the durable's ack floor, i.e. what the gateway
        # acknowledged after Mosquitto confirmed it.
        acked = 0

        async def poll_ack_floor() -> None:
            nonlocal acked
            while True:
                acked = (await js.consumer_info(stream, durable)).ack_floor.stream_seq
                await asyncio.sleep(0.005)

        poller = asyncio.create_task(poll_ack_floor())
        try:
            await stop_after_a_third(gw, lambda: acked, how)
        finally:
            poller.cancel()
        at_kill = acked
        held = (await js.consumer_info(stream, durable)).num_ack_pending
        await publisher
        accepted = set(jspub.accepted)
        await gw.astart()
        waited = await wait_for_all(lambda: seen_seqs(col.messages), accepted)
        # Redeliveries (after ack_wait) may come after everything was seen once: count them too.
        info = await js.consumer_info(stream, durable)
        deadline = time.monotonic() + 20
        while (info.num_ack_pending or info.num_pending) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            info = await js.consumer_info(stream, durable)
        await gw.astop()
    finally:
        if publisher is not None and not publisher.done():
            publisher.cancel()
        await asyncio.to_thread(col.close)
        await nc.close()
    result = analyse(col.messages, range(N))
    report(
        f"{how} jetstream->mqtt",
        result,
        accepted,
        at_kill,
        f"unacked_on_durable_after_stop={held} recovered_in={waited:.2f}s",
    )
    assert_at_least_once("jetstream->mqtt", result, accepted, ordered=False)
    if how == "sigterm":
        stopped = gw.events("gateway.stopped")
        if held:
            raise LeftUnacknowledged(
                f"SIGTERM (exit 0, {stopped}) left {held} delivered messages unacknowledged on the durable"
            )
        if result.duplicates:
            raise LeftUnacknowledged(f"duplicates after a graceful stop: {result.summary()}")
    assert info.num_pending == 0 and info.num_ack_pending == 0, f"durable not fully acknowledged: {info}"


# ------------------------------------------------------------------ Kafka -> JetStream


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
async def test_stop_kafka_source_to_jetstream(
    gateways: Any, nats_server: NatsServer, kafka_broker: Tansu, unique: str, how: str
) -> None:
    """A topic per device (capture pattern) -> a subject per device; ``Nats-Msg-Id`` dedups redeliveries."""
    u = unique
    stream = f"RK2N_{u}"
    topics = [f"rk2n-{u}.dev{d}" for d in range(DEVICES)]
    await create_topics(kafka_broker.bootstrap, topics, 1)
    nc = await nats_connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"rk2n.{u}.>"])
    gw = gateways(
        gateway_config(
            f"gw-{u}",
            {"kafka": kafka_connector(kafka_broker.bootstrap), "bus": nats_connector(nats_server.url)},
            [
                {
                    "name": "kafka-to-jetstream",
                    "from": {"connector": "kafka", "topic": f"rk2n-{u}.{{device}}", "group": f"gw-{u}"},
                    "to": {"connector": "bus", "subject": f"rk2n.{u}.{{device}}", "jetstream": True},
                }
            ],
        )
    )
    producer = await kafka_producer(kafka_broker.bootstrap)
    accepted: set[int] = set()

    async def publish() -> None:
        for start in range(0, N, 500):
            futs = []
            for seq in range(start, start + 500):
                fut = await producer.send(
                    f"rk2n-{u}.{device_of(seq, DEVICES)}",
                    payload(seq, DEVICES),
                    key=device_of(seq, DEVICES).encode(),
                    headers=[(k, v.encode()) for k, v in headers(seq, DEVICES)],
                )
                futs.append((seq, fut))
            for seq, fut in futs:
                await fut
                accepted.add(seq)

    async def stored() -> int:
        return int((await js.stream_info(stream)).state.messages)

    stored_now = 0

    async def poll_stored() -> None:
        nonlocal stored_now
        while True:
            stored_now = await stored()
            await asyncio.sleep(0.05)

    poller = asyncio.create_task(poll_stored())
    publisher: asyncio.Task[None] | None = None
    try:
        await gw.astart()
        # The group join takes a few seconds on Tansu: start publishing once the gateway reads.
        publisher = asyncio.create_task(publish())
        at_kill = await stop_after_a_third(gw, lambda: stored_now, how)
        await publisher
        stored_before_restart = await stored()
        t_restart = time.monotonic()
        await gw.astart()
        # Until all are stored or no progress for 15 s (the analysis then names what is missing).
        await wait_progress(lambda: stored_now, lambda c: c >= len(accepted), timeout=60, stall=15)
        waited = time.monotonic() - t_restart
        # The restarted gateway's NATS connection only publishes: what it sent beyond the records the
        # stream still lacked were re-publishes of records the first process had already stored.
        conn = await asyncio.to_thread(nats_connection, nats_server.monitor_url, f"gw-{u}-bus")
        republished = (conn or {}).get("in_msgs", 0) - (len(accepted) - stored_before_restart)
        await gw.astop()
        poller.cancel()
        in_stream = await stream_messages(nc, stream, f"rk2n.{u}.>", await stored())
    finally:
        poller.cancel()
        if publisher is not None and not publisher.done():
            publisher.cancel()
        await producer.stop()
        await nc.close()
    result = analyse(in_stream, range(N))
    report(
        f"{how} kafka->jetstream",
        result,
        accepted,
        at_kill,
        f"republished_after_restart={republished} (deduplicated by Nats-Msg-Id) "
        f"recovered_in={waited:.2f}s (incl. group rejoin)",
    )
    assert_at_least_once("kafka->jetstream", result, accepted, ordered=True, graceful=how == "sigterm")
    if how == "sigterm":
        assert republished == 0, f"SIGTERM must commit what it stored; {republished} records re-published"
    assert result.duplicates == 0, f"Nats-Msg-Id from the Kafka position should dedup redeliveries: {result.summary()}"
