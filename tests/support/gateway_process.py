"""Run the real ``gateway`` CLI as a subprocess for end-to-end tests.

Independent of the gateway's Python API: the config is a plain mapping written
to a YAML file, the process is ``python -m gateway run -c FILE --log-format
json``, and readiness is read from its JSON log lines (``connector.connected``
for every connector a route uses). No fixed sleeps: every wait polls the log
with a bounded timeout and fails with the log tail.

    gw = GatewayProcess(tmp_path, config)
    gw.start()                 # or: await gw.astart() inside a test's event loop
    ...
    gw.stop()                  # SIGTERM, asserts exit code 0
    gw.kill()                  # SIGKILL (fault tests)

Each start writes its own log file (``<name>.<n>.log``), so events of one run
are never confused with those of an earlier one.

"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.support.brokers import pdeathsig_preexec
from tests.support.waits import Check, wait_until, wait_until_blocking

REPO = Path(__file__).resolve().parents[2]
"""The repository: the gateway runs from here (``python -m gateway``)."""

Event = dict[str, Any]


class GatewayNotReady(AssertionError):
    """The gateway did not reach the awaited state (exited, a connector failed, or timeout)."""


class GatewayFailed(AssertionError):
    """The gateway process ended badly (non-zero exit, would not stop)."""


def used_connectors(config: Mapping[str, Any]) -> set[str]:
    """Connector names some route reads from or writes to (only those connect)."""
    names: set[str] = set()
    for route in config.get("routes", []):
        names.add(route["from"]["connector"])
        targets = route["to"] if isinstance(route["to"], list) else [route["to"]]
        names.update(t["connector"] for t in targets)
    return names


def parse_log(text: str) -> tuple[list[Event], list[str]]:
    """(JSON events, other lines) of a gateway log."""
    events: list[Event] = []
    other: list[str] = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                other.append(line)
                continue
            if isinstance(obj, dict):
                events.append(obj)
                continue
        if line.strip():
            other.append(line)
    return events, other


class GatewayProcess:
    """One gateway config and the processes started from it (one at a time)."""

    def __init__(
        self,
        workdir: Path,
        config: Mapping[str, Any],
        *,
        name: str = "gateway",
        env: Mapping[str, str] | None = None,
        log_level: str = "info",
        args: Iterable[str] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.config = dict(config)
        self.config_path = self.workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.connectors = used_connectors(self.config)
        self.extra_env = dict(env or {})
        self.log_level = log_level
        self.args = list(args)
        """More ``gateway run`` arguments (``--pid-file`` ...)."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log_path = self.workdir / f"{name}.0.log"
        self.returncodes: list[int] = []
        self._log_file: Any = None
        self._recorded: subprocess.Popen[bytes] | None = None
        self._terminated: subprocess.Popen[bytes] | None = None

    # -- process control -----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running and self.proc is not None else None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gateway",
            "run",
            "-c",
            str(self.config_path),
            "--log-format",
            "json",
            "--log-level",
            self.log_level,
            *self.args,
        ]

    def spawn(self) -> None:
        """Start a new gateway process (the previous one must have ended)."""
        if self.running:
            raise RuntimeError(f"{self.name} already running (pid {self.pid})")
        self._close_log()
        self.starts += 1
        self.log_path = self.workdir / f"{self.name}.{self.starts}.log"
        env = dict(os.environ)
        env.update(self.extra_env)
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed when the process ends
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
            preexec_fn=pdeathsig_preexec(),  # dies with the test process
            close_fds=True,
        )

    def start(self, timeout: float = 30.0, *, wait_for: Iterable[str] | None = None, fail_fast: bool = True) -> None:
        """Spawn and wait until every used connector (or those in ``wait_for``) logged ``connector.connected``."""
        self.spawn()
        self.wait_connected(timeout, wait_for=wait_for, fail_fast=fail_fast)

    async def astart(
        self, timeout: float = 30.0, *, wait_for: Iterable[str] | None = None, fail_fast: bool = True
    ) -> None:
        """:meth:`start` for async tests: spawns from the loop's thread, waits without blocking the loop."""
        self.spawn()
        await self.await_connected(timeout, wait_for=wait_for, fail_fast=fail_fast)

    def terminate(self) -> None:
        """Send SIGTERM once without waiting (a second SIGTERM means "exit now" to the gateway)."""
        proc = self.proc
        if proc is None:
            raise RuntimeError("never started")
        if proc.poll() is None and self._terminated is not proc:
            self._terminated = proc
            proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0, *, expect_rc: int | None = 0) -> int:
        """SIGTERM (unless :meth:`terminate` sent it) and wait; assert the exit code (``None``: any).

        SIGKILL if it will not stop in ``timeout``.
        """
        proc = self.proc
        if proc is None:
            raise RuntimeError("never started")
        self.terminate()
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self._ended(proc)
            raise GatewayFailed(
                f"{self.name} did not exit within {timeout}s of SIGTERM (killed)\n{self.log_tail()}"
            ) from None
        self._ended(proc)
        if expect_rc is not None and rc != expect_rc:
            raise GatewayFailed(f"{self.name} exited with {rc}, expected {expect_rc}\n{self.log_tail()}")
        return rc

    async def astop(self, timeout: float = 30.0, *, expect_rc: int | None = 0) -> int:
        return await asyncio.to_thread(self.stop, timeout, expect_rc=expect_rc)

    def kill(self) -> None:
        """SIGKILL now and reap. Idempotent."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._ended(proc)

    def _ended(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.returncode is not None and proc is not self._recorded:
            self._recorded = proc
            self.returncodes.append(proc.returncode)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def cleanup(self) -> None:
        """Kill whatever is still running (test teardown)."""
        self.kill()

    # -- log -------------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def events(self, name: str | None = None, **fields: Any) -> list[Event]:
        """JSON events of the current run, optionally filtered by event name and field values."""
        evs, _ = parse_log(self.log_text())
        return [
            e for e in evs if (name is None or e.get("event") == name) and all(e.get(k) == v for k, v in fields.items())
        ]

    @property
    def http_url(self) -> str | None:
        """Base URL of the monitoring endpoint of the current run, once it is listening."""
        found = self.events("http.listening")
        return str(found[-1]["url"]).rstrip("/") if found else None

    def problems(self) -> list[str]:
        """Error-level events, tracebacks and stdlib ERROR lines of the current run."""
        evs, other = parse_log(self.log_text())
        found = [json.dumps(e) for e in evs if e.get("level") in ("error", "critical") or "exception" in e]
        found += [line for line in other if line.startswith(("ERROR", "CRITICAL", "Traceback"))]
        return found

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_text().splitlines()
        return f"--- {self.log_path} (last {min(n, len(lines))} of {len(lines)} lines) ---\n" + "\n".join(lines[-n:])

    # -- waiting ---------------------------------------------------------------------------

    def _check_connected(self, wanted: set[str], fail_fast: bool) -> bool:
        evs, _ = parse_log(self.log_text())
        connected = {e.get("connector") for e in evs if e.get("event") == "connector.connected"}
        if wanted <= connected:
            return True
        if fail_fast:
            failed = [
                e
                for e in evs
                if e.get("event") == "connector.connect_failed" and e.get("connector") in wanted - connected
            ]
            if failed:
                raise GatewayNotReady(
                    f"{self.name}: connector {failed[0]['connector']!r} failed to connect: {failed[0].get('error')}\n"
                    f"{self.log_tail()}"
                )
        if not self.running:
            rc = self.proc.returncode if self.proc is not None else None
            raise GatewayNotReady(f"{self.name} exited with {rc} before connecting {sorted(wanted)}\n{self.log_tail()}")
        return False

    def _wanted(self, wait_for: Iterable[str] | None) -> set[str]:
        return set(wait_for) if wait_for is not None else set(self.connectors)

    def wait_connected(
        self, timeout: float = 30.0, *, wait_for: Iterable[str] | None = None, fail_fast: bool = True
    ) -> None:
        wanted = self._wanted(wait_for)
        self.wait_until(lambda: self._check_connected(wanted, fail_fast), timeout, f"connected {sorted(wanted)}")

    async def await_connected(
        self, timeout: float = 30.0, *, wait_for: Iterable[str] | None = None, fail_fast: bool = True
    ) -> None:
        wanted = self._wanted(wait_for)
        await self.await_until(lambda: self._check_connected(wanted, fail_fast), timeout, f"connected {sorted(wanted)}")

    def wait_for_event(self, name: str, timeout: float = 30.0, *, count: int = 1, **fields: Any) -> list[Event]:
        """Until ``count`` events ``name`` (matching ``fields``) were logged; returns them."""
        found: list[Event] = []

        def check() -> bool:
            nonlocal found
            found = self.events(name, **fields)
            return len(found) >= count

        self.wait_until(check, timeout, f"{count} x {name} {fields or ''}")
        return found

    async def await_event(self, name: str, timeout: float = 30.0, *, count: int = 1, **fields: Any) -> list[Event]:
        found: list[Event] = []

        def check() -> bool:
            nonlocal found
            found = self.events(name, **fields)
            return len(found) >= count

        await self.await_until(check, timeout, f"{count} x {name} {fields or ''}")
        return found

    def wait_until(self, check: Callable[[], object], timeout: float, what: str) -> None:
        """Poll ``check``; :class:`GatewayNotReady` with the log tail unless true within ``timeout`` s."""
        wait_until_blocking(check, timeout, lambda: self._not(what), error=GatewayNotReady)

    async def await_until(self, check: Check, timeout: float, what: str) -> None:
        """:meth:`wait_until` for async tests (``check`` may be a coroutine function)."""
        await wait_until(check, timeout, lambda: self._not(what), error=GatewayNotReady)

    def _not(self, what: str) -> str:
        return f"{self.name}: not {what}\n{self.log_tail()}"

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<GatewayProcess {self.name} {state} {self.config_path}>"


async def routez(http_url: str | None) -> dict[str, dict[str, Any]]:
    """The gateway's ``/routez``, by route name."""
    assert http_url is not None, "the gateway has no HTTP endpoint"
    async with aiohttp.ClientSession() as http, http.get(http_url + "/routez") as resp:
        body: dict[str, Any] = await resp.json()
    return {r["name"]: r for r in body["routes"]}


def run_cli(
    *args: str, timeout: float = 30.0, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m gateway ARGS`` to completion (validate, version, a run expected to exit at once)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=full_env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
