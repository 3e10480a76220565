"""The stage-3 demo: local brokers, the gateway with config/demo.yaml, and traffic on every route.

Starts Mosquitto, nats-server (JetStream) and a Kafka-protocol broker (Tansu)
on free loopback ports, the gateway as a separate process, simulated devices
(MQTT), services (NATS) and a data-platform producer (Kafka); prints per-route
counts every second for ``--seconds`` (default 30) or until Ctrl-C, then stops
everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nats  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402
from nats.js.api import StreamConfig  # noqa: E402

from tests.support.brokers import Mosquitto, NatsServer, Tansu  # noqa: E402
from tests.support.clients import MqttClient  # noqa: E402

DEVICES = [f"dev{i:02d}" for i in range(8)]


class Tally:
    """What the traffic side sent into each route and what arrived at each of its targets."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.arrived: Counter[str] = Counter()

    def table(self, elapsed: float) -> str:
        rows = [
            ("telemetry", "MQTT devices → Kafka telemetry", "telemetry", "telemetry→kafka"),
            ("telemetry", "MQTT devices → NATS iot.>", "telemetry", "telemetry→nats"),
            ("commands", "NATS cmd.> → MQTT devices", "commands", "commands→mqtt"),
            ("orders-to-services", "Kafka orders → JetStream events", "orders", "orders→jetstream"),
            ("orders-archive", "JetStream orders.> → Kafka archive", "archive", "archive→kafka"),
        ]
        lines = [f"t={elapsed:5.1f}s  {'route':<20} {'path':<38} {'sent':>8} {'arrived':>8}"]
        for route, path, sent_key, arrived_key in rows:
            lines.append(f"        {route:<20} {path:<38} {self.sent[sent_key]:>8} {self.arrived[arrived_key]:>8}")
        return "\n".join(lines)


async def prepare(nats_url: str, bootstrap: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="ORDERS", subjects=["orders.>"]))
    await js.add_stream(StreamConfig(name="EVENTS", subjects=["events.>"]))
    await nc.close()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    with contextlib.suppress(Exception):
        await admin.create_topics(
            [NewTopic(t, num_partitions=4, replication_factor=1) for t in ("telemetry", "orders", "orders-archive")]
        )
    await admin.close()


async def kafka_counter(bootstrap: str, topic: str, key: str, tally: Tally, stop: asyncio.Event) -> None:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=300)
            tally.arrived[key] += sum(len(v) for v in batches.values())
    finally:
        await consumer.stop()


async def traffic(mqtt_port: int, nats_url: str, bootstrap: str, tally: Tally, stop: asyncio.Event) -> None:
    devices = MqttClient(mqtt_port, client_id="demo-devices")
    devices.connect()
    devices.subscribe("devices/+/cmd/#")
    nc = await nats.connect(nats_url)
    js = nc.jetstream()

    async def on_iot(msg: Any) -> None:
        tally.arrived["telemetry→nats"] += 1

    async def on_event(msg: Any) -> None:
        tally.arrived["orders→jetstream"] += 1
        await msg.ack()

    await nc.subscribe("iot.>", cb=on_iot)
    await js.subscribe("events.orders", stream="EVENTS", cb=on_event, manual_ack=True)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    tick = 0
    try:
        while not stop.is_set():
            tick += 1
            # ~200 telemetry messages/s from the devices, QoS 1
            for dev in DEVICES:
                for _ in range(5):
                    devices.publish(
                        f"devices/{dev}/telemetry/temp",
                        f'{{"t":{tick},"c":21.5}}'.encode(),
                        qos=1,
                        headers=[("site", "plant-1")],
                    )
                    tally.sent["telemetry"] += 1
            # a command now and then, an order every tick, an archived order every tick
            if tick % 5 == 0:
                dev = DEVICES[tick % len(DEVICES)]
                await nc.publish(f"cmd.{dev}.reboot", b'{"delay": 5}')
                tally.sent["commands"] += 1
            await producer.send("orders", f'{{"order":{tick}}}'.encode(), key=str(tick % 16).encode())
            tally.sent["orders"] += 1
            await js.publish(f"orders.{tick % 4}", f'{{"archived":{tick}}}'.encode())
            tally.sent["archive"] += 1
            tally.arrived["commands→mqtt"] = len(devices.messages)
            await asyncio.sleep(0.05)
    finally:
        await producer.stop()
        await nc.close()
        devices.close()


def _http_port() -> int:
    """8080 when it is free, else any free port."""
    for port in (8080, 0):
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.1", port))
            return int(s.getsockname()[1])
    raise RuntimeError("no free port for the status page")


async def run(args: argparse.Namespace, m: Mosquitto, n: NatsServer, k: Tansu, workdir: Path) -> int:
    await prepare(n.url, k.bootstrap)
    http = os.environ.get("GATEWAY_HTTP") or f"127.0.0.1:{_http_port()}"
    env = {**os.environ, "MQTT_URL": m.url, "NATS_URL": n.url, "KAFKA_BOOTSTRAP": k.bootstrap, "GATEWAY_HTTP": http}
    print(f"status page: http://{http}/   (metrics: http://{http}/metrics)")
    log_path = workdir / "gateway.log"
    print(f"brokers: MQTT {m.url}  NATS {n.url}  Kafka {k.bootstrap}")
    print(f"gateway: {sys.executable} -m gateway run -c {args.config}   (log: {log_path})")
    with log_path.open("wb") as log:
        gw = subprocess.Popen(  # noqa: ASYNC220 - started once, stopped below
            [sys.executable, "-m", "gateway", "run", "-c", str(args.config), "--log-format", "json"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    tally = Tally()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tasks = [
        asyncio.create_task(traffic(m.port, n.url, k.bootstrap, tally, stop), name="traffic"),
        asyncio.create_task(kafka_counter(k.bootstrap, "telemetry", "telemetry→kafka", tally, stop)),
        asyncio.create_task(kafka_counter(k.bootstrap, "orders-archive", "archive→kafka", tally, stop)),
    ]
    start = time.monotonic()
    try:
        while not stop.is_set() and time.monotonic() - start < args.seconds:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if gw.poll() is not None:
                print(f"the gateway exited with {gw.returncode}; see {log_path}")
                break
            print(tally.table(time.monotonic() - start) + "\n", flush=True)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if gw.poll() is None:
            gw.send_signal(signal.SIGTERM)
            try:
                gw.wait(20)
            except subprocess.TimeoutExpired:
                gw.kill()
    print(f"gateway exit code {gw.returncode}; log kept at {log_path}")
    return 0 if gw.returncode == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "demo.yaml")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    try:
        with (
            Mosquitto(workdir=workdir / "mosquitto") as m,
            NatsServer(workdir=workdir / "nats") as n,
            Tansu(workdir=workdir / "kafka") as k,
        ):
            return asyncio.run(run(args, m, n, k, workdir))
    finally:
        for sub in ("mosquitto", "nats", "kafka"):  # broker data; the gateway log stays
            shutil.rmtree(workdir / sub, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
