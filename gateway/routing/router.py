"""The topic trie: which values (routes) does a topic match, and with what captures.

A lookup walks one trie level per topic level, so its cost grows with the
topic's depth and the number of *matching* rules, not with the number of rules
(10 or 100 000 rules route at nearly the same speed). Regex rules (Kafka
``pattern`` sources) cannot live in a trie; they are tried in order after it.
Callers cache results per topic (see :mod:`gateway.core.dispatch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

from gateway.routing.patterns import SegmentKind, SourcePattern, TopicSyntax
from gateway.routing.templates import Match

T = TypeVar("T")


class _Node(Generic[T]):
    __slots__ = ("literal", "multi", "single", "terminal")

    def __init__(self) -> None:
        self.literal: dict[str, _Node[T]] = {}
        self.single: _Node[T] | None = None
        self.multi: list[tuple[int, T, SourcePattern]] = []
        self.terminal: list[tuple[int, T, SourcePattern]] = []


class Router(Generic[T]):
    """Maps topics of one syntax to the values registered under matching patterns."""

    def __init__(self, syntax: TopicSyntax) -> None:
        self.syntax = syntax
        self._root: _Node[T] = _Node()
        self._regex: list[tuple[int, T, SourcePattern]] = []
        self.size = 0

    def add(self, pattern: SourcePattern, value: T) -> None:
        """Register ``value`` under ``pattern``; results come back in registration order."""
        seq = self.size
        self.size += 1
        if pattern.regex is not None:
            self._regex.append((seq, value, pattern))
            return
        node = self._root
        for seg in pattern.segments:
            if seg.kind is SegmentKind.LITERAL:
                nxt = node.literal.get(seg.value)
                if nxt is None:
                    nxt = node.literal[seg.value] = _Node()
                node = nxt
            elif seg.kind is SegmentKind.SINGLE:
                if node.single is None:
                    node.single = _Node()
                node = node.single
            else:
                node.multi.append((seq, value, pattern))
                return
        node.terminal.append((seq, value, pattern))

    def match(self, topic: str) -> list[tuple[T, Match]]:
        """Every (value, match) for ``topic``, in the order the values were first added."""
        syn = self.syntax
        raw = topic.split(syn.separator)
        levels: Sequence[str] = raw if syn.identity else [syn.to_neutral(s) for s in raw]
        found: list[tuple[int, T, SourcePattern]] = []
        depth_max = len(levels)
        protected = syn.dollar_protected and topic.startswith("$")
        stack: list[tuple[_Node[T], int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            wild_ok = not (protected and depth == 0)
            if node.multi and wild_ok and (depth < depth_max or syn.multi_matches_parent):
                found.extend(node.multi)
            if depth == depth_max:
                found.extend(node.terminal)
                continue
            nxt = node.literal.get(levels[depth])
            if nxt is not None:
                stack.append((nxt, depth + 1))
            if node.single is not None and wild_ok:
                stack.append((node.single, depth + 1))
        for entry in self._regex:
            if entry[2].regex.fullmatch(topic) is not None:  # type: ignore[union-attr]
                found.append(entry)
        if len(found) > 1:
            found.sort(key=lambda e: e[0])
        result: list[tuple[T, Match]] = []
        if not found:
            return result
        segments = tuple(levels)
        seen: set[int] = set()
        for _, value, pattern in found:
            if len(found) > 1:
                # A value registered under several patterns (a Kafka `topics` list) counts once,
                # with the captures of the first of its patterns that matches.
                if id(value) in seen:
                    continue
                seen.add(id(value))
            result.append((value, _match(topic, segments, pattern)))
        return result


def _match(topic: str, levels: tuple[str, ...], pattern: SourcePattern) -> Match:
    if pattern.regex is not None:
        m = pattern.regex.fullmatch(topic)
        assert m is not None
        return Match(topic, levels, {k: v for k, v in m.groupdict().items() if v is not None}, ())
    captures: dict[str, str] = {}
    remainder: tuple[str, ...] = ()
    for i, seg in enumerate(pattern.segments):
        if seg.kind is SegmentKind.SINGLE and seg.value:
            captures[seg.value] = levels[i]
        elif seg.kind is SegmentKind.MULTI:
            remainder = levels[i:]
    return Match(topic, levels, captures, remainder)
