"""``gateway run --workers N``: one supervisor process keeping N worker processes on one config.

Each worker is ``python -m gateway run --worker K/N`` on the same file: its own gateway id (``<id>-wK``) and
so its own client ids, its own spool directories, its share of the routes as
:mod:`gateway.config.workers` plans them, and a monitoring endpoint on loopback that only the supervisor
uses (a free port, reported through a file, and a token made for this run). The supervisor:

- restarts a worker that exits on its own, after a backoff (0.5 s doubling to 30 s, back to 0.5 s once a
  worker ran a minute), and counts it (``gateway_worker_restarts_total``);
- on SIGHUP checks the file, then has every worker reload it; on SIGTERM or SIGINT has every worker drain
  and stop within ``shutdown_timeout`` (a second signal stops them at once);
- serves the one monitoring endpoint of the gateway (:class:`gateway.ops.fleet.FleetMonitor`).

A worker whose supervisor is gone (killed with SIGKILL, say) drains and stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from gateway.config import Config, parse_config
from gateway.config.workers import SNAPSHOT_ENV, TOKEN_ENV, Split, plan
from gateway.errors import ConfigError, ConfigIssue
from gateway.ops.endpoint import MonitorError
from gateway.ops.fleet import FleetMonitor, WorkerInfo

log = structlog.get_logger("gateway.workers")

PORT_FILE_ENV = "GATEWAY_WORKER_PORT_FILE"
"""Where a worker writes the port its endpoint bound."""
SUPERVISOR_ENV = "GATEWAY_SUPERVISOR_PID"
"""The supervisor's pid: a worker whose parent is another process drains and stops."""
FIRST_DELAY, MAX_DELAY, HEALTHY_AFTER = 0.5, 30.0, 60.0
"""Restart backoff: the first delay, the longest, and how long a worker runs before the delay starts over."""
KILL_GRACE = 20.0
"""Seconds past ``shutdown_timeout`` the supervisor waits for a worker to stop before it kills it: after its
drain a worker closes its sources and sinks (up to 5 s each) and its endpoint (up to 5 s)."""
RELOAD_GRACE = 30.0
"""Seconds past ``shutdown_timeout`` the supervisor waits for a worker's reload (it may drain replaced routes)."""


class Worker:
    """One worker process and what the supervisor knows of it."""

    def __init__(self, index: int, port_file: Path) -> None:
        self.index = index
        self.port_file = port_file
        self.process: asyncio.subprocess.Process | None = None
        self.port: int | None = None
        self.state = "starting"
        self.restarts = 0
        self.started_at: float | None = None
        self.last_exit: int | None = None

    def info(self) -> WorkerInfo:
        pid = self.process.pid if self.process is not None and self.process.returncode is None else None
        return WorkerInfo(self.index, pid, self.port, self.state, self.restarts, self.started_at, self.last_exit)

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)


