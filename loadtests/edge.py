"""Edge profile: the gateway's memory at idle and at 1 000 msgs/s with three connectors.

    .venv/bin/python -m loadtests.edge            # ~2 min; prints a Markdown table

Starts Mosquitto, nats-server and Tansu on loopback, then for each variant a
gateway with an MQTT, a NATS and a Kafka connector and one route MQTT QoS 1 →
Kafka + NATS: RSS after 10 s idle, then 30 s of 1 000 msgs/s (128 B, paho at a
fixed rate), RSS sampled every 0.5 s (peak and last), and CPU seconds used in
the loaded phase. Variants: the default drivers, ``driver: aiokafka`` (no
librdkafka), and the default with a spool on the route.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import yaml

from tests.support.brokers import Mosquitto, NatsServer, Tansu, pdeathsig_preexec

RATE = 1_000
LOADED_SECONDS = 30.0
IDLE_SECONDS = 10.0
REPO = Path(__file__).resolve().parent.parent


def config(mq: Mosquitto, ns: NatsServer, kafka: Tansu, *, driver: str, spool: Path | None) -> dict[str, Any]:
    route: dict[str, Any] = {
        "name": "telemetry",
        "from": {"connector": "devices", "topic": "dev/{device}/t", "qos": 1},
        "to": [
            {"connector": "platform", "topic": "telemetry", "key": "{device}"},
            {"connector": "bus", "subject": "telemetry.{device}"},
        ],
    }
    if spool is not None:
        route["spool"] = {"path": str(spool), "max_bytes": 256 * 1024 * 1024}
    return {
        "gateway": {"id": "edge", "http": {"listen": ""}},
        "connectors": {
            "devices": {"type": "mqtt", "url": mq.url, "client_id": "edge"},
            "bus": {"type": "nats", "servers": [ns.url]},
            "platform": {
                "type": "kafka",
                "bootstrap_servers": [kafka.bootstrap],
                "idempotent": False,
                "driver": driver,
            },
        },
        "routes": [route],
    }


def publish_at_rate(port: int, seconds: float, stop: threading.Event) -> int:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edge-pub", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    sent = 0
    start = time.monotonic()
    payload = b"x" * 128
    try:
        while not stop.is_set() and (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * RATE)
            while sent < due:
                client.publish(f"dev/d{sent % 16}/t", payload, qos=1)
                sent += 1
            time.sleep(0.005)
    finally:
        client.disconnect()
        client.loop_stop()
    return sent


def measure(name: str, cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", str(path), "--log-level", "warning"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=pdeathsig_preexec(),
    )
    try:
        p = psutil.Process(proc.pid)
        time.sleep(IDLE_SECONDS)
        idle = p.memory_info().rss
        cpu0 = sum(p.cpu_times()[:2])
        stop = threading.Event()
        result: list[int] = []
        t = threading.Thread(target=lambda: result.append(publish_at_rate(cfg_port(cfg), LOADED_SECONDS, stop)))
        t.start()
        samples = []
        while t.is_alive():
            samples.append(p.memory_info().rss)
            time.sleep(0.5)
        t.join()
        cpu = sum(p.cpu_times()[:2]) - cpu0
        return {
            "variant": name,
            "idle_mb": idle / 1e6,
            "loaded_median_mb": statistics.median(samples) / 1e6,
            "loaded_peak_mb": max(samples) / 1e6,
            "sent": result[0] if result else 0,
            "cpu_share": cpu / LOADED_SECONDS,
        }
    finally:
        proc.terminate()
        proc.wait(30)


def cfg_port(cfg: dict[str, Any]) -> int:
    return int(cfg["connectors"]["devices"]["url"].rsplit(":", 1)[1])


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Mosquitto() as mq, NatsServer() as ns, Tansu() as kafka:
        work = Path(tmp)
        variants = {
            "default (librdkafka producer)": config(mq, ns, kafka, driver="confluent", spool=None),
            "driver: aiokafka": config(mq, ns, kafka, driver="aiokafka", spool=None),
            "default + spool (fsync)": config(mq, ns, kafka, driver="confluent", spool=work / "spool"),
        }
        for name, cfg in variants.items():
            rows.append(measure(name, cfg, work))
            print(f"measured {name}", file=sys.stderr)
    print("| variant (MQTT + NATS + Kafka connectors) | idle RSS | RSS at 1 000 msgs/s (median / peak) | CPU |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['idle_mb']:.0f} MB | {r['loaded_median_mb']:.0f} / {r['loaded_peak_mb']:.0f} MB "
            f"| {r['cpu_share'] * 100:.0f} % of a core ({r['sent']} sent in {LOADED_SECONDS:.0f} s) |"
        )


if __name__ == "__main__":
    main()
