"""The Kafka sink on librdkafka (confluent-kafka), the default driver.

librdkafka batches and sends from its own threads; ``produce()`` only enqueues
(≈0.5 µs) and delivery reports are handed back when the event loop calls
``poll(0)``, so the report callback runs on the loop: the records one poll reports
delivered are confirmed together when it returns (``Sink.confirmed``), a failure at
once in its order; no thread hop, no future per message. librdkafka offers no file
descriptor to wait on, so while reports are outstanding the sink polls every
millisecond, and not at all when nothing is in flight.

Measured here: aiokafka produces ~54 000 msgs/s, librdkafka ~480 000
(``../shared/FACTS.md``; the harness's figures are in loadtests/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from connectors.kafka.config import KafkaConfig
from connectors.kafka.producer import ProducerSink, record_headers, tombstone_without_key, unproducible
from connectors.kafka.security import librdkafka_security, refusal
from gateway.core.contract import Item
from gateway.errors import ConnectorError, PayloadTooLarge, SinkError

_POLL_INTERVAL = 0.001
_IDLE_POLL = 1.0
"""Seconds between polls while nothing is outstanding: librdkafka reports a lost broker through poll()."""
_PURGED = (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT)
_PRODUCER_STATE = frozenset(
    {
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.INVALID_PRODUCER_ID_MAPPING,
        KafkaError.PRODUCER_FENCED,
        KafkaError._FENCED,
        KafkaError._FATAL,
        KafkaError._INCONSISTENT,
        KafkaError._GAPLESS_GUARANTEE,
    }
)
"""The broker no longer knows the idempotent producer's id or sequence (it restarted without its state,
expired it, or lost a leader uncleanly): this producer cannot go on, a new one (a new id) can, at once."""
_STALL = 5.0
"""Seconds without any delivery report, records outstanding and a broker answering metadata requests,
after which the producer is taken for wedged (a broker that came back without the producer's state can
leave librdkafka holding everything until its delivery timeout) and replaced: the first time. The wait
doubles with each replacement that delivered nothing since (a leader election, a throttled or
under-replicated partition are slow, not wedged), up to the delivery timeout, and is never shorter
than ``linger_ms`` plus the stall itself."""
_PURGE_WAIT = 5.0
"""Seconds a closing session waits for the reports of the records it purged (each goes back to the queue)."""
_REFUSED = (KafkaError._AUTHENTICATION, KafkaError._SSL, KafkaError.SASL_AUTHENTICATION_FAILED)
"""Errors that another attempt with the same settings will not fix: reported as the reason at once."""
_LOG = logging.getLogger("librdkafka")
"""librdkafka's own log lines, served by poll() into the stdlib logging (and its secret scrubbing)."""


def topic_of(msg: Any) -> str:
    """The topic of a delivery report's message (for an error that names no topic itself)."""
    topic = msg.topic() if msg is not None else None
    return f"topic {topic!r}" if topic else "Kafka"


def delivery_timeout_ms(cfg: KafkaConfig) -> int:
    return max(cfg.request_timeout_ms * 2, 60_000)


def producer_config(cfg: KafkaConfig, client_id: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": ",".join(cfg.bootstrap_servers),
        "client.id": client_id,
        "acks": "all",
        "enable.idempotence": cfg.idempotent,
        "linger.ms": cfg.linger_ms,
        "batch.size": cfg.max_batch_size,
        "message.max.bytes": cfg.max_request_size,
        "compression.type": cfg.compression,
        "request.timeout.ms": cfg.request_timeout_ms,
        # Unbounded retries within the delivery timeout; after it the record goes back to the queue.
        "delivery.timeout.ms": delivery_timeout_ms(cfg),
        "queue.buffering.max.messages": 1_000_000,
        **librdkafka_security(cfg),
    }


