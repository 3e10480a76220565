"""A route's store-and-forward spool: an append-only log on local disk, replayed in order.

Layout of a spool directory (one per route)::

    LOCK                      flock'ed while a gateway uses the spool (one user at a time)
    COMMIT                    the committed offset: everything before it was delivered
    00000000000000000000.log  segments, named by the logical offset of their first byte
    00000000000016777216.log

A record is ``length (u32) | crc32 (u32) | body`` with a msgpack body
``[topic, payload, headers, key]``. Offsets are logical byte positions across
segments. On open, the log is read from the committed offset; a torn tail
(a crash in the middle of a write) is cut off at the last whole record.
Segments wholly before the committed offset are deleted.

The spool itself does no I/O scheduling: the route's writer calls
:meth:`Spool.write` (in a thread: it may fsync) and its reader calls
:meth:`Spool.read`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import zlib
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from gateway.core.envelope import Envelope, Headers
from gateway.errors import GatewayError

_HEADER = struct.Struct("<II")
_SEGMENT_SUFFIX = ".log"
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(tuple[str, bytes, list[tuple[str, str]] | None, bytes | None]).decode


class SpoolError(GatewayError):
    """The spool directory cannot be used (locked by another process, unreadable, not a spool)."""


class Entry:
    """One record read back: its envelope parts and where it ends (what committing it means)."""

    __slots__ = ("end", "headers", "key", "payload", "topic")

    def __init__(self, topic: str, payload: bytes, headers: Headers | None, key: bytes | None, end: int) -> None:
        self.topic = topic
        self.payload = payload
        self.headers = headers
        self.key = key
        self.end = end


class Spool:
    """An append-only, segmented log with a committed read offset. Not thread-safe: one writer call at a time."""

    def __init__(self, path: str | Path, *, max_bytes: int, segment_bytes: int = 16 * 1024 * 1024, fsync: bool = True):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.segment_bytes = max(64 * 1024, min(segment_bytes, max_bytes // 4 or segment_bytes))
        self.fsync = fsync
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = (self.path / "LOCK").open("a+b")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise SpoolError(f"spool {self.path} is in use by another process") from None
        self.committed = self._read_commit()
        self._segments: list[int] = sorted(int(p.stem) for p in self.path.glob(f"*{_SEGMENT_SUFFIX}"))
        self.end = self._recover()
        self._write_fd: int | None = None
        self._read_pos = self.committed
        self._read_file: Any = None
        self._read_base = -1
        self._saved_commit = self.committed
        self.records = sum(1 for _ in self._scan(self.committed))
        """Records between the committed offset and the end (the backlog), counted at open and kept up to date."""

    # -- state ----------------------------------------------------------------------------------
    @property
    def backlog_bytes(self) -> int:
        """Bytes written and not yet committed (what counts against ``max_bytes``)."""
        return self.end - self.committed

    @property
    def unread(self) -> bool:
        return self._read_pos < self.end

    def full(self, incoming: int = 0) -> bool:
        return self.backlog_bytes + incoming > self.max_bytes

    # -- writing --------------------------------------------------------------------------------
    @staticmethod
    def encode(env: Envelope) -> bytes:
        body = _encode((env.topic, env.payload, env.headers, env.key))
        return _HEADER.pack(len(body), zlib.crc32(body)) + body

    def write(self, records: list[bytes]) -> int:
        """Append encoded records in one write; they are readable when this returns. Returns the file
        descriptor written, for the caller to fsync (in a thread) when ``fsync`` is set."""
        fd = self._writer()
        data = b"".join(records)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
        except OSError:
            os.ftruncate(fd, self.end - self._segments[-1])  # no partial record stays behind
            raise
        self.end += len(data)
        self.records += len(records)
        return fd

    def _writer(self) -> int:
        if self._write_fd is not None and self.end - self._segments[-1] >= self.segment_bytes:
            os.close(self._write_fd)  # the previous write's fsync is done: the writer waits for it
            self._write_fd = None
        if self._write_fd is None:
            if self.end - self._segments[-1] >= self.segment_bytes:
                self._segments.append(self.end)
            self._write_fd = os.open(self._segment_path(self._segments[-1]), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        return self._write_fd

    # -- reading --------------------------------------------------------------------------------
    def read(self, limit: int) -> list[Entry]:
        """Up to ``limit`` records after the last one read."""
        out: list[Entry] = []
        while len(out) < limit and self._read_pos < self.end:
            base = self._segment_of(self._read_pos)
            if self._read_base != base:
                if self._read_file is not None:
                    self._read_file.close()
                self._read_file = self._segment_path(base).open("rb")
                self._read_base = base
            f = self._read_file
            f.seek(self._read_pos - base)
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:  # the end of this segment: the next one starts here
                self._read_pos = self._next_segment(base)
                continue
            length, _ = _HEADER.unpack(header)
            body = f.read(length)
            self._read_pos += _HEADER.size + length
            topic, payload, headers, key = _decode(body)
            out.append(Entry(topic, payload, headers, key, self._read_pos))
        return out

    def rewind(self) -> None:
        """Read again from the committed offset (what was read and not committed comes back)."""
        self._read_pos = self.committed

    def skip(self) -> Entry | None:
        """Drop the oldest unread record (``overflow: drop_oldest``); returns it, or None."""
        entries = self.read(1)
        return entries[0] if entries else None

    # -- committing -----------------------------------------------------------------------------
    def commit(self, offset: int, records: int) -> None:
        """``records`` more records, up to ``offset``, were delivered: they leave the backlog."""
        self.committed = offset
        self.records -= records

    def save_commit(self) -> None:
        """Persist the committed offset and delete segments wholly before it."""
        if self.committed == self._saved_commit:
            return
        tmp = self.path / "COMMIT.tmp"
        tmp.write_bytes(struct.pack("<QI", self.committed, zlib.crc32(self.committed.to_bytes(8, "little"))))
        os.replace(tmp, self.path / "COMMIT")
        self._saved_commit = self.committed
        while len(self._segments) > 1 and self._segments[1] <= self.committed:
            base = self._segments.pop(0)
            if base == self._read_base and self._read_file is not None:
                self._read_file.close()
                self._read_file, self._read_base = None, -1
            with contextlib.suppress(FileNotFoundError):
                self._segment_path(base).unlink()

    def close(self) -> None:
        self.save_commit()
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None
        if self._read_file is not None:
            self._read_file.close()
            self._read_file = None
        self._lock.close()

    # -- open and recovery ----------------------------------------------------------------------
    def _segment_path(self, base: int) -> Path:
        return self.path / f"{base:020d}{_SEGMENT_SUFFIX}"

    def _segment_of(self, offset: int) -> int:
        base = self._segments[0]
        for b in self._segments:
            if b > offset:
                break
            base = b
        return base

    def _next_segment(self, base: int) -> int:
        i = self._segments.index(base)
        return self._segments[i + 1] if i + 1 < len(self._segments) else self.end

    def _read_commit(self) -> int:
        try:
            raw = (self.path / "COMMIT").read_bytes()
        except FileNotFoundError:
            return 0
        if len(raw) != 12:
            raise SpoolError(f"spool {self.path}: COMMIT is damaged")
        offset, crc = struct.unpack("<QI", raw)
        if zlib.crc32(offset.to_bytes(8, "little")) != crc:
            raise SpoolError(f"spool {self.path}: COMMIT is damaged")
        return int(offset)

    def _recover(self) -> int:
        """The end offset after cutting a torn tail off the last segment."""
        if not self._segments:
            self._segments = [self.committed]
            self._segment_path(self.committed).touch()
            return self.committed
        for base in self._segments[:-1]:
            size = self._segment_path(base).stat().st_size
            nxt = self._segments[self._segments.index(base) + 1]
            if base + size != nxt:
                raise SpoolError(f"spool {self.path}: segment {base} does not reach the next one")
        last = self._segments[-1]
        path = self._segment_path(last)
        good = 0
        with path.open("rb") as f:
            data = f.read()
        while good + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, good)
            body = data[good + _HEADER.size : good + _HEADER.size + length]
            if len(body) < length or zlib.crc32(body) != crc:
                break
            good += _HEADER.size + length
        if good < len(data):
            with path.open("r+b") as f:
                f.truncate(good)
        return last + good

    def _scan(self, start: int) -> Iterator[int]:
        """End offsets of the records from ``start`` (used once at open to count the backlog)."""
        saved = self._read_pos, self._read_file, self._read_base
        self._read_pos, self._read_file, self._read_base = start, None, -1
        try:
            while entries := self.read(1024):
                yield from (e.end for e in entries)
        finally:
            if self._read_file is not None:
                self._read_file.close()
            self._read_pos, self._read_file, self._read_base = saved


class Pending:
    """Read records whose delivery is not yet confirmed, in read order; the committed prefix advances."""

    __slots__ = ("_done", "_ends")

    def __init__(self) -> None:
        self._ends: deque[int] = deque()
        self._done: set[int] = set()

    def add(self, end: int) -> None:
        self._ends.append(end)

    def done(self, end: int) -> tuple[int, int] | None:
        """Mark one record delivered; (new committed offset, records committed) if the prefix moved."""
        self._done.add(end)
        ends = self._ends
        count = 0
        last = -1
        while ends and ends[0] in self._done:
            last = ends.popleft()
            self._done.discard(last)
            count += 1
        return (last, count) if count else None

    def clear(self) -> None:
        self._ends.clear()
        self._done.clear()

    def __len__(self) -> int:
        return len(self._ends)
