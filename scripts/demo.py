"""The stage-3 demo: local brokers, the gateway with config/demo.yaml, traffic on every route, a verdict.

Starts Mosquitto, nats-server (JetStream) and a Kafka-protocol broker (Tansu) on free loopback ports and
the gateway as a separate process. Once the gateway is ready (``/readyz``), simulated devices (MQTT),
services (NATS) and a data-platform producer (Kafka) send sequence-numbered messages into every route
for ``--seconds`` (default 30) or until Ctrl-C. Meanwhile one table shows, per route and target, the
rate in (sent) and out (arrived) and the gateway's in-flight count and consumer lag (from ``/routez``):
redrawn in place on a terminal, a plain line per target every few seconds otherwise.

Then the traffic stops, the pipes drain (until everything sent arrived and the gateway holds nothing, or
nothing moved for a few seconds; a second Ctrl-C cuts it short), and each target gets its verdict: sent,
delivered, lost (must be 0), duplicates. Exit status 0 on PASS, 1 on FAIL. Everything started is stopped.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import nats  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402
from nats.js.api import StreamConfig  # noqa: E402

from tests.support.brokers import Mosquitto, NatsServer, Tansu, pdeathsig_preexec  # noqa: E402
from tests.support.clients import MqttClient  # noqa: E402
from tests.support.gateway_process import routez  # noqa: E402
from tests.support.messages import device_of, parse_payload, payload  # noqa: E402
from tests.support.waits import wait_progress, wait_until  # noqa: E402

DEVICES = 8
SITE = [("site", "plant-1")]
PLAIN_EVERY = 5.0
"""Seconds between two reports when stdout is not a terminal (on a terminal the table is redrawn every second)."""
READY_TIMEOUT = 60.0
DRAIN_TIMEOUT = 30.0
DRAIN_STALL = 5.0
"""The drain gives up once nothing arrived and nothing left the gateway for this long."""
NONE = "—"


class DemoError(Exception):
    """Something that ends the demo early, said in one line."""


class Seqs:
    """Sequence numbers seen, duplicates counted as they come. Everything below ``floor`` was seen, so memory
    grows with the gaps (arrivals out of order, or lost), not with how many arrived."""

    __slots__ = ("above", "duplicates", "floor")

    def __init__(self) -> None:
        self.floor = 0
        self.above: set[int] = set()
        self.duplicates = 0

    def add(self, seq: int) -> None:
        if seq < self.floor or seq in self.above:
            self.duplicates += 1
            return
        self.above.add(seq)
        while self.floor in self.above:
            self.above.remove(self.floor)
            self.floor += 1

    def count_below(self, n: int) -> int:
        """How many distinct sequence numbers under ``n`` were seen."""
        return min(self.floor, n) + sum(1 for s in self.above if s < n)


class Stream:
    """What the traffic side sent into one route: sequence numbers 0 .. ``sent`` - 1."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = 0


@dataclass
class Verdict:
    sent: int
    delivered: int
    """Distinct messages of those sent that arrived."""
    duplicates: int
    unexpected: int
    """Distinct sequence numbers that arrived but were never sent (should not exist)."""

    @property
    def lost(self) -> int:
        return self.sent - self.delivered

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.lost == 0 and self.unexpected == 0


class Target:
    """One target of a route, as the receiving client sees it."""

    def __init__(self, route: str, path: str, stream: Stream) -> None:
        self.route = route
        self.path = path
        self.stream = stream
        self.seqs = Seqs()
        self.received = 0

    def arrived(self, data: bytes) -> None:
        self.received += 1
        self.seqs.add(parse_payload(data)[1])

    @property
    def complete(self) -> bool:
        return self.seqs.count_below(self.stream.sent) >= self.stream.sent

    def verdict(self) -> Verdict:
        sent, seqs = self.stream.sent, self.seqs
        delivered = seqs.count_below(sent)
        distinct = seqs.floor + len(seqs.above)
        return Verdict(sent, delivered, seqs.duplicates, distinct - delivered)


