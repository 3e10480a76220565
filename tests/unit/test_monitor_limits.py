"""The endpoint's limits (ConnectionGuard), in process on loopback sockets, with messages flowing meanwhile.

Small limits (a cap of 16 connections, a header timeout of 1-2 s) keep the tests short; the defaults
are exercised against a gateway process in tests/e2e/test_endpoint_limits.py.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from connectors.memory.broker import MemoryBroker
from gateway.app import Gateway
from gateway.config import parse_config
from gateway.ops.monitor import Monitor
from tests.support.waits import wait_until

HALF_SENT = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Never-Finished: "
"""A request head that never ends (no blank line)."""


@pytest.fixture
async def gateway(unique: str) -> AsyncIterator[tuple[Gateway, MemoryBroker]]:
    MemoryBroker.reset()
    gw = Gateway(
        parse_config(
            f"connectors:\n  src: {{type: memory, broker: in-{unique}}}\n"
            f"  dst: {{type: memory, broker: out-{unique}}}\n"
            "routes:\n  - {name: r, from: {connector: src, topic: 'in/#'}, to: {connector: dst, topic: out}}\n",
            environ={},
        )
    )
    await gw.start()
    await gw.wait_ready(10)
    try:
        yield gw, MemoryBroker.named(f"in-{unique}")
    finally:
        assert await gw.stop(5)


async def closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """What the server sent before it closed the connection (b"" when nothing); fails if it stays open."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""


async def test_half_sent_requests_beyond_the_cap_are_closed_and_healthz_keeps_answering(
    gateway: tuple[Gateway, MemoryBroker],
) -> None:
    gw, src = gateway
    monitor = Monitor(gw, "127.0.0.1:0", max_connections=16, header_timeout=2.0)
    await monitor.start()
    guard, base = monitor.guard, f"http://127.0.0.1:{monitor.port}"
    clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    peak = published = answered = 0
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            for _ in range(10):
                for _ in range(30):
                    reader, writer = await asyncio.open_connection("127.0.0.1", monitor.port)
                    writer.write(HALF_SENT)
                    clients.append((reader, writer))
                    peak = max(peak, guard.open)
                for _ in range(20):
                    src.publish("in/x", b"m")
                    published += 1
                async with http.get(f"{base}/healthz") as resp:  # a new connection, among 16 half-sent ones
                    assert resp.status == 200
                    answered += 1
                peak = max(peak, guard.open)
            await wait_until(
                lambda: guard.closed["evicted"] >= len(clients) - 16, 10, "the oldest half-sent ones evicted"
            )
            assert peak <= 16
            # The oldest were closed at once, without an answer; the newest wait out the header timeout.
            for reader, _ in clients[: len(clients) - 16]:
                assert await closed(reader, 5) == b""
            assert guard.open <= 16
            await wait_until(
                lambda: guard.open == 0, 2.0 + 5, "every half-sent request closed after the header timeout"
            )
            for reader, _ in clients[len(clients) - 16 :]:
                assert await closed(reader, 5) == b""
            assert guard.closed["timeout"] >= 1 and guard.closed["refused"] == 0
            async with http.get(f"{base}/metrics") as resp:
                metrics = await resp.text()
        await wait_until(lambda: len(src.acked) == published, 10, "every message acknowledged")
        print(f"\nHALF-SENT: {len(clients)} connections, at most {peak} open, {answered} /healthz answered")
        print(f"closed by the guard: {guard.closed}")
        assert answered == 10
        evicted = f'gateway_http_connections_closed_total{{reason="evicted"}} {guard.closed["evicted"]}'
        assert evicted in metrics
    finally:
        for _, writer in clients:
            writer.close()
        await monitor.stop()


async def test_a_request_trickled_slower_than_the_header_timeout_is_cut_off(
    gateway: tuple[Gateway, MemoryBroker],
) -> None:
    gw, _ = gateway
    monitor = Monitor(gw, "127.0.0.1:0", header_timeout=1.0)
    await monitor.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", monitor.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
        sent = 0
        started = time.monotonic()
        while not reader.at_eof() and time.monotonic() - started < 6:
            try:
                writer.write(b"x")  # one byte every 100 ms: the head never completes in time
                await writer.drain()
            except ConnectionError:
                break
            sent += 1
            await asyncio.sleep(0.1)
        assert await closed(reader, 5) == b"", "a trickled request got an answer"
        assert monitor.guard.closed["timeout"] == 1 and monitor.guard.open == 0
        assert sent >= 5, "the connection was closed before the header timeout"
    finally:
        writer.close()
        await monitor.stop()


async def test_a_connection_over_the_cap_while_all_are_busy_is_refused_at_once(
    gateway: tuple[Gateway, MemoryBroker],
) -> None:
    gw, _ = gateway
    release = asyncio.Event()

    async def slow_reload() -> tuple[bool, dict[str, Any]]:
        await release.wait()
        return True, {"ok": True}

    monitor = Monitor(gw, "127.0.0.1:0", reload=slow_reload, max_connections=2, header_timeout=1.0)
    await monitor.start()
    base = f"http://127.0.0.1:{monitor.port}"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:

            async def post() -> int:
                async with http.post(f"{base}/reload") as resp:
                    return resp.status

            reloads = [asyncio.create_task(post()) for _ in range(2)]
            try:
                await wait_until(lambda: monitor.guard.open == 2, 5, "two reloads in progress")
                await asyncio.sleep(1.5)  # longer than the header timeout: a busy connection is never timed out
                assert monitor.guard.open == 2
                reader, writer = await asyncio.open_connection("127.0.0.1", monitor.port)
                answer = await closed(reader, 5)
                writer.close()
                assert answer.startswith(b"HTTP/1.1 503 ") and answer.endswith(b"too many connections\n"), answer
                assert monitor.guard.closed == {"timeout": 0, "evicted": 0, "refused": 1}
            finally:
                release.set()
                statuses = await asyncio.gather(*reloads)
            assert statuses == [200, 200]
            async with http.get(f"{base}/healthz") as resp:
                assert resp.status == 200
    finally:
        await monitor.stop()


async def test_keep_alive_clients_are_served_and_a_reader_that_stalls_is_cut_off(
    gateway: tuple[Gateway, MemoryBroker],
) -> None:
    gw, _ = gateway
    monitor = Monitor(gw, "127.0.0.1:0", max_connections=4, header_timeout=1.0)
    await monitor.start()
    base = f"http://127.0.0.1:{monitor.port}"
    try:
        async with aiohttp.ClientSession() as http:  # one keep-alive connection for every request
            for path in ("/healthz", "/readyz", "/varz", "/routez", "/connz", "/metrics", "/"):
                async with http.get(base + path) as resp:
                    assert resp.status == 200, path
                    await resp.read()
            assert monitor.guard.open == 1
        # A client that asks and never reads: the response waits in the buffers, the connection does not stay.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", monitor.port))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: gateway\r\n\r\n")
        try:
            await wait_until(lambda: monitor.guard.open == 1, 5, "the request accepted")
            await wait_until(lambda: monitor.guard.open == 0, 1.0 + 5, "the stalled reader cut off")
            assert monitor.guard.closed["timeout"] == 1
        finally:
            sock.close()
    finally:
        await monitor.stop()
