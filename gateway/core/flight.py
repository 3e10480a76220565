"""One message inside one route: its compiled targets, the plan for its topic, and its flight.

A flight reports to its route through :class:`Owner` and a route hands it to a sink through
:class:`Outlet`: this module imports neither, so the per-message path has no import circle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from gateway.core.envelope import Envelope
from gateway.core.policies import NO_LIMIT, RouteState
from gateway.core.stats import RouteStats
from gateway.errors import GatewayError, SinkError, TemplateError
from gateway.routing.patterns import SourcePattern
from gateway.routing.templates import Match, Template


class Owner(Protocol):
    """What a flight, a target and a plan see of their route (:class:`gateway.core.route.Route`)."""

    name: str
    stats: RouteStats
    state: RouteState

    patterns: tuple[SourcePattern, ...]

    def admit(self, env: Envelope, plan: RoutePlan) -> None: ...

    def admit_run(self, envs: list[Envelope], plan: RoutePlan) -> None: ...

    def reject(self, env: Envelope, plan: RoutePlan, error: SinkError) -> None: ...

    def finish(self, flight: Flight) -> None: ...

    def finish_run(self, flights: list[Flight]) -> None: ...

    def schedule_retry(
        self, flight: Flight, delivery: Delivery, error: SinkError, *, forever: bool = False
    ) -> bool: ...

    def dead_letter_done(self, flight: Flight, error: BaseException | None) -> None: ...

    def handed_over(self, flight: Flight, now: float) -> None: ...


class Outlet(Protocol):
    """What a route sees of a sink (:class:`gateway.core.sink.Sink`)."""

    timeout: float
    up_since: float | None

    def submit(self, flight: Flight, delivery: Delivery) -> None: ...

    def queued(self) -> list[tuple[Flight, Delivery]]: ...

    def take_first(self, match: Callable[[tuple[Flight, Delivery]], bool]) -> tuple[Flight, Delivery] | None: ...

    def take_all(self, match: Callable[[tuple[Flight, Delivery]], bool]) -> list[tuple[Flight, Delivery]]: ...


class Target:
    """One compiled ``to`` entry (or the ``dead_letter``) of a route."""

    __slots__ = (
        "address",
        "connector",
        "index",
        "key",
        "max_payload",
        "reads_payload",
        "replies",
        "route",
        "sink",
        "spec",
    )

    def __init__(
        self,
        route: Owner,
        index: int,
        connector: str,
        spec: Any,
        address: Template,
        key: Template | None,
        max_payload: int | None = None,
    ) -> None:
        self.route = route
        self.index = index
        """Position in ``to``; -1 for the dead-letter target."""
        self.connector = connector
        self.spec = spec
        self.address = address
        self.key = key
        self.sink: Outlet | None = None
        """Bound by the gateway when the connector is built."""
        self.reads_payload = address.reads_payload or (key is not None and key.reads_payload)
        """The subject, topic or key holds ``{payload.FIELD}``: rendered per message."""
        self.max_payload = max_payload if max_payload is not None else NO_LIMIT
        """The target connector's ``max_payload``: larger messages fail here, never reach its sink."""
        self.replies = False
        """The target publishes ``env.reply`` as the reply address (a request route's NATS target)."""

    def render(self, match: Match) -> Delivery:
        if self.reads_payload:
            return Delivery(self, "", None, None, match)  # rendered per message: Route.render_payload
        try:
            address = self.address.render(match)
            key = self.key.render(match).encode() if self.key is not None else None
        except TemplateError as exc:
            return Delivery(self, "", None, exc)
        except Exception as exc:  # a source name no target text can hold (a lone surrogate, ...): this topic's
            return Delivery(self, "", None, TemplateError(f"cannot render {self.address.text!r}: {exc!r}"))
        return Delivery(self, address, key, None)


