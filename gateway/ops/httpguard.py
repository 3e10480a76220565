"""The HTTP endpoint's connection guard: a cap on open connections and a timeout for request heads.

aiohttp's server has neither (recent versions arm the keep-alive timeout at connect, an hour by default;
nothing bounds the number of connections): 10 000 half-sent requests held 10 028 of a gateway's file
descriptors for as long as their clients liked. :class:`ConnectionGuard` is the protocol factory of the
listening socket (:class:`GuardedSite`) and hears from each connection's handler when it opens, closes,
and when a request is in progress (the monitor's outermost middleware calls :meth:`~ConnectionGuard.busy`
and :meth:`~ConnectionGuard.idle`).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any, cast

import structlog
from aiohttp import web

from gateway.ops.text import family
from gateway.util.flood import Flood

log = structlog.get_logger("gateway.http")

MAX_CONNECTIONS = 128
"""Connections the endpoint keeps open at once (browsers take up to 6 per page, Prometheus 1 or 2)."""
HEADER_TIMEOUT = 10.0
"""Seconds a connection may go without a request in progress: to send its request's head after connecting,
and after each response to read it and send the next (an idle keep-alive connection closes then)."""
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 21\r\n\r\ntoo many connections\n"
)
HANDLER_ARGS: dict[str, Any] = {"access_log": None}
"""Keyword arguments of aiohttp's request handlers: no access log (nothing is logged per request)."""
LOG_EVERY = 10.0
"""Seconds between two ``http.connections_limited`` warnings (a flood of connections logs a summary)."""


class ConnectionGuard:
    """At most ``limit`` open connections, none idle for longer than ``header_timeout``.

    A connection is *idle* while no handler runs for it: from connect until its request's head has been
    read, and again from the end of a handler until the next request (aiohttp writes the response
    meanwhile). An idle connection is closed ``header_timeout`` after it became idle. At the limit, a new
    connection closes the oldest idle one (where half-sent requests pile up); only when every open
    connection is inside a handler is the new one refused (503, closed at once). So however many
    connections a client opens, the endpoint holds at most ``limit`` file descriptors, and a client
    that sends its request at once (a liveness probe) is served.

    Every idle connection has the same timeout, so the order they became idle in is the order they
    expire in: one timer, set for the oldest, serves them all.
    """

    def __init__(self, limit: int = MAX_CONNECTIONS, header_timeout: float = HEADER_TIMEOUT) -> None:
        self.limit = limit
        self.header_timeout = header_timeout
        self.open = 0
        """Connections accepted and not closed yet (by the guard or the client)."""
        self.closed = dict.fromkeys(("timeout", "evicted", "refused"), 0)
        """Connections the guard closed, by reason."""
        self._idle: OrderedDict[GuardedHandler, float] = OrderedDict()
        """Idle connections, oldest first, with the loop time they expire at."""
        self._timer: asyncio.TimerHandle | None = None
        self._server: web.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flood = Flood(LOG_EVERY)

    def bind(self, server: web.Server) -> None:
        """Serve connections with ``server``'s request handlers, on the running loop."""
        self._server = server
        self._loop = asyncio.get_running_loop()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def protocol(self) -> asyncio.BaseProtocol:
        """The listening socket's protocol factory: a request handler, or a refusal."""
        assert self._server is not None and self._loop is not None, "bind() first"
        if self.open >= self.limit:
            if not self._idle:
                self.closed["refused"] += 1
                self._warn()
                return _Refused()
            self._close(next(iter(self._idle)), "evicted")
            self._warn()
        self.open += 1
        return GuardedHandler(self, self._server, loop=self._loop, **HANDLER_ARGS)

    def idle(self, conn: GuardedHandler) -> None:
        """``conn`` waits for a request (it just connected, or a handler returned)."""
        if not conn.counted or conn.transport is None or self._loop is None:
            return
        self._idle.pop(conn, None)
        self._idle[conn] = self._loop.time() + self.header_timeout
        if self._timer is None:
            self._timer = self._loop.call_at(next(iter(self._idle.values())), self._expire)

    def touch(self, conn: GuardedHandler) -> None:
        """``conn``'s client took part of a response: its timeout starts again (a slow reader is not cut off)."""
        if conn in self._idle:
            self.idle(conn)

    def busy(self, conn: GuardedHandler) -> None:
        """A handler runs for ``conn``: no timeout, never evicted."""
        self._idle.pop(conn, None)

    def lost(self, conn: GuardedHandler) -> None:
        self._idle.pop(conn, None)
        if conn.counted:
            conn.counted = False
            self.open -= 1

    def _expire(self) -> None:
        self._timer = None
        assert self._loop is not None
        now = self._loop.time()
        while self._idle:
            conn, deadline = next(iter(self._idle.items()))
            if deadline > now:
                self._timer = self._loop.call_at(deadline, self._expire)
                return
            self._close(conn, "timeout")

    def _close(self, conn: GuardedHandler, reason: str) -> None:
        del self._idle[conn]
        conn.counted = False
        self.open -= 1
        self.closed[reason] += 1
        transport = conn.transport
        if transport is not None and transport.get_write_buffer_size():
            transport.abort()  # a client that does not read its response: drop what it has not taken
        conn.force_close()

    def _warn(self) -> None:
        """A connection was evicted or refused: say so at most every LOG_EVERY seconds, never once per connection."""
        if n := self._flood.count():
            log.warning(
                "http.connections_limited",
                limit=self.limit,
                header_timeout=self.header_timeout,
                connections=n,
                closed=dict(self.closed),
                hint="more connections than the endpoint keeps open (half-sent requests?): the oldest idle ones "
                "are closed, and new ones refused while every connection is busy",
            )

    def metrics(self) -> str:
        closed = [(f'{{reason="{reason}"}}', n) for reason, n in self.closed.items()]
        return "".join(
            (
                family("gateway_http_connections", "gauge", "Connections open to the HTTP endpoint", [("", self.open)]),
                family(
                    "gateway_http_max_connections",
                    "gauge",
                    "Connections the HTTP endpoint keeps open at most",
                    [("", self.limit)],
                ),
                family(
                    "gateway_http_connections_closed_total",
                    "counter",
                    "Connections the HTTP endpoint closed itself: timeout (no request within the header timeout), "
                    "evicted (the oldest idle one, at the connection limit), refused (at the limit, all busy)",
                    closed,
                ),
            )
        )


class GuardedHandler(web.RequestHandler):
    """aiohttp's request handler, telling the guard when its connection opens and closes."""

    def __init__(self, guard: ConnectionGuard, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self.counted = True
        """Counted in ``guard.open`` (until the guard or the client closes it)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.guard.idle(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.guard.lost(self)
        super().connection_lost(exc)


class _Refused(asyncio.Protocol):
    """A connection over the limit while every open one is busy: a 503, closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(_REFUSAL)  # uvloop's transports do not subclass asyncio's
        transport.close()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a :class:`ConnectionGuard` (aiohttp's TCPSite has no hook)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard) -> None:
        super().__init__(runner)
        self._host, self._port, self._guard = host, port, guard

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.protocol, self._host, self._port, backlog=self._backlog, reuse_address=True
        )
