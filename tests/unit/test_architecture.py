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


# ---------------------------------------------------------------- (d) the arrows only go down

ORDER = (
    "gateway.errors",
    "gateway.util",
    "gateway.routing",
    "gateway.config",
    "gateway.core",
    "gateway.routes",
    "gateway.app",
    "gateway.ops",
)
LAYERS: dict[str, tuple[str, ...]] = {layer: ORDER[:i] for i, layer in enumerate(ORDER)}
"""A package (or module) of the gateway → the gateway packages it may import besides itself: those below it.
From the bottom up: errors; util (backoff, bounds, flood, redact, tls); routing (pure: patterns, trie,
templates, where, loops, headers); config (Structs, loader, plugin declarations, registry); core (the
per-message path and the connector contract); routes (route kinds); app; ops (endpoint, metrics, logs);
cli on top. The endpoint also reads the package's own ``__version__`` (``from gateway import``)."""
LAYERS["gateway.ops"] += ("gateway",)
CONTRACT = "gateway.core.contract"
CONNECTORS_MAY_IMPORT = ("gateway.errors", "gateway.util", "gateway.routing", "gateway.config", CONTRACT)
"""A connector package sees the core only through its declared contract, plus the data and pure layers."""


def gateway_imports(source: str) -> set[str]:
    """Every module of this project (``gateway.…``, ``connectors.…``) that ``source`` imports, anywhere in it
    (``if TYPE_CHECKING:`` blocks and functions too); ``from gateway import x`` counts as ``gateway``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return {m for m in found if m.split(".")[0] in ("gateway", "connectors")}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_violations(module: str, imported: set[str]) -> list[str]:
    """The imports of ``module`` (dotted name) that break the layering: each as ``module -> imported``."""
    bad = []
    if module.startswith("connectors."):
        own = ".".join(module.split(".")[:2])
        for m in sorted(imported):
            if not (_within(m, own) or any(_within(m, ok) for ok in CONNECTORS_MAY_IMPORT)):
                bad.append(f"{module} -> {m}")
        return bad
    layer = next((p for p in LAYERS if _within(module, p)), None)
    if layer is None:  # gateway.cli, gateway.__init__, gateway.__main__: the top may import anything
        return []
    allowed = (layer, *LAYERS[layer])
    for m in sorted(imported):
        if m.startswith("connectors"):
            bad.append(f"{module} -> {m}")  # the core loads connectors by name (the registry), never imports one
        elif not any(_within(m, ok) if ok != "gateway" else m == "gateway" for ok in allowed):
            bad.append(f"{module} -> {m}")
    return bad


def project_modules() -> dict[str, Path]:
    found = {}
    for path in sorted([*(ROOT / "gateway").rglob("*.py"), *(ROOT / "connectors").rglob("*.py")]):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = project_modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_go_down_the_layers(module: str) -> None:
    bad = layer_violations(module, gateway_imports(MODULES[module].read_text(encoding="utf-8")))

    assert not bad, f"imports against the layering (see LAYERS in {Path(__file__).name}): {bad}"


def test_the_layer_check_catches_each_of_the_three_rules() -> None:
    # the core imports nothing from the route kinds
    assert layer_violations("gateway.core.route", {"gateway.routes.requests"}) == [
        "gateway.core.route -> gateway.routes.requests"
    ]
    # config imports nothing from the runtime
    assert layer_violations("gateway.config.model", {"gateway.core.route", "gateway.routes.spooled"}) == [
        "gateway.config.model -> gateway.core.route",
        "gateway.config.model -> gateway.routes.spooled",
    ]
    # connectors import only the declared contract (and the data and pure layers, and their own package)
    assert layer_violations(
        "connectors.nats.sink",
        {"gateway.core.contract", "gateway.core.sink", "gateway.errors", "connectors.nats.wire", "connectors.mqtt"},
    ) == ["connectors.nats.sink -> connectors.mqtt", "connectors.nats.sink -> gateway.core.sink"]
    assert layer_violations("gateway.core.route", {"gateway.core.flight", "gateway.config.options"}) == []
    assert gateway_imports("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gateway.app import X\n") == {
        "gateway.app"
    }


def test_no_import_circles_between_modules() -> None:
    graph = {
        m: {i for i in gateway_imports(p.read_text(encoding="utf-8")) if i in MODULES and i != m}
        for m, p in MODULES.items()
    }
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            pytest.fail("import circle: " + " -> ".join([*path[path.index(m) :], m]))
        if m in done:
            return
        for n in sorted(graph[m]):
            visit(n, [*path, m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])