class Traffic:
    """The four streams the demo sends and the five targets they reach (the routes of config/demo.yaml)."""

    def __init__(self) -> None:
        self.telemetry, self.commands, self.orders, self.archive = Stream(), Stream(), Stream(), Stream()
        self.targets = [
            Target("telemetry", "MQTT → Kafka telemetry", self.telemetry),
            Target("telemetry", "MQTT → NATS iot.>", self.telemetry),
            Target("commands", "NATS cmd.> → MQTT", self.commands),
            Target("orders-to-services", "Kafka orders → JetStream", self.orders),
            Target("orders-archive", "JetStream → Kafka archive", self.archive),
        ]
        self.to_kafka, self.to_nats, self.to_devices, self.to_events, self.to_archive = self.targets


class Devices(MqttClient):
    """The simulated devices: publish telemetry at QoS 1 and count the PUBACKs; the commands they receive go
    to their target's tally (no message is kept)."""

    def __init__(self, port: int, commands: Target) -> None:
        super().__init__(port, client_id="demo-devices")
        self.commands = commands
        self.acked = 0
        self.client.on_publish = self._on_publish

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.commands.arrived(msg.payload)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self.acked += 1


@dataclass
class Row:
    route: str
    path: str
    rate_in: float
    rate_out: float
    in_flight: str
    lag: str
    sent: int
    arrived: int


class Table:
    """Rates since the previous sample, with the gateway's in flight and lag of each route (``/routez``)."""

    def __init__(self, traffic: Traffic) -> None:
        self.targets = traffic.targets
        self.at = time.monotonic()
        self.last = [(0, 0) for _ in self.targets]

    def sample(self, routes: dict[str, dict[str, Any]]) -> list[Row]:
        now = time.monotonic()
        dt = max(now - self.at, 1e-6)
        rows, shown = [], set()
        counts = [(t.stream.sent, t.received) for t in self.targets]
        for t, (sent, got), (sent0, got0) in zip(self.targets, counts, self.last, strict=True):
            view = routes.get(t.route, {})
            first = t.route not in shown  # a route's own figures go on its first row only
            shown.add(t.route)
            in_flight, lag = (_figure(view.get("in_flight")), _figure(view.get("lag"))) if first else ("", "")
            rows.append(Row(t.route, t.path, (sent - sent0) / dt, (got - got0) / dt, in_flight, lag, sent, got))
        self.at, self.last = now, counts
        return rows


def _figure(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int | float) and not isinstance(value, bool) else NONE


def _rate(r: float) -> str:
    return f"{r:,.0f}" if r >= 10 or r == 0 else f"{r:.1f}"


