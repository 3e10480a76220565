"""Kafka sources on librdkafka (confluent-kafka), the default driver: one consumer per (connector, group).

librdkafka fetches, decompresses and parses record batches on its own threads; Python only turns each
ready record into an envelope. The consumer's blocking calls run on one thread of its own: it waits
(``poll``) for the first record, then takes whatever else is ready (``consume(n, 0)``, up to the route
budget's room) and hands the whole batch to the event loop, one thread hop per batch. The loop then
dispatches the batch; nothing per record crosses threads.

Guarantees as with aiokafka (:mod:`connectors.kafka.source`): auto-commit is off and each partition
commits its settled prefix only (:mod:`connectors.kafka.offsets`), every ``commit_interval_ms``, on
revocation (the revocation callback asks the loop for the settled offsets, then commits them before
librdkafka gives the partitions away) and on stop; while a route is full its partitions are paused and the
consumer keeps polling (rebalances are served); a released record is read again when its route resumes;
a record librdkafka or the client cannot read (a corrupt batch, a header name that is not UTF-8) fails
alone through its routes' policy and the partition reads on. librdkafka's error callback says when every
broker is down, and a metadata probe every two seconds when one answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from connectors.kafka.offsets import (
    PROBE_TIMEOUT,
    BrokerWatch,
    KafkaReceipt,
    Partition,
    PartitionTracker,
    rewound,
    set_backlogs,
    settled_offsets,
)
from gateway.core.contract import LAG_EVERY, Dispatcher, Envelope, Route, Source
from gateway.errors import SinkError
from gateway.routing.headers import from_bytes
from gateway.util.flood import Flood

log = structlog.get_logger("gateway.connector.kafka")

_WAIT = 0.2
"""Seconds one ``poll`` on the consumer's thread waits for a first record (how soon intake stops)."""
_PAUSE_AFTER = 1.0
"""Seconds a full route may keep its partitions unpaused."""
_CALLBACK_TIMEOUT = 10.0
"""Seconds the consumer's thread waits for the event loop in a rebalance callback."""
_LOG_INTERVAL = 5.0
_UNREADABLE = frozenset(
    {
        KafkaError._BAD_MSG,
        KafkaError._BAD_COMPRESSION,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_RECORD,
        KafkaError._KEY_DESERIALIZATION,
        KafkaError._VALUE_DESERIALIZATION,
    }
)
"""Consumer errors about one record or batch at a known offset: it fails alone, the partition reads on."""
_LOG = logging.getLogger("librdkafka")
_headers = operator.methodcaller("headers")
"""``msg.headers()`` through a C-level call. confluent-kafka builds the header list with a NULL name where a
header name is not UTF-8 and returns it with the decode error still set; a direct call from Python code is
not checked (the interpreter's fast path) and the NULL crashes the process when read, while a C-level call
is: it raises ``SystemError`` from the ``UnicodeDecodeError``, and that record fails alone."""


def consumer_config(base: dict[str, Any], group: str, *, offset_reset: str, session_timeout_ms: int) -> dict[str, Any]:
    """librdkafka settings of a gateway consumer (``base``: servers, client id, security, timeouts)."""
    return {
        **base,
        "group.id": group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": offset_reset,
        "session.timeout.ms": session_timeout_ms,
        # Prefetch: enough for a fetch-sized batch per call, bounded in bytes (the default holds 64 MB), and
        # fetched again 5 ms after the queue fell below it (the default waits a whole second: 36 000 msgs/s).
        "queued.min.messages": 20_000,
        "queued.max.messages.kbytes": 16_384,
        "fetch.queue.backoff.ms": 5,
    }


