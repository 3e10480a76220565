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

import os
import socket
import time
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from gateway import __version__
from gateway.core.route import Route
from gateway.core.stats import Ages, Backlog, Latency
from gateway.ops.endpoint import Endpoint, MonitorError, _dumps, _json, _paced
from gateway.ops.httpguard import HEADER_TIMEOUT, MAX_CONNECTIONS
from gateway.ops.lighthttp import Reload
from gateway.ops.metrics import exposition
from gateway.routes.requests import RequestRoute
from gateway.routes.spooled import SpooledRoute

if TYPE_CHECKING:
    from gateway.app import Gateway

log = structlog.get_logger("gateway.http")

__all__ = ["Monitor", "MonitorError", "connector_view", "readiness", "route_view", "varz"]


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


class Monitor(Endpoint):
    """The HTTP endpoint of one gateway; ``start()`` binds, ``stop()`` closes."""

    def __init__(
        self,
        gw: Gateway,
        listen: str,
        reload: Reload | None = None,
        token: str | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout: float = HEADER_TIMEOUT,
        internal: bool = False,
    ) -> None:
        super().__init__(
            listen, reload, token, max_connections=max_connections, header_timeout=header_timeout, internal=internal
        )
        self.gw = gw
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok", "uptime_seconds": self.gw.uptime})

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, body = readiness(self.gw)
        return _json(body, 200 if ok else 503)

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

    async def _connz(self, request: web.Request) -> web.Response:
        return _json({"connectors": [connector_view(self.gw, n) for n in self.gw.connectors]})
