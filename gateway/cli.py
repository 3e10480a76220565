"""``gateway run | validate | explain | version`` (also ``python -m gateway``).

Exit codes: 0 success, 1 runtime failure, 2 invalid config or usage.
A user mistake prints what is wrong, one line per problem, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gateway import __version__
from gateway.config import Config, load_config
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.monitor import Monitor

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="Bridge MQTT, NATS and Kafka under config-file routes.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway until SIGTERM/SIGINT")
    run.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "console"],
        help="auto: console on a TTY, JSON lines otherwise",
    )

    val = sub.add_parser("validate", help="check a config file; exit 2 and list every problem if invalid")
    val.add_argument("-c", "--config", required=True, metavar="FILE")

    exp = sub.add_parser("explain", help="show which routes a topic matches and what their targets render to")
    exp.add_argument("-c", "--config", required=True, metavar="FILE")
    exp.add_argument("--from", dest="connector", required=True, metavar="CONNECTOR", help="source connector name")
    exp.add_argument("topic", help="topic or subject as the source broker spells it")

    sub.add_parser("version", help="print the version")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"gateway {__version__}")
        return EXIT_OK
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(
            f"{args.config}: invalid config ({len(exc.issues)} problem{'s' if len(exc.issues) != 1 else ''}):",
            file=sys.stderr,
        )
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "validate":
        print(f"{args.config}: ok ({len(config.connectors)} connectors, {len(config.routes)} routes)")
        return EXIT_OK
    if args.command == "explain":
        return _explain(config, args.connector, args.topic)
    return _run(config, args.log_level, args.log_format)


def _explain(config: Config, connector: str, topic: str) -> int:
    from gateway.app import build_routes
    from gateway.dispatch import Dispatcher
    from gateway.registry import plugins

    if connector not in config.connectors:
        print(f"unknown connector {connector!r} (connectors: {', '.join(sorted(config.connectors))})", file=sys.stderr)
        return EXIT_CONFIG
    kind = config.kind(connector)
    routes = [r for r in build_routes(config).values() if r.source == connector]
    plan = Dispatcher(plugins()[kind].syntax, routes).plan(topic)
    print(f"{topic!r} from {connector} ({kind}): {len(plan)} route{'s' if len(plan) != 1 else ''}")
    for rp in plan:
        route = rp.route
        patterns = ", ".join(p.text for p in route.patterns)
        print(f"  route {route.name} (from {patterns})")
        for d in (*rp.deliveries, *((rp.dead_letter,) if rp.dead_letter else ())):
            t = d.target
            tkind = config.kind(t.connector)
            if d.error is not None:
                print(f"    -> {t.connector} ({tkind}): cannot render: {d.error}")
                continue
            key = f" key={d.key.decode(errors='replace')!r}" if d.key is not None else ""
            arrow = "-> dead letter:" if t.index < 0 else "->"
            print(f"    {arrow} {t.connector} ({tkind}) {t.spec.address_key}={d.address!r}{key}")
    return EXIT_OK


def _run(config: Config, level: str, fmt: str) -> int:
    from gateway.logs import configure

    configure(level, fmt)  # type: ignore[arg-type]
    try:
        import uvloop
    except ImportError:  # pure-Python installs run on the default loop
        return asyncio.run(_serve(config))
    return uvloop.run(_serve(config))


async def _serve(config: Config) -> int:
    import structlog

    from gateway.app import Gateway
    from gateway.monitor import Monitor, MonitorError

    log = structlog.get_logger("gateway")
    gw = Gateway(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("gateway.signal", signal=signal.Signals(signum).name, action="drain and stop")
            stop.set()
        else:
            log.warning("gateway.signal", signal=signal.Signals(signum).name, action="exit now")
            raise SystemExit(EXIT_FAILURE)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    monitor: Monitor | None = None
    if config.gateway.http.listen:
        monitor = Monitor(gw, config.gateway.http.listen)
        try:
            await monitor.start()
        except MonitorError as exc:
            log.error("gateway.failed", error=str(exc))
            return EXIT_FAILURE
    try:
        return await _until_stopped(gw, stop)
    finally:
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