class Delivery:
    """A target rendered for one source topic; cached with the topic's plan."""

    __slots__ = ("address", "error", "key", "match", "max_payload", "replies", "sink", "target")

    def __init__(
        self,
        target: Target,
        address: str,
        key: bytes | None,
        error: GatewayError | None,
        match: Match | None = None,
    ) -> None:
        self.target = target
        self.match = match
        """Set when the target's templates read the payload: rendered per message from this match."""
        self.sink = target.sink
        self.max_payload = target.max_payload
        self.replies = target.replies
        self.address = address
        self.key = key
        self.error = error


class RoutePlan:
    """What one route does with one source topic: its rendered targets and dead letter."""

    __slots__ = ("dead_letter", "deliveries", "match", "route")

    def __init__(
        self,
        route: Owner,
        deliveries: tuple[Delivery, ...],
        dead_letter: Delivery | None,
        match: Match | None = None,
    ) -> None:
        self.route = route
        self.deliveries = deliveries
        self.dead_letter = dead_letter
        self.match = match
        """What the source pattern matched (captures for header templates)."""


SUPERSEDED = 1 << 60
"""``pending`` of a flight the watchdog replaced: whatever its sinks still report cannot finish it."""
STUCK_FACTOR = 3
"""``stuck_after`` by default: this many times the slowest target sink's own timeout."""
MAX_RESUBMITS = 3
"""Times the watchdog submits one message again before it fails it (dead letter / on_error)."""


class Flight:
    """One message inside one route, until every target of the route is done with it."""

    __slots__ = ("attempts", "closed", "env", "error", "nbytes", "pending", "plan", "released", "route")

    def __init__(self, route: Owner, env: Envelope, plan: RoutePlan, nbytes: int) -> None:
        self.route = route
        self.env = env
        self.plan = plan
        self.pending = len(plan.deliveries)
        self.nbytes = nbytes
        self.error: BaseException | None = None
        self.released = False
        self.closed = False
        """The route let it go (its budget slot is free); set once."""
        self.attempts: dict[int, tuple[int, float, int]] | None = None
        """Per target index: (retries so far, time of the first failure, waits for an unavailable target);
        only once something failed."""

    def done(self) -> None:
        """A target's broker confirmed the message."""
        self.route.stats.sent += 1
        self.pending -= 1
        if self.pending == 0:
            self.route.finish(self)

    def fail(self, delivery: Delivery, error: BaseException) -> None:
        """A target refused or could not take the message; retriable errors are tried again later."""
        if isinstance(error, SinkError) and error.retriable:
            if self.route.state is RouteState.DISCONNECTED:
                self.release()  # cut off meanwhile: give it back rather than call it a failure
                return
            if self.route.schedule_retry(self, delivery, error):
                return
        if self.error is None:
            self.error = error
        self.pending -= 1
        if self.pending == 0:
            self.route.finish(self)

    def release(self) -> None:
        """A target gives the message up undelivered (its route was disconnected)."""
        self.released = True
        self.pending -= 1
        if self.pending == 0:
            self.route.finish(self)


class DeadLetter(Flight):
    """The dead-letter write of a failed flight; its outcome completes the original."""

    __slots__ = ("original",)

    def __init__(self, original: Flight, env: Envelope, plan: RoutePlan) -> None:
        super().__init__(original.route, env, plan, 0)
        self.pending = 1
        self.original = original

    # Through the original's route, read now: a reload may have handed the original to its successor.
    def done(self) -> None:
        self.original.route.dead_letter_done(self.original, None)

    def fail(self, delivery: Delivery, error: BaseException) -> None:
        if isinstance(error, SinkError) and error.retriable:
            self.original.route.schedule_retry(self, delivery, error, forever=True)
            return
        self.original.route.dead_letter_done(self.original, error)

    def release(self) -> None:
        self.original.released = True
        self.original.route.dead_letter_done(self.original, None)


def original_of(flight: Flight) -> Flight:
    """The flight a dead-letter write completes, or the flight itself."""
    return flight.original if isinstance(flight, DeadLetter) else flight
