#!/usr/bin/env python3
"""Run one mq-bridge 1.2 route for the load-test harness (peer comparison).

Run it with the PEER virtualenv's interpreter (it imports ``mq_bridge``)::

    loadtests/.venv-peer/bin/python loadtests/peer/run_mqbridge.py \\
        --route kafka_to_nats --kafka 127.0.0.1:9092 --nats-url nats://127.0.0.1:4222 \\
        --src in.topic --dst out.subject [--seconds 30]

Routes (source -> destination):

    kafka_to_nats       Kafka topic (consumer group)     -> core NATS subject
    jetstream_to_kafka  JetStream stream + subject       -> Kafka topic
                        (--src STREAM --src-subject SUBJ; durable pull consumer)
    corenats_to_kafka   core NATS subject                -> Kafka topic
    mqtt_to_kafka       MQTT topic, QoS 1, persistent    -> Kafka topic
                        session (--client-id)
    mqtt_to_nats        MQTT topic (as above)            -> core NATS subject
    kafka_to_mqtt       Kafka topic (consumer group)     -> MQTT topic, QoS 1
    corenats_to_mqtt    core NATS subject                -> MQTT topic, QoS 1
    fanout_mqtt         MQTT topic (as above)            -> Kafka topic (--dst) + core NATS
                                                            subject (--dst2)

Protocol on stdout: exactly one JSON line, ``{"ready": true, ...}`` once the
route is running and its source is subscribed (for Kafka sources: once the
consumer group has its partitions assigned), or ``{"ready": false, "error":
...}`` followed by exit code 2 if it cannot start.  Everything else (the
mq-bridge log, the effective config with --print-config) goes to stderr.

The bridge runs until SIGTERM/SIGINT or ``--seconds``; then the route is
stopped (in-flight batches are finished and acknowledged) and the process
exits 0.

Defaults are mq-bridge's own except where the local brokers need otherwise
(see loadtests/peer/NOTES.md): Kafka consumers get ``session.timeout.ms=6000``
(Tansu joins a group only after half the session timeout), producers
``enable.idempotence=false`` (Tansu), MQTT consumers a fixed client id,
``clean_session: false`` and, for MQTT 5, a non-zero session expiry so the
session survives a disconnect.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

# mq-bridge 1.2's Route destructor can deadlock with its own runtime threads
# (it keeps the GIL while a tokio worker waits for it, e.g. to log).  Routes
# are parked here so they are never dropped; the process leaves by os._exit.
_KEEP: list[Any] = []

ROUTES = {
    "kafka_to_nats": ("kafka", "nats"),
    "jetstream_to_kafka": ("jetstream", "kafka"),
    "corenats_to_kafka": ("corenats", "kafka"),
    "mqtt_to_kafka": ("mqtt", "kafka"),
    "mqtt_to_nats": ("mqtt", "nats"),
    "kafka_to_mqtt": ("kafka", "mqtt"),
    "corenats_to_mqtt": ("corenats", "mqtt"),
    "fanout_mqtt": ("mqtt", "kafka+nats"),
}

# Log messages (mq-bridge 1.2, INFO level) that say a source is subscribed.
_SUBSCRIBED = {
    "kafka": re.compile(r"Kafka source subscribed"),
    "jetstream": re.compile(r"NATS JetStream subscribed"),
    "corenats": re.compile(r"NATS Core subscribed"),
    "mqtt": re.compile(r"MQTT subscribed"),
}


def _eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def _sanitize(name: str) -> str:
    """A NATS stream / durable / queue-group safe token."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "x"


# --------------------------------------------------------------------------
# Endpoint configs
# --------------------------------------------------------------------------


