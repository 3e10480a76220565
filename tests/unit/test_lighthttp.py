"""The supervisor's HTTP server and client (gateway/ops/lighthttp.py) and its endpoint (gateway/ops/fleet.py), on
loopback sockets: what a single gateway's aiohttp endpoint answers, the same guard, and nothing else served.

The e2e side (a supervisor with workers, 2 000 half-sent requests) is in tests/e2e/test_endpoint_limits.py and
tests/e2e/test_workers.py.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from aiohttp import web

from gateway.ops.fleet import FleetMonitor, WorkerInfo
from gateway.ops.guard import ConnectionGuard
from gateway.ops.lighthttp import MAX_BODY, MAX_HEAD, Request, Response, Server, fetch
from tests.support.waits import wait_until


async def _exchange(port: int, data: bytes, *, until_close: bool = True) -> bytes:
    """Send raw bytes, return what comes back until the server closes (or 2 s of silence)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    got = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 2 if until_close else 0.5):
            got += chunk
    except TimeoutError:
        pass
    finally:
        writer.close()
    return got


class Echo:
    """A handler that answers with what it was asked; ``hold`` keeps a handler busy until set."""

    def __init__(self) -> None:
        self.hold: asyncio.Event | None = None
        self.asked: list[Request] = []

    async def __call__(self, request: Request) -> Response:
        self.asked.append(request)
        if self.hold is not None:
            await self.hold.wait()
        if request.path == "/boom":
            raise RuntimeError("a bug")
        body = f"{request.method} {request.path}".encode()
        return Response(200, [body[:3], body[3:]], [("Content-Type", "text/plain")])


@pytest.fixture
async def server() -> AsyncIterator[tuple[Server, Echo]]:
    echo = Echo()
    srv = Server(echo, ConnectionGuard(limit=3, header_timeout=0.3))
    await srv.start("127.0.0.1", 0)
    yield srv, echo
    await srv.stop()


async def test_keep_alive_pipelining_head_and_a_handler_bug(server: tuple[Server, Echo]) -> None:
    srv, echo = server
    two = b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\nHEAD /b HTTP/1.1\r\nHost: h\r\n\r\n"
    out = await _exchange(srv.port, two + b"GET /boom HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    first, second, third = out.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 OK\r\n") and first.endswith(b"\r\n\r\nGET /a")
    assert b"content-length: 7" in second.lower() and second.endswith(b"\r\n\r\n"), "HEAD: the head only"
    assert third.startswith(b"500 Internal Server Error") and b"internal error" in third
    assert [r.path for r in echo.asked] == ["/a", "/b", "/boom"]


