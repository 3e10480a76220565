"""Fuzz the MQTT connector's conversions and framing: bytes -> packets, PUBLISH -> envelope, envelope -> PUBLISH.

No broker: ``MqttConnection.data_received`` is fed bytes (over a transport that
only records what is written), the source's ``Subscriber.on_publish`` runs on
``mqtt5`` packets against a dispatcher with recording sinks, and the sink's
``write_batch`` encodes onto such a connection. Whatever the chunking, topics,
user properties, header names and values (lone surrogates, control characters,
``NAME-bin``, over 65535 bytes) and payloads, no exception escapes; each message
is written or fails alone, and what is written is something Mosquitto accepts.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import mqtt5
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mqtt5 import PublishPacket, QoS

from connectors.mqtt.client import MqttConnection
from connectors.mqtt.codec import PUBACK, Codec5, Codec311, ack
from connectors.mqtt.config import MqttConfig, MqttTarget
from connectors.mqtt.publish import UNSAFE
from connectors.mqtt.sink import MqttSink, PacketIds
from connectors.mqtt.source import Subscriber
from gateway.core.envelope import Envelope
from gateway.errors import GatewayError, SinkError, TemplateError
from gateway.routing.headers import from_bytes, from_text, to_bytes, to_text
from tests.support.harness import FakeDelivery, FakeFlight, FakeTarget, FakeTransport, RecordingSink, dispatcher_for

# ---------------------------------------------------------------- a connection without a socket


@dataclass
class Events:
    """A PacketHandler that records what the connection hands it."""

    seen: list[tuple[Any, ...]] = field(default_factory=list)

    def on_publish(self, p: PublishPacket) -> None:
        self.seen.append(("publish", p.topic, p.payload, p.packet_id, p.user_properties))

    def on_publishes(self, packets: list[PublishPacket]) -> None:
        for p in packets:
            self.on_publish(p)

    def on_ack(self, kind: int, packet_id: int, reason: int) -> None:
        self.seen.append(("ack", kind, packet_id, reason))

    def on_unreadable(self, qos: int, packet_id: int, topic: bytes, payload: bytes, error: str) -> None:
        self.seen.append(("unreadable", qos, packet_id, topic, payload))


def connection(codec: Codec5, handler: Any) -> tuple[MqttConnection, FakeTransport]:
    conn = MqttConnection(codec, handler)
    transport = FakeTransport()
    conn.connection_made(cast(Any, transport))
    return conn, transport


def run(fn: Callable[[], Any]) -> Any:
    async def main() -> Any:
        return fn()

    return asyncio.run(main())


# ---------------------------------------------------------------- bytes -> packets


packet_specs = st.lists(
    st.one_of(
        st.tuples(
            st.just("publish"),
            st.text(alphabet="ab/c", min_size=1, max_size=8),
            st.one_of(st.binary(max_size=300), st.integers(200, 70_000).map(lambda n: b"p" * n)),
            st.integers(1, 65535),
        ),
        st.tuples(st.just("puback"), st.integers(1, 65535)),
        st.just(("pingresp",)),
    ),
    min_size=1,
    max_size=12,
)


def encode_stream(codec: Codec5, specs: list[Any]) -> tuple[bytes, list[tuple[Any, ...]]]:
    out = bytearray()
    want: list[tuple[Any, ...]] = []
    for spec in specs:
        if spec[0] == "publish":
            _, topic, payload, pid = spec
            out += codec.publish(topic, payload, 1, False, pid, False, None, None, None)
            want.append(("publish", topic, payload, pid, []))
        elif spec[0] == "puback":
            out += ack(PUBACK, spec[1])
            want.append(("ack", PUBACK, spec[1], 0))
        else:
            out += b"\xd0\x00"
    return bytes(out), want


@settings(max_examples=200, deadline=None)
@given(specs=packet_specs, cuts=st.lists(st.integers(0, 200_000), max_size=20), v5=st.booleans())
def test_any_chunking_reads_the_same_packets(specs: list[Any], cuts: list[int], v5: bool) -> None:
    codec = Codec5() if v5 else Codec311()
    data, want = encode_stream(codec, specs)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})

    def feed() -> tuple[list[tuple[Any, ...]], FakeTransport]:
        events = Events()
        conn, transport = connection(codec, events)
        for a, b in itertools.pairwise(bounds):
            conn.data_received(data[a:b])
        assert conn._partial is None and not conn._head  # nothing left over
        return events.seen, transport

    seen, transport = run(feed)
    assert not transport.aborted
    assert seen == want


def test_a_large_packet_is_buffered_once_at_its_full_size() -> None:
    codec = Codec5()
    big = codec.publish("big", b"x" * 1_000_000, 1, False, 7, False, None, None, None)
    small = codec.publish("small", b"y", 1, False, 8, False, None, None, None)
    data = big + small

    def feed() -> Events:
        events = Events()
        conn, _ = connection(codec, events)
        conn.data_received(data[:10])
        assert conn._partial is not None and len(conn._partial) == len(big)  # allocated once, at its size
        buffer = conn._partial
        for at in range(10, len(data), 65536):
            conn.data_received(data[at : at + 65536])
            assert conn._partial is None or conn._partial is buffer
        return events

    events = run(feed)
    assert [e[1] for e in events.seen] == ["big", "small"]
    assert len(events.seen[0][2]) == 1_000_000


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x40\x80\x80\x80\x80\x01",  # a remaining length of five bytes
        b"\x36\x05\x00\x01a\x00\x01",  # QoS 3
        b"\x32\x03\x00\x09a",  # a topic longer than the packet
    ],
)
@pytest.mark.parametrize("v5", [True, False])
def test_a_packet_that_cannot_be_framed_is_a_protocol_error(garbage: bytes, v5: bool) -> None:
    def feed() -> tuple[Events, FakeTransport]:
        events = Events()
        conn, transport = connection(Codec5() if v5 else Codec311(), events)
        conn.data_received(garbage + b"\xd0\x00")
        return events, transport

    events, transport = run(feed)
    assert transport.aborted
    assert not [e for e in events.seen if e[0] == "publish"]


def bad_topic_publish(v5: bool, pid: int) -> bytes:
    """A QoS 1 PUBLISH whose topic is not UTF-8 (Mosquitto never sends one; another broker might)."""
    good = (Codec5() if v5 else Codec311()).publish("t/\u00e9", b"bad", 1, False, pid, False, None, None, None)
    return good.replace("\u00e9".encode(), b"\xff\xfe")


def bad_property_publish(pid: int) -> bytes:
    good = Codec5().publish("t/x", b"bad", 1, False, pid, False, [("k", "\u00e9")], None, None)
    return good.replace("\u00e9".encode(), b"\xc3\x28")


ROUTE = """\
  - name: r
    from: {connector: a, topic: "t/#"}
    to: {connector: b, topic: "out/{#}"}
