"""A small HTTP/1.1 server and client on asyncio streams, with h11 doing all of HTTP: the supervisor's endpoint.

The supervisor of worker processes must stay small (idle RSS ≤ 30 MB); aiohttp alone costs it ~10 MB and
h11 ~0.3 MB (docs/decisions/supervisor-http.md). h11 parses and writes every request and response (heads,
bodies, chunked encoding, keep-alive, pipelining); this module only moves bytes between it and the socket,
and puts each connection under the same :class:`~gateway.ops.guard.ConnectionGuard` as the gateway's
aiohttp endpoint (a cap on open connections, a timeout for request heads).

Also here, the small pieces both endpoints share (they import no HTTP library).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import h11
import structlog

from gateway.errors import GatewayError
from gateway.ops.guard import HEADER_TIMEOUT, MAX_CONNECTIONS, ConnectionGuard

log = structlog.get_logger("gateway.http")

MAX_HEAD = 16 * 1024
"""Bytes of a request's line and headers (aiohttp's default limit is 8 190 per line)."""
MAX_BODY = 64 * 1024
"""Bytes of a request's body: the endpoint's one POST (``/reload``) takes none."""
READ_SIZE = 64 * 1024
OPEN_PATHS = frozenset({"/", "/healthz", "/readyz"})
"""Paths an endpoint serves without its token: the probes and the (data-free) page."""
CLOSE_TIMEOUT = 5.0
"""Seconds ``stop()`` waits for requests in progress."""


class MonitorError(GatewayError):
    """The endpoint could not be served (the address is taken, say)."""


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    """Without the query string."""
    headers: dict[str, str]
    """Lower-case names; a repeated header's values joined with ``, ``."""


