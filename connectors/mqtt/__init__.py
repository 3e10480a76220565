"""MQTT 3.1.1 and 5 connector on the gateway's own asyncio client (``connectors.mqtt.client``)."""

from connectors.mqtt.config import PLUGIN

__all__ = ["PLUGIN"]
