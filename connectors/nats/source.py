"""NATS sources: core subscriptions (at-most-once) and JetStream pull consumers (at-least-once).

The JetStream consumer is driven here rather than through nats-py's
``fetch()``, whose per-message ``wait_for`` costs a task per message: the
gateway subscribes once to a private inbox, asks the durable consumer for
``min(batch, room in the route)`` messages at a time (so the route budget is
the pull credit: a full route simply stops asking), and acknowledges each
message once its targets confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import msgspec
import nats.errors
import nats.js.api
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from connectors.nats import wire
from connectors.nats.config import NatsConfig, NatsSource
from gateway.core.contract import LAG_EVERY, Backlog, Dispatcher, Envelope, Receipt, Route, Source, first, measure_until
from gateway.errors import ConnectorError

_ACK = b"+ACK"
_NAK = b"-NAK"
_STREAM_NOT_FOUND = 10059
_LAG_TIMEOUT = 3.0
"""Seconds a consumer-info request may take before this measurement is skipped."""
"""JetStream API error code: the stream does not exist."""


def headers_of(msg: Msg) -> list[tuple[str, str]] | None:
    """The message's headers as the envelope carries them (parsed by ``wire.parse_headers``: every name is
    a valid token; lines without one were left out and counted)."""
    h = msg.headers
    return list(h.items()) if h else None


def subscription_of(route: Route) -> tuple[str, str] | None:
    """What a core route subscribes (subject filter, queue group); None for a JetStream route."""
    spec: NatsSource = route.spec
    if spec.stream_name is not None:
        return None
    return route.patterns[0].native_filter(), spec.queue or ""


class CoreSource:
    """A core NATS subscription feeding one route. Losses are the protocol's: counted, not hidden."""

    def __init__(
        self, nc: Client, config: NatsConfig, route: Route, dispatcher: Dispatcher, intake_stopped: asyncio.Event
    ) -> None:
        self.nc = nc
        self.config = config
        self.route = route
        self.dispatcher = dispatcher
        self.intake_stopped = intake_stopped
        self.spec: NatsSource = route.spec
        self.sub: Any = None
        self._swapped = asyncio.Event()
        """Set when a reload put another route behind this subscription (:meth:`swap`)."""
        self._rebind: Callable[[], None] = lambda: None

    async def start(self) -> None:
        """Subscribe (before the connector reports itself ready; again when a cut route resumes)."""
        dispatch = self.dispatcher.dispatch
        gate = self.dispatcher.gate
        intake_stopped = self.intake_stopped

        async def on_msg(msg: Msg) -> None:
            if intake_stopped.is_set():
                return  # shutting down: at-most-once, nothing to give back
            env = Envelope(
                msg.subject, msg.data, headers_of(msg), None, 0, msg.reply or None, None, time.monotonic_ns()
            )
            if not gate.is_open:
                # Budget full (or the route being replaced): take nothing more until it opens or a reload puts
                # the successor behind this subscription (then this message goes to it); meanwhile nats-py
                # buffers up to its pending limits, beyond which it drops and reports a slow consumer.
                try:
                    await self._wait_open()
                except asyncio.CancelledError:  # the subscription ends (cut, stop): its route counts the message
                    dispatch(env)
                    raise
            dispatch(env)

        def rebind() -> None:  # a swap: the next message goes to the new route (the per-message path is unchanged)
            nonlocal dispatch, gate
            dispatch = self.dispatcher.dispatch
            gate = self.dispatcher.gate

        self._rebind = rebind
        self.sub = await self.nc.subscribe(
            self.route.patterns[0].native_filter(),
            queue=self.spec.queue or "",
            cb=on_msg,
            pending_msgs_limit=self.config.pending_msgs_limit,
            pending_bytes_limit=self.config.pending_bytes_limit,
        )

    async def _wait_open(self) -> None:
        """Until the gate of the route behind the subscription is open; a swap changes which gate that is."""
        while not self.dispatcher.gate.is_open:
            self._swapped.clear()
            await first(self.dispatcher.gate.wait_open(), self._swapped.wait())

    def swap(self, route: Route, dispatcher: Dispatcher) -> None:
        """A reload replaced the route but not what it subscribes: the new route takes the subscription over.

        Nothing is unsubscribed, so nothing published meanwhile is missed: what the client buffered while the
        old route drained (its gate held) goes to the new one.
        """
        self.route = route
        self.spec = route.spec
        self.dispatcher = dispatcher
        self._rebind()
        self._swapped.set()

    async def pause(self) -> None:
        """Unsubscribe (the route was cut off or removed; at-most-once: what is published meanwhile is not ours)."""
        if self.sub is not None:
            sub, self.sub = self.sub, None
            # Messages nats-py still buffers for the callback die with the subscription: the server
            # handed them over, so they count as received and dropped, never silently lost.
            buffered = sub.pending_msgs
            if buffered:
                stats = self.route.stats
                stats.received += buffered
                stats.dropped_released += buffered
            with contextlib.suppress(nats.errors.Error):  # a closed connection: the subscription ended with it
                await sub.unsubscribe()

    async def run(self, intake_stopped: asyncio.Event) -> None:
        await measure_until(intake_stopped, self.measure_lag)
        await self.pause()

    def measure_lag(self) -> None:
        """The route's backlog: what the client holds for the subscription and has not handed over yet (it
        drops beyond its pending limits and reports a slow consumer, counted on the connector)."""
        sub = self.sub
        if sub is not None:
            detail = {"pending_bytes": sub.pending_bytes, "pending_limit": self.config.pending_msgs_limit}
            self.route.backlog = Backlog(sub.pending_msgs, detail, time.monotonic())

    async def quiesce(self) -> None:
        """A push source: it takes nothing once intake stopped."""

    async def release(self, route: Route) -> None:
        """Unsubscribe: at-most-once, what is published while the route is cut off is not ours."""
        if route is self.route:
            await self.pause()

    async def resume(self, route: Route) -> None:
        """Subscribe again (raises the client's error if the connection is going: the next session
        subscribes every route)."""
        if route is self.route and self.sub is None and not self.intake_stopped.is_set():
            await self.start()