class ConfluentGroupSource:
    """A consumer-group member feeding the routes that share its group (``driver: confluent``)."""

    def __init__(
        self,
        config: dict[str, Any],
        group: str,
        dispatcher: Dispatcher,
        *,
        fetch_max_records: int,
        commit_interval: float,
        offset_reset: Literal["earliest", "latest"] = "earliest",
        topics: list[str] | None = None,
        pattern: str | None = None,
        open_timeout: float = 30.0,
        logger: Any = None,
    ) -> None:
        self.log = logger if logger is not None else log
        self.config = config
        self.group = group
        self.dispatcher = dispatcher
        self.topics = topics
        """The exact topic names it subscribes; or, when None, every topic ``pattern`` (a regex) matches."""
        self.pattern = pattern
        self.fetch_max_records = fetch_max_records
        self.commit_interval = commit_interval
        self.offset_reset = offset_reset
        self.open_timeout = open_timeout
        self.consumer: Consumer | None = None
        self.trackers: dict[Partition, PartitionTracker] = {}
        self.stopped = asyncio.Event()
        """Set when the fetch loop ended after intake stopped."""
        self.unreadable = 0
        """Records failed because they could not be read."""
        self.refused: KafkaError | None = None
        """The last TLS/SASL refusal librdkafka reported (the reason a session could not open)."""
        self.last_error: str | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"kafka-{group}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch = BrokerWatch(group)
        self._flood = Flood(_LOG_INTERVAL)

    # -- librdkafka's callbacks: served inside poll/consume/close, on the consumer's thread -------------
    def _on_error(self, err: KafkaError) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._error, err)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.log.info("kafka.partitions_assigned", group=self.group, partitions=len(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit the settled prefix of the partitions going away, before librdkafka gives them away."""
        offsets = self._on_loop(self._revoked, partitions)
        if offsets:
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:  # the new owner reads again from the last commit
                self.log.warning("kafka.commit_failed", group=self.group, error=str(exc.args[0]))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions taken without a revocation (the session timed out): nothing can be committed for them."""
        self._on_loop(self._revoked, partitions, False)

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._committed, err, partitions)

    def _on_loop(self, fn: Callable[..., list[TopicPartition]], *args: Any) -> list[TopicPartition]:
        """Run ``fn`` on the event loop and wait for its result (from the consumer's thread)."""
        assert self._loop is not None

        async def call() -> list[TopicPartition]:
            return fn(*args)

        try:
            return asyncio.run_coroutine_threadsafe(call(), self._loop).result(_CALLBACK_TIMEOUT)
        except (TimeoutError, RuntimeError):  # the loop is gone or stuck: what was not committed is read again
            return []

    # -- the same, on the loop --------------------------------------------------------------------------
    def _error(self, err: KafkaError) -> None:
        code = err.code()
        self.last_error = err.str()
        if code in (KafkaError._AUTHENTICATION, KafkaError._SSL, KafkaError.SASL_AUTHENTICATION_FAILED) or (
            code == KafkaError._TRANSPORT and "SSL" in err.str()
        ):
            self.refused = err
        if code == KafkaError._ALL_BROKERS_DOWN:
            self._watch.lost(err.str())

    def _revoked(self, partitions: list[TopicPartition], commit: bool = True) -> list[TopicPartition]:
        trackers = self.trackers
        chosen = [Partition(tp.topic, tp.partition) for tp in partitions]
        offsets = settled_offsets(trackers, chosen) if commit else {}
        for tp in chosen:
            tracker = trackers.pop(tp, None)
            if tracker is not None:
                tracker.revoked = True
        return [TopicPartition(tp.topic, tp.partition, offset) for tp, offset in offsets.items()]

    def _committed(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None and err.code() != KafkaError._NO_OFFSET:
            self.log.warning("kafka.commit_failed", group=self.group, error=err.str())
        for tp in partitions:
            tracker = self.trackers.get(Partition(tp.topic, tp.partition))
            if tracker is not None and tp.error is None and tp.offset > tracker.committed:
                tracker.committed = tp.offset

    # -- the session ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the consumer, make sure a broker answers (librdkafka connects lazily), and subscribe."""
        loop = self._loop = asyncio.get_running_loop()
        config = {
            **self.config,
            "error_cb": self._on_error,
            "on_commit": self._on_commit,
            "logger": _LOG,
        }
        consumer = self.consumer = Consumer(config)
        deadline = loop.time() + self.open_timeout
        while True:  # short attempts, serving error_cb between them: a TLS or SASL refusal is said at once
            try:
                await loop.run_in_executor(self._thread, lambda: consumer.list_topics(timeout=1.0))
                break
            except KafkaException:
                await loop.run_in_executor(self._thread, consumer.poll, 0)
                await asyncio.sleep(0)  # the error callbacks the poll scheduled
                if self.refused is not None or loop.time() >= deadline:
                    raise KafkaException(self.refused or KafkaError(KafkaError._TRANSPORT, self.last_error)) from None
        if self.topics is not None:
            subscription = list(self.topics)
        else:
            assert self.pattern is not None
            subscription = ["^" + librdkafka_regex(self.pattern)]
        consumer.subscribe(subscription, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)

    async def close(self) -> None:
        """Leave the group (the revocation commits what settled) and free the consumer's thread."""
        consumer, self.consumer = self.consumer, None
        if consumer is not None:
            loop = asyncio.get_running_loop()
            with contextlib.suppress(KafkaException, RuntimeError):
                await loop.run_in_executor(self._thread, consumer.close)
        self._thread.shutdown(wait=False)

    async def run(self, intake_stopped: asyncio.Event) -> None:
        lag = asyncio.create_task(self._watch_lag(), name=f"kafka:{self.group}:lag")  # one per session
        try:
            await self._fetch_loop(intake_stopped)
        finally:
            lag.cancel()
            await asyncio.wait([lag])
            self.stopped.set()

    async def quiesce(self) -> None:
        await self.stopped.wait()

    async def release(self, route: Route) -> None:
        """Nothing to do now: a released record is never committed past, and :meth:`resume` rewinds to it."""

    async def resume(self, route: Route) -> None:
        if n := self.rewind():
            self.log.info("kafka.rewound", route=route.name, group=self.group, partitions=n)

    # -- reading ----------------------------------------------------------------------------------------
    def _take(self, n: int) -> list[Message] | None:
        """On the consumer's thread: wait for a first record, then take what else is ready, up to ``n``."""
        consumer = self.consumer
        if consumer is None:
            return None
        first = consumer.poll(_WAIT)
        if first is None:
            return None
        if n == 1:
            return [first]
        batch = consumer.consume(n - 1, 0)
        batch.insert(0, first)
        return batch

    async def _fetch_loop(self, intake_stopped: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        gate = self.dispatcher.gate
        take = self._take
        thread = self._thread
        while not intake_stopped.is_set():
            if not gate.is_open:
                await self._paused()
                continue
            n = max(1, min(self.fetch_max_records, self.dispatcher.room()))
            # Records taken while intake stops are still dispatched (at most the route's room), so that a
            # graceful stop commits everything it read; shutdown waits for `stopped`.
            batch = await loop.run_in_executor(thread, take, n)
            if batch:
                self._dispatch(batch)

    def _dispatch(self, batch: list[Message]) -> None:
        """Envelopes of a taken batch, dispatched a partition's run at a time (one plan lookup, one admission
        per route for the run: :meth:`Dispatcher.dispatch_run`)."""
        dispatch_run = self.dispatcher.dispatch_run
        headers_of = _headers
        trackers = self.trackers
        now_ns = time.monotonic_ns()
        wall_ms = time.time_ns() // 1_000_000  # freshness: each record's age from its timestamp, one clock read
        topic: str | None = None
        partition = -1
        tracker: PartitionTracker | None = None
        append: Callable[[KafkaReceipt], None] | None = None
        run: list[Envelope] = []
        add = run.append
        skipped: set[Partition] | None = None
        """Partitions sought back by an unreadable batch: their later records in ``batch`` come again."""
        for msg in batch:
            if msg.error() is not None:
                dispatch_run(run)
                run = []
                add = run.append
                if (bad := self._consumer_error(msg)) is not None:
                    skipped = (skipped or set()) | {bad}
                    partition = -1
                continue
            part = msg.partition()
            if part != partition or msg.topic() != topic:
                dispatch_run(run)
                run = []
                add = run.append
                topic = msg.topic()
                assert topic is not None and part is not None
                if skipped is not None and (topic, part) in skipped:
                    continue
                partition = part
                tp = Partition(topic, part)
                tracker = trackers.get(tp)
                if tracker is None:
                    tracker = trackers[tp] = PartitionTracker(tp)
                append = tracker.pending.append
            assert tracker is not None and append is not None and topic is not None
            offset: int = msg.offset()  # type: ignore[assignment]  # set on every record without an error
            receipt = KafkaReceipt(tracker, offset)
            append(receipt)
            tracker.next_offset = offset + 1
            try:
                hdrs = headers_of(msg)
            except SystemError as exc:  # a header name that is not UTF-8 (see headers_of)
                dispatch_run(run)
                run = []
                add = run.append
                self._fail_unreadable(receipt, topic, exc.__cause__ or exc)
                continue
            value = msg.value()
            stamp = msg.timestamp()[1]
            add(
                Envelope(
                    topic,
                    value if value is not None else b"",
                    [(k, from_bytes(v)) for k, v in hdrs] if hdrs else None,
                    msg.key(),
                    1,
                    None,
                    None,
                    now_ns,
                    receipt,
                    (wall_ms - stamp) * 1_000_000 if stamp > 0 else -1,
                )
            )
        dispatch_run(run)

    def _consumer_error(self, msg: Message) -> Partition | None:
        """A record or partition error librdkafka delivered in the stream (off the per-record path).

        A batch that cannot be read (corrupt, a codec that fails) is reported at its first offset, and
        librdkafka fetches it again or skips it whole: each of its records fails alone instead. The first
        report fails that offset and seeks to the next; a report at or below what was already failed means
        the next offset is still in the bad batch: it fails, and the partition seeks one further, until a
        fetch returns readable records. Returns the partition sought, whose later records in the same batch
        come again."""
        err: KafkaError = msg.error()  # type: ignore[assignment]
        code = err.code()
        if err.fatal():
            raise KafkaException(err)
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        if code in _UNREADABLE and topic and partition is not None and offset is not None and offset >= 0:
            tp = Partition(topic, partition)
            tracker = self.trackers.get(tp)
            if tracker is None:
                tracker = self.trackers[tp] = PartitionTracker(tp)
            if tracker.next_offset is not None and offset < tracker.next_offset:
                offset = tracker.next_offset  # the same batch again: its next record
            receipt = KafkaReceipt(tracker, offset)
            tracker.pending.append(receipt)
            tracker.next_offset = offset + 1
            self._fail_unreadable(receipt, topic, err.str())
            if self.consumer is not None:
                with contextlib.suppress(KafkaException):
                    self.consumer.seek(TopicPartition(topic, partition, offset + 1))
            return tp
        if code == KafkaError._PARTITION_EOF:
            return None
        if n := self._flood.count():
            self.log.warning("kafka.consumer_error", group=self.group, topic=topic, error=err.str(), count=n)
        return None

    def _fail_unreadable(self, receipt: KafkaReceipt, topic: str, why: object) -> None:
        """Fail the record of ``receipt`` on every route that takes its topic, as a target would refuse it:
        dead letter (empty payload, the error and position in its headers) or ``on_error``."""
        self.unreadable += 1
        detail = f"{type(why).__name__}: {why}" if isinstance(why, BaseException) else str(why)
        error = SinkError(f"Kafka record {receipt.position()} cannot be read: {detail}", retriable=False)
        if n := self._flood.count():
            tp = receipt.tracker.tp
            self.log.warning(
                "kafka.record_unreadable",
                group=self.group,
                topic=tp.topic,
                partition=tp.partition,
                offset=receipt.offset,
                error=str(error),
                count=n,
            )
        self.dispatcher.fail(Envelope(topic, b"", None, None, 1, None, None, time.monotonic_ns(), receipt), error)

    async def _paused(self) -> None:
        """A route is full: wait for it to drain; if that takes long, pause the partitions and keep
        polling (rebalances are served) until it does. A record taken meanwhile is read again later."""
        gate = self.dispatcher.gate
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_PAUSE_AFTER):
                await gate.wait_open()
        consumer = self.consumer
        if gate.is_open or consumer is None:
            return
        loop = asyncio.get_running_loop()
        assigned = consumer.assignment()
        consumer.pause(assigned)
        try:
            while not gate.is_open:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await gate.wait_open()
                batch = await loop.run_in_executor(self._thread, self._take, 1)
                for msg in batch or ():  # fetched before the pause took effect: read it again on resume
                    if msg.error() is None:
                        consumer.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))  # type: ignore[arg-type]
        finally:
            now = set((tp.topic, tp.partition) for tp in consumer.assignment())
            consumer.resume([tp for tp in assigned if (tp.topic, tp.partition) in now])

    def rewind(self) -> int:
        """Read released records again: seek each partition back to its lowest released offset."""
        consumer = self.consumer
        if consumer is None:
            return 0
        count = 0
        for tp, tracker in list(self.trackers.items()):
            if tracker.rewind is None or tracker.revoked:
                continue
            with contextlib.suppress(KafkaException):
                consumer.seek(TopicPartition(tp.topic, tp.partition, tracker.rewind))
            self.trackers[tp] = rewound(tracker)
            count += 1
        return count

    # -- commits ----------------------------------------------------------------------------------------
    async def commit(self, partitions: list[Partition] | None = None, *, final: bool = False) -> None:
        """Commit the settled prefix of ``partitions`` (all if None) and wait for the broker's answer."""
        consumer = self.consumer
        trackers = self.trackers
        chosen = list(trackers) if partitions is None else [tp for tp in partitions if tp in trackers]
        offsets = settled_offsets(trackers, chosen)
        if consumer is not None and offsets:
            listed = [TopicPartition(tp.topic, tp.partition, off) for tp, off in offsets.items()]
            try:
                await asyncio.to_thread(consumer.commit, offsets=listed, asynchronous=False)
            except (KafkaException, RuntimeError) as exc:
                self.log.warning("kafka.commit_failed", group=self.group, error=str(exc))
            else:
                for tp, off in offsets.items():
                    if tp in trackers:
                        trackers[tp].committed = off
        if final:
            for tp in chosen:
                trackers.pop(tp).revoked = True

    async def run_committer(self) -> None:
        """Commit the settled prefix every ``commit_interval`` until cancelled; librdkafka sends it and its
        answer comes back through ``on_commit`` (no thread waits for it)."""
        while True:
            await asyncio.sleep(self.commit_interval)
            consumer = self.consumer
            offsets = settled_offsets(self.trackers, list(self.trackers))
            if consumer is not None and offsets:
                listed = [TopicPartition(tp.topic, tp.partition, off) for tp, off in offsets.items()]
                try:
                    consumer.commit(offsets=listed, asynchronous=True)
                except KafkaException as exc:
                    self.log.warning("kafka.commit_failed", group=self.group, error=str(exc.args[0]))

    # -- consumer lag, measured every LAG_EVERY seconds (never per record) ------------------------------
    async def _watch_lag(self) -> None:
        while True:
            await asyncio.sleep(LAG_EVERY)
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    await self.measure_lag()
            except (KafkaException, TimeoutError):
                continue  # the broker probe says when no broker answers; the last figures stay

    async def measure_lag(self) -> None:
        """Each route's backlog from the log-end offsets of its assigned partitions (the high watermark of
        the last fetch, else asked): behind its position and its committed offset. A partition this member
        has not read yet counts from the group's committed offset, or where ``offset_reset`` starts."""
        consumer = self.consumer
        if consumer is None:
            return
        assigned = sorted(consumer.assignment(), key=lambda tp: (tp.topic, tp.partition))
        marks: dict[Partition, tuple[int, int]] = {}
        unknown: list[Partition] = []
        for tp in assigned:
            key = Partition(tp.topic, tp.partition)
            low, high = consumer.get_watermark_offsets(tp, cached=True) or (-1, -1)
            marks[key] = (low, high)
            tracker = self.trackers.get(key)
            if high < 0 or tracker is None or tracker.committed < 0:
                unknown.append(key)
        committed: dict[Partition, int] = {}
        if unknown:
            asked = [TopicPartition(tp.topic, tp.partition) for tp in unknown]
            for tp in await asyncio.to_thread(consumer.committed, asked, PROBE_TIMEOUT):
                if tp.offset >= 0:
                    committed[Partition(tp.topic, tp.partition)] = tp.offset
            for key in unknown:
                if marks[key][1] < 0 or (self.offset_reset == "earliest" and marks[key][0] < 0):
                    got = await asyncio.to_thread(
                        consumer.get_watermark_offsets, TopicPartition(key.topic, key.partition), PROBE_TIMEOUT
                    )
                    if got is not None:
                        marks[key] = got
        table: list[tuple[Partition, int, int, int]] = []
        for key, (low, high) in marks.items():
            tracker = self.trackers.get(key)
            done = tracker.committed if tracker is not None and tracker.committed >= 0 else committed.get(key)
            base = done if done is not None else (max(low, 0) if self.offset_reset == "earliest" else high)
            position = tracker.next_offset if tracker is not None and tracker.next_offset is not None else base
            table.append((key, max(high, 0), position, base))
        set_backlogs(self.dispatcher, table)

    # -- reachability -------------------------------------------------------------------------------------
    async def watch_brokers(self, report: Callable[[bool, str], None]) -> None:
        """Tell ``report`` when no broker answers this consumer any more (librdkafka's error callback, or two
        failed metadata requests in a row), and when one does again (the next answered request):
        :class:`~connectors.kafka.offsets.BrokerWatch`."""

        async def probe() -> None:
            if self.consumer is not None:
                await asyncio.to_thread(self.consumer.list_topics, timeout=PROBE_TIMEOUT)

        await self._watch.run(probe, (KafkaException,), report)


def librdkafka_regex(pattern: str) -> str:
    """A Python regex in the dialect librdkafka matches topic names with (no ``(?:`` groups)."""
    return pattern.replace("(?:", "(")


_: type[Source] = ConfluentGroupSource
"""mypy checks here that :class:`ConfluentGroupSource` keeps the :class:`Source` contract."""
