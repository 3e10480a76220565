"""The supervisor of ``gateway run --workers N``: N worker processes on one config, kept running.

``gateway run`` checks the config in a full process, then replaces itself (same pid) with
``python -m gateway.pool RUNFILE``: this module, which imports neither the config model nor the per-message
path nor aiohttp, so that the process that only watches stays small (idle RSS ≤ 30 MB; see
docs/decisions/supervisor-http.md). Each worker is ``python -m gateway run --worker K/N`` on the same file: its
own gateway id (``<id>-wK``) and so its own client ids, its own spool directories, its share of the routes as
:mod:`gateway.config.workers` plans them, and a monitoring endpoint on loopback that only the supervisor
uses (a free port, reported through a file, and a token made for this run). The supervisor:

- restarts a worker that exits on its own, after a backoff (0.5 s doubling to 30 s, back to 0.5 s once a
  worker ran a minute), and counts it (``gateway_worker_restarts_total``);
- on SIGHUP has the file checked (by a short-lived ``python -m gateway.workers check``, which also writes the
  copy the workers read), then has every worker reload it; on SIGTERM or SIGINT has every worker drain and
  stop within ``shutdown_timeout`` (a second signal stops them at once);
- serves the one monitoring endpoint of the gateway (:class:`gateway.ops.fleet.FleetMonitor`).

A worker whose supervisor is gone (killed with SIGKILL, say) drains and stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from gateway.ops.fleet import FleetMonitor, WorkerInfo
from gateway.ops.lighthttp import MonitorError
from gateway.util.workerenv import PORT_FILE_ENV, SNAPSHOT_ENV, SUPERVISOR_ENV, TOKEN_ENV

log = structlog.get_logger("gateway.workers")

FIRST_DELAY, MAX_DELAY, HEALTHY_AFTER = 0.5, 30.0, 60.0
"""Restart backoff: the first delay, the longest, and how long a worker runs before the delay starts over."""
KILL_GRACE = 20.0
"""Seconds past ``shutdown_timeout`` the supervisor waits for a worker to stop before it kills it: after its
drain a worker closes its sources and sinks (up to 5 s each) and its endpoint (up to 5 s)."""
RELOAD_GRACE = 30.0
"""Seconds past ``shutdown_timeout`` the supervisor waits for a worker's reload (it may drain replaced routes)."""
HANDLED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
"""The signals the supervisor handles: blocked across the exec into this module until its handlers are set."""
CHECK_TIMEOUT = 120.0
"""Seconds the check of a reloaded file may take (a large file, a slow disk)."""


