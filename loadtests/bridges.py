"""The bridges under test, as processes: our gateway and the peer (mq-bridge), with RSS/CPU sampling."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests.support.brokers import pdeathsig_preexec

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / "loadtests" / ".venv-peer" / "bin" / "python"
PEER_RUNNER = ROOT / "loadtests" / "peer" / "run_mqbridge.py"


@dataclass
class Endpoints:
    """Where the brokers are, and the names one measurement uses."""

    mqtt_port: int
    nats_url: str
    kafka: str
    u: str

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    # source and sink names
    @property
    def mqtt_src(self) -> str:
        return f"lt/src/{self.u}"

    @property
    def mqtt_dst(self) -> str:
        return f"lt/dst/{self.u}"

    @property
    def nats_src(self) -> str:
        return f"lt.src.{self.u}"

    @property
    def nats_dst(self) -> str:
        return f"lt.dst.{self.u}"

    @property
    def js_stream(self) -> str:
        return f"LTSRC{self.u}"

    @property
    def js_subject(self) -> str:
        return f"lt.js.{self.u}"

    @property
    def kafka_src(self) -> str:
        return f"lt-src-{self.u}"

    @property
    def kafka_dst(self) -> str:
        return f"lt-dst-{self.u}"

    @property
    def client_id(self) -> str:
        return f"lt-bridge-{self.u}"


class Sampler:
    """Peak RSS and CPU seconds of a process, sampled every 100 ms."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak_rss = 0
        self._task: asyncio.Task[None] | None = None

    def _tree(self) -> list[psutil.Process]:
        """The process and its children (a gateway with several workers: the supervisor and the workers)."""
        try:
            return [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:
            return [self.proc]

    def rss(self) -> int:
        """Resident memory of the whole process tree."""
        total = 0
        for p in self._tree():
            with contextlib.suppress(psutil.Error):
                total += int(p.memory_info().rss)
        return total

    def own_rss(self) -> int:
        """Resident memory of the process itself (a supervisor without its workers)."""
        try:
            return int(self.proc.memory_info().rss)
        except psutil.Error:
            return 0

    def cpu(self) -> float:
        """CPU seconds of the whole process tree (children that exited are not counted)."""
        total = 0.0
        for p in self._tree():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += float(t.user + t.system)
        return total

    def start(self) -> None:
        async def loop() -> None:
            while True:
                self.peak_rss = max(self.peak_rss, self.rss())
                await asyncio.sleep(0.1)

        self._task = asyncio.create_task(loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


class BridgeProcess:
    """A running bridge: ``kind`` is "gateway" or "peer"."""

    def __init__(self, kind: str, argv: list[str], workdir: Path, *, ready_events: int = 0) -> None:
        self.kind = kind
        self.argv = argv
        self.workdir = workdir
        self.ready_events = ready_events
        self.log_path = workdir / f"{kind}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.sampler: Sampler | None = None

    async def start(self, timeout: float = 60) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        out = subprocess.PIPE if self.kind == "peer" else log
        # Dies with the harness, even when the harness is killed.
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=log, cwd=ROOT, preexec_fn=pdeathsig_preexec())
        log.close()
        self.sampler = Sampler(self.proc.pid)
        self.sampler.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}: {self.tail()}")
            if await self._is_ready():
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.kind} not ready after {timeout} s: {self.tail()}")

    async def _is_ready(self) -> bool:
        if self.kind == "peer":
            assert self.proc is not None and self.proc.stdout is not None
            line = await asyncio.to_thread(self.proc.stdout.readline)
            return bool(line) and json.loads(line).get("ready") is True
        connected = 0
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"connector.connected"' in line:
                connected += 1
        return connected >= self.ready_events

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def stop(self, timeout: float = 20) -> int:
        if self.sampler is not None:
            self.sampler.stop()
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc is not None else 0
        proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return await asyncio.to_thread(proc.wait)


def gateway_process(route: str, ep: Endpoints, workdir: Path) -> BridgeProcess:
    """Our gateway running one route of the harness, from a generated config file."""
    config, connectors = gateway_config(route, ep)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "gateway.yaml"
    path.write_text(config)
    argv = [sys.executable, "-m", "gateway", "run", "-c", str(path), "--log-format", "json"]
    return BridgeProcess("gateway", argv, workdir, ready_events=connectors * workers_of(route))


def peer_process(route: str, ep: Endpoints, workdir: Path) -> BridgeProcess:
    src, dst, dst2 = peer_names(route, ep)
    argv = [
        str(PEER_PYTHON),
        str(PEER_RUNNER),
        "--route",
        route,
        "--mqtt-url",
        ep.mqtt_url,
        "--nats-url",
        ep.nats_url,
        "--kafka",
        ep.kafka,
        "--src",
        src,
        "--dst",
        dst,
        "--client-id",
        ep.client_id,
    ]
    if dst2:
        argv += ["--dst2", dst2]
    if route.startswith("jetstream"):
        argv += ["--src-subject", ep.js_subject]
    return BridgeProcess("peer", argv, workdir)


