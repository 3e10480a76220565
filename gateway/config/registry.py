"""The connector registry: one explicit table of built-in kinds, plus an entry-point group.

Third-party packages add a kind by declaring, in their ``pyproject.toml``::

    [project.entry-points."gateway.connectors"]
    amqp = "my_package.amqp"      # a module exposing PLUGIN: ConnectorPlugin

Only the connector packages' ``config`` modules are imported here; broker
libraries load when a gateway actually runs a connector of that kind.
"""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points

import structlog

from gateway.config.plugin import ConnectorPlugin

BUILTIN: dict[str, str] = {
    "mqtt": "connectors.mqtt",
    "nats": "connectors.nats",
    "kafka": "connectors.kafka",
    "memory": "connectors.memory",
}
"""Connector kind → module exposing ``PLUGIN``."""

ENTRY_POINT_GROUP = "gateway.connectors"


def _load(module: str) -> ConnectorPlugin:
    plugin = getattr(importlib.import_module(module), "PLUGIN", None)
    if not isinstance(plugin, ConnectorPlugin):
        raise TypeError(f"{module}.PLUGIN is not a ConnectorPlugin")
    return plugin


@functools.cache
def plugins() -> dict[str, ConnectorPlugin]:
    """Every known connector kind, built-in first; an entry point cannot replace a built-in."""
    found = {kind: _load(module) for kind, module in BUILTIN.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            continue
        try:
            found[ep.name] = _load(ep.value)
        except Exception as exc:  # a broken plugin must not stop the gateway from loading the others
            structlog.get_logger("gateway.registry").warning("registry.plugin_failed", kind=ep.name, error=repr(exc))
    return found