def kafka_source(a: argparse.Namespace, topic: str) -> dict[str, Any]:
    opts = [
        ["session.timeout.ms", str(a.kafka_session_timeout_ms)],
        ["heartbeat.interval.ms", str(max(100, a.kafka_session_timeout_ms // 6))],
    ]
    opts += [kv.split("=", 1) for kv in a.kafka_consumer_option]
    return {
        "kafka": {
            "url": a.kafka,
            "topic": topic,
            "group_id": a.group or f"mqb-{a.route}-{topic}",
            "consumer_options": opts,
        }
    }


def kafka_sink(a: argparse.Namespace, topic: str) -> dict[str, Any]:
    opts = [["enable.idempotence", "false"]]
    opts += [kv.split("=", 1) for kv in a.kafka_producer_option]
    cfg: dict[str, Any] = {"url": a.kafka, "topic": topic, "producer_options": opts}
    if a.kafka_partitions is not None:
        cfg["partitions"] = a.kafka_partitions
    if a.fire_and_forget:
        cfg["delayed_ack"] = True
    return {"kafka": cfg}


def corenats_source(a: argparse.Namespace, subject: str) -> dict[str, Any]:
    # mq-bridge requires a stream name for every NATS consumer, even in core
    # mode, where it only names the queue group.
    return {
        "nats": {
            "url": a.nats_url,
            "subject": subject,
            "stream": a.stream or _sanitize(f"mqb_{subject}"),
            "no_jetstream": True,
        }
    }


def jetstream_source(a: argparse.Namespace, stream: str, subject: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {"url": a.nats_url, "stream": stream, "subject": subject}
    if a.prefetch is not None:
        cfg["prefetch_count"] = a.prefetch
    return {"nats": cfg}


def nats_sink(a: argparse.Namespace, subject: str) -> dict[str, Any]:
    return {"nats": {"url": a.nats_url, "subject": subject, "no_jetstream": True}}


def mqtt_source(a: argparse.Namespace, topic: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "url": a.mqtt_url,
        "topic": topic,
        "qos": a.qos,
        "client_id": a.client_id or f"mqb-{a.route}",
        "clean_session": False,
        "protocol": a.mqtt_protocol,
    }
    if a.mqtt_protocol == "v5":
        cfg["session_expiry_interval"] = a.mqtt_session_expiry
    if a.mqtt_max_inflight is not None:
        cfg["max_inflight"] = a.mqtt_max_inflight
    cap = a.mqtt_queue_capacity if a.mqtt_queue_capacity is not None else a.mqtt_source_queue_capacity
    if cap:
        cfg["queue_capacity"] = cap
    return {"mqtt": cfg}


def mqtt_sink(a: argparse.Namespace, topic: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "url": a.mqtt_url,
        "topic": topic,
        "qos": a.qos,
        "client_id": a.sink_client_id or f"mqb-{a.route}-pub-{os.getpid()}",
        "protocol": a.mqtt_protocol,
    }
    if a.mqtt_max_inflight is not None:
        cfg["max_inflight"] = a.mqtt_max_inflight
    if a.mqtt_queue_capacity is not None:
        cfg["queue_capacity"] = a.mqtt_queue_capacity
    return {"mqtt": cfg}


def build_route(a: argparse.Namespace) -> dict[str, Any]:
    src_kind, dst_kind = ROUTES[a.route]
    need = {
        "kafka": "--kafka",
        "nats": "--nats-url",
        "corenats": "--nats-url",
        "jetstream": "--nats-url",
        "mqtt": "--mqtt-url",
    }
    for kind in [src_kind, *dst_kind.split("+")]:
        flag = need[kind]
        if getattr(a, flag[2:].replace("-", "_")) is None:
            raise SystemExit(f"--route {a.route} needs {flag}")

    if src_kind == "kafka":
        inp = kafka_source(a, a.src)
    elif src_kind == "corenats":
        inp = corenats_source(a, a.src)
    elif src_kind == "jetstream":
        stream, subject = a.src, a.src_subject
        if subject is None:
            if ":" in a.src:  # --src STREAM:SUBJECT
                stream, subject = a.src.split(":", 1)
            else:
                raise SystemExit("jetstream_to_kafka needs --src STREAM --src-subject SUBJECT")
        inp = jetstream_source(a, stream, subject)
    else:
        inp = mqtt_source(a, a.src)

    if dst_kind == "kafka":
        out = kafka_sink(a, a.dst)
    elif dst_kind == "nats":
        out = nats_sink(a, a.dst)
    elif dst_kind == "mqtt":
        out = mqtt_sink(a, a.dst)
    else:  # kafka+nats
        if not a.dst2:
            raise SystemExit("fanout_mqtt needs --dst KAFKA_TOPIC --dst2 NATS_SUBJECT")
        out = {"fanout": [kafka_sink(a, a.dst), nats_sink(a, a.dst2)]}

    route: dict[str, Any] = {"input": inp, "output": out}
    if a.batch_size is not None:
        route["batch_size"] = a.batch_size
    if a.concurrency is not None:
        route["concurrency"] = a.concurrency
    if a.reconnect_interval_ms is not None:
        route["reconnect_interval_ms"] = a.reconnect_interval_ms
    if a.startup_timeout_ms is not None:
        route["startup_timeout_ms"] = a.startup_timeout_ms
    if a.required_delivery:
        route["required_delivery"] = a.required_delivery
    return route


# --------------------------------------------------------------------------
# Readiness
# --------------------------------------------------------------------------


class _ReadyWatch(logging.Handler):
    """Sets ``event`` when mq-bridge logs that the route's source subscribed."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__(level=logging.INFO)
        self.pattern = pattern
        self.event = threading.Event()
        self.failures: list[str] = []
        self.delivery: str | None = None
        self.aborted = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # pragma: no cover - never let logging kill the route
            return
        if self.pattern.search(msg):
            self.event.set()
        elif msg.startswith("Route did not stop within"):
            self.aborted = True
        elif msg.startswith("Inferred delivery guarantee"):
            m = re.search(r"delivery=(\S+)", msg)
            self.delivery = m.group(1) if m else msg
        elif record.levelno >= logging.WARNING and "failed" in msg.lower():
            self.failures.append(msg)


def _kafka_req(sock: socket.socket, api_key: int, ver: int, corr: int, body: bytes) -> bytes:
    cid = b"mqb-ready-probe"
    msg = struct.pack(">hhih", api_key, ver, corr, len(cid)) + cid + body
    sock.sendall(struct.pack(">i", len(msg)) + msg)
    hdr = b""
    while len(hdr) < 4:
        chunk = sock.recv(4 - len(hdr))
        if not chunk:
            raise ConnectionError("kafka closed")
        hdr += chunk
    (size,) = struct.unpack(">i", hdr)
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("kafka closed")
        data += chunk
    return data[4:]  # drop correlation id


def _kstr(b: bytes, off: int) -> tuple[str, int]:
    (n,) = struct.unpack(">h", b[off : off + 2])
    off += 2
    if n < 0:
        return "", off
    return b[off : off + n].decode(), off + n


def kafka_group_stable(bootstrap: str, group: str) -> tuple[bool, str]:
    """DescribeGroups v0 (via FindCoordinator v0): (stable with members, state)."""
    host, port = bootstrap.split(",")[0].rsplit(":", 1)
    g = group.encode()
    gstr = struct.pack(">h", len(g)) + g
    with socket.create_connection((host, int(port)), timeout=2) as s:
        body = _kafka_req(s, 10, 0, 1, gstr)  # FindCoordinator v0
        (err,) = struct.unpack(">h", body[:2])
        if err != 0:
            return False, f"find_coordinator_error_{err}"
        chost, off = _kstr(body, 6)
        (cport,) = struct.unpack(">i", body[off : off + 4])
    with socket.create_connection((chost or host, cport), timeout=2) as s:
        body = _kafka_req(s, 15, 0, 2, struct.pack(">i", 1) + gstr)  # DescribeGroups v0
    off = 4  # groups array length
    (err,) = struct.unpack(">h", body[off : off + 2])
    off += 2
    _gid, off = _kstr(body, off)
    state, off = _kstr(body, off)
    _ptype, off = _kstr(body, off)
    _proto, off = _kstr(body, off)
    (nmembers,) = struct.unpack(">i", body[off : off + 4])
    if err != 0:
        return False, f"describe_error_{err}"
    return state == "Stable" and nmembers > 0, state


def wait_ready(
    a: argparse.Namespace, watch: _ReadyWatch, route_cfg: dict[str, Any], stop: threading.Event
) -> dict[str, Any]:
    deadline = time.monotonic() + a.ready_timeout
    info: dict[str, Any] = {}
    while not watch.event.wait(0.05):
        if stop.is_set() or time.monotonic() > deadline:
            last = f"; last failure: {watch.failures[-1]}" if watch.failures else ""
            raise TimeoutError(f"source did not subscribe within {a.ready_timeout:.0f}s{last}")
    if ROUTES[a.route][0] == "kafka":
        group = route_cfg["input"]["kafka"]["group_id"]
        state = "?"
        while True:
            try:
                ok, state = kafka_group_stable(a.kafka, group)
            except (OSError, struct.error, UnicodeDecodeError) as exc:
                ok, state = False, f"probe_error: {exc!r}"
            if ok:
                break
            if stop.is_set() or time.monotonic() > deadline:
                raise TimeoutError(f"kafka group {group} not stable (state {state})")
            time.sleep(0.1)
        info["kafka_group"] = group
    return info


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--route", required=True, choices=sorted(ROUTES))
    p.add_argument("--mqtt-url", help="mqtt://HOST:PORT")
    p.add_argument("--nats-url", help="nats://HOST:PORT")
    p.add_argument("--kafka", help="bootstrap HOST:PORT")
    p.add_argument("--src", required=True, help="source topic/subject; for jetstream_to_kafka the STREAM name")
    p.add_argument("--src-subject", help="jetstream_to_kafka: the subject to consume")
    p.add_argument("--dst", required=True, help="destination topic/subject")
    p.add_argument("--dst2", help="fanout_mqtt: the NATS subject (--dst is the Kafka topic)")
    p.add_argument("--seconds", type=float, default=None, help="stop after S seconds")
    p.add_argument("--client-id", help="MQTT source client id (persistent session)")
    p.add_argument("--sink-client-id", help="MQTT destination client id")
    p.add_argument("--group", help="Kafka consumer group (default mqb-ROUTE-TOPIC)")
    p.add_argument("--stream", help="core NATS source: stream name mq-bridge requires (only names the queue group)")
    p.add_argument("--qos", type=int, default=1, choices=[0, 1, 2])
    p.add_argument("--mqtt-protocol", default="v5", choices=["v5", "v3"], help="mq-bridge default v5")
    p.add_argument(
        "--mqtt-session-expiry",
        type=int,
        default=86400,
        help="MQTT 5 session expiry (s) of the source session (0 = ends on disconnect)",
    )
    p.add_argument("--mqtt-max-inflight", type=int, default=None)
    p.add_argument(
        "--mqtt-queue-capacity",
        type=int,
        default=None,
        help="queue_capacity of every MQTT endpoint (mq-bridge default 100)",
    )
    p.add_argument(
        "--mqtt-source-queue-capacity",
        type=int,
        default=262144,
        help="queue_capacity of an MQTT source unless --mqtt-queue-capacity is given; 0 = mq-bridge's "
        "default 100, which cannot start (v3) or runs ~10x slower and does not stop within 5 s (v5) "
        "on a preloaded session; see NOTES.md",
    )
    p.add_argument("--prefetch", type=int, default=None, help="JetStream max_ack_pending (mq-bridge default 10000)")
    p.add_argument("--kafka-session-timeout-ms", type=int, default=6000)
    p.add_argument(
        "--kafka-partitions",
        type=int,
        default=None,
        help="partitions when mq-bridge auto-creates a Kafka topic (its default 6)",
    )
    p.add_argument("--kafka-consumer-option", action="append", default=[], metavar="K=V")
    p.add_argument("--kafka-producer-option", action="append", default=[], metavar="K=V")
    p.add_argument(
        "--fire-and-forget",
        action="store_true",
        help="Kafka sink delayed_ack: do not await delivery reports (weakens delivery to at-most-once)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="mq-bridge default 512")
    p.add_argument("--concurrency", type=int, default=None, help="mq-bridge default 1")
    p.add_argument(
        "--reconnect-interval-ms",
        type=int,
        default=1000,
        help="wait before retrying a failed route (mq-bridge default 5000)",
    )
    p.add_argument("--startup-timeout-ms", type=int, default=None, help="route start deadline (mq-bridge default 5000)")
    p.add_argument(
        "--required-delivery",
        choices=["at_most_once", "at_least_once", "effectively_once"],
        help="refuse to start unless mq-bridge infers at least this guarantee",
    )
    p.add_argument("--ready-timeout", type=float, default=30.0)
    p.add_argument(
        "--log-level", default="warning", help="stderr log level (the source-subscribed events are watched regardless)"
    )
    p.add_argument("--print-config", action="store_true", help="print the route config to stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    route_cfg = build_route(a)
    if a.print_config:
        _eprint(json.dumps(route_cfg, indent=2))

    import mq_bridge  # the peer venv only

    # Route mq-bridge's tracing events (filtered at INFO in Rust) into logging:
    # the watcher sees the "subscribed" events, stderr gets --log-level and up.
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    stderr_h = logging.StreamHandler(sys.stderr)
    stderr_h.setLevel(getattr(logging, a.log_level.upper(), logging.WARNING))
    stderr_h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.addHandler(stderr_h)
    watch = _ReadyWatch(_SUBSCRIBED[ROUTES[a.route][0]])
    logging.getLogger("mq_bridge").addHandler(watch)
    mq_bridge.init_logging("info")

    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    name = f"mqb_{a.route}"
    t0 = time.monotonic()
    try:
        route = mq_bridge.Route.from_config(route_cfg, name)
        _KEEP.append(route)
        route.start()
        extra = wait_ready(a, watch, route_cfg, stop)
    except Exception as exc:
        print(json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        try:
            route.stop()  # type: ignore[possibly-undefined]
            route.join()
        except Exception:
            pass
        return 2

    print(
        json.dumps(
            {
                "ready": True,
                "route": a.route,
                "pid": os.getpid(),
                "startup_s": round(time.monotonic() - t0, 3),
                "mq_bridge": mq_bridge.__version__,
                "delivery": watch.delivery,
                **extra,
            }
        ),
        flush=True,
    )

    end = None if a.seconds is None else time.monotonic() + a.seconds
    while not stop.is_set():
        timeout = 0.5 if end is None else max(0.0, min(0.5, end - time.monotonic()))
        if end is not None and timeout == 0.0:
            break
        stop.wait(timeout)

    t1 = time.monotonic()
    route.stop()
    route.join()
    _eprint(
        f"run_mqbridge: route {a.route} stopped in {time.monotonic() - t1:.2f}s"
        + (
            " (mq-bridge ABORTED it after its 5 s stop timeout: un-acked in-flight messages will be redelivered)"
            if watch.aborted
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    code = main()
    # Never let the interpreter drop the route (see _KEEP) or run its shutdown
    # with mq-bridge threads alive: the route is stopped by now, leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
