"""The Kafka sink: an idempotent ``acks=all`` producer; flights complete on the delivery report.

aiokafka batches records per partition (``linger_ms``, ``max_batch_size``);
the writer only hands records over and returns, and each record's future
completes its flight. Retriable failures (after aiokafka's own retries) put
the record back in the queue for the next session; others fail the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from connectors.kafka.config import KafkaConfig
from connectors.kafka.producer import ProducerSink, record_headers, tombstone_without_key, unproducible
from connectors.kafka.security import aiokafka_security, refusal
from gateway.core.contract import Item
from gateway.errors import ConnectorError, PayloadTooLarge, SinkError


class KafkaSink(ProducerSink):
    """``driver: aiokafka``: pure Python, for installs without native wheels."""

    errors = (KafkaError,)

    def __init__(self, config: KafkaConfig) -> None:
        super().__init__(config)
        self.producer: AIOKafkaProducer | None = None

    async def open(self, client_id: str) -> None:
        cfg = self.config
        producer = AIOKafkaProducer(
            bootstrap_servers=cfg.bootstrap_servers,
            client_id=client_id,
            acks="all",
            enable_idempotence=cfg.idempotent,
            linger_ms=cfg.linger_ms,
            max_batch_size=cfg.max_batch_size,
            max_request_size=cfg.max_request_size,
            compression_type=None if cfg.compression == "none" else cfg.compression,
            request_timeout_ms=cfg.request_timeout_ms,
            **aiokafka_security(cfg),
        )
        try:
            await producer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        self.producer = producer
        self.broken.clear()

    async def flush(self) -> None:
        if self.producer is not None:
            await self.producer.flush()

    async def close(self) -> None:
        producer, self.producer = self.producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()

    def _on_delivery(self, item: Item, fut: asyncio.Future[object]) -> None:
        flight, d = item
        if fut.cancelled():
            self.requeue([item])
            return
        exc = fut.exception()
        if exc is None:
            flight.done()
        elif isinstance(exc, KafkaError) and exc.retriable:
            self.requeue([item])
            self.broken.set()
        else:
            flight.fail(d, SinkError(f"Kafka refused the record: {type(exc).__name__}: {exc}", retriable=False))

    async def write_batch(self, batch: list[Item]) -> None:
        producer = self.producer
        if producer is None:
            self.requeue(batch)
            raise ConnectorError("producer not started")
        limit = self.config.max_request_size
        on_delivery = self._on_delivery
        topics = self.topics
        i = 0
        try:
            for i, item in enumerate(batch):  # noqa: B007 - `i` is read in the except clause
                flight, d = item
                env = flight.env
                topic = d.address
                if topic not in topics and (bad := self.check_topic(topic)) is not None:
                    flight.fail(d, bad)
                    continue
                key = d.key if d.key is not None else env.key
                value: bytes | None = env.payload
                if not value and d.target.spec.tombstones:  # an empty payload, then the (rare) option
                    if key is None:
                        flight.fail(d, tombstone_without_key())
                        continue
                    value = None
                hdrs = env.headers
                try:
                    fut = await producer.send(
                        topic,
                        value,
                        key=key,
                        headers=record_headers(hdrs) if hdrs else None,
                    )
                except MessageSizeTooLargeError:
                    flight.fail(d, PayloadTooLarge(len(env.payload), limit, "Kafka max_request_size"))
                    continue
                except UnknownTopicOrPartitionError as exc:
                    # No metadata for this topic after request_timeout_ms: this record's problem, not the
                    # session's (retried under the route's `retry`: the topic may be created meanwhile).
                    flight.fail(d, SinkError(f"Kafka has no topic {topic!r}: {exc}", retriable=True))
                    continue
                except TopicAuthorizationFailedError as exc:
                    refused = refusal(exc.errno, f"{type(exc).__name__}: {exc}", f"topic {topic!r}")
                    flight.fail(d, SinkError(str(refused or exc), retriable=False))
                    continue
                except KafkaError as exc:
                    if exc.retriable or isinstance(exc, KafkaTimeoutError):  # timeout: the buffer stays full, no broker
                        raise
                    flight.fail(d, SinkError(f"Kafka refused the record: {type(exc).__name__}: {exc}", retriable=False))
                    continue
                except OSError:
                    raise  # the connection's, not the record's
                except Exception as exc:  # this record's own problem (a header it cannot encode ...)
                    flight.fail(d, unproducible(exc))
                    continue
                fut.add_done_callback(functools.partial(on_delivery, item))
            i = len(batch)
        except BaseException as exc:
            self.requeue(batch[i:])
            if isinstance(exc, KafkaError | OSError):
                raise ConnectorError(f"Kafka produce failed: {type(exc).__name__}: {exc}") from exc
            raise
