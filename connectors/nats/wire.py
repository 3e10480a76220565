"""Batched PUB / HPUB encoding for the NATS sink.

nats-py builds and queues one command per ``publish()`` call (≈2.5 µs per
128-byte message here, including a future per publish whenever its flusher is
idle). The sink instead encodes a whole batch into one buffer and hands it to
the client's write queue once (≈0.6 µs per message, measured the same way;
see loadtests/RESULTS.md). The client still owns the socket, reconnect state,
the flusher and PING/PONG; only two of its internal methods are used, and
:func:`check` fails fast with a clear message if a nats-py release renames them.
"""

from __future__ import annotations

import re
from typing import Any

_HEADER_KEY = re.compile(r"^[!-9;-~]+$")  # printable ASCII without ':' (RFC 7230 token-ish, as nats-server)
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
_HDR_LINE = b"NATS/1.0\r\n"


def check(nc: Any) -> None:
    """Raise if this nats-py client lacks what batched publishing needs."""
    for name in ("_send_command", "_flush_pending"):
        if not callable(getattr(nc, name, None)):
            raise RuntimeError(f"nats-py {type(nc).__module__} has no Client.{name}: pin nats-py>=2.9,<3")


def encode_headers(headers: list[tuple[str, str]] | dict[str, str]) -> bytes:
    """The NATS header block; names a NATS header cannot carry are left out."""
    out = bytearray(_HDR_LINE)
    items = headers.items() if isinstance(headers, dict) else headers
    for key, value in items:
        key = key.strip()
        if not _HEADER_KEY.match(key):
            continue
        out += key.encode()
        out += b": "
        out += value.strip().translate(_NEWLINES).encode()
        out += b"\r\n"
    out += b"\r\n"
    return bytes(out)


def append_pub(out: bytearray, subject: str, payload: bytes, reply: str = "", header_block: bytes | None = None) -> int:
    """Append one PUB (or HPUB) command to ``out``; returns the bytes that count against max_payload."""
    subj = subject.encode()
    if header_block is None:
        if reply:
            out += b"PUB %s %s %d\r\n" % (subj, reply.encode(), len(payload))
        else:
            out += b"PUB %s %d\r\n" % (subj, len(payload))
        out += payload
        out += b"\r\n"
        return len(payload)
    total = len(header_block) + len(payload)
    if reply:
        out += b"HPUB %s %s %d %d\r\n" % (subj, reply.encode(), len(header_block), total)
    else:
        out += b"HPUB %s %d %d\r\n" % (subj, len(header_block), total)
    out += header_block
    out += payload
    out += b"\r\n"
    return total


async def send(nc: Any, out: bytearray) -> None:
    """Hand ``out`` to the client and wait until its flusher wrote it to the socket.

    Waiting matters: nats-py writes a PING straight to the socket while queued
    commands wait for the flusher, so without it the PONG that confirms a batch
    could come back before the batch was even sent.
    """
    await nc._send_command(bytes(out))
    await nc._flush_pending(force_flush=True)


async def barrier(nc: Any, timeout: float) -> None:
    """Until the server processed everything sent so far (queued commands first, then PING/PONG)."""
    await nc._flush_pending(force_flush=True)
    await nc.flush(timeout)
