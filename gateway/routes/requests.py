"""Request/reply across protocols: a NATS request answered by an MQTT device, an MQTT 5 request answered
by a NATS service.

A :class:`RequestRoute` (a route with ``request:``) forwards every message that expects a reply under a
gateway-made correlation id, and remembers where the requester wants its answer in a bounded table
(:class:`Requests`). The responders answer on the gateway's reply address; a companion
:class:`ReplyRoute`, ``<route>.replies``, reads that address and publishes each answer to its requester.
Whatever happens, the requester hears back: the answer, or at once an error reply when the table is
full (503), the request could not be delivered (502) or no answer came within the timeout (504).

How the id travels to the responder and back, and what an error reply looks like, is each protocol's
own: its plugin declares it (:class:`gateway.config.plugin.Replies`; ``connectors/nats/replies.py``,
``connectors/mqtt/replies.py``). Messages without a reply address pass through as one-way messages.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from typing import Any

import msgspec

from gateway.config.options import RequestLeg
from gateway.config.plugin import ConnectorPlugin, Replies
from gateway.config.registry import plugins
from gateway.core.envelope import Envelope
from gateway.core.flight import Delivery, RoutePlan
from gateway.core.policies import RouteState
from gateway.core.route import Ending, Refusal, Route
from gateway.errors import GatewayError


def _replies(plugin: ConnectorPlugin) -> Replies:
    if plugin.replies is None:
        raise GatewayError(f"connector kind {plugin.kind!r} does not carry request/reply")
    return plugin.replies


class RequestStats:
    """Counters of one request route's table."""

    __slots__ = ("failed", "forwarded", "late", "rejected", "replied", "timed_out")

    def __init__(self) -> None:
        self.forwarded = 0
        """Requests forwarded to a responder under a correlation id."""
        self.replied = 0
        """Answers delivered to their requester's reply address (handed to its sink)."""
        self.timed_out = 0
        """Requests not answered in time: the requester got code 504."""
        self.rejected = 0
        """Requests refused at once (table full, route not running): code 503."""
        self.failed = 0
        """Requests that could not be delivered to a responder: code 502."""
        self.late = 0
        """Answers that matched no waiting request (too late, duplicated, or not ours)."""

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class _Pending:
    __slots__ = ("address", "correlation", "deadline", "forwarded")

    def __init__(self, address: str, correlation: bytes | None, deadline: float) -> None:
        self.address = address
        self.correlation = correlation
        self.deadline = deadline
        self.forwarded: Envelope | None = None
        """The envelope sent to the responder: only its own flight may abort the entry."""


