"""The monitoring endpoint: health, readiness, Prometheus metrics, JSON views and the status page.

Served by aiohttp on the gateway's own event loop. Nothing here touches the
per-message path: every view reads the counters the routes and connectors
keep anyway, at the moment it is asked (a Prometheus scrape costs one pass
over the routes and connectors).

==========  ==================================================================
``/``        the status page (one self-contained HTML file, no external assets)
``/healthz`` 200 while the process runs its event loop
``/readyz``  200 when every connector a route uses is connected, else 503
             with the reasons
``/metrics`` Prometheus text exposition (``gateway_*`` and ``process_*``)
``/varz``    the process: id, version, uptime, config digest, totals
``/routez``  per route: state, budget, counters, latency quantiles
``/connz``   per connector: kind, broker address, state, reconnects, last error
``/reload``  POST: re-read the config file and apply it (what ``SIGHUP`` does)
==========  ==================================================================

The endpoint guards itself (:class:`ConnectionGuard`): at most ``max_connections`` connections, none
waiting longer than ``header_timeout`` for a request, so half-sent requests cannot hold the process's
file descriptors. Large views are built a slice at a time with the event loop running in between, so a
scrape of thousands of routes never stalls the messages.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import os
import socket
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import structlog
from aiohttp import web
from aiohttp.payload import AsyncIterablePayload
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from gateway import __version__
from gateway.core.route import Route
from gateway.core.stats import Ages, Backlog, Latency
from gateway.errors import GatewayError
from gateway.ops.httpguard import (
    HANDLER_ARGS,
    HEADER_TIMEOUT,
    MAX_CONNECTIONS,
    ConnectionGuard,
    GuardedHandler,
    GuardedSite,
)
from gateway.ops.metrics import CONTENT_TYPE, exposition
from gateway.routes.requests import RequestRoute
from gateway.routes.spooled import SpooledRoute
from gateway.util.redact import scrub

if TYPE_CHECKING:
    from gateway.app import Gateway

log = structlog.get_logger("gateway.http")


class MonitorError(GatewayError):
    """The endpoint could not be served (the address is taken, say)."""


# ------------------------------------------------------------------------------ JSON views


_BOUNDS = Latency().buckets
"""Upper bounds (seconds) of the latency buckets."""


def quantiles(lat: Latency, qs: tuple[float, ...] = (0.50, 0.90, 0.99)) -> list[float | None]:
    """``[lat.quantile(q) for q in qs]`` from one read of the buckets (/routez reads thousands of routes)."""
    counts = lat.bucket_counts()
    total = sum(counts)
    if total == 0:
        return [None] * len(qs)
    out: list[float | None] = []
    for q in qs:
        rank, seen, lower = q * total, 0, 0.0
        for upper, n in zip(_BOUNDS if type(lat) is Latency else lat.buckets, counts, strict=False):
            if n and seen + n >= rank:
                out.append(lower + (upper - lower) * (rank - seen) / n)
                break
            seen += n
            lower = upper
        else:
            out.append(lower)  # in the unbounded bucket: at least the largest bound
    return out


def route_view(route: Route) -> dict[str, Any]:
    s = route.stats
    lat = route.latency
    p50, p90, p99 = quantiles(lat)
    targets = [f"{t.connector}:{t.address.text}" for t in route.targets]
    return {
        "name": route.name,
        "source": route.source,
        "targets": targets,
        "dead_letter": route.dead_letter.connector if route.dead_letter is not None else None,
        "state": route.state.value,
        "saturated": route.saturated,
        "in_flight": route.in_flight,
        "in_flight_bytes": route.in_flight_bytes,
        "max_in_flight": route.max_in_flight,
        "max_in_flight_bytes": route.max_in_flight_bytes,
        "overflow": route.policy.overflow.value,
        "oldest_in_flight_seconds": round(route.oldest_in_flight(time.monotonic_ns()), 3),
        "stuck_after": route.stuck_bound(),
        "lag": route.backlog.messages if route.backlog is not None else None,
        **({"age": age_view(route.ages)} if route.ages.count else {}),
        **({"backlog": backlog_view(route.backlog)} if route.backlog is not None else {}),
        **s.as_dict(),
        **({"spool": route.spool_view()} if isinstance(route, SpooledRoute) else {}),
        **({"requests": route.requests.view()} if isinstance(route, RequestRoute) else {}),
        "latency": {
            "count": lat.count,
            "sum_seconds": lat.sum_ns / 1e9,
            "p50": p50,
            "p90": p90,
            "p99": p99,
        },
    }


def age_view(ages: Ages) -> dict[str, Any]:
    """Freshness: how old messages were when the route admitted them (seconds), from the broker's stamps."""
    p50, p90, p99 = quantiles(ages)
    return {"count": ages.count, "p50": p50, "p90": p90, "p99": p99}


