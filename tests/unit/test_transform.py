"""Routes that filter (where), validate (schema), convert (codec) and enrich (headers) messages."""

from __future__ import annotations

import re

import msgspec
import pytest

from connectors.memory.broker import MemoryBroker
from gateway.config.loader import parse_config
from gateway.errors import ConfigError
from gateway.routes.transform import Transform
from tests.support.harness import StartGateway, memory_config, until

DLQ = '    dead_letter: {connector: c, topic: "dlq/{device}"}\n'


def route(extra: str) -> str:
    return f"""\
  - name: r
    from: {{connector: a, topic: "in/{{device}}"}}
    to: {{connector: b, topic: "out/{{device}}"}}
{extra}"""


def publish(*payloads: bytes, headers: list[tuple[str, str]] | None = None) -> MemoryBroker:
    a = MemoryBroker.named("A")
    for i, p in enumerate(payloads):
        a.publish(f"in/d{i}", p, headers)
    return a


def delivered() -> list[bytes]:
    return [r.payload for r in MemoryBroker.named("B").received]


async def test_where_delivers_what_matches_and_acknowledges_the_rest(start_gateway: StartGateway) -> None:
    gw = await start_gateway(route("    where: {payload.temp: {gt: 80}}\n"))
    a = publish(b'{"temp": 85}', b'{"temp": 20}', b'{"temp": 81.5}', b'{"other": 1}', b'{"temp": "hot"}')
    r = gw.routes["r"]
    await until(lambda: r.stats.acked + r.stats.filtered == 5)
    assert delivered() == [b'{"temp": 85}', b'{"temp": 81.5}'], "delivered untouched, in order"
    assert (r.stats.acked, r.stats.filtered) == (2, 3)
    assert a.acked == {0, 1, 2, 3, 4}


async def test_where_combines_headers_topic_and_payload(start_gateway: StartGateway) -> None:
    cond = (
        "    where:\n      all:\n        - {header.site: {in: [north, south]}}\n"
        "        - any: [{payload.alarm: {exists: true}}, {topic: in/d1}]\n        - not: {payload.test: true}\n"
    )
    gw = await start_gateway(route(cond))
    a = MemoryBroker.named("A")
    a.publish("in/d0", b'{"alarm": 1}', [("site", "north")])  # yes
    a.publish("in/d1", b"{}", [("Site", "south")])  # yes: topic, header names ignore case
    a.publish("in/d2", b'{"alarm": 1}', [("site", "east")])  # no: site
    a.publish("in/d3", b'{"alarm": 1, "test": true}', [("site", "north")])  # no: a test
    a.publish("in/d4", b"{}", [("site", "north")])  # no: neither alarm nor d1
    r = gw.routes["r"]
    await until(lambda: r.stats.acked + r.stats.filtered == 5)
    assert [rec.topic for rec in MemoryBroker.named("B").received] == ["out/d0", "out/d1"]


async def test_a_payload_that_is_not_json_is_dead_lettered_not_crashed(start_gateway: StartGateway) -> None:
    gw = await start_gateway(route("    where: {payload.temp: {gt: 80}}\n" + DLQ))
    publish(b"\xff not json", b'{"temp": 90}')
    r = gw.routes["r"]
    await until(lambda: r.stats.acked + r.stats.dead_lettered == 2)
    [letter] = MemoryBroker.named("C").received
    headers = dict(letter.headers or [])
    assert headers["x-gateway-error-type"] == "PayloadError" and "not JSON" in headers["x-gateway-error"]
    assert delivered() == [b'{"temp": 90}']


_DEEP_JSON = b"[" * 100_000 + b"]" * 100_000
_DEEP_MSGPACK = b"\x91" * 100_000 + b"\x01"


