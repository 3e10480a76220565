"""What a connector package declares to the config: its Structs, its topic syntax, where its runtime lives.

A connector package (``connectors/<kind>/``) exposes a :class:`ConnectorPlugin`: its config Struct
(tagged by ``type``), the Structs of its route endpoints (``from`` and ``to``), its topic syntax, and
the ``module:Class`` of its :class:`gateway.core.connector.Connector`, imported only when a gateway
runs a connector of that kind. Loading and checking a config needs these declarations and nothing of
the runtime.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

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

    def load(self) -> Any:
        """The object named by :attr:`factory` (checked to be a connector class by the runtime:
        :func:`gateway.core.connector.connector_class`)."""
        module, _, attr = self.factory.partition(":")
        return getattr(importlib.import_module(module), attr)
