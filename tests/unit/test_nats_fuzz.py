"""Fuzz the NATS wire code: what is read never raises, what is written is a valid NATS command.

Reading: any header block and any subject bytes the server may deliver (nats-server forwards header
blocks without ``NATS/1.0``, lines without ``:`` or with an empty name, and subjects that are not UTF-8)
become an Envelope without an exception and without a header whose name is empty.

Writing: for random subjects, replies, headers and payloads, the checks the sink runs before writing
(``subject_problem``, the control line, ``encode_headers``) either refuse the message or the bytes
``append_pub`` produces parse, by an independent reading of the client protocol, as one PUB / HPUB
that nats-server takes, whose headers give back the original values.
"""

from __future__ import annotations

import re
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.nats import wire
from connectors.nats.client import GatewayClient
from connectors.nats.source import headers_of
from gateway.core.envelope import Envelope
from gateway.errors import SinkError
from gateway.routing.headers import from_text, to_bytes
from tests.support.nats_rules import HEADER_NAME, HEADERS, NOT_BYTES, SUBJECTS, name_ok, subject_ok

T = TypeVar("T")
_LIMIT = wire.MAX_CONTROL_LINE


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (nats-py's header hook is async but awaits nothing)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return cast(T, stop.value)
    coro.close()
    raise AssertionError("it suspended")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_header_block_parses_without_raising(block: bytes) -> None:
    parsed, dropped = wire.parse_headers(block)
    assert dropped >= 0
    for name, value in (parsed or {}).items():
        assert name_ok(name), name
        assert isinstance(value, str)


_LINE = st.one_of(
    st.binary(max_size=30).filter(lambda b: b"\r\n" not in b),
    st.tuples(st.binary(max_size=10), st.binary(max_size=20)).map(lambda t: t[0] + b":" + t[1]),
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([b"", b"NATS/1.0", b"NATS/1.0 503", b"NATS/1.0 100 Idle Heartbeat", b"NATS/9.9", b"Foo: 1"]),
    st.lists(_LINE.filter(lambda b: b"\r\n" not in b), max_size=6),
    st.binary(max_size=40),
    st.sampled_from([b"\r\n\r\n", b"\r\n", b""]),
)
def test_a_received_message_becomes_an_envelope_without_an_empty_header_name(
    first: bytes, lines: list[bytes], subject: bytes, end: bytes
) -> None:
    """What nats-py's read loop calls for every MSG / HMSG, on the gateway's client, then the source's
    envelope: nothing raises (in nats-py's read loop an exception stops reading for good)."""
    block = b"\r\n".join([first, *lines]) + end
    nc = GatewayClient()
    headers = _run(nc._process_headers(block))
    msg = nc._build_message(1, subject, b"", b"payload", headers)
    env = Envelope(msg.subject, msg.data, headers_of(msg), None, 0, msg.reply or None)
    assert to_bytes(env.topic) == subject, "the subject keeps its bytes"
    for name, value in env.headers or ():
        assert name_ok(name), name
        assert isinstance(value, str)


def _read_command(data: bytes) -> tuple[bytes, bytes, bytes | None, bytes]:
    """One PUB / HPUB as nats-server reads it: (subject, reply, header block, payload)."""
    end = data.index(b"\r\n")
    line = data[:end]
    assert end + 2 <= _LIMIT, f"control line of {end + 2} bytes"
    op, *args = re.split(rb"[ \t]+", line)
    if op == b"PUB":
        assert len(args) in (2, 3), line[:200]
        subject, reply, size = args[0], (args[1] if len(args) == 3 else b""), int(args[-1])
        hsize = 0
    else:
        assert op == b"HPUB" and len(args) in (3, 4), line[:200]
        subject, reply = args[0], (args[1] if len(args) == 4 else b"")
        hsize, size = int(args[-2]), int(args[-1])
        assert 0 < hsize <= size
    body = data[end + 2 :]
    assert len(body) == size + 2 and body.endswith(b"\r\n"), "sizes match what follows"
    assert subject_ok(subject), subject[:200]
    assert not reply or subject_ok(reply), reply
    if not hsize:
        return subject, reply, None, body[:size]
    block = body[:hsize]
    assert block.startswith(b"NATS/1.0\r\n") and block.endswith(b"\r\n\r\n"), block
    for header_line in block[10:-4].split(b"\r\n"):
        name, sep, value = header_line.partition(b": ")
        assert sep and HEADER_NAME.fullmatch(name), header_line
        assert value == value.strip(), "a value a client would strip"
        value.decode("utf-8")
    return subject, reply, block, body[hsize:size]


@settings(max_examples=400, deadline=None)
@given(
    SUBJECTS,
    st.sampled_from(["", "_INBOX.abc.1", "r" * 100]),
    HEADERS,
    st.binary(max_size=64),
)
def test_what_passes_the_checks_is_a_valid_command_with_its_headers_intact(
    subject: str, reply: str, headers: list[tuple[str, str]] | None, payload: bytes
) -> None:
    if wire.subject_problem(subject) is not None:
        # what the server refuses or misreads, or Unicode whitespace (the README: no whitespace in a token)
        assert not subject_ok(subject.encode("utf-8", "surrogatepass")) or any(c.isspace() for c in subject)
        return
    if headers and not all(name_ok(n) for n, _ in headers):
        with pytest.raises(SinkError, match="cannot be carried by NATS") as refused:
            wire.encode_headers(headers)
        assert not refused.value.retriable
        return
    if headers and any(NOT_BYTES.search(v) for _, v in headers):
        with pytest.raises(SinkError, match="neither text nor bytes"):
            wire.encode_headers(headers)
        return
    block = wire.encode_headers(headers) if headers else None
    encoded = subject.encode()
    line = wire.control_line_length(len(encoded), len(reply), len(block) if block is not None else None, len(payload))
    if line > _LIMIT:
        return  # the sink fails it (SinkError), nothing written
    out = bytearray()
    wire.append_pub(out, encoded, payload, reply, block)
    got_subject, got_reply, got_block, got_payload = _read_command(bytes(out))
    assert (got_subject, got_reply, got_payload) == (encoded, reply.encode(), payload)
    if headers:
        assert got_block is not None
        parsed, dropped = wire.parse_headers(got_block)
        assert dropped == 0
        back = dict(from_text(name, value) for name, value in (parsed or {}).items())
        assert back == {name: to_bytes(value) for name, value in headers}, "every value, byte for byte"
