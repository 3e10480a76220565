"""The HTTP server under the monitoring endpoints: the connection guard, the bearer token, the paths every
endpoint has, responses streamed a chunk at a time. :class:`gateway.ops.monitor.Monitor` serves one gateway
from its own routes and connectors; :class:`gateway.ops.fleet.FleetMonitor` serves a supervisor of several
worker processes from their endpoints (it imports nothing of the per-message path: a supervisor stays small).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Iterable
from importlib import resources
from typing import Any, TypeVar

import msgspec
import structlog
from aiohttp import web
from aiohttp.payload import AsyncIterablePayload
from aiohttp.typedefs import Handler

from gateway.ops.httpguard import (
    HANDLER_ARGS,
    GuardedHandler,
    GuardedSite,
)
from gateway.ops.lighthttp import NEEDS_TOKEN, EndpointCore, MonitorError, accepts_gzip
from gateway.ops.text import CONTENT_TYPE
from gateway.util.redact import scrub

log = structlog.get_logger("gateway.http")

__all__ = ["Endpoint", "MonitorError"]


# ------------------------------------------------------------------------------ pacing

PAUSE = 0.002
"""Seconds of work between two turns of the event loop while a large view is built."""
SHUTDOWN_TIMEOUT = 5.0
"""Seconds ``stop()`` waits for requests in progress."""


T = TypeVar("T")


async def _paced(items: Iterable[T]) -> AsyncIterator[T]:
    """``items``, letting the event loop run at least every :data:`PAUSE` seconds."""
    deadline = time.perf_counter() + PAUSE
    for item in items:
        yield item
        if time.perf_counter() >= deadline:
            await asyncio.sleep(0)
            deadline = time.perf_counter() + PAUSE


# ------------------------------------------------------------------------------ the server


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=_dumps)


def _dumps(data: Any) -> str:
    """JSON, with any registered secret that reached a field (a library's error text, say) masked."""
    return scrub(msgspec.json.encode(data).decode())


class Endpoint(EndpointCore):
    """An HTTP endpoint on aiohttp; ``start()`` binds, ``stop()`` closes. Subclasses answer the paths."""

    _runner: web.AppRunner | None = None

    @web.middleware
    async def _track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Tell the guard a handler runs for the connection (it is not idle meanwhile)."""
        conn = request.protocol
        if not isinstance(conn, GuardedHandler):
            return await handler(request)
        self.guard.busy(conn)
        try:
            return await handler(request)
        finally:
            self.guard.idle(conn)

    @web.middleware
    async def _authorize(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """With a token: every path but the probes and the (data-free) page needs ``Authorization: Bearer``."""
        if self.authorized(request.path, request.headers.get("Authorization", "")):
            return await handler(request)
        return web.json_response(NEEDS_TOKEN, status=401, headers={"WWW-Authenticate": 'Bearer realm="gateway"'})

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._track, self._authorize])
        app.router.add_get("/", self._index)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/varz", self._varz)
        app.router.add_get("/routez", self._routez)
        app.router.add_get("/connz", self._connz)
        app.router.add_post("/reload", self._reload_config)
        return app

    async def start(self) -> None:
        host, _, port = self.listen.rpartition(":")
        host = host.strip("[]")
        runner = web.AppRunner(self.app(), handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT, **HANDLER_ARGS)
        await runner.setup()
        server = runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self.guard.bind(lambda: GuardedHandler(self.guard, server, loop=loop, **HANDLER_ARGS))
        site = GuardedSite(runner, host, int(port), self.guard)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise self.bind_error(exc) from exc
        self._runner = runner
        self.port = int(runner.addresses[0][1]) if runner.addresses else int(port)
        self.announce(host)

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        self.guard.close()
        self._exposition.cancel()

    async def _index(self, request: web.Request) -> web.Response:
        page = resources.files("gateway.ops").joinpath("status.html").read_text(encoding="utf-8")
        return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def _reload_config(self, request: web.Request) -> web.Response:
        """Re-read the config file and apply it: 200 with what changed, 400 with the problems."""
        if self._reload is None:
            return _json({"ok": False, "errors": ["reload is not available here"]}, 404)
        try:
            ok, body = await self._reload()
        except Exception as exc:  # a bug, not the file: answered in words, the traceback goes to the log
            log.exception("gateway.reload_failed")
            return _json({"ok": False, "errors": [f"reload failed: {type(exc).__name__}: {scrub(str(exc))}"]}, 500)
        return _json(body, 200 if ok else 400)

    async def _metrics(self, request: web.Request) -> web.Response:
        gzip = accepts_gzip(request.headers.get("Accept-Encoding", ""))
        return self._stream(request, await self.exposition(), CONTENT_TYPE, gzip=gzip)

    def _stream(
        self, request: web.Request, chunks: list[bytes], content_type: str, gzip: bool | None = None
    ) -> web.Response:
        """A response aiohttp writes a chunk at a time once the handler returned, the event loop running in
        between; each chunk the client takes restarts its connection's timeout (a stalled reader is cut off).
        ``gzip``: whether the client accepts it; None where the encoding is not negotiated."""
        conn = request.protocol
        guard = self.guard

        async def body() -> AsyncIterator[bytes]:
            z = zlib.compressobj(1, zlib.DEFLATED, 31) if gzip else None  # level 1: 10 to 20 times smaller
            async for chunk in _paced(chunks):
                data = z.compress(chunk) if z is not None else chunk
                if data:
                    yield data
                    if isinstance(conn, GuardedHandler):
                        guard.touch(conn)
            if z is not None:
                yield z.flush()

        headers = {} if gzip is None else {"Vary": "Accept-Encoding"}
        if gzip:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=AsyncIterablePayload(body(), content_type=content_type), headers=headers)

    # -- the paths a subclass answers ------------------------------------------------------------
    async def _healthz(self, request: web.Request) -> web.Response:
        raise NotImplementedError

    async def _readyz(self, request: web.Request) -> web.Response:
        raise NotImplementedError

    async def _varz(self, request: web.Request) -> web.Response:
        raise NotImplementedError

    async def _routez(self, request: web.Request) -> web.Response:
        raise NotImplementedError

    async def _connz(self, request: web.Request) -> web.Response:
        raise NotImplementedError
