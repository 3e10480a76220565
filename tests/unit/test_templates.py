"""gateway/templates.py: target templates compiled against a source pattern, rendered per topic."""

from __future__ import annotations

import re

import pytest

from gateway.errors import TemplateError
from gateway.routing.patterns import KAFKA, MQTT, NATS, SourcePattern, TopicSyntax, compile_pattern, compile_regex
from gateway.routing.router import Router
from gateway.routing.templates import Match, Template, compile_template

TELEMETRY = compile_pattern("devices/{device}/telemetry/#", MQTT)
COMMANDS = compile_pattern("cmd.{device}.>", NATS)


def match(pattern: SourcePattern, topic: str) -> Match:
    """What ``pattern`` matches in ``topic``, as the router computes it."""
    router: Router[str] = Router(pattern.syntax)
    router.add(pattern, "r")
    found = router.match(topic)
    assert len(found) == 1, f"{pattern.text!r} does not match {topic!r}"
    return found[0][1]


def render(text: str, source: SourcePattern, target: TopicSyntax | None, topic: str) -> str:
    return compile_template(text, source, target).render(match(source, topic))


def is_valid_nats_subject(subject: str) -> bool:
    tokens = subject.split(".")
    return all(t and not any(c.isspace() for c in t) and t not in ("*", ">") for t in tokens)


def is_valid_mqtt_topic_name(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic and "\0" not in topic


# ---------------------------------------------------------------- placeholders


def test_named_capture_is_substituted() -> None:
    assert render("telemetry.{device}", TELEMETRY, KAFKA, "devices/d1/telemetry/temp") == "telemetry.d1"


def test_remainder_is_rejoined_with_the_target_separator() -> None:
    assert render("iot.{device}.telemetry.{#}", TELEMETRY, NATS, "devices/d1/telemetry/a/b/c") == (
        "iot.d1.telemetry.a.b.c"
    )


def test_nats_remainder_placeholder_is_rejoined_with_slashes_for_mqtt() -> None:
    assert render("devices/{device}/cmd/{>}", COMMANDS, MQTT, "cmd.d1.reboot.now") == "devices/d1/cmd/reboot/now"


def test_hash_and_gt_remainder_placeholders_are_interchangeable() -> None:
    topic = "devices/d1/telemetry/a/b"
    assert render("x.{#}", TELEMETRY, NATS, topic) == render("x.{>}", TELEMETRY, NATS, topic) == "x.a.b"


def test_remainder_levels_are_converted_one_by_one() -> None:
    # MQTT level "v1.2" is one NATS token "v1//2"; NATS token "a//b" is one MQTT level "a.b".
    assert render("x.{#}", TELEMETRY, NATS, "devices/d1/telemetry/v1.2/x") == "x.v1//2.x"
    assert render("devices/{device}/cmd/{>}", COMMANDS, MQTT, "cmd.d1.a//b.c") == "devices/d1/cmd/a.b/c"


def test_capture_with_a_dot_becomes_a_nats_token_with_double_slash() -> None:
    assert render("iot.{device}", TELEMETRY, NATS, "devices/d.1/telemetry/t") == "iot.d//1"


def test_nats_capture_with_double_slash_becomes_an_mqtt_level_with_a_dot() -> None:
    assert render("devices/{device}/cmd", COMMANDS, MQTT, "cmd.d//1.x") == "devices/d.1/cmd"


def test_topic_placeholder_converts_the_whole_source_topic() -> None:
    assert render("{topic}", TELEMETRY, NATS, "devices/d1/telemetry/temp") == "devices.d1.telemetry.temp"
    assert render("archive/{topic}", COMMANDS, MQTT, "cmd.d1.go") == "archive/cmd/d1/go"
    assert render("raw.{topic}", TELEMETRY, KAFKA, "devices/d1/telemetry/temp") == "raw.devices.d1.telemetry.temp"


def test_double_braces_are_literal_braces() -> None:
    tpl = compile_template("{{device}}-{device}}}", TELEMETRY, None)

    assert tpl.render(match(TELEMETRY, "devices/d1/telemetry/x")) == "{device}-d1}"


def test_constant_template() -> None:
    tpl = compile_template("events.orders", COMMANDS, NATS)

    assert tpl.is_constant
    assert tpl.render(match(COMMANDS, "cmd.d1.x")) == "events.orders"


def test_template_with_placeholders_is_not_constant() -> None:
    assert not compile_template("x.{device}", TELEMETRY, NATS).is_constant
    assert not compile_template("x.{topic}", TELEMETRY, NATS).is_constant


def test_regex_named_groups_render() -> None:
    source = compile_regex(r"orders-(?P<region>[a-z]+)", KAFKA)

    assert render("orders/{region}", source, MQTT, "orders-eu") == "orders/eu"


def test_template_is_compiled_once_and_rendered_for_many_topics() -> None:
    tpl = compile_template("t.{device}", TELEMETRY, KAFKA)

    assert isinstance(tpl, Template)
    assert [tpl.render(match(TELEMETRY, f"devices/d{i}/telemetry/x")) for i in range(3)] == ["t.d0", "t.d1", "t.d2"]


# ---------------------------------------------------------------- compile errors


def test_unknown_capture_names_the_known_captures() -> None:
    source = compile_pattern("site/{site}/{device}/#", MQTT)

    with pytest.raises(ValueError, match=re.escape("{dev} is not a capture")) as info:
        compile_template("x.{dev}", source, NATS)
    message = str(info.value)
    assert "'site/{site}/{device}/#'" in message
    assert "captures: {device}, {site}" in message


def test_unknown_capture_when_the_source_has_none() -> None:
    with pytest.raises(ValueError, match=re.escape("(captures: none)")):
        compile_template("x.{device}", compile_pattern("a/b", MQTT), NATS)


@pytest.mark.parametrize("placeholder", ["{#}", "{>}"])
def test_remainder_without_multi_level_source_wildcard_is_rejected(placeholder: str) -> None:
    with pytest.raises(ValueError, match="needs a multi-level wildcard"):
        compile_template(f"x.{placeholder}", compile_pattern("devices/{device}/+", MQTT), NATS)


def test_remainder_from_a_regex_source_is_rejected() -> None:
    with pytest.raises(ValueError, match="needs a multi-level wildcard"):
        compile_template("x.{#}", compile_regex("orders-.*", KAFKA), NATS)


@pytest.mark.parametrize("text", ["x.{device", "x.device}", "{", "}"])
def test_unbalanced_braces_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="unbalanced"):
        compile_template(text, TELEMETRY, NATS)


