"""NATS connector: core subjects and JetStream, on nats-py."""

from connectors.nats.config import PLUGIN

__all__ = ["PLUGIN"]
