"""Tests for tests/support/proxy.py: the fault-injection TCP proxy.

Through the proxy to the session's nats-server and to small echo/sink servers
started in the test.  Timing assertions are lower bounds only (what the proxy
guarantees), never upper bounds.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from tests.support.brokers import NatsServer, free_port
from tests.support.proxy import TcpProxy
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.timeout(60)]

Address = tuple[str, int]


# ------------------------------------------------------------------ helpers


class Sink:
    """A TCP server that reads and counts everything, never answers."""

    def __init__(self) -> None:
        self.received = 0
        self.server: asyncio.Server | None = None
        self.address: Address = ("127.0.0.1", 0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.received += len(data)
        except OSError:
            pass
        finally:
            writer.close()

    async def start(self) -> Address:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", free_port())
        host, port = self.server.sockets[0].getsockname()[:2]
        self.address = (host, port)
        return self.address


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo_server() -> AsyncIterator[Address]:
    server = await asyncio.start_server(_echo, "127.0.0.1", free_port())
    host, port = server.sockets[0].getsockname()[:2]
    async with server:
        yield (host, port)


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = Sink()
    await s.start()
    assert s.server is not None
    async with s.server:
        yield s


@pytest.fixture
def make_proxy() -> Iterator[Callable[..., TcpProxy]]:
    """Factory: ``make_proxy(target, **kwargs)`` -> started proxy, stopped after the test."""
    proxies: list[TcpProxy] = []

    def make(target: Address, **kwargs: int) -> TcpProxy:
        proxy = TcpProxy(target, **kwargs)
        proxies.append(proxy)
        proxy.start()
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()
        assert proxy.errors == [], proxy.errors


@pytest.fixture
def nats_proxy(nats_server: NatsServer, make_proxy: Callable[..., TcpProxy]) -> TcpProxy:
    return make_proxy(nats_server.address)


async def _responder(nats_server: NatsServer, subject: str) -> NatsClient:
    """A direct (unproxied) connection answering requests on ``subject`` with b"re:" + data."""
    nc = await asyncio.wait_for(nats.connect(nats_server.url), 15)

    async def reply(msg: Msg) -> None:
        await msg.respond(b"re:" + msg.data)

    await nc.subscribe(subject, cb=reply)
    await nc.flush()
    return nc


class NatsEvents:
    def __init__(self) -> None:
        self.disconnected = asyncio.Event()
        self.reconnected = asyncio.Event()
        self.errors: list[Exception] = []

    async def on_disconnected(self) -> None:
        self.disconnected.set()

    async def on_reconnected(self) -> None:
        self.reconnected.set()

    async def on_error(self, exc: Exception) -> None:
        self.errors.append(exc)


async def _proxied_client(proxy: TcpProxy, events: NatsEvents) -> NatsClient:
    connect = nats.connect(
        proxy.url("nats"),
        reconnect_time_wait=0.1,
        max_reconnect_attempts=-1,
        connect_timeout=2,
        disconnected_cb=events.on_disconnected,
        reconnected_cb=events.on_reconnected,
        error_cb=events.on_error,
    )
    return await asyncio.wait_for(connect, 15)


async def _subscriptions_live(nc: NatsClient) -> None:
    """Return once the server has every SUB sent so far.

    One ``flush()`` is not enough with nats-py 2.16: ``flush()`` writes its
    PING straight to the socket while SUBs wait in the pending buffer for the
    flusher task, so the PONG can come back before the SUB reached the server
    (seen through this proxy, where the two travel as separate reads).  By the
    time the first PONG is back the flusher has written the SUB, so the second
    PING follows it.
    """
    await nc.flush()
    await nc.flush()


async def _echo_round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> float:
    t0 = time.monotonic()
    writer.write(payload)
    await writer.drain()
    assert await reader.readexactly(len(payload)) == payload
    return time.monotonic() - t0


# ------------------------------------------------------------ pass-through


async def test_echo_pass_through_and_counters(echo_server: Address, make_proxy: Callable[..., TcpProxy]) -> None:
    proxy = make_proxy(echo_server)
    payload = os.urandom(1_000_000)
    reader, writer = await asyncio.open_connection(*proxy.address)
    writer.write(payload)
    writer.write_eof()  # half-close travels through the proxy; the echo server closes after echoing
    received = await reader.read(-1)  # until EOF
    assert received == payload
    stats = proxy.stats()
    assert stats.bytes_upstream == len(payload)
    assert stats.bytes_downstream == len(payload)
    assert stats.connections_total == 1
    writer.close()
    await writer.wait_closed()
    await wait_until(lambda: proxy.stats().connections_active == 0, 10, "connection closed")
    assert proxy.stats().held_upstream == proxy.stats().held_downstream == 0


async def test_nats_pass_through(nats_server: NatsServer, nats_proxy: TcpProxy, unique: str) -> None:
    responder = await _responder(nats_server, f"svc.{unique}")
    events = NatsEvents()
    nc = await _proxied_client(nats_proxy, events)
    try:
        got: list[bytes] = []
        sub = await nc.subscribe(f"feed.{unique}")
        await _subscriptions_live(nc)
        await responder.publish(f"feed.{unique}", b"hello")
        msg = await sub.next_msg(timeout=5)
        got.append(msg.data)
        reply = await nc.request(f"svc.{unique}", b"ping", timeout=5)
        assert got == [b"hello"]
        assert reply.data == b"re:ping"
        stats = nats_proxy.stats()
        assert stats.connections_active == 1
        assert stats.bytes_upstream > 0
        assert stats.bytes_downstream > 0
    finally:
        await nc.close()
        await responder.close()


# -------------------------------------------------------------------- cut


async def test_cut_makes_nats_client_reconnect(nats_server: NatsServer, nats_proxy: TcpProxy, unique: str) -> None:
    responder = await _responder(nats_server, f"svc.{unique}")
    events = NatsEvents()
    nc = await _proxied_client(nats_proxy, events)
    try:
        sub = await nc.subscribe(f"feed.{unique}")
        assert (await nc.request(f"svc.{unique}", b"1", timeout=5)).data == b"re:1"

        assert nats_proxy.cut() == 1
        await asyncio.wait_for(events.disconnected.wait(), 10)
        await asyncio.wait_for(events.reconnected.wait(), 10)

        # Reconnected through the proxy, subscriptions restored.
        assert (await nc.request(f"svc.{unique}", b"2", timeout=5)).data == b"re:2"
        await responder.publish(f"feed.{unique}", b"after-cut")
        assert (await sub.next_msg(timeout=5)).data == b"after-cut"
        stats = nats_proxy.stats()
        assert stats.connections_cut == 1
        assert stats.connections_total == 2
        assert stats.connections_active == 1
    finally:
        await nc.close()
        await responder.close()


async def test_cut_closes_or_resets(echo_server: Address, make_proxy: Callable[..., TcpProxy]) -> None:
    proxy = make_proxy(echo_server)
    reader, writer = await asyncio.open_connection(*proxy.address)
    await _echo_round_trip(reader, writer, b"x")
    assert proxy.cut() == 1
    assert await reader.read(1) == b""  # plain cut: FIN, the client sees EOF
    writer.close()

    reader, writer = await asyncio.open_connection(*proxy.address)  # still accepting
    await _echo_round_trip(reader, writer, b"y")
    assert proxy.cut(reset=True) == 1
    with pytest.raises(ConnectionResetError):
        await reader.read(1)
    writer.close()
    assert proxy.stats().connections_cut == 2
    assert proxy.cut() == 0


# -------------------------------------------------------- blackhole/resume


async def test_blackhole_nats_request_times_out_then_resume(
    nats_server: NatsServer, nats_proxy: TcpProxy, unique: str
) -> None:
    responder = await _responder(nats_server, f"svc.{unique}")
    events = NatsEvents()
    nc = await _proxied_client(nats_proxy, events)
    try:
        assert (await nc.request(f"svc.{unique}", b"before", timeout=5)).data == b"re:before"
        total_before = nats_proxy.stats().connections_total

        nats_proxy.blackhole()
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request(f"svc.{unique}", b"stalled", timeout=1)

        # The TCP connection stayed up: no disconnect, same connection, the
        # PUB is held in the proxy rather than lost.
        stats = nats_proxy.stats()
        assert nc.is_connected
        assert not events.disconnected.is_set()
        assert stats.connections_active == 1
        assert stats.connections_total == total_before
        assert stats.held_upstream > 0

        nats_proxy.resume()
        assert (await nc.request(f"svc.{unique}", b"after", timeout=5)).data == b"re:after"
        assert not events.disconnected.is_set()
        assert nats_proxy.stats().held_upstream == 0
    finally:
        await nc.close()
        await responder.close()


async def test_blackhole_applies_tcp_backpressure_with_bounded_buffer(
    sink: Sink, make_proxy: Callable[..., TcpProxy]
) -> None:
    buffer_bytes = 128 * 1024
    chunk_bytes = 16 * 1024
    proxy = make_proxy(sink.address, buffer_bytes=buffer_bytes, chunk_bytes=chunk_bytes)
    proxy.blackhole()
    _, writer = await asyncio.open_connection(*proxy.address)
    piece = b"\xab" * (256 * 1024)
    sent = 0
    blocked = False
    for _ in range(256):  # at most 64 MiB
        writer.write(piece)
        sent += len(piece)
        try:
            await asyncio.wait_for(writer.drain(), 0.5)
        except TimeoutError:
            blocked = True
            break
    assert blocked, f"sender never blocked after {sent} bytes"
    stats = proxy.stats()
    assert stats.bytes_upstream == 0
    assert sink.received == 0
    assert 0 < stats.held_upstream <= buffer_bytes + chunk_bytes
    assert stats.connections_active == 1

    proxy.resume()
    await asyncio.wait_for(writer.drain(), 20)
    await wait_until(lambda: sink.received == sent, 20, f"sink to receive {sent} bytes")
    assert proxy.stats().bytes_upstream == sent
    writer.close()
    await writer.wait_closed()


# ------------------------------------------------------ latency/bandwidth


async def test_latency_adds_to_round_trip(echo_server: Address, make_proxy: Callable[..., TcpProxy]) -> None:
    proxy = make_proxy(echo_server)
    reader, writer = await asyncio.open_connection(*proxy.address)
    await _echo_round_trip(reader, writer, b"warm-up")

    proxy.latency(50)  # each direction
    assert await _echo_round_trip(reader, writer, b"both") >= 0.100

    proxy.latency(0)
    proxy.latency(50, "upstream")
    assert await _echo_round_trip(reader, writer, b"up") >= 0.050
    proxy.latency(0, "upstream")
    proxy.latency(50, "downstream")
    assert await _echo_round_trip(reader, writer, b"down") >= 0.050

    proxy.latency(0)
    await _echo_round_trip(reader, writer, b"off")
    writer.close()
    await writer.wait_closed()


async def test_bandwidth_limits_throughput(echo_server: Address, make_proxy: Callable[..., TcpProxy]) -> None:
    proxy = make_proxy(echo_server)
    proxy.bandwidth(100_000)
    payload = os.urandom(200_000)
    reader, writer = await asyncio.open_connection(*proxy.address)
    t0 = time.monotonic()
    writer.write(payload)
    received = await reader.readexactly(len(payload))
    elapsed = time.monotonic() - t0
    assert received == payload
    assert elapsed >= 1.5, f"200 kB at 100 kB/s took only {elapsed:.2f} s"

    proxy.bandwidth(None)
    await _echo_round_trip(reader, writer, payload)  # unlimited again, data intact
    writer.close()
    await writer.wait_closed()


# ---------------------------------------------------------- refuse/accept


async def test_refuse_rejects_new_connections_only(nats_server: NatsServer, nats_proxy: TcpProxy, unique: str) -> None:
    responder = await _responder(nats_server, f"svc.{unique}")
    events = NatsEvents()
    nc = await _proxied_client(nats_proxy, events)
    try:
        nats_proxy.refuse()
        assert nats_proxy.refusing
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*nats_proxy.address)
        with pytest.raises(nats.errors.NoServersError):
            await asyncio.wait_for(
                nats.connect(
                    nats_proxy.url("nats"),
                    allow_reconnect=False,
                    max_reconnect_attempts=1,  # 0 would mean "forever" for the initial connect
                    reconnect_time_wait=0.1,
                    connect_timeout=2,
                    error_cb=NatsEvents().on_error,
                ),
                15,
            )
        # The open connection is unaffected.
        assert (await nc.request(f"svc.{unique}", b"open", timeout=5)).data == b"re:open"

        # Broker "down": cut + refuse keeps the client disconnected...
        nats_proxy.cut()
        await asyncio.wait_for(events.disconnected.wait(), 10)
        await wait_until(
            lambda: sum(isinstance(e, ConnectionRefusedError) for e in events.errors) >= 3,
            10,
            "three refused reconnect attempts",
        )
        assert not nc.is_connected
        assert not events.reconnected.is_set()

        # ... until the proxy accepts again.
        nats_proxy.accept()
        await asyncio.wait_for(events.reconnected.wait(), 10)
        assert (await nc.request(f"svc.{unique}", b"back", timeout=5)).data == b"re:back"
    finally:
        await nc.close()
        await responder.close()


# ---------------------------------------------------------------- lifecycle


async def test_lifecycle_and_upstream_failure(echo_server: Address) -> None:
    proxy = TcpProxy(echo_server)
    proxy.stop()  # not started: no-op
    proxy.refuse()  # settings apply before start
    with proxy:
        proxy.start()  # idempotent
        assert proxy.running
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*proxy.address)
        proxy.accept()
        reader, writer = await asyncio.open_connection(*proxy.address)
        await _echo_round_trip(reader, writer, b"hi")
        proxy.stop()
        assert not proxy.running
        assert await reader.read(1) == b""  # stop() closed the connection
        writer.close()
        proxy.stop()
        proxy.start()  # restart on the same port
        reader, writer = await asyncio.open_connection(*proxy.address)
        await _echo_round_trip(reader, writer, b"again")
        proxy.blackhole()
        proxy.latency(20)
        proxy.bandwidth(1_000)
        assert "blackhole" in repr(proxy)
        proxy.heal()
        assert not proxy.blackholed
        assert not proxy.refusing
        await _echo_round_trip(reader, writer, os.urandom(100_000))  # would take 100 s at 1 kB/s
        writer.close()
    assert not proxy.running
    assert proxy.stats().connections_total == 2
    assert proxy.errors == []

    # Target not reachable: the client is accepted, then closed.
    with TcpProxy(("127.0.0.1", free_port())) as dead:
        reader, writer = await asyncio.open_connection(*dead.address)
        assert await reader.read(1) == b""
        writer.close()
        await wait_until(lambda: dead.stats().upstream_failures == 1, 10, "upstream failure counted")
        assert dead.errors == []
