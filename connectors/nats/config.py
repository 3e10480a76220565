"""Config of the NATS connector and of its route endpoints."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal
from urllib.parse import unquote, urlsplit

import msgspec

from connectors.nats.replies import NatsReplies
from gateway.config.plugin import ConnectorPlugin, PatternError, SourceSpec, TargetSpec
from gateway.routing.patterns import NATS, SourcePattern, TopicSyntax, compile_pattern
from gateway.util.bounds import Bytes, Count, PayloadBytes, Seconds
from gateway.util.redact import redact_url, register_secret
from gateway.util.tls import TlsConfig

_BUCKET = re.compile(r"[A-Za-z0-9_-]+")
"""A JetStream key-value bucket name, as nats-server and the NATS clients accept it."""
_KEY_CHARS = re.compile(r"[-/_=.A-Za-z0-9]*")
"""What a key-value key may hold (the NATS clients' rule; the server itself would store any subject)."""
_PLACEHOLDERS = re.compile(r"\{\{|\}\}|\{[^{}]*\}")


def check_bucket(bucket: str) -> None:
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"kv: {bucket!r} is not a key-value bucket name (letters, digits, '_' and '-')")


def check_key_template(text: str) -> None:
    """The literal text of a key template must be key characters; placeholders are checked per message."""
    literal = _PLACEHOLDERS.sub("", text)
    if not _KEY_CHARS.fullmatch(literal):
        bad = sorted(set(_KEY_CHARS.sub("", literal)))
        raise ValueError(
            f"subject: {text!r} is not a key-value key: {''.join(bad)!r} (keys use letters, digits and -/_=.)"
        )
    if text.startswith(".") or text.endswith("."):
        raise ValueError(f"subject: {text!r} is not a key-value key: it starts or ends with '.'")


def is_kv_key(key: str) -> bool:
    return bool(key) and _KEY_CHARS.fullmatch(key) is not None and key[0] != "." and key[-1] != "."


class NatsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag="nats", tag_field="type"):
    """One NATS connection, used by every route that reads from or writes to this connector."""

    servers: list[str] = msgspec.field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    """Server URLs, ``nats://host:port`` or ``tls://host:port``; the client picks one and fails over to the next."""
    tls: TlsConfig | None = None
    """TLS settings (CA, client certificate for mTLS, server name). TLS is required, never negotiated away,
    when this block is present or a server URL is ``tls://``: a server that does not offer it is refused."""
    name: str = ""
    """Client name shown in the server's ``/connz``. Default: ``<gateway id>-<connector name>``."""
    user: str | None = None
    """User name (with ``password``)."""
    password: str | None = None
    """Password; use ``password_file``, ``${ENV}`` or ``${file:PATH}`` rather than a literal."""
    password_file: str | None = None
    """File holding the password, read at each connect."""
    token: str | None = None
    """Authentication token; use ``token_file``, ``${ENV}`` or ``${file:PATH}`` rather than a literal."""
    token_file: str | None = None
    """File holding the authentication token, read at each connect."""
    nkey_seed_file: str | None = None
    """NKey authentication: file holding the user's seed (``SU...``); the server knows its public key."""
    creds_file: str | None = None
    """JWT authentication (decentralized / operator mode): a ``.creds`` file holding the user JWT and seed."""
    max_payload: PayloadBytes | None = None
    """Largest payload in bytes read from or written to this connector; larger messages fail before they are
    published (counted, dead-lettered). The server's own ``max_payload`` applies as well."""
    connect_timeout: Seconds = 5.0
    """Seconds to wait for a connection to be accepted."""
    ping_interval: Seconds = 20.0
    """Seconds between client PINGs."""
    max_outstanding_pings: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 3
    """Unanswered PINGs after which the connection counts as lost."""
    pending_msgs_limit: Count = 65_536
    """Per core subscription: messages buffered in the client before it drops and reports a slow consumer."""
    pending_bytes_limit: Bytes = 64 * 1024 * 1024
    """Per core subscription: bytes buffered in the client before it drops and reports a slow consumer."""
    flush_timeout: Seconds = 10.0
    """Seconds to wait for the server to confirm a batch of core publishes."""
    publish_timeout: Seconds = 10.0
    """Seconds to wait for a JetStream PubAck before publishing again."""

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("servers: at least one server URL is needed")
        for url in self.servers:
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 - raises ValueError on a bad port
            except ValueError:
                parts = None
            if parts is None or parts.scheme not in ("nats", "tls") or not parts.hostname:
                raise ValueError(f"servers: {redact_url(url)!r}: expected nats://host:port or tls://host:port")
            register_secret(unquote(parts.password) if parts.password else None)
            register_secret(unquote(parts.username) if parts.username and not parts.password else None)  # a token
        methods = {
            "password": self.password is not None or self.password_file is not None,
            "token": self.token is not None or self.token_file is not None,
            "nkey_seed_file": self.nkey_seed_file is not None,
            "creds_file": self.creds_file is not None,
        }
        chosen = [k for k, on in methods.items() if on]
        if len(chosen) > 1:
            raise ValueError(f"choose one authentication method, got {' and '.join(chosen)}")
        for key in ("password", "token"):
            if getattr(self, key) is not None and getattr(self, f"{key}_file") is not None:
                raise ValueError(f"set {key} or {key}_file, not both")
        if (self.password is not None or self.password_file is not None) and self.user is None:
            raise ValueError("password needs user")
        register_secret(self.password)
        register_secret(self.token)

    @property
    def uses_tls(self) -> bool:
        return self.tls is not None or any(u.startswith("tls://") for u in self.servers)


