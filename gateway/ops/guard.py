"""The monitoring endpoints' connection guard: a cap on open connections and a timeout for request heads.

Neither of the HTTP servers under the endpoints has these (see docs/decisions/http-connection-guard.md):
:class:`ConnectionGuard` is the protocol factory of the listening socket and hears from each connection when
it opens, closes, and when a request is in progress. It knows nothing of HTTP: a connection is anything with
the :class:`Guarded` shape (aiohttp's request handler in :mod:`gateway.ops.httpguard`, the supervisor's
connections in :mod:`gateway.ops.lighthttp`). It imports no HTTP library, so that a supervisor stays small.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol, cast

import structlog

from gateway.ops.text import family
from gateway.util.flood import Flood

log = structlog.get_logger("gateway.http")


class Guarded(Protocol):
    """A connection as the guard sees it."""

    counted: bool
    """Counted in ``guard.open`` (until the guard or the client closes it)."""

    @property
    def transport(self) -> asyncio.Transport | None: ...

    def force_close(self) -> None:
        """Close the connection (after what is being written, if anything)."""


MAX_CONNECTIONS = 128
"""Connections the endpoint keeps open at once (browsers take up to 6 per page, Prometheus 1 or 2)."""
HEADER_TIMEOUT = 10.0
"""Seconds a connection may go without a request in progress: to send its request's head after connecting,
and after each response to read it and send the next (an idle keep-alive connection closes then)."""
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 21\r\n\r\ntoo many connections\n"
)
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
        self._idle: OrderedDict[Guarded, float] = OrderedDict()
        """Idle connections, oldest first, with the loop time they expire at."""
        self._timer: asyncio.TimerHandle | None = None
        self._factory: Callable[[], asyncio.BaseProtocol] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flood = Flood(LOG_EVERY)

    def bind(self, factory: Callable[[], asyncio.BaseProtocol]) -> None:
        """Serve connections with the protocols ``factory`` makes (each a :class:`Guarded` that calls
        :meth:`idle` once connected and :meth:`lost` once closed), on the running loop."""
        self._factory = factory
        self._loop = asyncio.get_running_loop()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def protocol(self) -> asyncio.BaseProtocol:
        """The listening socket's protocol factory: a connection, or a refusal."""
        assert self._factory is not None and self._loop is not None, "bind() first"
        if self.open >= self.limit:
            if not self._idle:
                self.closed["refused"] += 1
                self._warn()
                return _Refused()
            self._close(next(iter(self._idle)), "evicted")
            self._warn()
        self.open += 1
        return self._factory()

    def idle(self, conn: Guarded) -> None:
        """``conn`` waits for a request (it just connected, or a handler returned)."""
        if not conn.counted or conn.transport is None or self._loop is None:
            return
        self._idle.pop(conn, None)
        self._idle[conn] = self._loop.time() + self.header_timeout
        if self._timer is None:
            self._timer = self._loop.call_at(next(iter(self._idle.values())), self._expire)

    def touch(self, conn: Guarded) -> None:
        """``conn``'s client took part of a response: its timeout starts again (a slow reader is not cut off)."""
        if conn in self._idle:
            self.idle(conn)

    def busy(self, conn: Guarded) -> None:
        """A handler runs for ``conn``: no timeout, never evicted."""
        self._idle.pop(conn, None)

    def lost(self, conn: Guarded) -> None:
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

    def _close(self, conn: Guarded, reason: str) -> None:
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


class _Refused(asyncio.Protocol):
    """A connection over the limit while every open one is busy: a 503, closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(_REFUSAL)  # uvloop's transports do not subclass asyncio's
        transport.close()