"""


def with_dead_letter() -> tuple[Any, dict[str, Any], dict[str, RecordingSink]]:
    dispatcher, routes, sinks = dispatcher_for(ROUTE + '    dead_letter: {connector: c, topic: "dead"}\n')
    dead_letter = routes["r"].dead_letter
    assert dead_letter is not None
    dead_letter.sink = sinks["c"] = RecordingSink()
    return dispatcher, routes, sinks


# mqtt5 reports the UnicodeDecodeError as "unraisable" (printed to stderr) before it panics; not ours to fix.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", ["topic-v5", "topic-311", "property-v5"])
@pytest.mark.parametrize("bytewise", [False, True])
def test_a_publish_the_codec_cannot_decode_is_dead_lettered_and_acknowledged_in_order(
    kind: str, bytewise: bool
) -> None:
    v5 = kind.endswith("v5")
    codec = Codec5() if v5 else Codec311()
    bad = bad_property_publish(2) if kind == "property-v5" else bad_topic_publish(v5, 2)
    data = (
        codec.publish("t/a", b"one", 1, False, 1, False, None, None, None)
        + bad
        + codec.publish("t/b", b"two", 1, False, 3, False, None, None, None)
    )
    dispatcher, routes, sinks = with_dead_letter()
    route = routes["r"]

    async def main() -> FakeTransport:
        subscriber: list[Subscriber] = []

        class Session:
            def on_publish(self, p: PublishPacket) -> None:
                subscriber[0].on_publish(p)

            def on_publishes(self, packets: list[PublishPacket]) -> None:
                subscriber[0].on_publishes(packets)

            def on_ack(self, kind: int, packet_id: int, reason: int) -> None:
                pass

            def on_unreadable(self, qos: int, packet_id: int, topic: bytes, payload: bytes, error: str) -> None:
                subscriber[0].on_unreadable(qos, packet_id, topic, payload, error)

        conn, transport = connection(codec, Session())
        subscriber.append(Subscriber(conn, dispatcher))
        chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
        for chunk in chunks:
            conn.data_received(chunk)
        sinks["b"].confirm()
        sinks["c"].confirm()  # the dead letter
        await asyncio.sleep(0)  # acknowledgements are written at the end of the loop iteration
        await asyncio.sleep(0)
        return transport

    transport = asyncio.run(main())
    assert not transport.aborted
    assert bytes(transport.written) == ack(PUBACK, 1) + ack(PUBACK, 2) + ack(PUBACK, 3)
    s = route.stats
    assert (s.received, s.acked, s.failed, s.dead_lettered, route.in_flight) == (3, 2, 1, 1, 0)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_what_can_be_read_of_an_undecodable_publish_goes_to_the_dead_letter() -> None:
    dispatcher, _, sinks = with_dead_letter()

    async def main() -> None:
        subscriber = Subscriber(cast(MqttConnection, AckConnection()), dispatcher)
        conn, _ = connection(Codec5(), subscriber)
        conn.data_received(bad_property_publish(9))

    asyncio.run(main())
    [(letter, _)] = sinks["c"].items
    headers = dict(letter.env.headers or [])
    assert letter.env.payload == b"bad"
    assert headers["x-gateway-source-topic"] == "t/x"
    assert "cannot be read" in headers["x-gateway-error"]
    assert headers["x-gateway-error-type"] == "SinkError"


# ---------------------------------------------------------------- PUBLISH -> envelope


class AckConnection:
    """What a subscriber's acknowledgements need of a connection."""

    is_open = True

    def __init__(self) -> None:
        self.sent = bytearray()

    def queue(self, data: bytes | bytearray) -> None:
        self.sent += data


