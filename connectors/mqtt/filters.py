"""Sets of MQTT topic filters that no topic matches twice.

Routes that share one MQTT session subscribe on one connection, and the
dispatcher sends each message to the routes whose pattern matches its topic.
If two of those filters could match the same topic, a broker may deliver the
message once per matching subscription (MQTT 5, 3.3.4): each copy would then be
dispatched to both routes. A :class:`FilterSet` keeps such filters apart: a
filter that overlaps one already in is refused, and its route keeps a session
of its own.
"""

from __future__ import annotations

from typing import Any

_END = ""
"""Key of the marker that a filter ends at this node (no filter level is empty here: see ``add``)."""


class FilterSet:
    """Filters (``a/+/c``, ``a/#``) of which no two match a common topic."""

    __slots__ = ("_root",)

    def __init__(self) -> None:
        self._root: dict[str, Any] = {}

    def add(self, topic_filter: str) -> bool:
        """Add ``topic_filter`` unless some topic could match it and a filter already in; True if added."""
        levels = topic_filter.split("/")
        if "" in levels or self.overlaps(topic_filter):
            return False  # empty levels ("a//b", "/a") are rare enough to keep out rather than reason about
        node = self._root
        for level in levels:
            node = node.setdefault(level, {})
        node[_END] = True
        return True

    def overlaps(self, topic_filter: str) -> bool:
        """Whether a topic exists that ``topic_filter`` and some filter in the set both match."""
        return bool(self._root) and _overlaps(self._root, topic_filter.split("/"), 0)


def _overlaps(node: dict[str, Any], levels: list[str], i: int) -> bool:
    if "#" in node:
        return True  # a filter in the set ends in '#' here: it matches this level and everything below
    if i == len(levels):
        return _END in node
    level = levels[i]
    if level == "#":
        return True  # the new filter matches every topic below here, and the set has some (nodes are never empty)
    if level == "+":
        return any(_overlaps(child, levels, i + 1) for key, child in node.items() if key != _END)
    for key in (level, "+"):
        child = node.get(key)
        if child is not None and _overlaps(child, levels, i + 1):
            return True
    return False
