"""gateway/patterns.py: source patterns per syntax, native filters, neutral level names."""

from __future__ import annotations

import re

import pytest

from gateway.errors import TemplateError
from gateway.routing.patterns import (
    KAFKA,
    MQTT,
    NATS,
    Segment,
    SegmentKind,
    TopicSyntax,
    compile_pattern,
    compile_regex,
)

LIT, ONE, ALL = SegmentKind.LITERAL, SegmentKind.SINGLE, SegmentKind.MULTI


# ---------------------------------------------------------------- MQTT


def test_mqtt_captures_become_single_wildcards_in_the_native_filter() -> None:
    p = compile_pattern("devices/{device}/telemetry/#", MQTT)

    assert p.segments == (
        Segment(LIT, "devices"),
        Segment(ONE, "device"),
        Segment(LIT, "telemetry"),
        Segment(ALL),
    )
    assert p.captures == frozenset({"device"})
    assert p.has_remainder
    assert not p.is_exact
    assert p.native_filter() == "devices/+/telemetry/#"


def test_mqtt_anonymous_and_named_wildcards_mix() -> None:
    p = compile_pattern("site/{site}/+/{sensor}/#", MQTT)

    assert p.captures == frozenset({"site", "sensor"})
    assert p.native_filter() == "site/+/+/+/#"
    assert [s.kind for s in p.segments] == [LIT, ONE, ONE, ONE, ALL]
    assert p.segments[2].value == ""  # an anonymous '+' captures nothing


def test_mqtt_exact_topic() -> None:
    p = compile_pattern("plant/line1/temp", MQTT)

    assert p.is_exact
    assert not p.has_remainder
    assert p.captures == frozenset()
    assert p.native_filter() == "plant/line1/temp"


def test_mqtt_empty_levels_are_literal_levels() -> None:
    p = compile_pattern("a//b", MQTT)

    assert p.segments == (Segment(LIT, "a"), Segment(LIT, ""), Segment(LIT, "b"))
    assert p.native_filter() == "a//b"


def test_mqtt_dot_inside_a_level_is_kept_in_neutral_form() -> None:
    p = compile_pattern("fw/v1.2/{device}", MQTT)

    assert p.segments[1] == Segment(LIT, "v1.2")
    assert p.native_filter() == "fw/v1.2/+"


def test_a_lone_multi_level_wildcard() -> None:
    p = compile_pattern("#", MQTT)

    assert p.segments == (Segment(ALL),)
    assert p.native_filter() == "#"


# ---------------------------------------------------------------- NATS


def test_nats_captures_and_full_wildcard() -> None:
    p = compile_pattern("cmd.{device}.>", NATS)

    assert p.captures == frozenset({"device"})
    assert p.has_remainder
    assert p.native_filter() == "cmd.*.>"


def test_nats_token_with_double_slash_is_a_neutral_level_with_a_dot() -> None:
    p = compile_pattern("fw.v1//2.{device}", NATS)

    assert p.segments[1] == Segment(LIT, "v1.2")
    assert p.native_filter() == "fw.v1//2.*"


