"""What the Kafka connector needs of a producer driver; no client library imported here.

The drivers (``sink.KafkaSink`` on aiokafka, ``confluent_sink.ConfluentSink`` on
librdkafka) are imported only when a config chooses them, so a gateway loads
only the Kafka client it uses.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

from connectors.kafka.config import KafkaConfig
from gateway.sink import Sink


class ProducerSink(Sink):
    """What the Kafka connector needs of a producer driver, per session."""

    def __init__(self, config: KafkaConfig) -> None:
        super().__init__()
        self.config = config
        self.broken: asyncio.Event = asyncio.Event()
        """Set when a delivery failed in a way that needs a new session."""

    reachability: Callable[[bool, str], None] | None = None
    """Set by the connector: told when the driver loses all brokers (False, why) and gets one back."""

    errors: ClassVar[tuple[type[BaseException], ...]] = ()
    """The driver's exceptions that mean "no broker answered" when a session opens."""

    @abstractmethod
    async def open(self, client_id: str) -> None:
        """Start a producer for a new session (raise if no broker answers)."""

    @abstractmethod
    async def close(self) -> None:
        """End of a session: records not confirmed go back to the queue."""

    @abstractmethod
    async def flush(self) -> None:
        """Until what was handed over is confirmed (or failed)."""

    def background(self) -> list[Coroutine[Any, Any, None]]:
        """What must run beside the writer while a session is up."""
        return []
