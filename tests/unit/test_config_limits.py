"""The config's bounds: every number has a range, the file's shape is limited, interpolated values are masked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec.inspect as mi
import pytest

from gateway.config import parse_config
from gateway.config.loader import MAX_DEPTH, MAX_NODES
from gateway.config.model import FileSection, RouteSection
from gateway.config.registry import plugins
from gateway.errors import ConfigError


def numeric_fields() -> list[tuple[str, Any]]:
    """Every int/float key reachable from the file's top and from each connector kind's entries."""
    seen: set[type] = set()
    found: list[tuple[str, Any]] = []

    def walk(t: Any, path: str) -> None:
        if isinstance(t, mi.StructType):
            if t.cls in seen:
                return
            seen.add(t.cls)
            for f in t.fields:
                walk(f.type, f"{t.cls.__name__}.{f.encode_name}")
        elif isinstance(t, mi.UnionType):
            for member in t.types:
                walk(member, path)
        elif isinstance(t, mi.Metadata):  # a Meta with ``extra`` (durations: IN_SECONDS, IN_MILLIS) wraps the number
            walk(t.type, path)
        elif isinstance(t, mi.ListType | mi.TupleType | mi.SetType | mi.FrozenSetType):
            walk(t.item_type, path)
        elif isinstance(t, mi.DictType):
            walk(t.value_type, path)
        elif isinstance(t, mi.IntType | mi.FloatType):
            found.append((path, t))

    roots: list[Any] = [FileSection, RouteSection]
    for plugin in plugins().values():
        roots += [plugin.config, plugin.source, plugin.target]
    for root in roots:
        walk(mi.type_info(root), "")
    return found


def test_every_number_in_a_config_has_a_range() -> None:
    fields = numeric_fields()
    assert len(fields) > 30
    unbounded = [path for path, t in fields if t.le is None and t.lt is None]
    negative = [path for path, t in fields if (t.ge is None or t.ge < 0) and t.gt is None]
    assert not unbounded, f"numeric keys without an upper bound (use gateway.util.bounds): {unbounded}"
    assert not negative, f"numeric keys that accept negative values: {negative}"


CONNECTORS = "connectors:\n  m: {type: memory}\n"
ROUTE = "  - name: r\n    from: {connector: m, topic: 'a/#'}\n    to: {connector: m, topic: 'b/x'}\n"


def issues(text: str, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, **kwargs)
    return [str(i) for i in caught.value.issues]


def test_nesting_is_refused_before_anything_is_built() -> None:
    deep = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    (problem,) = issues(f"{CONNECTORS}x: {deep}\n")
    assert f"nested deeper than {MAX_DEPTH} levels" in problem
    assert "line 3" in problem


def test_alias_expansion_is_counted_per_use() -> None:
    # 50 lists of 50 aliases to a list of 1 000 values: 2.5 million values from a few KB
    text = "base: &b [" + ", ".join(["1"] * 1000) + "]\nmid: &m [" + ", ".join(["*b"] * 50) + "]\n"
    text += "top: [" + ", ".join(["*m"] * 50) + "]\n"
    (problem,) = issues(text)
    assert f"expands to more than {MAX_NODES:,} values" in problem


def test_merge_keys_merge_and_explicit_keys_win() -> None:
    text = (
        "x-defaults: &d {max_in_flight: 100, overflow: drop_newest}\n"
        + CONNECTORS
        + "routes:\n  - <<: *d\n    max_in_flight: 7\n"
        + "    name: r\n    from: {connector: m, topic: 'a/#'}\n    to: {connector: m, topic: 'b/x'}\n"
    )
    config = parse_config(text)
    (route,) = config.routes
    assert route.section.max_in_flight == 7 and route.section.overflow == "drop_newest"


def test_duplicate_keys_still_refused_beside_a_merge() -> None:
    (problem,) = issues("x-a: &a {k: 1}\nm:\n  <<: *a\n  j: 1\n  j: 2\n")
    assert "duplicate key 'j'" in problem


def test_interpolated_values_are_masked_in_every_message(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    secret.write_text("line-one-SECRET\nline-two-SECRET\n")
    text = (
        "connectors:\n  m: {type: memory, max_payload: '${file:s}'}\n"
        "routes:\n  - name: '${NAME}'\n    from: {connector: '${file:s}', topic: 'a/#'}\n"
        "    to: {connector: m, topic: 'b'}\n"
        "  - name: r2\n    from: {connector: m, topic: 'a/#'}\n    to: {connector: '${NAME}', topic: 'b'}\n"
    )
    found = issues(text, base_dir=tmp_path, environ={"NAME": "ENVSECRET"})
    joined = "\n".join(found)
    assert "SECRET" not in joined, joined
    assert "${file:s}" in joined and "${NAME}" in joined, joined


def test_the_type_key_is_not_masked() -> None:
    (problem,) = issues("connectors:\n  m: {type: '${KIND}'}\n", environ={"KIND": "carrier-pigeon"})
    assert "carrier-pigeon" in problem


def test_long_messages_are_cut() -> None:
    name = "n" * 5000
    found = issues(
        CONNECTORS
        + f"routes:\n  - name: r\n    from: {{connector: {name}, topic: a}}\n    to: {{connector: m, topic: b}}\n"
    )
    assert all(len(p) < 600 for p in found), [len(p) for p in found]


def test_bounds_name_the_range() -> None:
    found = issues(CONNECTORS + "routes:\n" + ROUTE + "    retry: {max_time: .inf, attempts: 100000}\n")
    assert any("retry.max_time" in p and "604800" in p for p in found), found
    assert any("retry.attempts" in p and "10000" in p for p in found), found
