"""Key-affine sharding of a route across worker processes (``shard_by``).

Every worker reads the whole stream; the key of a message (rendered from its topic, once per distinct
topic by the dispatcher's plan cache) hashes to one worker, which forwards it. The others acknowledge it
at once and count it as ``sharded``, never as received: summed over the workers, ``received`` is what the
source delivered once. Topics whose key is another worker's get an :class:`Elsewhere` in their plan
(:mod:`gateway.core.dispatch`) instead of the route, so the common path pays nothing per message for sharding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from gateway.routing.templates import Match, Template


def shard_of(key: str, count: int) -> int:
    """The worker (of ``count``) that takes ``key``: a 64-bit BLAKE2b of its UTF-8 bytes, the same in every
    process (Python's own string ``hash`` differs between processes) and well mixed (CRC-32 sends ``d0``..``d3``
    all to one of two workers). Computed once per distinct topic, off the per-message path."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % count


class Shard:
    """This worker's share of a route's keys: rendered from the topic (``keys``), or read from a header
    (``header``: then per message, by :class:`gateway.core.dispatch.ByHeader`)."""

    __slots__ = ("_mine", "count", "header", "index", "keys")

    def __init__(self, index: int, count: int, keys: Sequence[Template] = (), header: str | None = None) -> None:
        self.index = index
        self.count = count
        self.keys = tuple(keys)
        """The key template for each of the route's source patterns."""
        self.header = header
        """The header whose value is the key (``shard_by: header.NAME``), matched without regard to case."""
        self._mine: dict[str, bool] = {}

    def takes_key(self, key: str) -> bool:
        """Whether this worker takes ``key`` (remembered for the 10 000 most recent distinct keys)."""
        mine = self._mine.get(key)
        if mine is None:
            if len(self._mine) >= 10_000:
                self._mine.clear()
            mine = self._mine[key] = shard_of(key, self.count) == self.index
        return mine

    def takes(self, match: Match) -> bool:
        """Whether this worker takes the messages of the topic ``match`` matched (MQTT and NATS sources have
        one pattern, so one key template)."""
        return shard_of(self.keys[0].render(match), self.count) == self.index
