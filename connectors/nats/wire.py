"""The NATS wire format as the gateway writes and reads it: PUB / HPUB commands, header blocks, subjects.

Writing: nats-py builds and queues one command per ``publish()`` call (≈2.5 µs
per 128-byte message here, including a future per publish whenever its
flusher is idle). The sink instead encodes a whole batch into one buffer and
hands it to the client's write queue once (≈0.6 µs per message, measured the
same way; see loadtests/RESULTS.md). The client still owns the socket,
reconnect state, the flusher and PING/PONG; only two of its internal methods
are used, and :func:`check` fails fast with a clear message if a nats-py
release renames them.

What nats-server closes the connection over is checked before anything is
written (:func:`subject_problem`, :func:`control_line_length`,
:func:`encode_headers`): a message that cannot be carried fails alone.

Reading: :func:`parse_headers` replaces nats-py's header parser (which skips
the first 8 bytes of a block blindly, and raises inside the client's read loop
on a block of exactly ``NATS/1.0``): it never raises and never yields a header
without a valid name.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from gateway.errors import GatewayError, HeaderError
from gateway.routing.headers import BIN_SUFFIX, NATS_UNSAFE, from_bytes, to_text

MAX_CONTROL_LINE = 4096
"""nats-server's default ``max_control_line``; the server's INFO does not tell its own value."""
LINE_SLACK = 94
"""Bytes of an HPUB control line besides its subject, with a reply of up to 64 bytes (a JetStream reply
inbox is 50 at most): ``HPUB `` + ``␠reply`` + two sizes of up to 10 digits + spaces + CRLF."""
REPLY_ROOM = 64

_HEADER_NAME = re.compile(r"[!-9;-~]+")
"""A header name NATS carries: printable ASCII without ':' (RFC 7230 token-ish, what nats-server and the
clients parse back)."""
VALUE_UNSAFE = re.compile(NATS_UNSAFE.pattern + r"|\A[ \t\x0b\x0c]|[ \t\x0b\x0c]\Z")
""":data:`gateway.routing.headers.NATS_UNSAFE`, plus leading or trailing blanks: every NATS client strips them when
it reads a header, so such a value could not cross unchanged either (it is written as ``NAME-bin``)."""
_BLANKS = " \t\x0b\x0c"
_names: set[str] = set()
"""Header names already found valid (names repeat: the check is a set lookup, not a regex per header)."""
_NAMES_KEPT = 1024
_SUBJECT_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f\ud800-\udfff]")
_HDR_LINE = b"NATS/1.0\r\n"
_VERSION = b"NATS/1.0"
_NAME_BYTES = re.compile(rb"[!-9;-~]+")


class UnsupportedClient(GatewayError, RuntimeError):
    """The installed nats-py lacks an internal that batched publishing or header parsing uses: a release the
    gateway does not support. Not a broker problem, so never a :class:`~gateway.errors.ConnectorError`; a
    ``RuntimeError`` as well, which it was before it joined the gateway's error tree."""


def check(nc: Any) -> None:
    """Raise :class:`UnsupportedClient` if this nats-py client lacks what batched publishing and header
    parsing need."""
    library = [k for k in type(nc).__mro__ if k.__module__.startswith("nats.")]  # not our overrides
    for name in ("_send_command", "_flush_pending", "_process_headers", "_build_message", "_close"):
        if not any(callable(vars(k).get(name)) for k in library):
            raise UnsupportedClient(f"nats-py {type(nc).__module__} has no Client.{name}: pin nats-py>=2.9,<3")


def subject_problem(subject: str) -> str | None:
    """Why nats-server would not take ``subject`` for a publish (or a reply), or None.

    Non-empty, no empty tokens, no whitespace or control characters (a space or tab splits the control
    line), valid UTF-8, and no wildcard ``*`` / ``>`` in any token (the README's rule for names).
    """
    if not subject:
        return "the subject is empty"
    bad = _SUBJECT_UNSAFE.search(subject)
    if bad is not None:
        what = "whitespace" if bad.group().isspace() else "a control character or invalid UTF-8"
        return f"{what} ({bad.group()!r}) at position {bad.start()}"
    if "*" in subject or ">" in subject:
        token = next(t for t in subject.split(".") if "*" in t or ">" in t)
        return f"the wildcard in the token {token[:100]!r}"
    if subject[0] == "." or subject[-1] == "." or ".." in subject:
        return "an empty token"
    return None


def control_line_length(subject: int, reply: int, header_block: int | None, payload: int) -> int:
    """Bytes of the ``PUB s [r] n`` / ``HPUB s [r] h t`` control line, CRLF included (sizes in bytes)."""
    n = subject + (1 + reply if reply else 0) + 2  # the subject, the reply, CRLF
    if header_block is None:
        return n + 4 + 1 + len(str(payload))
    return n + 5 + 1 + len(str(header_block)) + 1 + len(str(header_block + payload))