class Requests:
    """The requests of one route that wait for an answer, oldest first, bounded by ``max_pending``.

    Every entry expires after the same timeout, so insertion order is expiry order: one timer, set
    for the oldest entry, expires a run of them at a time (no timer per request).
    """

    def __init__(self, route: str, leg: RequestLeg) -> None:
        self.route = route
        self.stats = RequestStats()
        self.reply_route: ReplyRoute | None = None
        """The companion route that publishes answers and error replies (:meth:`bind`)."""
        self._deferred: list[tuple[_Pending, int, str]] = []
        """Error replies made while no companion route ran (a reload in progress): sent on :meth:`bind`."""
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        self._timer: asyncio.TimerHandle | None = None
        self._boot = os.urandom(6).hex()
        self._next = 0
        self.configure(leg)

    def configure(self, leg: RequestLeg) -> None:
        """Apply a (reloaded) config. Waiting requests keep their deadline, or get the new timeout's if that
        is sooner (deadlines stay in insertion order). Answers to a reply address the reload changed no
        longer arrive: those requests end with the 504 of their timeout."""
        if self._pending and leg.config.timeout < getattr(self, "timeout", leg.config.timeout):
            latest = asyncio.get_running_loop().time() + leg.config.timeout
            for entry in self._pending.values():
                entry.deadline = min(entry.deadline, latest)
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_at(next(iter(self._pending.values())).deadline, self._expire)
        self.leg = leg
        self.timeout = leg.config.timeout
        self.max_pending = leg.config.max_pending
        self.responder = leg.responder
        self.mode = leg.mode
        self.reply_to = leg.reply_to
        kinds = plugins()
        self._answers = _replies(kinds[leg.responder])
        self._errors = _replies(kinds[leg.requester or leg.responder])

    @property
    def pending(self) -> int:
        return len(self._pending)

    def view(self) -> dict[str, Any]:
        """Counters and settings for /routez."""
        return {
            **self.stats.as_dict(),
            "pending": len(self._pending),
            "max_pending": self.max_pending,
            "timeout": self.timeout,
            "reply_to": self.reply_to,
            "correlation": self.mode,
        }

    # -- the forward leg -----------------------------------------------------------------------------
    def open(self, env: Envelope, plan: RoutePlan) -> tuple[Envelope, RoutePlan] | None:
        """Register ``env`` (which has a reply address) and return what to send the responder instead;
        None when the table is full (the requester got an error reply)."""
        if len(self._pending) >= self.max_pending:
            self.refuse(env, 503, f"too many requests waiting for an answer ({self.max_pending})")
            return None
        self._next += 1
        token = f"{self._boot}{self._next:x}"
        key = token.encode()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        entry = self._pending[key] = _Pending(env.reply or "", env.correlation, deadline)
        self.stats.forwarded += 1
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        reply, suffix = self._answers.forward(self.reply_to, self.mode, token)
        forwarded = msgspec.structs.replace(env, reply=reply, correlation=key)
        if suffix is not None:  # the id travels in the request's name
            deliveries = tuple(
                Delivery(d.target, f"{d.address}{suffix}", d.key, d.error) if d.error is None else d
                for d in plan.deliveries
            )
            plan = RoutePlan(plan.route, deliveries, plan.dead_letter, plan.match)
        entry.forwarded = forwarded
        return forwarded, plan

    def abort(self, env: Envelope, code: int, text: str) -> None:
        """The forwarded request ``env`` failed or was given up: its requester gets an error reply now, unless
        its source redelivers it (an at-least-once MQTT request comes back and is forwarded again)."""
        key = env.correlation
        entry = self._pending.get(key) if key is not None else None
        if entry is None or entry.forwarded is not env:
            return  # not a request this table registered (a one-way message, or another's correlation)
        del self._pending[key]  # type: ignore[arg-type]
        if env.receipt is not None and code == 503:
            return  # released, not failed: the source sends it again and the requester hears then
        if code == 503:
            self.stats.rejected += 1
        else:
            self.stats.failed += 1
        self._error(entry, code, text)

    def refuse(self, env: Envelope, code: int, text: str) -> None:
        """Answer a request that was never registered with an error reply."""
        self.stats.rejected += 1
        self._error(_Pending(env.reply or "", env.correlation, 0.0), code, text)

    # -- the answers -----------------------------------------------------------------------------------
    def answer(self, env: Envelope) -> _Pending | None:
        """The waiting request that ``env`` (read by the companion route) answers, removed from the table.
        A NATS status message instead of an answer (503: no service listens on the subject) ends the request
        with an error reply; None then too."""
        key, status = self._answers.answer(env.topic, env.correlation, env.payload, env.headers, self.mode)
        if status is not None:  # the broker's word instead of an answer (no responder)
            entry = self._pending.pop(key, None)
            if entry is not None:
                self.stats.failed += 1
                self._error(entry, *status)
            else:
                self.stats.late += 1
            return None
        entry = self._pending.pop(key, None)
        if entry is None:
            self.stats.late += 1
        else:
            self.stats.replied += 1
        return entry

    def _expire(self) -> None:
        self._timer = None
        pending = self._pending
        loop = asyncio.get_running_loop()
        now = loop.time()
        text = f"no answer within {self.timeout:g} s"
        while pending:
            key = next(iter(pending))
            entry = pending[key]
            if entry.deadline > now:
                self._timer = loop.call_at(entry.deadline, self._expire)
                return
            del pending[key]
            self.stats.timed_out += 1
            self._error(entry, 504, text)

    def bind(self, route: ReplyRoute) -> None:
        """Publish answers through ``route`` (at start, and after a reload rebuilt it)."""
        self.reply_route = route
        deferred, self._deferred = self._deferred, []
        for entry, code, text in deferred:
            self._error(entry, code, text)

    def _error(self, entry: _Pending, code: int, text: str) -> None:
        route = self.reply_route
        if not entry.address:
            return
        if route is None or route.state is not RouteState.RUNNING:
            self._deferred.append((entry, code, text))  # a reload is replacing the companion route
            return
        headers = [*self._errors.error_headers(code, text), ("x-gateway-route", self.route)]
        env = Envelope(
            self.route, b"", headers, None, 0, None, entry.correlation, time.monotonic_ns(), None
        )  # no receipt: nothing to acknowledge
        route.deliver(env, entry)

    def close(self) -> None:
        """The route is gone: stop the timer; what still waits gets an error reply if it still can."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, OrderedDict()
        for entry in pending.values():
            self.stats.rejected += 1
            self._error(entry, 503, "the gateway is stopping, or the route was removed")


class RequestRoute(Route):
    """A route with ``request:``: what expects a reply is forwarded under a correlation id and remembered in
    :attr:`requests`; every way it can end without an answer sends its requester an error reply."""

    always_staged = True
    requests: Requests
    """The route's table of requests waiting for an answer (bound by the gateway; it outlives reloads)."""

    def stage(self, env: Envelope, plan: RoutePlan, nbytes: int) -> tuple[Envelope, RoutePlan] | None:
        staged = Route.stage(self, env, plan, nbytes)
        if staged is None or staged[0].reply is None:  # settled by the content stage, or a one-way message
            return staged
        opened = self.requests.open(*staged)
        if opened is None:  # too many waiting: the requester got an error reply at once
            self.stats.failed += 1
            self._settle(env.receipt, released=False)
        return opened

    def turned_away(self, env: Envelope) -> None:
        if env.reply is not None and env.receipt is None:  # not redelivered: nobody else will answer it
            self.requests.refuse(env, 503, f"route {self.name!r} is {self.state.value}")

    def refused(self, env: Envelope, reason: Refusal, error: BaseException | None) -> None:
        if env.reply is None:
            return
        if reason == "invalid":
            self.requests.refuse(env, 400, f"the request was refused: {error}")
        else:
            self.requests.refuse(env, 404, f"route {self.name!r} does not take this request (where)")

    def given_up(self, env: Envelope, reason: Ending, error: BaseException | None) -> None:
        if reason == "failed":
            self.requests.abort(env, 502, f"the request could not be delivered: {error}")
        elif reason == "full":
            self.requests.abort(env, 503, f"route {self.name!r} is full")
        else:
            self.requests.abort(env, 503, f"route {self.name!r} gave the request up")


