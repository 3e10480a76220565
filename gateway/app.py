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
import time
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from gateway.config import Config, load_config
from gateway.connector import Connector, ConnectorContext
from gateway.registry import plugins
from gateway.route import Overflow, Route, RoutePolicy, Target
from gateway.supervisor import Supervisor

log = structlog.get_logger("gateway")


class GatewayState(Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


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
        )
        route = Route(s.name, rc.source.connector, rc.source, rc.patterns, policy)
        route.targets.extend(
            Target(route, i, tc.spec.connector, tc.spec, tc.address, tc.key) for i, tc in enumerate(rc.targets)
        )
        if rc.dead_letter is not None:
            dl = rc.dead_letter
            route.dead_letter = Target(route, -1, dl.spec.connector, dl.spec, dl.address, dl.key)
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
        kinds = plugins()
        self.connectors: dict[str, Connector] = {}
        for name, cfg in config.connectors.items():
            self.connectors[name] = kinds[config.kind(name)].load()(name, cfg, context)
        self.routes = build_routes(config)
        for route in self.routes.values():
            for target in (*route.targets, route.dead_letter):
                if target is not None:
                    target.sink = self.connectors[target.connector].sink
        self._runner: asyncio.Task[None] | None = None
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

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._supervisor = tg.create_task(Supervisor(self.routes, self.connectors).run(), name="supervisor")
            for name, conn in self.connectors.items():
                own = [r for r in self.routes.values() if r.source == name]
                if own or conn.has_sink:
                    tg.create_task(conn.run(own), name=f"connector:{name}")

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every used connector is connected (raises TimeoutError)."""
        async with asyncio.timeout(timeout):
            for conn in self.used_connectors:
                await conn.connected.wait()

    @property
    def ready(self) -> bool:
        return all(c.connected.is_set() for c in self.used_connectors)

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
        in_flight = sum(r.in_flight for r in self.routes.values())
        log.info("gateway.draining", in_flight=in_flight, timeout=budget)
        drained = True
        try:
            async with asyncio.timeout(budget):
                await asyncio.gather(*(c.quiesce() for c in self.connectors.values()))
                for route in self.routes.values():
                    await route.drained()
        except TimeoutError:
            drained = False
            left = {r.name: r.in_flight for r in self.routes.values() if r.in_flight}
            log.warning("gateway.drain_timeout", in_flight=left)
        for route in self.routes.values():
            route.cancel_timers()
        for conn in self.connectors.values():
            await conn.close()
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self._runner is not None:
            await self._runner
        self.state = GatewayState.STOPPED
        log.info("gateway.stopped", drained=drained)
        return drained

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
