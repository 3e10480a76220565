"""Options of the route kinds, as config data: retries, the spool, request/reply, payload schemas.

The runtime (``gateway.core``, ``gateway.routes``) reads these Structs; nothing here imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec

from gateway.util.backoff import Backoff
from gateway.util.bounds import Count, Seconds


class RetryPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Retries of a target that failed with a retriable error the broker returned for the message. A lost
    connection is not one (the message is resent on the next), nor is a target that is unavailable for now
    (:class:`~gateway.errors.Unavailable`): both are waited out, however long, within the route's budget."""

    attempts: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 5
    """Tries after the first one; 0 disables retries."""
    initial: Seconds = 0.2
    """Seconds; cap of the first delay (full jitter)."""
    max: Seconds = 10.0
    """Seconds; cap of any delay."""
    max_time: Seconds = 60.0
    """Seconds since the first failure after which the message fails for good."""

    def delay(self, attempt: int) -> float:
        return Backoff(initial=self.initial, max=self.max).delay(attempt)


class RequestConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``request:`` of a route between NATS and MQTT connectors: messages that expect a reply (NATS requests,
    MQTT 5 publishes with a response topic) are answered through the gateway, or get an error reply."""

    timeout: Seconds = 5.0
    """Seconds to wait for the answer; then the requester gets an error reply (code 504)."""
    max_pending: Count = 10_000
    """Requests waiting for an answer; a request beyond that gets an error reply at once (code 503)."""
    reply_to: str | None = None
    """Where responders answer, on the target's connector: the MQTT response topic (default
    ``gateway/<gateway id>/replies/<route>``) or the NATS subject prefix of reply subjects (default
    ``_INBOX.<gateway id>.<route>``)."""
    correlation: Literal["properties", "topic"] | None = None
    """MQTT targets: ``properties`` (MQTT 5 response topic and correlation data) or ``topic`` (the MQTT 3.1.1
    convention: the request goes to ``<topic>/<id>``, the device answers on ``<reply_to>/<id>``). Default:
    ``properties`` on an MQTT 5 connector, ``topic`` on a 3.1.1 one."""
    reply_qos: Literal[0, 1, 2] = 1
    """MQTT requesters: QoS of the answer published to their response topic."""


def reply_route_name(route: str) -> str:
    """The name of a request route's companion, which carries the answers back."""
    return f"{route}.replies"


@dataclass(frozen=True, slots=True)
class RequestLeg:
    """A request route's settings, resolved at load time; ``replies_for`` marks its companion route."""

    config: RequestConfig
    responder: str
    """Kind of the target's connector (the responders' side), one whose plugin declares ``replies``."""
    mode: str
    """How the id travels to responders, as the responder's kind names it (``Replies.mode``): ``subject``
    (NATS), ``properties`` or ``topic`` (MQTT)."""
    reply_to: str
    replies_for: str | None = None
    requester: str | None = None
    """Kind of the source's connector (the requesters' side); None: the responder's."""


class SpoolConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``spool:`` of a route: keep messages on local disk until the targets confirm them."""

    path: str
    """Directory of this route's spool (created; one route, one gateway process at a time)."""
    max_bytes: Annotated[int, msgspec.Meta(ge=1, le=1 << 44)] = 1024 * 1024 * 1024
    """Bytes the spool may hold undelivered; then the route's ``overflow`` applies (``block`` pauses the
    source, ``drop_newest`` / ``drop_oldest`` drop and count)."""
    fsync: bool = True
    """fsync each write before acknowledging the source (survives power loss); false survives a crash of
    the gateway only, and is faster."""

    def __post_init__(self) -> None:
        if self.max_bytes < 1024 * 1024:
            raise ValueError("max_bytes: at least 1 MiB")


Codec = Literal["passthrough", "json_to_msgpack", "msgpack_to_json"]
"""``codec:`` of a route: how the payload is converted on the way."""
FieldType = Literal["str", "int", "float", "bool", "any", "str?", "int?", "float?", "bool?", "any?"]


class SchemaConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``schema:`` of a route: the payload must be an object with these fields (JSON, or msgpack with
    ``codec: msgpack_to_json``). Invalid messages go to the dead letter with the validation error."""

    fields: dict[str, FieldType]
    """Field name → ``str``, ``int``, ``float``, ``bool`` or ``any``; a ``?`` suffix makes it optional."""
    extra: bool = True
    """Accept fields not listed."""

    def __post_init__(self) -> None:
        if not self.fields:
            raise ValueError("fields: name at least one field")