@dataclass(slots=True)
class Plan:
    """What the supervisor needs of the checked config: written by :mod:`gateway.workers` as the run file."""

    path: str
    """The config file (what SIGHUP re-reads)."""
    count: int
    level: str
    fmt: str
    """``console`` or ``json`` (resolved)."""
    gateway_id: str
    version: str
    shutdown_timeout: float
    directory: str
    """The run's private directory: the run file, the config snapshot, the workers' port files."""
    listen: str = ""
    token: str | None = None
    max_connections: int = 128
    header_timeout: float = 10.0
    partitions: list[str] = field(default_factory=list)
    """Routes whose workers read disjoint parts of the source (their lag adds up)."""
    shard_keys: dict[str, str | None] = field(default_factory=dict)
    """Each route's ``shard_by`` (a reload may not change it)."""
    pid_file: str | None = None

    @property
    def snapshot(self) -> Path:
        return Path(self.directory) / "config.yaml"

    @classmethod
    def read(cls, path: str) -> Plan:
        with open(path, encoding="utf-8") as f:
            return cls(**json.load(f))


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

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.path = plan.path
        self.count = plan.count
        self.gateway_id = plan.gateway_id
        self.version = plan.version
        self.started_at = time.time()
        self.token = secrets.token_urlsafe(24)
        directory = Path(plan.directory)
        self._workers = [Worker(k, directory / f"w{k}.port") for k in range(plan.count)]
        self._partitions = set(plan.partitions)
        self._stopping = asyncio.Event()
        self._reloading = asyncio.Lock()
        """One reload at a time (SIGHUP and POST /reload may come together): each checks and rewrites the copy."""
        self._signals = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.monitor = FleetMonitor(
            self,
            plan.listen,
            self.token,
            reload=self.reload,
            token=plan.token,
            max_connections=plan.max_connections,
            header_timeout=plan.header_timeout,
        )
        """The endpoint; it asks the workers for reloads even when ``gateway.http.listen`` is empty."""

    # -- what the endpoint reads ---------------------------------------------------------------
    def workers(self) -> Sequence[WorkerInfo]:
        return [w.info() for w in self._workers]

    def partitions(self, route: str) -> bool:
        return route in self._partitions

    # -- running ---------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        # Blocked since before the exec (gateway.workers.supervise): what came meanwhile is handled now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        if self.plan.listen:
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
            asyncio.get_running_loop().call_later(self.plan.shutdown_timeout + KILL_GRACE, self._kill)
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
        task.add_done_callback(self._reloaded)

    def _reloaded(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:  # a bug: said, never silent
            log.error("gateway.reload_failed", error=f"{type(exc).__name__}: {exc}")

    async def reload(self) -> tuple[bool, dict[str, Any]]:
        """Have the file checked as the workers will read it (the check writes their copy), then have each
        worker reload it. One reload at a time."""
        async with self._reloading:
            checked = await self._check()
            if checked.get("ok") is not True:
                errors = [str(e) for e in checked.get("errors") or ["the check of the file failed"]]
                for problem in errors:
                    log.error("gateway.reload_invalid", config=self.path, problem=problem)
                return False, {"ok": False, "config": self.path, "errors": errors}
            self.plan.shutdown_timeout = float(checked["shutdown_timeout"])
            self.plan.shard_keys = checked["shard_keys"]
            self._partitions = set(checked["partitions"])
            return await self.monitor.reload_workers(self.plan.shutdown_timeout + RELOAD_GRACE)

    async def _check(self) -> dict[str, Any]:
        """``python -m gateway.workers check``: its JSON verdict (its log lines go to this process's stderr)."""
        plan = self.plan
        args = [*_python(), "gateway.workers", "check", plan.path, str(plan.count), str(plan.snapshot)]
        args += [json.dumps(plan.shard_keys), plan.level, plan.fmt]
        try:
            proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
            )
        except OSError as exc:
            return {"ok": False, "errors": [f"cannot start the check of the file: {exc}"]}
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), CHECK_TIMEOUT)
        except BaseException:  # timed out or cancelled: it must not rewrite the copy after the verdict
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return {"ok": False, "errors": [f"the check of the file took over {CHECK_TIMEOUT:.0f} s"]}
        if proc.returncode != 0:
            return {"ok": False, "errors": [f"the check of the file exited with {proc.returncode} (see the log)"]}
        try:
            verdict = json.loads(out)
        except ValueError:
            verdict = None
        if not isinstance(verdict, dict) or not ("errors" in verdict or {"shard_keys", "partitions"} <= set(verdict)):
            return {"ok": False, "errors": ["the check of the file answered what the supervisor cannot read"]}
        return verdict

    def _command(self, w: Worker) -> list[str]:
        plan = self.plan
        return [
            *_python(),
            "gateway",
            "run",
            "--config",
            plan.path,
            "--worker",
            f"{w.index}/{plan.count}",
            "--log-level",
            plan.level,
            "--log-format",
            plan.fmt,
        ]

    async def _keep(self, w: Worker) -> None:
        """Run worker ``w`` until the supervisor stops, starting it again whenever it exits on its own."""
        delay = FIRST_DELAY
        env = {
            **os.environ,
            TOKEN_ENV: self.token,
            PORT_FILE_ENV: str(w.port_file),
            SNAPSHOT_ENV: str(self.plan.snapshot),
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


def _python() -> list[str]:
    """How to start a module of this package with this interpreter."""
    return [sys.executable, "-m"]


def main(argv: Sequence[str]) -> int:
    """``python -m gateway.pool RUNFILE`` (what ``gateway run --workers N`` becomes once the file is checked;
    the signals it handles are blocked until its handlers are in place)."""
    from gateway.ops.logs import configure

    directory = os.path.dirname(argv[0])
    pid_file: str | None = None
    try:
        plan = Plan.read(argv[0])
        os.unlink(argv[0])  # it holds the endpoint's token
        pid_file = plan.pid_file
        configure(plan.level, plan.fmt)  # type: ignore[arg-type]
        # The default loop: the supervisor moves no messages, and uvloop would cost it ~2 MB.
        return asyncio.run(Pool(plan).run())
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if pid_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(pid_file)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