def test_nats_star_is_an_anonymous_single_wildcard() -> None:
    p = compile_pattern("a.*.c", NATS)

    assert [s.kind for s in p.segments] == [LIT, ONE, LIT]
    assert p.captures == frozenset()
    assert p.native_filter() == "a.*.c"


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "syntax", "message"),
    [
        ("a/#/b", MQTT, "'#' must be the last level"),
        ("a.>.b", NATS, "'>' must be the last level"),
        ("#/a", MQTT, "'#' must be the last level"),
        ("devices/dev-{id}/x", MQTT, "a capture must be a whole level"),
        ("cmd.dev-{id}", NATS, "a capture must be a whole level"),
        ("a/{id}x", MQTT, "a capture must be a whole level"),
        ("a/{1id}", MQTT, "a capture must be a whole level"),
        ("a/{id", MQTT, "a capture must be a whole level"),
        ("a/{id}/b/{id}", MQTT, "capture {id} appears twice"),
        ("a.{id}.{id}", NATS, "capture {id} appears twice"),
        ("a/{topic}", MQTT, "{topic} is reserved"),
        ("a.{topic}", NATS, "{topic} is reserved"),
        ("a/b#", MQTT, "a wildcard must be a whole level"),
        ("a/+b", MQTT, "a wildcard must be a whole level"),
        ("a.b*", NATS, "a wildcard must be a whole level"),
        ("a.b>", NATS, "a wildcard must be a whole level"),
        ("a..b", NATS, "empty tokens"),
        ("", MQTT, "pattern is empty"),
        ("", NATS, "pattern is empty"),
    ],
)
def test_invalid_patterns_are_rejected_with_a_message(text: str, syntax: TopicSyntax, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        compile_pattern(text, syntax)


def test_errors_are_value_errors_not_template_errors() -> None:
    # The config loader turns ValueError into a key-path issue; anything else would be a crash.
    with pytest.raises(ValueError, match="must be the last level") as info:
        compile_pattern("a/#/b", MQTT)
    assert type(info.value) is ValueError


# ---------------------------------------------------------------- neutral conversion


def test_mqtt_level_with_dot_becomes_a_nats_token_with_double_slash() -> None:
    assert MQTT.to_neutral("a.b") == "a.b"
    assert NATS.from_neutral("a.b") == "a//b"


def test_nats_token_with_double_slash_becomes_an_mqtt_level_with_dot() -> None:
    neutral = NATS.to_neutral("a//b")

    assert neutral == "a.b"
    assert MQTT.from_neutral(neutral) == "a.b"


@pytest.mark.parametrize("level", ["a", "a.b", "v1.2.3", "x-y_z", "..", "a.", "ü"])
def test_nats_neutral_round_trip(level: str) -> None:
    assert NATS.to_neutral(NATS.from_neutral(level)) == level


@pytest.mark.parametrize("level", ["a/b", "a+b", "+", "#", "a#", "nul\0"])
def test_mqtt_rejects_levels_it_cannot_carry(level: str) -> None:
    with pytest.raises(TemplateError):
        MQTT.from_neutral(level)


@pytest.mark.parametrize(
    "level", ["", "a b", "tab\tbed", "new\nline", "*", ">", "a*b", "a>", "*a", "bell\x07", "nbsp\u00a0", "\udcff"]
)
def test_nats_rejects_tokens_it_cannot_carry(level: str) -> None:
    with pytest.raises(TemplateError):
        NATS.from_neutral(level)


@pytest.mark.parametrize(("level", "named"), [("a*b", "'a*b'"), ("a>", "'a>'"), ("x y", "'x y'")])
def test_the_refusal_names_the_token(level: str, named: str) -> None:
    with pytest.raises(TemplateError, match=named.replace("*", r"\*")):
        NATS.from_neutral(level)


@pytest.mark.parametrize("level", ["a/b", "a b", "a:b", "a+b", "ü", "", "a#b"])
def test_kafka_rejects_characters_outside_its_alphabet(level: str) -> None:
    with pytest.raises(TemplateError):
        KAFKA.from_neutral(level)


@pytest.mark.parametrize("level", ["orders", "a.b", "A-Z_0-9"])
def test_kafka_accepts_its_alphabet(level: str) -> None:
    assert KAFKA.from_neutral(level) == level


def test_mqtt_accepts_characters_other_protocols_forbid() -> None:
    assert MQTT.from_neutral("a b:c*>") == "a b:c*>"


@pytest.mark.parametrize(
    ("syntax", "name"),
    [
        (MQTT, ""),
        (NATS, ""),
        (KAFKA, ""),
        (KAFKA, "."),
        (KAFKA, ".."),
        (KAFKA, "a" * 250),
        (KAFKA, "a/b"),
        (MQTT, "x" * 65536),
    ],
)
def test_check_name_rejects_names_a_broker_refuses(syntax: TopicSyntax, name: str) -> None:
    with pytest.raises(TemplateError):
        syntax.check_name(name)


@pytest.mark.parametrize(("syntax", "name"), [(KAFKA, "a" * 249), (KAFKA, "a.b-c_d"), (MQTT, "x" * 65535)])
def test_check_name_accepts_names_at_the_limit(syntax: TopicSyntax, name: str) -> None:
    syntax.check_name(name)
    assert syntax.split(name) == name.split(syntax.separator)


# ---------------------------------------------------------------- Kafka


def test_kafka_exact_topic_is_exact() -> None:
    p = compile_pattern("orders", KAFKA)

    assert p.is_exact
    assert p.segments == (Segment(LIT, "orders"),)


def test_kafka_topic_with_captures_between_dots() -> None:
    p = compile_pattern("telemetry.{device}", KAFKA)

    assert p.captures == frozenset({"device"})
    assert not p.is_exact
    rx = re.compile(p.native_regex())
    assert rx.fullmatch("telemetry.d1")
    assert rx.fullmatch("telemetry.d-1_x")
    assert not rx.fullmatch("telemetry.d1.extra")
    assert not rx.fullmatch("telemetry.")
    assert not rx.fullmatch("telemetryXd1")  # the dot is literal, not "any character"


def test_kafka_native_regex_escapes_literal_parts() -> None:
    p = compile_pattern("a-b.{x}.c", KAFKA)

    rx = re.compile(p.native_regex())
    assert rx.fullmatch("a-b.1.c")
    assert not rx.fullmatch("a-bX1.c")


@pytest.mark.parametrize("text", ["or#ders", "a..b", "a b", "a/b", "a+b", "a.{x}.b c"])
def test_kafka_rejects_illegal_topic_parts(text: str) -> None:
    with pytest.raises(ValueError, match="not a legal Kafka topic name part"):
        compile_pattern(text, KAFKA)


def test_kafka_has_no_wildcards() -> None:
    assert KAFKA.single is None
    assert KAFKA.multi is None
    with pytest.raises(ValueError, match="Kafka"):
        compile_pattern("a.#", KAFKA)


def test_kafka_regex_named_groups_are_captures() -> None:
    p = compile_regex(r"orders-(?P<region>[a-z]+)-(?P<shard>\d+)", KAFKA)

    assert p.regex is not None
    assert p.captures == frozenset({"region", "shard"})
    assert not p.is_exact
    assert not p.has_remainder
    assert p.native_regex() == r"orders-(?P<region>[a-z]+)-(?P<shard>\d+)"
    assert p.native_filter() == p.native_regex()


def test_kafka_regex_without_groups_has_no_captures() -> None:
    assert compile_regex(r"orders\..*", KAFKA).captures == frozenset()


def test_kafka_invalid_regex_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="invalid regular expression"):
        compile_regex("orders-(", KAFKA)


# ---------------------------------------------------------------- syntaxes


def test_syntax_flags() -> None:
    assert MQTT.multi_matches_parent
    assert MQTT.dollar_protected
    assert not NATS.multi_matches_parent
    assert not NATS.dollar_protected
    assert (MQTT.separator, NATS.separator, KAFKA.separator) == ("/", ".", ".")
    assert repr(NATS) == "TopicSyntax('nats')"
