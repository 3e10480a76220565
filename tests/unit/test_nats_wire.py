"""The NATS sink's batched encoding produces what nats-py itself would send, and refuses what nats-server
would close the connection over; received header blocks never break the reader."""

from __future__ import annotations

import asyncio

import pytest
from nats.protocol.command import hpub_cmd, pub_cmd

from connectors.nats import wire
from gateway.errors import SinkError


@pytest.mark.parametrize("reply", ["", "_INBOX.abc.1"])
def test_pub_matches_nats_py(reply: str) -> None:
    out = bytearray()
    size = wire.append_pub(out, b"a.b.c", b"hello", reply)
    # nats-py writes two spaces where the reply is empty; the server reads either.
    assert bytes(out) == pub_cmd("a.b.c", reply, b"hello").replace(b"a.b.c  5", b"a.b.c 5")
    assert size == 5


def test_hpub_matches_nats_py_header_format() -> None:
    block = wire.encode_headers([("Nats-Msg-Id", "t/0/7"), ("site", "plant-1")])
    assert block == b"NATS/1.0\r\nNats-Msg-Id: t/0/7\r\nsite: plant-1\r\n\r\n"
    out = bytearray()
    size = wire.append_pub(out, b"s", b"xy", "r.1", block)
    assert bytes(out) == hpub_cmd("s", "r.1", block, b"xy")
    assert size == len(block) + 2


@pytest.mark.parametrize("name", ["bad key", "k:v", "", " lead", "tab\tname", "ü", "nul\0"])
def test_a_header_name_nats_cannot_carry_fails_the_message(name: str) -> None:
    with pytest.raises(SinkError, match="cannot be carried by NATS") as info:
        wire.encode_headers([("ok", "1"), (name, "x")])
    assert not info.value.retriable


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("line1\r\nline2", "bGluZTENCmxpbmUy"),
        ("\udcff\udcfe", "//4="),  # bytes that are not UTF-8, as a Kafka source decodes them
        (" padded ", "IHBhZGRlZCA="),  # NATS clients strip blanks around a value
        ("nul\0", "bnVsAA=="),
    ],
)
def test_a_value_nats_cannot_carry_verbatim_is_written_as_name_bin(value: str, encoded: str) -> None:
    block = wire.encode_headers([("ok", "plain value"), ("v", value)])
    assert block == b"NATS/1.0\r\nok: plain value\r\nv-bin: " + encoded.encode() + b"\r\n\r\n"


def test_a_name_ending_in_bin_is_encoded_so_that_the_mapping_reverses() -> None:
    assert wire.encode_headers([("x-bin", "a")]) == b"NATS/1.0\r\nx-bin-bin: YQ==\r\n\r\n"


@pytest.mark.parametrize("subject", ["a", "a.b.c", "$KV.b.k", "_INBOX.x.1", "a//b.c", "ü.ö", "a-b_c:d", "x" * 5000])
def test_publishable_subjects(subject: str) -> None:
    assert wire.subject_problem(subject) is None


@pytest.mark.parametrize(
    ("subject", "reason"),
    [
        ("", "empty"),
        ("a..b", "empty token"),
        (".a", "empty token"),
        ("a.", "empty token"),
        ("a b", "whitespace"),
        ("a\tb", "whitespace"),
        ("a\u00a0b", "whitespace"),
        ("a\x01b", "control character"),
        ("a\udcffb", "invalid UTF-8"),
        ("a.*", "wildcard in the token '*'"),
        ("a.>", "wildcard in the token '>'"),
        ("x.a*b.c", "wildcard in the token 'a*b'"),
        ("x.a>", "wildcard in the token 'a>'"),
    ],
)
def test_subjects_nats_server_would_refuse_or_misread(subject: str, reason: str) -> None:
    problem = wire.subject_problem(subject)
    assert problem is not None and reason in problem, problem


@pytest.mark.parametrize("reply", ["", "_INBOX.abcdefghijklmnopqrstuv.123456"])
@pytest.mark.parametrize("headers", [None, [("a", "b")]])
@pytest.mark.parametrize("payload", [b"", b"x" * 12345])
def test_control_line_length_is_exact(reply: str, headers: list[tuple[str, str]] | None, payload: bytes) -> None:
    out = bytearray()
    block = wire.encode_headers(headers) if headers else None
    wire.append_pub(out, b"subject.x", payload, reply, block)
    line = bytes(out[: out.index(b"\r\n") + 2])
    n = wire.control_line_length(9, len(reply), len(block) if block is not None else None, len(payload))
    assert n == len(line), line


@pytest.mark.parametrize(
    ("block", "parsed", "dropped"),
    [
        (b"NATS/1.0\r\na: 1\r\nB: two words \r\n\r\n", {"a": "1", "B": "two words"}, 0),
        (b"Foo: bar\r\n\r\n", {"Foo": "bar"}, 0),  # no NATS/1.0 line: read as headers all the same
        (b"NATS/1.0\r\n: empty name\r\nnocolon\r\nok: 1\r\n\r\n", {"ok": "1"}, 2),
        (b"NATS/1.0", None, 0),  # nats-py raises IndexError on this one, inside its read loop
        (b"NATS/1.0 503\r\n\r\n", {"Status": "503"}, 0),
        (b"NATS/1.0 404 No Messages\r\n\r\n", {"Status": "404", "Description": "No Messages"}, 0),
        (b"NATS/1.0\r\nbad name: x\r\n\xff\xfe: y\r\n\r\n", None, 2),
        (b"NATS/1.0\r\nv: \xff\r\n\r\n", {"v": "\udcff"}, 0),  # the bytes kept, as gateway.routing.headers does
        (b"\r\n\r\n", None, 0),
        (b"", None, 0),
    ],
)
def test_received_header_blocks_never_raise_nor_give_an_empty_name(
    block: bytes, parsed: dict[str, str] | None, dropped: int
) -> None:
    assert wire.parse_headers(block) == (parsed, dropped)


def test_check_names_the_missing_internal() -> None:
    class Bare:
        pass

    with pytest.raises(RuntimeError, match="_send_command"):
        wire.check(Bare())


@pytest.mark.parametrize("reply", ["", "_INBOX.r1"])
@pytest.mark.parametrize("block", [None, b"NATS/1.0\r\nk: v\r\n\r\n"])
def test_a_large_payload_goes_out_uncopied_and_byte_identical(reply: str, block: bytes | None) -> None:
    payload = bytes(range(256)) * 8
    expected = bytearray(b"PUB before 1\r\nx\r\n")
    wire.append_pub(expected, b"subj", payload, reply, block)
    wire.append_pub(expected, b"after", b"y")

    out = bytearray(b"PUB before 1\r\nx\r\n")
    parts: list[bytes | bytearray] = []
    out = wire.append_large_pub(parts, out, b"subj", payload, reply, block)
    wire.append_pub(out, b"after", b"y")
    parts.append(out)

    assert b"".join(parts) == expected
    assert parts[1] is payload  # handed to the socket as it is


async def test_a_cancellation_the_client_swallowed_is_raised_again() -> None:
    """nats-py's ``_flush_pending`` catches ``CancelledError`` and returns: a task cancelled in there must
    stop all the same (a sink writer that went on wedged its session: tests/e2e/test_json_logs.py)."""
    entered = asyncio.Event()
    after: list[str] = []

    async def swallowing() -> None:  # what nats-py's _flush_pending does
        try:
            entered.set()
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass

    async def writer() -> None:
        await swallowing()
        wire.unswallow()
        after.append("went on")

    task = asyncio.ensure_future(writer())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert after == []
    wire.unswallow()  # not cancelled: nothing happens
