"""The :class:`Gateway`: builds connectors and routes from a config and runs them.

Usable from the CLI or embedded in an asyncio program::

    gw = Gateway.from_config("gateway.yaml")
    await gw.start()
    await gw.wait_ready(timeout=10)
    ...
    await gw.stop()            # stop intake, drain in flight, ack/commit, close

or ``async with Gateway.from_config(path) as gw: ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from gateway.config import Config, load_config
from gateway.config.registry import plugins
from gateway.core.channel import ConnectorState
from gateway.core.connector import Connector, ConnectorContext, connector_class
from gateway.core.flight import Target
from gateway.core.policies import Overflow, RoutePolicy, RouteState
from gateway.core.route import Route
from gateway.core.shard import Shard
from gateway.core.sink import Sink
from gateway.core.supervisor import Supervisor
from gateway.errors import ConfigError, ConfigIssue
from gateway.routes.requests import ReplyRoute, RequestRoute, Requests
from gateway.routes.spooled import SpooledRoute
from gateway.routes.transform import Transform

log = structlog.get_logger("gateway")

CLOSE_TIMEOUT = 5.0
"""Seconds the connectors get, after the drain, for their last acknowledgements and commits and their
goodbyes to the brokers; then they are cut off (what was not acknowledged is redelivered, never lost)."""


class GatewayState(Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


def _connector_limit(config: Config, name: str) -> int | None:
    limit: int | None = getattr(config.connectors[name], "max_payload", None)
    return limit


def _publishes_reply(kind: str) -> bool:
    replies = plugins()[kind].replies
    return replies is not None and replies.publishes_reply


def _smallest(*limits: int | None) -> int | None:
    given = [n for n in limits if n is not None]
    return min(given) if given else None


def build_routes(config: Config) -> dict[str, Route]:
    """The run-time routes of a config, with their targets not yet bound to sinks."""
    routes: dict[str, Route] = {}
    for rc in config.routes:
        s = rc.section
        overflow = s.overflow or ("block" if rc.source.at_least_once else "drop_newest")
        policy = RoutePolicy(
            max_in_flight=s.max_in_flight,
            max_in_flight_bytes=s.max_in_flight_bytes,
            overflow=Overflow(overflow),
            slow_consumer_deadline=s.slow_consumer_deadline or None,
            retry=s.retry,
            on_error=s.on_error,
            reconnect=config.gateway.reconnect,
            max_payload=_smallest(s.max_payload, _connector_limit(config, rc.source.connector)),
            max_headers=config.gateway.max_headers,
            max_header_bytes=config.gateway.max_header_bytes,
            stuck_after=s.stuck_after,
        )
        if rc.request is not None and rc.request.replies_for is not None:
            route: Route = ReplyRoute(s.name, rc.source.connector, rc.source, rc.patterns, policy)
        elif rc.request is not None:
            route = RequestRoute(s.name, rc.source.connector, rc.source, rc.patterns, policy)
        elif s.spool is None:
            route = Route(s.name, rc.source.connector, rc.source, rc.patterns, policy)
        else:
            route = SpooledRoute(s.name, rc.source.connector, rc.source, rc.patterns, policy, s.spool)
        route.payload_templates = any(
            t.address.reads_payload or (t.key is not None and t.key.reads_payload) for t in rc.targets
        )
        route.transform = Transform.of(
            s,
            {c for p in rc.patterns for c in p.captures},
            gateway_id=config.gateway.id,
            payload_templates=route.payload_templates,
            trace=config.gateway.trace,
        )
        route.request_leg = rc.request
        if rc.sharded and config.worker is not None and config.worker[1] > 1:
            route.shard = Shard(config.worker[0], config.worker[1], rc.shard_key or (), header=rc.shard_header)
        route.targets.extend(
            Target(
                route, i, tc.spec.connector, tc.spec, tc.address, tc.key, _connector_limit(config, tc.spec.connector)
            )
            for i, tc in enumerate(rc.targets)
        )
        if rc.request is not None and rc.request.replies_for is None and _publishes_reply(rc.request.responder):
            for target in route.targets:
                target.replies = True  # the NATS sink publishes with the gateway's reply subject
        if rc.dead_letter is not None:
            dl = rc.dead_letter
            route.dead_letter = Target(
                route, -1, dl.spec.connector, dl.spec, dl.address, dl.key, _connector_limit(config, dl.spec.connector)
            )
        routes[s.name] = route
    return routes


class Gateway:
    """One running gateway: its connectors, its routes, and their lifecycle."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = GatewayState.NEW
        context = ConnectorContext(
            gateway_id=config.gateway.id,
            cache_size=config.gateway.max_cached_topics,
            backoff=config.gateway.reconnect,
        )
        self._context = context
        self.connectors: dict[str, Connector] = {}
        for name in config.connectors:
            self.connectors[name] = self._make_connector(config, name)
        self.routes = build_routes(config)
        self.requests: dict[str, Requests] = {}
        """Tables of the request routes, by route name (they outlive reloads of their routes)."""
        for route in self.routes.values():
            self._bind(route)
        self._link_requests()
        self._runner: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._connector_tasks: dict[str, asyncio.Task[None]] = {}
        self._reloading = asyncio.Lock()
        self._supervisor: asyncio.Task[None] | None = None
        self._started_at = 0.0
        self.reloads = 0
        """Configurations applied by reload since start."""

    @classmethod
    def from_config(cls, config: Config | str | Path) -> Gateway:
        """Build from a :class:`Config` or a config file path (raises ConfigError)."""
        if not isinstance(config, Config):
            config = load_config(config)
        return cls(config)

    @property
    def used_connectors(self) -> list[Connector]:
        """Connectors that some route reads from or writes to."""
        return [
            c for c in self.connectors.values() if c.has_sink or any(r.source == c.name for r in self.routes.values())
        ]

    async def start(self) -> None:
        """Start every connector; returns at once (connections come up in the background)."""
        if self.state is not GatewayState.NEW:
            raise RuntimeError(f"gateway already {self.state.value}")
        self.state = GatewayState.RUNNING
        self._started_at = time.time()
        self._runner = asyncio.create_task(self._run(), name="gateway")
        log.info(
            "gateway.started",
            config=self.config.source,
            connectors=len(self.connectors),
            routes=len(self.routes),
            config_sha256=self.config.digest[:12],
        )

    def _make_connector(self, config: Config, name: str) -> Connector:
        return connector_class(plugins()[config.kind(name)])(name, config.connectors[name], self._context)

    def _bind(self, route: Route) -> None:
        for target in (*route.targets, route.dead_letter):
            if target is not None:
                target.sink = self.connectors[target.connector].sink

    def _link_requests(self) -> None:
        """Give every request route and its companion their shared table (kept across reloads)."""
        live = set()
        for route in self.routes.values():
            leg = route.request_leg
            if leg is None:
                continue
            name = leg.replies_for or route.name
            table = self.requests.get(name)
            if table is None:
                table = self.requests[name] = Requests(name, leg)
            elif leg.replies_for is None:
                table.configure(leg)
            if isinstance(route, ReplyRoute):
                route.table = table
                table.bind(route)  # error replies made while a reload replaced it go out now
            elif isinstance(route, RequestRoute):
                route.requests = table
            live.add(name)
        for name in set(self.requests) - live:
            self.requests.pop(name).close()

    def _own(self, name: str) -> list[Route]:
        return [r for r in self.routes.values() if r.source == name]

    def _start_connector(self, name: str) -> None:
        conn = self.connectors[name]
        own = self._own(name)
        if (own or conn.has_sink) and self._tg is not None and self.state is GatewayState.RUNNING:
            self._connector_tasks[name] = self._tg.create_task(conn.run(own), name=f"connector:{name}")

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self._supervisor = tg.create_task(Supervisor(self.routes, self.connectors).run(), name="supervisor")
            for route in self.routes.values():
                if isinstance(route, SpooledRoute):
                    route.start(tg)
            for name in self.connectors:
                self._start_connector(name)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every used connector is connected (raises TimeoutError)."""
        async with asyncio.timeout(timeout):
            for conn in self.used_connectors:
                await conn.connected.wait()

    @property
    def ready(self) -> bool:
        return all(c.healthy for c in self.used_connectors)

    async def wait(self) -> None:
        """Until the gateway stopped (or its runner failed)."""
        if self._runner is not None:
            await asyncio.shield(self._runner)

    async def stop(self, timeout: float | None = None) -> bool:
        """Stop intake, drain in-flight messages for up to ``timeout`` seconds, ack/commit, close.

        Returns True if everything in flight completed before closing.
        """
        if self.state is not GatewayState.RUNNING:
            return True
        self.state = GatewayState.STOPPING
        budget = self.config.gateway.shutdown_timeout if timeout is None else timeout
        for conn in self.connectors.values():
            conn.stop_intake()
        for table in self.requests.values():
            table.close()  # what still waits for an answer gets an error reply before the sinks close
        in_flight = sum(r.in_flight for r in self.routes.values())
        log.info("gateway.draining", in_flight=in_flight, timeout=budget)
        drained = True
        spooled = [r for r in self.routes.values() if isinstance(r, SpooledRoute)]
        try:
            async with asyncio.timeout(budget):
                await asyncio.gather(*(c.quiesce() for c in self.connectors.values()))
                for sr in spooled:
                    await sr.stop_spool()  # written and acknowledged before the sources close
                    sr.release()  # its deliveries stay in the spool, uncommitted: replayed at the next start
                for route in self.routes.values():
                    if not isinstance(route, SpooledRoute):
                        await route.drained()
        except TimeoutError:
            drained = False
            left = {r.name: r.in_flight for r in self.routes.values() if r.in_flight}
            log.warning("gateway.drain_timeout", in_flight=left)
        for route in self.routes.values():
            route.cancel_timers()
        for conn in list(self.connectors.values()):  # a reload under way may still replace some
            await conn.close()
        for sr in spooled:
            await sr.close_spool()
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self._runner is not None:
            await self._closed()
        self.state = GatewayState.STOPPED
        log.info("gateway.stopped", drained=drained)
        return drained

    async def _closed(self) -> None:
        """Until the connectors finished their sessions (last acks and commits, goodbyes), for at most
        :data:`CLOSE_TIMEOUT`; then what is left is cancelled: a stop takes ``shutdown_timeout`` plus this."""
        runner = self._runner
        assert runner is not None
        done, _ = await asyncio.wait({runner}, timeout=CLOSE_TIMEOUT)
        if not done:
            left = sorted(n for n, c in self.connectors.items() if c.state is not ConnectorState.CLOSED)
            log.warning("gateway.close_timeout", timeout=CLOSE_TIMEOUT, connectors=left)
            runner.cancel()
            await asyncio.wait({runner}, timeout=1.0)
        if runner.done() and not runner.cancelled():
            runner.result()  # a runner that failed says so, as before

    # -- reload ----------------------------------------------------------------------------------
    async def reload(self, config: Config) -> dict[str, list[str]]:
        """Apply a new config while running; returns what changed.

        Connectors whose config is unchanged stay connected. Routes whose section and connectors are
        unchanged keep running untouched (same object, same counters). Removed and changed routes
        stop taking messages and drain (for up to ``shutdown_timeout``; what is left is released,
        so durable sources redeliver it, to the changed route if it reads the same session or
        consumer); changed routes then start again with the new config, new ones start.
        A connector restarts when its config changed, or when its source routes changed and its
        kind cannot change them live (Kafka, memory), or when a route now writes to it and it had
        no sink: every route that uses a restarted connector restarts with it.
        """
        if self.state is not GatewayState.RUNNING:
            raise RuntimeError(f"cannot reload a gateway that is {self.state.value}")
        async with self._reloading:
            return await self._reload(config)

    async def _reload(self, config: Config) -> dict[str, list[str]]:
        old = self.config
        down = {n for n, c in self.connectors.items() if n in self._connector_tasks and not c.connected.is_set()}
        new_rc = {rc.section.name: rc for rc in config.routes}
        old_rc = {rc.section.name: rc for rc in old.routes}
        common = old.connectors.keys() & config.connectors.keys()
        restart = {n for n in common if old.kind(n) != config.kind(n) or old.connectors[n] != config.connectors[n]}
        removed_conns = old.connectors.keys() - config.connectors.keys()
        added_conns = config.connectors.keys() - old.connectors.keys()

        def writes_to(rc: Any) -> set[str]:
            names = {t.spec.connector for t in rc.targets}
            if rc.dead_letter is not None:
                names.add(rc.dead_letter.spec.connector)
            return names

        def uses(rc: Any) -> set[str]:
            return {rc.source.connector, *writes_to(rc)}

        keep = {n for n, rc in new_rc.items() if n in old_rc and old_rc[n].section == rc.section}
        while True:  # restarting a connector restarts its routes, which may change another's sources
            keep = {n for n in keep if not uses(new_rc[n]) & (restart | removed_conns)}
            more = set()
            for n, conn in self.connectors.items():
                if n in restart or n in removed_conns:
                    continue
                sources_before = {r.name for r in self._own(n)}
                sources_after = {k for k, rc in new_rc.items() if rc.source.connector == n}
                changed_sources = sources_before != sources_after or any(
                    k not in keep for k in sources_after & sources_before
                )
                if changed_sources and not conn.changes_routes_live and n in self._connector_tasks:
                    more.add(n)
                writes = any(n in writes_to(rc) for rc in new_rc.values())
                if writes and not conn.has_sink and n in self._connector_tasks:
                    more.add(n)  # its sessions were started without a sink
            if not more - restart:
                break
            restart |= more

        # Everything new is built before anything changes: a reload that cannot be set up changes nothing.
        try:
            fresh = {n: self._make_connector(config, n) for n in sorted(restart | added_conns)}
            built = build_routes(config)
        except Exception as exc:
            log.error("gateway.reload_failed", error=f"{type(exc).__name__}: {exc}")
            raise ConfigError(
                [ConfigIssue("", f"cannot be applied, nothing changed: {type(exc).__name__}: {exc}")]
            ) from exc
        going = [r for n, r in self.routes.items() if n not in keep]
        for name in old_rc.keys() - new_rc.keys():
            table = self.requests.pop(name, None)
            if table is not None:
                table.close()  # a removed request route: what waits gets its 503 while the companion runs
        await self._retire(going, config.gateway.shutdown_timeout)
        for r in going:
            del self.routes[r.name]
        for n in sorted(restart | removed_conns):
            await self._stop_connector(n)
        for r in going:
            r.release()  # what a stopped connector's sink gave back when its session ended
        self.connectors.update(fresh)
        final = {n: self.routes[n] if n in keep else built[n] for n in new_rc}
        for r in going:
            successor = final.get(r.name)
            if successor is not None:  # changed or restarted: its counters (and what it still holds) go on
                spooled = isinstance(r, SpooledRoute) or isinstance(successor, SpooledRoute)
                successor.inherit(r, adopt=not spooled)
                successor.rebind(self._sink_of)
        self.routes.clear()
        self.routes.update(final)
        self._link_requests()
        for n, route in final.items():
            if n not in keep:
                self._bind(route)
                if isinstance(route, SpooledRoute) and self._tg is not None:
                    route.start(self._tg)
        self.config = config
        failed: list[str] = []
        for n, conn in self.connectors.items():
            if n in self._connector_tasks and conn.changes_routes_live:
                own = self._own(n)
                if [r.name for r in own] != [r.name for r in conn.routes] or any(
                    a is not b for a, b in zip(own, conn.routes, strict=False)
                ):
                    try:
                        await conn.set_routes(own)
                    except Exception as exc:  # the config is applied all the same: say which connector lags
                        failed.append(n)
                        log.error("gateway.reload_connector_failed", connector=n, error=f"{type(exc).__name__}: {exc}")
        for n in self.connectors:
            if n not in self._connector_tasks:
                self._start_connector(n)
        self.reloads += 1
        started = [n for n in new_rc if n not in keep]
        summary = {
            "routes_added": sorted(new_rc.keys() - old_rc.keys()),
            "routes_changed": sorted(
                n for n in new_rc.keys() & old_rc.keys() if new_rc[n].section != old_rc[n].section
            ),
            "routes_restarted": sorted(
                n for n in (new_rc.keys() & old_rc.keys()) - keep if new_rc[n].section == old_rc[n].section
            ),
            "routes_removed": sorted(old_rc.keys() - new_rc.keys()),
            "routes_kept": sorted(keep),
            "connectors_restarted": sorted(n for n in restart - added_conns if n in self._connector_tasks),
            "connectors_stopped": sorted(n for n in restart - added_conns if n not in self._connector_tasks),
            "connectors_added": sorted(added_conns),
            "connectors_removed": sorted(removed_conns),
            # Connectors the started routes use that were not connected when the reload began: those routes
            # are in place all the same, and move messages once their brokers are back (no second reload).
            "connectors_down": sorted({c for n in started for c in uses(new_rc[n]) if c in down}),
            "connectors_failed": sorted(failed),
        }
        if old.gateway != config.gateway:
            log.warning("gateway.reload_partial", reason="the gateway section changes only on restart")
        log.info("gateway.reloaded", config_sha256=config.digest[:12], **summary)
        return summary

    async def _retire(self, routes: list[Route], timeout: float) -> None:
        """Stop taking messages for ``routes`` and wait until what they hold is delivered (bounded)."""
        for route in routes:
            route.retire()
            if isinstance(route, SpooledRoute):
                await route.stop_spool()
        try:
            async with asyncio.timeout(timeout):
                for route in routes:
                    await route.drained()
        except TimeoutError:
            left = {r.name: r.in_flight for r in routes if r.in_flight}
            log.warning("gateway.reload_drain_timeout", in_flight=left)
        # Companion routes last: releasing a request route sends its requesters error replies through them.
        companions = [r for r in routes if isinstance(r, ReplyRoute)]
        for route in [r for r in routes if not isinstance(r, ReplyRoute)]:
            await self._stop_route(route)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                for route in companions:
                    await route.drained()
        for route in companions:
            await self._stop_route(route)

    def _sink_of(self, connector: str) -> Sink | None:
        conn = self.connectors.get(connector)
        return conn.sink if conn is not None else None

    @staticmethod
    async def _stop_route(route: Route) -> None:
        route.state = RouteState.STOPPED  # what still arrives is released, not admitted
        route.release()  # retries waiting for their delay too: given back, not left in flight
        if isinstance(route, SpooledRoute):
            await route.close_spool()  # the changed route opens it again

    async def _stop_connector(self, name: str) -> None:
        conn = self.connectors.pop(name)
        conn.stop_intake()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await conn.quiesce()
        await conn.close()
        task = self._connector_tasks.pop(name, None)
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT)
            if not done:
                log.warning("gateway.close_timeout", timeout=CLOSE_TIMEOUT, connectors=[name])
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: the connector's own log said what went wrong

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def started_at(self) -> float:
        """Wall-clock time the gateway started (0 before)."""
        return self._started_at

    @property
    def uptime(self) -> float:
        return time.time() - self._started_at if self._started_at else 0.0

    def snapshot(self) -> dict[str, Any]:
        """Counters and states, for status displays."""
        return {
            "uptime": time.time() - self._started_at if self._started_at else 0.0,
            "config_sha256": self.config.digest,
            "routes": {
                name: {
                    **r.stats.as_dict(),
                    "in_flight": r.in_flight,
                    "in_flight_bytes": r.in_flight_bytes,
                    "state": r.state.value,
                }
                for name, r in self.routes.items()
            },
            "connectors": {
                name: {"state": c.state.value, "reconnects": c.reconnects, "last_error": c.last_error}
                for name, c in self.connectors.items()
            },
        }
