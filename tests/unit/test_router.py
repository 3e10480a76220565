"""gateway/router.py: the topic trie (MQTT and NATS semantics, captures, order, regex rules)."""

from __future__ import annotations

import random

import pytest

from gateway.routing.patterns import (
    KAFKA,
    MQTT,
    NATS,
    Segment,
    SegmentKind,
    SourcePattern,
    TopicSyntax,
    compile_pattern,
    compile_regex,
)
from gateway.routing.router import Router


def router_of(syntax: TopicSyntax, *patterns: str) -> Router[str]:
    """A router whose values are the pattern texts."""
    router: Router[str] = Router(syntax)
    for text in patterns:
        router.add(compile_pattern(text, syntax), text)
    return router


def matched(router: Router[str], topic: str) -> list[str]:
    return [value for value, _ in router.match(topic)]


# ---------------------------------------------------------------- MQTT semantics


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a/#", "a", True),  # '#' includes the parent level
        ("a/#", "a/b", True),
        ("a/#", "a/b/c", True),
        ("a/#", "ab", False),
        ("a/#", "b/a", False),
        ("#", "a/b/c", True),
        ("+/#", "a", True),
        ("a/+", "a", False),  # '+' needs a level to match
        ("a/+", "a/b", True),
        ("a/+", "a/", True),  # ... an empty level is a level
        ("a/+", "a/b/c", False),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a//c", True),
        ("+/+", "/x", True),
        ("+", "a", True),
        ("+", "a/b", False),
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
        ("a/b", "a", False),
        ("a//b", "a//b", True),
        ("a//b", "a/b", False),
        ("a/b.c", "a/b.c", True),
        ("a/b.c", "a/b/c", False),
    ],
)
def test_mqtt_filter_semantics(pattern: str, topic: str, expected: bool) -> None:
    assert bool(matched(router_of(MQTT, pattern), topic)) is expected


@pytest.mark.parametrize("pattern", ["#", "+/#", "+/monitor/#", "+/+"])
def test_mqtt_leading_wildcards_do_not_match_dollar_topics(pattern: str) -> None:
    router = router_of(MQTT, pattern)

    assert matched(router, "$SYS/monitor") == []
    assert matched(router, "$share/x") == []


@pytest.mark.parametrize("pattern", ["$SYS/#", "$SYS/+", "$SYS/monitor"])
def test_mqtt_dollar_topics_match_filters_that_spell_the_dollar_level(pattern: str) -> None:
    assert matched(router_of(MQTT, pattern), "$SYS/monitor") == [pattern]


def test_mqtt_wildcards_below_a_dollar_level_work() -> None:
    assert matched(router_of(MQTT, "$SYS/+/x", "$SYS/#"), "$SYS/a/x") == ["$SYS/+/x", "$SYS/#"]


def test_mqtt_dollar_inside_a_topic_is_not_protected() -> None:
    assert matched(router_of(MQTT, "#", "a/+"), "a/$x") == ["#", "a/+"]


# ---------------------------------------------------------------- NATS semantics


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a.>", "a", False),  # unlike MQTT '#', '>' needs at least one token
        ("a.>", "a.b", True),
        ("a.>", "a.b.c", True),
        (">", "a", True),
        (">", "a.b", True),
        ("a.*", "a", False),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("*.b", "a.b", True),
        ("a.b", "a.b", True),
        ("a.b", "a.b.c", False),
        ("a.x//y", "a.x//y", True),
        ("a.x//y", "a.x.y", False),
    ],
)
def test_nats_subject_semantics(pattern: str, topic: str, expected: bool) -> None:
    assert bool(matched(router_of(NATS, pattern), topic)) is expected


def test_nats_has_no_dollar_protection() -> None:
    assert matched(router_of(NATS, ">", "*.x"), "$JS.x") == [">", "*.x"]


# ---------------------------------------------------------------- several routes, captures, order


def test_several_routes_come_back_in_insertion_order_with_their_captures() -> None:
    patterns = [
        "devices/{device}/telemetry/#",
        "devices/+/+/temp",
        "#",
        "devices/d1/telemetry/temp",
        "{kind}/{id}/{what}/{name}",
        "devices/{device}/telemetry/temp/#",
    ]
    router = router_of(MQTT, *patterns)

    found = router.match("devices/d1/telemetry/temp")

    assert [v for v, _ in found] == patterns
    m = {v: match for v, match in found}
    assert m["devices/{device}/telemetry/#"].captures == {"device": "d1"}
    assert m["devices/{device}/telemetry/#"].remainder == ("temp",)
    assert m["devices/+/+/temp"].captures == {}
    assert m["#"].remainder == ("devices", "d1", "telemetry", "temp")
    assert m["{kind}/{id}/{what}/{name}"].captures == {
        "kind": "devices",
        "id": "d1",
        "what": "telemetry",
        "name": "temp",
    }
    assert m["devices/{device}/telemetry/temp/#"].remainder == ()
    for _, match in found:
        assert match.topic == "devices/d1/telemetry/temp"
        assert match.segments == ("devices", "d1", "telemetry", "temp")


