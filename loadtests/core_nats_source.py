"""Core NATS source → memory target in one process: msgs/s and CPU per message of the source callback's path.

``.venv/bin/python -m loadtests.core_nats_source 300000`` from the tree to measure; alternate two trees (a
``git worktree``) for a before/after. The publisher runs in the same process (its CPU is included), keeps
at most 20 000 messages ahead of the route, and 128-byte payloads make the windows about 3 s long.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import nats
import yaml

from gateway import Gateway
from gateway.config import parse_config
from tests.support.brokers import NatsServer

AHEAD = 20_000
"""Messages the publisher may be ahead of the route (nats-py's pending limit is 65 536)."""


async def measure(n: int) -> str:
    with NatsServer(workdir=Path(tempfile.mkdtemp()) / "nats", jetstream=False) as server:
        config = {
            "gateway": {"id": "bench", "http": {"listen": ""}},
            "connectors": {
                "n": {"type": "nats", "servers": [server.url]},
                "m": {"type": "memory", "broker": "bench"},
            },
            "routes": [
                {"name": "r", "from": {"connector": "n", "subject": "in.>"}, "to": {"connector": "m", "topic": "out"}}
            ],
        }
        gw = Gateway(parse_config(yaml.safe_dump(config)))
        await gw.start()
        await gw.wait_ready(30)
        await asyncio.sleep(0.5)
        stats = gw.routes["r"].stats
        pub = await nats.connect(server.url)
        payload = b"x" * 128
        cpu0, t0 = time.process_time(), time.monotonic()
        for i in range(n):
            await pub.publish("in.a", payload)
            if i % 2000 == 1999:
                await pub.flush()
                while stats.received < i - AHEAD:
                    await asyncio.sleep(0.001)
        await pub.flush()
        while stats.acked + stats.dropped < n and time.monotonic() - t0 < 120:
            await asyncio.sleep(0.01)
        seconds, cpu = time.monotonic() - t0, time.process_time() - cpu0
        await pub.close()
        await gw.stop()
    return (
        f"{stats.acked / seconds:.0f} msgs/s, {cpu / n * 1e6:.2f} us CPU/msg (process, publisher included), "
        f"dropped {stats.dropped}, window {seconds:.1f} s"
    )


if __name__ == "__main__":
    print(asyncio.run(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 300_000)))
