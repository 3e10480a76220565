"""Every direction through the real gateway process: 10 000 sequence-numbered messages each.

For each route: nothing lost, nothing duplicated, order kept per MQTT topic /
NATS subject / Kafka key, headers carried (MQTT 5 user properties <-> NATS
headers <-> Kafka headers), targets and Kafka keys rendered from the templates.

Durable sources are preloaded before the gateway runs: a Kafka topic, a
JetStream stream, and for MQTT the gateway's own persistent session (start the
gateway once so its session and subscription exist, stop it, publish, start it
again), which also exercises session resumption. Core NATS is at-most-once:
the gateway's subscription must be live (checked on the server's /connz)
before publishing, at a moderate rate.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from tests.support.brokers import Mosquitto, NatsServer, Tansu
from tests.support.clients.kafka import KafkaCollector, create_topics, kafka_producer, produce
from tests.support.clients.mqtt import MqttCollector, MqttPublisher
from tests.support.clients.nats import (
    NatsCollector,
    nats_connect,
    preload_stream,
    stream_messages,
    wait_nats_subscription,
)
from tests.support.configs import gateway_config, kafka_connector, mqtt_connector, nats_connector
from tests.support.gateway_process import GatewayProcess
from tests.support.messages import Received, analyse, check_metadata, device_of, flow_rate, headers, payload, throughput
from tests.support.waits import Count, wait_progress

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.timeout(180)]

N = 10_000
DEVICES = 7
PARTITIONS = 3
SEQS = range(N)


# ------------------------------------------------------------------ helpers


async def wait_for_count(count: Count, n: int) -> float:
    """Until ``count() >= n``; gives up early when nothing new arrived for 10 s. Returns seconds waited."""
    return await wait_progress(count, lambda c: c >= n, timeout=45, stall=10)


def verify(
    messages: Sequence[Received],
    *,
    where: Callable[[int], str],
    key: Callable[[int], bytes | None] | None = None,
    with_headers: bool = True,
    label: str,
) -> None:
    """No loss, no duplicates, per-group order, each message at its rendered address with its own headers."""
    result = analyse(messages, SEQS)
    misplaced = [f"seq {m.seq} at {m.where!r}, expected {where(m.seq)!r}" for m in messages if m.where != where(m.seq)]
    bad_keys = [] if key is None else [f"seq {m.seq} key {m.key!r}" for m in messages if m.key != key(m.seq)]
    if with_headers:
        bad_headers = check_metadata(messages, devices=DEVICES)
    else:  # MQTT 3.1.1 has no properties: nothing of ours may show up, nothing invented either
        bad_headers = [f"seq {m.seq}: {m.headers!r}" for m in messages if m.headers][:5]
    print(f"E2E {label}: {result.summary()}")
    assert not result.lost, f"{label}: lost messages: {result.summary()}"
    assert not result.unexpected, f"{label}: {result.summary()}"
    assert result.duplicates == 0, f"{label}: duplicates without any failure: {result.summary()}"
    assert not result.order_violations, f"{label}: out of order: {result.summary()}"
    assert not misplaced, f"{label}: {len(misplaced)} at the wrong address: {misplaced[:5]}"
    assert not bad_keys, f"{label}: {len(bad_keys)} with a wrong Kafka key: {bad_keys[:5]}"
    assert not bad_headers, f"{label}: headers not carried: {bad_headers}"


def report_rate(label: str, messages: Sequence[Received], t0: float, note: str) -> None:
    """Throughput seen by the test client: since ``t0`` (``note`` says what that includes), and first-to-last."""
    print(f"E2E {label}: {throughput(len(messages), time.monotonic() - t0)} ({note}), {flow_rate(messages)}")


def by_device(messages: Sequence[Received]) -> list[Received]:
    """Regroup by the device in the payload (order promised per Kafka key, not per shared topic)."""
    return [Received(m.device, m.payload, m.headers, m.key, m.where, m.partition) for m in messages]


def assert_clean(gw: GatewayProcess) -> None:
    problems = gw.problems()
    assert not problems, "gateway logged errors:\n" + "\n".join(problems[:10])


def mqtt_publish_all(broker: Mosquitto, client_id: str, topic_of: Callable[[int], str]) -> set[int]:
    """QoS 1 publish of every seq with its user properties; returns what the broker PUBACKed."""
    pub = MqttPublisher(broker.port, client_id).connect()
    try:
        pub.publish_paced(topic_of, SEQS, DEVICES)
        pub.wait_accepted(N, timeout=40)
    finally:
        pub.close()
    return pub.accepted


async def preload_mqtt_session(
    gw: GatewayProcess, broker: Mosquitto, unique: str, topic_of: Callable[[int], str]
) -> None:
    """Create the gateway's persistent session, stop it, and queue N messages in it."""
    await gw.astart()
    first = gw.events("connector.connected", connector="mq")
    await gw.astop()
    accepted = await asyncio.to_thread(mqtt_publish_all, broker, f"pub-{unique}", topic_of)
    assert len(accepted) == N
    assert first, "no connector.connected for mq"


