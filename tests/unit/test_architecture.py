"""Rules of the code base: the core imports no broker library; the registry and config types agree."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Union

import msgspec
import pytest

from gateway.config.model import FileSection, GatewaySection, RouteSection
from gateway.config.plugin import ConnectorPlugin, SourceSpec, TargetSpec
from gateway.config.registry import BUILTIN, plugins
from gateway.core.connector import Connector, connector_class
from gateway.routing.patterns import TopicSyntax
from gateway.util.backoff import Backoff

ROOT = Path(__file__).resolve().parents[2]
BROKER_LIBRARIES = frozenset({"nats", "aiokafka", "mqtt5", "confluent_kafka", "paho", "gmqtt", "aiomqtt", "kafka"})


def imported_top_level_modules(source: str) -> set[str]:
    """Top-level names of every absolute import in ``source``, wherever it appears (functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value.split(".")[0])
    return found


def core_modules() -> list[Path]:
    files = sorted((ROOT / "gateway").rglob("*.py"))
    assert len(files) > 10, "the gateway package was not found"
    return files


# ---------------------------------------------------------------- (a) the core never imports a broker library


def test_the_import_scanner_sees_every_kind_of_import() -> None:
    source = """
import os
import nats.js
from aiokafka import AIOKafkaProducer
from . import sibling
def lazy():
    import paho.mqtt.client
    importlib.import_module("gmqtt")
"""
    assert imported_top_level_modules(source) == {"os", "nats", "aiokafka", "paho", "gmqtt"}


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_module_imports_no_broker_library(path: Path) -> None:
    banned = imported_top_level_modules(path.read_text(encoding="utf-8")) & BROKER_LIBRARIES

    assert not banned, f"{path.relative_to(ROOT)} imports {sorted(banned)}; that belongs in connectors/"


# ---------------------------------------------------------------- (b) registry and config types agree


def test_every_builtin_kind_is_registered() -> None:
    assert set(BUILTIN) <= set(plugins())
    assert set(BUILTIN) == {"mqtt", "nats", "kafka", "memory"}


@pytest.mark.parametrize("kind", sorted(BUILTIN))
def test_plugin_config_struct_is_tagged_with_its_kind(kind: str) -> None:
    plugin = plugins()[kind]
    cfg = plugin.config.__struct_config__

    assert isinstance(plugin, ConnectorPlugin)
    assert plugin.kind == kind
    assert cfg.tag == kind
    assert cfg.tag_field == "type"
    assert cfg.frozen
    assert cfg.forbid_unknown_fields


@pytest.mark.parametrize("kind", sorted(BUILTIN))
def test_plugin_endpoint_specs_subclass_the_core_specs(kind: str) -> None:
    plugin = plugins()[kind]

    assert issubclass(plugin.source, SourceSpec)
    assert issubclass(plugin.target, TargetSpec)
    assert plugin.source is not SourceSpec
    assert plugin.target is not TargetSpec
    for spec in (plugin.source, plugin.target):
        assert spec.__struct_config__.frozen
        assert spec.__struct_config__.forbid_unknown_fields
    # Routes name their connector; every endpoint has the key, the loader relies on it.
    assert "connector" in plugin.source.__struct_fields__
    assert "connector" in plugin.target.__struct_fields__
    assert plugin.target.address_key in plugin.target.__struct_fields__
    # The spec methods are implemented, not the base's NotImplementedError.
    assert plugin.source.patterns is not SourceSpec.patterns
    assert plugin.target.address is not TargetSpec.address


@pytest.mark.parametrize("kind", sorted(BUILTIN))
def test_plugin_load_returns_a_connector_class(kind: str) -> None:
    plugin = plugins()[kind]

    cls = connector_class(plugin)

    assert isinstance(cls, type)
    assert issubclass(cls, Connector)
    assert isinstance(plugin.syntax, TopicSyntax)


def test_plugin_load_refuses_a_non_connector() -> None:
    plugin = plugins()["memory"]
    bogus = ConnectorPlugin(
        kind="bogus",
        config=plugin.config,
        source=plugin.source,
        target=plugin.target,
        syntax=plugin.syntax,
        factory="gateway.routing.patterns:compile_pattern",
    )

    with pytest.raises(TypeError, match="is not a Connector class"):
        connector_class(bogus)


def test_the_config_union_decodes_each_kind_to_its_own_struct() -> None:
    configs = tuple(p.config for p in plugins().values())
    union: Any = Union[configs]  # noqa: UP007 - a runtime union of a tuple of types
    minimal = {"kafka": {"bootstrap_servers": ["h:9092"]}}

    for kind, plugin in plugins().items():
        decoded = msgspec.convert({"type": kind, **minimal.get(kind, {})}, union)
        assert type(decoded) is plugin.config
        assert msgspec.to_builtins(decoded)["type"] == kind


def test_an_unknown_tag_is_refused_by_the_union() -> None:
    union: Any = Union[tuple(p.config for p in plugins().values())]  # noqa: UP007

    with pytest.raises(msgspec.ValidationError, match="Invalid value 'amqp'"):
        msgspec.convert({"type": "amqp"}, union)


# ---------------------------------------------------------------- (c) every field is required or has a valid default


def config_structs() -> list[type[msgspec.Struct]]:
    structs: list[type[msgspec.Struct]] = [FileSection, GatewaySection, RouteSection, Backoff]
    for plugin in plugins().values():
        structs += [plugin.config, plugin.source, plugin.target]
    return structs


@pytest.mark.parametrize("struct", config_structs(), ids=lambda s: f"{s.__module__}.{s.__name__}")
def test_every_config_field_is_required_or_has_a_default_its_own_type_accepts(struct: type[msgspec.Struct]) -> None:
    for field in msgspec.structs.fields(struct):
        if field.required:
            continue
        default = field.default_factory() if field.default is msgspec.NODEFAULT else field.default
        try:
            msgspec.convert(msgspec.to_builtins(default), field.type)
        except msgspec.ValidationError as exc:  # e.g. a default of 0 under Meta(ge=1)
            pytest.fail(f"{struct.__name__}.{field.name}: default {default!r} is invalid: {exc}")


@pytest.mark.parametrize("struct", config_structs(), ids=lambda s: f"{s.__module__}.{s.__name__}")
def test_config_structs_are_frozen_and_reject_unknown_keys(struct: type[msgspec.Struct]) -> None:
    assert struct.__struct_config__.frozen
    assert struct.__struct_config__.forbid_unknown_fields
