"""Fuzz the Kafka connector's conversions: record -> envelope, and envelope -> producer arguments.

No broker: the source's batch conversion (``GroupSource._dispatch``) runs on
aiokafka ``ConsumerRecord`` values, and the librdkafka sink's ``write_batch``
on a real librdkafka producer whose broker is never reached (``produce()``
only enqueues; every record is purged at the end). Whatever the topic, key,
header names and values (``None``, binary, lone surrogates, ``NAME-bin``) and
payload, no exception escapes; each message is handed to librdkafka or fails
alone, and what librdkafka gets is what the header rule says.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import confluent_kafka as ck
import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.kafka.config import KafkaConfig
from connectors.kafka.confluent_sink import ConfluentSink, producer_config
from connectors.kafka.producer import illegal_topic
from connectors.kafka.source import GroupSource
from gateway.core.envelope import Envelope
from gateway.errors import SinkError, TemplateError
from gateway.routing.headers import from_bytes, to_bytes
from tests.support.harness import FakeFlight

LEGAL = re.compile(r"[A-Za-z0-9._-]{1,249}")

topics = st.one_of(
    st.text(alphabet="abcXYZ019._-", min_size=1, max_size=20),
    st.text(max_size=20),  # anything: spaces, newlines, surrogates, ""
    st.sampled_from([".", "..", "a" * 249, "a" * 250, "ok\n", "t\ud800"]),
)
raw = st.one_of(st.none(), st.binary(max_size=40))
header_names = st.one_of(st.text(max_size=12), st.sampled_from(["x-bin", "-bin", "traceparent", "a\udcff", ""]))
text_values = st.one_of(
    st.text(max_size=20),  # may hold lone surrogates: some have no UTF-8 form
    st.binary(max_size=20).map(from_bytes),  # what a Kafka source makes of bytes
    st.binary(max_size=20).map(lambda b: base64.b64encode(b).decode()),
)


# ---------------------------------------------------------------- record -> envelope


class Capture:
    """Stands for the dispatcher: keeps what the source dispatches."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    def dispatch(self, env: Envelope) -> None:
        self.envelopes.append(env)

    def dispatch_run(self, envs: list[Envelope]) -> None:
        self.envelopes.extend(envs)


def record(topic: str, offset: int, key: bytes | None, value: bytes | None, headers: list[Any]) -> ConsumerRecord:
    return ConsumerRecord(
        topic=topic,
        partition=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=-1 if key is None else len(key),
        serialized_value_size=-1 if value is None else len(value),
        headers=tuple(headers),
    )


@settings(max_examples=200, deadline=None)
@given(
    topic=st.text(min_size=1, max_size=20),
    records=st.lists(
        st.tuples(raw, raw, st.lists(st.tuples(st.text(max_size=10), raw), max_size=5)), min_size=1, max_size=8
    ),
)
def test_record_to_envelope(topic: str, records: list[tuple[bytes | None, bytes | None, list[Any]]]) -> None:
    capture = Capture()
    source = GroupSource(None, "g", capture, fetch_max_records=100, commit_interval=1.0)  # type: ignore[arg-type]
    tp = TopicPartition(topic, 0)
    recs = [record(topic, 10 + i, k, v, h) for i, (k, v, h) in enumerate(records)]
    source._dispatch({tp: recs})
    assert len(capture.envelopes) == len(records)
    for env, (key, value, headers) in zip(capture.envelopes, records, strict=True):
        assert env.topic == topic and env.key is key
        assert env.payload == (value if value is not None else b"")
        if not headers:
            assert env.headers is None  # a record without headers pays nothing for them
        else:
            assert env.headers is not None
            assert [(k, to_bytes(v)) for k, v in env.headers] == [(k, v or b"") for k, v in headers]
    tracker = source.trackers[tp]
    assert tracker.next_offset == 10 + len(records)
    assert [r.offset for r in tracker.pending] == [10 + i for i in range(len(records))]


# ---------------------------------------------------------------- envelope -> producer arguments


