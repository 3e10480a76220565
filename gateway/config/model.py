"""The config file's shape: frozen msgspec Structs that reject unknown keys.

Connector entries and route endpoints (``from`` / ``to``) are typed by the
connector packages (see :mod:`gateway.config.registry`); this module holds the parts
that belong to the gateway itself.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec

from gateway.config.options import Codec, RequestConfig, RequestLeg, RetryPolicy, SchemaConfig, SpoolConfig
from gateway.config.plugin import SourceSpec, TargetSpec
from gateway.routing.patterns import SourcePattern
from gateway.routing.templates import Template
from gateway.util.backoff import Backoff
from gateway.util.bounds import IN_SECONDS, Bytes, Count, PayloadBytes, Seconds, SecondsOrZero
from gateway.util.redact import register_secret
from gateway.util.tls import read_secret

Listen = Annotated[str, msgspec.Meta(pattern=r"^$|^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}$")]


class HttpSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The ``gateway.http:`` section: the monitoring endpoint."""

    listen: Listen = "127.0.0.1:8080"
    """``host:port`` of the HTTP endpoint (/healthz, /readyz, /metrics, /varz, /routez, /connz and the status
    page at /); port 0 picks a free one; an empty string disables it. Bind beyond loopback only with a token
    (or behind a firewall): the gateway warns at start otherwise."""
    token: str | None = None
    """Bearer token required on every path but /healthz, /readyz and the page at / (``Authorization: Bearer
    <token>``; the page takes it as ``/#token=...``). Use ``token_file`` or ``${file:PATH}``, not a literal."""
    token_file: str | None = None
    """File holding the bearer token (read at start)."""
    max_connections: Annotated[int, msgspec.Meta(ge=2, le=65_535)] = 128
    """Connections the endpoint keeps open at once; at the cap a new one closes the oldest idle one (503 when
    all are inside a request). Each holds a file descriptor."""
    header_timeout: Annotated[float, msgspec.Meta(ge=0.5, le=3600, extra=IN_SECONDS)] = 10.0
    """Seconds a connection may go without a request in progress: to send a request's head after connecting,
    and after each response (an idle keep-alive connection closes then)."""

    def __post_init__(self) -> None:
        if self.token is not None and self.token_file is not None:
            raise ValueError("set token or token_file, not both")
        if self.token is not None and len(self.token) < 16:
            raise ValueError("token: use at least 16 characters")
        register_secret(self.token)

    def bearer(self) -> str | None:
        """The token (read from ``token_file`` now), or None when the endpoint is open."""
        return read_secret(self.token_file) if self.token_file is not None else self.token


class GatewaySection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The ``gateway:`` section: settings of the process itself."""

    id: str = msgspec.field(default_factory=socket.gethostname)
    """This gateway's name in logs and headers; defaults to the host name."""
    shutdown_timeout: Seconds = 30.0
    """Seconds to drain in-flight messages on SIGTERM before closing anyway."""
    max_cached_topics: Count = 10_000
    """Distinct topics per source whose routing decision is cached (the oldest is evicted): a flood of new
    topic names costs lookups, not memory."""
    max_headers: Annotated[int, msgspec.Meta(ge=1, le=65_535)] = 64
    """Headers (MQTT 5 user properties, NATS or Kafka headers) a message may carry; more fails the message
    (counted, dead-lettered) instead of forwarding a header flood."""
    max_header_bytes: PayloadBytes = 16 * 1024
    """Total bytes of a message's header names and values; more fails the message like ``max_headers``."""
    reconnect: Backoff = Backoff()
    """Backoff between reconnect attempts, for every connector."""
    http: HttpSection = HttpSection()
    """The monitoring endpoint."""
    trace: bool = False
    """Every route gives messages without a W3C ``traceparent`` a new one (a route's own ``trace`` wins).
    Off by default: it costs ~2 µs and a header per message (see loadtests/RESULTS.md)."""
    workers: Annotated[int, msgspec.Meta(ge=1, le=256)] | Literal["auto"] = 1
    """Worker processes on this config under one supervisor (``auto``: one per CPU core the process may use);
    ``gateway run --workers`` overrides it. Each route is split across them as ``gateway validate`` shows:
    see docs/scaling.md. Changing it takes a restart."""


class RouteSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, rename={"from_": "from"}):
    """One entry of ``routes:``. ``from`` and ``to`` are typed by their connector's kind."""

    name: str
    """Unique route name, used in logs and metrics."""
    from_: dict[str, Any]
    """Where messages come from: ``{connector: NAME, ...}`` plus that connector kind's keys."""
    to: dict[str, Any] | list[dict[str, Any]]
    """One target or a list of targets (fan-out): ``{connector: NAME, ...}``."""
    max_in_flight: Count = 10_000
    """Messages inside the route (received, not yet confirmed by every target) before the source is paused."""
    max_in_flight_bytes: Bytes = 16 * 1024 * 1024
    """Payload bytes inside the route before the source is paused."""
    overflow: Literal["block", "drop_newest", "drop_oldest", "disconnect"] | None = None
    """What a full route does: `block` (stop reading the source), `drop_newest` / `drop_oldest` (drop and
    count; acknowledged), `disconnect` (cut the route off at once, like a slow consumer). Default: `block` for
    at-least-once sources (MQTT QoS 1/2, JetStream, Kafka), `drop_newest` for at-most-once ones."""
    slow_consumer_deadline: SecondsOrZero = 30.0
    """Seconds a route may stay full before it is disconnected as a slow consumer: what it holds is released
    (redelivered by durable sources, counted as dropped otherwise) and it reconnects after a backoff. 0 disables."""
    retry: RetryPolicy = msgspec.field(default_factory=RetryPolicy)
    """How a target that failed with a retriable error is tried again."""
    stuck_after: Seconds | None = None
    """Seconds a message may stay in flight while its targets are connected before the watchdog submits it
    again (at-least-once; after 3 times it fails: dead letter / ``on_error``). Default: 3 times the slowest
    target's own timeout (Kafka: the delivery timeout, NATS: the publish/flush timeout, MQTT: 30 s). Messages
    waiting for a target that is down are never resubmitted nor failed: an outage is waited out."""
    dead_letter: dict[str, Any] | None = None
    """A target (`{connector: NAME, ...}`) for messages that failed for good, with headers naming the route, the
    error and the source position; the source is acknowledged only after that write."""
    on_error: Literal["drop", "stop"] = "drop"
    """Without a dead letter: `drop` acknowledges a message that failed for good (counted as failed); `stop`
    stops the route and leaves it unacknowledged (redelivered once the route runs again)."""
    max_payload: PayloadBytes | None = None
    """Largest payload in bytes this route carries; a larger message fails before it is published (counted as
    failed, dead-lettered when a dead letter is set). The connectors' own ``max_payload`` apply as well."""
    spool: SpoolConfig | None = None
    """Store and forward: ``{path, max_bytes, fsync}``. The source is acknowledged once a message is on
    local disk; it is delivered from there in order, also after a restart (see README, Deploying)."""
    where: dict[str, Any] | None = None
    """Deliver only messages that meet this condition on ``topic``, ``header.NAME`` or ``payload.FIELD``:
    ``{payload.temp: {gt: 80}}``, combined with ``all`` / ``any`` / ``not``; operators ``eq ne gt ge lt le in
    exists``. The others are acknowledged and counted as ``filtered``. A payload that is not JSON fails
    (``on_error``, dead letter)."""
    schema: SchemaConfig | None = None
    """Validate the payload (a JSON object, or msgpack with ``codec: msgpack_to_json``) against declared
    fields; invalid messages fail with the validation error (dead letter), valid ones pass untouched."""
    codec: Codec = "passthrough"
    """``passthrough`` (the payload is never decoded), ``json_to_msgpack`` or ``msgpack_to_json``."""
    headers: dict[str, str] | None = None
    """Headers added to every message of the route (name → value; ``{topic}`` is the source topic)."""
    request: RequestConfig | None = None
    """Request/reply between NATS and MQTT: messages that expect a reply (NATS requests, MQTT 5 publishes with
    a response topic) get the responder's answer through the gateway, or an error reply (timeout, table
    full, undeliverable). ``{timeout, max_pending, reply_to, correlation, reply_qos}``; see README."""
    trace: bool | None = None
    """Give every message without a W3C ``traceparent`` header a new one, so that it can be followed MQTT →
    Kafka → NATS (a message that has one keeps it: headers always travel). Default: ``gateway.trace``."""
    order: Literal["key", "none"] = "key"
    """With several workers (``gateway.workers``): ``key`` keeps per-key order (a Kafka source per partition;
    a source the broker splits round-robin keeps it only with ``shard_by``, and runs on one worker without
    it); ``none`` lets the broker split the source across the workers (MQTT shared subscription, NATS queue
    group, shared JetStream durable), order across keys and within a key not kept. See docs/scaling.md."""
    shard_by: str | None = None
    """With several workers, key-affine sharding for MQTT and NATS sources: a template of the source topic
    (``{device}``, ``{site}/{device}``, ``{topic}``), or ``header.NAME`` (the value of that header; a message
    without it has the empty key) naming the key. Every worker reads the whole stream and
    forwards only the keys that hash to it, acknowledging the others (counted as ``sharded``): per-key order
    kept across workers, at the cost of every worker reading every message."""
    allow_loop: bool = False
    """Let a target publish to topics the route's own source reads (same connector). Off: such a route is
    rejected, since an echo loop republishes every message forever."""
    description: str = ""
    """Free text for the people reading the config."""

    def __post_init__(self) -> None:
        if self.spool is not None and self.overflow == "disconnect":
            raise ValueError("overflow: disconnect does not apply to a spooled route (use block or drop_*)")
        if self.shard_by is not None and self.order == "none":
            raise ValueError("shard_by keeps per-key order: it does not go with order: none")


class FileSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The top level of a config file."""

    connectors: dict[str, Any]
    """Connector name → its settings (checked per kind)."""
    routes: list[Any] = []
    """The routes (checked one by one)."""
    gateway: GatewaySection = msgspec.field(default_factory=GatewaySection)


@dataclass(frozen=True, slots=True)
class TargetConfig:
    spec: TargetSpec
    address: Template
    key: Template | None


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """A validated route: typed endpoints with compiled patterns and templates."""

    section: RouteSection
    source: SourceSpec
    patterns: tuple[SourcePattern, ...]
    targets: tuple[TargetConfig, ...]
    dead_letter: TargetConfig | None = None
    request: RequestLeg | None = None
    """A ``request:`` route, or the companion route that carries its answers back (``replies_for``)."""
    shard_key: tuple[Template, ...] | None = None
    """``shard_by`` compiled against each source pattern (key-affine sharding across workers)."""
    shard_header: str | None = None
    """``shard_by: header.NAME``: the header whose value is the key."""

    @property
    def sharded(self) -> bool:
        """The route has a ``shard_by`` (by a template of the topic or by a header)."""
        return self.shard_key is not None or self.shard_header is not None

    @property
    def name(self) -> str:
        return self.section.name


@dataclass(frozen=True, slots=True)
class Config:
    """A config file after every check passed."""

    gateway: GatewaySection
    connectors: dict[str, Any]
    """Connector name → that kind's config Struct."""
    routes: tuple[RouteConfig, ...]
    source: str = ""
    """Where it was read from."""
    digest: str = field(default="")
    """sha256 of the file's text, to tell versions apart."""
    worker: tuple[int, int] | None = None
    """(index, count) in a worker process of a gateway running several (see gateway.config.workers)."""

    def kind(self, connector: str) -> str:
        """The ``type`` of a connector (``mqtt``, ``nats``, ...)."""
        return str(type(self.connectors[connector]).__struct_config__.tag)