def backlog_view(backlog: Backlog) -> dict[str, Any]:
    """A route's consumer lag as its source last measured it, and how long ago."""
    return {
        "messages": backlog.messages,
        "measured_seconds_ago": round(time.monotonic() - backlog.measured, 1),
        **backlog.detail,
    }


def connector_view(gw: Gateway, name: str) -> dict[str, Any]:
    c = gw.connectors[name]
    return {
        "name": name,
        "kind": gw.config.kind(name),
        "endpoint": c.endpoint(),
        "state": c.state.value,
        "connected": c.connected.is_set(),
        "flapping": c.flapping,
        "used": c in gw.used_connectors,
        "reconnects": c.reconnects,
        "last_error": c.last_error,
        "sink_queue": c.sink.depth if c.has_sink else None,
        "channels": [
            {
                "name": ch.name,
                "state": ch.state.value,
                "reconnects": ch.reconnects,
                "flapping": ch.flapping,
                "last_error": ch.last_error,
            }
            for ch in c.channels
        ],
        **c.counters(),
    }


def varz(gw: Gateway) -> dict[str, Any]:
    received = sent = acked = failed = dead_lettered = retried = dropped = in_flight = in_flight_bytes = 0
    for r in gw.routes.values():  # one pass: /varz stays cheap with 10 000 routes (~3 ms)
        s = r.stats
        received += s.received
        sent += s.sent
        acked += s.acked
        failed += s.failed
        dead_lettered += s.dead_lettered
        retried += s.retried
        dropped += s.dropped_overflow + s.dropped_released
        in_flight += r.in_flight
        in_flight_bytes += r.in_flight_bytes
    totals = {
        "received": received,
        "sent": sent,
        "acked": acked,
        "failed": failed,
        "dead_lettered": dead_lettered,
        "retried": retried,
        "dropped": dropped,
        "in_flight": in_flight,
        "in_flight_bytes": in_flight_bytes,
    }
    return {
        "id": gw.config.gateway.id,
        "version": __version__,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "state": gw.state.value,
        "ready": gw.ready,
        "started_at": gw.started_at,
        "uptime_seconds": gw.uptime,
        "now": time.time(),
        "config": {"source": gw.config.source, "sha256": gw.config.digest, "reloads": gw.reloads},
        "connectors": len(gw.connectors),
        "routes": len(gw.routes),
        "totals": totals,
    }


def readiness(gw: Gateway) -> tuple[bool, dict[str, Any]]:
    reasons = {
        c.name: ("flapping" if c.connected.is_set() else c.state.value) + (f": {c.last_error}" if c.last_error else "")
        for c in gw.used_connectors
        if not c.healthy
    }
    if gw.state.value != "running":
        reasons["gateway"] = gw.state.value
    return not reasons, {"ready": not reasons, "not_ready": reasons}


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


def _accepts_gzip(request: web.Request) -> bool:
    for coding in request.headers.get("Accept-Encoding", "").split(","):
        name, _, params = coding.partition(";")
        if name.strip().lower() == "gzip":
            return params.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


# ------------------------------------------------------------------------------ the server


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=_dumps)


def _dumps(data: Any) -> str:
    """JSON, with any registered secret that reached a field (a library's error text, say) masked."""
    return scrub(msgspec.json.encode(data).decode())


