"""Topic syntaxes and the source-pattern compiler.

This is the one place where broker topic syntax lives in the core. A source
pattern such as ``devices/{device}/telemetry/#`` (MQTT) or ``cmd.{device}.>``
(NATS) compiles into :class:`SourcePattern`: a tuple of segments the router's
trie understands, the names of its captures, and the native filter the
connector subscribes with (``devices/+/telemetry/#``).

Segments cross protocols in a *neutral* form, a level name that may hold any
character. Each syntax converts its own segments to and from that form, after
nats-server's own MQTT mapping: an MQTT level ``a.b`` is the NATS token
``a//b``; the separators ``/`` and ``.`` convert into each other. A character a
target cannot carry is rejected (:class:`TemplateError`), never silently
rewritten into another topic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from gateway.errors import TemplateError
from gateway.routing.headers import MQTT_UNSAFE

_CAPTURE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_KAFKA_LEGAL = re.compile(r"[A-Za-z0-9._-]+\Z")
"""Used with ``match``: end of text, not ``$`` (which also matches before a final newline)."""


class SegmentKind(Enum):
    LITERAL = 0
    SINGLE = 1
    MULTI = 2


@dataclass(frozen=True, slots=True)
class Segment:
    kind: SegmentKind
    value: str = ""
    """The literal text (neutral form) or, for a named single wildcard, the capture name."""


class TopicSyntax:
    """How one protocol spells hierarchical names.

    ``single`` / ``multi`` are the native wildcards (``None`` when the protocol
    has none, as for Kafka). ``multi_matches_parent``: MQTT's ``a/#`` also
    matches ``a``; NATS's ``a.>`` does not.
    """

    __slots__ = ("dollar_protected", "identity", "multi", "multi_matches_parent", "name", "separator", "single")

    def __init__(
        self,
        name: str,
        separator: str,
        single: str | None,
        multi: str | None,
        *,
        multi_matches_parent: bool = False,
        dollar_protected: bool = False,
    ) -> None:
        self.name = name
        self.separator = separator
        self.single = single
        self.multi = multi
        self.multi_matches_parent = multi_matches_parent
        self.dollar_protected = dollar_protected
        self.identity = type(self).to_neutral is TopicSyntax.to_neutral
        """Segments are already neutral (no conversion needed when splitting a topic)."""

    def __repr__(self) -> str:
        return f"TopicSyntax({self.name!r})"

    def split(self, topic: str) -> list[str]:
        return topic.split(self.separator)

    def to_neutral(self, segment: str) -> str:
        """A segment of this syntax as a neutral level name."""
        return segment

    def from_neutral(self, segment: str) -> str:
        """A neutral level name as a segment of this syntax; raises TemplateError if it cannot be one."""
        return segment

    def check_name(self, name: str) -> None:
        """Raise TemplateError if ``name`` cannot be published to on this protocol."""
        if not name:
            raise TemplateError(f"empty {self.name} name")


class _MqttSyntax(TopicSyntax):
    def from_neutral(self, segment: str) -> str:
        if "/" in segment or "+" in segment or "#" in segment or MQTT_UNSAFE.search(segment) is not None:
            raise TemplateError(
                f"{segment[:200]!r} cannot be an MQTT topic level ('/', '+', '#', control characters and "
                "text that is not UTF-8 are not allowed)"
            )
        return segment

    def check_name(self, name: str) -> None:
        super().check_name(name)
        if "+" in name or "#" in name or "\0" in name:
            raise TemplateError(
                f"{name[:200]!r} cannot be published to: '+', '#' and NUL are not allowed in MQTT topic names"
            )
        if MQTT_UNSAFE.search(name) is not None:
            raise TemplateError(f"{name[:200]!r} cannot be published to: control characters or text that is not UTF-8")
        if len(name.encode()) > 65535:
            raise TemplateError("MQTT topic longer than 65535 bytes")


_NATS_TOKEN_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f*>\ud800-\udfff]")
"""What a NATS subject token made from another protocol's name may not hold: whitespace (it ends the subject
on the wire), control characters, the wildcards ``*`` and ``>`` anywhere in it (README: rejected, never
rewritten), and lone surrogates (not UTF-8)."""


def _nats_token_problem(token: str) -> str | None:
    if not token:
        return "an empty token"
    bad = _NATS_TOKEN_UNSAFE.search(token)
    if bad is None:
        return None
    c = bad.group()
    what = "the wildcard" if c in "*>" else "whitespace" if c.isspace() else "the character"
    return f"{what} {c!r} in the token {token[:100]!r}"


class _NatsSyntax(TopicSyntax):
    def to_neutral(self, segment: str) -> str:
        return segment.replace("//", ".")

    def check_name(self, name: str) -> None:
        super().check_name(name)
        for token in name.split("."):
            if _nats_token_problem(token) is not None:
                raise TemplateError(
                    f"{name[:200]!r} cannot be published to: NATS subjects have no empty, wildcard or whitespace tokens"
                )

    def from_neutral(self, segment: str) -> str:
        if (problem := _nats_token_problem(segment)) is not None:
            raise TemplateError(f"{segment[:200]!r} cannot be a NATS subject token: {problem}")
        return segment.replace(".", "//")


class _KafkaSyntax(TopicSyntax):
    def from_neutral(self, segment: str) -> str:
        if not _KAFKA_LEGAL.match(segment):
            raise TemplateError(f"{segment!r} cannot be part of a Kafka topic (allowed: A-Z a-z 0-9 . _ -)")
        return segment

    def check_name(self, name: str) -> None:
        super().check_name(name)
        if len(name) > 249 or name in (".", "..") or not _KAFKA_LEGAL.match(name):
            raise TemplateError(f"{name!r} is not a legal Kafka topic name")


MQTT = _MqttSyntax("mqtt", "/", "+", "#", multi_matches_parent=True, dollar_protected=True)
NATS = _NatsSyntax("nats", ".", "*", ">")
KAFKA = _KafkaSyntax("kafka", ".", None, None)
"""Kafka names are flat; ``.`` is only the conventional separator used to join and split."""


@dataclass(frozen=True, slots=True)
class SourcePattern:
    """A compiled source pattern: segments for the trie, or a regex for Kafka ``pattern`` sources."""

    text: str
    syntax: TopicSyntax
    segments: tuple[Segment, ...] = ()
    regex: re.Pattern[str] | None = None

    @property
    def captures(self) -> frozenset[str]:
        if self.regex is not None:
            return frozenset(self.regex.groupindex)
        return frozenset(s.value for s in self.segments if s.kind is SegmentKind.SINGLE and s.value)

    @property
    def has_remainder(self) -> bool:
        return bool(self.segments) and self.segments[-1].kind is SegmentKind.MULTI

    @property
    def is_exact(self) -> bool:
        return self.regex is None and all(s.kind is SegmentKind.LITERAL for s in self.segments)

    def native_filter(self) -> str:
        """The filter to subscribe with on the broker: captures become the native single wildcard."""
        if self.regex is not None:
            return self.regex.pattern
        syn = self.syntax
        parts: list[str] = []
        for seg in self.segments:
            if seg.kind is SegmentKind.LITERAL:
                parts.append(syn.from_neutral(seg.value))
            elif seg.kind is SegmentKind.SINGLE:
                parts.append(syn.single or "")
            else:
                parts.append(syn.multi or "")
        return syn.separator.join(parts)

    def native_regex(self) -> str:
        """For syntaxes without wildcards (Kafka): a regex that matches the same names."""
        if self.regex is not None:
            return self.regex.pattern
        sep = re.escape(self.syntax.separator)
        parts: list[str] = []
        for seg in self.segments:
            if seg.kind is SegmentKind.LITERAL:
                parts.append(re.escape(self.syntax.from_neutral(seg.value)))
            elif seg.kind is SegmentKind.SINGLE:
                parts.append(f"[^{sep}]+")
            else:
                parts.append(".+")
        return sep.join(parts)


def compile_pattern(text: str, syntax: TopicSyntax) -> SourcePattern:
    """Compile a source pattern; raises ValueError with a user-facing message."""
    if not text:
        raise ValueError("pattern is empty")
    segments: list[Segment] = []
    names: set[str] = set()
    raw = syntax.split(text)
    for i, part in enumerate(raw):
        if m := _CAPTURE.match(part):
            name = m.group(1)
            if name in names:
                raise ValueError(f"capture {{{name}}} appears twice")
            if name in ("topic",):
                raise ValueError(f"{{{name}}} is reserved; choose another capture name")
            names.add(name)
            segments.append(Segment(SegmentKind.SINGLE, name))
        elif syntax.single is not None and part == syntax.single:
            segments.append(Segment(SegmentKind.SINGLE))
        elif syntax.multi is not None and part == syntax.multi:
            if i != len(raw) - 1:
                raise ValueError(f"{syntax.multi!r} must be the last level of the pattern")
            segments.append(Segment(SegmentKind.MULTI))
        elif "{" in part or "}" in part:
            raise ValueError(f"{part!r}: a capture must be a whole level, like {{name}}")
        elif (syntax.single and syntax.single in part) or (syntax.multi and syntax.multi in part):
            raise ValueError(f"{part!r}: a wildcard must be a whole level")
        else:
            if syntax is NATS and not part:
                raise ValueError("NATS subjects cannot have empty tokens")
            segments.append(Segment(SegmentKind.LITERAL, syntax.to_neutral(part)))
    if syntax is KAFKA and any(s.kind is SegmentKind.LITERAL for s in segments):
        for s in segments:
            if s.kind is SegmentKind.LITERAL and not _KAFKA_LEGAL.match(s.value):
                raise ValueError(f"{s.value!r} is not a legal Kafka topic name part")
    return SourcePattern(text, syntax, tuple(segments))


def compile_regex(text: str, syntax: TopicSyntax) -> SourcePattern:
    """A regex source (Kafka ``pattern``); named groups become captures."""
    try:
        rx = re.compile(text)
    except re.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None
    return SourcePattern(text, syntax, regex=rx)
