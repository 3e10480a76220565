"""Outages that must end in bounded time with nothing left behind (issue: every broker outage ends).

**Long outages.**
The three sink scenarios of the restart table (``SCENARIOS`` in ``tests/support/restarts.py``:
JetStream → Mosquitto, Kafka → JetStream, MQTT QoS 1 → Tansu), each with its sink broker SIGKILLed
for ``LONG`` seconds — longer than ``retry.max_time`` (60 s) and than librdkafka's delivery
timeout — run side by side. Asserted on
top of the restart checks (nothing accepted lost, duplicates within the window, the gateway
alive): no message *failed* (a lost connection is waited out, it is no poison), nothing left in
flight at the end, and the first delivery after the broker's return within ``FIRST_WITHIN`` s.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.brokers import BrokerProcess, Mosquitto, NatsServer, Tansu
from tests.support.outage_clients import KafkaSeqCollector, PacedMqttPublisher, close_all
from tests.support.restarts import (
    KILL_AT,
    PACE,
    PUB_INFLIGHT,
    RESUME_AT,
    SCENARIOS,
    N,
    Result,
    check,
    create_topic,
    gateway_config,
    kafka_connector,
    mqtt_connector,
    run_scenario,
    running_gateway,
)
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.timeout(300)]

LONG = 75.0
FIRST_WITHIN = 10.0


def check_long(result: Result) -> None:
    check(result)
    t = result.timings
    first = t["recovery"] - t["outage"]
    print(f"LONG OUTAGE {result.label}: first delivery {first:.2f} s after the broker returned")
    assert result.stats["failed"] == 0, f"{result.label}: messages failed during the outage: {result.stats}"
    assert result.stats["in_flight"] == 0, f"{result.label}: left in flight: {result.stats}"
    assert 0 <= first <= FIRST_WITHIN, f"{result.label}: first delivery {first:.2f} s after the return"


async def test_every_sink_broker_down_longer_than_the_retry_window(
    tmp_path: Path, unique: str, request: pytest.FixtureRequest
) -> None:
    sinks = [s for s in SCENARIOS if s.victim == "sink"]
    results = await asyncio.gather(
        *(
            run_scenario(
                s,
                "sigkill",
                tmp_path / s.name,
                request.getfixturevalue(s.other.fixture),
                unique + s.name[0],
                outage=LONG,
            )
            for s in sinks
        )
    )
    for result in results:
        check_long(result)


async def test_a_kafka_broker_that_lost_the_producer_state_carries_traffic_again(
    tmp_path: Any, mosquitto: Mosquitto, unique: str
) -> None:
    """MQTT QoS 1 (persistent session) → Kafka with the default (idempotent) producer; Tansu with memory
    storage is SIGKILLed once 1 000 messages arrived, 1 000 more are published while it is down, it
    starts again 5 s later without any state (the topic re-created), 1 000 more follow. The restarted
    broker no longer knows the producer's id: before, it refused every record as UnknownProducerId
    until librdkafka's delivery timeout (~55 s), and what the old producer held stayed in flight for good.
    """
    u = unique
    topic = f"fp-{u}"
    victim = Tansu(workdir=tmp_path / "tansu")
    victim.start()
    before: KafkaSeqCollector | None = None
    after: KafkaSeqCollector | None = None
    publisher: PacedMqttPublisher | None = None
    kafka = {"type": "kafka", "bootstrap_servers": [victim.bootstrap], "session_timeout_ms": 6000}
    config = gateway_config(
        u,
        {"mq": mqtt_connector(mosquitto.url, f"gw-{u}"), "victim": kafka},
        {
            "from": {"connector": "mq", "topic": f"fp/{u}/{{dev}}", "qos": 1},
            "to": {"connector": "victim", "topic": topic, "key": "{dev}"},
        },
    )
    try:
        await create_topic(victim.bootstrap, topic)
        before = await KafkaSeqCollector(victim.bootstrap, topic).start()
        async with running_gateway(config) as (gw, runner):
            publisher = await asyncio.to_thread(
                PacedMqttPublisher(
                    PACE, mosquitto.port, f"pub-{u}", lambda s: f"fp/{u}/dev{s % 4}", inflight=PUB_INFLIGHT
                ).connect
            )
            publisher.start()
            col = before
            await wait_until(lambda: 0 in col.first_seen, 45, "the first message never arrived")
            publisher.go.set()
            await wait_until(lambda: len(col.first_seen) >= KILL_AT, 30, "1 000 messages never arrived")
            published_at_kill = publisher.published
            BrokerProcess.kill(victim)
            arrived_before = set(before.first_seen)
            await close_all(before)
            before = None
            await wait_until(lambda: publisher is not None and publisher.published >= RESUME_AT, 30, "publisher")
            await asyncio.sleep(5.0)
            await asyncio.to_thread(victim.start, 30)
            t_up = time.monotonic()
            await create_topic(victim.bootstrap, topic)
            after = await KafkaSeqCollector(victim.bootstrap, topic).start()
            publisher.up.set()
            await publisher.finish(timeout=60)
            # What the old broker had acknowledged went with its memory; what was published after the
            # kill must all be in the new one.
            accepted = {seq for seq in publisher.accepted if seq >= published_at_kill}
            col2 = after
            missing = lambda: accepted - set(col2.first_seen)  # noqa: E731
            await wait_until(lambda: not missing(), 60, lambda: f"{len(missing())} never arrived")
            r = gw.routes["r"]
            await wait_until(lambda: r.in_flight == 0, 30, lambda: f"{r.in_flight} left in flight")
            first = min(after.first_seen.values()) - t_up
            print(
                f"PRODUCER STATE LOST: published_after_kill={len(accepted)}/{N} "
                f"arrived_before_kill={len(arrived_before)} "
                f"arrived_after={len(after.first_seen)} first_delivery_after_return={first:.2f}s "
                f"route={r.stats.as_dict()} in_flight={r.in_flight} reconnects={gw.connectors['victim'].reconnects}"
            )
            assert not runner.done(), "the gateway kept running"
            assert first <= FIRST_WITHIN, f"first delivery {first:.2f} s after the broker returned"
            assert r.stats.failed == 0, r.stats.as_dict()
    finally:
        await close_all(before, after, publisher)
        await asyncio.to_thread(victim.stop)


async def test_a_kafka_source_that_lost_its_broker_is_not_ready_within_seconds(
    tmp_path: Any, nats_server: NatsServer, unique: str
) -> None:
    """aiokafka reconnects silently: the consumer's own metadata probe makes the outage visible."""
    u = unique
    topic = f"fq-{u}"
    victim = Tansu(workdir=tmp_path / "tansu")
    victim.start()
    config = gateway_config(
        u,
        {"victim": kafka_connector(victim.bootstrap), "bus": {"type": "nats", "servers": [nats_server.url]}},
        {"from": {"connector": "victim", "topic": topic, "group": f"g-{u}"}, "to": {"connector": "bus", "subject": u}},
    )
    try:
        await create_topic(victim.bootstrap, topic)
        async with running_gateway(config) as (gw, runner):
            conn = gw.connectors["victim"]
            await wait_until(lambda: gw.ready, 30, "ready at first")
            BrokerProcess.kill(victim)
            t_kill = time.monotonic()
            await wait_until(lambda: not gw.ready, FIRST_WITHIN, "the outage never showed")
            shown = time.monotonic() - t_kill
            assert conn.last_error is not None and "no Kafka broker answers" in conn.last_error, conn.last_error
            await asyncio.to_thread(victim.start, 30)
            t_up = time.monotonic()
            await wait_until(lambda: gw.ready, FIRST_WITHIN, "not ready again after the broker returned")
            print(f"KAFKA SOURCE OUTAGE: not ready {shown:.2f} s after the kill, ready {time.monotonic() - t_up:.2f} s")
            assert not runner.done()
    finally:
        await asyncio.to_thread(victim.stop)
