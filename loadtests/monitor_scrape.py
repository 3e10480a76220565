"""What a scrape of the monitoring endpoint costs with many routes, and what it does to message flow.

    .venv/bin/python -m loadtests.monitor_scrape [--routes 10000] [--rate 10] [--active 1.0]   # ~20 s

One gateway in this process with ``--routes`` routes between two memory connectors, messages flowing
(``--rate`` per loop turn, about 8 000 msg/s) on the first ``--active`` fraction of the routes, and the
endpoint on a free port. A separate fetcher process (its reads do not compete with the gateway for the
GIL) requests ``/healthz`` (the baseline: what a request costs at all), ``/metrics`` three times without
and three times with ``Accept-Encoding: gzip`` (what Prometheus sends), ``/routez`` twice and ``/varz``.

Reported per request: the time to the last byte, the bytes received, and the longest pause of the
gateway's event loop while it was served (a 1 ms ticker). The gaps of a quiet 2 s window come first:
at 10 000 routes a generation-2 garbage collection alone takes 100-200 ms, and the supervisor's
watchdog pass over every route 20-40 ms once a second; a gap of that size during a request is theirs.
The machine is shared and noisy: compare within one run.

For the figures before a change, run it in a copy of the tree that holds the earlier gateway/ files
(``git show HEAD:gateway/monitor.py > copy/gateway/monitor.py``; the ``Monitor(gw, listen)`` call is
the same).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from typing import Any

import uvloop

from connectors.memory.broker import MemoryBroker
from gateway.app import Gateway
from gateway.config import parse_config
from gateway.ops.monitor import Monitor

FETCHER = r"""
import sys, time, urllib.request
for line in sys.stdin:
    url, gzip = line.split()
    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"} if gzip == "1" else {})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as resp:
        n = len(resp.read())
    print(time.perf_counter() - t0, n, flush=True)
"""

REQUESTS = [
    ("/healthz", False),
    *[("/metrics", False)] * 3,
    *[("/metrics", True)] * 3,
    *[("/routez", False)] * 2,
    ("/varz", False),
]


def config(n: int) -> str:
    routes = "\n".join(
        f"  - {{name: r{i}, from: {{connector: src, topic: 'r{i}/#'}}, to: {{connector: dst, topic: 'o{i}'}}}}"
        for i in range(n)
    )
    return (
        "gateway: {id: scrape, http: {listen: ''}}\n"
        "connectors:\n  src: {type: memory, broker: scrape-in}\n  dst: {type: memory, broker: scrape-out}\n"
        f"routes:\n{routes}\n"
    )


async def run(n: int, rate: int, active: float) -> None:
    MemoryBroker.reset()
    t0 = time.perf_counter()
    gw = Gateway(parse_config(config(n)))
    built = time.perf_counter() - t0
    await gw.start()
    await gw.wait_ready(30)
    monitor = Monitor(gw, "127.0.0.1:0")
    await monitor.start()
    src, dst = MemoryBroker.named("scrape-in"), MemoryBroker.named("scrape-out")
    stop = asyncio.Event()
    gaps: list[tuple[float, float]] = []
    collections: list[tuple[float, int, float]] = []
    started: dict[str, float] = {}

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started["gc"] = time.perf_counter()
        else:
            collections.append((time.perf_counter(), info["generation"], time.perf_counter() - started["gc"]))

    async def traffic() -> None:
        i, used = 0, max(1, int(n * active))
        while not stop.is_set():
            for _ in range(rate):
                src.publish(f"r{i % used}/x", b"p" * 64)
                i += 1
            if len(dst.received) > 10_000:  # keep the heap flat: what was delivered is of no more use here
                dst.received.clear()
                src.acked.clear()
                done = len(src.log) - 20_000
                for k in range(max(0, done - 20_000), max(0, done)):
                    src.log[k] = None  # type: ignore[call-overload]
            await asyncio.sleep(0.001)

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append((now, now - last))
            last = now

    def acked() -> int:
        return sum(r.stats.acked for r in gw.routes.values())

    def window(start: float, end: float) -> tuple[float, float]:
        gap = max((g for t, g in gaps if start <= t <= end), default=0.0)
        collected = max((d for t, gen, d in collections if start <= t <= end and gen == 2), default=0.0)
        return gap, collected

    gc.callbacks.append(on_gc)
    fetcher = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FETCHER, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert fetcher.stdin is not None and fetcher.stdout is not None
    tasks = [asyncio.create_task(traffic()), asyncio.create_task(ticker())]
    try:
        await asyncio.sleep(1)
        quiet, a0 = time.perf_counter(), acked()
        await asyncio.sleep(2)
        rate_quiet = (acked() - a0) / (time.perf_counter() - quiet)
        gap, collected = window(quiet, time.perf_counter())
        print(f"\n{n} routes, {active:.0%} with traffic (built in {built:.1f} s), {rate_quiet:.0f} msg/s acknowledged")
        print(f"quiet 2 s: longest loop gap {gap * 1000:.0f} ms, longest gen-2 collection {collected * 1000:.0f} ms\n")
        print("| request | gzip | time to last byte | bytes | longest loop gap | gen-2 GC inside |")
        print("|---|---|---|---|---|---|")
        for path, gzip in REQUESTS:
            start = time.perf_counter()
            fetcher.stdin.write(f"http://127.0.0.1:{monitor.port}{path} {int(gzip)}\n".encode())
            seconds, size = (await fetcher.stdout.readline()).split()
            end = time.perf_counter()
            gap, collected = window(start, end + 0.002)
            print(
                f"| {path} | {'yes' if gzip else 'no'} | {float(seconds) * 1000:.0f} ms | {int(size) / 1e6:.2f} MB "
                f"| {gap * 1000:.0f} ms | {collected * 1000:.0f} ms |"
            )
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        fetcher.stdin.close()
        await fetcher.wait()
        await asyncio.gather(*tasks)
        gc.callbacks.remove(on_gc)
        await monitor.stop()
        await gw.stop(5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--routes", type=int, default=10_000)
    p.add_argument("--rate", type=int, default=10, help="messages published per loop turn (about 1 ms)")
    p.add_argument("--active", type=float, default=1.0, help="fraction of the routes that get messages")
    args = p.parse_args()
    import logging

    logging.disable(logging.WARNING)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    uvloop.run(run(args.routes, args.rate, args.active))


if __name__ == "__main__":
    main()