async def resume_mqtt_session(gw: GatewayProcess) -> float:
    """Start again; the broker must resume the session. Returns the start time."""
    t0 = time.monotonic()
    await gw.astart()
    connected = gw.events("connector.connected", connector="mq")
    assert connected[0].get("session_present") is True, f"session not resumed: {connected[0]}"
    return t0


async def publish_core(nc: Any, subject_of: Callable[[int], str], *, chunk: int = 200) -> None:
    """Core NATS publishes with headers, flushed every ``chunk`` messages (a moderate, round-trip-paced rate)."""
    for start in range(0, N, chunk):
        for seq in range(start, min(start + chunk, N)):
            await nc.publish(subject_of(seq), payload(seq, DEVICES), headers=dict(headers(seq, DEVICES)))
        await nc.flush()


# ------------------------------------------------------------------ MQTT sources


@pytest.mark.parametrize("protocol", [5, "3.1.1"])
async def test_mqtt_to_nats(
    gateways: Any, mosquitto: Mosquitto, nats_server: NatsServer, unique: str, protocol: int | str
) -> None:
    """MQTT 5 user properties become NATS headers; on MQTT 3.1.1 there are none to carry."""
    u = unique
    gw = gateways(
        gateway_config(
            f"gw-{u}",
            {
                "mq": mqtt_connector(mosquitto.url, f"gw-{u}-mq", protocol=protocol),
                "bus": nats_connector(nats_server.url),
            },
            [
                {
                    "name": "mqtt-to-nats",
                    "from": {"connector": "mq", "topic": f"m2n/{u}/{{device}}/up", "qos": 1},
                    "to": {"connector": "bus", "subject": f"m2n.{u}.{{device}}"},
                }
            ],
        )
    )
    label = f"mqtt{protocol}->nats"
    await preload_mqtt_session(gw, mosquitto, u, lambda s: f"m2n/{u}/{device_of(s, DEVICES)}/up")
    nc = await nats_connect(nats_server.url)
    try:
        col = await NatsCollector().subscribe(nc, f"m2n.{u}.>")
        t0 = await resume_mqtt_session(gw)
        await wait_for_count(lambda: len(col.messages), N)
        report_rate(label, col.messages, t0, "incl. gateway start")
        await gw.astop()
        verify(
            col.messages,
            where=lambda s: f"m2n.{u}.{device_of(s, DEVICES)}",
            with_headers=protocol == 5,
            label=label,
        )
    finally:
        await nc.close()
    assert_clean(gw)


async def test_mqtt_to_kafka(gateways: Any, mosquitto: Mosquitto, kafka_broker: Tansu, unique: str) -> None:
    u = unique
    topic = f"m2k-{u}"
    await create_topics(kafka_broker.bootstrap, [topic], PARTITIONS)
    gw = gateways(
        gateway_config(
            f"gw-{u}",
            {"mq": mqtt_connector(mosquitto.url, f"gw-{u}-mq"), "kafka": kafka_connector(kafka_broker.bootstrap)},
            [
                {
                    "name": "mqtt-to-kafka",
                    "from": {"connector": "mq", "topic": f"m2k/{u}/{{device}}/telemetry/#", "qos": 1},
                    "to": {"connector": "kafka", "topic": topic, "key": "{device}"},
                }
            ],
        )
    )
    await preload_mqtt_session(gw, mosquitto, u, lambda s: f"m2k/{u}/{device_of(s, DEVICES)}/telemetry/temp")
    col = await KafkaCollector(kafka_broker.bootstrap, topic, PARTITIONS).start()
    try:
        t0 = await resume_mqtt_session(gw)
        await wait_for_count(col.distinct, N)
        report_rate("mqtt->kafka", col.messages, t0, "incl. gateway start")
        await gw.astop()
    finally:
        await col.stop()
    verify(
        col.messages,
        where=lambda s: topic,
        key=lambda s: device_of(s, DEVICES).encode(),
        label="mqtt->kafka",
    )
    assert_partitioned_by_key(col.messages)
    assert_clean(gw)


