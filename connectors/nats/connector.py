"""The NATS connector: one nats-py connection per session, sources per route, one sink.

nats-py's own reconnect loop is off (``allow_reconnect=False``): the gateway's
session loop reconnects with full-jitter backoff like every other connector,
re-creates the subscriptions, and resends what was not confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoServersError, SlowConsumerError, StaleConnectionError
from nats.protocol.parser import PERMISSIONS_ERR

from connectors.nats import wire
from connectors.nats.client import GatewayClient, TlsOnlyClient, loss_blame, refusal, refusal_words, server_error_text
from connectors.nats.config import NatsConfig, NatsSource
from connectors.nats.sink import NatsSink
from connectors.nats.source import CoreSource, JetStreamSource, durable_name, subscription_of
from gateway.core.contract import Connector, ConnectorContext, Route, Sink, Source
from gateway.errors import ConnectorError
from gateway.util.flood import Flood
from gateway.util.redact import redact_url
from gateway.util.tls import client_context, describe_ssl_error, read_secret


async def _discard(nc: Client) -> None:
    """Close the client of a failed attempt. nats-py leaves its socket open (a timeout waiting for INFO),
    and after a failed TLS handshake its close() never returns: bounded, then the socket is dropped."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await nc.close()
    transport = getattr(nc, "_transport", None)
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.close()