def encode_headers(headers: list[tuple[str, str]] | dict[str, str]) -> bytes:
    """The NATS header block. Raises HeaderError for a name NATS cannot carry; a value it
    cannot carry verbatim is written as ``NAME-bin: base64`` (:func:`gateway.routing.headers.to_text`)."""
    out = [_HDR_LINE]
    names = _names
    items = headers.items() if isinstance(headers, dict) else headers
    for name, value in items:
        if name not in names:
            if _HEADER_NAME.fullmatch(name) is None:
                raise HeaderError(
                    f"header name {name[:100]!r} cannot be carried by NATS (printable ASCII without ':' or spaces)"
                )
            if len(names) >= _NAMES_KEPT:
                names.clear()
            names.add(name)
        if (
            name.endswith(BIN_SUFFIX)
            or NATS_UNSAFE.search(value) is not None
            or (value and (value[0] in _BLANKS or value[-1] in _BLANKS))
        ):
            try:
                name, value = to_text(name, value, VALUE_UNSAFE)
            except UnicodeEncodeError:  # a lone surrogate that no bytes decoded into: neither text nor bytes
                raise HeaderError(
                    f"header {name[:100]!r} cannot be carried by NATS: the value is neither text nor bytes"
                ) from None
        out.append(f"{name}: {value}\r\n".encode())
    out.append(b"\r\n")
    return b"".join(out)


def append_pub(
    out: bytearray, subject: bytes, payload: bytes, reply: str = "", header_block: bytes | None = None
) -> int:
    """Append one PUB (or HPUB) command to ``out``; returns the bytes that count against max_payload."""
    if header_block is None and not reply:  # the common case, inline
        out += b"PUB %s %d\r\n" % (subject, len(payload))
        out += payload
        out += b"\r\n"
        return len(payload)
    total = _command(out, subject, len(payload), reply, header_block)
    out += payload
    out += b"\r\n"
    return total


def _command(out: bytearray, subject: bytes, size: int, reply: str, header_block: bytes | None) -> int:
    """The command line of a PUB or HPUB of a ``size``-byte payload, and its header block."""
    if header_block is None:
        if reply:
            out += b"PUB %s %s %d\r\n" % (subject, reply.encode(), size)
        else:
            out += b"PUB %s %d\r\n" % (subject, size)
        return size
    total = len(header_block) + size
    if reply:
        out += b"HPUB %s %s %d %d\r\n" % (subject, reply.encode(), len(header_block), total)
    else:
        out += b"HPUB %s %d %d\r\n" % (subject, len(header_block), total)
    out += header_block
    return total


LARGE = 1024
"""Payloads from this size on are not copied into the batch's buffer: they go to the socket as they are
(:func:`append_large_pub`), beside the buffer's other commands."""


def append_large_pub(
    parts: list[bytes | bytearray],
    out: bytearray,
    subject: bytes,
    payload: bytes,
    reply: str = "",
    header_block: bytes | None = None,
) -> bytearray:
    """:func:`append_pub` without copying ``payload``: the command line (and header block) end ``out``,
    which goes to ``parts`` with the payload after it; returns the buffer to go on with (its ``\\r\\n``)."""
    _command(out, subject, len(payload), reply, header_block)
    parts.append(out)
    parts.append(payload)
    return bytearray(b"\r\n")


def parse_headers(block: bytes) -> tuple[dict[str, str] | None, int]:
    """A received header block as nats-py presents it (``Status`` / ``Description`` from the status line),
    and how many lines were dropped. Never raises.

    A block without its ``NATS/1.0`` line is read as header lines all the same. A line without ``:``, or
    whose name is empty or not a token, is dropped (counted): no header ever has an empty name. Values
    that are not UTF-8 keep their bytes (``surrogateescape``, as :func:`gateway.routing.headers.from_bytes`).
    """
    out: dict[str, str] = {}
    dropped = 0
    lines = bytes(block).split(b"\r\n")
    first = lines[0]
    if first.startswith(_VERSION):
        del lines[0]
        status = first[len(_VERSION) :].strip()
        if status:
            code, _, description = status.partition(b" ")
            if code.isdigit():
                out["Status"] = code.decode("ascii")
            description = description.strip()
            if description:
                out["Description"] = from_bytes(description)
    for line in lines:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        name = name.strip()
        if not sep or _NAME_BYTES.fullmatch(name) is None:
            dropped += 1
            continue
        out[name.decode("ascii")] = from_bytes(value.strip())
    return out or None, dropped


async def send(nc: Any, parts: list[bytes | bytearray]) -> None:
    """Hand ``parts`` (buffers no one changes any more) to the client and wait until its flusher wrote them to
    the socket, in one ``writelines``: no copy of them is made here.

    Waiting matters: nats-py writes a PING straight to the socket while queued
    commands wait for the flusher, so without it the PONG that confirms a batch
    could come back before the batch was even sent.
    """
    pending = nc._pending
    size = 0
    for part in parts:
        pending.append(part)
        size += len(part)
    nc._pending_data_size += size
    await nc._flush_pending(force_flush=True)
    unswallow()


async def barrier(nc: Any, timeout: float) -> None:
    """Until the server processed everything sent so far (queued commands first, then PING/PONG)."""
    await nc._flush_pending(force_flush=True)
    unswallow()
    await nc.flush(timeout)


def unswallow() -> None:
    """Raise the cancellation nats-py swallowed: its ``_flush_pending`` (under ``publish`` too) catches
    ``CancelledError`` and returns. A session's writer cancelled in there went on writing, then waited for a
    confirmation that its cancelled confirmer would never give: the session never ended and the sink never
    wrote again (seen in connection storms). Call after every await into the client that may flush."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
