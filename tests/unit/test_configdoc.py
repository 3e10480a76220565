"""docs/config.md is generated from the config Structs and must match them."""

from __future__ import annotations

from pathlib import Path

import msgspec

from gateway.config.doc import field_docs, render
from gateway.config.registry import plugins

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_config_reference_is_up_to_date() -> None:
    assert DOC.read_text() == render(), "run: python -m gateway.config.doc > docs/config.md"


def test_every_config_key_is_documented() -> None:
    for kind, plugin in plugins().items():
        for cls in (plugin.config, plugin.source, plugin.target):
            docs = field_docs(cls)
            missing = [f.name for f in msgspec.structs.fields(cls) if f.name != "connector" and not docs.get(f.name)]
            assert not missing, f"{kind}: {cls.__name__} lacks docs for {missing}"