def peer_available() -> bool:
    return PEER_PYTHON.exists() and PEER_RUNNER.exists() and os.access(PEER_PYTHON, os.X_OK)


def peer_names(route: str, ep: Endpoints) -> tuple[str, str, str]:
    source, _, sink = route.partition("_to_")
    src = {
        "kafka": ep.kafka_src,
        "jetstream": ep.js_stream,
        "corenats": ep.nats_src,
        "mqtt": ep.mqtt_src,
        "fanout": ep.mqtt_src,
    }[source if route != "fanout_mqtt" else "fanout"]
    if route == "fanout_mqtt":
        return src, ep.kafka_dst, ep.nats_dst
    dst = {"kafka": ep.kafka_dst, "nats": ep.nats_dst, "mqtt": ep.mqtt_dst}[sink]
    return src, dst, ""


def base_route(name: str) -> str:
    """The route a variant runs: ``mqtt_to_kafka_kafkadriver_aiokafka``, ``mqtt_to_kafka_spool``,
    ``mqtt_to_kafka_keyed_workers_2`` are ``mqtt_to_kafka`` with other gateway settings."""
    name = name.partition("_workers_")[0].removesuffix("_keyed")
    return name.partition("_kafkadriver_")[0].partition("_compression_")[0].removesuffix("_spool")


def workers_of(route: str) -> int:
    """``*_workers_N``: N gateway worker processes."""
    _, _, n = route.partition("_workers_")
    return int(n) if n else 1


def gateway_config(route: str, ep: Endpoints) -> tuple[str, int]:
    """YAML for one harness route, and how many connectors it uses (``*_kafkadriver_aiokafka``: that Kafka
    driver; ``*_compression_none``: that producer codec; ``*_spool``: the route stores and forwards through a
    spool, fsync on)."""
    workers = workers_of(route)
    route = route.partition("_workers_")[0]
    keyed = route.endswith("_keyed")
    route = route.removesuffix("_keyed")
    spooled = route.endswith("_spool")
    route, _, codec = route.removesuffix("_spool").partition("_compression_")
    route, _, driver = route.partition("_kafkadriver_")
    connectors: dict[str, dict[str, Any]] = {
        "mqtt": {
            "type": "mqtt",
            "url": ep.mqtt_url,
            "client_id": ep.client_id,
        },
        "nats": {"type": "nats", "servers": [ep.nats_url]},
        # Tansu: no producer ids (idempotent off), group joins after half the session timeout, and an
        # empty fetch is held for the whole fetch_max_wait_ms even when records arrive meanwhile.
        "kafka": {
            "type": "kafka",
            "bootstrap_servers": [ep.kafka],
            "idempotent": False,
            "session_timeout_ms": 6000,
            "fetch_max_wait_ms": 2,
            "driver": driver or "confluent",
            **({"compression": codec} if codec else {}),
        },
    }
    sources = {
        "kafka": {"connector": "kafka", "topic": ep.kafka_src, "group": f"lt-{ep.u}"},
        "jetstream": {"connector": "nats", "stream": ep.js_stream, "subject": ep.js_subject, "durable": f"lt{ep.u}"},
        "corenats": {"connector": "nats", "subject": ep.nats_src},
        "mqtt": {"connector": "mqtt", "topic": ep.mqtt_src, "qos": 1},
    }
    sinks = {
        "kafka": {"connector": "kafka", "topic": ep.kafka_dst},
        "nats": {"connector": "nats", "subject": ep.nats_dst},
        "mqtt": {"connector": "mqtt", "topic": ep.mqtt_dst, "qos": 1},
    }
    if route == "fanout_mqtt":
        frm, to = sources["mqtt"], [sinks["kafka"], sinks["nats"]]
    else:
        source, _, sink = route.partition("_to_")
        frm, to = sources[source], [sinks[sink]]
    used = {frm["connector"], *(t["connector"] for t in to)}
    doc: dict[str, Any] = {
        "gateway": {"id": f"lt-{ep.u}", "shutdown_timeout": 10, "http": {"listen": "127.0.0.1:0"}},
        "connectors": {k: v for k, v in connectors.items() if k in used},
        "routes": [{"name": route, "from": frm, "to": to}],
    }
    if keyed:  # one key per device topic; with several workers each forwards its keys (per-key order kept)
        frm["topic"] = f"{ep.mqtt_src}/{{device}}"
        doc["routes"][0]["shard_by"] = "{device}"
    if workers > 1:
        doc["gateway"]["workers"] = workers
        if not keyed and frm["connector"] != "kafka":  # the broker splits it round-robin: no order kept
            doc["routes"][0]["order"] = "none"
    if spooled:
        spool_dir = tempfile.mkdtemp(prefix="lt-spool-")
        doc["routes"][0]["spool"] = {"path": spool_dir, "max_bytes": 4 * 1024 * 1024 * 1024}
    return json.dumps(doc, indent=1), len(used)
