"""``gateway run | validate | explain | reload | version`` (also ``python -m gateway``).

Exit codes: 0 success, 1 runtime failure, 2 invalid config or usage.
A user mistake prints what is wrong, one line per problem, never a traceback.
``validate --json`` and ``explain --json`` print one JSON document on stdout
instead (errors as ``{path, message}``), with the same exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from gateway import __version__
from gateway.config import Config, load_config, parse_config
from gateway.config.workers import Split, for_worker, plan, worker_count
from gateway.core.shard import shard_of
from gateway.errors import ConfigError, ConfigIssue
from gateway.util.workerenv import SNAPSHOT_ENV, TOKEN_ENV

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.ops.monitor import Monitor

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="Bridge MQTT, NATS and Kafka under config-file routes.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway until SIGTERM/SIGINT; SIGHUP reloads the config file")
    run.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    run.add_argument("--pid-file", metavar="FILE", help="write the process id here (for `gateway reload`)")
    run.add_argument(
        "--workers",
        type=_workers_arg,
        metavar="N",
        help="worker processes under one supervisor (a number, or auto: one per core); default gateway.workers",
    )
    run.add_argument("--worker", type=_slot_arg, help=argparse.SUPPRESS)  # K/N: a worker started by the supervisor
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "console"],
        help="auto: console on a TTY, JSON lines otherwise",
    )

    val = sub.add_parser("validate", help="check a config file; exit 2 and list every problem if invalid")
    val.add_argument("-c", "--config", required=True, metavar="FILE")
    val.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout")
    val.add_argument(
        "--workers", type=_workers_arg, metavar="N", help="show the split over N workers (default: the file's)"
    )

    exp = sub.add_parser("explain", help="show which routes a topic matches and what their targets render to")
    exp.add_argument("-c", "--config", required=True, metavar="FILE")
    exp.add_argument("--from", dest="connector", required=True, metavar="CONNECTOR", help="source connector name")
    exp.add_argument("topic", help="topic or subject as the source broker spells it")
    exp.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout")
    exp.add_argument(
        "--workers", type=_workers_arg, metavar="N", help="show the split over N workers (default: the file's)"
    )

    rel = sub.add_parser("reload", help="make a running gateway reload its config file")
    how = rel.add_mutually_exclusive_group(required=True)
    how.add_argument("--pid-file", metavar="FILE", help="send SIGHUP to the process named in this file")
    how.add_argument("--url", metavar="URL", help="POST /reload to this monitoring endpoint; prints the outcome")
    rel.add_argument(
        "--token-file",
        metavar="FILE",
        help="with --url: file holding gateway.http.token (default: $GATEWAY_HTTP_TOKEN, if set)",
    )

    sub.add_parser("version", help="print the version")
    return p


def _workers_arg(text: str) -> int | str:
    if text == "auto":
        return text
    if text.isdigit() and 1 <= int(text) <= 256:
        return int(text)
    raise argparse.ArgumentTypeError("a number of processes from 1 to 256, or auto")


def _slot_arg(text: str) -> tuple[int, int]:
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise argparse.ArgumentTypeError("K/N")
    return int(k), int(n)


def _print_problems(source: str, exc: ConfigError) -> None:
    print(
        f"{source}: invalid config ({len(exc.issues)} problem{'s' if len(exc.issues) != 1 else ''}):", file=sys.stderr
    )
    for issue in exc.issues:
        print(f"  {issue}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"gateway {__version__}")
        return EXIT_OK
    if args.command in ("validate", "explain") and args.json:
        return _json_report(args)
    if args.command == "reload":
        return _signal_reload(args.pid_file, args.url, args.token_file)
    slot = getattr(args, "worker", None)
    try:
        config = load_config(args.config) if slot is None else _worker_base(args.config, slot[0])
        count = worker_count(args.workers or config.gateway.workers) if slot is None else slot[1]
        splits = plan(config, count)
        if slot is not None:
            config = for_worker(config, slot[0], slot[1], http_token=os.environ.get(TOKEN_ENV, ""))
    except ConfigError as exc:
        _print_problems(args.config, exc)
        return EXIT_CONFIG
    if args.command == "validate":
        companions = sum(1 for rc in config.routes if rc.request is not None and rc.request.replies_for)
        routes = f"{len(config.routes) - companions} routes" + (f" + {companions} for replies" if companions else "")
        print(f"{args.config}: ok ({len(config.connectors)} connectors, {routes})")
        if count > 1:
            print(f"split over {count} workers:")
            for s in splits:
                print(f"  route {s.route}: {s.how}; order kept: {s.order}")
        return EXIT_OK
    if args.command == "explain":
        return _explain(config, args.connector, args.topic, {s.route: s for s in splits}, count)
    if slot is None and count > 1:
        return _supervise(config, count, args.log_level, args.log_format, args.config, args.pid_file)
    return _run(config, args.log_level, args.log_format, args.config, args.pid_file, worker=slot)


def _explain(config: Config, connector: str, topic: str, splits: dict[str, Split], count: int) -> int:
    if connector not in config.connectors:
        print(_unknown_connector(config, connector), file=sys.stderr)
        return EXIT_CONFIG
    report = _explanation(config, config.source, connector, topic, splits, count)
    n = len(report.routes)
    print(f"{topic!r} from {connector} ({report.kind}): {n} route{'s' if n != 1 else ''}")
    for route in report.routes:
        print(f"  route {route.name} (from {', '.join(route.patterns)})")
        split = splits.get(route.name)
        if split is not None and count > 1:
            print(f"    over {count} workers: {split.how}; order kept: {split.order}")
            if route.shard_key is not None:
                print(f"    key {route.shard_key!r}: forwarded by worker {route.worker}")
        for d in (*route.targets, *((route.dead_letter,) if route.dead_letter is not None else ())):
            if d.error is not None:
                print(f"    -> {d.connector} ({d.kind}): cannot render: {d.error}")
                continue
            key = f" key={d.key!r}" if d.key is not None else ""
            arrow = "-> dead letter:" if d is route.dead_letter else "->"
            print(f"    {arrow} {d.connector} ({d.kind}) {d.address_key}={d.address!r}{key}")
    return EXIT_OK


# -- --json output of validate and explain ------------------------------------------------------


class _Issue(msgspec.Struct, frozen=True):
    path: str
    """Key path of the problem (``routes[0].to.subject``); empty for the file as a whole."""
    message: str


class _Invalid(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = False
    config: str
    errors: list[_Issue]


class _ConnectorInfo(msgspec.Struct, frozen=True):
    name: str
    kind: str


class _Split(msgspec.Struct, frozen=True, kw_only=True):
    mode: str
    """``partitions``, ``broker``, ``sharded``, ``one`` (worker 0 only) or ``each`` (see docs/scaling.md)."""
    how: str
    order: str


class _RouteInfo(msgspec.Struct, frozen=True, kw_only=True, rename={"from_": "from"}):
    name: str
    from_: str
    to: list[str]
    dead_letter: str | None
    split: _Split


class _Valid(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = True
    config: str
    sha256: str
    connectors: list[_ConnectorInfo]
    routes: list[_RouteInfo]
    workers: int


class _Rendered(msgspec.Struct, frozen=True, kw_only=True):
    connector: str
    kind: str
    address_key: str
    address: str | None
    """The rendered topic or subject; null when it cannot be rendered (see ``error``)."""
    key: str | None
    error: str | None


class _RouteMatch(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    patterns: list[str]
    targets: list[_Rendered]
    dead_letter: _Rendered | None
    split: _Split | None = None
    shard_key: str | None = None
    """A sharded route (``shard_by``): this topic's key; ``worker`` is the worker that forwards it."""
    worker: int | None = None


