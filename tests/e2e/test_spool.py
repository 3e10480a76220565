"""Edge store-and-forward through the ``gateway`` process: MQTT QoS 1 → Kafka with a spool.

The Kafka broker is down for about 30 s; meanwhile devices keep publishing, the
gateway acknowledges every message from its spool on disk, and the gateway
itself is restarted (SIGTERM, then a new process on the same spool). When Kafka
comes back, everything arrives, in order per key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.brokers import Mosquitto, Tansu
from tests.support.clients.kafka import KafkaCollector, create_topics
from tests.support.clients.mqtt import MqttPublisher
from tests.support.configs import gateway_config, kafka_connector, mqtt_connector
from tests.support.gateway_process import GatewayProcess
from tests.support.messages import analyse

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.fault, pytest.mark.timeout(180)]

DEVICES = 8
BEFORE_RESTART = 3_000
AFTER_RESTART = 2_000
DOWNTIME = 30.0


async def test_kafka_down_30s_and_a_gateway_restart_lose_nothing(
    tmp_path: Path, gateways: Callable[..., GatewayProcess]
) -> None:
    with Mosquitto() as mq, Tansu() as kafka:
        config = gateway_config(
            "gw-spool",
            {"devices": mqtt_connector(mq.url, "gw-spool"), "platform": kafka_connector(kafka.bootstrap)},
            [
                {
                    "name": "telemetry",
                    "from": {"connector": "devices", "topic": "dev/{device}/t", "qos": 1},
                    "to": {"connector": "platform", "topic": "telemetry", "key": "{device}"},
                    "spool": {"path": str(tmp_path / "spool"), "max_bytes": 64 * 1024 * 1024},
                }
            ],
        )
        gw = gateways(config)
        await gw.astart(60)
        kafka.stop()
        down_at = time.monotonic()

        pub = MqttPublisher(mq.port, "spool-pub")
        pub.connect()
        try:
            for seq in range(BEFORE_RESTART):
                pub.publish_seq(f"dev/dev{seq % DEVICES}/t", seq, DEVICES)
            await asyncio.to_thread(pub.wait_accepted, BEFORE_RESTART, 30)  # PUBACKed from the spool
            await gw.astop()
            gw.spawn()  # a new gateway process on the same spool, Kafka still down
            await gw.await_event("spool.opened", 30)
            opened = gw.events("spool.opened")[-1]
            for seq in range(BEFORE_RESTART, BEFORE_RESTART + AFTER_RESTART):
                pub.publish_seq(f"dev/dev{seq % DEVICES}/t", seq, DEVICES)
            await asyncio.to_thread(pub.wait_accepted, BEFORE_RESTART + AFTER_RESTART, 30)
        finally:
            pub.close()

        await asyncio.sleep(max(0.0, DOWNTIME - (time.monotonic() - down_at)))
        kafka.start()
        downtime = time.monotonic() - down_at
        await create_topics(kafka.bootstrap, ["telemetry"], partitions=3)  # idempotent if the gateway made it
        collector = await KafkaCollector(kafka.bootstrap, "telemetry", 3).start()
        total = BEFORE_RESTART + AFTER_RESTART
        try:
            await gw.await_until(lambda: collector.distinct() >= total, 90, f"all {total} in Kafka")
        finally:
            await collector.stop()
        result = analyse(collector.messages, range(total))
        print(
            f"\nspool: Kafka down {downtime:.1f} s, gateway restarted once (backlog at reopen: "
            f"{opened.get('backlog')}); {result.summary()}"
        )
        assert result.lost == [] and result.order_violations == [], result.summary()
        assert opened.get("backlog", 0) >= BEFORE_RESTART, "the restarted gateway found the spool's backlog"
        await gw.astop()