class Screen:
    """The live table: redrawn in place on a terminal (cursor up, clear line), plain lines elsewhere."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty() and os.environ.get("TERM") != "dumb"
        self.drawn = 0

    @property
    def interval(self) -> float:
        return 1.0 if self.tty else PLAIN_EVERY

    def show(self, status: str, rows: list[Row]) -> None:
        if self.tty:
            self._redraw(status, rows)
        else:
            self.out.writelines(
                f"{status}  {r.route:<18} {r.path:<25}  in {_rate(r.rate_in)}/s  out {_rate(r.rate_out)}/s"
                f"  sent {r.sent}  arrived {r.arrived}"
                + (f"  in flight {r.in_flight}  lag {r.lag}" if r.in_flight else "")
                + "\n"
                for r in rows
            )
            self.out.flush()

    def _redraw(self, status: str, rows: list[Row]) -> None:
        width = shutil.get_terminal_size().columns - 1  # a wrapped line would throw the cursor-up count off
        wide = width >= 95
        head = f"{'route':<18} {'path':<25} {'in/s':>6} {'out/s':>6} {'in flight':>9} {'lag':>6}"
        lines = [status, head + (f" {'sent':>8} {'arrived':>8}" if wide else "")]
        for r in rows:
            line = (
                f"{r.route:<18} {r.path:<25} {_rate(r.rate_in):>6} {_rate(r.rate_out):>6} {r.in_flight:>9} {r.lag:>6}"
            )
            lines.append(line + (f" {r.sent:>8} {r.arrived:>8}" if wide else ""))
        up = f"\x1b[{self.drawn}A\r" if self.drawn else "\x1b[?25l"  # back to the block's top; hide the cursor
        self.out.write(up + "".join(f"\x1b[2K{line[:width]}\n" for line in lines) + "\x1b[J")
        self.out.flush()
        self.drawn = len(lines)

    def note(self, line: str) -> None:
        """A line between reports (on a terminal the table's status line says it instead)."""
        if not self.tty:
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        if self.tty and self.drawn:
            self.out.write("\x1b[?25h")  # the cursor back
            self.out.flush()
        self.drawn = 0


class Clock:
    """What the status line says: the phase and the seconds since the traffic started (on creation)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()
        self.phase = "traffic (Ctrl-C ends it)"

    def status(self, tty: bool) -> str:
        t = time.monotonic() - self.start
        if not tty:
            return f"t={t:3.0f}s"
        return f"t={t:3.0f}s of {self.seconds:.0f}s  {self.phase}"


async def show(table: Table, screen: Screen, http_url: str, clock: Clock, done: asyncio.Event) -> None:
    """Redraw (or report) every ``screen.interval`` seconds until ``done``; on a terminal, once more then."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), screen.interval)
        if done.is_set() and not screen.tty:
            return  # the verdict follows
        try:
            async with asyncio.timeout(2):
                routes = await routez(http_url)
        except (aiohttp.ClientError, OSError, ValueError, TimeoutError):
            routes = {}  # the gateway is busy or gone: its columns show "—"
        screen.show(clock.status(screen.tty), table.sample(routes))
        if done.is_set():
            return


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


async def kafka_counter(bootstrap: str, topic: str, target: Target, stop: asyncio.Event) -> None:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        while not stop.is_set():
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    target.arrived(record.value)
    finally:
        await consumer.stop()


async def traffic(devices: Devices, nc: Any, producer: AIOKafkaProducer, t: Traffic, stop: asyncio.Event) -> None:
    """Per tick (~15 a second): 40 telemetry messages (QoS 1), an order, an archived order; a command every
    fifth tick. Each stream numbers its messages from 0 (``payload``: ``b"<device>:<seq>"``)."""
    js = nc.jetstream()
    tick = 0
    while not stop.is_set():
        for _ in range(5 * DEVICES):
            seq = t.telemetry.sent
            devices.publish(f"devices/{device_of(seq, DEVICES)}/telemetry/temp", payload(seq, DEVICES), 1, SITE)
            t.telemetry.sent += 1
        if tick % 5 == 0:
            seq = t.commands.sent
            await nc.publish(f"cmd.{device_of(seq, DEVICES)}.reboot", payload(seq, DEVICES))
            t.commands.sent += 1
        await producer.send("orders", f"order:{t.orders.sent}".encode(), key=str(t.orders.sent % 16).encode())
        t.orders.sent += 1
        await js.publish(f"orders.{t.archive.sent % 4}", f"archived:{t.archive.sent}".encode())  # awaits the PubAck
        t.archive.sent += 1
        tick += 1
        await asyncio.sleep(0.05)
    # what the clients still buffer goes out before the drain is judged
    await producer.flush()
    await nc.flush()
    await wait_progress(lambda: devices.acked, lambda n: n >= t.telemetry.sent, timeout=10, stall=3)


def _http_port() -> int:
    """8080 when it is free, else any free port."""
    for port in (8080, 0):
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.1", port))
            return int(s.getsockname()[1])
    raise RuntimeError("no free port for the status page")


class Interrupts:
    """Ctrl-C (or SIGTERM) once: end the traffic. Twice: also cut the drain short."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()

    def __call__(self) -> None:
        (self.hurry if self.stop.is_set() else self.stop).set()


async def wait_ready(gw: subprocess.Popen[bytes], http_url: str, interrupts: Interrupts) -> None:
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            if gw.poll() is not None:
                raise DemoError(f"the gateway exited with {gw.returncode} before it was ready")
            if interrupts.stop.is_set():
                raise DemoError("interrupted before the gateway was ready")
            try:
                async with http.get(http_url + "/readyz") as resp:
                    return resp.status == 200
            except (aiohttp.ClientError, OSError):
                return False

        try:
            await wait_until(ready, READY_TIMEOUT, "ready")
        except AssertionError:
            raise DemoError(f"the gateway was not ready within {READY_TIMEOUT:.0f} s") from None


async def gateway_in_flight(http_url: str) -> int | None:
    """Messages inside the gateway (every route), or None when ``/routez`` does not answer."""
    try:
        async with asyncio.timeout(2):
            routes = await routez(http_url)
    except (aiohttp.ClientError, OSError, ValueError, TimeoutError):
        return None
    return sum(int(r.get("in_flight", 0)) for r in routes.values())


async def drain(t: Traffic, http_url: str, interrupts: Interrupts) -> float:
    """Until every message sent arrived and the gateway holds none, or nothing moved for DRAIN_STALL s."""
    held: int | None = None

    async def moved() -> int:
        nonlocal held
        held = await gateway_in_flight(http_url)
        return sum(x.received for x in t.targets) - (held or 0)

    def done(_: int) -> bool:
        return interrupts.hurry.is_set() or (held == 0 and all(x.complete for x in t.targets))

    return await wait_progress(moved, done, timeout=DRAIN_TIMEOUT, stall=DRAIN_STALL, interval=0.2)


async def exercise(
    args: argparse.Namespace,
    gw: subprocess.Popen[bytes],
    http_url: str,
    urls: tuple[int, str, str],
    t: Traffic,
    interrupts: Interrupts,
) -> list[str]:
    """Wait until the gateway is ready, run the traffic with the live table, drain. Returns what went wrong."""
    mqtt_port, nats_url, bootstrap = urls
    await wait_ready(gw, http_url, interrupts)
    async with contextlib.AsyncExitStack() as clients:
        devices = Devices(mqtt_port, t.to_devices)
        clients.callback(devices.close)
        devices.connect()
        devices.subscribe("devices/+/cmd/#")
        nc = await nats.connect(nats_url)
        clients.push_async_callback(nc.close)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        await producer.start()
        clients.push_async_callback(producer.stop)

        async def on_iot(msg: Any) -> None:
            t.to_nats.arrived(msg.data)

        async def on_event(msg: Any) -> None:
            t.to_events.arrived(msg.data)
            await msg.ack()

        await nc.subscribe("iot.>", cb=on_iot)
        await nc.jetstream().subscribe("events.orders", stream="EVENTS", cb=on_event, manual_ack=True)
        return await drive(args, gw, http_url, t, interrupts, Clients(devices, nc, producer, bootstrap))
    raise AssertionError("unreachable")  # for mypy: the exit stack does not swallow exceptions


@dataclass
class Clients:
    """The demo's own broker clients (connected): the devices, the services' NATS connection, the producer."""

    devices: Devices
    nc: Any
    producer: AIOKafkaProducer
    bootstrap: str


async def drive(
    args: argparse.Namespace,
    gw: subprocess.Popen[bytes],
    http_url: str,
    t: Traffic,
    interrupts: Interrupts,
    c: Clients,
) -> list[str]:
    """The traffic for ``args.seconds`` (or until Ctrl-C or the gateway ends), the live table, the drain."""
    screen = Screen(sys.stdout)
    clock = Clock(args.seconds)
    collect = asyncio.Event()  # set: the receiving clients stop
    shown = asyncio.Event()  # set: the table's last redraw

    def phase(text: str) -> None:
        clock.phase = text
        screen.note(text)

    tasks = [
        asyncio.create_task(kafka_counter(c.bootstrap, "telemetry", t.to_kafka, collect), name="the telemetry reader"),
        asyncio.create_task(kafka_counter(c.bootstrap, "orders-archive", t.to_archive, collect), name="the archiver"),
        sender := asyncio.create_task(traffic(c.devices, c.nc, c.producer, t, interrupts.stop), name="the traffic"),
        display := asyncio.create_task(show(Table(t), screen, http_url, clock, shown), name="the table"),
    ]
    try:
        deadline = clock.start + args.seconds
        while not interrupts.stop.is_set() and (left := deadline - time.monotonic()) > 0 and not sender.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(interrupts.stop.wait(), min(left, 0.5))
            if gw.poll() is not None:
                phase(f"the gateway exited with {gw.returncode} during the traffic")
                break
        interrupts.stop.set()
        await asyncio.wait([sender])
        if gw.poll() is None:
            phase(f"traffic stopped after {time.monotonic() - clock.start:.1f}s; draining (Ctrl-C cuts it short)")
            waited = await drain(t, http_url, interrupts)
            phase("drain cut short" if interrupts.hurry.is_set() else f"drained in {waited:.1f}s")
        shown.set()
        await asyncio.wait([display])
    finally:
        shown.set()
        collect.set()
        interrupts.stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        screen.close()
    return [f"{task.get_name()} failed: {r!r}" for task, r in zip(tasks, results, strict=True) if r is not None]


def stop_gateway(gw: subprocess.Popen[bytes]) -> int:
    if gw.poll() is None:
        gw.send_signal(signal.SIGTERM)
        try:
            gw.wait(20)
        except subprocess.TimeoutExpired:
            gw.kill()
            gw.wait()
    return gw.returncode


def report(t: Traffic, problems: list[str], out: TextIO) -> bool:
    """The verdict per target and overall; True on PASS."""
    out.write(f"\n{'route':<18} {'path':<25} {'sent':>8} {'delivered':>9} {'lost':>6} {'duplicates':>10}\n")
    failed: list[str] = []
    for x in t.targets:
        v = x.verdict()
        mark = "ok" if v.ok else "FAIL"
        out.write(f"{x.route:<18} {x.path:<25} {v.sent:>8} {v.delivered:>9} {v.lost:>6} {v.duplicates:>10}  {mark}\n")
        if v.sent == 0:
            failed.append(f"{x.route} ({x.path}): nothing sent")
        elif not v.ok:
            extra = f", {v.unexpected} never sent" if v.unexpected else ""
            failed.append(f"{x.route} ({x.path}): {v.lost} lost{extra}")
    failed += problems
    verdicts = [x.verdict() for x in t.targets]
    if failed:
        out.write("FAIL: " + "; ".join(failed) + "\n")
    else:
        delivered = sum(v.delivered for v in verdicts)
        duplicates = sum(v.duplicates for v in verdicts)
        out.write(f"PASS: {delivered} deliveries on {len(verdicts)} paths, none lost, {duplicates} duplicates\n")
    out.flush()
    return not failed


async def run(args: argparse.Namespace, m: Mosquitto, n: NatsServer, k: Tansu, workdir: Path) -> int:
    interrupts = Interrupts()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupts)
    await prepare(n.url, k.bootstrap)
    http = os.environ.get("GATEWAY_HTTP") or f"127.0.0.1:{_http_port()}"
    http_url = f"http://{http}"
    env = {**os.environ, "MQTT_URL": m.url, "NATS_URL": n.url, "KAFKA_BOOTSTRAP": k.bootstrap, "GATEWAY_HTTP": http}
    log_path = workdir / "gateway.log"
    print(f"status page: {http_url}/   (metrics: {http_url}/metrics)")
    print(f"brokers: MQTT {m.url}  NATS {n.url}  Kafka {k.bootstrap}")
    print(f"gateway: {sys.executable} -m gateway run -c {args.config}   (log: {log_path})", flush=True)
    with log_path.open("wb") as log:
        gw = subprocess.Popen(  # noqa: ASYNC220 - started once, stopped below
            [sys.executable, "-m", "gateway", "run", "-c", str(args.config), "--log-format", "json"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=pdeathsig_preexec(),  # dies with the demo
        )
    t = Traffic()
    try:
        problems = await exercise(args, gw, http_url, (m.port, n.url, k.bootstrap), t, interrupts)
    except DemoError as exc:
        problems = [str(exc)]
    finally:
        rc = await asyncio.to_thread(stop_gateway, gw)
    if rc != 0:
        problems.append(f"the gateway exited with {rc}")
    print(f"gateway exit code {rc}; log kept at {log_path}")
    return 0 if report(t, problems, sys.stdout) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the traffic runs (default 30)")
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "demo.yaml")
    args = parser.parse_args()
    if not args.config.is_file():
        parser.error(f"no config file {args.config}")
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
