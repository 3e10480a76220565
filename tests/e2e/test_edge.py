"""The edge install: the gateway without uvloop and without librdkafka (``driver: aiokafka``).

Where no wheel of uvloop or confluent-kafka exists (armv7, say), the gateway
runs on asyncio's own loop and produces with aiokafka. This runs a gateway
process in which both imports fail, MQTT QoS 1 → Kafka, and checks every
message arrives.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from tests.support.brokers import Mosquitto, Tansu
from tests.support.clients.kafka import KafkaCollector, create_topics
from tests.support.clients.mqtt import MqttPublisher
from tests.support.configs import gateway_config, kafka_connector, mqtt_connector
from tests.support.gateway_process import GatewayProcess
from tests.support.messages import analyse

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.timeout(120)]

WITHOUT_NATIVE_EXTRAS = (
    "import sys; sys.modules['uvloop'] = None; sys.modules['confluent_kafka'] = None; "
    "from gateway.cli import main; sys.exit(main(sys.argv[1:]))"
)


class NoNativeExtrasGateway(GatewayProcess):
    def command(self) -> list[str]:
        return [sys.executable, "-c", WITHOUT_NATIVE_EXTRAS, *super().command()[3:]]


async def test_runs_without_uvloop_and_librdkafka(tmp_path: Path) -> None:
    n, devices = 1_000, 4
    with Mosquitto() as mq, Tansu() as kafka:
        await create_topics(kafka.bootstrap, ["edge"], partitions=2)
        config = gateway_config(
            "gw-edge",
            {
                "devices": mqtt_connector(mq.url, "gw-edge"),
                "platform": kafka_connector(kafka.bootstrap, driver="aiokafka"),
            },
            [
                {
                    "name": "t",
                    "from": {"connector": "devices", "topic": "dev/{device}/t", "qos": 1},
                    "to": {"connector": "platform", "topic": "edge", "key": "{device}"},
                }
            ],
        )
        gw = NoNativeExtrasGateway(tmp_path, config)
        try:
            await gw.astart(60)
            collector = await KafkaCollector(kafka.bootstrap, "edge", 2).start()
            pub = MqttPublisher(mq.port, "edge-pub")
            pub.connect()
            try:
                for seq in range(n):
                    pub.publish_seq(f"dev/dev{seq % devices}/t", seq, devices)
                await asyncio.to_thread(pub.wait_accepted, n, 30)
                await gw.await_until(lambda: collector.distinct() >= n, 60, f"all {n} in Kafka")
            finally:
                pub.close()
                await collector.stop()
            result = analyse(collector.messages, range(n))
            assert result.lost == [] and result.order_violations == [], result.summary()
            assert "confluent" not in gw.log_text()
            await gw.astop()
        finally:
            gw.cleanup()