class NatsSource(SourceSpec, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``from`` a NATS connector: a core subscription, or a durable JetStream consumer when ``stream`` or
    ``kv`` is set."""

    subject: str
    """Subject filter: ``{name}`` captures one token, ``*`` and ``>`` are NATS wildcards. With ``kv``: the
    filter over the bucket's keys (``devices.{device}.config``), and the key is the message's topic."""
    queue: str | None = None
    """Core NATS queue group: gateways sharing it split the messages."""
    stream: str | None = None
    """JetStream stream to consume from (durable, at-least-once)."""
    kv: str | None = None
    """JetStream key-value bucket to consume from (its stream ``KV_<bucket>``; durable, at-least-once): the
    latest value of every key matching ``subject`` first, then every update. A deleted or purged key arrives
    as an empty payload with the header ``KV-Operation: DEL`` or ``PURGE`` (to an MQTT target with
    ``retain: true``, that clears the retained message). The bucket must exist."""
    durable: str | None = None
    """Durable consumer name (JetStream). Default: ``gateway-<route name>``; gateways sharing it split the stream."""
    batch: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 512
    """JetStream: messages per fetch."""
    ack_wait: Seconds = 30.0
    """JetStream: seconds before the server redelivers an unacknowledged message."""
    deliver_policy: Literal["all", "new", "last", "last_per_subject"] | None = None
    """JetStream: where a new durable consumer starts. Default: ``all`` for a ``stream``, ``last_per_subject``
    (the latest value of each key, then updates) for a ``kv`` bucket."""

    def __post_init__(self) -> None:
        if self.stream is not None and self.kv is not None:
            raise ValueError("set stream or kv, not both (a kv bucket is the stream KV_<bucket>)")
        if self.kv is not None:
            check_bucket(self.kv)
        jetstream = self.stream is not None or self.kv is not None
        if not jetstream and self.durable is not None:
            raise ValueError("durable needs stream or kv (a durable consumer reads a JetStream stream)")
        if not jetstream and self.deliver_policy is not None:
            raise ValueError("deliver_policy needs stream or kv (it is a JetStream consumer setting)")
        if jetstream and self.queue is not None:
            raise ValueError("queue is for core subscriptions; JetStream consumers share by durable name")

    def patterns(self, syntax: TopicSyntax) -> list[SourcePattern]:
        try:
            return [compile_pattern(self.subject, syntax)]
        except ValueError as exc:
            raise PatternError("subject", str(exc)) from None

    @property
    def at_least_once(self) -> bool:
        return self.stream is not None or self.kv is not None

    @property
    def stream_name(self) -> str | None:
        """The JetStream stream read: ``stream``, or ``KV_<bucket>``; None for a core subscription."""
        return f"KV_{self.kv}" if self.kv is not None else self.stream

    @property
    def subject_prefix(self) -> str:
        """What the stream's subjects carry before the ``subject`` filter: ``$KV.<bucket>.`` for a kv bucket."""
        return f"$KV.{self.kv}." if self.kv is not None else ""

    @property
    def effective_deliver_policy(self) -> str:
        """The deliver policy of a new durable consumer."""
        if self.deliver_policy is not None:
            return self.deliver_policy
        return "last_per_subject" if self.kv is not None else "all"

    def durable_name(self, route: str) -> str:
        """The JetStream durable consumer's name: ``durable``, or ``gateway-<route name>``."""
        return self.durable or f"gateway-{route}".replace(".", "_").replace(" ", "_")

    split: ClassVar[Literal["partitions", "round_robin", "none"]] = "round_robin"

    def broker_split(self, route: str) -> str | None:
        return f"NATS queue group {self.queue}" if self.queue is not None else None

    def shared(self, route: str, group: str) -> tuple[NatsSource, str]:
        if self.stream_name is not None:  # workers pulling from one durable split the stream
            return self, f"JetStream durable {self.durable_name(route)} shared by the workers"
        spec = msgspec.structs.replace(self, queue=self.queue or group)
        return spec, f"NATS queue group {spec.queue}"

    def whole(self, route: str, worker: int) -> NatsSource:
        if self.stream_name is None:
            return self
        return msgspec.structs.replace(self, durable=f"{self.durable_name(route)}-w{worker}")


class NatsTarget(TargetSpec, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``to`` a NATS connector."""

    subject: str
    """Subject template: ``{name}``, ``{#}``/``{>}``, ``{topic}``. With ``kv``: the key template
    (``{topic}`` turns the MQTT topic ``devices/d1/config`` into the key ``devices.d1.config``)."""
    jetstream: bool = False
    """Publish to JetStream and wait for the PubAck (at-least-once); otherwise a core publish, flushed."""
    kv: str | None = None
    """Write to this JetStream key-value bucket: the message is put under the key rendered from ``subject``
    (a JetStream publish to ``$KV.<bucket>.<key>``, PubAck awaited: implies ``jetstream``), and an empty payload
    deletes the key (``KV-Operation: DEL``), so a cleared MQTT retained message clears the key. The bucket must
    exist (``nats kv add <bucket>``); until it does, writes fail as retriable errors. A rendered key with other
    characters than letters, digits and ``-/_=.`` fails the message."""

    address_key = "subject"

    def __post_init__(self) -> None:
        if self.kv is not None:
            check_bucket(self.kv)
            check_key_template(self.subject)
            msgspec.structs.force_setattr(self, "jetstream", True)  # a put is a JetStream publish

    def address(self) -> str:
        if self.kv is not None:
            return f"$KV.{self.kv}.{self.subject}"
        return self.subject


PLUGIN = ConnectorPlugin(
    kind="nats",
    config=NatsConfig,
    source=NatsSource,
    target=NatsTarget,
    syntax=NATS,
    factory="connectors.nats.connector:NatsConnector",
    replies=NatsReplies(),
    identity=("name",),
)
