"""Hostile input bounded: max_payload (route, source and target connectors), header floods, echo loops."""

from __future__ import annotations

import pytest

from connectors.memory.broker import MemoryBroker
from gateway.config.loader import parse_config
from gateway.errors import ConfigError
from tests.support.harness import StartGateway, until

DLQ = '    dead_letter: {connector: c, topic: "dlq/{device}"}\n'


def route(extra: str = "", *, to: str = '{connector: b, topic: "out/{device}"}') -> str:
    return f"""\
  - name: r
    from: {{connector: a, topic: "in/{{device}}"}}
    to: {to}
{extra}"""


def letter_headers(broker: str = "C") -> list[dict[str, str]]:
    return [dict(r.headers or []) for r in MemoryBroker.named(broker).received]


async def test_route_max_payload_dead_letters_what_is_larger_and_passes_the_rest(start_gateway: StartGateway) -> None:
    gw = await start_gateway(route("    max_payload: 10\n" + DLQ))
    a = MemoryBroker.named("A")
    a.publish("in/d1", b"x" * 10)
    a.publish("in/d2", b"x" * 11)
    r = gw.routes["r"]
    await until(lambda: r.stats.acked + r.stats.dead_lettered == 2)
    assert [rec.payload for rec in MemoryBroker.named("B").received] == [b"x" * 10], "the large one is never sent"
    [headers] = letter_headers()
    assert headers["x-gateway-error-type"] == "PayloadTooLarge"
    assert "exceeds route 'r' max_payload limit of 10 bytes" in headers["x-gateway-error"]
    assert (r.stats.sent, r.stats.failed, r.stats.dead_lettered) == (1, 1, 1)
    assert a.acked == {0, 1}, "both are acknowledged: one delivered, one dead-lettered"


async def test_without_a_dead_letter_an_oversized_message_is_counted_failed(start_gateway: StartGateway) -> None:
    gw = await start_gateway(route("    max_payload: 4\n"))
    MemoryBroker.named("A").publish("in/d1", b"12345")
    r = gw.routes["r"]
    await until(lambda: r.stats.failed == 1)
    assert MemoryBroker.named("B").received == []
    assert r.stats.sent == 0


async def test_target_connector_limit_fails_only_that_target(start_config: StartGateway) -> None:
    gw = await start_config(
        """\
connectors:
  a: {type: memory, broker: A}
  b: {type: memory, broker: B, max_payload: 8}
  c: {type: memory, broker: C}
routes:
  - name: r
    from: {connector: a, topic: "in/{device}"}
    to:
      - {connector: b, topic: "out/{device}"}
      - {connector: c, topic: "copy/{device}"}
"""
    )
    MemoryBroker.named("A").publish("in/d1", b"123456789")
    r = gw.routes["r"]
    await until(lambda: r.stats.failed == 1)
    assert MemoryBroker.named("B").received == []
    assert [rec.topic for rec in MemoryBroker.named("C").received] == ["copy/d1"]


async def test_source_connector_limit_applies_to_what_is_read(start_config: StartGateway) -> None:
    gw = await start_config(
        """\
connectors:
  a: {type: memory, broker: A, max_payload: 3}
  b: {type: memory, broker: B}
routes:
  - name: r
    from: {connector: a, topic: "in/{device}"}
    to: {connector: b, topic: "out/{device}"}
    max_payload: 100
"""
    )
    a = MemoryBroker.named("A")
    a.publish("in/d1", b"1234")
    a.publish("in/d1", b"123")
    r = gw.routes["r"]
    await until(lambda: r.stats.failed + r.stats.acked == 2)
    assert [rec.payload for rec in MemoryBroker.named("B").received] == [b"123"]
    assert r.stats.failed == 1


async def test_a_header_flood_is_dead_lettered(start_gateway: StartGateway) -> None:
    gw = await start_gateway(route(DLQ))
    a = MemoryBroker.named("A")
    a.publish("in/d1", b"ok", [("h", "v")] * 64)
    a.publish("in/d2", b"flood", [("h", "v")] * 65)
    a.publish("in/d3", b"fat", [("h", "v" * 16_384)])
    r = gw.routes["r"]
    await until(lambda: r.stats.acked + r.stats.dead_lettered == 3)
    assert [rec.payload for rec in MemoryBroker.named("B").received] == [b"ok"]
    assert [h["x-gateway-error-type"] for h in letter_headers()] == ["HeadersTooLarge", "HeadersTooLarge"]
    assert "65 headers" in letter_headers()[0]["x-gateway-error"]


def loop_issues(routes: str, connectors: str = "  a: {type: memory, broker: A}\n  b: {type: memory, broker: B}\n"):
    with pytest.raises(ConfigError) as info:
        parse_config(f"connectors:\n{connectors}routes:\n{routes}", environ={})
    return info.value.issues