def stamp_of(reply: str) -> int:
    """The publish time (Unix ns) a JetStream message's ack subject carries, or 0:
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>``, or with a domain
    and account hash in front and a random token at the end. Two ``rfind`` and an ``int`` per message:
    no list of tokens."""
    end = reply.rfind(".")
    start = reply.rfind(".", 0, end)
    token = reply[start + 1 : end]
    if len(token) < 16:  # the newer form: <ns>.<pending>.<token>
        end = start
        start = reply.rfind(".", 0, end)
        token = reply[start + 1 : end]
    return int(token) if len(token) >= 16 and token.isascii() and token.isdigit() else 0


class JetStreamReceipt(Receipt):
    __slots__ = ("acks", "reply")

    def __init__(self, reply: str, acks: Callable[[str, bytes], None]) -> None:
        self.pending = 0  # Receipt.__init__, inlined: one receipt per message
        self.released = False
        self.reply = reply
        self.acks = acks

    def settle(self) -> None:
        self.acks(self.reply, _ACK)

    def release(self) -> None:
        self.acks(self.reply, _NAK)  # redeliver now, not after ack_wait

    def position(self) -> str:
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>
        parts = self.reply.split(".")
        return f"{parts[2]}:{parts[5]}" if len(parts) >= 9 else self.reply


PULL_EXPIRES = 1.0
"""Seconds a pull request waits on an idle stream. Short, because at shutdown the gateway waits for the
last pull to end (and takes what it still delivers)."""