def test_insertion_order_holds_whatever_the_order_the_trie_finds_them() -> None:
    forward = ["a/b/c", "a/+/c", "+/b/c", "a/#", "#", "+/+/+"]
    for order in (forward, forward[::-1]):
        assert matched(router_of(MQTT, *order), "a/b/c") == order


def test_captures_are_neutral_level_names() -> None:
    router = router_of(NATS, "fw.{version}.>")

    [(_, m)] = router.match("fw.v1//2.a//b.c")

    assert m.captures == {"version": "v1.2"}
    assert m.remainder == ("a.b", "c")
    assert m.segments == ("fw", "v1.2", "a.b", "c")


def test_a_value_under_several_exact_patterns_matches_once() -> None:
    # A Kafka `topics: [orders, orders.eu, orders.us]` route registers one value three times.
    router: Router[object] = Router(KAFKA)
    route, other = object(), object()
    for topic in ("orders", "orders.eu", "orders.us"):
        router.add(compile_pattern(topic, KAFKA), route)
    router.add(compile_pattern("orders.eu", KAFKA), other)

    assert [v for v, _ in router.match("orders.eu")] == [route, other]
    assert [v for v, _ in router.match("orders.us")] == [route]
    assert [v for v, _ in router.match("orders")] == [route]
    assert router.match("orders.asia") == []


def test_a_value_under_several_matching_patterns_takes_the_captures_of_the_first_listed() -> None:
    # Kafka `topics: ["c.{x}", "{x}.eu"]`: both have {x}, so a template using it is valid for both;
    # topic "c.eu" matches both. The first-listed pattern should decide: x = "eu".
    router: Router[str] = Router(KAFKA)
    router.add(compile_pattern("c.{x}", KAFKA), "r")
    router.add(compile_pattern("{x}.eu", KAFKA), "r")

    [(value, m)] = router.match("c.eu")

    assert value == "r"
    assert m.captures == {"x": "eu"}  # currently {"x": "c"}


def test_no_match_is_an_empty_list() -> None:
    assert router_of(MQTT, "a/b", "c/#").match("x/y") == []
    assert Router(NATS).match("a.b") == []


def test_kafka_capture_between_dots() -> None:
    router = router_of(KAFKA, "telemetry.{device}")

    [(_, m)] = router.match("telemetry.d-1")

    assert m.captures == {"device": "d-1"}
    assert router.match("telemetry.d1.x") == []
    assert router.match("telemetry") == []


# ---------------------------------------------------------------- regex rules


def test_regex_rules_match_the_whole_topic_and_capture_named_groups() -> None:
    router: Router[str] = Router(KAFKA)
    router.add(compile_regex(r"orders-(?P<region>[a-z]+)", KAFKA), "rx")

    [(value, m)] = router.match("orders-eu")

    assert value == "rx"
    assert m.captures == {"region": "eu"}
    assert m.remainder == ()
    assert router.match("orders-eu-1") == []  # fullmatch, not search
    assert router.match("xorders-eu") == []


def test_regex_optional_groups_that_did_not_participate_are_not_captures() -> None:
    router: Router[str] = Router(KAFKA)
    router.add(compile_regex(r"orders(-(?P<region>[a-z]+))?", KAFKA), "rx")

    [(_, m)] = router.match("orders")

    assert m.captures == {}


def test_regex_and_trie_rules_are_merged_in_insertion_order() -> None:
    router: Router[str] = Router(KAFKA)
    router.add(compile_regex(r"orders.*", KAFKA), "first-regex")
    router.add(compile_pattern("orders.eu", KAFKA), "then-exact")
    router.add(compile_regex(r".*\.eu", KAFKA), "last-regex")

    assert matched(router, "orders.eu") == ["first-regex", "then-exact", "last-regex"]
    assert matched(router, "orders") == ["first-regex"]


