"""Router micro-benchmark: lookups per second with 10, 1 000 and 100 000 rules (mixed exact and wildcard).

Two figures per size: the trie walk alone (``Router.match``, what a topic seen
for the first time costs) and the dispatcher's cached plan lookup (what every
later message of that topic costs). The claim to check: the cost stays flat as
rules grow, because a lookup walks one trie level per topic level.
"""

from __future__ import annotations

import random
import time
from typing import Any

from gateway.core.dispatch import Dispatcher, Route
from gateway.routing.patterns import MQTT, compile_pattern
from gateway.routing.router import Router


def rules(count: int, rng: random.Random) -> list[str]:
    """Half exact topics, a quarter with a capture (one level), a quarter ending in `#`."""
    out = []
    for i in range(count):
        kind = i % 4
        if kind in (0, 1):
            out.append(f"plant/site{i}/line{i % 7}/telemetry")
        elif kind == 2:
            out.append(f"plant/site{i}/{{device}}/alarm")
        else:
            out.append(f"fleet/truck{i}/#")
    rng.shuffle(out)
    return out


def topics(count: int, n: int, rng: random.Random) -> list[str]:
    """``n`` topics drawn over the rules, with 20 000 device ids: the same diversity for every rule count."""
    out = []
    for _ in range(n):
        i = rng.randrange(count)
        kind = i % 4
        dev = rng.randrange(20_000)
        if kind in (0, 1):
            out.append(f"plant/site{i}/line{i % 7}/telemetry" if dev % 2 else f"plant/site{i}/dev{dev}/status")
        elif kind == 2:
            out.append(f"plant/site{i}/dev{dev}/alarm")
        else:
            out.append(f"fleet/truck{i}/gps/{dev}")
    return out


def _per_lookup(router: Router[int], probe: list[str], lookups: int) -> float:
    """Lookups per second over ``probe``, repeated until ``lookups`` were done."""
    t0 = time.perf_counter()
    done = 0
    while done < lookups:
        for t in probe:
            router.match(t)
        done += len(probe)
    return done / (time.perf_counter() - t0)


def bench(count: int, lookups: int = 200_000, seed: int = 7) -> dict[str, Any]:
    """Trie lookups/s on the same 20 000 topics for every rule count (matching the first rules, with
    20 000 device ids), and on topics spread over all the rules (memory locality then differs)."""
    rng = random.Random(seed)
    router: Router[int] = Router(MQTT)
    patterns = rules(count, rng)
    for i, text in enumerate(patterns):
        router.add(compile_pattern(text, MQTT), i)
    same = topics(10, 20_000, random.Random(seed + 1))
    spread = topics(count, 20_000, random.Random(seed + 2))
    matched = sum(1 for t in same[:2000] if router.match(t))
    trie = _per_lookup(router, same, lookups)
    trie_spread = _per_lookup(router, spread, lookups)
    # The dispatcher's cached path (what every message of an already seen topic costs).
    routes = [Route(f"r{i}", "src", None, [compile_pattern(p, MQTT)]) for i, p in enumerate(patterns)]
    dispatcher = Dispatcher(MQTT, routes, cache_size=len(same))
    for t in same:
        dispatcher.plan(t)
    plans = dispatcher._plans
    t0 = time.perf_counter()
    done = 0
    while done < lookups * 10:
        for t in same:
            plans.get(t)
        done += len(same)
    cached = done / (time.perf_counter() - t0)
    return {
        "rules": count,
        "trie_lookups_s": round(trie),
        "us_per_trie_lookup": round(1e6 / trie, 3),
        "trie_lookups_s_spread": round(trie_spread),
        "cached_lookups_s": round(cached),
        "matched_fraction": round(matched / 2000, 2),
    }


def run() -> list[dict[str, Any]]:
    return [bench(c) for c in (10, 1_000, 100_000)]


if __name__ == "__main__":
    for row in run():
        print(row)