props = st.lists(st.tuples(st.text(max_size=10), st.text(max_size=20)), max_size=4)


@settings(max_examples=200, deadline=None)
@given(
    packets=st.lists(
        st.tuples(
            st.text(max_size=20),  # any topic: "", wildcards, '$', control characters
            st.binary(max_size=40),
            st.integers(0, 2),
            props,
            st.one_of(st.none(), st.text(max_size=12)),  # content type
            st.one_of(st.none(), st.integers(0, 2**32 - 1)),  # message expiry
            st.one_of(st.none(), st.text(alphabet="ab/", min_size=1, max_size=8)),  # response topic
            st.one_of(st.none(), st.binary(max_size=8)),  # correlation data
        ),
        min_size=1,
        max_size=8,
    )
)
def test_publish_to_envelope(packets: list[Any]) -> None:
    dispatcher, routes, sinks = dispatcher_for(ROUTE.replace("t/#", "#"))
    conn = AckConnection()
    sub = Subscriber(cast(MqttConnection, conn), dispatcher)
    items = sinks["b"].items
    for i, (topic, payload, qos, user, ctype, expiry, reply, corr) in enumerate(packets):
        try:
            p = PublishPacket(
                topic,
                payload,
                qos=QoS(qos),
                packet_id=i + 1,
                user_properties=user,
                content_type=ctype,
                message_expiry_interval=expiry,
                response_topic=reply,
                correlation_data=corr,
                topic_alias=None if topic else 1,  # a broker that used an alias it was not allowed
            )
        except ValueError:  # a wildcard in the topic: mqtt5.read refuses it too (the client: unreadable)
            packets[i] = (*packets[i][:2], 0, *packets[i][3:])  # nothing sent, nothing to acknowledge
            continue
        before = len(items)
        sub.on_publish(p)
        if len(items) == before:
            continue  # no route for it (a '$' topic): acknowledged as unrouted
        env = items[-1][0].env
        assert (env.topic, env.payload, env.qos, env.reply, env.correlation) == (topic, payload, qos, reply, corr)
        want = list(user)
        if ctype is not None:
            want.append(("content-type", ctype))
        if expiry is not None:
            want.append(("message-expiry-interval", str(expiry)))
        assert env.headers == (want or None)  # a message without properties has no headers
    sinks["b"].confirm()
    s = routes["r"].stats
    assert s.received == s.acked + s.failed + s.dropped + s.filtered + routes["r"].in_flight
    assert bytes(conn.sent) == b"".join(
        ack(PUBACK if q == 1 else 0x50, i + 1) for i, pk in enumerate(packets) if (q := pk[2])
    )