class _Explanation(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = True
    config: str
    sha256: str
    connector: str
    kind: str
    topic: str
    routes: list[_RouteMatch]


def _unknown_connector(config: Config, connector: str) -> str:
    return f"unknown connector {connector!r} (connectors: {', '.join(sorted(config.connectors))})"


def _explanation(
    config: Config, source: str, connector: str, topic: str, splits: dict[str, Split] | None = None, count: int = 1
) -> _Explanation:
    from gateway.app import build_routes
    from gateway.config.registry import plugins
    from gateway.core.dispatch import Dispatcher
    from gateway.core.flight import Delivery, RoutePlan
    from gateway.errors import TemplateError

    def rendered(d: Delivery) -> _Rendered:
        t = d.target
        return _Rendered(
            connector=t.connector,
            kind=config.kind(t.connector),
            address_key=t.spec.address_key,
            # {payload.FIELD} templates render per message: shown as written
            address=(d.address if d.match is None else t.address.text) if d.error is None else None,
            key=(
                t.key.text
                if d.match is not None and t.key is not None
                else d.key.decode(errors="replace")
                if d.key is not None and d.error is None
                else None
            ),
            error=str(d.error) if d.error is not None else None,
        )

    def key_of(rp: RoutePlan) -> str | None:
        """The shard key of ``topic`` on a sharded route (with several workers), else None."""
        keys = shard_keys.get(rp.route.name)
        if keys is None or rp.match is None or count < 2:
            return None
        try:
            return keys[0].render(rp.match)
        except TemplateError:
            return None

    shard_keys = {rc.name: rc.shard_key for rc in config.routes if rc.shard_key is not None}
    kind = config.kind(connector)
    routes = [r for r in build_routes(config).values() if r.source == connector]
    plan = Dispatcher(plugins()[kind].syntax, routes).plan(topic)
    return _Explanation(
        config=source,
        sha256=config.digest,
        connector=connector,
        kind=kind,
        topic=topic,
        routes=[
            _RouteMatch(
                name=rp.route.name,
                patterns=[p.text for p in rp.route.patterns],
                targets=[rendered(d) for d in rp.deliveries],
                dead_letter=rendered(rp.dead_letter) if rp.dead_letter is not None else None,
                split=_split_info(splits[rp.route.name]) if splits and rp.route.name in splits else None,
                shard_key=(key := key_of(rp)),
                worker=shard_of(key, count) if key is not None else None,
            )
            for rp in plan
        ],
    )


def _split_info(s: Split) -> _Split:
    return _Split(mode=s.mode, how=s.how, order=s.order)


def _json_report(args: argparse.Namespace) -> int:
    """``validate --json`` / ``explain --json``: one JSON document on stdout, whatever happens; exit 0 or 2."""
    report: _Valid | _Invalid | _Explanation
    try:
        config = load_config(args.config)
        count = worker_count(args.workers or config.gateway.workers)
        splits = {s.route: s for s in plan(config, count)}
    except ConfigError as exc:
        report = _Invalid(config=args.config, errors=[_Issue(i.path, i.message) for i in exc.issues])
    except UnicodeDecodeError as exc:
        report = _Invalid(
            config=args.config,
            errors=[_Issue("", f"cannot read {args.config}: not UTF-8 text ({exc.reason} at byte {exc.start})")],
        )
    else:
        if args.command == "validate":
            report = _Valid(
                config=args.config,
                sha256=config.digest,
                connectors=[_ConnectorInfo(name, config.kind(name)) for name in config.connectors],
                routes=[
                    _RouteInfo(
                        name=r.name,
                        from_=r.source.connector,
                        to=[t.spec.connector for t in r.targets],
                        dead_letter=r.dead_letter.spec.connector if r.dead_letter is not None else None,
                        split=_split_info(splits[r.name]),
                    )
                    for r in config.routes
                ],
                workers=count,
            )
        elif args.connector not in config.connectors:
            report = _Invalid(config=args.config, errors=[_Issue("", _unknown_connector(config, args.connector))])
        else:
            report = _explanation(config, args.config, args.connector, args.topic, splits, count)
    print(json.dumps(msgspec.to_builtins(report), indent=2))  # ASCII: safe on any stdout encoding
    return EXIT_CONFIG if isinstance(report, _Invalid) else EXIT_OK


def _signal_reload(pid_file: str | None, url: str | None, token_file: str | None = None) -> int:
    """``gateway reload``: SIGHUP by pid file, or POST /reload and print the outcome."""
    if pid_file is not None:
        try:
            pid = int(Path(pid_file).read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError) as exc:
            print(f"cannot signal the gateway named in {pid_file}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"sent SIGHUP to {pid}; the gateway logs gateway.reloaded (or gateway.reload_invalid)")
        return EXIT_OK
    assert url is not None
    try:
        token = (
            Path(token_file).read_text(encoding="utf-8").strip() if token_file else os.environ.get("GATEWAY_HTTP_TOKEN")
        )
    except OSError as exc:
        print(f"cannot read {token_file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url.rstrip("/") + "/reload", method="POST", headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:  # noqa: S310
            body = resp.read().decode()
    except urllib.error.HTTPError as exc:
        print(exc.read().decode(), file=sys.stderr)
        return EXIT_CONFIG if exc.code == 400 else EXIT_FAILURE
    except OSError as exc:
        print(f"cannot reach the gateway at {url}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(body)
    return EXIT_OK


def _loop_run(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pure-Python installs run on the default loop
        return asyncio.run(main)
    return uvloop.run(main)


def _run(
    config: Config, level: str, fmt: str, path: str, pid_file: str | None, worker: tuple[int, int] | None = None
) -> int:
    from gateway.ops.logs import configure

    configure(level, fmt)  # type: ignore[arg-type]
    if worker is not None:
        import structlog

        structlog.contextvars.bind_contextvars(worker=worker[0])
    if pid_file is not None:
        Path(pid_file).write_text(f"{os.getpid()}\n")
    try:
        return _loop_run(_serve(config, path, worker))
    finally:
        if pid_file is not None:
            with contextlib.suppress(OSError):
                Path(pid_file).unlink()


def _supervise(config: Config, count: int, level: str, fmt: str, path: str, pid_file: str | None) -> int:
    """``gateway run`` with several workers: the file checked once more (as the workers will read it), then this
    process becomes their supervisor (:mod:`gateway.workers`, :mod:`gateway.pool`)."""
    from gateway.ops.logs import configure, resolved_format
    from gateway.workers import read_config, supervise

    configure(level, fmt)  # type: ignore[arg-type]
    try:
        text, config = read_config(path)  # the text the workers will read: checked once more, as it is now
        plan(config, count)
    except ConfigError as exc:
        _print_problems(path, exc)
        return EXIT_CONFIG
    return supervise(config, text, path, count, level=level, fmt=resolved_format(fmt), pid_file=pid_file)


async def reload_from(gw: Gateway, path: str, worker: tuple[int, int] | None = None) -> tuple[bool, dict[str, Any]]:
    """Read and check ``path``, then apply it; an invalid file changes nothing (each problem is logged)."""
    import structlog

    from gateway.app import GatewayState

    log = structlog.get_logger("gateway")
    try:
        # Off the event loop: a large file is read and checked while the routes keep moving messages.
        config = await asyncio.to_thread(_load_for, path, worker)
        if gw.state is not GatewayState.RUNNING:
            why = f"the gateway is {gw.state.value}: nothing to reload"
            log.warning("gateway.reload_refused", config=path, reason=why)
            return False, {"ok": False, "config": path, "errors": [why]}
        summary = await gw.reload(config)  # ConfigError: a connector or route cannot be set up; nothing changed
    except ConfigError as exc:
        for issue in exc.issues:
            log.error("gateway.reload_invalid", config=path, problem=str(issue))
        return False, {"ok": False, "config": path, "errors": [str(i) for i in exc.issues]}
    return True, {"ok": True, "config": path, "sha256": config.digest, **summary}


def _worker_base(path: str, index: int) -> Config:
    """What worker ``index`` reads: the supervisor's copy of the text it checked last (the file at ``path``
    when run by hand), with relative paths from ``path``'s directory; its gateway id ends in ``-w<index>``."""
    snapshot = os.environ.get(SNAPSHOT_ENV)
    if not snapshot:
        return load_config(path, worker=index)
    try:
        text = Path(snapshot).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read the supervisor's copy {snapshot}: {exc}")]) from None
    return parse_config(text, source=path, base_dir=Path(path).parent, worker=index)


def _load_for(path: str, worker: tuple[int, int] | None) -> Config:
    """The config at ``path``, as worker ``worker`` (index, count) runs it when given."""
    if worker is None:
        return load_config(path)
    config = _worker_base(path, worker[0])
    return for_worker(config, worker[0], worker[1], http_token=os.environ.get(TOKEN_ENV, ""))


async def _serve(config: Config, path: str, worker: tuple[int, int] | None = None) -> int:
    import structlog

    from gateway.app import Gateway
    from gateway.ops.logs import install_loop_handler
    from gateway.ops.monitor import Monitor, MonitorError

    log = structlog.get_logger("gateway")
    gw = Gateway(config)
    loop = asyncio.get_running_loop()
    install_loop_handler(loop)  # what asyncio and threads would print raw goes out as log lines
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("gateway.signal", signal=signal.Signals(signum).name, action="drain and stop")
            stop.set()
        elif worker is not None:
            # A worker may get the stop twice (its supervisor's SIGTERM and the service manager's, sent to every
            # process of the unit): it keeps draining; the supervisor kills it when that has to end now.
            log.info("gateway.signal", signal=signal.Signals(signum).name, action="already draining")
        else:
            log.warning("gateway.signal", signal=signal.Signals(signum).name, action="exit now")
            raise SystemExit(EXIT_FAILURE)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    reloads: set[asyncio.Task[Any]] = set()

    def on_hangup() -> None:
        log.info("gateway.signal", signal="SIGHUP", action="reload", config=path)
        task = asyncio.ensure_future(reload_from(gw, path, worker))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    monitor: Monitor | None = None
    if config.gateway.http.listen:
        try:
            token = config.gateway.http.bearer()
        except OSError as exc:
            log.error("gateway.failed", error=f"cannot read gateway.http.token_file: {exc.strerror or exc}")
            return EXIT_FAILURE
        http = config.gateway.http
        monitor = Monitor(
            gw,
            http.listen,
            reload=lambda: reload_from(gw, path, worker),
            token=token,
            max_connections=http.max_connections,
            header_timeout=http.header_timeout,
            internal=worker is not None,
        )
        try:
            await monitor.start()
        except MonitorError as exc:
            log.error("gateway.failed", error=str(exc))
            return EXIT_FAILURE
    orphan: asyncio.Task[None] | None = None
    if worker is not None:
        from gateway.workers import report_port, watch_parent

        if monitor is not None:
            report_port(monitor.port)
        orphan = asyncio.ensure_future(watch_parent(stop))
    try:
        return await _until_stopped(gw, stop)
    finally:
        if orphan is not None:
            orphan.cancel()
        if monitor is not None:
            await monitor.stop()


async def _until_stopped(gw: Gateway, stop: asyncio.Event) -> int:
    import structlog

    log = structlog.get_logger("gateway")
    await gw.start()
    waiter = asyncio.ensure_future(gw.wait())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if waiter.done():
        exc = waiter.exception()
        log.error("gateway.failed", error=repr(exc))
        return EXIT_FAILURE
    waiter.cancel()
    drained = await gw.stop()
    return EXIT_OK if drained else EXIT_FAILURE
