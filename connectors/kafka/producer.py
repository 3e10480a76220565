"""What the Kafka connector needs of a producer driver; no client library imported here.

The drivers (``sink.KafkaSink`` on aiokafka, ``confluent_sink.ConfluentSink`` on
librdkafka) are imported only when a config chooses them, so a gateway loads
only the Kafka client it uses.
"""

from __future__ import annotations

import asyncio
import re
from abc import abstractmethod
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

from connectors.kafka.config import KafkaConfig
from gateway.core.contract import Headers, Sink
from gateway.errors import SinkError, TemplateError
from gateway.routing.headers import from_text

_LEGAL_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
"""Kafka's rule for topic names (and neither "." nor "..")."""
_KNOWN_TOPICS = 10_000
"""Legal topic names remembered (the check runs once per distinct topic); forgotten all at once when full."""


def illegal_topic(topic: str) -> TemplateError | None:
    """Why ``topic`` cannot be produced to, or None. A name Kafka refuses must fail its message here:
    librdkafka and aiokafka would report it late or as retriable, and the record would be retried forever."""
    if _LEGAL_TOPIC.fullmatch(topic) is None or topic in (".", ".."):
        return TemplateError(
            f"{topic[:300]!r} is not a legal Kafka topic name (1 to 249 of A-Z a-z 0-9 . _ -, and not '.' or '..')"
        )
    return None


def record_headers(headers: Headers) -> list[tuple[str, bytes]]:
    """Kafka headers of a message: ``NAME-bin`` base64 values (from a text protocol) become their bytes
    again, others their UTF-8 (or the exact bytes a Kafka source read). Raises ``UnicodeEncodeError``
    for a name or value with no UTF-8 form (a lone surrogate): librdkafka crashes the process on
    such a name (confluent-kafka 2.16: a segfault), so names are checked before they reach it."""
    out = []
    for name, value in headers:
        name, raw = from_text(name, value)
        if not name.isascii():
            name.encode()
        out.append((name, raw))
    return out


def unproducible(exc: Exception) -> SinkError:
    """A record the client refused to take (raised by produce/send for this record only)."""
    return SinkError(f"Kafka client refused the record: {type(exc).__name__}: {exc}", retriable=False)


def tombstone_without_key() -> SinkError:
    return SinkError("a tombstone (null value) needs a record key: set the target's key", retriable=False)


class ProducerSink(Sink):
    """What the Kafka connector needs of a producer driver, per session."""

    def __init__(self, config: KafkaConfig) -> None:
        super().__init__()
        self.config = config
        self.broken: asyncio.Event = asyncio.Event()
        """Set when a delivery failed in a way that needs a new session."""
        self.topics: set[str] = set()
        """Topic names checked legal (``illegal_topic``): a set lookup per message, the regex once per topic."""

    def check_topic(self, topic: str) -> TemplateError | None:
        """:func:`illegal_topic`, remembered for legal names; call it for names not in ``topics``."""
        error = illegal_topic(topic)
        if error is None:
            if len(self.topics) >= _KNOWN_TOPICS:
                self.topics.clear()
            self.topics.add(topic)
        return error

    replaced_because: str | None = None
    """Why the producer is being given up, when the driver knows (see ``broken``)."""

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
