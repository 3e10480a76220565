"""The Prometheus text format's small pieces, shared by the exposition and the endpoints."""

from __future__ import annotations

from collections.abc import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape(value: str) -> str:
    """A label value as the text format quotes it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def family(name: str, kind: str, doc: str, samples: Sequence[tuple[str, float | int]]) -> str:
    """One metric family: ``samples`` are (``{labels}`` text or "", value)."""
    lines = [f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"]
    lines.extend(f"{name}{labels} {value}\n" for labels, value in samples)
    return "".join(lines)
