"""What a connector package declares to the config: its Structs, its topic syntax, where its runtime lives.

A connector package (``connectors/<kind>/``) exposes a :class:`ConnectorPlugin`: its config Struct
(tagged by ``type``), the Structs of its route endpoints (``from`` and ``to``), its topic syntax, and
the ``module:Class`` of its :class:`gateway.core.connector.Connector`, imported only when a gateway
runs a connector of that kind. Loading and checking a config needs these declarations and nothing of
the runtime.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import msgspec

from gateway.errors import GatewayError
from gateway.routing.patterns import SourcePattern, TopicSyntax


class PatternError(GatewayError, ValueError):
    """A source pattern in key ``key`` of a route's ``from`` is invalid."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class SourceSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of a route's ``from`` for one connector kind."""

    connector: str
    """Name of the connector (a key of ``connectors``) to read from."""

    def patterns(self, syntax: TopicSyntax) -> list[SourcePattern]:
        """The compiled source patterns; raise :class:`PatternError` naming the key of a bad one."""
        raise NotImplementedError

    @property
    def at_least_once(self) -> bool:
        """Whether the source redelivers what the gateway did not acknowledge (at-least-once)."""
        return False

    # -- several workers on one config (``gateway.workers``; see gateway.config.workers) ------------------
    split: ClassVar[Literal["partitions", "round_robin", "none"]] = "none"
    """How the broker shares this source among workers reading it together: ``partitions`` (each worker gets
    its own partitions, each partition's order kept: Kafka groups), ``round_robin`` (each message goes to one
    of them, whatever its key: MQTT shared subscriptions, NATS queue groups, a shared JetStream durable),
    ``none`` (no sharing: one worker runs it)."""

    def broker_split(self, route: str) -> str | None:
        """What the user wrote in this ``from`` to have the broker split it among processes (``share_group``,
        ``queue``), in words; None when nothing."""
        return None

    def shared(self, route: str, group: str) -> tuple[SourceSpec, str] | None:
        """This ``from`` with the broker's round-robin split on (``group`` names it where the protocol needs a
        name), and that split in words; None when the source cannot be shared."""
        return None

    def whole(self, route: str, worker: int) -> SourceSpec:
        """This ``from`` for worker ``worker`` when every worker reads the whole stream (key-affine sharding):
        its own subscription or durable."""
        return self


class TargetSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of a route's ``to`` entry for one connector kind."""

    connector: str
    """Name of the connector (a key of ``connectors``) to publish to."""

    address_key: ClassVar[str] = "topic"

    def address(self) -> str:
        """The address template (topic or subject)."""
        raise NotImplementedError

    def key_template(self) -> str | None:
        """The record-key template, where the protocol has keys."""
        return None


class ReplyError(GatewayError):
    """A ``request:`` route this connector kind cannot serve; ``key`` is the key of ``request`` at fault
    (empty: the request as a whole)."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.message = message


class Replies(ABC):
    """How one connector kind carries request/reply (``request:`` routes): where the requester's reply
    address is, how a request travels to a responder with the gateway's correlation id, how the answer
    comes back. Declared by the kind's plugin (:attr:`ConnectorPlugin.replies`); the gateway's request
    tables (:mod:`gateway.routes.requests`) know nothing of the protocols beyond this."""

    # -- the requester's side (the route's source) ----------------------------------------------
    @abstractmethod
    def check_requester(self, connector: Any, source: SourceSpec) -> None:
        """Raise :class:`ReplyError` when requests cannot be read from ``source`` of a connector
        configured as ``connector``."""

    @abstractmethod
    def reply_target(self, connector: str, config: Any) -> dict[str, Any]:
        """``to`` of the companion route: publishes each answer to its requester's reply address
        (``config``: the route's :class:`~gateway.config.options.RequestConfig`)."""

    @abstractmethod
    def error_headers(self, code: int, text: str) -> list[tuple[str, str]]:
        """The headers of an error reply sent to a requester (code 503, 502, 504, 400, 404)."""

    # -- the responder's side (the route's target) ------------------------------------------------
    publishes_reply: ClassVar[bool] = False
    """The target's sink publishes the forwarded message's reply address as the protocol's own."""

    @abstractmethod
    def mode(self, connector: Any, target: TargetSpec, correlation: str | None) -> str:
        """How the id travels to responders behind ``target`` (``correlation``: what the route asked);
        raise :class:`ReplyError` when this target cannot take requests."""

    @abstractmethod
    def default_reply_to(self, gateway_id: str, route: str) -> str:
        """Where responders answer when the route does not say."""

    @abstractmethod
    def answer_source(self, connector: str, reply_to: str, mode: str) -> dict[str, Any]:
        """``from`` of the companion route: reads the answers arriving at ``reply_to``."""

    @abstractmethod
    def forward(self, reply_to: str, mode: str, token: str) -> tuple[str | None, str | None]:
        """For the request with id ``token``: the reply address it carries to the responder, and a suffix
        appended to its target address (or None)."""

    @abstractmethod
    def answer(
        self, topic: str, correlation: bytes | None, payload: bytes, headers: Any, mode: str
    ) -> tuple[bytes, tuple[int, str] | None]:
        """The id an answer carries, and, when the message is a broker's status instead of an answer, the
        error (code, text) its requester gets."""


@dataclass(frozen=True, slots=True)
class ConnectorPlugin:
    """What a connector package registers."""

    kind: str
    config: type[msgspec.Struct]
    source: type[SourceSpec]
    target: type[TargetSpec]
    syntax: TopicSyntax
    factory: str
    """``module:Class`` of the :class:`Connector`, imported only when the gateway runs."""
    replies: Replies | None = None
    """How the kind carries request/reply; None: it does not (``request:`` routes refuse it)."""
    identity: tuple[str, ...] = ()
    """Fields of the connector config that name the client to its broker (client id, connection name): each
    worker of a gateway running several gets its own, ``<value>-w<k>`` (a default derived from the gateway
    id gets the worker's id anyway)."""

    def load(self) -> Any:
        """The object named by :attr:`factory` (checked to be a connector class by the runtime:
        :func:`gateway.core.connector.connector_class`)."""
        module, _, attr = self.factory.partition(":")
        return getattr(importlib.import_module(module), attr)