class NatsConnector(Connector):
    config: NatsConfig

    def __init__(self, name: str, config: NatsConfig, context: ConnectorContext) -> None:
        super().__init__(name, config, context)
        self.nc: GatewayClient | None = None
        self.slow_consumer_events = 0
        """Times the client dropped messages because a subscription's pending limits were full."""
        self._acks: list[tuple[str, bytes]] = []
        self._ack_wakeup = asyncio.Event()
        self._last_slow_log = 0.0
        self._live: dict[str, tuple[CoreSource | JetStreamSource, asyncio.Task[None]]] = {}
        """Per source route in the current session: its source and the task running it."""
        self._session_tg: asyncio.TaskGroup | None = None
        self._routes_lock = asyncio.Lock()
        """Held while a session starts its sources and while a reload changes them: a reload never sees a
        session half started (it would miss the new routes), nor a session a reload half applied."""
        self._last_client_error: Exception | None = None
        self._dropped_header_lines = 0
        """Of past sessions' clients: received header lines without a valid name, left out."""
        self.server_closed = 0
        """Times the server closed the connection, or stopped answering PINGs. nats-server cuts a slow
        consumer off this way (``max_pending``, ``write_deadline``) without sending a reason."""
        self.permissions_violations = 0
        """``-ERR 'Permissions Violation ...'``: a publish or a subscription the server did not permit (it
        drops the message, or delivers nothing there, and the connection stays up)."""
        self._violations_said = Flood()

    def endpoint(self) -> str:
        return ", ".join(redact_url(u) for u in self.config.servers)

    def counters(self) -> dict[str, int]:
        nc = self.nc
        sink = self._sink if isinstance(self._sink, NatsSink) else None
        return {
            "server_closed": self.server_closed,
            "permissions_violations": self.permissions_violations,
            "client_slow_consumer_drops": self.slow_consumer_events,
            "header_lines_dropped": self._dropped_header_lines + (nc.dropped_header_lines if nc is not None else 0),
            "probe_resends": sink.probes if sink is not None else 0,
            "closed_on_message": sink.poisoned if sink is not None else 0,
        }

    def make_sink(self) -> Sink:
        return NatsSink(self.config)

    def _ack(self, reply: str, verdict: bytes) -> None:
        self._acks.append((reply, verdict))
        self._ack_wakeup.set()

    async def _on_error(self, exc: Exception) -> None:
        self._last_client_error = exc
        if isinstance(exc, SlowConsumerError):
            self.slow_consumer_events += 1
            now = time.monotonic()
            if now - self._last_slow_log > 10:
                self._last_slow_log = now
                self.log.warning("connector.slow_consumer", subject=exc.subject, total=self.slow_consumer_events)
            return
        if isinstance(exc, StaleConnectionError):
            return  # counted and reported once the session ends (see _lost_reason)
        text = server_error_text(exc)
        if text.lower().startswith(PERMISSIONS_ERR):  # one per refused message: counted, said in a flood line
            self.permissions_violations += 1
            said = refusal_words(text) or text
            if self.channels:
                self.channels[0].last_error = said  # /connz and the status page show it while connected
            if n := self._violations_said.count():
                self.log.warning("connector.permissions_violation", error=said, nats_error=text, count=n)
            return
        if self.connected.is_set():  # while connecting, connect_failed says it once per attempt
            self.log.warning("connector.client_error", error=f"{type(exc).__name__}: {exc}")

    def _auth_options(self) -> dict[str, Any]:
        """Credentials and TLS for ``connect()``; secret files are read now, at each connect."""
        cfg = self.config
        options: dict[str, Any] = {}
        if cfg.user is not None:
            password = read_secret(cfg.password_file) if cfg.password_file is not None else cfg.password
            options.update(user=cfg.user, password=password)
        if cfg.token is not None or cfg.token_file is not None:
            options["token"] = read_secret(cfg.token_file) if cfg.token_file is not None else cfg.token
        if cfg.nkey_seed_file is not None:
            options["nkeys_seed"] = str(Path(cfg.nkey_seed_file).expanduser())
        if cfg.creds_file is not None:
            options["user_credentials"] = str(Path(cfg.creds_file).expanduser())
        if cfg.uses_tls:
            options["tls"] = client_context(cfg.tls, self.log)
            if cfg.tls is not None and cfg.tls.server_name:
                options["tls_hostname"] = cfg.tls.server_name
        return options

    async def session(self) -> None:
        cfg = self.config
        lost = asyncio.Event()

        async def on_lost() -> None:
            lost.set()

        servers = ", ".join(redact_url(u) for u in cfg.servers)
        try:
            options = self._auth_options()
        except (OSError, ValueError) as exc:
            raise ConnectorError(f"cannot connect to {servers}: {describe_ssl_error(exc)}") from exc
        # nats-py annotates these as int but takes seconds as floats.
        options.update(reconnect_time_wait=0.01, connect_timeout=cfg.connect_timeout, ping_interval=cfg.ping_interval)
        self._last_client_error = None
        nc = TlsOnlyClient() if cfg.uses_tls else GatewayClient()
        try:
            await nc.connect(
                servers=cfg.servers,
                name=cfg.name or f"{self.context.gateway_id}-{self.name}",
                allow_reconnect=False,
                # One pass over the servers per attempt; the session loop does the backoff.
                max_reconnect_attempts=1,
                max_outstanding_pings=cfg.max_outstanding_pings,
                error_cb=self._on_error,
                disconnected_cb=on_lost,
                closed_cb=on_lost,
                **options,
            )
        except BaseException as exc:
            await _discard(nc)
            if not isinstance(exc, NatsError | OSError | TimeoutError):
                raise
            if isinstance(exc, NoServersError) and self._last_client_error is not None:
                exc = self._last_client_error  # "no servers available" hides why: the attempt's own error
            if isinstance(self._sink, NatsSink):
                self._sink.forgive()
            refused = refusal(exc, servers)
            if refused is not None:
                self.log.warning("connector.refused", error=str(refused), **refused.fields)
                raise refused from exc
            raise ConnectorError(f"cannot connect to {servers}: {describe_ssl_error(exc)}") from exc
        self.nc = nc
        sink = self._sink if isinstance(self._sink, NatsSink) else None
        ended: BaseException | None = None
        locked = False
        try:
            await self._routes_lock.acquire()  # released once the sources run (below), or on the way out
            locked = True
            if sink is not None:
                await sink.attach(nc)
            self._live = {}
            sources = [await self._start_source(nc, route) for route in self.routes]
            await self.guard(wire.barrier(nc, cfg.connect_timeout), NatsError)  # the subscriptions are live
            self.mark_connected(
                server=redact_url(nc.connected_url.geturl() if nc.connected_url else ""), max_payload=nc.max_payload
            )
            async with asyncio.TaskGroup() as tg:
                self._session_tg = tg
                tg.create_task(self.watch(lost.wait(), lambda _: self._lost_reason(nc)), name=f"{self.name}:watch")
                tg.create_task(self._acker(nc), name=f"{self.name}:acker")
                if sink is not None:
                    tg.create_task(sink.run_writer(), name=f"{self.name}:writer")
                    tg.create_task(sink.run_confirmer(), name=f"{self.name}:confirmer")
                    tg.create_task(self._expire(sink), name=f"{self.name}:expire")
                for source in sources:
                    self._run_source(source, tg)
                locked = False
                self._routes_lock.release()
        except BaseException as exc:
            ended = exc
            raise
        finally:
            if locked:
                self._routes_lock.release()
            self._session_tg = None
            self._live = {}  # this connection's subscriptions ended with it; the next session makes its own
            self.nc = None
            self._dropped_header_lines += nc.dropped_header_lines
            if sink is not None:
                sink.detach(loss_blame(nc, ended))
            if not nc.is_closed:
                with contextlib.suppress(Exception):
                    await nc.close()

    async def _start_source(self, nc: Client, route: Route) -> CoreSource | JetStreamSource:
        """Subscribe (core) or make sure the durable consumer exists (JetStream) for one route."""
        spec: NatsSource = route.spec
        dispatcher = self.dispatcher([route], key=route.name)
        source: CoreSource | JetStreamSource
        if spec.stream_name is not None:
            source = JetStreamSource(nc, route, dispatcher, self._ack, durable_name(route))
        else:
            source = CoreSource(nc, self.config, route, dispatcher, self.intake_stopped)
        await self.guard(source.start(), NatsError)
        return source

    def _run_source(self, source: CoreSource | JetStreamSource, tg: asyncio.TaskGroup) -> None:
        name = source.route.name
        task = tg.create_task(self.guard(source.run(self.intake_stopped), NatsError), name=f"{self.name}:{name}")
        self._live[name] = (source, task)

    def live_sources(self) -> Iterable[Source]:
        return [source for source, _ in self._live.values()]

    def sources_of(self, route: Route) -> Iterable[Source]:
        live = self._live.get(route.name)
        return (live[0],) if live is not None else ()

    changes_routes_live = True

    async def set_routes(self, routes: Sequence[Route]) -> None:
        """Subscriptions and pull consumers are per route: start those added, stop those removed.

        A changed core route that subscribes the same subject (and queue) keeps the subscription, and the
        new route takes it over (:meth:`CoreSource.swap`): nothing published during the reload is missed.
        Other new subscriptions are live before the ones they replace go. Without a connection the routes
        are only recorded: the next session starts from them. A connection failing while they are applied
        ends the session, and the next one starts every route afresh; this never raises for the broker.
        """
        async with self._routes_lock:
            before = {r.name: r for r in self.routes}
            self.routes = tuple(routes)
            after = {r.name: r for r in self.routes}
            gone = [r for n, r in before.items() if after.get(n) is not r]
            nc, tg = self.nc, self._session_tg
            if nc is None or tg is None or not nc.is_connected:
                return  # no session serves routes now: the next one subscribes self.routes
            try:
                await self._apply_routes(nc, tg, gone, after)
            except (NatsError, ConnectorError, OSError, TimeoutError, RuntimeError) as exc:
                self.log.warning("connector.reload_reconnects", error=f"{type(exc).__name__}: {exc}")
                await _discard(nc)  # the session ends; the channel reconnects and starts every route

    async def _apply_routes(
        self, nc: Client, tg: asyncio.TaskGroup, gone: list[Route], after: dict[str, Route]
    ) -> None:
        retired: list[tuple[CoreSource | JetStreamSource, asyncio.Task[None]]] = []
        for route in gone:
            live = self._live.pop(route.name, None)
            if live is None:
                continue
            source = live[0]
            successor = after.get(route.name)
            if (
                isinstance(source, CoreSource)
                and source.sub is not None
                and successor is not None
                and subscription_of(successor) == subscription_of(route)
            ):
                source.swap(successor, self.dispatcher([successor], key=successor.name))
                self._live[successor.name] = live
                continue
            retired.append(live)
        started = [await self._start_source(nc, r) for r in self.routes if r.name not in self._live]
        if started:
            await self.guard(wire.barrier(nc, self.config.connect_timeout), NatsError)  # live before the old go
            if self._session_tg is not tg:
                raise ConnectorError("the session ended while the routes changed")
            for source in started:
                self._run_source(source, tg)
        for source, task in retired:
            if isinstance(source, CoreSource):
                await source.pause()  # what it still buffered counts as dropped, on the route's counters
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _lost_reason(self, nc: Client) -> str:
        """Why the session ends, once the client reported the connection lost."""
        if isinstance(nc.last_error, StaleConnectionError):
            # End of stream, or PINGs unanswered: the server dropped us. nats-server does this to a
            # slow consumer without a word, so say what to look for rather than guess.
            self.server_closed += 1
            return (
                f"the server closed the connection ({type(nc.last_error).__name__}); if it repeats while the "
                "server is up, nats-server may be cutting the gateway off as a slow consumer: look for "
                "'Slow Consumer' in its log"
            )
        return "connection lost"

    async def _expire(self, sink: NatsSink) -> None:
        while True:
            await asyncio.sleep(1.0)
            if n := sink.expire():
                self.log.warning("connector.puback_timeout", resent=n)

    async def _acker(self, nc: Client) -> None:
        while True:
            await self._ack_wakeup.wait()
            self._ack_wakeup.clear()
            await self._send_acks(nc)

    async def _send_acks(self, nc: Client) -> None:
        acks, self._acks = self._acks, []
        for i, (reply, verdict) in enumerate(acks):
            try:
                await nc.publish(reply, verdict)
                wire.unswallow()
            except BaseException:
                self._acks[:0] = acks[i:]  # keep them for the next connection
                raise

    async def release_route(self, route: Route) -> None:
        """Core subscriptions unsubscribe; JetStream messages are NAKed as their flights release."""
        async with self._routes_lock:  # not while a reload or a session start changes the sources
            await super().release_route(route)

    async def resume_route(self, route: Route) -> None:
        async with self._routes_lock:
            try:
                await super().resume_route(route)
            except NatsError as exc:  # the connection is going: the next session subscribes every route
                self.log.warning("connector.resubscribe_failed", route=route.name, error=f"{type(exc).__name__}: {exc}")

    async def finish(self) -> None:
        nc = self.nc
        if nc is None:
            return
        await self._send_acks(nc)
        await wire.barrier(nc, 5)
        await nc.close()