class Pool:
    """The supervisor: its workers, their restarts, the signals and the endpoint."""

    def __init__(self, config: Config, text: str, path: str, count: int, *, level: str, fmt: str) -> None:
        self.config = config
        self.path = path
        self.count = count
        self.level = level
        self.fmt = fmt
        self.gateway_id = config.gateway.id
        self.started_at = time.time()
        self.token = secrets.token_urlsafe(24)
        self._dir = tempfile.TemporaryDirectory(prefix="gateway-workers-")
        self._workers = [Worker(k, Path(self._dir.name) / f"w{k}.port") for k in range(count)]
        self._splits: dict[str, Split] = {s.route: s for s in plan(config, count)}
        self._stopping = asyncio.Event()
        self._signals = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.snapshot = Path(self._dir.name) / "config.yaml"
        """What the workers read: the text of the file as last checked (at start, at each good reload), so that
        a worker restarted after the file was edited runs what the others run."""
        self._write_snapshot(text)
        http = config.gateway.http
        self.monitor = FleetMonitor(
            self,
            http.listen,
            self.token,
            reload=self.reload,
            max_connections=http.max_connections,
            header_timeout=http.header_timeout,
        )
        """The endpoint; it asks the workers for reloads even when ``gateway.http.listen`` is empty."""

    def _write_snapshot(self, text: str) -> None:
        tmp = self.snapshot.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(self.snapshot)

    # -- what the endpoint reads ---------------------------------------------------------------
    def workers(self) -> Sequence[WorkerInfo]:
        return [w.info() for w in self._workers]

    def partitions(self, route: str) -> bool:
        split = self._splits.get(route)
        return split is not None and split.mode == "partitions"

    # -- running ---------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        http = self.config.gateway.http
        if http.listen:
            try:
                token = http.bearer()
            except OSError as exc:
                log.error("gateway.failed", error=f"cannot read gateway.http.token_file: {exc.strerror or exc}")
                return 1
            self.monitor.set_token(token)
            try:
                await self.monitor.start()
            except MonitorError as exc:
                log.error("gateway.failed", error=str(exc))
                return 1
        log.info("workers.started", workers=self.count, config=self.path, supervisor_pid=os.getpid())
        try:
            keepers = [asyncio.create_task(self._keep(w), name=f"worker-{w.index}") for w in self._workers]
            await asyncio.gather(*keepers)
        finally:
            await self.monitor.stop()
            self._dir.cleanup()
        failed = [w.index for w in self._workers if w.last_exit not in (0, None)]
        log.info("workers.stopped", failed=failed)
        return 1 if failed else 0

    def _on_stop(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            log.info("gateway.signal", signal=name, action="drain and stop every worker")
            self._stopping.set()
            for w in self._workers:
                w.state = "stopping"
                w.signal(signal.SIGTERM)
            # A worker that has not stopped by then is killed (its own drain gives up at shutdown_timeout).
            asyncio.get_running_loop().call_later(self.config.gateway.shutdown_timeout + KILL_GRACE, self._kill)
        else:
            log.warning("gateway.signal", signal=name, action="stop every worker now")
            for w in self._workers:
                w.signal(signal.SIGKILL)

    def _kill(self) -> None:
        for w in self._workers:
            if w.process is not None and w.process.returncode is None:
                log.warning("worker.killed", worker=w.index, reason="still running after shutdown_timeout")
                w.signal(signal.SIGKILL)

    def _on_hangup(self) -> None:
        log.info("gateway.signal", signal="SIGHUP", action="reload every worker", config=self.path)
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> tuple[bool, dict[str, Any]]:
        """Check the file as the workers will read it, then have each worker reload it."""
        try:
            text, config = await asyncio.to_thread(read_config, self.path)
            splits = await asyncio.to_thread(plan, config, self.count)
            same_keys(self.config, config)
        except ConfigError as exc:
            for issue in exc.issues:
                log.error("gateway.reload_invalid", config=self.path, problem=str(issue))
            return False, {"ok": False, "config": self.path, "errors": [str(i) for i in exc.issues]}
        self._write_snapshot(text)
        self.config = config
        self._splits = {s.route: s for s in splits}
        return await self.monitor.reload_workers(config.gateway.shutdown_timeout + RELOAD_GRACE)

    def _command(self, w: Worker) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gateway",
            "run",
            "--config",
            self.path,
            "--worker",
            f"{w.index}/{self.count}",
            "--log-level",
            self.level,
            "--log-format",
            self.fmt,
        ]

    async def _keep(self, w: Worker) -> None:
        """Run worker ``w`` until the supervisor stops, starting it again whenever it exits on its own."""
        delay = FIRST_DELAY
        env = {
            **os.environ,
            TOKEN_ENV: self.token,
            PORT_FILE_ENV: str(w.port_file),
            SNAPSHOT_ENV: str(self.snapshot),
            SUPERVISOR_ENV: str(os.getpid()),
        }
        while not self._stopping.is_set():
            with contextlib.suppress(FileNotFoundError):
                w.port_file.unlink()
            w.port = None
            w.state = "starting"
            w.started_at = time.time()
            # A session of its own: a terminal's Ctrl-C reaches the supervisor only, which stops the workers.
            w.process = await asyncio.create_subprocess_exec(
                *self._command(w), env=env, stdin=asyncio.subprocess.DEVNULL, start_new_session=True
            )
            if self._stopping.is_set():  # the stop signal came while it was being started
                w.signal(signal.SIGTERM)
            log.info("worker.started", worker=w.index, pid=w.process.pid, restarts=w.restarts)
            reported = asyncio.create_task(self._await_port(w))
            rc = await w.process.wait()
            reported.cancel()
            w.port = None
            w.last_exit = rc
            if self._stopping.is_set():
                w.state = "stopped"
                log.info("worker.stopped", worker=w.index, exit_code=rc)
                return
            ran = time.time() - w.started_at
            delay = FIRST_DELAY if ran >= HEALTHY_AFTER else delay
            w.state = "restarting"
            w.restarts += 1
            log.warning("worker.exited", worker=w.index, exit_code=rc, ran_seconds=round(ran, 1), restart_in=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, MAX_DELAY)
        w.state = "stopped"

    async def _await_port(self, w: Worker) -> None:
        """Poll for the port the worker reports once its endpoint is up."""
        pause = 0.02
        while True:
            try:
                text = w.port_file.read_text().strip()
            except FileNotFoundError:
                text = ""
            if text.isdigit():
                w.port = int(text)
                w.state = "running"
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)


def report_port(port: int) -> None:
    """In a worker: tell the supervisor the port of this worker's endpoint (written whole, then renamed)."""
    target = os.environ.get(PORT_FILE_ENV)
    if not target:
        return
    tmp = Path(target + ".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(target)


def read_config(path: str) -> tuple[str, Config]:
    """The text of the config file and what it says (ConfigError when it is not valid)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue("", f"cannot read {path}: {exc}")]) from None
    return text, parse_config(text, source=path, base_dir=Path(path).parent)


def same_keys(old: Config, new: Config) -> None:
    """A reload may not change how a route's keys map to workers: the workers apply it one after another, and
    meanwhile a key could be nobody's (acknowledged by every worker, forwarded by none)."""
    before = {rc.name: rc.section.shard_by for rc in old.routes}
    issues = [
        ConfigIssue(f"route {rc.name!r}", "shard_by changed: restart the gateway to apply it (a reload cannot)")
        for rc in new.routes
        if rc.name in before and before[rc.name] != rc.section.shard_by
    ]
    if issues:
        raise ConfigError(issues)


async def watch_parent(stop: asyncio.Event, every: float = 1.0) -> None:
    """In a worker: set ``stop`` once the supervisor that started it is gone (the worker drains and exits)."""
    parent = int(os.environ.get(SUPERVISOR_ENV) or os.getppid())
    while not stop.is_set():
        if os.getppid() != parent:
            log.warning("worker.orphaned", supervisor_pid=parent, action="drain and stop")
            stop.set()
            return
        await asyncio.sleep(every)
