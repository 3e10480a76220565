"""Config of the in-memory connector."""

from __future__ import annotations

import msgspec

from gateway.config.plugin import ConnectorPlugin, PatternError, SourceSpec, TargetSpec
from gateway.routing.patterns import MQTT, SourcePattern, TopicSyntax, compile_pattern
from gateway.util.bounds import PayloadBytes


class MemoryConfig(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag="memory", tag_field="type"
):
    """An in-process broker (``MemoryBroker.named(broker)``), topics spelled like MQTT's."""

    broker: str = "default"
    """Name of the in-process broker; connectors with the same name share it."""
    max_payload: PayloadBytes | None = None
    """Largest payload in bytes read from or written to this connector (as for the broker connectors)."""


class MemorySource(SourceSpec, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``from`` an in-memory connector."""

    topic: str
    """Topic pattern, MQTT syntax: ``{name}`` captures, ``+`` and ``#`` wildcards."""

    def patterns(self, syntax: TopicSyntax) -> list[SourcePattern]:
        try:
            return [compile_pattern(self.topic, syntax)]
        except ValueError as exc:
            raise PatternError("topic", str(exc)) from None

    @property
    def at_least_once(self) -> bool:
        return True


class MemoryTarget(TargetSpec, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``to`` an in-memory connector."""

    topic: str
    """Topic template."""

    def address(self) -> str:
        return self.topic


PLUGIN = ConnectorPlugin(
    kind="memory",
    config=MemoryConfig,
    source=MemorySource,
    target=MemoryTarget,
    syntax=MQTT,
    factory="connectors.memory.connector:MemoryConnector",
)
