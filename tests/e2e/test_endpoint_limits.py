"""The monitoring endpoint of a gateway process under a flood of half-sent requests, with the default limits.

2 000 connections each send part of a request head and stop (in the issue, 10 000 of them held 10 028
of the process's file descriptors for as long as the clients liked). Meanwhile messages flow MQTT -> NATS
and ``/healthz`` is asked on a new connection after every 100 half-sent ones. Expected: the gateway never
holds more than ``max_connections`` (128) of them — its open file descriptors, read in /proc, say so —;
every ``/healthz`` is answered; every message arrives; and once the header timeout (10 s) has passed the
remaining half-sent requests are closed too, the descriptors back to what the gateway had before.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import aiohttp
import pytest

from gateway.ops.guard import HEADER_TIMEOUT, MAX_CONNECTIONS
from tests.support.brokers import Mosquitto, NatsServer
from tests.support.clients.mqtt import MqttClient
from tests.support.clients.nats import NatsCollector, nats_connect
from tests.support.configs import mqtt_to_nats
from tests.support.gateway_process import GatewayProcess

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.timeout(120)]

N_HALF_SENT = 2_000
BATCH = 100
N_MESSAGES = 1_000
HALF_SENT = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nUser-Agent: slow"
SLACK = 20
"""File descriptors the gateway may open meanwhile besides the endpoint's (a reconnect, a /healthz)."""


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """The gateway closed the connection (without an answer); False if it is still open."""
    try:
        return await asyncio.wait_for(reader.read(), 2) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "supervisor"])
async def test_half_sent_requests_cannot_hold_the_process_descriptors(
    gateways: Callable[..., GatewayProcess], mosquitto: Mosquitto, nats_server: NatsServer, unique: str, workers: int
) -> None:
    """With ``--workers 2`` the endpoint is the supervisor's (gateway/ops/lighthttp.py, not aiohttp): the same
    guard, the same limits."""
    config = mqtt_to_nats(
        f"limits-{unique}", mosquitto.url, nats_server.url, f"lim/{unique}/{{dev}}", f"lim.{unique}.{{dev}}"
    )
    gw = gateways(config, args=["--workers", str(workers)] if workers > 1 else [])
    await gw.astart()
    await gw.await_event("http.listening")
    base, pid = gw.http_url, gw.pid
    assert base is not None and pid is not None
    host, port = base.removeprefix("http://").rsplit(":", 1)
    baseline = open_fds(pid)

    nc = await nats_connect(nats_server.url)
    collector = await NatsCollector().subscribe(nc, f"lim.{unique}.>")
    pub = MqttClient(mosquitto.port, f"pub-limits-{unique}")
    pub.connect()
    clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def half_sent() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(HALF_SENT)
        return reader, writer

    peak, answered, seq = baseline, 0, 0
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=5)
        ) as http:
            for _ in range(N_HALF_SENT // BATCH):
                clients.extend(await asyncio.gather(*(half_sent() for _ in range(BATCH))))
                for _ in range(N_MESSAGES * BATCH // N_HALF_SENT):
                    pub.client.publish(f"lim/{unique}/d{seq % 4}", str(seq).encode(), qos=1)
                    seq += 1
                async with http.get(f"{base}/healthz") as resp:
                    assert resp.status == 200
                    answered += 1
                peak = max(peak, open_fds(pid))
            flood = time.monotonic() - started

            deadline = time.monotonic() + 30
            while len(collector.messages) < N_MESSAGES and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            delivered = len(collector.messages)

            # Once the header timeout has passed, the last half-sent requests are closed as well.
            deadline = time.monotonic() + HEADER_TIMEOUT + 10
            while open_fds(pid) > baseline and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            after = open_fds(pid)
            async with http.get(f"{base}/metrics") as resp:
                metrics = await resp.text()
            at_eof = sum(await asyncio.gather(*(closed_by_peer(reader) for reader, _ in clients)))
    finally:
        for _, writer in clients:
            writer.close()
        pub.close()
        await nc.close()
    print(
        f"\nHALF-SENT: {N_HALF_SENT} connections in {flood:.1f} s; gateway fds {baseline} before, at most {peak} "
        f"during, {after} after {HEADER_TIMEOUT:.0f} s; /healthz {answered}/{N_HALF_SENT // BATCH} answered; "
        f"{delivered}/{N_MESSAGES} messages delivered; {at_eof} connections closed by the gateway"
    )
    print("\n".join(line for line in metrics.splitlines() if line.startswith("gateway_http")))
    assert peak <= baseline + MAX_CONNECTIONS + SLACK, "the gateway held more connections than its cap"
    assert answered == N_HALF_SENT // BATCH
    assert delivered == N_MESSAGES
    assert after <= baseline, "half-sent requests still open after the header timeout"
    assert at_eof == N_HALF_SENT
    own = '{worker="supervisor",' if workers > 1 else "{"  # a supervisor's series beside its workers'
    closed = {
        reason: float(line.split()[-1])
        for line in metrics.splitlines()
        for reason in ("timeout", "evicted", "refused")
        if line.startswith(f'gateway_http_connections_closed_total{own}reason="{reason}"}}')
    }
    assert closed["evicted"] >= N_HALF_SENT - MAX_CONNECTIONS and closed["timeout"] >= 1, closed
    assert not gw.problems(), gw.problems()[:5]
    await gw.astop()


async def test_the_limits_are_set_in_the_config(
    gateways: Callable[..., GatewayProcess], mosquitto: Mosquitto, nats_server: NatsServer, unique: str
) -> None:
    """``gateway.http.max_connections`` and ``header_timeout``: 8 connections at most, 1 s for a request head."""
    config = mqtt_to_nats(
        f"limits-cfg-{unique}", mosquitto.url, nats_server.url, f"limc/{unique}/{{dev}}", f"limc.{unique}.{{dev}}"
    )
    config["gateway"]["http"].update(max_connections=8, header_timeout=1.0)
    gw = gateways(config)
    await gw.astart()
    await gw.await_event("http.listening")
    base, pid = gw.http_url, gw.pid
    assert base is not None and pid is not None
    host, _, port = base.removeprefix("http://").rstrip("/").rpartition(":")
    baseline = open_fds(pid)
    clients = []
    try:
        for _ in range(30):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(HALF_SENT)
            clients.append((reader, writer))
        await asyncio.sleep(0.3)
        assert open_fds(pid) <= baseline + 8 + 2, "more connections held than gateway.http.max_connections"
        started = time.monotonic()
        while open_fds(pid) > baseline and time.monotonic() - started < 6:
            await asyncio.sleep(0.1)
        assert open_fds(pid) <= baseline, "half-sent requests outlived gateway.http.header_timeout"
        async with aiohttp.ClientSession() as http, http.get(f"{base.rstrip('/')}/metrics") as resp:
            metrics = await resp.text()
        assert "gateway_http_max_connections 8" in metrics, [m for m in metrics.splitlines() if "http_" in m]
    finally:
        for _, writer in clients:
            writer.close()
    await gw.astop()
