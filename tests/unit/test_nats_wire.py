"""The NATS sink's batched encoding produces what nats-py itself would send."""

from __future__ import annotations

import pytest
from nats.protocol.command import hpub_cmd, pub_cmd

from connectors.nats import wire


@pytest.mark.parametrize("reply", ["", "_INBOX.abc.1"])
def test_pub_matches_nats_py(reply: str) -> None:
    out = bytearray()
    size = wire.append_pub(out, "a.b.c", b"hello", reply)
    # nats-py writes two spaces where the reply is empty; the server reads either.
    assert bytes(out) == pub_cmd("a.b.c", reply, b"hello").replace(b"a.b.c  5", b"a.b.c 5")
    assert size == 5


def test_hpub_matches_nats_py_header_format() -> None:
    block = wire.encode_headers([("Nats-Msg-Id", "t/0/7"), ("site", "plant-1")])
    assert block == b"NATS/1.0\r\nNats-Msg-Id: t/0/7\r\nsite: plant-1\r\n\r\n"
    out = bytearray()
    size = wire.append_pub(out, "s", b"xy", "r.1", block)
    assert bytes(out) == hpub_cmd("s", "r.1", block, b"xy")
    assert size == len(block) + 2


def test_headers_a_nats_server_would_refuse_are_left_out() -> None:
    block = wire.encode_headers([("bad key", "x"), ("k:v", "y"), ("ok", "line1\r\nline2")])
    assert block == b"NATS/1.0\r\nok: line1  line2\r\n\r\n"


def test_check_names_the_missing_internal() -> None:
    class Bare:
        pass

    with pytest.raises(RuntimeError, match="_send_command"):
        wire.check(Bare())
