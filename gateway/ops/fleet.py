"""The monitoring endpoint of a gateway running several worker processes: one address for all of them.

The supervisor serves the paths a single gateway serves, built from its workers' own endpoints (each on
loopback, a free port, a token only the supervisor knows), asked at the moment a request arrives:

==========  ==================================================================================================
``/metrics`` every worker's series with a ``worker`` label (``worker="0"``...), families kept together, plus the
             supervisor's ``gateway_workers``, ``gateway_worker_up`` and ``gateway_worker_restarts_total``:
             ``sum without (worker) (...)`` is the gateway's figure and the accounting invariant holds for it
``/readyz``  200 when every worker runs and answers ready, else 503 with each worker's reasons
``/varz``    the gateway's totals summed, and each worker's pid, restarts and totals under ``workers``
``/routez``  per route, counters summed over the workers that run it, each worker's view under ``workers``
``/connz``   per connector, the worst state any worker has it in, each worker's view under ``workers``
``/reload``  POST: every worker re-reads the config file (what SIGHUP to the supervisor does)
``/``        the status page, as a single gateway's, with the workers shown
==========  ==================================================================================================
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import h11

from gateway.ops.guard import HEADER_TIMEOUT, MAX_CONNECTIONS
from gateway.ops.lighthttp import (
    NEEDS_TOKEN,
    EndpointCore,
    Reload,
    Request,
    Response,
    Server,
    accepts_gzip,
    fetch,
    gzipped,
)
from gateway.ops.text import CONTENT_TYPE, escape

ASK_TIMEOUT = 5.0
"""Seconds the supervisor waits for a worker's answer before it counts the worker as not answering."""
READY_TIMEOUT = 2.0
"""The same for ``/readyz``, which probes ask with short timeouts of their own."""

_SUMMED = frozenset(
    {
        "received",
        "sent",
        "acked",
        "failed",
        "dead_lettered",
        "retried",
        "dropped_overflow",
        "dropped_released",
        "dropped",
        "filtered",
        "slow_consumer_disconnects",
        "resubmitted",
        "sharded",
        "in_flight",
        "in_flight_bytes",
    }
)
"""Fields of a route view (and of ``/varz`` totals) that add up over the workers."""


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What the endpoint knows of one worker process."""

    index: int
    pid: int | None
    port: int | None
    """Its monitoring endpoint's port once it reported it; None while it starts or after it exited."""
    state: str
    """``starting``, ``running``, ``restarting``, ``stopping`` or ``stopped``."""
    restarts: int
    started_at: float | None
    last_exit: int | None


class Workers(Protocol):
    """The supervisor, as the endpoint sees it."""

    gateway_id: str
    version: str
    count: int
    started_at: float

    def workers(self) -> Sequence[WorkerInfo]: ...

    def partitions(self, route: str) -> bool:
        """Whether the route's workers read disjoint parts of its source (its lag adds up)."""
        ...


