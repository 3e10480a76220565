"""Kafka connector on aiokafka: consumer groups with contiguous-offset commits, an idempotent producer."""

from connectors.kafka.config import PLUGIN

__all__ = ["PLUGIN"]
