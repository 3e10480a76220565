"""The MQTT sources: sessions that subscribe, PUBLISH → envelope, and PUBACK/PUBREC in arrival order.

Each source is one session (see :mod:`connectors.mqtt.connector` for which routes get their own and which
share one): a :class:`RouteSource` for a route with a persistent session of its own, the
:class:`SharedSource` for the QoS 0 routes that share a clean session. A source outlives its connections:
every new connection gets a fresh :class:`Subscriber` (before its CONNECT goes out: a resumed session's
backlog can arrive with the CONNACK), the source subscribes, and once intake stops it takes nothing more.

MQTT requires acknowledgements in the order the PUBLISHes arrived. Targets
confirm out of order (fan-out, several sinks), so each connection keeps its
unacknowledged QoS 1/2 receipts in a deque and releases the settled prefix.
A receipt of a connection that is gone is never acknowledged: the broker
redelivers its message on the next connection (persistent session).

MQTT 5 properties that have a meaning beyond MQTT travel as headers, after
the user properties: ``content-type`` (the Content Type property) and
``message-expiry-interval`` (seconds left when the gateway received it). A
PUBLISH the gateway cannot represent (a topic or property that is not UTF-8)
fails alone through its route's policy (dead letter or ``on_error``, with
``Dispatcher.fail``), is acknowledged in arrival order like any other and
counted as ``unreadable_publishes`` on the connector: never a reason to drop
the session (the broker would only send it again).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog
from mqtt5 import PublishPacket, SubAckPacket, UnsubAckPacket

from connectors.mqtt.client import MqttConnection
from connectors.mqtt.codec import CONTENT_TYPE, MESSAGE_EXPIRY, PUBACK, PUBREC, Codec5, ack
from connectors.mqtt.config import MqttSource
from connectors.mqtt.sink import PacketIds
from gateway.core.contract import (
    Backlog,
    Channel,
    Dispatcher,
    Envelope,
    Headers,
    Receipt,
    Route,
    Source,
    measure_until,
)
from gateway.errors import ConnectorError, SinkError
from gateway.util.flood import Flood

log = structlog.get_logger("gateway.connector")


class SourceCounters:
    """Per connector, across sessions: what its sources could not hand to a route (``/connz``, ``/metrics``)."""

    __slots__ = ("dispatch_errors", "flood", "unreadable_publishes")

    def __init__(self) -> None:
        self.unreadable_publishes = 0
        """PUBLISH packets whose content could not be decoded (failed through the route's policy, acknowledged)."""
        self.dispatch_errors = 0
        """Messages whose dispatch raised (a bug): acknowledged, never allowed to end the session."""
        self.flood = Flood()

    def note(self, event: str, **fields: object) -> None:
        """Log the first of a flood, then a count every few seconds."""
        if n := self.flood.count():
            log.warning(event, count=n, **fields)


class InboundAcks:
    """The unacknowledged QoS 1/2 messages of one connection, in arrival order."""

    __slots__ = ("conn", "pending")

    def __init__(self, conn: MqttConnection) -> None:
        self.conn = conn
        self.pending: deque[MqttReceipt] = deque()

    def release(self) -> None:
        pending = self.pending
        conn = self.conn
        if not conn.is_open:
            return
        out = bytearray()
        while pending and pending[0].settled:
            r = pending.popleft()
            out += ack(PUBACK if r.qos == 1 else PUBREC, r.packet_id)
        conn.queue(out)


class MqttReceipt(Receipt):
    __slots__ = ("acks", "packet_id", "qos", "settled")

    def __init__(self, acks: InboundAcks, packet_id: int, qos: int) -> None:
        self.pending = 0  # Receipt.__init__, inlined: one receipt per message
        self.released = False
        self.acks = acks
        self.packet_id = packet_id
        self.qos = qos
        self.settled = False

    def settle(self) -> None:
        self.settled = True
        acks = self.acks
        if acks.pending[0] is self:  # not settled before, so still in the deque
            acks.release()


class Subscriber:
    """Turns one connection's PUBLISH packets into dispatched envelopes."""

    __slots__ = ("acks", "counters", "dispatch", "dispatch_mixed", "dispatcher", "fail", "stopped")

    def __init__(self, conn: MqttConnection, dispatcher: Dispatcher, counters: SourceCounters | None = None) -> None:
        self.acks = InboundAcks(conn)
        self.use(dispatcher)
        self.counters = counters if counters is not None else SourceCounters()
        self.stopped = False
        """Shutting down: take nothing more (unacknowledged QoS 1/2 messages come back next session)."""

    def use(self, dispatcher: Dispatcher) -> None:
        """Hand what arrives from now on to ``dispatcher`` (a reload changed the shared session's routes)."""
        self.dispatcher = dispatcher
        self.dispatch = dispatcher.dispatch
        self.dispatch_mixed = dispatcher.dispatch_mixed
        self.fail = dispatcher.fail

    def on_publish(self, p: PublishPacket) -> None:
        if self.stopped:
            return
        qos = p.qos.value  # 25 ns less than int(p.qos): the enum is a pyo3 class
        receipt = None
        if qos:
            receipt = MqttReceipt(self.acks, p.packet_id or 0, qos)
            self.acks.pending.append(receipt)
        headers: Headers | None = p.user_properties or None
        content_type = p.content_type
        expiry = p.message_expiry_interval
        if content_type is not None or expiry is not None:
            headers = with_properties(headers, content_type, expiry)
        env = Envelope(
            p.topic,
            p.payload,
            headers,
            None,
            qos,
            p.response_topic,
            p.correlation_data,
            time.monotonic_ns(),
            receipt,
        )
        try:
            self.dispatch(env)
        except Exception as exc:  # a bug below; it must not end the session (the broker would resend it)
            self._dispatch_failed(env, exc)

    def on_publishes(self, packets: list[PublishPacket]) -> None:
        """The packets of one read: :meth:`on_publish` for each, one clock read for all, dispatched together
        (:meth:`Dispatcher.dispatch_mixed`: a run per plan, so one device topic after another is one run)."""
        if self.stopped:
            return
        acks = self.acks
        pending = acks.pending.append
        now = time.monotonic_ns()
        envs: list[Envelope] = []
        add = envs.append
        for p in packets:
            qos = p.qos.value
            receipt = None
            if qos:
                receipt = MqttReceipt(acks, p.packet_id or 0, qos)
                pending(receipt)
            headers: Headers | None = p.user_properties or None
            content_type = p.content_type
            expiry = p.message_expiry_interval
            if content_type is not None or expiry is not None:
                headers = with_properties(headers, content_type, expiry)
            add(Envelope(p.topic, p.payload, headers, None, qos, p.response_topic, p.correlation_data, now, receipt))
        self.dispatch_mixed(envs, self._run_failed)

    def _run_failed(self, run: list[Envelope], exc: Exception) -> None:
        for env in run:
            self._dispatch_failed(env, exc)

    def _dispatch_failed(self, env: Envelope, exc: Exception) -> None:
        """Dispatching raised (a bug below): counted on the connector (``dispatch_errors``) and acknowledged in
        arrival order, never a reason to end the session. The routes count what they took of it."""
        counters = self.counters
        counters.dispatch_errors += 1
        counters.note("mqtt.dispatch_failed", topic=env.topic, error=f"{type(exc).__name__}: {exc}")
        receipt = env.receipt
        if isinstance(receipt, MqttReceipt) and not receipt.settled:
            receipt.pending = -1  # a route that still finishes it will not settle it a second time
            receipt.settle()

    def on_unreadable(self, qos: int, packet_id: int, topic: bytes, payload: bytes, error: str) -> None:
        """A PUBLISH the codec could not decode fails alone through its route's policy (dead letter or
        ``on_error``), acknowledged in arrival order like any other; its topic is read with U+FFFD for the
        bytes that are not UTF-8, its properties are lost."""
        if self.stopped:
            return
        counters = self.counters
        counters.unreadable_publishes += 1
        counters.note("mqtt.publish_unreadable", error=error, packet_id=packet_id, qos=qos)
        receipt = None
        if qos:
            receipt = MqttReceipt(self.acks, packet_id, qos)
            self.acks.pending.append(receipt)
        env = Envelope(
            topic.decode("utf-8", "replace"), payload, None, None, qos, None, None, time.monotonic_ns(), receipt
        )
        try:
            self.fail(env, SinkError(f"the MQTT PUBLISH cannot be read: {error}", retriable=False))
        except Exception as exc:  # a bug below; it must not end the session
            self._dispatch_failed(env, exc)


def with_properties(headers: Headers | None, content_type: str | None, expiry: int | None) -> Headers:
    """The user properties followed by the Content Type and Message Expiry Interval as headers."""
    out = list(headers) if headers else []
    if content_type is not None:
        out.append((CONTENT_TYPE, content_type))
    if expiry is not None:
        out.append((MESSAGE_EXPIRY, str(expiry)))
    return out


class RetainedSubscriber(Subscriber):
    """A ``retained_only`` route's subscriber: messages without the retain flag are acknowledged, not routed.

    A separate class, chosen when the session starts, so that other routes test nothing more per message.
    """

    __slots__ = ("leave_out",)

    def use(self, dispatcher: Dispatcher) -> None:
        super().use(dispatcher)
        self.leave_out = dispatcher.leave_out

    def on_publishes(self, packets: list[PublishPacket]) -> None:
        for p in packets:
            self.on_publish(p)

    def on_publish(self, p: PublishPacket) -> None:
        if p.retain or self.stopped:
            super().on_publish(p)
            return
        qos = p.qos.value  # 25 ns less than int(p.qos): the enum is a pyo3 class
        receipt = None
        if qos:  # acknowledged in arrival order, like every other message of the session
            receipt = MqttReceipt(self.acks, p.packet_id or 0, qos)
            self.acks.pending.append(receipt)
        self.leave_out(p.topic, receipt)  # its routes count it as filtered


# -- the sources: one per session ----------------------------------------------------------------------

FILTERS_PER_PACKET = 256
"""Topic filters per SUBSCRIBE / UNSUBSCRIBE (the shared session's may be thousands)."""


class Requests:
    """SUBSCRIBE and UNSUBSCRIBE and their acknowledgements, on any of a connector's connections (their packet
    ids come from the connector's one space, which the sink's publishes share)."""

    def __init__(self, codec: Codec5, ids: PacketIds, timeout: float, address: str, log: Any) -> None:
        self.codec = codec
        self.ids = ids
        self.timeout = timeout
        self.address = address
        self.log = log

    async def change(self, conn: MqttConnection, add: dict[str, int], drop: list[str]) -> None:
        """Subscribe ``add`` (filter → QoS), then unsubscribe ``drop``, a packet per 256 filters."""
        items = list(add.items())
        for i in range(0, len(items), FILTERS_PER_PACKET):
            await self._request(conn, self.codec.subscribe, items[i : i + FILTERS_PER_PACKET], "SUBACK")
        for i in range(0, len(drop), FILTERS_PER_PACKET):
            await self._request(conn, self.codec.unsubscribe, drop[i : i + FILTERS_PER_PACKET], "UNSUBACK")

    async def _request(
        self, conn: MqttConnection, encode: Callable[[int, Any], bytes], items: list[Any], ack: str
    ) -> None:
        """One SUBSCRIBE or UNSUBSCRIBE of ``items`` and its acknowledgement."""
        pid = self.ids.take()
        fut: asyncio.Future[SubAckPacket | UnsubAckPacket] = asyncio.get_running_loop().create_future()
        conn.subacks[pid] = fut
        conn.write(encode(pid, items))
        try:
            async with asyncio.timeout(self.timeout):
                reply = await fut
        except (ConnectionError, TimeoutError) as exc:
            raise ConnectorError(f"no {ack} from {self.address}: {str(exc) or 'timed out'}") from exc
        finally:
            conn.subacks.pop(pid, None)
            self.ids.free(pid)
        for item, code in zip(items, reply.reason_codes, strict=False):
            if int(code) >= 0x80 and ack == "SUBACK":
                # A refused subscription (ACL) is a configuration problem, not a connection one.
                self.log.error("connector.subscribe_refused", filter=item[0], reason=code.name)


class SessionSource:
    """What both kinds of MQTT source share: the packet handler of the session's connections, a fresh
    :class:`Subscriber` per connection, and the stop at shutdown. Its connector runs the session."""

    subscriber_class: type[Subscriber] = Subscriber

    def __init__(
        self, dispatcher: Dispatcher, counters: SourceCounters, requests: Requests, intake_stopped: asyncio.Event
    ) -> None:
        self.dispatcher = dispatcher
        self.counters = counters
        self.requests = requests
        self.intake_stopped = intake_stopped
        self.channel: Channel | None = None
        """The channel that runs this session (set by the connector): what a cut closes."""
        self.conn: MqttConnection | None = None
        self.subscriber: Subscriber | None = None
        """The current connection's."""

    # -- PacketHandler of the session's connections
    def on_publish(self, packet: PublishPacket) -> None:
        if self.subscriber is not None:
            self.subscriber.on_publish(packet)

    def on_publishes(self, packets: list[PublishPacket]) -> None:
        if self.subscriber is not None:
            self.subscriber.on_publishes(packets)

    def on_ack(self, kind: int, packet_id: int, reason: int) -> None:
        pass  # a source session publishes nothing

    def on_unreadable(self, qos: int, packet_id: int, topic: bytes, payload: bytes, error: str) -> None:
        if self.subscriber is not None:
            self.subscriber.on_unreadable(qos, packet_id, topic, payload, error)

    # -- the session's connections
    def attach(self, conn: MqttConnection) -> None:
        """A new connection, before its CONNECT goes out: what it delivers from now on is this source's."""
        self.conn = conn
        self.subscriber = self.subscriber_class(conn, self.dispatcher, self.counters)

    def detach(self) -> None:
        """The session ended: its connection is dropped; what it did not acknowledge comes back next time."""
        conn, self.conn, self.subscriber = self.conn, None, None
        if conn is not None:
            conn.abort("session ended")

    async def run(self, intake_stopped: asyncio.Event) -> None:
        """Until intake stops; then take nothing more (what is unacknowledged comes back next session)."""
        await measure_until(intake_stopped, self.measure_lag)
        if self.subscriber is not None:
            self.subscriber.stopped = True
        if self.conn is not None:
            self.conn.pause_reading()

    async def quiesce(self) -> None:
        """A push source: it takes nothing once intake stopped."""

    def measure_lag(self) -> None:
        """Every few seconds: the route's backlog, as far as MQTT shows one (see :class:`RouteSource`)."""


class RouteSource(SessionSource):
    """The persistent session of one route (client id ``<client_id>-<route>``): its own receive window, flow
    control and backlog at the broker. While the route's gate is closed the socket is not read."""

    def __init__(
        self,
        route: Route,
        dispatcher: Dispatcher,
        counters: SourceCounters,
        requests: Requests,
        intake_stopped: asyncio.Event,
    ) -> None:
        super().__init__(dispatcher, counters, requests, intake_stopped)
        self.route = route
        spec: MqttSource = route.spec
        topic = route.patterns[0].native_filter()
        self.filter = f"$share/{spec.share_group}/{topic}" if spec.share_group else topic
        self.qos = spec.qos
        if spec.retained_only:  # a class of its own: other routes test nothing more per message
            self.subscriber_class = RetainedSubscriber
        self._subscribed = False

    def _on_gate(self, is_open: bool) -> None:
        conn = self.conn
        if conn is None or not self._subscribed:
            return  # the SUBACK must be read first (see start)
        if is_open and not self.intake_stopped.is_set():
            conn.resume_reading()
        elif not is_open:
            conn.pause_reading()

    async def start(self) -> None:
        """Subscribe. Reads until the SUBACK came, even while the route is full: paused, the SUBACK (and the
        backlog a persistent session sends before it) would never be read, and the session would time out and
        start over and over. What arrives meanwhile is bounded by the session's receive window."""
        conn = self.conn
        assert conn is not None, "start() after attach()"
        self._subscribed = False
        gate = self.dispatcher.gate
        gate.add_listener(self._on_gate)
        await self.requests.change(conn, {self.filter: self.qos}, [])
        self._subscribed = True
        if not gate.is_open:
            conn.pause_reading()

    def detach(self) -> None:
        self.dispatcher.gate.remove_listener(self._on_gate)
        super().detach()

    def measure_lag(self) -> None:
        """MQTT does not tell what the broker still queues for a session: the backlog shown is the receive
        window in use, the QoS 1/2 publishes the broker sent this session that are not acknowledged yet."""
        subscriber = self.subscriber
        if subscriber is not None:
            in_use = len(subscriber.acks.pending)
            self.route.backlog = Backlog(in_use, {"receive_window_in_use": in_use}, time.monotonic())

    async def release(self, route: Route) -> None:
        """Close the session: the broker keeps what it did not acknowledge, and resends it on resume."""
        if self.channel is not None:
            self.channel.cut()

    async def resume(self, route: Route) -> None:
        if self.channel is not None:
            self.channel.resume()


class SharedSource(SessionSource):
    """The clean session that the QoS 0 routes which never pause share (``<client_id>-shared``). Its
    subscriptions change on the live connection (a reload, a cut); a route cut off is unsubscribed, and
    subscribed again when it resumes."""

    def __init__(
        self,
        routes: tuple[Route, ...],
        dispatcher: Dispatcher,
        counters: SourceCounters,
        requests: Requests,
        intake_stopped: asyncio.Event,
    ) -> None:
        super().__init__(dispatcher, counters, requests, intake_stopped)
        self.routes = routes
        self.cut: set[str] = set()
        """Routes cut off as slow consumers: unsubscribed until they resume."""
        self.filters: dict[str, int] = {}
        """Filters subscribed on the connection now, with their QoS."""
        self._lock = asyncio.Lock()
        """One change of the subscriptions at a time (connect, reload, cut, resume)."""

    def wanted(self) -> dict[str, int]:
        return {r.patterns[0].native_filter(): 0 for r in self.routes if r.name not in self.cut}

    def use(self, routes: tuple[Route, ...], dispatcher: Dispatcher) -> None:
        """Serve ``routes`` from now on (a reload; then :meth:`resubscribe`). A route cut before stays cut
        only as the same object: a changed one is a new, running route."""
        self.cut &= {r.name for r in routes if any(r is s for s in self.routes)}
        self.routes = routes
        self.dispatcher = dispatcher
        if self.subscriber is not None:
            self.subscriber.use(dispatcher)  # a changed route takes its messages from now on

    async def start(self) -> None:
        conn = self.conn
        assert conn is not None, "start() after attach()"
        async with self._lock:
            self.filters = wanted = self.wanted()
            await self.requests.change(conn, wanted, [])

    def detach(self) -> None:
        super().detach()
        self.filters = {}

    async def resubscribe(self) -> None:
        """Bring the live connection's subscriptions to the current routes: the new ones are taken before the
        old ones are dropped. Without a connection, the next one subscribes what is wanted then."""
        conn = self.conn
        async with self._lock:
            if conn is None or not conn.is_open or self.conn is not conn:
                return
            wanted = self.wanted()
            add = {f: q for f, q in wanted.items() if f not in self.filters}
            drop = [f for f in self.filters if f not in wanted]
            self.filters = wanted
            try:
                await self.requests.change(conn, add, drop)
            except ConnectorError as exc:
                conn.abort(str(exc))  # the reconnect subscribes afresh

    async def release(self, route: Route) -> None:
        """Unsubscribe the route (QoS 0: nothing is kept for it)."""
        self.cut.add(route.name)
        await self.resubscribe()

    async def resume(self, route: Route) -> None:
        if route.name in self.cut:
            self.cut.discard(route.name)
            await self.resubscribe()


_own: type[Source] = RouteSource
_shared: type[Source] = SharedSource
"""mypy checks here that both keep the :class:`Source` contract."""