class Monitor:
    """The HTTP endpoint of one gateway; ``start()`` binds, ``stop()`` closes."""

    def __init__(
        self,
        gw: Gateway,
        listen: str,
        reload: Callable[[], Awaitable[tuple[bool, dict[str, Any]]]] | None = None,
        token: str | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout: float = HEADER_TIMEOUT,
        internal: bool = False,
    ) -> None:
        self.gw = gw
        self.internal = internal
        """A worker's endpoint, asked by its supervisor only (logged as ``worker.listening``)."""
        self.listen = listen
        self._reload = reload
        self._token = token.encode() if token else None
        self.guard = ConnectionGuard(max_connections, header_timeout)
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        self._runner: web.AppRunner | None = None
        self._rendering: asyncio.Task[list[bytes]] | None = None
        self.port = 0
        """The port actually bound (useful with port 0)."""

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
        if self._token is None or request.path in _OPEN_PATHS:
            return await handler(request)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token):
            return await handler(request)
        return web.json_response(
            {"ok": False, "errors": ["this endpoint needs Authorization: Bearer <gateway.http.token>"]},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="gateway"'},
        )

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
        assert runner.server is not None
        self.guard.bind(runner.server)
        site = GuardedSite(runner, host, int(port), self.guard)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise MonitorError(
                f"cannot serve HTTP on {self.listen}: {exc.strerror or exc} "
                '(set gateway.http.listen to another host:port, or to "" to disable it)'
            ) from exc
        self._runner = runner
        self.port = int(runner.addresses[0][1]) if runner.addresses else int(port)
        log.info(
            "worker.listening" if self.internal else "http.listening",
            url=f"http://{_hostport(host, self.port)}/",
            token=self._token is not None,
            max_connections=self.guard.limit,
            header_timeout=self.guard.header_timeout,
        )
        if self._token is None and not _loopback(host) and not self.internal:
            log.warning(
                "http.unauthenticated",
                listen=self.listen,
                hint="anyone who reaches this address can read the status and POST /reload: "
                "set gateway.http.token_file or listen on 127.0.0.1",
            )

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        self.guard.close()
        if self._rendering is not None:
            self._rendering.cancel()

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

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok", "uptime_seconds": self.gw.uptime})

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, body = readiness(self.gw)
        return _json(body, 200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return self._stream(request, await self.exposition(), CONTENT_TYPE, gzip=_accepts_gzip(request))

    async def exposition(self) -> list[bytes]:
        """The current Prometheus exposition, in chunks. Scrapes that arrive while one is written share it."""
        task = self._rendering
        if task is None:
            task = self._rendering = asyncio.get_running_loop().create_task(self._render(), name="http:metrics")
            task.add_done_callback(self._rendered)
        return await asyncio.shield(task)

    def _rendered(self, task: asyncio.Task[list[bytes]]) -> None:
        if self._rendering is task:
            self._rendering = None

    async def _render(self) -> list[bytes]:
        chunks = [chunk.encode() async for chunk in _paced(exposition(self.gw)) if chunk]
        chunks.append(self.guard.metrics().encode())
        chunks.append(generate_latest(self.registry))
        return chunks

    async def _varz(self, request: web.Request) -> web.Response:
        return _json(varz(self.gw))

    async def _routez(self, request: web.Request) -> web.Response:
        views: list[str] = []
        async for route in _paced(list(self.gw.routes.values())):
            views.append(_dumps(route_view(route)))
        step = 64  # routes per chunk written (~36 KB)
        chunks = [",".join(views[i : i + step]).encode() for i in range(0, len(views), step)]
        body = [b'{"routes":[', *(c if i == 0 else b"," + c for i, c in enumerate(chunks)), b"]}"]
        return self._stream(request, body, "application/json; charset=utf-8")

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

    async def _connz(self, request: web.Request) -> web.Response:
        return _json({"connectors": [connector_view(self.gw, n) for n in self.gw.connectors]})


_OPEN_PATHS = frozenset({"/", "/healthz", "/readyz"})


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