@pytest.mark.parametrize(
    ("text", "target", "message"),
    [
        ("orders archive", KAFKA, "not a legal Kafka topic name"),
        ("a" * 250, KAFKA, "not a legal Kafka topic name"),
        ("..", KAFKA, "not a legal Kafka topic name"),
        ("", NATS, "empty nats name"),
        ("", MQTT, "empty mqtt name"),
    ],
)
def test_constant_template_illegal_on_the_target_is_rejected_at_compile_time(
    text: str, target: TopicSyntax, message: str
) -> None:
    with pytest.raises(ValueError, match=message) as info:
        compile_template(text, TELEMETRY, target)
    assert type(info.value) is ValueError  # the loader reports ValueError as a config issue


@pytest.mark.parametrize(
    ("text", "target"),
    [
        pytest.param("alerts/#", MQTT, id="mqtt-multi-wildcard"),
        pytest.param("alerts/+/x", MQTT, id="mqtt-single-wildcard"),
        pytest.param("events.>", NATS, id="nats-full-wildcard"),
        pytest.param("events.*", NATS, id="nats-token-wildcard"),
        pytest.param("events..orders", NATS, id="nats-empty-token"),
        pytest.param("events orders", NATS, id="nats-whitespace"),
        pytest.param("events.a*b", NATS, id="nats-wildcard-inside-a-token"),
        pytest.param("events.a>", NATS, id="nats-full-wildcard-inside-a-token"),
    ],
)
def test_constant_wildcard_or_malformed_target_is_rejected_at_compile_time(text: str, target: TopicSyntax) -> None:
    with pytest.raises(ValueError, match=r"."):  # any message: the point is that it is refused
        compile_template(text, TELEMETRY, target)


# ---------------------------------------------------------------- render errors


