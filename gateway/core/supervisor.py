"""Slow-consumer disconnection: the seeds' balancing loop B3 for every route.

A route that stays over its budget longer than ``slow_consumer_deadline`` (at
once with ``overflow: disconnect``) is cut off: what it holds in its sinks and
retry timers is released (durable sources redeliver it; at-most-once ones count
it as dropped), its source connector lets go of it (the MQTT session is closed,
Kafka partitions are paused and rewound, a NATS subscription is dropped,
JetStream messages are NAKed), and after a backoff with full jitter it is
resumed. Other routes keep flowing: they have their own budgets and sources.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import structlog

from gateway.core.connector import Connector
from gateway.core.policies import Overflow, RouteState
from gateway.core.route import Route

log = structlog.get_logger("gateway.supervisor")

TICK = 0.25
"""Seconds between checks: the resolution of ``slow_consumer_deadline``."""
WATCH_EVERY = 4
"""Ticks between two runs of the routes' in-flight watchdog (:meth:`Route.watch`)."""


class Supervisor:
    def __init__(self, routes: Mapping[str, Route], connectors: Mapping[str, Connector]) -> None:
        self.routes = routes
        self.connectors = connectors
        self._attempts: dict[str, int] = {}
        self._resume_at: dict[str, float] = {}

    async def run(self) -> None:
        """Check every route every :data:`TICK` seconds until cancelled. Owned by the gateway."""
        ticks = 0
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            try:
                await self.check(now)
            except Exception:  # a connector's cut or resume failing must not stop the gateway: say it, go on
                log.exception("supervisor.check_failed")
            ticks += 1
            if ticks % WATCH_EVERY == 0:
                for route in list(self.routes.values()):
                    try:
                        route.watch(now)
                    except Exception:  # a bug in the watchdog must not stop the gateway: say it, go on
                        log.exception("route.watch_failed", route=route.name)

    async def check(self, now: float) -> None:
        for route in list(self.routes.values()):  # a reload may change the routes meanwhile
            if route.state is RouteState.RUNNING:
                if route.saturated and self._overdue(route, now):
                    await self.disconnect(route, now)
                elif not route.saturated:
                    self._attempts.pop(route.name, None)  # healthy again: the next cut starts the backoff over
            elif route.state is RouteState.DISCONNECTED and now >= self._resume_at.get(route.name, 0.0):
                await self.resume(route, now)

    @staticmethod
    def _overdue(route: Route, now: float) -> bool:
        policy = route.policy
        if policy.overflow is Overflow.DISCONNECT:
            return True
        deadline = policy.slow_consumer_deadline
        return deadline is not None and now - route.saturated_since >= deadline

    async def disconnect(self, route: Route, now: float) -> None:
        route.state = RouteState.DISCONNECTED
        route.hold_gate()
        route.stats.slow_consumer_disconnects += 1
        released = route.release()
        connector = self.connectors.get(route.source)
        if connector is not None:
            await connector.release_route(route)
        attempt = self._attempts.get(route.name, 0)
        self._attempts[route.name] = attempt + 1
        delay = route.policy.reconnect.delay(attempt)
        self._resume_at[route.name] = now + delay
        log.warning(
            "route.slow_consumer_disconnected",
            route=route.name,
            full_for=round(now - route.saturated_since, 2),
            released=released,
            still_in_flight=route.in_flight,
            retry_in=round(delay, 3),
        )

    async def resume(self, route: Route, now: float) -> None:
        connector = self.connectors.get(route.source)
        if connector is not None:
            await connector.resume_route(route)
        route.state = RouteState.RUNNING
        if route.saturated:
            # Still full (messages stuck at a stalled sink): keep the source stopped; the deadline runs again.
            route.saturated_since = now
        else:
            route.free_gate()
        log.info("route.resumed", route=route.name, in_flight=route.in_flight)
