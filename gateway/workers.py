"""``gateway run --workers N``, the side that reads config: the file checked, the supervisor started.

The supervisor itself is :mod:`gateway.pool`, a process that imports nothing of the config model, the
per-message path or aiohttp: :func:`supervise` checks the file in this (full) process, writes what the
supervisor needs (a run file, the copy of the config text the workers read) into a private directory, and
replaces this process with ``python -m gateway.pool`` (the same pid: signals, pid files and service managers
see no change). On each reload the supervisor runs ``python -m gateway.workers check``, this module again,
for a short while. Also here, what a worker does for its supervisor (:func:`report_port`, :func:`watch_parent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from gateway import __version__
from gateway.config import Config, parse_config
from gateway.config.workers import plan
from gateway.errors import ConfigError, ConfigIssue
from gateway.pool import HANDLED, Plan
from gateway.util.workerenv import PORT_FILE_ENV, SUPERVISOR_ENV

log = structlog.get_logger("gateway.workers")


def supervise(config: Config, text: str, path: str, count: int, *, level: str, fmt: str, pid_file: str | None) -> int:
    """Become the supervisor of ``count`` workers on ``config`` (the checked ``text`` of ``path``): never returns
    unless the run cannot start (1, the reason logged)."""
    http = config.gateway.http
    try:
        token = http.bearer() if http.listen else None
    except OSError as exc:
        log.error("gateway.failed", error=f"cannot read gateway.http.token_file: {exc.strerror or exc}")
        return 1
    directory = tempfile.mkdtemp(prefix="gateway-workers-")
    run = Plan(
        path=path,
        count=count,
        level=level,
        fmt=fmt,
        gateway_id=config.gateway.id,
        version=__version__,
        shutdown_timeout=config.gateway.shutdown_timeout,
        directory=directory,
        listen=http.listen,
        token=token,
        max_connections=http.max_connections,
        header_timeout=http.header_timeout,
        partitions=_partitions(config, count),
        shard_keys=_shard_keys(config),
        pid_file=pid_file,
    )
    runfile = Path(directory) / "run.json"
    try:
        write_snapshot(run.snapshot, text)
        fd = os.open(runfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(run), f)
        if pid_file is not None:
            Path(pid_file).write_text(f"{os.getpid()}\n")  # the same pid once this process is the supervisor
        sys.stdout.flush()
        sys.stderr.flush()
        # A signal between here and the supervisor's handlers waits (the mask survives the exec).
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        os.execv(sys.executable, [sys.executable, "-m", "gateway.pool", str(runfile)])  # noqa: S606 - no shell
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        shutil.rmtree(directory, ignore_errors=True)
        if pid_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(pid_file)
        log.error("gateway.failed", error=f"cannot start the supervisor: {exc}")
        return 1


def write_snapshot(snapshot: Path, text: str) -> None:
    """The copy of the config text the workers read (written whole to a file of its own, then renamed)."""
    fd, tmp = tempfile.mkstemp(dir=snapshot.parent, prefix=snapshot.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, snapshot)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _partitions(config: Config, count: int) -> list[str]:
    return [s.route for s in plan(config, count) if s.mode == "partitions"]


def _shard_keys(config: Config) -> dict[str, str | None]:
    return {rc.name: rc.section.shard_by for rc in config.routes}


def check(path: str, count: int, snapshot: Path, shard_keys: Mapping[str, str | None]) -> dict[str, object]:
    """A reload's check of ``path`` for the supervisor (:meth:`gateway.pool.Pool.reload`): on success the
    workers' copy is rewritten and the verdict carries what the supervisor keeps of the config."""
    try:
        text, config = read_config(path)
        partitions = _partitions(config, count)
        same_keys(shard_keys, config)
    except ConfigError as exc:
        return {"ok": False, "errors": [str(i) for i in exc.issues]}
    write_snapshot(snapshot, text)
    return {
        "ok": True,
        "partitions": partitions,
        "shard_keys": _shard_keys(config),
        "shutdown_timeout": config.gateway.shutdown_timeout,
    }


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


def same_keys(before: Mapping[str, str | None], new: Config) -> None:
    """A reload may not change how a route's keys map to workers (``before``: each route's ``shard_by``): the
    workers apply it one after another, and meanwhile a key could be nobody's (acknowledged by every worker,
    forwarded by none)."""
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


def _main(argv: Sequence[str]) -> int:
    """``python -m gateway.workers check PATH COUNT SNAPSHOT SHARD_KEYS LEVEL FORMAT``: the verdict as JSON on
    stdout (log lines on stderr)."""
    from gateway.ops.logs import configure

    if len(argv) != 7 or argv[0] != "check":
        print("usage: python -m gateway.workers check PATH COUNT SNAPSHOT SHARD_KEYS LEVEL FORMAT", file=sys.stderr)
        return 2
    _, path, count, snapshot, keys, level, fmt = argv
    configure(level, fmt)  # type: ignore[arg-type]
    print(json.dumps(check(path, int(count), Path(snapshot), json.loads(keys))))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
