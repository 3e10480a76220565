"""The aiohttp side of the monitoring endpoint's connection guard (:mod:`gateway.ops.guard`): aiohttp's
request handler telling the guard when its connection opens and closes, and a TCP site whose connections
the guard makes.

aiohttp's server has neither a connection cap nor a timeout for request heads (recent versions arm the
keep-alive timeout at connect, an hour by default; nothing bounds the number of connections): 10 000
half-sent requests held 10 028 of a gateway's file descriptors for as long as their clients liked.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from gateway.ops.guard import HEADER_TIMEOUT, MAX_CONNECTIONS, ConnectionGuard

__all__ = ["HANDLER_ARGS", "HEADER_TIMEOUT", "MAX_CONNECTIONS", "ConnectionGuard", "GuardedHandler", "GuardedSite"]

HANDLER_ARGS: dict[str, Any] = {"access_log": None}
"""Keyword arguments of aiohttp's request handlers: no access log (nothing is logged per request)."""


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
