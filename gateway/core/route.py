"""Routes at run time: budgets, overflow policies, retries, dead letters, release.

A message matched by a route becomes one :class:`Flight` that the route
submits to every target's sink. A flight ends in exactly one outcome, and the
counters always satisfy ``received == acked + failed + dropped + filtered + in_flight``:

- **acked**: every target confirmed; the source is acknowledged.
- **failed**: a target failed for good (non-retriable error, retries
  exhausted, a name the target cannot carry). With a ``dead_letter`` target the
  message is written there first (``dead_lettered`` counts those) and the
  source acknowledged after that write; without one, ``on_error: drop``
  acknowledges and ``on_error: stop`` stops the route and leaves the message
  unacknowledged, for redelivery.
- **dropped**, by reason: ``overflow`` (``drop_newest``/``drop_oldest`` chose
  it; acknowledged), ``released`` (the route was disconnected as a slow
  consumer: not acknowledged, so durable sources redeliver it).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from time import monotonic_ns
from typing import Any, ClassVar, Literal, Protocol

import msgspec
import structlog

from gateway.config.options import RequestLeg
from gateway.core.envelope import Envelope
from gateway.core.flight import (
    MAX_RESUBMITS,
    STUCK_FACTOR,
    SUPERSEDED,
    DeadLetter,
    Delivery,
    Flight,
    RoutePlan,
    Target,
    original_of,
)
from gateway.core.flow import FlowGate
from gateway.core.policies import NO_LIMIT, Overflow, RoutePolicy, RouteState
from gateway.core.shard import Shard
from gateway.core.sink import Sink
from gateway.core.stats import Ages, Backlog, Latency, RouteStats
from gateway.errors import (
    HeaderError,
    HeadersTooLarge,
    PayloadError,
    PayloadTooLarge,
    SinkError,
    TemplateError,
    Unavailable,
)
from gateway.routing.patterns import SourcePattern
from gateway.routing.templates import Match
from gateway.util.flood import Flood

log = structlog.get_logger("gateway.route")

Refusal = Literal["invalid", "filtered"]
Ending = Literal["full", "released", "failed"]


class Stage(Protocol):
    """The content stage a route runs before admission (``where``, ``schema``, ``codec``, ``headers``):
    :class:`gateway.routes.transform.Transform`."""

    doc: Any
    """The payload as decoded by the last :meth:`apply` (what ``{payload.FIELD}`` templates read)."""

    def apply(self, env: Envelope, match: Match | None = None) -> Envelope | None:
        """The message to admit (changed or not), or None to filter it out; raises for a bad payload."""
        ...


class Route:
    """A route at run time: its targets, its budget, its policies and its counters."""

    def __init__(
        self, name: str, source: str, spec: Any, patterns: Sequence[SourcePattern], policy: RoutePolicy | None = None
    ) -> None:
        self.name = name
        self.source = source
        self.spec = spec
        self.patterns = tuple(patterns)
        self.policy = policy or RoutePolicy()
        self.max_in_flight = self.policy.max_in_flight
        self.max_in_flight_bytes = self.policy.max_in_flight_bytes
        self.max_payload = self.policy.max_payload if self.policy.max_payload is not None else NO_LIMIT
        self.max_headers = self.policy.max_headers
        self.max_header_bytes = self.policy.max_header_bytes
        self._transform: Stage | None = None
        self._staged = self.always_staged
        self.payload_templates = False
        """Some target's subject, topic or key reads the payload (``{payload.FIELD}``): rendered per message."""
        self.shard: Shard | None = None
        """This worker's share of the route's keys (``shard_by`` with several workers): the dispatcher's plan
        sends the other workers' topics to an :class:`Elsewhere` instead of this route."""
        self.request_leg: RequestLeg | None = None
        """``request:`` settings (of a request route or of its companion ``.replies`` route)."""
        self.targets: list[Target] = []
        self.dead_letter: Target | None = None
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.stats = RouteStats()
        self.backlog: Backlog | None = None
        """What the source has not taken yet at its broker (consumer lag), set by the source every few seconds."""
        self.latency = Latency()
        self.ages = Ages()
        """Age of messages at admission (freshness), for sources with broker timestamps."""
        self.state = RouteState.RUNNING
        self.saturated = False
        self.saturated_since = 0.0
        self.gate: FlowGate | None = None
        self._holds_gate = False
        self._retired = False
        """A reload took this route away (:meth:`retire`): its gate stays held."""
        self._drop = policy is not None and policy.overflow in (Overflow.DROP_NEWEST, Overflow.DROP_OLDEST)
        self._timers: dict[asyncio.TimerHandle, Flight] = {}
        """Retries waiting for their delay, with their flights."""
        self._flood = Flood()
        self._idle: asyncio.Future[None] | None = None
        self._flights: deque[Flight] = deque()
        self._track = self._flights.append
        """Flights in admission order; closed ones leave from the left, so the first is the oldest open one
        (unless one is stuck: then :meth:`watch` compacts what finished behind it)."""
        self._watched: dict[Flight, tuple[int, float]] = {}
        """Flights handed to a sink again after they were received (requeued after a lost connection, retried,
        resubmitted by the watchdog): (times resubmitted, when last handed over). The watchdog measures their
        age from that hand-over, the others' from the source's receive time. Filled on cold paths only."""
        self._waiting: set[int] = set()
        """Ids of the flights the last watchdog pass saw waiting (in a sink queue or a retry timer)."""

    def __repr__(self) -> str:
        return f"Route({self.name!r})"

    admits_runs: ClassVar[bool] = True
    """:meth:`admit_run` may admit a run at once; False for a route kind with its own :meth:`admit`."""

    always_staged: ClassVar[bool] = False
    """A route kind whose :meth:`stage` runs for every message, transform or not (request/reply)."""

    @property
    def transform(self) -> Stage | None:
        """The route's where / schema / codec / headers, compiled; None keeps the pass-through path."""
        return self._transform

    @transform.setter
    def transform(self, stage: Stage | None) -> None:
        self._transform = stage
        self._staged = stage is not None or self.always_staged

    # -- the per-message path ---------------------------------------------------------------
    def admit(self, env: Envelope, plan: RoutePlan) -> None:
        """One message matched by this route: run the content stage, then admit it under the budget and
        hand it to every target's sink."""
        nbytes = len(env.payload)
        self.stats.received += 1
        if env.age_ns >= 0:  # freshness, where the source's broker stamps its messages
            self.ages.observe_ns(env.age_ns)
        if self.state is not RouteState.RUNNING:
            # Cut off or stopped: what still arrives goes back (redelivered by durable sources).
            self.stats.dropped_released += 1
            self.turned_away(env)
            self._settle(env.receipt, released=True)
            return
        if self._staged:  # where / schema / codec / headers (and a route kind's own step): not on pass-through
            staged = self.stage(env, plan, nbytes)
            if staged is None:
                return
            env, plan = staged
        # Admission proper: the overflow policy and the budget, then one flight to every target's sink.
        if (
            self._drop
            and (self.in_flight >= self.max_in_flight or self.in_flight_bytes + nbytes > self.max_in_flight_bytes)
            and not (self.policy.overflow is Overflow.DROP_OLDEST and self._evict_oldest())
        ):
            self.stats.dropped_overflow += 1
            self.given_up(env, "full", None)
            self._settle(env.receipt, released=False)
            return
        self.in_flight += 1
        self.in_flight_bytes += nbytes
        if not self.saturated and (
            self.in_flight >= self.max_in_flight or self.in_flight_bytes >= self.max_in_flight_bytes
        ):
            # block / disconnect: stop the source; what is already on its way is admitted (push sources).
            self.saturated = True
            self.saturated_since = time.monotonic()
            if not self._drop:
                self.hold_gate()
        flight = Flight(self, env, plan, nbytes)
        self._track(flight)
        if nbytes > self.max_payload:
            self._refuse(flight, PayloadTooLarge(nbytes, self.max_payload, f"route {self.name!r} max_payload"))
            return
        headers = env.headers
        if headers is not None and (
            len(headers) > self.max_headers or sum(len(k) + len(v) for k, v in headers) > self.max_header_bytes
        ):
            size = sum(len(k) + len(v) for k, v in headers)
            self._refuse(flight, HeadersTooLarge(len(headers), size, self.max_headers, self.max_header_bytes))
            return
        for d in plan.deliveries:
            if d.error is None and nbytes <= d.max_payload:
                d.sink.submit(flight, d)  # type: ignore[union-attr]  # bound before any dispatch
            else:
                flight.fail(d, d.error or PayloadTooLarge(nbytes, d.max_payload, f"{d.target.connector} max_payload"))

    def admit_run(self, envs: list[Envelope], plan: RoutePlan) -> None:
        """Messages of one topic that arrived together (one fetch, one socket read): :meth:`admit` each, with
        what does not depend on the message done once for the run. The common case only (running, no content
        stage, the blocking overflow policy, within the limits); anything else goes through :meth:`admit`."""
        if self.state is not RouteState.RUNNING or self._staged or self._drop or not self.admits_runs:
            for env in envs:
                self.admit(env, plan)
            return
        flights: list[Flight] = []
        append = flights.append
        ages = self.ages
        max_payload = self.max_payload
        total = largest = 0
        for i, env in enumerate(envs):
            nbytes = len(env.payload)
            if nbytes > max_payload or (env.headers is not None and len(env.headers) > self.max_headers):
                self._admit_flights(flights, total, largest, plan)  # what came before, in order
                flights = []
                append = flights.append
                total = largest = 0
                self.admit(env, plan)  # refused there, alone
                if self.state is not RouteState.RUNNING:  # its failure stopped the route (on_error: stop)
                    for rest in envs[i + 1 :]:
                        self.admit(rest, plan)
                    return
                continue
            if env.age_ns >= 0:
                ages.observe_ns(env.age_ns)
            total += nbytes
            if nbytes > largest:
                largest = nbytes
            append(Flight(self, env, plan, nbytes))
        self._admit_flights(flights, total, largest, plan)

    def _admit_flights(self, flights: list[Flight], total: int, largest: int, plan: RoutePlan) -> None:
        """The budget and the sinks for a run's flights (see :meth:`admit_run`; ``largest``: the largest payload
        among them); header bytes are checked here, where a message carries headers at all."""
        if not flights:
            return
        n = len(flights)
        self.stats.received += n
        self.in_flight += n
        self.in_flight_bytes += total
        if not self.saturated and (
            self.in_flight >= self.max_in_flight or self.in_flight_bytes >= self.max_in_flight_bytes
        ):
            self.saturated = True
            self.saturated_since = time.monotonic()
            self.hold_gate()
        self._flights.extend(flights)
        refused: set[Flight] = set()
        for f in flights:
            headers = f.env.headers
            if headers is not None and sum(len(k) + len(v) for k, v in headers) > self.max_header_bytes:
                size = sum(len(k) + len(v) for k, v in headers)
                refused.add(f)
                self._refuse(f, HeadersTooLarge(len(headers), size, self.max_headers, self.max_header_bytes))
        if refused:
            flights = [f for f in flights if f not in refused]
        for d in plan.deliveries:
            if d.error is None and largest <= d.max_payload:
                d.sink.submit_many(flights, d)  # type: ignore[union-attr]  # bound before any dispatch
            else:
                for f in flights:
                    if d.error is None and f.nbytes <= d.max_payload:
                        d.sink.submit(f, d)  # type: ignore[union-attr]
                    else:
                        f.fail(
                            d, d.error or PayloadTooLarge(f.nbytes, d.max_payload, f"{d.target.connector} max_payload")
                        )

    def stage(self, env: Envelope, plan: RoutePlan, nbytes: int) -> tuple[Envelope, RoutePlan] | None:
        """The content stage before admission: the message to admit and its plan, or None when the stage
        settled it (filtered out, or failed alone through the route's error policy)."""
        transform = self._transform
        if transform is None:
            return env, plan
        try:
            changed = transform.apply(env, plan.match)
            if changed is not None and self.payload_templates:
                plan = self.render_payload(plan, transform.doc)
        except Exception as exc:  # whatever one payload does, it fails alone, here
            exc = exc if isinstance(exc, PayloadError) else PayloadError.of(exc)
            self.refused(env, "invalid", exc)
            self.in_flight += 1
            self.in_flight_bytes += nbytes
            flight = Flight(self, env, plan, nbytes)
            self._track(flight)
            self._refuse(flight, exc)
            return None
        if changed is None:
            self.stats.filtered += 1
            self.refused(env, "filtered", None)
            self._settle(env.receipt, released=False)
            return None
        return changed, plan

    # Hooks of the route kinds, called off the per-message path's common case only.
    def turned_away(self, env: Envelope) -> None:
        """A message arrived while the route is not running (it is released)."""

    def refused(self, env: Envelope, reason: Refusal, error: BaseException | None) -> None:
        """The content stage refused a message: ``invalid`` (a bad payload: ``error``) or ``filtered``."""

    def given_up(self, env: Envelope, reason: Ending, error: BaseException | None) -> None:
        """An admitted message ends undelivered: dropped because the route is ``full``, ``released`` (cut off),
        or ``failed`` (``error``)."""

    def reject(self, env: Envelope, plan: RoutePlan, error: SinkError) -> None:
        """A message its source could not read or represent: received, then failed through the route's policy
        (dead letter with ``error`` / ``on_error``) without being looked at or published."""
        nbytes = len(env.payload)
        self.stats.received += 1
        if self.state is not RouteState.RUNNING:  # cut off: it comes back when the route resumes, as in admit
            self.stats.dropped_released += 1
            self._settle(env.receipt, released=True)
            return
        self.in_flight += 1
        self.in_flight_bytes += nbytes
        flight = Flight(self, env, plan, nbytes)
        self._track(flight)
        self._refuse(flight, error)

    def render_payload(self, plan: RoutePlan, doc: Any) -> RoutePlan:
        """``plan`` with the targets that read the payload rendered for this message's ``doc``."""
        deliveries = []
        for d in plan.deliveries:
            if d.match is not None:
                t = d.target
                try:
                    address = t.address.render(d.match, doc)
                    key = t.key.render(d.match, doc).encode() if t.key is not None else None
                    d = Delivery(t, address, key, None)
                except TemplateError as exc:
                    d = Delivery(t, "", None, exc)
                except Exception as exc:  # a payload value the template cannot render
                    d = Delivery(t, "", None, TemplateError(f"cannot render {t.address.text!r}: {exc!r}"))
            deliveries.append(d)
        return RoutePlan(self, tuple(deliveries), plan.dead_letter, plan.match)

    @staticmethod
    def _refuse(flight: Flight, error: SinkError) -> None:
        """A message over the route's limits: every target fails it, nothing is published."""
        for d in flight.plan.deliveries:
            flight.fail(d, error)

    def finish(self, flight: Flight) -> None:
        error = flight.error
        if error is not None and not flight.released:
            self.given_up(flight.env, "failed", error)
            if flight.plan.dead_letter is not None:
                self._write_dead_letter(flight, error)
                return
            self.stats.failed += 1
            self._log("route.delivery_failed", error)
            if self.policy.on_error == "stop":
                self.stop(f"{type(error).__name__}: {error}")
                flight.released = True  # not acknowledged: redelivered once the route runs again
        elif flight.released:
            self.stats.dropped_released += 1
            self.given_up(flight.env, "released", None)
        else:
            self.stats.acked += 1
            received = flight.env.received_ns
            if received:
                self.latency.observe_ns(monotonic_ns() - received)
        self._close(flight)

    def finish_run(self, flights: list[Flight]) -> None:
        """Flights of this route, in order, whose last target just confirmed them, none failed or released
        (:meth:`Sink.confirmed`): :meth:`finish` and :meth:`_close` for each, with the counters, the budget
        and the saturation check once for the run."""
        n = len(flights)
        stats = self.stats
        stats.sent += n
        stats.acked += n
        observe = self.latency.observe_ns
        now = monotonic_ns()
        nbytes = 0
        for flight in flights:
            flight.pending = 0
            flight.closed = True
            nbytes += flight.nbytes
            env = flight.env
            if env.received_ns:
                observe(now - env.received_ns)
            receipt = env.receipt
            if receipt is not None:
                receipt.pending -= 1
                if receipt.pending == 0:
                    if receipt.released:
                        receipt.release()
                    else:
                        receipt.settle()
        tracked = self._flights
        while tracked and tracked[0].closed:
            tracked.popleft()
        if self._watched:
            for flight in flights:
                self._watched.pop(flight, None)
        self.in_flight -= n
        self.in_flight_bytes -= nbytes
        if self.saturated or self._idle is not None:  # two tests on the common path; the rest in _drained
            self._drained()

    def _close(self, flight: Flight) -> None:
        flight.closed = True
        flights = self._flights
        if flights and flights[0] is flight:
            flights.popleft()
            while flights and flights[0].closed:
                flights.popleft()
        if self._watched:
            self._watched.pop(flight, None)
        self.in_flight -= 1
        self.in_flight_bytes -= flight.nbytes
        self._settle(flight.env.receipt, released=flight.released)
        if self.saturated or self._idle is not None:  # two tests on the common path; the rest in _drained
            self._drained()

    def _drained(self) -> None:
        """Flights left the route: below half of both budgets a saturated route lets its source read again
        (while running), and with none left a waiting :meth:`drained` returns."""
        if (
            self.saturated
            and self.in_flight <= self.max_in_flight // 2
            and self.in_flight_bytes <= self.max_in_flight_bytes // 2
        ):
            self.saturated = False
            if self.state is RouteState.RUNNING:
                self.free_gate()
        if self._idle is not None and self.in_flight == 0 and not self._idle.done():
            self._idle.set_result(None)

    @staticmethod
    def _settle(receipt: Any, *, released: bool) -> None:
        if receipt is None:
            return
        if released:
            receipt.released = True
        receipt.pending -= 1
        if receipt.pending == 0:
            if receipt.released:
                receipt.release()
            else:
                receipt.settle()

    # -- failures: retries and dead letters ---------------------------------------------------
    def schedule_retry(self, flight: Flight, delivery: Delivery, error: SinkError, *, forever: bool = False) -> bool:
        """Try ``delivery`` again after a backoff; False if the retry budget is spent."""
        if flight.closed:
            return True  # the watchdog sent this message again as a new flight: nothing more to do here
        if self.state is not RouteState.RUNNING and not forever:
            return False
        retry = self.policy.retry
        now = time.monotonic()
        attempts = flight.attempts if flight.attempts is not None else {}
        count, first, waits = attempts.get(delivery.target.index, (0, 0.0, 0))
        if isinstance(error, Unavailable):  # waited out like a lost connection: never counts against `retry`
            attempts[delivery.target.index] = (count, first, waits + 1)
            delay = retry.delay(waits)
        else:
            first = first or now  # the retry window opens at the first error that counts
            if not forever and (count >= retry.attempts or now - first >= retry.max_time):
                return False
            attempts[delivery.target.index] = (count + 1, first, waits)
            delay = retry.delay(count)
        flight.attempts = attempts
        self.stats.retried += 1
        handle: asyncio.TimerHandle

        def resubmit() -> None:
            self._timers.pop(handle, None)
            self.handed_over(flight, time.monotonic())
            delivery.sink.submit(flight, delivery)  # type: ignore[union-attr]

        handle = asyncio.get_running_loop().call_later(delay, resubmit)
        self._timers[handle] = flight
        return True

    def _write_dead_letter(self, flight: Flight, error: BaseException) -> None:
        dl = flight.plan.dead_letter
        assert dl is not None and dl.sink is not None
        env = flight.env
        if len(env.payload) > dl.max_payload:  # the dead letter's connector has its own limit
            self.dead_letter_done(
                flight, PayloadTooLarge(len(env.payload), dl.max_payload, f"{dl.target.connector} max_payload")
            )
            return
        receipt = env.receipt
        headers = [
            *(env.headers if env.headers and not isinstance(error, HeaderError) else ()),  # not a flood again
            ("x-gateway-route", self.name),
            ("x-gateway-error", str(error)[:1000]),
            ("x-gateway-error-type", type(error).__name__),
            ("x-gateway-source-topic", env.topic),
            ("x-gateway-source-position", receipt.position() if receipt is not None else ""),
        ]
        letter = DeadLetter(flight, msgspec.structs.replace(env, headers=headers, receipt=None), flight.plan)
        dl.sink.submit(letter, dl)

    def dead_letter_done(self, flight: Flight, error: BaseException | None) -> None:
        """The dead-letter write of ``flight`` ended; ``error`` if it failed for good too."""
        if flight.closed:
            return  # settled already (never expected; a guard off the per-message path)
        if error is None and not flight.released:
            self.stats.failed += 1
            self.stats.dead_lettered += 1
            self._log("route.dead_lettered", flight.error)
        elif flight.released:
            self.stats.dropped_released += 1
        else:
            flight.plan = RoutePlan(self, flight.plan.deliveries, None)  # no second dead letter
            flight.error = error
            self.finish(flight)
            return
        self._close(flight)

    # -- overflow, release and state ----------------------------------------------------------
    def _evict_oldest(self) -> bool:
        """drop_oldest: give up the oldest message still waiting in this route's sink.

        Only for single-target routes: a fan-out message may already be written to one of its
        sinks, and what a broker has cannot be taken back (fan-out routes drop the newest instead).
        """
        if len(self.targets) != 1 or self.targets[0].sink is None:
            return False
        item = self.targets[0].sink.take_first(
            lambda it: type(it[0]) is Flight and it[0].route is self and not it[0].closed
        )
        if item is None:
            return False
        self.stats.dropped_overflow += 1
        self.given_up(item[0].env, "full", None)
        self._close(item[0])
        return True

    def release(self) -> int:
        """Give up everything still waiting in this route's sinks or retry timers (slow-consumer cut)."""
        timers, self._timers = self._timers, {}
        for handle, flight in timers.items():
            handle.cancel()
            flight.release()
        released = len(timers)
        sinks = {t.sink for t in (*self.targets, self.dead_letter) if t is not None and t.sink is not None}
        for sink in sinks:
            for flight, _ in sink.take_all(lambda it: it[0].route is self):
                if not flight.closed:  # not a copy the watchdog replaced
                    flight.release()
                    released += 1
        return released

    # -- the watchdog: nothing stays in flight without a delivery attempt ---------------------
    def oldest_in_flight(self, now_ns: int) -> float:
        """Seconds since the source received the oldest message still in flight; 0.0 when none."""
        flights = self._flights
        while flights and flights[0].closed:
            flights.popleft()
        oldest = flights[0].env.received_ns if flights else 0
        for flight in self._watched:  # resubmitted ones are tracked again at the end: not in receive order
            received = flight.env.received_ns
            if received and (not oldest or received < oldest):
                oldest = received
        return (now_ns - oldest) / 1e9 if oldest else 0.0

    def stuck_bound(self) -> float:
        """``stuck_after``, or :data:`STUCK_FACTOR` times the slowest target sink's own timeout."""
        if self.policy.stuck_after is not None:
            return self.policy.stuck_after
        sinks = [t.sink for t in (*self.targets, self.dead_letter) if t is not None and t.sink is not None]
        return STUCK_FACTOR * max((sink.timeout for sink in sinks), default=30.0)

    def handed_over(self, flight: Flight, now: float) -> None:
        """``flight`` went back to a sink (requeued after a lost connection, retried): the watchdog measures
        its age from now on. Cold paths only."""
        if type(flight) is Flight and not flight.closed:
            times, _ = self._watched.get(flight, (0, now))
            self._watched[flight] = (times, now)

    def watch(self, now: float) -> int:
        """Submit again what stayed in flight past :meth:`stuck_bound` while its targets were connected.

        A message can only stay that long with a connected target, handed to it and neither
        waiting in its queue nor for a retry, if some client lost it (a replaced client that never
        reported it) or its broker never answers: it is sent again as a new flight (at-least-once:
        the old one's late outcome changes nothing) and after :data:`MAX_RESUBMITS` times it fails
        (dead letter / ``on_error``), never silently kept. Age counts from the source's receive
        time, or from the last hand-over to a sink (:meth:`handed_over`, or leaving a queue since
        the last pass); everything waits while a target is down: an outage is waited out. Called by
        the supervisor every second or so; returns how many it resubmitted.
        """
        flights = self._flights
        while flights and flights[0].closed:
            flights.popleft()
        if len(flights) > 2 * self.in_flight + 1024:  # finished flights piled up behind a stuck one
            self._flights = flights = deque(f for f in flights if not f.closed)
            self._track = flights.append
        bound = self.stuck_bound()
        limit_ns = int((now - bound / 2) * 1e9)  # half the bound: who waits is known a pass ahead
        watched = self._watched
        candidates: list[Flight] = []
        for f in flights:  # admission order: the old ones come first
            received = f.env.received_ns
            if received >= limit_ns or len(candidates) >= 1000:
                break
            if received and not f.closed and f not in watched:
                candidates.append(f)
        candidates += [f for f, (_, last) in watched.items() if now - last >= bound / 2 and not f.closed]
        previously, self._waiting = self._waiting, set()
        if not candidates or self.state is not RouteState.RUNNING:
            return 0
        waiting = {id(original_of(f)) for f in self._timers.values()}
        down = False
        for t in (*self.targets, self.dead_letter):
            sink = t.sink if t is not None else None
            if sink is None:
                continue
            down = down or sink.up_since is None or now - sink.up_since < bound
            waiting.update(id(original_of(f)) for f, _ in sink.queued())
        self._waiting = waiting
        if down:
            return 0  # a target is down or just came back: its messages wait for it, however long
        resubmitted = 0
        for flight in candidates:
            if flight.closed or not 0 < flight.pending < SUPERSEDED or id(flight) in waiting:
                continue  # finished, its outcome decided (a dead letter under way), or waiting
            if id(flight) in previously:  # it left a queue or a retry timer since the last pass
                self.handed_over(flight, now)
                continue
            times, last = watched.get(flight, (0, 0.0))
            age = now - last if last else now - flight.env.received_ns / 1e9
            if age < bound:
                continue
            if times >= MAX_RESUBMITS:
                self._give_up(flight, bound, times)
                continue
            self._resubmit(flight, times + 1, now)
            resubmitted += 1
        if resubmitted:
            log.warning("route.resubmitted", route=self.name, count=resubmitted, stuck_after=bound)
        return resubmitted

    def _resubmit(self, flight: Flight, times: int, now: float) -> None:
        fresh = Flight(self, flight.env, flight.plan, flight.nbytes)
        fresh.attempts = flight.attempts
        flight.pending = SUPERSEDED
        flight.closed = True  # its sinks' late reports change nothing, its requeues are dropped
        self._watched.pop(flight, None)
        self._track(fresh)
        self._watched[fresh] = (times, now)
        self.stats.resubmitted += 1
        nbytes = fresh.nbytes
        for d in fresh.plan.deliveries:
            if d.error is None and nbytes <= d.max_payload:
                d.sink.submit(fresh, d)  # type: ignore[union-attr]  # bound before any dispatch
            else:
                fresh.fail(d, d.error or PayloadTooLarge(nbytes, d.max_payload, f"{d.target.connector} max_payload"))

    def _give_up(self, flight: Flight, bound: float, times: int) -> None:
        self._watched.pop(flight, None)
        error = SinkError(f"no target confirmed the message within {bound:g} s, {times + 1} times", retriable=False)
        flight.error = flight.error or error
        pending, flight.pending = flight.pending, SUPERSEDED  # late reports from its sinks change nothing now
        if pending > 0:
            self.finish(flight)

    def hold_gate(self) -> None:
        """Stop this route's source (once; other routes on the same gate hold it independently)."""
        if not self._holds_gate and self.gate is not None:
            self._holds_gate = True
            self.gate.close()

    def free_gate(self) -> None:
        if self._holds_gate and self.gate is not None and not self._retired:
            self._holds_gate = False
            self.gate.open()

    def retire(self) -> None:
        """A reload removes or replaces this route: its source stops taking messages for it, for good (draining
        below half its budget does not open the gate again, as it would after saturation)."""
        self._retired = True
        self.hold_gate()

    def inherit(self, old: Route, *, adopt: bool = True) -> None:
        """A reload replaced ``old`` (same name) by this route: its counters go on here, and what it still
        holds (handed to a broker, not yet confirmed) finishes here, so that the counters never restart and
        ``received == acked + failed + dropped + filtered + in_flight`` holds across reloads. Call after
        ``old`` was retired and released. ``adopt=False`` (spooled routes: their flights belong to their
        spool) copies the counters without what ``old`` still holds, which it finishes on its own."""
        if adopt:
            self.stats = old.stats  # shared: what the old route still counts (released late arrivals) shows here
        else:
            stats = self.stats
            for key in RouteStats.__slots__:
                setattr(stats, key, getattr(old.stats, key))
            stats.received -= old.in_flight  # the old route's own to finish (or release), outside this view
        self.latency = old.latency
        self.ages = old.ages
        if not adopt:
            return
        watched = old._watched
        for flight in old._flights:
            if not flight.closed:
                flight.route = self
                self.in_flight += 1
                self.in_flight_bytes += flight.nbytes
                self._track(flight)
                if flight in watched:
                    self._watched[flight] = watched[flight]
        old._flights = deque()
        old._track = old._flights.append
        old._watched = {}
        old.in_flight = old.in_flight_bytes = 0

    def rebind(self, sink_of: Callable[[str], Sink | None]) -> None:
        """Point the deliveries of what this route holds at the sinks running now: flights taken over from a
        replaced route (:meth:`inherit`) were planned with the sinks of that time, and a reload may have
        restarted a target's or the dead letter's connector, whose old sink nobody reads any more."""
        for flight in self._flights:
            if flight.closed:
                continue
            plan = flight.plan
            for d in (*plan.deliveries, plan.dead_letter):
                if d is not None:
                    sink = sink_of(d.target.connector)
                    if sink is not None:
                        d.sink = sink

    def stop(self, reason: str) -> None:
        """on_error: stop: the source stops for good (until the gateway restarts or reloads the route)."""
        if self.state is RouteState.STOPPED:
            return
        self.state = RouteState.STOPPED
        self.hold_gate()
        log.error("route.stopped", route=self.name, reason=reason)

    def cancel_timers(self) -> None:
        """Shutdown: retries not yet due are abandoned (their messages stay unacknowledged)."""
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()

    async def drained(self) -> None:
        """Until nothing is in flight (shutdown drains with this)."""
        while self.in_flight:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle

    def room(self) -> int:
        """How many more messages the budget admits before the route saturates."""
        return max(0, self.max_in_flight - self.in_flight)

    def _log(self, event: str, error: BaseException | None) -> None:
        # Failures can come in floods (a poison topic): log the first, then a count every few seconds.
        if n := self._flood.count():
            log.warning(event, route=self.name, error=str(error), error_type=type(error).__name__, count=n)