@dataclass(slots=True)
class Response:
    status: int
    body: Sequence[bytes] = ()
    """Written a chunk at a time (the loop runs between chunks; each chunk the client takes restarts its
    connection's timeout)."""
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]
Reload = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]
"""What ``/reload`` calls: (applied, the answer's body)."""
NEEDS_TOKEN = {"ok": False, "errors": ["this endpoint needs Authorization: Bearer <gateway.http.token>"]}
"""The body of a 401 (with ``WWW-Authenticate: Bearer realm="gateway"``)."""
_REASONS = {200: b"OK"}


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` value accepts gzip."""
    for coding in accept_encoding.split(","):
        name, _, params = coding.partition(";")
        if name.strip().lower() == "gzip":
            return params.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Shared:
    """An exposition being rendered, shared by every scrape that arrives meanwhile (one render for many)."""

    def __init__(self, render: Callable[[], Coroutine[Any, Any, list[bytes]]]) -> None:
        self._render = render
        self._task: asyncio.Task[list[bytes]] | None = None

    async def get(self) -> list[bytes]:
        task = self._task
        if task is None:
            task = self._task = asyncio.get_running_loop().create_task(self._render(), name="http:metrics")
            task.add_done_callback(self._done)
        return await asyncio.shield(task)

    def _done(self, task: asyncio.Task[list[bytes]]) -> None:
        if self._task is task:
            self._task = None

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class EndpointCore:
    """What every monitoring endpoint keeps, whatever serves its HTTP (aiohttp for a gateway,
    :class:`Server` for a supervisor): its address, ``/reload``'s callback, the bearer token, the connection
    guard and the shared exposition. Subclasses render the exposition (:meth:`_render`)."""

    def __init__(
        self,
        listen: str,
        reload: Reload | None = None,
        token: str | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout: float = HEADER_TIMEOUT,
        internal: bool = False,
    ) -> None:
        self.internal = internal
        """A worker's endpoint, asked by its supervisor only (logged as ``worker.listening``)."""
        self.listen = listen
        self._reload = reload
        self._token = token.encode() if token else None
        self.guard = ConnectionGuard(max_connections, header_timeout)
        self._exposition = Shared(self._render)
        self.port = 0
        """The port actually bound (useful with port 0)."""

    def authorized(self, path: str, authorization: str) -> bool:
        """Whether a request for ``path`` with this ``Authorization`` value may be answered: without a token
        every path, with one the open paths and a matching ``Bearer``."""
        if self._token is None or path in OPEN_PATHS:
            return True
        scheme, _, given = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token)

    def bind_error(self, exc: OSError) -> MonitorError:
        return MonitorError(
            f"cannot serve HTTP on {self.listen}: {exc.strerror or exc} "
            '(set gateway.http.listen to another host:port, or to "" to disable it)'
        )

    def announce(self, host: str) -> None:
        """Log where the endpoint listens, and warn when it is open beyond loopback without a token."""
        log.info(
            "worker.listening" if self.internal else "http.listening",
            url=f"http://{hostport(host, self.port)}/",
            token=self._token is not None,
            max_connections=self.guard.limit,
            header_timeout=self.guard.header_timeout,
        )
        if self._token is None and not is_loopback(host) and not self.internal:
            log.warning(
                "http.unauthenticated",
                listen=self.listen,
                hint="anyone who reaches this address can read the status and POST /reload: "
                "set gateway.http.token_file or listen on 127.0.0.1",
            )

    async def exposition(self) -> list[bytes]:
        """The current Prometheus exposition, in chunks. Scrapes that arrive while one is built share it."""
        return await self._exposition.get()

    async def _render(self) -> list[bytes]:
        raise NotImplementedError


def gzipped(chunks: Sequence[bytes]) -> list[bytes]:
    """``chunks`` as one gzip stream (level 1: 10 to 20 times smaller for an exposition)."""
    z = zlib.compressobj(1, zlib.DEFLATED, 31)
    out = [data for chunk in chunks if (data := z.compress(chunk))]
    out.append(z.flush())
    return out


class _Connection(asyncio.StreamReaderProtocol):
    """One accepted connection: a stream protocol the guard counts (the :class:`~gateway.ops.guard.Guarded`
    shape), served by its own task."""

    def __init__(self, server: Server) -> None:
        self._reader = asyncio.StreamReader(limit=READ_SIZE)
        super().__init__(self._reader)
        self.server = server
        self.counted = True
        self._sock: asyncio.Transport | None = None
        self.serving: asyncio.Task[None] | None = None
        self.busy = False
        """A handler runs for this connection."""

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._sock

    def force_close(self) -> None:
        if self._sock is not None:
            self._sock.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._sock = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.server.guard.idle(self)
        loop = asyncio.get_running_loop()
        writer = asyncio.StreamWriter(self._sock, self, self._reader, loop)
        self.serving = loop.create_task(self.server.serve(self, self._reader, writer))
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.guard.lost(self)
        self.server.connections.discard(self)
        self._sock = None
        super().connection_lost(exc)


class Server:
    """Serves ``handler`` on a TCP address under ``guard``; ``start()`` binds, ``stop()`` closes."""

    def __init__(self, handler: Handler, guard: ConnectionGuard) -> None:
        self.handler = handler
        self.guard = guard
        self.connections: set[_Connection] = set()
        self._answering = 0
        self._quiet = asyncio.Event()
        """Set while no handler runs."""
        self._quiet.set()
        self._closing = False
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self.guard.bind(lambda: _Connection(self))
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.guard.protocol, host or None, port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening, close idle connections, give requests in progress up to :data:`CLOSE_TIMEOUT` to be
        answered (with ``Connection: close``), then close the rest."""
        self._closing = True
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self.connections):
            if not conn.busy:
                conn.force_close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._quiet.wait(), CLOSE_TIMEOUT)
        for conn in list(self.connections):
            conn.force_close()
            if conn.serving is not None:
                conn.serving.cancel()
        self.guard.close()

    async def serve(self, conn: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests of one connection, one after another, until either side closes it."""
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while True:
                request = await self._read(h, reader, writer)
                if request is None or self._closing:
                    return
                self.guard.busy(conn)
                conn.busy = True
                self._answering += 1
                self._quiet.clear()
                try:
                    response = await self._answer(request)
                finally:
                    conn.busy = False
                    self._answering -= 1
                    if not self._answering:
                        self._quiet.set()
                    self.guard.idle(conn)
                if self._closing:
                    response.headers.append(("Connection", "close"))
                await self._write(h, writer, conn, request, response)
                if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                    return
                h.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if h.our_state in (h11.IDLE, h11.SEND_RESPONSE) and not writer.is_closing():
                status = exc.error_status_hint
                text = f"{status} {HTTPStatus(status).phrase}: {exc}\n".encode()
                refusal = Response(status, [text], [("Content-Type", "text/plain"), ("Connection", "close")])
                with contextlib.suppress(h11.LocalProtocolError, OSError, ConnectionError):
                    await self._write(h, writer, conn, None, refusal)
        except h11.LocalProtocolError:  # an answer HTTP does not allow here: nothing more can be said
            log.warning("http.protocol_error", error="an answer the request does not allow; connection closed")
        except (OSError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _read(
        self, h: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Request | None:
        """The next request, its body read and dropped (None: the client closed the connection)."""
        request: Request | None = None
        size = 0
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(await reader.read(READ_SIZE))
            elif isinstance(event, h11.Request):
                # h11 bounds a head that is still arriving; one that came whole in a read is bounded here.
                if len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers) > MAX_HEAD:
                    raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
                headers: dict[str, str] = {}
                for name, value in event.headers:
                    key = name.decode("latin-1")
                    text = value.decode("latin-1")
                    headers[key] = f"{headers[key]}, {text}" if key in headers else text
                method = event.method.decode("ascii")
                if method == "CONNECT":  # a tunnel: never a request of this endpoint
                    raise h11.RemoteProtocolError("CONNECT is not served here", error_status_hint=405)
                path = urlsplit(event.target.decode("latin-1")).path  # origin or absolute form
                request = Request(method, unquote(path) or "/", headers)
                if h.they_are_waiting_for_100_continue:
                    writer.write(h.send(h11.InformationalResponse(status_code=100, headers=[])))
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY:
                    raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    async def _answer(self, request: Request) -> Response:
        try:
            return await self.handler(request)
        except Exception:  # a bug: answered in words, the traceback goes to the log
            log.exception("http.handler_failed", path=request.path)
            body = b'{"ok": false, "errors": ["internal error: see the gateway\'s log"]}'
            return Response(500, [body], [("Content-Type", "application/json; charset=utf-8")])

    async def _write(
        self,
        h: h11.Connection,
        writer: asyncio.StreamWriter,
        conn: _Connection,
        request: Request | None,
        response: Response,
    ) -> None:
        body = response.body
        length = sum(len(chunk) for chunk in body)
        headers = [*response.headers, ("Content-Length", str(length))]
        reason = _REASONS.get(response.status) or HTTPStatus(response.status).phrase.encode()
        writer.write(h.send(h11.Response(status_code=response.status, headers=headers, reason=reason)))
        if request is None or request.method != "HEAD":
            for chunk in body:
                writer.write(h.send(h11.Data(data=chunk)))
                await writer.drain()
                self.guard.touch(conn)
        writer.write(h.send(h11.EndOfMessage()))
        await writer.drain()


async def fetch(
    port: int, path: str, *, method: str = "GET", headers: Sequence[tuple[str, str]] = (), timeout: float = 5.0
) -> tuple[int, bytes]:
    """``method path`` on ``127.0.0.1:port``: (status, body). One connection per request (loopback: a connect
    costs less than keeping connections). Raises OSError, TimeoutError or h11.ProtocolError."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            h = h11.Connection(h11.CLIENT)
            head = [("Host", f"127.0.0.1:{port}"), ("Connection", "close"), *headers]
            if method == "POST":
                head.append(("Content-Length", "0"))
            writer.write(h.send(h11.Request(method=method, target=path, headers=head)))
            writer.write(h.send(h11.EndOfMessage()))
            await writer.drain()
            status = 0
            body: list[bytes] = []
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    h.receive_data(await reader.read(READ_SIZE))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return status, b"".join(body)
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionError("the server closed the connection before its answer")
        finally:
            writer.close()