class JetStreamSource:
    """A durable pull consumer feeding one route; the route's budget is its pull credit."""

    def __init__(
        self,
        nc: Client,
        route: Route,
        dispatcher: Dispatcher,
        acks: Callable[[str, bytes], None],
        durable: str,
    ) -> None:
        self.nc = nc
        self.route = route
        self.dispatcher = dispatcher
        self.acks = acks
        self.spec: NatsSource = route.spec
        assert self.spec.stream_name is not None
        self.stream = self.spec.stream_name
        self.durable = durable
        self._outstanding = 0
        self._request_done = asyncio.Event()
        self.stopped = asyncio.Event()
        """Set once the last pull ended after intake stopped (shutdown waits for it)."""

    async def ensure_consumer(self) -> None:
        """Create the durable consumer if it does not exist (an existing one is used as configured)."""
        stream = self.stream
        js = self.nc.jetstream()
        try:
            await js.consumer_info(stream, self.durable)
            return
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == _STREAM_NOT_FOUND:
                raise ConnectorError(self._no_stream()) from exc
        except nats.js.errors.Error as exc:
            raise ConnectorError(f"JetStream consumer {stream}/{self.durable}: {exc}") from exc
        config = nats.js.api.ConsumerConfig(
            durable_name=self.durable,
            name=self.durable,
            filter_subject=self.spec.subject_prefix + self.route.patterns[0].native_filter(),
            ack_policy=nats.js.api.AckPolicy.EXPLICIT,
            ack_wait=self.spec.ack_wait,
            max_ack_pending=self.route.max_in_flight,
            deliver_policy=nats.js.api.DeliverPolicy(self.spec.effective_deliver_policy),
        )
        try:
            await js.add_consumer(stream, config=config)
        except nats.js.errors.Error as exc:
            if isinstance(exc, nats.js.errors.APIError) and exc.err_code == _STREAM_NOT_FOUND:
                raise ConnectorError(self._no_stream()) from exc
            raise ConnectorError(f"cannot create JetStream consumer {stream}/{self.durable}: {exc}") from exc

    def _no_stream(self) -> str:
        if self.spec.kv is not None:
            return (
                f"JetStream key-value bucket {self.spec.kv!r} does not exist (no stream {self.stream}); "
                f"the gateway does not create it: `nats kv add {self.spec.kv}`"
            )
        return f"JetStream stream {self.stream!r} does not exist; the gateway does not create it"

    async def start(self) -> None:
        """Make sure the durable consumer exists (before the connector reports itself ready)."""
        await self.ensure_consumer()

    async def quiesce(self) -> None:
        """Until the last pull ended: what it still delivers is dispatched (and acknowledged once done)."""
        await self.stopped.wait()

    async def release(self, route: Route) -> None:
        """Nothing to do: the route's messages are NAKed as its flights release (redelivered at once)."""

    async def resume(self, route: Route) -> None:
        """Nothing to do: the route's open gate lets the pull loop ask again."""

    async def run(self, intake_stopped: asyncio.Event) -> None:
        dispatch = self.dispatcher.dispatch
        acks = self.acks
        done = self._request_done
        clock = time.time_ns() - time.monotonic_ns()

        async def on_msg(msg: Msg) -> None:
            if not msg.reply:
                # A status (404 no messages, 408 request expired, 409 consumer limits): this pull is over.
                # Told by the missing ack subject, not by a `Status` header: a stored message may carry
                # one (and an empty payload) and must be delivered, not taken for the end of the pull.
                self._outstanding = 0
                done.set()
                return
            hdrs = msg.headers
            now = time.monotonic_ns()
            # Even after intake stopped: the pull in flight is finished and its messages delivered,
            # so that a graceful stop leaves nothing delivered-but-unacknowledged on the server.
            dispatch(
                Envelope(
                    msg.subject,
                    msg.data,
                    list(hdrs.items()) if hdrs else None,
                    None,
                    1,
                    None,
                    None,
                    now,
                    JetStreamReceipt(msg.reply, acks),
                    now + clock - stamp if (stamp := stamp_of(msg.reply)) else -1,
                )
            )
            self._outstanding -= 1
            if self._outstanding <= 0:
                done.set()

        callback = on_msg
        if prefix := len(self.spec.subject_prefix):

            async def on_kv_msg(msg: Msg) -> None:
                # The route's pattern (and its captures) is over keys: `$KV.<bucket>.` is not part of the topic.
                msg.subject = msg.subject[prefix:]
                await on_msg(msg)

            callback = on_kv_msg  # only kv routes pay for the key: a plain stream's messages go straight in

        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=callback, pending_msgs_limit=self.spec.batch * 4 + 16)
        request_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}"
        expires = PULL_EXPIRES
        gate = self.dispatcher.gate
        lag = asyncio.create_task(self._watch_lag(), name=f"jetstream:{self.durable}:lag")  # one per session
        try:
            while not intake_stopped.is_set():
                if not gate.is_open:
                    await first(gate.wait_open(), intake_stopped.wait())
                    continue
                # An open gate means the route is below its budget: ask for at most what it can take.
                n = max(1, min(self.spec.batch, self.dispatcher.room()))
                clock = time.time_ns() - time.monotonic_ns()  # wall minus monotonic: message ages, one read a pull
                self._outstanding = n
                done.clear()
                body = msgspec.json.encode({"batch": n, "expires": int(expires * 1e9)})
                await self.nc.publish(request_subject, body, reply=inbox)
                wire.unswallow()
                # Wait for this pull to end even when intake stops meanwhile (see on_msg).
                with contextlib.suppress(TimeoutError):  # no status came back (lost): ask again
                    async with asyncio.timeout(expires + 2.0):
                        await done.wait()
        finally:
            lag.cancel()
            await asyncio.wait([lag])
            self.stopped.set()
            await sub.unsubscribe()

    # -- consumer lag, measured every LAG_EVERY seconds (never per message) ------------------------
    async def _watch_lag(self) -> None:
        while True:
            await asyncio.sleep(LAG_EVERY)
            try:
                async with asyncio.timeout(_LAG_TIMEOUT):
                    await self.measure_lag()
            except (nats.errors.Error, OSError, TimeoutError):
                continue  # the connection's own watch says when the server is gone; the last figures stay

    async def measure_lag(self) -> None:
        """The route's backlog from its durable consumer's info: messages not yet delivered to the gateway
        (``num_pending``), delivered but not acknowledged (``num_ack_pending``), redelivered."""
        info = await self.nc.jetstream().consumer_info(self.stream, self.durable)
        detail = {
            "pending": info.num_pending,
            "ack_pending": info.num_ack_pending,
            "redelivered": info.num_redelivered,
            "stream_sequence": info.delivered.stream_seq if info.delivered is not None else None,
        }
        self.route.backlog = Backlog(info.num_pending, detail, time.monotonic())


def durable_name(route: Route) -> str:
    spec: NatsSource = route.spec
    return spec.durable_name(route.name)


_core: type[Source] = CoreSource
_pull: type[Source] = JetStreamSource
"""mypy checks here that both keep the :class:`Source` contract."""