class Recording(ck.Producer):  # type: ignore[misc]
    """A librdkafka producer that keeps the arguments of every record it accepted."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.accepted: list[tuple[str, bytes | None, bytes | None, Any]] = []

    def produce(self, topic: str, value: Any = None, key: Any = None, **kwargs: Any) -> None:
        super().produce(topic, value, key, **kwargs)
        self.accepted.append((topic, value, key, kwargs.get("headers")))


@dataclass
class Spec:
    tombstones: bool


@dataclass
class FakeTarget:
    spec: Spec


@dataclass
class FakeDelivery:
    address: str
    key: bytes | None
    target: FakeTarget


LIMIT = 1024


@pytest.fixture(scope="module")
def sink() -> Iterator[ConfluentSink]:
    config = KafkaConfig(bootstrap_servers=["127.0.0.1:9"], max_request_size=LIMIT, idempotent=False)
    sink = ConfluentSink(config)
    producer = Recording({**producer_config(config, "fuzz"), "log_level": 0})
    sink.producer = producer
    yield sink
    producer.purge()
    producer.flush(0)


def expected_headers(headers: list[tuple[str, str]]) -> list[tuple[str, bytes]] | None:
    """The header rule, written out: NAME-bin with valid base64 -> NAME and the decoded bytes."""
    out = []
    for name, value in headers:
        if name.endswith("-bin") and len(name) > 4:
            try:
                out.append((name[:-4], base64.b64decode(value, validate=True)))
                continue
            except ValueError:
                pass
        out.append((name, value.encode("utf-8", "surrogateescape")))
    return out


def encodable(headers: list[tuple[str, str]]) -> bool:
    try:
        expected_headers(headers)
        for name, _ in headers:
            name.encode()
    except UnicodeEncodeError:
        return False
    return True


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    messages=st.lists(
        st.tuples(
            topics,
            raw,  # the rendered key (None: the source's)
            raw,  # the source's key
            st.one_of(st.binary(max_size=64), st.binary(min_size=LIMIT + 1, max_size=LIMIT + 8)),
            st.lists(st.tuples(header_names, text_values), max_size=4),
            st.booleans(),  # tombstones
        ),
        min_size=1,
        max_size=6,
    )
)
def test_envelope_to_producer_arguments(sink: ConfluentSink, messages: list[Any]) -> None:
    producer: Recording = sink.producer
    producer.accepted.clear()
    sink.outstanding = 0
    batch = []
    for topic, key, env_key, payload, headers, tombstones in messages:
        env = Envelope(topic, payload, headers or None, env_key, 1)
        batch.append((FakeFlight(env), FakeDelivery(topic, key, FakeTarget(Spec(tombstones)))))
    asyncio.run(sink.write_batch(batch))  # type: ignore[arg-type]
    accepted = iter(producer.accepted)
    handed = 0
    for (flight, _d), (topic, key, env_key, payload, headers, tombstones) in zip(batch, messages, strict=True):
        legal = LEGAL.fullmatch(topic) is not None and topic not in (".", "..")
        assert (illegal_topic(topic) is None) == legal
        record_key = key if key is not None else env_key
        tombstone = not payload and tombstones
        ok = legal and len(payload) <= LIMIT and encodable(headers) and not (tombstone and record_key is None)
        if not ok:
            assert len(flight.failed) == 1, (topic, headers, flight.failed)
            error = flight.failed[0]
            assert isinstance(error, SinkError | TemplateError) and not getattr(error, "retriable", False)
            if not legal and len(payload) <= LIMIT:  # the size is checked first
                assert isinstance(error, TemplateError)
            continue
        assert not flight.failed, flight.failed
        handed += 1
        got_topic, value, got_key, got_headers = next(accepted)
        assert got_topic == topic and got_key == record_key
        assert value == (None if tombstone else payload)
        assert got_headers == (expected_headers(headers) if headers else None)
    assert next(accepted, None) is None
    assert sink.outstanding == handed