@pytest.mark.parametrize(
    ("extra", "bad", "reason"),
    [
        ("    where: {payload.temp: {gt: 80}}\n", _DEEP_JSON, "nested too deeply"),
        ("    schema: {fields: {temp: float}}\n", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
        ("    codec: msgpack_to_json\n", _DEEP_MSGPACK, "nested too deeply"),
        ("    codec: msgpack_to_json\n", b"\xd4\x01\x00", "Ext is unsupported"),
    ],
    ids=["deep-json-where", "deep-json-schema", "deep-msgpack", "msgpack-ext"],
)
async def test_hostile_payloads_fail_alone_and_the_route_goes_on(
    start_gateway: StartGateway, extra: str, bad: bytes, reason: str
) -> None:
    gw = await start_gateway(route(extra + DLQ))
    msgpack = "msgpack" in extra
    good = [msgspec.msgpack.encode({"temp": 90 + i}) if msgpack else b'{"temp": %d}' % (90 + i) for i in range(2)]
    a = publish(good[0], bad, good[1])
    r = gw.routes["r"]
    await until(lambda: r.stats.acked + r.stats.dead_lettered == 3)
    assert len(delivered()) == 2, "the messages before and after it are delivered"
    [letter] = MemoryBroker.named("C").received
    headers = dict(letter.headers or [])
    assert headers["x-gateway-error-type"] == "PayloadError" and reason in headers["x-gateway-error"]
    s = r.stats
    assert (s.received, s.acked, s.failed, s.dead_lettered, r.in_flight) == (3, 2, 1, 1, 0)
    assert a.acked == {0, 1, 2}


async def test_schema_passes_valid_payloads_untouched_and_dead_letters_the_rest(start_gateway: StartGateway) -> None:
    schema = '    schema: {fields: {device_id: str, temp: float, note: "str?"}}\n'
    gw = await start_gateway(route(schema + DLQ))
    good = b'{"device_id": "d1", "temp": 21.5,  "extra": [1]}'
    publish(good, b'{"device_id": "d1"}', b'{"device_id": 7, "temp": 1.0}')
    r = gw.routes["r"]
    await until(lambda: r.stats.acked + r.stats.dead_lettered == 3)
    assert delivered() == [good], "byte for byte"
    errors = [dict(rec.headers or [])["x-gateway-error"] for rec in MemoryBroker.named("C").received]
    assert "missing required field `temp`" in errors[0]
    assert "Expected `str`, got `int` - at `$.device_id`" in errors[1]


async def test_codecs_convert_json_and_msgpack_both_ways(start_config: StartGateway) -> None:
    text = memory_config(
        '  - {name: pack, from: {connector: a, topic: "j/{x}"}, to: {connector: b, topic: "m/{x}"}, '
        "codec: json_to_msgpack}\n"
        '  - {name: unpack, from: {connector: a, topic: "m/{x}"}, to: {connector: c, topic: "j/{x}"}, '
        "codec: msgpack_to_json}\n"
    )
    gw = await start_config(text)
    a = MemoryBroker.named("A")
    a.publish("j/1", b'{"a": [1, 2.5, "x"], "b": null}')
    await until(lambda: gw.routes["pack"].stats.acked == 1)
    [packed] = MemoryBroker.named("B").received
    assert msgspec.msgpack.decode(packed.payload) == {"a": [1, 2.5, "x"], "b": None}
    a.publish("m/1", packed.payload)
    await until(lambda: gw.routes["unpack"].stats.acked == 1)
    [back] = MemoryBroker.named("C").received
    assert msgspec.json.decode(back.payload) == {"a": [1, 2.5, "x"], "b": None}


async def test_headers_enrich_every_message(start_gateway: StartGateway) -> None:
    gw = await start_gateway(route("    headers: {x-gateway: edge-1, x-source-topic: '{topic}'}\n"))
    publish(b"raw bytes, never decoded", headers=[("h", "1")])
    await until(lambda: gw.routes["r"].stats.acked == 1)
    [rec] = MemoryBroker.named("B").received
    assert rec.payload == b"raw bytes, never decoded"
    assert rec.headers == [("h", "1"), ("x-gateway", "edge-1"), ("x-source-topic", "in/d0")]


def test_a_plain_route_keeps_the_pass_through_path() -> None:
    config = parse_config(memory_config(route("")), environ={})
    assert Transform.of(config.routes[0].section) is None
    transformed = parse_config(memory_config(route("    headers: {a: b}\n")), environ={})
    tf = Transform.of(transformed.routes[0].section)
    assert tf is not None and not tf.decodes, "headers alone never decode the payload"


@pytest.mark.parametrize(
    ("where", "path", "message"),
    [
        ("{payload.t: {gtt: 1}}", "routes[0].where.payload.t", "unknown operator 'gtt'"),
        ("{all: []}", "routes[0].where.all", "non-empty list"),
        ("{any: [{body.x: 1}]}", "routes[0].where.any[0].body.x", "topic, header.NAME or payload.FIELD"),
        ("{payload.t: {in: 3}}", "routes[0].where.payload.t.in", "expected a list"),
        ("{payload.t: {gt: 1, lt: 2}}", "routes[0].where.payload.t", "one operator per condition"),
    ],
)
def test_bad_conditions_are_config_errors_with_their_path(where: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(memory_config(route(f"    where: {where}\n")), environ={})
    [issue] = info.value.issues
    assert issue.path == path and message in issue.message, issue


async def test_trace_creates_a_traceparent_only_where_none_travels(start_gateway: StartGateway) -> None:
    gw = await start_gateway(route("    trace: true\n"))
    given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    a = MemoryBroker.named("A")
    a.publish("in/d0", b"x")
    a.publish("in/d1", b"y", [("TraceParent", given)])
    await until(lambda: gw.routes["r"].stats.acked == 2)
    first, second = (dict(r.headers or []) for r in MemoryBroker.named("B").received)
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", first["traceparent"])
    assert second == {"TraceParent": given}, "an existing traceparent is carried, not replaced"


async def test_targets_and_headers_read_payload_fields_captures_and_the_gateway(start_config: StartGateway) -> None:
    gw = await start_config(
        memory_config(
            """\
  - name: r
    from: {connector: a, topic: "in/{device}"}
    to: {connector: b, topic: "sites/{payload.site}/{device}"}
    headers: {x-device: "{device}", x-gw: "{gateway}", x-seen: "{received}", x-ms: "{received_ms}",
              x-kind: "{payload.meta.kind}"}
    dead_letter: {connector: c, topic: "dlq/{device}"}
""",
            extra="gateway: {id: edge-7}\n",
        )
    )
    publish(
        b'{"site": "north", "meta": {"kind": "temp"}}',
        b'{"site": 12, "meta": {"kind": true}}',
        b'{"meta": {"kind": "x"}}',  # no site: the topic cannot be rendered
        b'{"site": "a/b", "meta": {"kind": "x"}}',  # not one MQTT level
        b'{"site": "s"}',  # no meta.kind for the header
        b"not json",
    )
    r = gw.routes["r"]
    await until(lambda: r.stats.acked + r.stats.failed == 6)
    got = MemoryBroker.named("B").received
    assert [m.topic for m in got] == ["sites/north/d0", "sites/12/d1"]
    h = dict(got[0].headers or ())
    assert (h["x-device"], h["x-gw"], h["x-kind"]) == ("d0", "edge-7", "temp")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", h["x-seen"]) and h["x-ms"].isdigit()
    assert dict(got[1].headers or ())["x-kind"] == "true"
    dead = MemoryBroker.named("C").received
    assert [m.topic for m in dead] == ["dlq/d2", "dlq/d3", "dlq/d4", "dlq/d5"]
    errors = [dict(m.headers or ())["x-gateway-error"] for m in dead]
    assert "no field 'site'" in errors[0] and "'a/b'" in errors[1]
    assert "no field 'meta.kind'" in errors[2] and "not JSON" in errors[3]
    assert (r.stats.acked, r.stats.dead_lettered) == (2, 4)


def test_payload_templates_decode_only_on_the_routes_that_use_them() -> None:
    plain = parse_config(memory_config(route("    headers: {x: '{device}-{topic}-{gateway}'}\n")), environ={})
    tf = Transform.of(plain.routes[0].section, {"device"})
    assert tf is not None and not tf.decodes, "captures, topic and gateway need no payload"
    reads = parse_config(memory_config(route("    headers: {x: '{payload.id}'}\n")), environ={})
    tf = Transform.of(reads.routes[0].section, {"device"})
    assert tf is not None and tf.decodes


@pytest.mark.parametrize(
    ("extra", "path", "message"),
    [
        ("    headers: {x: '{nope}'}\n", "routes[0].headers.x", "unknown placeholder {nope}"),
        ("    headers: {x: '{payload.}'}\n", "routes[0].headers.x", "unknown placeholder {payload.}"),
        ("    headers: {x: 'a}b'}\n", "routes[0].headers.x", "unbalanced '}'"),
        (
            '    dead_letter: {connector: c, topic: "dlq/{payload.id}"}\n',
            "routes[0].dead_letter",
            "cannot read {payload.FIELD}",
        ),
    ],
)
def test_bad_templates_are_config_errors(extra: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(memory_config(route(extra)), environ={})
    [issue] = info.value.issues
    assert issue.path == path and message in issue.message, issue
