"""Routes at run time, and the dispatcher that feeds them.

Per message the path is: the source builds an :class:`Envelope` and calls
:meth:`Dispatcher.dispatch`; the dispatcher looks the topic up in its plan
cache (one dict lookup: the trie walk and template rendering happen once per
distinct topic), and each matching :class:`Route` admits the message as one
:class:`Flight` that it submits to every target's sink. Sinks call
:meth:`Flight.done` when the broker confirmed (or refused); when every target
is done the route finishes the flight, releases its budget, and when every
route is done the source's :class:`Receipt` is settled (PUBACK, ack, commit).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog

from gateway.envelope import Envelope
from gateway.errors import GatewayError, TemplateError
from gateway.flow import FlowGate
from gateway.patterns import SourcePattern, TopicSyntax
from gateway.router import Router
from gateway.templates import Match, Template

if TYPE_CHECKING:
    from gateway.sink import Sink

log = structlog.get_logger("gateway.route")

_FAILURE_LOG_INTERVAL = 10.0


class RouteStats:
    """Monotonic counters of one route. ``received == acked + failed + dropped + in flight``."""

    __slots__ = ("acked", "dropped", "failed", "received", "sent")

    def __init__(self) -> None:
        self.received = 0
        self.sent = 0
        """Target deliveries the sink broker confirmed (a fan-out message counts once per target)."""
        self.acked = 0
        self.failed = 0
        self.dropped = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class Target:
    """One compiled ``to`` entry of a route."""

    __slots__ = ("address", "connector", "index", "key", "route", "sink", "spec")

    def __init__(
        self,
        route: Route,
        index: int,
        connector: str,
        spec: Any,
        address: Template,
        key: Template | None,
    ) -> None:
        self.route = route
        self.index = index
        self.connector = connector
        self.spec = spec
        self.address = address
        self.key = key
        self.sink: Sink | None = None
        """Bound by the gateway when the connector is built."""

    def render(self, match: Match) -> Delivery:
        try:
            address = self.address.render(match)
            key = self.key.render(match).encode() if self.key is not None else None
        except TemplateError as exc:
            return Delivery(self, "", None, exc)
        return Delivery(self, address, key, None)


class Delivery:
    """A target rendered for one source topic; cached with the topic's plan."""

    __slots__ = ("address", "error", "key", "sink", "target")

    def __init__(self, target: Target, address: str, key: bytes | None, error: GatewayError | None) -> None:
        self.target = target
        self.sink = target.sink
        self.address = address
        self.key = key
        self.error = error


class Flight:
    """One message inside one route, until every target of the route is done."""

    __slots__ = ("env", "error", "nbytes", "pending", "route")

    def __init__(self, route: Route, env: Envelope, pending: int, nbytes: int) -> None:
        self.route = route
        self.env = env
        self.pending = pending
        self.nbytes = nbytes
        self.error: BaseException | None = None

    def done(self, error: BaseException | None = None) -> None:
        """A target finished: confirmed by its broker (``error is None``) or failed for good."""
        if error is None:
            self.route.stats.sent += 1
        elif self.error is None:
            self.error = error
        self.pending -= 1
        if self.pending == 0:
            self.route.finish(self)