@pytest.mark.parametrize(
    ("text", "target", "topic"),
    [
        ("iot.{device}", NATS, "devices/d 1/telemetry/x"),  # whitespace in a NATS token
        ("iot.{device}", NATS, "devices//telemetry/x"),  # empty NATS token
        ("iot.{device}", NATS, "devices/*/telemetry/x"),  # a NATS wildcard as a token
        ("iot.{#}", NATS, "devices/d1/telemetry/a//b"),  # empty level inside the remainder
        ("iot.{device}", NATS, "devices/a*b/telemetry/x"),  # README: a wildcard in a NATS token is rejected
        ("iot.{device}", NATS, "devices/a>/telemetry/x"),
        ("iot.{#}", NATS, "devices/d1/telemetry/x/a>"),
        ("{topic}", NATS, "devices/d1/telemetry/a*"),
        ("iot.{device}", NATS, "devices/d\x01/telemetry/x"),  # a control character
        ("t.{device}", KAFKA, "devices/d:1/telemetry/x"),  # ':' is not in Kafka's alphabet
        ("t.{device}", KAFKA, "devices/" + "d" * 250 + "/telemetry/x"),  # longer than 249
    ],
)
def test_rendering_a_value_illegal_on_the_target_raises_template_error(
    text: str, target: TopicSyntax, topic: str
) -> None:
    tpl = compile_template(text, TELEMETRY, target)

    with pytest.raises(TemplateError):
        tpl.render(match(TELEMETRY, topic))


@pytest.mark.parametrize(("topic", "token"), [("devices/a*b/telemetry/x", "a*b"), ("devices/d/telemetry/q/a>", "a>")])
def test_a_nats_wildcard_inside_a_level_fails_naming_the_token(topic: str, token: str) -> None:
    tpl = compile_template("iot.{device}.{#}", TELEMETRY, NATS)

    with pytest.raises(TemplateError) as info:
        tpl.render(match(TELEMETRY, topic))
    assert repr(token) in str(info.value)


@pytest.mark.parametrize("topic", ["cmd.a/b.x", "cmd.a+b.x", "cmd.#.x"])
def test_rendering_nats_tokens_illegal_in_mqtt_raises_template_error(topic: str) -> None:
    tpl = compile_template("devices/{device}/cmd", COMMANDS, MQTT)

    with pytest.raises(TemplateError):
        tpl.render(match(COMMANDS, topic))


def test_empty_remainder_never_renders_an_illegal_nats_subject() -> None:
    # MQTT `devices/{device}/telemetry/#` also matches `devices/d1/telemetry` (the parent level).
    tpl = compile_template("iot.{device}.telemetry.{#}", TELEMETRY, NATS)
    try:
        subject = tpl.render(match(TELEMETRY, "devices/d1/telemetry"))
    except TemplateError:
        return  # refusing the message is acceptable
    assert is_valid_nats_subject(subject), subject  # currently 'iot.d1.telemetry.'


def test_rendered_mqtt_topic_never_contains_wildcards() -> None:
    tpl = compile_template("alerts/+/{device}", TELEMETRY, MQTT)
    try:
        topic = tpl.render(match(TELEMETRY, "devices/d1/telemetry/x"))
    except TemplateError:
        return
    assert is_valid_mqtt_topic_name(topic), topic  # currently 'alerts/+/d1'


# ---------------------------------------------------------------- Kafka keys (no target syntax)


def test_key_template_renders_raw_capture_values() -> None:
    # A key is not a topic name: characters Kafka topics forbid are fine in it.
    assert render("{device}", TELEMETRY, None, "devices/d:1 x/telemetry/t") == "d:1 x"


def test_key_template_remainder_keeps_the_source_separator() -> None:
    assert render("{device}|{#}", TELEMETRY, None, "devices/d1/telemetry/a/b") == "d1|a/b"
    assert render("{>}", COMMANDS, None, "cmd.d1.a.b") == "a.b"


def test_key_template_topic_is_the_raw_source_topic() -> None:
    assert render("{topic}", COMMANDS, None, "cmd.d//1.go") == "cmd.d//1.go"
    assert render("{topic}", TELEMETRY, None, "devices/d.1/telemetry/t") == "devices/d.1/telemetry/t"


def test_key_template_with_an_unknown_capture_is_rejected() -> None:
    with pytest.raises(ValueError, match=re.escape("{id} is not a capture")):
        compile_template("{id}", TELEMETRY, None)


def test_key_template_accepts_any_constant() -> None:
    tpl = compile_template("fixed key/with #", TELEMETRY, None)

    assert tpl.is_constant
    assert tpl.render(match(TELEMETRY, "devices/d1/telemetry/x")) == "fixed key/with #"
