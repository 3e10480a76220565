"""The load-test harness: every route through the gateway and through the peer, beside the broker limits.

    .venv/bin/python -m loadtests.run             # full run (~20 min): writes loadtests/RESULTS.md
    .venv/bin/python -m loadtests.run --quick     # one small pass, no peer: a smoke test of the harness

It starts its own Mosquitto, nats-server (JetStream) and Tansu on free
loopback ports, prints progress as it goes, and ends with a table and a chart.
Raw results are JSON lines (``loadtests/results.jsonl``); ``RESULTS.md`` and
``throughput.png`` are generated from them. Never part of the pass/fail tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtests import report, router_bench  # noqa: E402
from loadtests.bridges import peer_available  # noqa: E402
from loadtests.drivers import kafka_reader_check  # noqa: E402
from loadtests.profile import summarize  # noqa: E402
from loadtests.scenarios import (  # noqa: E402
    BY_NAME,
    ROUTES,
    Brokers,
    Route,
    direct_throughput,
    latency,
    throughput,
)
from tests.support.brokers import Mosquitto, NatsServer, Tansu  # noqa: E402

OUT = ROOT / "loadtests"


class Run:
    def __init__(self, args: argparse.Namespace, brokers: Brokers, out: Path) -> None:
        self.args = args
        self.brokers = brokers
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.out = out
        self.jsonl = (out / "results.jsonl").open("w")

    def record(self, kind: str, row: dict[str, Any]) -> None:
        row = {"test": kind, **row}
        self.rows.append(row)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

    def say(self, route: str, phase: str, detail: str = "") -> None:
        elapsed = time.monotonic() - self.t0
        print(f"[{elapsed:6.0f}s] {route:<20} {phase:<22} {detail}", flush=True)

    async def main(self) -> None:
        a = self.args
        self.say("router", "micro-benchmark")
        for row in router_bench.run():
            self.record("router", row)
            self.say("router", f"{row['rules']:>7} rules", f"{row['us_per_trie_lookup']} µs per trie lookup")
        for sink in ("kafka", "nats", "mqtt"):
            self.say(f"direct {sink}", "broker limit")
            row = await direct_throughput(sink, self.brokers, n=a.n, size=128)
            self.record("direct", row)
            self.say(f"direct {sink}", "broker limit", f"{row['end_to_end_msgs_s']:,} msgs/s end to end")
        kinds = ["gateway"] + (["peer"] if a.peer else [])
        routes: list[Route] = [BY_NAME[r] for r in a.routes] if a.routes else ROUTES
        for route in routes:
            for kind in kinds:
                if kind == "peer" and route.gateway_only:
                    continue
                await self.route(kind, route)
        if a.profile:
            await self.profile(BY_NAME[a.profile])
        self.jsonl.close()

    async def profile(self, route: Route) -> None:
        """py-spy on the gateway during one more throughput run of ``route``; the summary goes in RESULTS.md."""
        path = self.out / "profile.txt"
        self.say(route.name, "gateway profile", "py-spy")
        row = await throughput(
            "gateway", route, self.brokers, n=self.args.n, size=128, progress=lambda m: None, profile=path
        )
        self.record(
            "profile", {"route": route.name, "steady_msgs_s": row.get("steady_msgs_s"), "summary": summarize(path, 15)}
        )

    async def route(self, kind: str, route: Route) -> None:
        a = self.args

        def count(base: int) -> int:
            return max(1_000, round(base * (1.0 if a.fixed else route.scale)))

        plan = [(128, count(a.n))] * a.repeats
        if a.n_large:
            plan += [(4096, count(a.n_large))] * a.repeats_large
        if a.n_huge and route.huge:
            plan += [(65536, count(a.n_huge))] * a.repeats_large
        for i, (size, n) in enumerate(plan):
            label = f"{kind} {size} B #{i + 1}"
            try:
                row = await throughput(
                    kind,
                    route,
                    self.brokers,
                    n=n,
                    size=size,
                    progress=lambda m, label=label: self.say(route.name, label, m),
                )
            except Exception as exc:  # a failing bridge is a result, not the end of the run
                row = {"kind": kind, "route": route.name, "size": size, "n": n, "error": repr(exc)}
            self.record("throughput", row)
            self.say(route.name, label, _summary(row))
        for rate in a.rates:
            try:
                row = await latency(
                    kind,
                    route,
                    self.brokers,
                    rate=rate,
                    seconds=a.latency_seconds,
                    size=128,
                    progress=lambda m: self.say(route.name, f"{kind} latency", m),
                )
            except Exception as exc:
                row = {"kind": kind, "route": route.name, "rate": rate, "error": repr(exc)}
            self.record("latency", row)
            self.say(
                route.name,
                f"{kind} latency {rate:,.0f}/s",
                f"p50 {row.get('p50_ms')} ms p99 {row.get('p99_ms')} ms (added p99 {row.get('added_p99_ms')} ms)",
            )


def _summary(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"ERROR {row['error'][:120]}"
    return (
        f"{row['steady_msgs_s']:,} msgs/s steady, {row['received']}/{row['n']} received, "
        f"peak RSS {row['peak_rss_mb']} MB, {row['cpu_s_per_100k']} CPU s/100k"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small counts, one repeat, no peer")
    p.add_argument("--routes", nargs="*", choices=[r.name for r in ROUTES])
    p.add_argument("--no-peer", dest="peer", action="store_false")
    p.add_argument(
        "--n",
        type=int,
        default=400_000,
        help="messages per 128-byte throughput run, times the route's scale (steady windows of seconds)",
    )
    p.add_argument("--n-large", type=int, default=60_000, help="messages per 4 KiB run, times the scale (0 to skip)")
    p.add_argument(
        "--n-huge", type=int, default=3_000, help="messages per 64 KiB run on the main routes, times the scale"
    )
    p.add_argument("--fixed", action="store_true", help="the same counts on every route (no per-route scale)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--repeats-large", type=int, default=3, help="runs per 4 KiB and 64 KiB measurement")
    p.add_argument("--rates", type=float, nargs="*", default=[1000.0, 5000.0])
    p.add_argument("--latency-seconds", type=float, default=4.0)
    p.add_argument(
        "--profile",
        default="mqtt_to_nats",
        choices=[r.name for r in ROUTES] + [""],
        help="route to profile the gateway on with py-spy at the end ('' to skip)",
    )
    args = p.parse_args()
    if args.quick:
        args.n, args.n_large, args.n_huge, args.repeats, args.peer, args.latency_seconds = (
            20_000,
            2_000,
            0,
            1,
            False,
            2.0,
        )
        args.repeats_large, args.fixed = 1, True
        args.profile = ""
    if args.peer and not peer_available():
        print("peer (mq-bridge) not installed: run loadtests/peer/setup_venv.sh, or pass --no-peer", file=sys.stderr)
        return 2
    chosen = [BY_NAME[r] for r in args.routes] if args.routes else ROUTES
    if args.peer and any("kafka" in r.sinks and not r.gateway_only for r in chosen):
        try:
            kafka_reader_check()  # the peer writes lz4 batches: a reader that cannot decode them counts 0
        except RuntimeError as exc:
            print(f"{exc}, or pass --no-peer", file=sys.stderr)
            return 2
    command = "python -m loadtests.run " + " ".join(sys.argv[1:])
    # Only a full run (every route, with the peer) replaces RESULTS.md; others write under out/.
    if args.quick:
        out = OUT / "out" / "quick"
    elif args.routes or not args.peer:
        out = OUT / "out" / "partial"
    else:
        out = OUT
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="loadtest-"))
    started = dt.datetime.now(dt.UTC)
    with (
        Mosquitto(workdir=workdir / "mosquitto", persistence=False) as m,
        NatsServer(workdir=workdir / "nats") as n,
        Tansu(workdir=workdir / "kafka") as k,
    ):
        pids = {"mosquitto": m.pid or 0, "nats-server": n.pid or 0, "tansu": k.pid or 0}
        run = Run(args, Brokers(m.port, n.url, k.bootstrap, workdir, pids), out)
        uvloop.run(run.main())
    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": command.strip(),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "minutes": round((dt.datetime.now(dt.UTC) - started).total_seconds() / 60, 1),
    }
    report.write(run.rows, meta, out)
    print(report.table(run.rows))
    print(f"\nwrote {out / 'RESULTS.md'}, {out / 'results.jsonl'}, {out / 'throughput.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