def assert_partitioned_by_key(messages: Sequence[Received]) -> None:
    """Records of one key all sit in one partition (what keeps them in order)."""
    parts: dict[bytes | None, set[int | None]] = {}
    for m in messages:
        parts.setdefault(m.key, set()).add(m.partition)
    spread = {k: v for k, v in parts.items() if len(v) > 1}
    assert not spread, f"one key in several partitions: {spread}"


async def test_mqtt_fan_out_to_kafka_and_jetstream(
    gateways: Any, mosquitto: Mosquitto, nats_server: NatsServer, kafka_broker: Tansu, unique: str
) -> None:
    u = unique
    topic, stream = f"fan-{u}", f"FAN_{u}"
    await create_topics(kafka_broker.bootstrap, [topic], PARTITIONS)
    nc = await nats_connect(nats_server.url)
    col = await KafkaCollector(kafka_broker.bootstrap, topic, PARTITIONS).start()
    try:
        await nc.jetstream().add_stream(name=stream, subjects=[f"fan.{u}.>"])
        gw = gateways(
            gateway_config(
                f"gw-{u}",
                {
                    "mq": mqtt_connector(mosquitto.url, f"gw-{u}-mq"),
                    "kafka": kafka_connector(kafka_broker.bootstrap),
                    "bus": nats_connector(nats_server.url),
                },
                [
                    {
                        "name": "fan-out",
                        "from": {"connector": "mq", "topic": f"fan/{u}/{{device}}/telemetry/#", "qos": 1},
                        "to": [
                            {"connector": "kafka", "topic": topic, "key": "{device}"},
                            {"connector": "bus", "subject": f"fan.{u}.{{device}}.telemetry.{{#}}", "jetstream": True},
                        ],
                    }
                ],
            )
        )
        await preload_mqtt_session(gw, mosquitto, u, lambda s: f"fan/{u}/{device_of(s, DEVICES)}/telemetry/temp")
        js = nc.jetstream()

        async def stored() -> int:
            return int((await js.stream_info(stream)).state.messages)

        t0 = await resume_mqtt_session(gw)

        async def both() -> int:
            return min(col.distinct(), await stored())

        await wait_for_count(both, N)
        report_rate("fan-out mqtt->kafka leg", col.messages, t0, "incl. gateway start")
        await gw.astop()
        in_stream = await stream_messages(nc, stream, f"fan.{u}.>", N)
    finally:
        await col.stop()
        await nc.close()
    verify(
        by_device(col.messages),
        where=lambda s: topic,
        key=lambda s: device_of(s, DEVICES).encode(),
        label="fan-out kafka leg",
    )
    verify(
        in_stream,
        where=lambda s: f"fan.{u}.{device_of(s, DEVICES)}.telemetry.temp",
        label="fan-out jetstream leg",
    )
    assert_clean(gw)


# ------------------------------------------------------------------ core NATS sources


async def test_nats_to_mqtt(gateways: Any, mosquitto: Mosquitto, nats_server: NatsServer, unique: str) -> None:
    u = unique
    gw = gateways(
        gateway_config(
            f"gw-{u}",
            {"mq": mqtt_connector(mosquitto.url, f"gw-{u}-mq"), "bus": nats_connector(nats_server.url)},
            [
                {
                    "name": "nats-to-mqtt",
                    "from": {"connector": "bus", "subject": f"n2m.{u}.{{device}}.cmd", "queue": "gateway"},
                    "to": {"connector": "mq", "topic": f"n2m/{u}/{{device}}/cmd", "qos": 1},
                }
            ],
        )
    )
    col = await asyncio.to_thread(MqttCollector(mosquitto.port, f"sub-{u}", f"n2m/{u}/#").start)
    nc = await nats_connect(nats_server.url)
    try:
        await gw.astart()
        await wait_nats_subscription(nats_server.monitor_url, f"n2m.{u}.*.cmd")
        t0 = time.monotonic()
        await publish_core(nc, lambda s: f"n2m.{u}.{device_of(s, DEVICES)}.cmd")
        await wait_for_count(lambda: len(col.messages), N)
        report_rate("nats->mqtt", col.messages, t0, "")
        await gw.astop()
    finally:
        await nc.close()
        await asyncio.to_thread(col.close)
    verify(col.messages, where=lambda s: f"n2m/{u}/{device_of(s, DEVICES)}/cmd", label="nats->mqtt")
    assert_clean(gw)