class Route:
    """A route at run time: its targets, its budget and its counters."""

    def __init__(
        self,
        name: str,
        source: str,
        spec: Any,
        patterns: Sequence[SourcePattern],
        *,
        max_in_flight: int,
        max_in_flight_bytes: int,
    ) -> None:
        self.name = name
        self.source = source
        self.spec = spec
        self.patterns = tuple(patterns)
        self.targets: list[Target] = []
        self.max_in_flight = max_in_flight
        self.max_in_flight_bytes = max_in_flight_bytes
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.stats = RouteStats()
        self.saturated = False
        self.gate: FlowGate | None = None
        self._last_failure_log = 0.0
        self._failures_unlogged = 0
        self._idle: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"Route({self.name!r})"

    def admit(self, env: Envelope, deliveries: tuple[Delivery, ...]) -> None:
        nbytes = len(env.payload)
        self.stats.received += 1
        self.in_flight += 1
        self.in_flight_bytes += nbytes
        if not self.saturated and (
            self.in_flight >= self.max_in_flight or self.in_flight_bytes >= self.max_in_flight_bytes
        ):
            self.saturated = True
            if self.gate is not None:
                self.gate.close()
        flight = Flight(self, env, len(deliveries), nbytes)
        for d in deliveries:
            if d.error is None:
                d.sink.submit(flight, d)  # type: ignore[union-attr]  # bound before any dispatch
            else:
                flight.done(d.error)

    def finish(self, flight: Flight) -> None:
        self.in_flight -= 1
        self.in_flight_bytes -= flight.nbytes
        if flight.error is None:
            self.stats.acked += 1
        else:
            self.stats.failed += 1
            self._log_failure(flight.error)
        if (
            self.saturated
            and self.in_flight <= self.max_in_flight // 2
            and self.in_flight_bytes <= self.max_in_flight_bytes // 2
        ):
            self.saturated = False
            if self.gate is not None:
                self.gate.open()
        receipt = flight.env.receipt
        if receipt is not None:
            receipt.pending -= 1
            if receipt.pending == 0:
                receipt.settle()
        if self._idle is not None and self.in_flight == 0 and not self._idle.done():
            self._idle.set_result(None)

    async def drained(self) -> None:
        """Until nothing is in flight (shutdown drains with this)."""
        while self.in_flight:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle

    def room(self) -> int:
        """How many more messages the budget admits before the route saturates."""
        return max(0, self.max_in_flight - self.in_flight)

    def _log_failure(self, error: BaseException) -> None:
        # Failures can come in floods (a poison topic): log the first, then a count every few seconds.
        now = time.monotonic()
        self._failures_unlogged += 1
        if now - self._last_failure_log >= _FAILURE_LOG_INTERVAL:
            log.warning(
                "route.delivery_failed",
                route=self.name,
                error=str(error),
                error_type=type(error).__name__,
                count=self._failures_unlogged,
            )
            self._last_failure_log = now
            self._failures_unlogged = 0


Plan = tuple[tuple[Route, tuple[Delivery, ...]], ...]


class Dispatcher:
    """Routes the messages of one source channel (a connection, consumer or subscription)."""

    def __init__(self, syntax: TopicSyntax, routes: Sequence[Route], *, cache_size: int = 10_000) -> None:
        self.routes = tuple(routes)
        self.gate = FlowGate()
        self.router: Router[Route] = Router(syntax)
        for route in self.routes:
            route.gate = self.gate
            for pattern in route.patterns:
                self.router.add(pattern, route)
        self.cache_size = cache_size
        self._plans: dict[str, Plan] = {}
        self.unrouted = 0

    def plan(self, topic: str) -> Plan:
        """Which routes take ``topic`` and what each of their targets renders to (cached)."""
        plan = self._plans.get(topic)
        if plan is None:
            plan = tuple(
                (route, tuple(t.render(match) for t in route.targets)) for route, match in self.router.match(topic)
            )
            if len(self._plans) >= self.cache_size:
                del self._plans[next(iter(self._plans))]
            self._plans[topic] = plan
        return plan

    def dispatch(self, env: Envelope) -> None:
        plan = self._plans.get(env.topic)
        if plan is None:
            plan = self.plan(env.topic)
        receipt = env.receipt
        if not plan:
            self.unrouted += 1
            if receipt is not None:
                receipt.settle()
            return
        if receipt is not None:
            receipt.pending = len(plan)
        for route, deliveries in plan:
            route.admit(env, deliveries)

    def room(self) -> int:
        """Messages every route here can still admit: what a pull source may fetch next."""
        return min((r.room() for r in self.routes), default=0)
