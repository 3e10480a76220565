"""The Kafka connector: per session, one producer (if a route writes here) and one consumer per group."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any

from connectors.kafka.config import KafkaConfig, KafkaSource, OffsetReset
from connectors.kafka.producer import ProducerSink
from connectors.kafka.security import (
    aiokafka_refusal,
    aiokafka_security,
    bootstrap_refusals,
    librdkafka_security,
    warn_if_exposed,
)
from gateway.core.contract import Connector, ConnectorContext, Route, Sink, Source
from gateway.errors import BrokerRefusal, ConnectorError
from gateway.routing.patterns import KAFKA
from gateway.util.tls import describe_ssl_error

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer

    from connectors.kafka.confluent_source import ConfluentGroupSource
    from connectors.kafka.source import GroupSource


def group_of(route: Route) -> str:
    spec: KafkaSource = route.spec
    return spec.group or f"gateway.{route.name}"


class KafkaConnector(Connector):
    config: KafkaConfig

    def __init__(self, name: str, config: KafkaConfig, context: ConnectorContext) -> None:
        super().__init__(name, config, context)
        self._sources: list[GroupSource | ConfluentGroupSource] = []
        self._unreadable = 0
        """Records of ended sessions that could not be decoded (see ``counters``)."""
        self._down: dict[str, str] = {}
        """Roles (producer, consumer groups) that lost every broker, with why: the session is unreachable."""

    @property
    def client_id(self) -> str:
        return self.config.client_id or f"{self.context.gateway_id}-{self.name}"

    def endpoint(self) -> str:
        return ",".join(self.config.bootstrap_servers)

    def counters(self) -> dict[str, int]:
        """``unreadable_records``: records aiokafka could not decode, failed through their routes' policy."""
        return {"unreadable_records": self._unreadable + sum(s.unreadable for s in self._sources)}

    def live_sources(self) -> Iterable[Source]:
        return self._sources

    def make_sink(self) -> Sink:
        if self.config.driver == "confluent":
            from connectors.kafka.confluent_sink import ConfluentSink  # native wheel: only when chosen

            return ConfluentSink(self.config)
        from connectors.kafka.sink import KafkaSink  # aiokafka: only when chosen

        return KafkaSink(self.config)

    def _groups(self) -> dict[str, list[Route]]:
        groups: dict[str, list[Route]] = {}
        for route in self.routes:
            groups.setdefault(group_of(route), []).append(route)
        return groups

    def _consumer(self, group: str, routes: list[Route]) -> AIOKafkaConsumer:
        from aiokafka import AIOKafkaConsumer  # only a gateway that reads from Kafka loads aiokafka

        cfg = self.config
        specs: list[KafkaSource] = [r.spec for r in routes]
        session_timeout = max((s.session_timeout_ms or cfg.session_timeout_ms) for s in specs)
        return AIOKafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers,
            client_id=self.client_id,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset=self._offset_reset(routes),
            session_timeout_ms=session_timeout,
            heartbeat_interval_ms=min(cfg.heartbeat_interval_ms, session_timeout // 3),
            request_timeout_ms=cfg.request_timeout_ms,
            max_poll_records=cfg.fetch_max_records,
            fetch_max_wait_ms=cfg.fetch_max_wait_ms,
            **aiokafka_security(cfg),
        )

    def _source(
        self, group: str, routes: list[Route], topics: list[str] | None, pattern: str | None
    ) -> GroupSource | ConfluentGroupSource:
        """The consumer-group member of ``routes``, on the connector's driver (its client not connected yet)."""
        cfg = self.config
        specs: list[KafkaSource] = [r.spec for r in routes]
        session_timeout = max((s.session_timeout_ms or cfg.session_timeout_ms) for s in specs)
        common: dict[str, Any] = {
            "fetch_max_records": cfg.fetch_max_records,
            "commit_interval": cfg.commit_interval_ms / 1000,
            "offset_reset": self._offset_reset(routes),
            "topics": topics,
            "pattern": pattern,
            "logger": self.log,
        }
        try:
            if cfg.driver == "confluent":
                from connectors.kafka.confluent_source import ConfluentGroupSource, consumer_config

                base = {
                    "bootstrap.servers": ",".join(cfg.bootstrap_servers),
                    "client.id": self.client_id,
                    "heartbeat.interval.ms": min(cfg.heartbeat_interval_ms, session_timeout // 3),
                    "socket.timeout.ms": cfg.request_timeout_ms,
                    "fetch.wait.max.ms": cfg.fetch_max_wait_ms,
                    **librdkafka_security(cfg),  # reads the secret files
                }
                config = consumer_config(
                    base, group, offset_reset=common["offset_reset"], session_timeout_ms=session_timeout
                )
                dispatcher = self.dispatcher(routes, key=group)
                return ConfluentGroupSource(
                    config, group, dispatcher, open_timeout=cfg.request_timeout_ms / 1000, **common
                )
            consumer = self._consumer(group, routes)  # reads the secret files
        except (OSError, ValueError) as exc:
            raise ConnectorError(f"cannot connect to Kafka: {describe_ssl_error(exc)}") from exc
        from connectors.kafka.source import GroupSource  # aiokafka, as in _consumer

        return GroupSource(consumer, group, self.dispatcher(routes, key=group), **common)

    def _offset_reset(self, routes: list[Route]) -> OffsetReset:
        specs: list[KafkaSource] = [r.spec for r in routes]
        return next((s.auto_offset_reset for s in specs if s.auto_offset_reset), self.config.auto_offset_reset)

    @staticmethod
    def _subscription(routes: list[Route]) -> tuple[list[str] | None, str | None]:
        """Exact topic names when every pattern is exact, else one regex covering them all."""
        patterns = [p for r in routes for p in r.patterns]
        if all(p.is_exact for p in patterns):
            return sorted({KAFKA.separator.join(s.value for s in p.segments) for p in patterns}), None
        return None, "|".join(f"(?:{p.native_regex()})" for p in patterns)

    async def session(self) -> None:
        cfg = self.config
        sink = self._sink if isinstance(self._sink, ProducerSink) else None
        self._unreadable += sum(s.unreadable for s in self._sources)  # the last session's, kept monotonic
        self._sources = []
        warn_if_exposed(cfg, self.log)
        unreachable = f"cannot reach Kafka at {', '.join(cfg.bootstrap_servers)}"
        try:
            if sink is not None:
                await self._open(sink.open(self.client_id), (*sink.errors, OSError), unreachable)
            for group, routes in self._groups().items():
                topics, pattern = self._subscription(routes)
                source = self._source(group, routes, topics, pattern)
                try:
                    await self._open(source.start(), (*_consumer_errors(cfg), OSError), unreachable)
                except BaseException:
                    await source.close()  # never ran: nothing to quiesce, only its client to free
                    raise
                self._sources.append(source)
            self._down = {}
            self.mark_connected(bootstrap=",".join(cfg.bootstrap_servers), groups=len(self._sources))
            if sink is not None:
                sink.reachability = self._reachability
            async with asyncio.TaskGroup() as tg:
                if sink is not None:
                    tg.create_task(sink.run_writer(), name=f"{self.name}:writer")
                    tg.create_task(self.watch(sink.broken.wait(), lambda _: _replaced(sink)), name=f"{self.name}:watch")
                    for job in sink.background():
                        tg.create_task(job, name=f"{self.name}:sink")
                errors = _consumer_errors(cfg) if self._sources else ()  # client loaded only with consumers
                for source in self._sources:
                    name = f"{self.name}:{source.group}"
                    tg.create_task(self.guard(source.run(self.intake_stopped), errors), name=name)
                    tg.create_task(self.guard(source.run_committer(), errors), name=f"{name}:commit")
                    report = functools.partial(self._reachability, role=f"group {source.group}")
                    tg.create_task(source.watch_brokers(report), name=f"{name}:probe")
        finally:
            for source in self._sources:
                await source.close()
            if sink is not None:
                await sink.close()

    async def _open(self, aw: Awaitable[None], errors: tuple[type[BaseException], ...], unreachable: str) -> None:
        """``guard`` for the first contact of a producer or a consumer: a broker's refusal (SASL, authorization)
        becomes a :class:`BrokerRefusal` in words, said with the protocol's error name."""
        if self.config.driver == "aiokafka" or self._groups():
            bootstrap_refusals()  # aiokafka logs its bootstrap refusals, and raises "Unable to bootstrap"
        try:
            await self.guard(aw, errors, unreachable)
        except ConnectorError as exc:
            refused = exc if isinstance(exc, BrokerRefusal) else aiokafka_refusal(exc.__cause__, self._servers)
            if refused is None:
                raise
            self.log.warning("connector.refused", error=str(refused), **refused.fields)
            if refused is exc:
                raise
            raise refused from exc

    @property
    def _servers(self) -> list[str]:
        return list(self.config.bootstrap_servers)

    def _reachability(self, up: bool, why: str, role: str = "producer") -> None:
        """The producer (its error_cb) or a consumer group (its metadata probe) lost every broker or got one
        back; the channel is reachable again when every role is."""
        if up:
            self._down.pop(role, None)
        else:
            self._down[role] = why
        channel = self.channels[0]
        if self._down:
            channel.mark_unreachable("; ".join(self._down.values()))
        else:
            channel.mark_reachable(bootstrap=",".join(self.config.bootstrap_servers), recovered=True)

    async def finish(self) -> None:
        for source in self._sources:
            await source.commit()
        sink = self._sink
        if isinstance(sink, ProducerSink):
            await sink.flush()


def _consumer_errors(cfg: KafkaConfig) -> tuple[type[BaseException], ...]:
    if cfg.driver == "confluent":
        from confluent_kafka import KafkaException

        return (KafkaException,)
    from aiokafka.errors import KafkaError  # reached only once consumers exist: aiokafka is loaded

    return (KafkaError,)


def _replaced(sink: ProducerSink) -> str:
    """Why the session ends when the producer was found broken (it is replaced by the next session's)."""
    why = sink.replaced_because or "deliveries failing"
    sink.replaced_because = None
    return f"Kafka producer replaced ({why}); its records are sent again by a new one"