async def test_nats_to_kafka(gateways: Any, nats_server: NatsServer, kafka_broker: Tansu, unique: str) -> None:
    u = unique
    topic = f"n2k-{u}"
    await create_topics(kafka_broker.bootstrap, [topic], PARTITIONS)
    gw = gateways(
        gateway_config(
            f"gw-{u}",
            {"bus": nats_connector(nats_server.url), "kafka": kafka_connector(kafka_broker.bootstrap)},
            [
                {
                    "name": "nats-to-kafka",
                    "from": {"connector": "bus", "subject": f"n2k.{u}.{{device}}"},
                    "to": {"connector": "kafka", "topic": topic, "key": "{device}"},
                }
            ],
        )
    )
    col = await KafkaCollector(kafka_broker.bootstrap, topic, PARTITIONS).start()
    nc = await nats_connect(nats_server.url)
    try:
        await gw.astart()
        await wait_nats_subscription(nats_server.monitor_url, f"n2k.{u}.*")
        t0 = time.monotonic()
        await publish_core(nc, lambda s: f"n2k.{u}.{device_of(s, DEVICES)}")
        await wait_for_count(col.distinct, N)
        report_rate("nats->kafka", col.messages, t0, "")
        await gw.astop()
    finally:
        await nc.close()
        await col.stop()
    verify(
        col.messages,
        where=lambda s: topic,
        key=lambda s: device_of(s, DEVICES).encode(),
        label="nats->kafka",
    )
    assert_partitioned_by_key(col.messages)
    assert_clean(gw)


# ------------------------------------------------------------------ Kafka sources


async def test_kafka_to_mqtt(gateways: Any, mosquitto: Mosquitto, kafka_broker: Tansu, unique: str) -> None:
    """One keyed topic with several partitions -> one MQTT topic; order is promised per key."""
    u = unique
    topic = f"k2m-{u}"
    await create_topics(kafka_broker.bootstrap, [topic], PARTITIONS)
    producer = await kafka_producer(kafka_broker.bootstrap)
    try:
        accepted = await produce(producer, ((topic, s) for s in SEQS), devices=DEVICES)
    finally:
        await producer.stop()
    assert len(accepted) == N
    gw = gateways(
        gateway_config(
            f"gw-{u}",
            {"mq": mqtt_connector(mosquitto.url, f"gw-{u}-mq"), "kafka": kafka_connector(kafka_broker.bootstrap)},
            [
                {
                    "name": "kafka-to-mqtt",
                    "from": {"connector": "kafka", "topic": topic, "group": f"gw-{u}"},
                    "to": {"connector": "mq", "topic": f"k2m/{u}/out", "qos": 1},
                }
            ],
        )
    )
    col = await asyncio.to_thread(MqttCollector(mosquitto.port, f"sub-{u}", f"k2m/{u}/#").start)
    try:
        t0 = time.monotonic()
        await gw.astart()
        await wait_for_count(lambda: len(col.messages), N)
        report_rate("kafka->mqtt", col.messages, t0, "incl. start + group join")
        await gw.astop()
    finally:
        await asyncio.to_thread(col.close)
    verify(by_device(col.messages), where=lambda s: f"k2m/{u}/out", label="kafka->mqtt")
    assert_clean(gw)


async def test_kafka_to_jetstream(gateways: Any, nats_server: NatsServer, kafka_broker: Tansu, unique: str) -> None:
    """One topic per device, matched by a capture pattern -> a subject per device, stored in JetStream."""
    u = unique
    stream = f"K2N_{u}"
    topics = [f"k2n-{u}.dev{d}" for d in range(DEVICES)]
    await create_topics(kafka_broker.bootstrap, topics, 1)
    producer = await kafka_producer(kafka_broker.bootstrap)
    try:
        accepted = await produce(producer, ((f"k2n-{u}.{device_of(s, DEVICES)}", s) for s in SEQS), devices=DEVICES)
    finally:
        await producer.stop()
    assert len(accepted) == N
    nc = await nats_connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"k2n.{u}.>"])
        gw = gateways(
            gateway_config(
                f"gw-{u}",
                {"bus": nats_connector(nats_server.url), "kafka": kafka_connector(kafka_broker.bootstrap)},
                [
                    {
                        "name": "kafka-to-jetstream",
                        "from": {"connector": "kafka", "topic": f"k2n-{u}.{{device}}"},
                        "to": {"connector": "bus", "subject": f"k2n.{u}.{{device}}", "jetstream": True},
                    }
                ],
            )
        )
        t0 = time.monotonic()
        await gw.astart()

        async def stored() -> int:
            return int((await js.stream_info(stream)).state.messages)

        await wait_for_count(stored, N)
        n_stored = await stored()
        print(f"E2E kafka->jetstream: {throughput(n_stored, time.monotonic() - t0)} (incl. start + group join)")
        await gw.astop()
        in_stream = await stream_messages(nc, stream, f"k2n.{u}.>", N)
    finally:
        await nc.close()
    verify(in_stream, where=lambda s: f"k2n.{u}.{device_of(s, DEVICES)}", label="kafka->jetstream")
    msg_ids = [dict(m.headers).get("Nats-Msg-Id") for m in in_stream]
    assert all(msg_ids), "JetStream publishes from a Kafka source must carry Nats-Msg-Id (source position)"
    assert len(set(msg_ids)) == len(msg_ids), "Nats-Msg-Id must be unique per source record"
    assert_clean(gw)