class FleetMonitor(EndpointCore):
    """The supervisor's HTTP endpoint (``gateway.http``): the same guard, token and paths as a single gateway's,
    served by :mod:`gateway.ops.lighthttp` (no aiohttp in a supervisor)."""

    def __init__(
        self,
        pool: Workers,
        listen: str,
        worker_token: str,
        reload: Reload | None = None,
        token: str | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout: float = HEADER_TIMEOUT,
    ) -> None:
        super().__init__(listen, reload, token, max_connections=max_connections, header_timeout=header_timeout)
        self.pool = pool
        self._server = Server(self._handle, self.guard)
        self._auth = ("Authorization", f"Bearer {worker_token}")
        self._paths: dict[str, tuple[str, Callable[[Request], Awaitable[Response]]]] = {
            "/": ("GET", self._index),
            "/healthz": ("GET", self._healthz),
            "/readyz": ("GET", self._readyz),
            "/metrics": ("GET", self._metrics),
            "/varz": ("GET", self._varz),
            "/routez": ("GET", self._routez),
            "/connz": ("GET", self._connz),
            "/reload": ("POST", self._reload_config),
        }

    async def start(self) -> None:
        host, _, port = self.listen.rpartition(":")
        host = host.strip("[]")
        try:
            await self._server.start(host, int(port))
        except OSError as exc:
            raise self.bind_error(exc) from exc
        self.port = self._server.port
        self.announce(host)

    async def stop(self) -> None:
        await self._server.stop()
        self._exposition.cancel()

    async def _handle(self, request: Request) -> Response:
        """Token, path and method checked as the gateway's endpoint checks them, then the path's answer."""
        if not self.authorized(request.path, request.headers.get("authorization", "")):
            return _json(NEEDS_TOKEN, 401, [("WWW-Authenticate", 'Bearer realm="gateway"')])
        entry = self._paths.get(request.path)
        if entry is None:
            return _json({"ok": False, "errors": [f"no such path: {request.path[:200]}"]}, 404)
        method, answer = entry
        allowed = (method, "HEAD") if method == "GET" else (method,)
        if request.method not in allowed:
            return _json(
                {"ok": False, "errors": [f"{request.method} is not allowed here"]}, 405, [("Allow", ", ".join(allowed))]
            )
        return await answer(request)

    # -- asking the workers --------------------------------------------------------------------
    async def ask(
        self, path: str, method: str = "GET", timeout: float = ASK_TIMEOUT
    ) -> list[tuple[WorkerInfo, int, Any]]:
        """Every worker's answer to ``path``: (worker, HTTP status or 0 when it did not answer, body)."""
        # Uncompressed: the workers are on loopback, and zipping costs them more than the bytes do.
        headers = (self._auth, ("Accept-Encoding", "identity"))

        async def one(w: WorkerInfo) -> tuple[WorkerInfo, int, Any]:
            if w.port is None:
                return w, 0, None
            try:
                status, data = await fetch(w.port, path, method=method, headers=headers, timeout=timeout)
                text = data.decode()
                return w, status, text if path == "/metrics" else json.loads(text)
            except (OSError, TimeoutError, h11.ProtocolError, ValueError):
                return w, 0, None

        return list(await asyncio.gather(*(one(w) for w in self.pool.workers())))

    # -- the paths -------------------------------------------------------------------------------
    async def _index(self, request: Request) -> Response:
        page = resources.files("gateway.ops").joinpath("status.html").read_bytes()
        return Response(200, [page], [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store")])

    async def _reload_config(self, request: Request) -> Response:
        """Every worker re-reads the config file: 200 with what each applied, 400 with the problems."""
        if self._reload is None:
            return _json({"ok": False, "errors": ["reload is not available here"]}, 404)
        ok, body = await self._reload()
        return _json(body, 200 if ok else 400)

    async def _healthz(self, request: Request) -> Response:
        return _json(
            {
                "status": "ok",
                "uptime_seconds": time.time() - self.pool.started_at,
                "workers": {str(w.index): w.state for w in self.pool.workers()},
            }
        )

    async def _readyz(self, request: Request) -> Response:
        reasons: dict[str, Any] = {}
        for w, status, body in await self.ask("/readyz", timeout=READY_TIMEOUT):
            if status == 0:
                reasons[f"worker {w.index}"] = w.state if w.state != "running" else "not answering"
            elif status != 200:
                reasons[f"worker {w.index}"] = (body or {}).get("not_ready", body)
        ready = not reasons
        return _json({"ready": ready, "not_ready": reasons, "workers": self.pool.count}, 200 if ready else 503)

    async def _metrics(self, request: Request) -> Response:
        chunks = await self.exposition()
        headers = [("Content-Type", CONTENT_TYPE), ("Vary", "Accept-Encoding")]
        if accepts_gzip(request.headers.get("accept-encoding", "")):
            chunks = await asyncio.to_thread(gzipped, chunks)
            headers.append(("Content-Encoding", "gzip"))
        return Response(200, chunks, headers)

    async def _render(self) -> list[bytes]:
        answers = await self.ask("/metrics")
        texts = [(str(w.index), body) for w, status, body in answers if status == 200 and isinstance(body, str)]
        # The supervisor's own process and endpoint series, merged with the workers' families of the same names.
        texts.append(("supervisor", process_metrics() + self.guard.metrics()))
        merged = await asyncio.to_thread(merge_expositions, texts)  # large configs: seconds of work, off the loop
        return [merged.encode(), self._own_metrics().encode()]

    def _own_metrics(self) -> str:
        workers = self.pool.workers()
        return "".join(
            [
                "# HELP gateway_workers Worker processes the supervisor keeps running\n",
                "# TYPE gateway_workers gauge\n",
                f"gateway_workers {self.pool.count}\n",
                "# HELP gateway_worker_up 1 while the worker process runs and reported its endpoint\n",
                "# TYPE gateway_worker_up gauge\n",
                *(f'gateway_worker_up{{worker="{w.index}"}} {int(w.port is not None)}\n' for w in workers),
                "# HELP gateway_worker_restarts_total Times the supervisor started a worker again after it exited\n",
                "# TYPE gateway_worker_restarts_total counter\n",
                *(f'gateway_worker_restarts_total{{worker="{w.index}"}} {w.restarts}\n' for w in workers),
            ]
        )

    async def _varz(self, request: Request) -> Response:
        answers = await self.ask("/varz")
        views = [(w, body) for w, status, body in answers if status == 200 and isinstance(body, dict)]
        totals: dict[str, int] = {}
        for _, body in views:
            for key, value in body.get("totals", {}).items():
                totals[key] = totals.get(key, 0) + int(value)
        first = views[0][1] if views else {}
        return _json(
            {
                "id": self.pool.gateway_id,
                "version": self.pool.version,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "state": "running" if len(views) == self.pool.count else "degraded",
                "ready": all(body.get("ready") for _, body in views) and len(views) == self.pool.count,
                "started_at": self.pool.started_at,
                "uptime_seconds": time.time() - self.pool.started_at,
                "now": time.time(),
                "config": first.get("config", {"source": "", "sha256": "", "reloads": 0}),
                "connectors": first.get("connectors", 0),
                "routes": max((body.get("routes", 0) for _, body in views), default=0),
                "totals": totals,
                "workers": [
                    {
                        "worker": w.index,
                        "pid": w.pid,
                        "state": w.state,
                        "restarts": w.restarts,
                        "last_exit": w.last_exit,
                        "ready": next((b.get("ready") for v, b in views if v.index == w.index), False),
                        "routes": next((b.get("routes") for v, b in views if v.index == w.index), None),
                        "totals": next((b.get("totals") for v, b in views if v.index == w.index), None),
                    }
                    for w in self.pool.workers()
                ],
            }
        )

    async def _views(self, path: str, key: str) -> list[tuple[WorkerInfo, dict[str, Any]]]:
        """Every (worker, view) of the list ``key`` in the workers' answers to ``path``, worker by worker."""
        return [
            (w, view)
            for w, status, body in await self.ask(path)
            if status == 200 and isinstance(body, dict)
            for view in body.get(key, [])
        ]

    async def _routez(self, request: Request) -> Response:
        merged: dict[str, dict[str, Any]] = {}
        for w, view in await self._views("/routez", "routes"):
            name = view["name"]
            route = merged.get(name)
            if route is None:
                route = merged[name] = {**view, "workers": []}
                for key in _SUMMED:
                    if key in route:
                        route[key] = 0
                route["lag"] = None
                route["oldest_in_flight_seconds"] = 0.0
            for key in _SUMMED:
                if isinstance(view.get(key), int):
                    route[key] += view[key]
            lag = view.get("lag")
            if lag is not None:
                add = self.pool.partitions(name)
                route["lag"] = (route["lag"] or 0) + lag if add else max(route["lag"] or 0, lag)
            route["oldest_in_flight_seconds"] = max(route["oldest_in_flight_seconds"], view["oldest_in_flight_seconds"])
            if view["state"] != "running":
                route["state"] = view["state"]
            route["saturated"] = route["saturated"] or view["saturated"]
            route["workers"].append({"worker": w.index, **{k: view.get(k) for k in _WORKER_ROUTE_KEYS}})
        return _json({"routes": list(merged.values())})

    async def _connz(self, request: Request) -> Response:
        merged: dict[str, dict[str, Any]] = {}
        for w, view in await self._views("/connz", "connectors"):
            name = view["name"]
            conn = merged.get(name)
            if conn is None or (conn["state"] == "connected" and view["state"] != "connected"):
                workers = conn["workers"] if conn is not None else []
                conn = merged[name] = {**view, "workers": workers}
            conn["workers"].append({"worker": w.index, "state": view["state"], "reconnects": view.get("reconnects")})
        return _json({"connectors": list(merged.values())})

    async def reload_workers(self, timeout: float) -> tuple[bool, dict[str, Any]]:
        """POST /reload to every running worker: ok when every one applied it (a worker still starting reads the
        new file as it starts)."""
        answers = await self.ask("/reload", method="POST", timeout=timeout)
        ok = all(status == 200 for w, status, _ in answers if w.port is not None)
        by_worker = {
            str(w.index): body if status else ("starting: reads the new file" if w.port is None else "not answering")
            for w, status, body in answers
        }
        return ok, {"ok": ok, "workers": by_worker}


def _json(data: Any, status: int = 200, headers: Sequence[tuple[str, str]] = ()) -> Response:
    body = json.dumps(data, separators=(",", ":")).encode()
    return Response(status, [body], [("Content-Type", "application/json; charset=utf-8"), *headers])


def process_metrics() -> str:
    """The supervisor's own ``process_*`` series (as prometheus_client's process collector writes them), read
    from ``/proc`` here: that library alone would add ~2 MB to a process meant to stay small."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/stat", "rb") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime"))
        start = boot + int(fields[19]) / ticks
        fds = len(os.listdir("/proc/self/fd"))
    except (OSError, ValueError, IndexError, StopIteration):  # not Linux: no process series
        return ""
    return "".join(
        (
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n",
            f"# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {cpu}\n",
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n",
            f"# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}\n",
            "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n",
            f"# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {start}\n",
            "# HELP process_open_fds Number of open file descriptors.\n",
            f"# TYPE process_open_fds gauge\nprocess_open_fds {fds}\n",
        )
    )


_WORKER_ROUTE_KEYS = ("state", "in_flight", "received", "acked", "sharded", "lag", "oldest_in_flight_seconds")


def merge_expositions(texts: Sequence[tuple[str, str]]) -> str:
    """Prometheus text expositions of several processes as one: a ``worker`` label on every sample (the first
    label), each family's HELP and TYPE once, its samples from every process together (the format wants a
    family's lines in one block)."""
    heads: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for worker, text in texts:
        label = f'worker="{escape(worker)}"'
        family = ""
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    head = heads.setdefault(family, [])
                    samples.setdefault(family, [])
                    if len(head) < 2 and not any(h.split(" ", 3)[1] == parts[1] for h in head):
                        head.append(line)
                continue
            brace, space = line.find("{"), line.find(" ")
            if 0 <= brace < space:
                line = (
                    f"{line[: brace + 1]}{label},{line[brace + 1 :]}"
                    if line[brace + 1] != "}"
                    else (f"{line[: brace + 1]}{label}{line[brace + 1 :]}")
                )
                name = line[:brace]
            else:
                name = line[:space]
                line = f"{name}{{{label}}}{line[space:]}"
            if not family or not name.startswith(family):
                family = name
                heads.setdefault(family, [])
                samples.setdefault(family, [])
            samples[family].append(line)
    out: list[str] = []
    for family, head in heads.items():
        if head or samples[family]:
            out.extend(head)
            out.extend(samples[family])
    return "\n".join(out) + "\n" if out else ""
