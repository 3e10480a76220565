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
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from importlib import resources
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway import __version__
from gateway.channel import ConnectorState
from gateway.errors import GatewayError
from gateway.redact import scrub
from gateway.route import Route, RouteState
from gateway.spooled import SpooledRoute

if TYPE_CHECKING:
    from gateway.app import Gateway

log = structlog.get_logger("gateway.http")


class MonitorError(GatewayError):
    """The endpoint could not be served (the address is taken, say)."""


# ------------------------------------------------------------------------------ JSON views


def route_view(route: Route) -> dict[str, Any]:
    s = route.stats
    lat = route.latency
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
        **s.as_dict(),
        **({"spool": route.spool_view()} if isinstance(route, SpooledRoute) else {}),
        **({"requests": route.requests.view()} if route.requests is not None else {}),
        "latency": {
            "count": lat.count,
            "sum_seconds": lat.sum_ns / 1e9,
            "p50": lat.quantile(0.50),
            "p90": lat.quantile(0.90),
            "p99": lat.quantile(0.99),
        },
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
    routes = list(gw.routes.values())
    totals = {
        k: sum(getattr(r.stats, k) for r in routes)
        for k in ("received", "sent", "acked", "failed", "dead_lettered", "retried")
    }
    totals["dropped"] = sum(r.stats.dropped for r in routes)
    totals["in_flight"] = sum(r.in_flight for r in routes)
    totals["in_flight_bytes"] = sum(r.in_flight_bytes for r in routes)
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


# ------------------------------------------------------------------------------ Prometheus