# ------------------------------------------------------------------ JetStream sources


async def test_jetstream_to_kafka(gateways: Any, nats_server: NatsServer, kafka_broker: Tansu, unique: str) -> None:
    u = unique
    stream, topic, durable = f"J2K_{u}", f"j2k-{u}", f"gw-{u}"
    await create_topics(kafka_broker.bootstrap, [topic], PARTITIONS)
    nc = await nats_connect(nats_server.url)
    col = await KafkaCollector(kafka_broker.bootstrap, topic, PARTITIONS).start()
    try:
        accepted = await preload_stream(
            nc, stream, [f"j2k.{u}.>"], [(f"j2k.{u}.{device_of(s, DEVICES)}", s) for s in SEQS], devices=DEVICES
        )
        assert len(accepted) == N
        gw = gateways(
            gateway_config(
                f"gw-{u}",
                {"bus": nats_connector(nats_server.url), "kafka": kafka_connector(kafka_broker.bootstrap)},
                [
                    {
                        "name": "jetstream-to-kafka",
                        "from": {
                            "connector": "bus",
                            "stream": stream,
                            "subject": f"j2k.{u}.{{device}}",
                            "durable": durable,
                        },
                        "to": {"connector": "kafka", "topic": topic, "key": "{device}"},
                    }
                ],
            )
        )
        t0 = time.monotonic()
        await gw.astart()
        await wait_for_count(col.distinct, N)
        report_rate("jetstream->kafka", col.messages, t0, "incl. gateway start")
        await gw.astop()
        info = await nc.jetstream().consumer_info(stream, durable)
    finally:
        await col.stop()
        await nc.close()
    verify(
        col.messages,
        where=lambda s: topic,
        key=lambda s: device_of(s, DEVICES).encode(),
        label="jetstream->kafka",
    )
    assert_partitioned_by_key(col.messages)
    assert info.num_ack_pending == 0 and info.num_pending == 0, f"durable not fully acknowledged: {info}"
    assert_clean(gw)


async def test_jetstream_to_mqtt(gateways: Any, mosquitto: Mosquitto, nats_server: NatsServer, unique: str) -> None:
    u = unique
    stream, durable = f"J2M_{u}", f"gw-{u}"
    nc = await nats_connect(nats_server.url)
    col = await asyncio.to_thread(MqttCollector(mosquitto.port, f"sub-{u}", f"j2m/{u}/#").start)
    try:
        accepted = await preload_stream(
            nc, stream, [f"j2m.{u}.>"], [(f"j2m.{u}.{device_of(s, DEVICES)}", s) for s in SEQS], devices=DEVICES
        )
        assert len(accepted) == N
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
                            "subject": f"j2m.{u}.{{device}}",
                            "durable": durable,
                        },
                        "to": {"connector": "mq", "topic": f"j2m/{u}/{{device}}", "qos": 1},
                    }
                ],
            )
        )
        t0 = time.monotonic()
        await gw.astart()
        await wait_for_count(lambda: len(col.messages), N)
        report_rate("jetstream->mqtt", col.messages, t0, "incl. gateway start")
        await gw.astop()
        info = await nc.jetstream().consumer_info(stream, durable)
    finally:
        await asyncio.to_thread(col.close)
        await nc.close()
    verify(col.messages, where=lambda s: f"j2m/{u}/{device_of(s, DEVICES)}", label="jetstream->mqtt")
    assert info.num_ack_pending == 0 and info.num_pending == 0, f"durable not fully acknowledged: {info}"
    assert_clean(gw)