def test_a_value_under_an_exact_topic_and_a_regex_matches_once() -> None:
    router: Router[str] = Router(KAFKA)
    router.add(compile_pattern("orders", KAFKA), "r")
    router.add(compile_regex(r"ord.*", KAFKA), "r")

    assert matched(router, "orders") == ["r"]


def test_size_counts_every_registration() -> None:
    router = router_of(MQTT, "a", "b/#")
    router.add(compile_regex("x", KAFKA), "x")

    assert router.size == 3


# ---------------------------------------------------------------- scale


def test_one_exact_rule_among_100_000_returns_the_right_single_route() -> None:
    router: Router[int] = Router(MQTT)
    fleet = Segment(SegmentKind.LITERAL, "fleet")
    sites = [Segment(SegmentKind.LITERAL, f"site{s}") for s in range(100)]
    for i in range(100_000):
        text = f"fleet/site{i % 100}/dev{i}"
        router.add(SourcePattern(text, MQTT, (fleet, sites[i % 100], Segment(SegmentKind.LITERAL, f"dev{i}"))), i)
    # The hand-built segments are what the compiler makes:
    assert compile_pattern("fleet/site7/dev4507", MQTT).segments == (
        fleet,
        sites[7],
        Segment(SegmentKind.LITERAL, "dev4507"),
    )

    [(value, m)] = router.match("fleet/site7/dev4507")

    assert value == 4507
    assert m.topic == "fleet/site7/dev4507"
    assert router.match("fleet/site7/dev4508") == []  # 4508 lives under site8
    assert [v for v, _ in router.match("fleet/site99/dev99999")] == [99_999]
    assert router.size == 100_000


# ---------------------------------------------------------------- property: trie == naive matcher


def naive_match(
    syntax: TopicSyntax, pattern: SourcePattern, topic: str
) -> tuple[dict[str, str], tuple[str, ...]] | None:
    """MQTT / NATS matching written the obvious way: (captures, remainder) or None."""
    levels = [syntax.to_neutral(s) for s in syntax.split(topic)]
    segs = pattern.segments
    captures: dict[str, str] = {}
    if syntax.dollar_protected and topic.startswith("$") and segs[0].kind is not SegmentKind.LITERAL:
        return None
    for i, seg in enumerate(segs):
        if seg.kind is SegmentKind.MULTI:
            rest = tuple(levels[i:])
            if rest or (syntax.multi_matches_parent and len(levels) == i):
                return captures, rest
            return None
        if i >= len(levels):
            return None
        if seg.kind is SegmentKind.LITERAL and seg.value != levels[i]:
            return None
        if seg.kind is SegmentKind.SINGLE and seg.value:
            captures[seg.value] = levels[i]
    if len(levels) != len(segs):
        return None
    return captures, ()


def random_pattern(rng: random.Random, syntax: TopicSyntax, words: list[str], n: int) -> str:
    depth = rng.randint(1, 4)
    parts: list[str] = []
    for i in range(depth):
        roll = rng.random()
        if i == depth - 1 and roll < 0.2:
            parts.append(syntax.multi or "")
        elif roll < 0.35:
            parts.append(syntax.single or "")
        elif roll < 0.5:
            parts.append(f"{{c{n}_{i}}}")
        else:
            parts.append(rng.choice(words))
    return syntax.separator.join(parts)


@pytest.mark.parametrize(
    ("syntax", "words"),
    [
        (MQTT, ["a", "b", "c", "", "x.y", "$SYS"]),
        (NATS, ["a", "b", "c", "x//y", "$JS"]),
    ],
    ids=["mqtt", "nats"],
)
def test_trie_agrees_with_a_naive_matcher(syntax: TopicSyntax, words: list[str]) -> None:
    rng = random.Random(20240601)
    for _ in range(60):
        patterns: list[SourcePattern] = []
        for n in range(rng.randint(1, 25)):
            text = random_pattern(rng, syntax, words, n)
            try:
                patterns.append(compile_pattern(text, syntax))
            except ValueError:
                continue  # e.g. an empty MQTT pattern level is fine, an empty NATS token is not
        router: Router[int] = Router(syntax)
        for i, p in enumerate(patterns):
            router.add(p, i)
        for _ in range(40):
            topic = syntax.separator.join(rng.choice(words) for _ in range(rng.randint(1, 5)))
            expected = []
            for i, p in enumerate(patterns):
                result = naive_match(syntax, p, topic)
                if result is not None:
                    expected.append((i, result))
            actual = [(v, (m.captures, m.remainder)) for v, m in router.match(topic)]
            assert actual == expected, (topic, [p.text for p in patterns])