# ---------------------------------------------------------------- envelope -> PUBLISH


MAX_PACKET = 4096

strange = st.sampled_from(
    ["", "a/+", "a/#", "t\ud800", "a\x01b", "a\x7f", "a\u0085", "\ufdd0", "x\U0001fffe", "\uffff", "é", "a" * 70_000]
)
topics = st.one_of(st.text(alphabet="abc/", min_size=1, max_size=12), st.text(max_size=12), strange)
header_names = st.one_of(
    st.text(max_size=10),
    strange,
    st.sampled_from(["x-bin", "-bin", "content-type", "Content-Type", "message-expiry-interval", "a\udcff"]),
)
header_values = st.one_of(
    st.text(max_size=20),
    st.binary(max_size=20).map(from_bytes),  # what a Kafka source makes of bytes: lone surrogates
    st.sampled_from(["a\rb", "a\nb", "\t", "60", "0", "4294967296", "text/plain", "a" * 70_000]),
)


def readable(text: str) -> bool:
    """What Mosquitto accepts in an MQTT string (it drops the connection over the rest)."""
    return UNSAFE.search(text) is None and len(text.encode()) <= 65535


@settings(max_examples=200, deadline=None)
@given(
    v5=st.booleans(),
    messages=st.lists(
        st.tuples(
            topics,
            st.one_of(st.binary(max_size=64), st.binary(min_size=MAX_PACKET, max_size=MAX_PACKET + 8)),
            st.integers(0, 2),
            st.lists(st.tuples(header_names, header_values), max_size=4),
            st.one_of(st.none(), topics),  # reply (response topic)
            st.one_of(st.none(), st.binary(max_size=8), st.just(b"c" * 70_000)),  # correlation data
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_envelope_to_publish(v5: bool, messages: list[Any]) -> None:
    codec = Codec5() if v5 else Codec311()

    async def main() -> tuple[MqttSink, FakeTransport, list[Any]]:
        sink = MqttSink(MqttConfig(), codec, PacketIds())
        conn, transport = connection(codec, Events())
        sink.attach(conn, 65535, MAX_PACKET)
        batch = []
        for topic, payload, qos, headers, reply, corr in messages:
            env = Envelope(topic, payload, headers or None, None, 1, reply, corr)
            spec = MqttTarget(connector="m", topic="x", qos=qos)
            batch.append((FakeFlight(env), FakeDelivery(topic, FakeTarget(spec))))
        await sink.write_batch(cast(Any, batch))  # nothing escapes
        return sink, transport, batch

    sink, transport, batch = asyncio.run(main())
    view = memoryview(bytes(transport.written))
    packets = []
    while view:
        packet, used = codec.read(view)
        assert used <= MAX_PACKET
        packets.append(packet)
        view = view[used:]
    written = iter(packets)
    in_flight = {id(o.item[0]) for o in sink.inflight.values()}
    for flight, d in batch:
        qos = d.target.spec.qos
        if flight.failed:
            [error] = flight.failed
            assert isinstance(error, SinkError | TemplateError) and not getattr(error, "retriable", False), error
            assert id(flight) not in in_flight
            continue
        assert (flight.done_count == 1) if qos == 0 else (id(flight) in in_flight)
        p = next(written)
        env = flight.env
        assert isinstance(p, PublishPacket) and p.topic == d.address and p.payload == env.payload
        assert readable(p.topic)
        if not v5:
            continue
        strings = [p.topic, p.content_type or "", p.response_topic or ""]
        strings += [s for pair in p.user_properties for s in pair]
        assert all(readable(s) for s in strings), strings
        # the user properties give the headers back (a Kafka target decodes NAME-bin), less the two properties
        back = [from_text(n, v) for n, v in p.user_properties]
        moved = [("content-type", p.content_type)] if p.content_type is not None else []
        if p.message_expiry_interval is not None:
            moved.append(("message-expiry-interval", str(p.message_expiry_interval)))
        original = list(env.headers or [])
        for name, value in moved:
            hit = next(h for h in original if h[0].lower() == name and h[1] == value)
            original.remove(hit)
        assert p.user_properties == [to_text(n, v, UNSAFE) for n, v in original]
        # and a Kafka target gets the bytes back (the rule cannot tell an empty name's "-bin" apart: kept as is)
        assert [b for b, (n, _) in zip(back, original, strict=True) if n] == [
            (n, to_bytes(v)) for n, v in original if n
        ]
    assert next(written, None) is None


def test_a_value_mqtt_cannot_carry_travels_as_name_bin_and_a_name_it_cannot_fails_the_message() -> None:
    async def main() -> tuple[list[FakeFlight], list[Any]]:
        sink = MqttSink(MqttConfig(), Codec5(), PacketIds())
        conn, transport = connection(Codec5(), Events())
        sink.attach(conn, 65535, None)
        good = FakeFlight(Envelope("t", b"1", [("X-A", "a\rb"), ("X-B", "ok"), ("k-bin", "v")]))
        bad = FakeFlight(Envelope("t", b"2", [("X\rA", "v")]))
        spec = FakeTarget(MqttTarget(connector="m", topic="t", qos=0))
        await sink.write_batch(cast(Any, [(good, FakeDelivery("t", spec)), (bad, FakeDelivery("t", spec))]))
        packet, _ = mqtt5.read(memoryview(bytes(transport.written)))
        return [good, bad], packet.user_properties  # type: ignore[union-attr]

    (good, bad), user = asyncio.run(main())
    assert good.done_count == 1 and not good.failed
    assert user == [
        ("X-A-bin", base64.b64encode(b"a\rb").decode()),
        ("X-B", "ok"),
        ("k-bin-bin", base64.b64encode(b"v").decode()),
    ]
    assert len(bad.failed) == 1 and isinstance(bad.failed[0], SinkError) and "header name" in str(bad.failed[0])


def test_message_expiry_counts_the_time_spent_in_the_gateway() -> None:
    from time import monotonic_ns

    async def main() -> tuple[list[FakeFlight], Any]:
        sink = MqttSink(MqttConfig(), Codec5(), PacketIds())
        conn, transport = connection(Codec5(), Events())
        sink.attach(conn, 65535, None)
        ten_s_ago = monotonic_ns() - 10_000_000_000
        fresh = FakeFlight(Envelope("t", b"1", [("Message-Expiry-Interval", "60")], received_ns=ten_s_ago))
        stale = FakeFlight(Envelope("t", b"2", [("message-expiry-interval", "10")], received_ns=ten_s_ago))
        spec = FakeTarget(MqttTarget(connector="m", topic="t", qos=0))
        await sink.write_batch(cast(Any, [(fresh, FakeDelivery("t", spec)), (stale, FakeDelivery("t", spec))]))
        packet, _ = mqtt5.read(memoryview(bytes(transport.written)))
        return [fresh, stale], packet

    (fresh, stale), packet = asyncio.run(main())
    assert fresh.done_count == 1
    assert 49 <= packet.message_expiry_interval <= 50 and packet.user_properties == []
    assert len(stale.failed) == 1 and "expired" in str(stale.failed[0])
    assert isinstance(stale.failed[0], GatewayError) and not stale.failed[0].retriable


def test_pingresp_and_publish_in_one_chunk_keep_their_order() -> None:
    codec = Codec5()
    data = b"\xd0\x00" + codec.publish("a", b"x", 0, False, None, False, None, None, None) + ack(PUBACK, 5)

    def feed() -> list[tuple[Any, ...]]:
        events = Events()
        conn, _ = connection(codec, events)
        conn.data_received(data)
        return events.seen

    assert run(feed) == [("publish", "a", b"x", None, []), ("ack", PUBACK, 5, 0)]
