"""Find routes that would publish into their own source: an echo loop melts brokers fastest.

A route whose target is on its source's connector loops when a topic the
target renders is matched by the source pattern again. :func:`echo` builds a
sample topic for the pattern (every wildcard and capture filled in), renders
the target for it and tests the result against the pattern.
"""

from __future__ import annotations

from gateway.errors import TemplateError
from gateway.routing.patterns import SegmentKind, SourcePattern
from gateway.routing.templates import Match, Template

_SAMPLE = "x"


def echo(pattern: SourcePattern, target: Template) -> str | None:
    """A topic the route would publish and then read back, or None if it cannot loop that way."""
    if pattern.regex is not None:
        # A regex has no sample to fill in: only a constant target can be checked.
        if not target.is_constant:
            return None
        rendered = _render(target, Match("", (), {}, ()))
        return rendered if rendered is not None and pattern.regex.fullmatch(rendered) else None
    levels: list[str] = []
    captures: dict[str, str] = {}
    remainder: tuple[str, ...] = ()
    for seg in pattern.segments:
        if seg.kind is SegmentKind.LITERAL:
            levels.append(seg.value)
        elif seg.kind is SegmentKind.SINGLE:
            levels.append(_SAMPLE)
            if seg.value:
                captures[seg.value] = _SAMPLE
        else:
            remainder = (_SAMPLE,)
            levels.append(_SAMPLE)
    syn = pattern.syntax
    topic = syn.separator.join(syn.from_neutral(v) for v in levels)
    rendered = _render(target, Match(topic, tuple(levels), captures, remainder))
    return rendered if rendered is not None and matches(pattern, rendered) else None


def matches(pattern: SourcePattern, topic: str) -> bool:
    """Whether ``pattern`` matches ``topic`` (the source syntax's rules)."""
    if pattern.regex is not None:
        return pattern.regex.fullmatch(topic) is not None
    syn = pattern.syntax
    levels = [syn.to_neutral(v) for v in syn.split(topic)]
    for i, seg in enumerate(pattern.segments):
        if seg.kind is SegmentKind.MULTI:
            # MQTT's `a/#` also matches `a`; NATS's `a.>` needs at least one more token.
            return len(levels) >= i + (0 if syn.multi_matches_parent else 1)
        if i >= len(levels):
            return False
        if seg.kind is SegmentKind.LITERAL and levels[i] != seg.value:
            return False
    return len(levels) == len(pattern.segments)


def _render(target: Template, match: Match) -> str | None:
    try:
        return target.render(match)
    except (TemplateError, KeyError):
        return None
