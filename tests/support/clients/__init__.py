"""Independent broker clients for tests: what a device, a service or a data job would use.

The gateway's own connectors are never used to check the gateway: MQTT goes through paho-mqtt
(:mod:`.mqtt`), NATS through nats-py (:mod:`.nats`), Kafka through aiokafka and librdkafka
(:mod:`.kafka`). Tests import from those modules; what the clients send and receive is
:mod:`tests.support.messages`.
"""

from tests.support.clients.mqtt import MqttClient

__all__ = ["MqttClient"]
"""``scripts/demo.py`` imports its MQTT client from here."""