class ConfluentSink(ProducerSink):
    """``driver: confluent`` (the default)."""

    errors = (KafkaException,)

    def __init__(self, config: KafkaConfig) -> None:
        super().__init__(config)
        self.timeout = delivery_timeout_ms(config) / 1000
        self._stall = _STALL
        """The stall wait in force (see :data:`_STALL`); back to the first one after a delivery."""
        self.producer: Producer | None = None
        self.outstanding = 0
        """Records handed to librdkafka whose delivery report has not come back."""
        self._reports = asyncio.Event()
        self.refused: str | None = None
        """The last TLS/SASL refusal librdkafka reported."""
        self.refused_code = 0
        """Its error code (``refusal`` says a SASL or authorization one in words)."""
        self.last_error: str | None = None
        """The last error librdkafka reported, whatever it was (the reason a session could not open)."""
        self.unreachable = False
        """librdkafka reported every broker down; cleared by the next delivery or a metadata answer."""
        self._acked: list[Item] = []
        """Delivered records reported by the poll() being served, confirmed when it returns."""

    def _delivered(self, item: Item, err: KafkaError | None, msg: Any) -> None:
        self.outstanding -= 1
        if err is None:
            self._acked.append(item)  # confirmed together once poll() returns (see _poll)
            if self.unreachable:
                self._reachable()
            self._stall = _STALL
            return
        if self._acked:  # in their order: what was delivered before this one first
            self._confirm()
        flight, d = item
        if err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            refused = refusal(err.code(), err.str(), topic_of(msg))
            flight.fail(d, SinkError(str(refused), retriable=False))
        elif err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
            limit = self.config.max_request_size
            flight.fail(d, PayloadTooLarge(len(flight.env.payload), limit, "Kafka max_request_size"))
        elif err.code() in _PURGED:
            self.requeue([item])
        elif err.retriable() or err.code() == KafkaError._MSG_TIMED_OUT:
            self.requeue([item])
            self.broken.set()
        elif err.fatal() or err.code() in _PRODUCER_STATE:
            self.requeue([item])  # the record is fine, the producer is not: a new one sends it
            self._replace(err)
        else:
            flight.fail(d, SinkError(f"Kafka refused the record: {err.str()}", retriable=False))

    def _poll(self, producer: Producer) -> None:
        """Serve librdkafka's callbacks (delivery reports, errors, logs); the records they report delivered
        are confirmed together (``Sink.confirmed``)."""
        producer.poll(0)
        if self._acked:
            self._confirm()

    def _confirm(self) -> None:
        acked, self._acked = self._acked, []
        self.confirmed(acked)

    def log(self, level: int, msg: str, *args: Any) -> None:
        """librdkafka's log lines (served by poll()): into the stdlib logging; a failure is kept as a reason."""
        if level >= logging.WARNING:
            self.last_error = msg % args if args else msg
        _LOG.log(level, msg, *args)

    def _replace(self, why: KafkaError | str) -> None:
        """This producer cannot go on: end the session now (its records are purged back to the queue and a
        new producer, with a new producer id, sends them) instead of waiting for a delivery timeout."""
        if not self.broken.is_set():
            self.replaced_because = why if isinstance(why, str) else f"{why.name()}: {why.str()}"
            self.broken.set()

    def on_error(self, err: KafkaError) -> None:
        """librdkafka's error_cb (served inside poll(), on the loop): it reconnects by itself, we report it."""
        if err.code() in _REFUSED or (err.code() == KafkaError._TRANSPORT and "SSL" in err.str()):
            self.refused = err.str()  # TLS alerts (a certificate required, a protocol mismatch) come as _TRANSPORT
            self.refused_code = err.code()
        if err.fatal() or err.code() in _PRODUCER_STATE:
            if self.producer is None:
                self.refused = err.str()  # while opening: the reason the session could not start
            else:
                self._replace(err)
        self.last_error = err.str()
        if err.code() == KafkaError._ALL_BROKERS_DOWN and not self.unreachable:
            self.unreachable = True
            if self.reachability is not None:
                self.reachability(False, f"all brokers down: {err.str()}")

    def _reachable(self) -> None:
        self.unreachable = False
        if self.reachability is not None:
            self.reachability(True, "")

    async def run_poller(self) -> None:
        """Serve delivery reports on the event loop while any are outstanding. Owned by the session.

        Also the stall check: records outstanding, no report for :data:`_STALL` seconds, and a broker
        that answers a metadata request means librdkafka will not deliver them (see ``_STALL``)."""
        loop = asyncio.get_running_loop()
        progress = loop.time()
        while True:
            producer = self.producer
            if producer is None or self.outstanding <= 0:
                self._reports.clear()
                await self._reports.wait()
                progress = loop.time()
                continue
            before = self.outstanding
            self._poll(producer)
            if self.outstanding != before:
                progress = loop.time()
            elif loop.time() - progress > self._stall + self.config.linger_ms / 1000:
                progress = loop.time()
                if await self._answers(producer) and self.outstanding == before:
                    self._replace(f"no delivery report for {self._stall:g} s while the broker answers")
                    self._stall = min(self._stall * 2, self.timeout)  # if the next one delivers nothing either
            if self.outstanding > 0:
                await asyncio.sleep(_POLL_INTERVAL)

    @staticmethod
    async def _answers(producer: Producer) -> bool:
        """Whether a broker answers a metadata request now (one short attempt, off the loop)."""
        try:
            await asyncio.to_thread(producer.list_topics, timeout=_IDLE_POLL)
        except KafkaException:
            return False
        return True

    async def run_idle_poller(self) -> None:
        """Every second while nothing is outstanding, poll for errors (librdkafka reports a lost broker
        through poll()), and while unreachable, probe for its return. Off the per-batch path."""
        while True:
            await asyncio.sleep(_IDLE_POLL)
            producer = self.producer
            if producer is None or self.outstanding > 0:
                continue  # run_poller is polling
            self._poll(producer)
            if self.unreachable:
                await self._probe(producer)

    async def _probe(self, producer: Producer) -> None:
        """While unreachable and idle: a metadata request tells when a broker answers again."""
        if await self._answers(producer) and self.unreachable and self.producer is producer:
            self._reachable()

    async def write_batch(self, batch: list[Item]) -> None:
        producer = self.producer
        if producer is None:
            self.requeue(batch)
            raise ConnectorError("producer not started")
        delivered = self._delivered
        limit = self.config.max_request_size
        topics = self.topics
        i = 0
        try:
            for i, item in enumerate(batch):  # noqa: B007 - `i` is read in the except clause
                flight, d = item
                env = flight.env
                payload = env.payload
                if len(payload) > limit:
                    flight.fail(d, PayloadTooLarge(len(payload), limit, "Kafka max_request_size"))
                    continue
                topic = d.address
                if topic not in topics and (bad := self.check_topic(topic)) is not None:
                    flight.fail(d, bad)
                    continue
                key = d.key if d.key is not None else env.key
                value: bytes | None = payload
                if not value and d.target.spec.tombstones:  # an empty payload, then the (rare) option
                    if key is None:
                        flight.fail(d, tombstone_without_key())
                        continue
                    value = None
                hdrs = env.headers
                try:
                    await self._produce(
                        producer,
                        topic,
                        value,
                        key,
                        record_headers(hdrs) if hdrs else None,
                        functools.partial(delivered, item),
                    )
                except KafkaException as exc:
                    err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                    if err is not None and err.fatal():  # the producer itself is unusable: a new one
                        self.broken.set()
                        raise ConnectorError(f"Kafka producer failed: {err.str()}") from exc
                    flight.fail(d, SinkError(f"Kafka refused the record: {exc}", retriable=False))
                    continue
                except Exception as exc:  # this record's own problem (a header it cannot encode ...)
                    flight.fail(d, unproducible(exc))
                    continue
                self.outstanding += 1
            i = len(batch)
        except BaseException:
            self.requeue(batch[i:])
            raise
        finally:
            self._reports.set()

    async def _produce(
        self, producer: Producer, topic: str, value: bytes | None, key: bytes | None, headers: Any, cb: Any
    ) -> None:
        while True:
            try:
                producer.produce(topic, value, key, headers=headers, on_delivery=cb)
                return
            except BufferError:  # librdkafka's queue is full: serve reports, then retry
                self._poll(producer)
                await asyncio.sleep(_POLL_INTERVAL)

    async def open(self, client_id: str) -> None:
        """Create the producer and make sure a broker answers (librdkafka itself connects lazily)."""
        producer = Producer({**producer_config(self.config, client_id), "error_cb": self.on_error, "logger": self})
        self.refused = self.last_error = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.request_timeout_ms / 1000
        while True:  # short attempts, serving error_cb between them: a TLS or SASL refusal is said at once
            try:
                await asyncio.to_thread(producer.list_topics, timeout=_IDLE_POLL)
                break
            except KafkaException:
                self._poll(producer)
                if self.refused is not None:
                    servers = ", ".join(self.config.bootstrap_servers)
                    raise refusal(self.refused_code, self.refused, servers) or ConnectorError(
                        f"cannot reach Kafka at {servers}: {self.refused}"
                    ) from None
                if loop.time() >= deadline:
                    if self.last_error is None:
                        raise
                    servers = ", ".join(self.config.bootstrap_servers)
                    raise ConnectorError(f"cannot reach Kafka at {servers}: {self.last_error}") from None
        self.producer = producer
        self.unreachable = False
        self.broken.clear()

    def background(self) -> list[Coroutine[Any, Any, None]]:
        return [self.run_poller(), self.run_idle_poller()]

    async def flush(self) -> None:
        producer = self.producer
        while producer is not None and self.outstanding > 0:
            self._poll(producer)
            await asyncio.sleep(_POLL_INTERVAL)

    async def close(self) -> None:
        """End of a session: what librdkafka still holds comes back to the queue (purged, requeued)."""
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.purge()
            self._poll(producer)  # purged records report _PURGE_QUEUE / _PURGE_INFLIGHT: requeued
            loop = asyncio.get_running_loop()
            deadline = loop.time() + _PURGE_WAIT
            while self.outstanding > 0 and loop.time() < deadline:  # reports of in-flight ones may lag
                await asyncio.sleep(_POLL_INTERVAL * 10)
                self._poll(producer)
            if self.outstanding > 0:  # never reported: the routes' watchdog sends them again
                _LOG.error("%d records of the old producer were not reported back after its purge", self.outstanding)
                self.outstanding = 0
