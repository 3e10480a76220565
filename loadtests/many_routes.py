"""Many MQTT source routes on one connector: broker connections, RSS, time to ready and to stop.

``.venv/bin/python -m loadtests.many_routes 10000 0`` (QoS 0 routes: one shared session) and
``... 10000 1`` (QoS 1 routes: a session each). Starts its own Mosquitto on a free port; the gateway
runs in this process (``shutdown_timeout: 5``), its logs are silenced. Thousands of QoS 1 routes need
as many file descriptors in this process and in Mosquitto (``ulimit -n``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
import structlog
import yaml

from gateway import Gateway
from gateway.config import parse_config
from tests.support.brokers import Mosquitto


async def measure(n: int, qos: int) -> str:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    broker = Mosquitto(workdir=Path(tempfile.mkdtemp()) / "mosquitto")
    broker.start()
    try:
        routes = [
            {
                "name": f"r{i}",
                "from": {"connector": "mq", "topic": f"in/{i}/#", "qos": qos},
                "to": {"connector": "mq", "topic": f"out/{i}/{{#}}", "qos": qos},
            }
            for i in range(n)
        ]
        config = {
            "gateway": {"id": "many", "http": {"listen": ""}, "shutdown_timeout": 5},
            "connectors": {"mq": {"type": "mqtt", "url": broker.url, "client_id": "many"}},
            "routes": routes,
        }
        me = psutil.Process(os.getpid())
        idle = me.memory_info().rss
        t0 = time.monotonic()
        gw = Gateway(parse_config(yaml.safe_dump(config)))
        await gw.start()
        await gw.wait_ready(600)
        ready = time.monotonic() - t0
        connections = sum(1 for c in me.net_connections("tcp") if c.raddr and c.raddr.port == broker.port)
        rss = me.memory_info().rss
        t1 = time.monotonic()
        await gw.stop()
        stopped = time.monotonic() - t1
    finally:
        broker.stop()
    return (
        f"{n} routes, QoS {qos}: {connections} broker connections, ready in {ready:.1f} s (config included), "
        f"RSS {rss / 2**20:.0f} MB (before the gateway: {idle / 2**20:.0f} MB), stopped in {stopped:.1f} s"
    )


if __name__ == "__main__":
    print(asyncio.run(measure(int(sys.argv[1]), int(sys.argv[2]))))