class ReplyRoute(Route):
    """``<route>.replies``: reads the answers on the responders' side and publishes each to its requester."""

    always_staged = True
    table: Requests
    """The request route's table (bound by the gateway)."""

    _direct: Envelope | None = None
    """An error reply :meth:`deliver` is admitting: already addressed, no answer to look up."""

    def stage(self, env: Envelope, plan: RoutePlan, nbytes: int) -> tuple[Envelope, RoutePlan] | None:
        if env is self._direct:
            self._direct = None
            return Route.stage(self, env, plan, nbytes)
        entry = self.table.answer(env)
        if entry is None:  # nobody waits for it (any more): acknowledged, counted as filtered
            self.stats.filtered += 1
            self._settle(env.receipt, released=False)
            return None
        return Route.stage(
            self,
            *self._addressed(msgspec.structs.replace(env, reply=None, correlation=entry.correlation), entry),
            nbytes,
        )

    def deliver(self, env: Envelope, entry: _Pending) -> None:
        """Publish the error reply ``env`` to the requester behind ``entry`` (its reply subject or response topic)."""
        self._direct = env
        self.admit(*self._addressed(env, entry))

    def _addressed(self, env: Envelope, entry: _Pending) -> tuple[Envelope, RoutePlan]:
        return env, RoutePlan(self, (Delivery(self.targets[0], entry.address, None, None),), None)
