"""Config of the MQTT connector and of its route endpoints."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal
from urllib.parse import unquote, urlsplit

import msgspec

from connectors.mqtt.replies import MqttReplies
from gateway.config.plugin import ConnectorPlugin, PatternError, SourceSpec, TargetSpec
from gateway.routing.patterns import MQTT, SourcePattern, TopicSyntax, compile_pattern
from gateway.util.bounds import IN_SECONDS, PayloadBytes, Seconds
from gateway.util.redact import redact_url, register_secret
from gateway.util.tls import TlsConfig, read_secret

QoS = Literal[0, 1, 2]
_PLAIN = ("mqtt", "tcp")
_TLS = ("mqtts", "ssl")


class MqttConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag="mqtt", tag_field="type"):
    """One MQTT connection, used by every route that reads from or writes to this connector."""

    url: str = "mqtt://127.0.0.1:1883"
    """Broker address: ``mqtt://host:port`` (plaintext, port 1883 by default) or ``mqtts://host:port`` (TLS, port
    8883 by default). ``mqtt://user:password@host:port`` also works; logs mask the password."""
    tls: TlsConfig | None = None
    """TLS settings (CA, client certificate for mTLS, server name); needs an ``mqtts://`` URL. ``mqtts://``
    without this block verifies the broker against the system's trust store."""
    client_id: str = ""
    """Fixed client id: the broker keys the persistent session on it. Default: ``<gateway id>-<connector name>``."""
    protocol: Literal[5, "5", "3.1.1"] = 5
    """MQTT protocol version: 5 or "3.1.1"."""
    clean_start: bool = False
    """False keeps the session across reconnects and restarts, so the broker redelivers what was not acknowledged."""
    session_expiry: Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF, extra=IN_SECONDS)] = 86_400
    """Seconds the broker keeps the session after a disconnect (MQTT 5; a 3.1.1 session never expires)."""
    keepalive: Annotated[int, msgspec.Meta(ge=0, le=65535, extra=IN_SECONDS)] = 30
    """Seconds between PINGREQs; 0 disables them."""
    username: str | None = None
    """MQTT user name; use ``${ENV}`` or ``${file:PATH}`` rather than a literal."""
    password: str | None = None
    """MQTT password; use ``password_file``, ``${ENV}`` or ``${file:PATH}`` rather than a literal."""
    password_file: str | None = None
    """File holding the MQTT password, read at each connect (so a rotated password is picked up)."""
    max_payload: PayloadBytes | None = None
    """Largest payload in bytes read from or written to this connector; larger messages fail before they are
    published (counted, dead-lettered). Default: no limit of the gateway's own."""
    receive_maximum: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1024
    """Unacknowledged QoS 1/2 messages the broker may send us at once (MQTT 5; Mosquitto also caps it with
    its ``max_inflight_messages``)."""
    max_inflight: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1024
    """Our own QoS 1/2 publishes awaiting the broker's acknowledgement (lowered to the broker's receive maximum)."""
    connect_timeout: Seconds = 10.0
    """Seconds to wait for the TCP connection, the CONNACK and the SUBACK."""

    def __post_init__(self) -> None:
        try:
            parts = urlsplit(self.url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in (*_PLAIN, *_TLS) or not parts.hostname:
            raise ValueError(f"url {redact_url(self.url)!r}: expected mqtt://host:port or mqtts://host:port")
        if self.tls is not None and parts.scheme in _PLAIN:
            raise ValueError(f"tls is set but url {redact_url(self.url)!r} is plaintext: use mqtts://")
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs username")
        register_secret(self.password)
        register_secret(unquote(parts.password) if parts.password else None)

    @property
    def uses_tls(self) -> bool:
        return urlsplit(self.url).scheme in _TLS

    @property
    def credentials(self) -> tuple[str | None, str | None]:
        """``username``/``password`` (or ``password_file``, read now), else the ones in the URL."""
        parts = urlsplit(self.url)
        if self.username is not None:
            if self.password_file is not None:
                return self.username, read_secret(self.password_file)
            return self.username, self.password
        return (
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
        )

    @property
    def version(self) -> int:
        return 5 if self.protocol in (5, "5") else 4


class MqttSource(SourceSpec, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``from`` an MQTT connector."""

    topic: str
    """Topic filter: ``{name}`` captures one level, ``+`` and ``#`` are MQTT's wildcards."""
    qos: QoS = 1
    """Subscription QoS. 1 and 2 are at-least-once through the gateway; 0 is at-most-once."""
    share_group: str | None = None
    """Subscribe as ``$share/<group>/<filter>`` so several gateways split the topic."""
    retained_only: bool = False
    """Take only messages that carry the retain flag: the broker's retained state, to mirror it (to a
    key-value bucket, a compacted Kafka topic). Every retained message arrives when the route subscribes,
    then each new one as it is published; a cleared retained message arrives as an empty payload (a delete
    for the target). Others are acknowledged and counted as ``filtered``. MQTT 5 only in practice: a 3.1.1
    broker sets the flag only on what it sends at subscribe time, so updates and clears are seen only at the
    next (re)connect. Not with ``share_group``: shared subscriptions get no retained messages."""

    def __post_init__(self) -> None:
        if self.retained_only and self.share_group is not None:
            raise ValueError(
                "retained_only cannot be used with share_group: a shared subscription is sent no retained "
                "messages when it subscribes (MQTT 5, 4.8.2), so the state would be missed"
            )

    def patterns(self, syntax: TopicSyntax) -> list[SourcePattern]:
        if self.topic.startswith("$share/"):
            raise PatternError("topic", "use share_group instead of a $share/ prefix")
        try:
            return [compile_pattern(self.topic, syntax)]
        except ValueError as exc:
            raise PatternError("topic", str(exc)) from None

    @property
    def at_least_once(self) -> bool:
        return self.qos > 0

    split: ClassVar[Literal["partitions", "round_robin", "none"]] = "round_robin"

    def broker_split(self, route: str) -> str | None:
        return f"MQTT shared subscription $share/{self.share_group}/{self.topic}" if self.share_group else None

    def shared(self, route: str, group: str) -> tuple[MqttSource, str] | None:
        if self.retained_only:  # a shared subscription is sent no retained messages
            return None
        spec = msgspec.structs.replace(self, share_group=self.share_group or _share_name(group))
        return spec, f"MQTT shared subscription $share/{spec.share_group}/{self.topic}"


def _share_name(group: str) -> str:
    """A share name MQTT accepts (no ``/``, ``+``, ``#``)."""
    return "".join("_" if c in "/+#" else c for c in group)


class MqttTarget(TargetSpec, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``to`` an MQTT connector."""

    topic: str
    """Topic template: ``{name}``, ``{#}``/``{>}``, ``{topic}``."""
    qos: QoS = 1
    """Publish QoS; 1 and 2 wait for the broker's acknowledgement before the source is acked."""
    retain: bool = False
    """Publish with the retain flag."""

    def address(self) -> str:
        return self.topic


PLUGIN = ConnectorPlugin(
    kind="mqtt",
    config=MqttConfig,
    source=MqttSource,
    target=MqttTarget,
    syntax=MQTT,
    factory="connectors.mqtt.connector:MqttConnector",
    replies=MqttReplies(),
    identity=("client_id",),
)