def test_a_route_into_its_own_source_pattern_is_rejected() -> None:
    [issue] = loop_issues(route(to='{connector: a, topic: "in/{device}"}'))
    assert issue.path == "routes[0].to.topic"
    assert "'in/x'" in issue.message and "echo loop" in issue.message and "allow_loop" in issue.message


@pytest.mark.parametrize(
    "to",
    [
        '{connector: a, topic: "{topic}"}',
        '{connector: a, topic: "in/fixed"}',
        '[{connector: b, topic: "out/{device}"}, {connector: a, topic: "in/{device}"}]',
    ],
)
def test_echo_loops_are_found_in_every_shape(to: str) -> None:
    [issue] = loop_issues(route(to=to))
    assert "echo loop" in issue.message


def test_a_dead_letter_into_the_source_is_a_loop_too() -> None:
    [issue] = loop_issues(route('    dead_letter: {connector: a, topic: "in/dead"}\n'))
    assert issue.path == "routes[0].dead_letter.topic"


@pytest.mark.parametrize(
    "to",
    [
        '{connector: a, topic: "out/{device}"}',  # same connector, another subtree
        '{connector: b, topic: "in/{device}"}',  # same topic, another connector
        '{connector: a, topic: "in/{device}/more"}',  # one level deeper than `in/+`
    ],
)
def test_routes_that_cannot_loop_are_accepted(to: str) -> None:
    parse_config(f"connectors:\n  a: {{type: memory}}\n  b: {{type: memory}}\nroutes:\n{route(to=to)}", environ={})


def test_allow_loop_accepts_an_intended_loop() -> None:
    text = "connectors:\n  a: {type: memory}\nroutes:\n" + route(
        "    allow_loop: true\n", to='{connector: a, topic: "in/{device}"}'
    )
    parse_config(text, environ={})


@pytest.mark.parametrize(
    ("connector", "source", "target", "loops"),
    [
        ("{type: mqtt}", '{connector: x, topic: "sensors/#"}', '{connector: x, topic: "sensors/alerts"}', True),
        ("{type: mqtt}", '{connector: x, topic: "sensors/#"}', '{connector: x, topic: "alerts/{#}"}', False),
        ("{type: nats}", '{connector: x, subject: "iot.>"}', '{connector: x, subject: "iot.copy.{>}"}', True),
        ("{type: nats}", '{connector: x, subject: "iot.*"}', '{connector: x, subject: "iot.a.b"}', False),
        (
            "{type: kafka, bootstrap_servers: [k:9092]}",
            '{connector: x, pattern: "raw\\\\..*"}',
            "{connector: x, topic: raw.copy}",
            True,
        ),
        (
            "{type: kafka, bootstrap_servers: [k:9092]}",
            '{connector: x, topic: "raw.{id}"}',
            '{connector: x, topic: "clean.{id}"}',
            False,
        ),
    ],
)
def test_loops_per_protocol(connector: str, source: str, target: str, loops: bool) -> None:
    text = f"connectors:\n  x: {connector}\nroutes:\n  - name: r\n    from: {source}\n    to: {target}\n"
    if loops:
        with pytest.raises(ConfigError, match="echo loop"):
            parse_config(text, environ={})
    else:
        parse_config(text, environ={})


async def test_a_flood_is_dead_lettered_without_its_headers(start_gateway: StartGateway) -> None:
    gw = await start_gateway(route(DLQ))
    MemoryBroker.named("A").publish("in/d1", b"flood", [("h", "v")] * 100)
    await until(lambda: gw.routes["r"].stats.dead_lettered == 1)
    [letter] = MemoryBroker.named("C").received
    assert letter.headers is not None
    assert all(k.startswith("x-gateway-") for k, _ in letter.headers), "the flood is not forwarded again"


async def test_a_dead_letter_connector_limit_applies_too(start_config: StartGateway) -> None:
    gw = await start_config(
        """\
connectors:
  a: {type: memory, broker: A}
  b: {type: memory, broker: B, max_payload: 4}
  c: {type: memory, broker: C, max_payload: 4}
routes:
  - name: r
    from: {connector: a, topic: "in/{device}"}
    to: {connector: b, topic: "out/{device}"}
    dead_letter: {connector: c, topic: "dlq/{device}"}
"""
    )
    a = MemoryBroker.named("A")
    a.publish("in/d1", b"12345")
    r = gw.routes["r"]
    await until(lambda: r.stats.failed == 1)
    assert MemoryBroker.named("B").received == [] and MemoryBroker.named("C").received == []
    assert r.stats.dead_lettered == 0
    assert a.acked == {0}, "on_error: drop (the default) acknowledges what neither target nor dead letter took"