class GatewayCollector:
    """Reads the gateway's counters at scrape time (a custom collector: nothing is updated per message)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: routes come and go with reloads

    def collect(self) -> Iterator[Metric]:
        gw = self.gw
        info = GaugeMetricFamily("gateway_info", "The gateway process", labels=["id", "version", "config_sha256"])
        info.add_metric([gw.config.gateway.id, __version__, gw.config.digest[:12]], 1)
        yield info
        yield GaugeMetricFamily("gateway_uptime_seconds", "Seconds since the gateway started", value=gw.uptime)
        yield GaugeMetricFamily("gateway_ready", "1 when every used connector is connected", value=float(gw.ready))
        yield CounterMetricFamily("gateway_config_reloads", "Configurations applied by reload", value=gw.reloads)
        yield from self._routes()
        yield from self._connectors()

    def _routes(self) -> Iterator[Metric]:
        routes = list(self.gw.routes.values())
        lab = ["route"]
        counters = {
            "received": "Messages the route took from its source",
            "sent": "Target deliveries the sink broker confirmed (a fan-out message counts once per target)",
            "acked": "Messages every target confirmed (the source was acknowledged)",
            "failed": "Messages that failed for good (non-retriable error, retries exhausted, unrenderable)",
            "dead_lettered": "Failed messages written to the route's dead-letter target",
            "retried": "Target deliveries tried again after a retriable error",
            "filtered": "Messages the route's where condition left out (acknowledged, not delivered)",
            "slow_consumer_disconnects": "Times the route was cut off as a slow consumer",
            "resubmitted": "Messages the watchdog submitted again after stuck_after without a confirmation",
        }
        for key, doc in counters.items():
            m = CounterMetricFamily(f"gateway_route_{key}", doc, labels=lab)
            for r in routes:
                m.add_metric([r.name], getattr(r.stats, key))
            yield m
        dropped = CounterMetricFamily(
            "gateway_route_dropped", "Messages dropped, by reason (overflow or released)", labels=[*lab, "reason"]
        )
        for r in routes:
            dropped.add_metric([r.name, "overflow"], r.stats.dropped_overflow)
            dropped.add_metric([r.name, "released"], r.stats.dropped_released)
        yield dropped
        gauges = {
            "in_flight": ("Messages inside the route, not yet confirmed by every target", "in_flight"),
            "in_flight_bytes": ("Payload bytes inside the route", "in_flight_bytes"),
            "max_in_flight": ("The route's message budget", "max_in_flight"),
            "max_in_flight_bytes": ("The route's byte budget", "max_in_flight_bytes"),
        }
        for key, (doc, attr) in gauges.items():
            g = GaugeMetricFamily(f"gateway_route_{key}", doc, labels=lab)
            for r in routes:
                g.add_metric([r.name], getattr(r, attr))
            yield g
        now_ns = time.monotonic_ns()
        oldest = GaugeMetricFamily(
            "gateway_route_oldest_in_flight_seconds",
            "Age of the oldest message in flight (source receive to now); 0 when none",
            labels=lab,
        )
        for r in routes:
            oldest.add_metric([r.name], r.oldest_in_flight(now_ns))
        yield oldest
        state = GaugeMetricFamily("gateway_route_state", "1 for the route's current state", labels=[*lab, "state"])
        for r in routes:
            for st in RouteState:
                state.add_metric([r.name, st.value], float(r.state is st))
        yield state
        tables = [r.requests for r in routes if r.requests is not None]
        outcomes = CounterMetricFamily(
            "gateway_route_requests",
            "Request routes: requests forwarded, and how each ended (replied, timed_out, rejected, failed); late: "
            "answers that matched no waiting request",
            labels=[*lab, "outcome"],
        )
        waiting = GaugeMetricFamily(
            "gateway_route_requests_pending", "Request routes: requests waiting for an answer", labels=lab
        )
        for t in tables:
            for outcome, n in t.stats.as_dict().items():
                outcomes.add_metric([t.route, outcome], n)
            waiting.add_metric([t.route], t.pending)
        yield outcomes
        yield waiting
        hist = HistogramMetricFamily(
            "gateway_route_latency_seconds",
            "End-to-end latency of acknowledged messages: source receive to the last target's confirmation",
            labels=lab,
        )
        for r in routes:
            lat = r.latency
            cumulative, buckets = 0, []
            for bound, n in zip([*lat.buckets, float("inf")], lat.bucket_counts(), strict=True):
                cumulative += n
                buckets.append((_le(bound), cumulative))
            hist.add_metric([r.name], buckets, lat.sum_ns / 1e9)
        yield hist

    def _connectors(self) -> Iterator[Metric]:
        gw = self.gw
        lab = ["connector", "kind"]
        up = GaugeMetricFamily("gateway_connector_up", "1 while the connector is connected", labels=lab)
        state = GaugeMetricFamily("gateway_connector_state", "1 for the connector's state", labels=[*lab, "state"])
        reconnects = CounterMetricFamily("gateway_connector_reconnects", "Connections made after the first", labels=lab)
        flapping = GaugeMetricFamily(
            "gateway_connector_flapping",
            "1 while the broker keeps dropping the connection soon after it is made",
            labels=lab,
        )
        queue = GaugeMetricFamily("gateway_sink_queue_depth", "Messages waiting for the sink's writer", labels=lab)
        events = CounterMetricFamily(
            "gateway_connector_events", "Connector-specific events (e.g. NATS server_closed)", labels=[*lab, "event"]
        )
        for name, c in gw.connectors.items():
            labels = [name, gw.config.kind(name)]
            up.add_metric(labels, float(c.connected.is_set()))
            for st in ConnectorState:
                state.add_metric([*labels, st.value], float(c.state is st))
            reconnects.add_metric(labels, c.reconnects)
            flapping.add_metric(labels, float(c.flapping))
            if c.has_sink:
                queue.add_metric(labels, c.sink.depth)
            for event, n in c.counters().items():
                events.add_metric([*labels, event], n)
        yield from (up, state, reconnects, flapping, queue, events)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


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
    ) -> None:
        self.gw = gw
        self.listen = listen
        self._reload = reload
        self._token = token.encode() if token else None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(gw))
        ProcessCollector(registry=self.registry)
        self._runner: web.AppRunner | None = None
        self.port = 0
        """The port actually bound (useful with port 0)."""

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
        app = web.Application(middlewares=[self._authorize])
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
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, int(port), reuse_address=True)
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
        log.info("http.listening", url=f"http://{_hostport(host, self.port)}/", token=self._token is not None)
        if self._token is None and not _loopback(host):
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

    async def _index(self, request: web.Request) -> web.Response:
        page = resources.files("gateway").joinpath("status.html").read_text(encoding="utf-8")
        return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def _reload_config(self, request: web.Request) -> web.Response:
        """Re-read the config file and apply it: 200 with what changed, 400 with the problems."""
        if self._reload is None:
            return _json({"ok": False, "errors": ["reload is not available here"]}, 404)
        ok, body = await self._reload()
        return _json(body, 200 if ok else 400)

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok", "uptime_seconds": self.gw.uptime})

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, body = readiness(self.gw)
        return _json(body, 200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _varz(self, request: web.Request) -> web.Response:
        return _json(varz(self.gw))

    async def _routez(self, request: web.Request) -> web.Response:
        return _json({"routes": [route_view(r) for r in self.gw.routes.values()]})

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
