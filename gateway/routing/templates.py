"""Target templates: ``telemetry.{device}``, ``iot.{device}.telemetry.{#}``, ``{topic}``.

A template is compiled once at load time against its route's source pattern
(unknown captures are config errors) and rendered once per distinct source
topic: the dispatcher caches the result, so rendering is off the per-message
path.

Placeholders:

- ``{name}``: a named capture of the source pattern, converted to the target's syntax;
- ``{#}`` / ``{>}``: the levels matched by the source's multi-level wildcard,
  each converted and re-joined with the target's separator;
- ``{topic}``: the whole source topic, converted to the target's syntax;
- ``{payload.FIELD[.FIELD...]}``: a field of the (JSON) payload, read per message: the route decodes
  the payload once, and a message without the field (or not JSON) fails like any unrenderable name;
- ``{{`` / ``}}``: literal braces.

Header values (a route's ``headers:``) are templates of the same language, with ``{gateway}``,
``{received}`` and ``{received_ms}`` besides (:func:`compile_header`); both are parsed by one
function, :func:`parse`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from gateway.errors import TemplateError
from gateway.routing.patterns import SourcePattern, TopicSyntax

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


@dataclass(frozen=True, slots=True)
class Match:
    """What a source pattern matched in one topic; values are neutral level names."""

    topic: str
    segments: tuple[str, ...]
    captures: dict[str, str]
    remainder: tuple[str, ...]


LIT, CAPTURE, REST, TOPIC, PAYLOAD, GATEWAY, RECEIVED, RECEIVED_MS = range(8)
"""Kinds of the parts of a compiled template: (kind, value) pairs."""
Parts = tuple[tuple[int, str], ...]
_NO_DOC = object()


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled template. ``syntax`` is the target's; ``None`` renders plain text (Kafka keys)."""

    text: str
    parts: tuple[tuple[int, str], ...]
    syntax: TopicSyntax | None
    source_separator: str

    @property
    def is_constant(self) -> bool:
        return all(kind == LIT for kind, _ in self.parts)

    @property
    def reads_payload(self) -> bool:
        """Rendered per message (``{payload.FIELD}``), not once per topic."""
        return any(kind == PAYLOAD for kind, _ in self.parts)

    def render(self, match: Match, doc: Any = _NO_DOC) -> str:
        """Render for one matched topic (and decoded payload ``doc``, when the template reads it);
        raises TemplateError when the target cannot carry a value."""
        syn = self.syntax
        out: list[str] = []
        for kind, value in self.parts:
            if kind == LIT:
                out.append(value)
            elif kind == PAYLOAD:
                v = payload_field(doc, value)
                out.append(syn.from_neutral(v) if syn else v)
            elif kind == CAPTURE:
                v = match.captures[value]
                out.append(syn.from_neutral(v) if syn else v)
            elif kind == REST:
                if match.remainder:
                    out.append(self._join(match.remainder))
                elif out and syn is not None and out[-1].endswith(syn.separator):
                    # MQTT `a/#` also matches `a`: `x.{#}` renders `x`, not `x.` with an empty token.
                    out[-1] = out[-1][: -len(syn.separator)]
            else:
                out.append(self._join(match.segments) if syn else match.topic)
        text = "".join(out)
        if syn is not None:
            syn.check_name(text)
        return text

    def _join(self, levels: tuple[str, ...]) -> str:
        syn = self.syntax
        if syn is None:
            return self.source_separator.join(levels)
        return syn.separator.join(syn.from_neutral(v) for v in levels)


def payload_field(doc: Any, path: str) -> str:
    """The scalar at ``path`` (``a.b``) of a decoded payload, as text; TemplateError when absent."""
    for key in path.split("."):
        if not isinstance(doc, dict) or key not in doc:
            raise TemplateError(f"the payload has no field {path!r}")
        doc = doc[key]
    if isinstance(doc, bool):
        return "true" if doc else "false"
    if isinstance(doc, str | int | float):
        return str(doc)
    raise TemplateError(f"payload field {path!r} is not a string, number or boolean")


def parse(text: str, resolve: Callable[[str], tuple[int, str]]) -> Parts:
    """``text`` as literal runs and placeholders; ``resolve`` turns a placeholder's name into its part or
    raises ValueError saying what it may be instead."""
    parts: list[tuple[int, str]] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        if m.start() > pos:
            parts.append((LIT, text[pos : m.start()]))
        pos = m.end()
        token, name = m.group(0), m.group(1)
        if token in ("{{", "}}"):
            parts.append((LIT, token[0]))
        elif name is None:
            raise ValueError(f"unbalanced {token!r} (write {token}{token} for a literal brace)")
        elif name.startswith("payload.") and all(name.split(".")[1:]):
            parts.append((PAYLOAD, name[len("payload.") :]))
        else:
            parts.append(resolve(name))
    if pos < len(text):
        parts.append((LIT, text[pos:]))
    merged: list[tuple[int, str]] = []
    for kind, value in parts:
        if kind == LIT and merged and merged[-1][0] == LIT:
            merged[-1] = (LIT, merged[-1][1] + value)
        else:
            merged.append((kind, value))
    return tuple(merged)


def compile_template(text: str, source: SourcePattern, target: TopicSyntax | None) -> Template:
    """Compile ``text`` for a route whose source is ``source``; raises ValueError on a bad template."""
    captures = source.captures

    def resolve(name: str) -> tuple[int, str]:
        if name in ("#", ">"):
            if not source.has_remainder:
                raise ValueError(f"{{{name}}} needs a multi-level wildcard at the end of the source pattern")
            return REST, ""
        if name == "topic":
            return TOPIC, ""
        if name in captures:
            return CAPTURE, name
        known = ", ".join(sorted(f"{{{c}}}" for c in captures)) or "none"
        raise ValueError(
            f"{{{name}}} is not a capture of the source pattern {source.text!r} (captures: {known}); "
            "{topic} and {payload.FIELD} work too"
        )

    tpl = Template(text, parse(text, resolve), target, source.syntax.separator)
    if tpl.is_constant and target is not None:
        try:
            target.check_name(text)
        except Exception as exc:
            raise ValueError(str(exc)) from None
    return tpl


_HEADER_NAMES = {"topic": TOPIC, "gateway": GATEWAY, "received": RECEIVED, "received_ms": RECEIVED_MS}


def compile_header(text: str, captures: Iterable[str] = ()) -> tuple[Parts, bool]:
    """A header value template, and whether it reads the payload; ValueError on a bad placeholder.

    ``{topic}``, ``{gateway}`` (the gateway id), ``{received}`` (receive time, RFC 3339 UTC),
    ``{received_ms}`` (Unix milliseconds), ``{payload.FIELD}``, a capture of the source pattern.
    """
    known = set(captures)

    def resolve(name: str) -> tuple[int, str]:
        if name in _HEADER_NAMES:
            return _HEADER_NAMES[name], ""
        if name in known:
            return CAPTURE, name
        names = ", ".join(f"{{{n}}}" for n in [*_HEADER_NAMES, *sorted(known), "payload.FIELD"])
        raise ValueError(f"unknown placeholder {{{name}}} (one of: {names})")

    parts = parse(text, resolve)
    return parts, any(kind == PAYLOAD for kind, _ in parts)