async def test_bad_requests_get_their_status_and_the_connection_closes(server: tuple[Server, Echo]) -> None:
    srv, echo = server
    assert (await _exchange(srv.port, b"NOT HTTP AT ALL\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    huge_head = b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * (MAX_HEAD + 10) + b"\r\n\r\n"
    assert (await _exchange(srv.port, huge_head)).startswith(b"HTTP/1.1 431 ")
    body = b"x" * (MAX_BODY + 1)
    post = b"POST /reload HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    assert (await _exchange(srv.port, post)).startswith(b"HTTP/1.1 413 ")
    assert echo.asked == []


async def test_the_guard_times_out_idle_connections_evicts_the_oldest_and_refuses_when_all_are_busy(
    server: tuple[Server, Echo],
) -> None:
    srv, echo = server
    guard = srv.guard
    # Silent connections are closed once the header timeout passes.
    assert await _exchange(srv.port, b"GET / HTTP/1.1\r\n") == b""
    await wait_until(lambda: guard.closed["timeout"] >= 1 and guard.open == 0, 10, lambda: str(guard.closed))
    # At the cap (3), a new connection closes the oldest idle one.
    idle = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(3)]
    await wait_until(lambda: guard.open == 3, 10, "three open")
    _, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    assert await asyncio.wait_for(idle[0][0].read(), 5) == b"", "the oldest idle connection is closed"
    assert guard.closed["evicted"] == 1
    for _, w in idle:
        w.close()
    writer.close()
    await wait_until(lambda: guard.open == 0, 10, "all closed")
    # With every connection inside a handler, a new one gets a 503 and is closed.
    echo.hold = asyncio.Event()
    busy = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(3)]
    for _, w in busy:
        w.write(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
    await wait_until(lambda: len(echo.asked) == 3, 10, "three requests in their handlers")
    assert (await _exchange(srv.port, b"")).startswith(b"HTTP/1.1 503 ")
    assert guard.closed["refused"] == 1
    echo.hold.set()
    for r, w in busy:
        assert (await asyncio.wait_for(r.readuntil(b"GET /slow"), 5)).startswith(b"HTTP/1.1 200 OK")
        w.close()


async def test_fetch_reads_chunked_and_plain_answers_and_posts() -> None:
    """The client side, against aiohttp (what a worker's endpoint is): a streamed (chunked) answer, a POST."""

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(50):
            await resp.write(b"line %d\n" % i)
        await resp.write_eof()
        return resp

    async def post(request: web.Request) -> web.Response:
        return web.json_response({"method": request.method, "auth": request.headers.get("Authorization")})

    app = web.Application()
    app.router.add_get("/stream", stream)
    app.router.add_post("/reload", post)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        status, body = await fetch(port, "/stream")
        assert status == 200 and body == b"".join(b"line %d\n" % i for i in range(50))
        status, body = await fetch(port, "/reload", method="POST", headers=[("Authorization", "Bearer t")])
        assert status == 200 and json.loads(body) == {"method": "POST", "auth": "Bearer t"}
        status, _ = await fetch(port, "/nope")
        assert status == 404
    finally:
        await runner.cleanup()
    with pytest.raises(ConnectionRefusedError):
        await fetch(port, "/stream")


class NoWorkers:
    """A supervisor whose one worker has not reported its endpoint yet."""

    gateway_id = "edge"
    version = "0.0.0"
    count = 1
    started_at = 0.0

    def workers(self) -> Sequence[WorkerInfo]:
        return [WorkerInfo(0, None, None, "starting", 0, None, None)]

    def partitions(self, route: str) -> bool:
        return False


async def test_the_supervisor_endpoint_checks_token_path_and_method_and_gzips_metrics() -> None:
    async def reload() -> tuple[bool, dict[str, Any]]:
        return True, {"ok": True}

    monitor = FleetMonitor(NoWorkers(), "127.0.0.1:0", "worker-token", reload=reload, token="s3cret")
    await monitor.start()
    port = monitor.port
    auth = [("Authorization", "Bearer s3cret")]
    try:
        status, body = await fetch(port, "/healthz")
        assert status == 200 and json.loads(body)["workers"] == {"0": "starting"}
        status, body = await fetch(port, "/readyz")
        assert status == 503 and json.loads(body)["not_ready"] == {"worker 0": "starting"}
        status, body = await fetch(port, "/")
        assert status == 200 and b"<html" in body.lower()
        assert (await fetch(port, "/metrics"))[0] == 401
        assert (await fetch(port, "/metrics", headers=[("Authorization", "Bearer nope")]))[0] == 401
        status, plain = await fetch(port, "/metrics", headers=auth)
        assert status == 200 and b'gateway_worker_up{worker="0"} 0' in plain
        status, zipped = await fetch(port, "/metrics", headers=[*auth, ("Accept-Encoding", "gzip")])
        assert status == 200 and b"gateway_workers 1" in gzip.decompress(zipped)
        assert (await fetch(port, "/reload", headers=auth))[0] == 405, "GET /reload"
        assert (await fetch(port, "/varz", method="POST", headers=auth))[0] == 405
        assert (await fetch(port, "/reload", method="POST", headers=auth)) == (200, b'{"ok":true}')
        assert (await fetch(port, "/nope", headers=auth))[0] == 404
    finally:
        await monitor.stop()


async def test_odd_but_valid_requests_and_connect() -> None:
    echo = Echo()
    srv = Server(echo, ConnectionGuard())
    await srv.start("127.0.0.1", 0)
    try:
        absolute = await _exchange(
            srv.port, b"GET http://gw:8080/met%72ics?x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
        )
        assert absolute.endswith(b"GET /metrics"), absolute
        head = b"POST /reload HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(head)
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 100 ")
        writer.write(b"{}")
        assert (await asyncio.wait_for(reader.readuntil(b"POST /reload"), 5)).startswith(b"HTTP/1.1 200 OK")
        writer.close()
        connect = await _exchange(srv.port, b"CONNECT gw:443 HTTP/1.1\r\nHost: gw:443\r\n\r\n")
        assert connect.startswith(b"HTTP/1.1 405 ") and b"connection: close" in connect.lower()
        assert [r.path for r in echo.asked] == ["/metrics", "/reload"]
    finally:
        await srv.stop()


async def test_stop_closes_idle_connections_and_answers_the_request_in_progress() -> None:
    echo = Echo()
    echo.hold = asyncio.Event()
    srv = Server(echo, ConnectionGuard())
    await srv.start("127.0.0.1", 0)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", srv.port)
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", srv.port)
    busy_writer.write(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
    await wait_until(lambda: len(echo.asked) == 1, 10, "the request in its handler")
    stopping = asyncio.ensure_future(srv.stop())
    assert await asyncio.wait_for(idle_reader.read(), 5) == b"", "an idle connection is closed at once"
    assert not stopping.done()
    echo.hold.set()
    answer = await asyncio.wait_for(busy_reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in answer.lower(), answer
    await asyncio.wait_for(stopping, 5)
    idle_writer.close()
    busy_writer.close()
