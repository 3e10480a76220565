"""Config of the Kafka connector and of its route endpoints."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec

from gateway.config.plugin import ConnectorPlugin, PatternError, SourceSpec, TargetSpec
from gateway.routing.patterns import KAFKA, SourcePattern, TopicSyntax, compile_pattern, compile_regex
from gateway.util.bounds import IN_MILLIS, Millis, MillisOrZero, PayloadBytes
from gateway.util.redact import register_secret
from gateway.util.tls import TlsConfig, read_secret

OffsetReset = Literal["earliest", "latest"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
Compression = Literal["none", "gzip", "snappy", "lz4", "zstd"]
COMPRESSIONS: tuple[Compression, ...] = ("none", "gzip", "snappy", "lz4", "zstd")


class SaslConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """SASL authentication to Kafka (use it over TLS: ``security_protocol: SASL_SSL``)."""

    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    """SASL mechanism."""
    username: str
    """SASL user name."""
    password: str | None = None
    """Password; use ``password_file``, ``${ENV}`` or ``${file:PATH}`` rather than a literal."""
    password_file: str | None = None
    """File holding the password, read at each connect."""

    def __post_init__(self) -> None:
        if (self.password is None) == (self.password_file is None):
            raise ValueError("set exactly one of password or password_file")
        register_secret(self.password)

    def secret(self) -> str:
        return read_secret(self.password_file) if self.password_file is not None else self.password or ""


class KafkaConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag="kafka", tag_field="type"):
    """A Kafka cluster: one idempotent producer for the routes that write to it, one consumer per group."""

    bootstrap_servers: list[str]
    """``host:port`` of one or more brokers."""
    security_protocol: SecurityProtocol | None = None
    """``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``. Default: from the ``tls`` and ``sasl`` blocks
    (both → ``SASL_SSL``, ``tls`` → ``SSL``, ``sasl`` → ``SASL_PLAINTEXT``, neither → ``PLAINTEXT``)."""
    tls: TlsConfig | None = None
    """TLS settings (CA, client certificate for mTLS). The broker's name is checked against the advertised
    host names, so ``server_name`` is not available here."""
    sasl: SaslConfig | None = None
    """SASL authentication: ``mechanism`` (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), ``username``, ``password_file``."""
    max_payload: PayloadBytes | None = None
    """Largest payload in bytes read from or written to this connector; larger messages fail before they are
    produced (counted, dead-lettered). ``max_request_size`` applies as well."""
    driver: Literal["confluent", "aiokafka"] = "confluent"
    """Kafka client of the producer and the consumers: ``confluent`` (librdkafka, the default: it fetches,
    decompresses and parses batches on its own threads, and produces ~9x faster than aiokafka here) or
    ``aiokafka`` (pure Python, for installs without native wheels). Both keep the same guarantees."""
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
    linger_ms: Annotated[int, msgspec.Meta(ge=0, le=900_000, extra=IN_MILLIS)] = 2
    """Producer: how long to wait to fill a batch (at high rates batches fill before it expires)."""
    max_batch_size: Annotated[int, msgspec.Meta(ge=1024, le=1_000_000_000)] = 1_048_576
    """Producer: bytes per partition batch."""
    max_request_size: Annotated[int, msgspec.Meta(ge=1024, le=1_000_000_000)] = 1_048_576
    """Producer: the largest record accepted; bigger payloads fail without being sent."""
    compression: Compression = "lz4"
    """Producer: codec of the record batches written: ``none``, ``gzip``, ``snappy``, ``lz4`` or ``zstd`` (both
    drivers). ``lz4``, the default, costs librdkafka almost nothing and cuts the bytes on the wire and on the
    brokers' disks 2-4x for JSON, which is what lets a broker keep up with large payloads (MQTT → Kafka at 4 KiB:
    see loadtests/RESULTS.md, `compression: none` beside it); every current Kafka client reads it (aiokafka with
    its ``cramjam`` extra). ``none`` (Kafka's own default) for consumers without lz4; ``zstd`` is the smallest
    and the cheapest with ``driver: aiokafka``; ``gzip`` costs the most CPU.
    Consumers read batches of every codec whatever this says."""
    request_timeout_ms: Millis = 30_000
    """How long a request to a broker may take before it is retried or fails."""
    fetch_max_records: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 2_000
    """Consumer: records per fetch."""
    fetch_max_wait_ms: MillisOrZero = 10
    """Consumer: how long the broker may hold a fetch that found nothing (latency at low rates). Tansu holds
    every such fetch for the whole wait even when records arrive meanwhile: set ``2`` there."""
    commit_interval_ms: Millis = 200
    """Consumer: how often acknowledged offsets are committed (also on rebalance and stop)."""

    def __post_init__(self) -> None:
        if not self.bootstrap_servers:
            raise ValueError("bootstrap_servers: at least one host:port is needed")
        protocol = self.protocol
        if self.tls is not None and "SSL" not in protocol:
            raise ValueError(f"tls is set but security_protocol is {protocol}: use SSL or SASL_SSL")
        if self.sasl is None and protocol.startswith("SASL"):
            raise ValueError(f"security_protocol {protocol} needs a sasl block (mechanism, username, password)")
        if self.sasl is not None and not protocol.startswith("SASL"):
            raise ValueError(f"sasl is set but security_protocol is {protocol}: use SASL_SSL (or SASL_PLAINTEXT)")
        if self.tls is not None and self.tls.server_name is not None:
            raise ValueError(
                "tls.server_name is not supported for Kafka: brokers are checked by their advertised names"
            )

    @property
    def protocol(self) -> SecurityProtocol:
        if self.security_protocol is not None:
            return self.security_protocol
        if self.sasl is not None:
            return "SASL_SSL" if self.tls is not None else "SASL_PLAINTEXT"
        return "SSL" if self.tls is not None else "PLAINTEXT"


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

    split: ClassVar[Literal["partitions", "round_robin", "none"]] = "partitions"

    def broker_split(self, route: str) -> str | None:
        return f"partitions of consumer group {self.group or f'gateway.{route}'}"


class KafkaTarget(TargetSpec, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``to`` a Kafka connector."""

    topic: str
    """Topic template: ``{name}``, ``{#}`` (levels joined by '.'), ``{topic}``."""
    key: str | None = None
    """Record-key template (``{device}``): records with the same key keep their order. Default: the source's key."""
    tombstones: bool = False
    """Produce an empty payload as a null value (a tombstone), so that a compacted topic
    (``cleanup.policy=compact``) forgets the key: a cleared MQTT retained message or a deleted key-value entry
    removes the key's state. Needs a record key (``key``, or the source's). The gateway creates no topics:
    create the compacted topic beforehand."""

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
    identity=("client_id",),
)
