"""Config of the Kafka connector and of its route endpoints."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from gateway.connector import ConnectorPlugin, PatternError, SourceSpec, TargetSpec
from gateway.patterns import KAFKA, SourcePattern, TopicSyntax, compile_pattern, compile_regex

OffsetReset = Literal["earliest", "latest"]
Millis = Annotated[int, msgspec.Meta(ge=1)]


class KafkaConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag="kafka", tag_field="type"):
    """A Kafka cluster: one idempotent producer for the routes that write to it, one consumer per group."""

    bootstrap_servers: list[str]
    """``host:port`` of one or more brokers."""
    driver: Literal["confluent", "aiokafka"] = "confluent"
    """Producer client: ``confluent`` (librdkafka, the default: ~9x aiokafka's produce rate here) or
    ``aiokafka`` (pure Python, for installs without native wheels). Consumers use aiokafka."""
    client_id: str = ""
    """Default: ``<gateway id>-<connector name>``."""
    session_timeout_ms: Millis = 10_000
    """Consumer-group session timeout; a route may override it."""
    heartbeat_interval_ms: Millis = 1_000
    """Consumer-group heartbeat interval (at most a third of the session timeout)."""
    auto_offset_reset: OffsetReset = "earliest"
    """Where a new consumer group starts; ``earliest`` so that nothing produced before the first start is skipped."""
    idempotent: bool = True
    """Producer: idempotent delivery (``acks=all`` always). Needs a broker that grants producer ids
    (InitProducerId); the Tansu test broker does not, so the tests and the demo turn it off."""
    linger_ms: Annotated[int, msgspec.Meta(ge=0)] = 2
    """Producer: how long to wait to fill a batch (at high rates batches fill before it expires)."""
    max_batch_size: Annotated[int, msgspec.Meta(ge=1024)] = 1_048_576
    """Producer: bytes per partition batch."""
    max_request_size: Annotated[int, msgspec.Meta(ge=1024)] = 1_048_576
    """Producer: the largest record accepted; bigger payloads fail without being sent."""
    request_timeout_ms: Millis = 30_000
    """How long a request to a broker may take before it is retried or fails."""
    fetch_max_records: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 2_000
    """Consumer: records per fetch."""
    fetch_max_wait_ms: Annotated[int, msgspec.Meta(ge=0)] = 10
    """Consumer: how long the broker may hold a fetch that found nothing (latency at low rates)."""
    commit_interval_ms: Millis = 200
    """Consumer: how often acknowledged offsets are committed (also on rebalance and stop)."""

    def __post_init__(self) -> None:
        if not self.bootstrap_servers:
            raise ValueError("bootstrap_servers: at least one host:port is needed")


class KafkaSource(SourceSpec, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``from`` a Kafka connector: exactly one of ``topic``, ``topics`` or ``pattern``."""

    topic: str | None = None
    """One topic, or a name with ``{name}`` captures between dots (``telemetry.{device}``)."""
    topics: list[str] | None = None
    """Several exact topic names."""
    pattern: str | None = None
    """A regular expression over topic names; named groups ``(?P<name>...)`` are captures."""
    group: str | None = None
    """Consumer group. Default: ``gateway.<route name>``.
    Routes of one connector that name the same group share one consumer."""
    session_timeout_ms: Millis | None = None
    """Overrides the connector's ``session_timeout_ms`` for this route's consumer."""
    auto_offset_reset: OffsetReset | None = None
    """Overrides the connector's ``auto_offset_reset`` for this route's consumer."""

    def __post_init__(self) -> None:
        given = [k for k in ("topic", "topics", "pattern") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of topic, topics or pattern (got {', '.join(given) or 'none'})")

    def patterns(self, syntax: TopicSyntax) -> list[SourcePattern]:
        try:
            if self.topic is not None:
                return [compile_pattern(self.topic, syntax)]
            if self.topics is not None:
                if not self.topics:
                    raise PatternError("topics", "the list is empty")
                return [compile_pattern(t, syntax) for t in self.topics]
            assert self.pattern is not None
            return [compile_regex(self.pattern, syntax)]
        except PatternError:
            raise
        except ValueError as exc:
            key = "topic" if self.topic is not None else "topics" if self.topics is not None else "pattern"
            raise PatternError(key, str(exc)) from None

    @property
    def at_least_once(self) -> bool:
        return True


class KafkaTarget(TargetSpec, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``to`` a Kafka connector."""

    topic: str
    """Topic template: ``{name}``, ``{#}`` (levels joined by '.'), ``{topic}``."""
    key: str | None = None
    """Record-key template (``{device}``): records with the same key keep their order. Default: the source's key."""

    def address(self) -> str:
        return self.topic

    def key_template(self) -> str | None:
        return self.key


PLUGIN = ConnectorPlugin(
    kind="kafka",
    config=KafkaConfig,
    source=KafkaSource,
    target=KafkaTarget,
    syntax=KAFKA,
    factory="connectors.kafka.connector:KafkaConnector",
)
