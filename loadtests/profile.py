"""Profile the gateway on one route with py-spy and print the hottest functions.

    .venv/bin/python -m loadtests.profile kafka_to_nats [--n 200000]

Self time is where the samples were taken; inclusive time counts every frame
on the stack. The collapsed stacks are kept for flame-graph tools.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtests.scenarios import BY_NAME, Brokers, throughput  # noqa: E402
from tests.support.brokers import Mosquitto, NatsServer, Tansu  # noqa: E402


def summarize(path: Path, top: int = 25) -> str:
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 2)[-1] + ")"
            for f in stack.split(";")
            if f
        ]
        if frames:
            self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    lines = [f"{total} samples", "", "self %  function"]
    lines += [f"{100 * c / total:5.1f}  {f}" for f, c in self_t.most_common(top)]
    lines += ["", "incl %  function"]
    lines += [f"{100 * c / total:5.1f}  {f}" for f, c in incl.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("route", choices=sorted(BY_NAME))
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--out", type=Path, default=ROOT / "loadtests" / "out" / "profile.txt")
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="loadtest-profile-"))
    with (
        Mosquitto(workdir=workdir / "mosquitto", persistence=False) as m,
        NatsServer(workdir=workdir / "nats") as n,
        Tansu(workdir=workdir / "kafka") as k,
    ):
        pids = {"mosquitto": m.pid or 0, "nats-server": n.pid or 0, "tansu": k.pid or 0}
        brokers = Brokers(m.port, n.url, k.bootstrap, workdir, pids)
        row = uvloop.run(
            throughput(
                "gateway",
                BY_NAME[args.route],
                brokers,
                n=args.n,
                size=args.size,
                progress=lambda m: None,
                profile=args.out,
            )
        )
    print(row)
    print(summarize(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
