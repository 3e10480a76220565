"""Micro-benchmark of the per-message route path: ``Route.admit`` + ``finish`` of one 128-byte message to a
sink that confirms at once (no broker, no event loop).

    .venv/bin/python -m loadtests.admit_bench        # prints ns per message (median and min of 7 x 200 000)
    .venv/bin/python -m loadtests.admit_bench --route "trace: true"     # with route options (YAML mapping)
    .venv/bin/python -m loadtests.admit_bench --run 1     # through admit_run, runs of 1 (many topics interleaved)

Compare two commits by running it with ``PYTHONPATH`` pointing at a worktree of each.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from gateway.app import build_routes
from gateway.config.loader import parse_config
from gateway.core.dispatch import Dispatcher
from gateway.core.envelope import Envelope, Receipt
from gateway.core.sink import Sink
from gateway.routing.patterns import MQTT


class NullSink(Sink):
    def submit(self, flight: Any, delivery: Any) -> None:
        flight.done()

    def submit_many(self, flights: Any, delivery: Any) -> None:
        for flight in flights:
            flight.done()

    async def write_batch(self, batch: Any) -> None:
        pass


class R(Receipt):
    __slots__ = ()

    def settle(self) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.admit_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--route", default="", help="extra route options, as a YAML flow mapping body: 'trace: true'")
    p.add_argument("--run", type=int, default=0, help="admit through admit_run, in runs of this many (0: admit)")
    args = p.parse_args()
    extra = f"\n        {args.route}" if args.route else ""
    cfg = parse_config(
        """
    connectors:
      a: {type: memory, broker: A}
      b: {type: memory, broker: B}
    routes:
      - name: r
        from: {connector: a, topic: "in/{device}"}
        to: {connector: b, topic: "out/{device}"}"""
        + extra
        + "\n",
        environ={},
    )
    routes = build_routes(cfg)
    r = routes["r"]
    sink = NullSink()
    for t in r.targets:
        t.sink = sink
    d = Dispatcher(MQTT, [r])
    plan = d.plan("in/d1")[0]
    payload = b"x" * 128

    def run(n: int) -> float:
        t0 = time.perf_counter()
        if args.run:
            for _ in range(n // args.run):
                envs = []
                for _ in range(args.run):
                    rc = R()
                    rc.pending = 1
                    envs.append(Envelope("in/d1", payload, None, None, 1, None, None, 0, rc))
                r.admit_run(envs, plan)
            return (time.perf_counter() - t0) / n * 1e9
        for _ in range(n):
            rc = R()
            rc.pending = 1
            r.admit(Envelope("in/d1", payload, None, None, 1, None, None, 0, rc), plan)
        return (time.perf_counter() - t0) / n * 1e9

    res = [run(200000) for _ in range(7)]
    print(f"admit+finish ns/msg median {statistics.median(res):.0f} min {min(res):.0f}")


if __name__ == "__main__":
    main()
