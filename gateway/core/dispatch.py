"""The dispatcher: from a received envelope to the routes that take it.

Per message the path is: the source builds an :class:`Envelope` and calls
:meth:`Dispatcher.dispatch`; the dispatcher looks the topic up in its plan
cache (one dict lookup: the trie walk and template rendering happen once per
distinct topic), and each matching :class:`Route` admits the message as one
:class:`Flight` that it submits to every target's sink. Sinks call
:meth:`Flight.done` when the broker confirmed (or :meth:`Flight.fail`); when
every target is done the route finishes the flight, releases its budget, and
when every route is done the source's :class:`Receipt` is settled (PUBACK,
ack, commit) or released (redelivery).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

from gateway.core.envelope import Envelope, Receipt
from gateway.core.flight import Delivery, Flight, RoutePlan, Target
from gateway.core.flow import FlowGate
from gateway.core.policies import RouteState
from gateway.core.route import Route
from gateway.core.stats import RouteStats
from gateway.errors import SinkError
from gateway.routing.patterns import TopicSyntax
from gateway.routing.router import Router
from gateway.routing.templates import Match

__all__ = ["Delivery", "Dispatcher", "Flight", "Plan", "Route", "RoutePlan", "RouteStats", "Target"]

Plan = tuple[RoutePlan, ...]


class Dispatcher:
    """Routes the messages of one source channel (a connection, consumer or subscription)."""

    def __init__(
        self, syntax: TopicSyntax, routes: Sequence[Route], *, cache_size: int = 10_000, shards: bool = True
    ) -> None:
        """``shards``: apply the routes' ``shard_by`` (False for what a route already took: its spool's replay)."""
        self.routes = tuple(routes)
        self.shards = shards
        self.gate = FlowGate()
        self.router: Router[Route] = Router(syntax)
        for route in self.routes:
            route.gate = self.gate
            for pattern in route.patterns:
                self.router.add(pattern, route)
        self.cache_size = cache_size
        self._plans: dict[str, Plan] = {}
        self._shared: dict[Hashable, Plan] = {}
        """Plans that do the same for every topic that has them, one object each (see :meth:`dispatch_mixed`)."""
        self._away: set[int] = set()
        """The shared plans (by id) in which every route is an :class:`Elsewhere`: this worker forwards nothing."""
        self._elsewhere: dict[int, RoutePlan] = {}
        self.unrouted = 0

    def plan(self, topic: str) -> Plan:
        """Which routes take ``topic`` and what each of their targets renders to (cached). Topics whose plans
        do the same (same routes, same rendered targets, nothing read per message from the topic's captures)
        get the one same plan object."""
        plan = self._plans.get(topic)
        if plan is None:
            plan = tuple(self._route_plan(route, match) for route, match in self.router.match(topic))
            key = _sameness(plan)
            if key is not None:
                shared = self._shared.get(key)
                if shared is None:
                    if len(self._shared) >= self.cache_size:
                        self._shared.clear()
                        self._away.clear()
                    shared = self._shared[key] = plan
                    if plan and all(type(rp.route) is Elsewhere for rp in plan):
                        self._away.add(id(plan))
                plan = shared
            if len(self._plans) >= self.cache_size:
                del self._plans[next(iter(self._plans))]
            self._plans[topic] = plan
        return plan

    def _route_plan(self, route: Route, match: Match) -> RoutePlan:
        """What ``route`` does with the topic ``match`` matched: its targets rendered; with ``shard_by``, an
        :class:`Elsewhere` when the topic's key is another worker's, a :class:`ByHeader` when the key is a
        header (decided per message)."""
        own = RoutePlan(
            route,
            tuple(t.render(match) for t in route.targets),
            route.dead_letter.render(match) if route.dead_letter is not None else None,
            match,
        )
        shard = route.shard
        if shard is None or not self.shards:
            return own
        if shard.header is not None:
            return RoutePlan(ByHeader(route, own), (), None, match)
        if shard.takes(match):
            return own
        away = self._elsewhere.get(id(route))
        if away is None:
            away = self._elsewhere[id(route)] = RoutePlan(Elsewhere(route), (), None, None)
        return away

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
        for rp in plan:
            rp.route.admit(env, rp)

    def dispatch_run(self, envs: list[Envelope]) -> None:
        """:meth:`dispatch` for messages of one topic that arrived together (a fetched partition, a socket
        read): the plan looked up once, each route admitting the run at once (:meth:`Route.admit_run`)."""
        if not envs:
            return
        topic = envs[0].topic
        plan = self._plans.get(topic)
        if plan is None:
            plan = self.plan(topic)
        self._admit(envs, plan)

    def dispatch_mixed(self, envs: list[Envelope], failed: Callable[[list[Envelope], Exception], None]) -> None:
        """:meth:`dispatch_run` for the messages of one socket read, whatever their topics, in arrival order.
        Consecutive messages whose topics share a plan (:meth:`plan`: one device topic after another, say) are
        admitted as one run; messages that no route here forwards (the keys of another worker) are set aside
        and acknowledged after the others (per topic, arrival order is kept; acknowledgements go out in
        arrival order whatever the order they are settled in). ``failed(run, exc)``: a run whose dispatch
        raised (a bug below), for the source to settle."""
        plans = self._plans
        away = self._away
        run: list[Envelope] = []
        current: Plan | None = None
        aside: list[tuple[Plan, Envelope]] = []
        for env in envs:
            plan = plans.get(env.topic)
            if plan is None:
                try:
                    plan = self.plan(env.topic)
                except Exception as exc:  # a bug below, for this topic: its message fails alone
                    failed([env], exc)
                    continue
            if plan is current:
                run.append(env)
            elif id(plan) in away:
                aside.append((plan, env))
            else:
                if run:
                    self._admit_guarded(run, current, failed)  # type: ignore[arg-type]  # set with run
                run = [env]
                current = plan
        if run:
            self._admit_guarded(run, current, failed)  # type: ignore[arg-type]
        if aside:
            current = aside[0][0]
            run = []
            for plan, env in aside:
                if plan is not current:
                    self._admit_guarded(run, current, failed)
                    run = []
                    current = plan
                run.append(env)
            self._admit_guarded(run, current, failed)

    def _admit_guarded(
        self, envs: list[Envelope], plan: Plan, failed: Callable[[list[Envelope], Exception], None]
    ) -> None:
        try:
            self._admit(envs, plan)
        except Exception as exc:  # a bug below: the source settles what it can, the rest of the read goes on
            failed(envs, exc)

    def _admit(self, envs: list[Envelope], plan: Plan) -> None:
        """Each route of ``plan`` admits the run ``envs`` (or, without a route, it is settled as unrouted)."""
        if not plan:
            self.unrouted += len(envs)
            for env in envs:
                if env.receipt is not None:
                    env.receipt.settle()
            return
        n = len(plan)
        for env in envs:
            if env.receipt is not None:
                env.receipt.pending = n
        for rp in plan:
            rp.route.admit_run(envs, rp)

    def fail(self, env: Envelope, error: SinkError) -> None:
        """A message the source could not turn into a whole envelope (``env`` holds what it knows: topic,
        receipt): every route that takes its topic fails it alone (:meth:`Route.reject`).

        The same steps as :meth:`dispatch`, which keeps its own inline copy: a shared helper would cost
        every message a call."""
        plan = self.plan(env.topic)
        receipt = env.receipt
        if not plan:
            self.unrouted += 1
            if receipt is not None:
                receipt.settle()
            return
        if receipt is not None:
            receipt.pending = len(plan)
        for rp in plan:
            rp.route.reject(env, rp, error)

    def leave_out(self, topic: str, receipt: Receipt | None) -> None:
        """A message its source leaves out on purpose, before routing (an MQTT ``retained_only`` route's live
        update): every route that takes ``topic`` counts it as received and filtered, and its ``receipt`` is
        settled at once (acknowledged in arrival order like any other); nothing is delivered. Sources count
        nothing on a route themselves: its counters are the core's."""
        plan = self._plans.get(topic)
        if plan is None:
            plan = self.plan(topic)
        if not plan:
            self.unrouted += 1
        for rp in plan:
            stats = rp.route.stats
            stats.received += 1
            stats.filtered += 1
        if receipt is not None:
            receipt.settle()

    def room(self) -> int:
        """Messages every route here can still admit: what a pull source may fetch next."""
        return min((r.room() for r in self.routes), default=0)


def _sameness(plan: Plan) -> Hashable | None:
    """What ``plan`` does, as a key equal for every topic's plan that does the same; None when a route of it
    reads the topic's captures per message (a content stage, templates that read the payload, a route kind of
    its own) or a target cannot take the topic (its error names the topic)."""
    key: list[Hashable] = []
    for rp in plan:
        owner = rp.route
        if type(owner) is Elsewhere:
            key.append(id(owner))
            continue
        if type(owner) is not Route or owner._staged or owner.payload_templates:
            return None
        targets: list[Hashable] = [id(owner)]
        for d in rp.deliveries:
            if d.error is not None or d.match is not None:
                return None
            targets.append((id(d.target), d.address, d.key))
        dl = rp.dead_letter
        if dl is not None:
            if dl.error is not None or dl.match is not None:
                return None
            targets.append((id(dl.target), dl.address, dl.key))
        key.append(tuple(targets))
    return tuple(key)


class Elsewhere:
    """A route in the plan of a topic whose key another worker takes: each message is acknowledged and counted
    as ``sharded``; no flight is made. Stands where the dispatcher would call the route (admit, admit_run,
    reject); the rest of the route's contract is never reached without a flight."""

    __slots__ = ("name", "patterns", "route", "settle", "state", "stats")

    def __init__(self, route: Route) -> None:
        self.route = route
        self.name = route.name
        self.stats: RouteStats = route.stats
        self.patterns = route.patterns
        self.state: RouteState = route.state
        self.settle: Callable[..., None] = route._settle

    def admit(self, env: Envelope, plan: RoutePlan) -> None:
        self.route.stats.sharded += 1
        self.settle(env.receipt, released=False)

    def admit_run(self, envs: list[Envelope], plan: RoutePlan) -> None:
        self.route.stats.sharded += len(envs)
        settle = self.settle
        for env in envs:
            settle(env.receipt, released=False)

    def reject(self, env: Envelope, plan: RoutePlan, error: SinkError) -> None:
        self.admit(env, plan)  # another worker's message: what is wrong with it is that worker's to report

    def _no_flight(self) -> None:
        raise RuntimeError(f"route {self.name!r}: no flight is made for another worker's share")

    def finish(self, flight: Flight) -> None:
        self._no_flight()

    def finish_run(self, flights: list[Flight]) -> None:
        self._no_flight()

    def schedule_retry(self, flight: Flight, delivery: Delivery, error: SinkError, *, forever: bool = False) -> bool:
        self._no_flight()
        return False

    def dead_letter_done(self, flight: Flight, error: BaseException | None) -> None:
        self._no_flight()

    def handed_over(self, flight: Flight, now: float) -> None:
        self._no_flight()


class ByHeader(Elsewhere):
    """A route sharded by a header (``shard_by: header.NAME``): per message, the route admits what this worker
    takes (in order, with its own plan) and the rest is acknowledged and counted as ``sharded``."""

    __slots__ = ("header", "own", "shard")

    def __init__(self, route: Route, own: RoutePlan) -> None:
        super().__init__(route)
        self.own = own
        assert route.shard is not None and route.shard.header is not None
        self.shard = route.shard
        self.header = route.shard.header.lower()

    def _mine(self, env: Envelope) -> bool:
        key = ""
        name = self.header
        for k, v in env.headers or ():
            if k.lower() == name:
                key = v
                break
        return self.shard.takes_key(key)

    def admit(self, env: Envelope, plan: RoutePlan) -> None:
        if self._mine(env):
            self.route.admit(env, self.own)
        else:
            super().admit(env, plan)

    def admit_run(self, envs: list[Envelope], plan: RoutePlan) -> None:
        mine: list[Envelope] = []
        for env in envs:
            if self._mine(env):
                mine.append(env)
            else:
                super().admit(env, plan)
        if mine:
            self.route.admit_run(mine, self.own)

    def reject(self, env: Envelope, plan: RoutePlan, error: SinkError) -> None:
        if self._mine(env):
            self.route.reject(env, self.own, error)
        else:
            super().admit(env, plan)
