"""Durations written as people write them: ``"500ms"``, ``"2s"``, ``"1.5m"``, ``"1h"``, ``"1d"``, ``"1m30s"``.

Every key that holds a time (typed ``Seconds``, ``SecondsOrZero``, ``Millis``, ``MillisOrZero``, or a
``Meta(extra=IN_SECONDS/IN_MILLIS)`` of its own range) takes a plain number of its unit, as before, or a
string with units converted to that unit at load; its range applies after the conversion.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec.inspect as mi
import pytest

from connectors.kafka.config import KafkaSource
from connectors.nats.config import NatsSource
from gateway.app import Gateway
from gateway.cli import main
from gateway.config import Config, parse_config
from gateway.config.model import FileSection, RouteSection
from gateway.config.registry import plugins
from gateway.util.bounds import MAX_SECONDS, duration_unit, read_duration
from tests.support.harness import issues_of, memory_config, only_issue


def config(*, seconds: Any = None, millis: Any = None, extra_route: str = "", extra_kafka: str = "") -> str:
    """A config with a seconds key (``routes[0].stuck_after``) and a ms key (``connectors.k.request_timeout_ms``)."""
    text = "connectors:\n  m: {type: memory}\n"
    text += f"  k: {{type: kafka, bootstrap_servers: ['127.0.0.1:9092']{extra_kafka}"
    text += f", request_timeout_ms: {millis}}}\n" if millis is not None else "}\n"
    text += "routes:\n  - name: r\n    from: {connector: m, topic: 'a/#'}\n    to: {connector: m, topic: 'b/x'}\n"
    if seconds is not None:
        text += f"    stuck_after: {seconds}\n"
    return text + extra_route


def seconds_of(cfg: Config) -> float | None:
    return cfg.routes[0].section.stuck_after


def millis_of(cfg: Config) -> int:
    value: int = cfg.connectors["k"].request_timeout_ms
    return value


SECONDS_KEY = "routes[0].stuck_after"
MILLIS_KEY = "connectors.k.request_timeout_ms"

# written -> (in seconds, in milliseconds)
UNITS = {
    "'500ms'": (0.5, 500),
    "'2s'": (2.0, 2000),
    "'1.5m'": (90.0, 90_000),
    "'1h'": (3600.0, 3_600_000),
    "'1d'": (86_400.0, 86_400_000),
    "'1m30s'": (90.0, 90_000),
    "'1h2m3s4ms'": (3723.004, 3_723_004),
    "'0.1s'": (0.1, 100),  # exact: not 100.00000000000001 ms
    "'7d'": (float(MAX_SECONDS), MAX_SECONDS * 1000),  # the upper bound itself is in range
    "30": (30.0, 30),  # a plain number, as before
    "'30'": (30.0, 30),  # a number as text, as a ${ENV} gives it
    "2.5": (2.5, None),  # not a whole number of ms: see test_a_fraction_of_an_int_unit_is_refused
}


@pytest.mark.parametrize("written", list(UNITS))
def test_each_unit_on_a_seconds_key_and_a_millis_key(written: str) -> None:
    in_seconds, in_millis = UNITS[written]
    assert seconds_of(parse_config(config(seconds=written), environ={})) == in_seconds
    if in_millis is not None:
        cfg = parse_config(config(millis=written), environ={})
        assert millis_of(cfg) == in_millis and type(millis_of(cfg)) is int


def test_every_kind_of_duration_key_takes_units() -> None:
    text = """\
gateway:
  shutdown_timeout: 1m
  reconnect: {initial: 100ms, max: 1m30s}
  http: {header_timeout: 2s}
connectors:
  m: {type: memory}
  mq: {type: mqtt, keepalive: 1m, session_expiry: 1d, connect_timeout: 2.5s}
  bus: {type: nats, ping_interval: 20s, flush_timeout: 500ms, connect_timeout: 1s, publish_timeout: 3s}
  k: {type: kafka, bootstrap_servers: ['127.0.0.1:9092'], session_timeout_ms: 10s, heartbeat_interval_ms: 1s,
      linger_ms: 5ms, fetch_max_wait_ms: 0ms, commit_interval_ms: 0.2s, request_timeout_ms: 1m}
routes:
  - name: r
    from: {connector: bus, stream: S, subject: "a.>", ack_wait: 1m}
    to: {connector: m, topic: b}
    slow_consumer_deadline: 0s
    stuck_after: 90s
    retry: {initial: 200ms, max: 10s, max_time: 1h}
  - name: q
    from: {connector: k, topic: t, session_timeout_ms: 6s}
    to: {connector: m, topic: c}
  - name: ask
    from: {connector: bus, subject: "ask.>"}
    to: {connector: mq, topic: answer}
    request: {timeout: 1.5s}
"""
    cfg = parse_config(text, environ={})
    gw, mq, bus, k = cfg.gateway, cfg.connectors["mq"], cfg.connectors["bus"], cfg.connectors["k"]
    assert (gw.shutdown_timeout, gw.reconnect.initial, gw.reconnect.max, gw.http.header_timeout) == (60, 0.1, 90, 2)
    assert (mq.keepalive, mq.session_expiry, mq.connect_timeout) == (60, 86_400, 2.5)
    assert type(mq.keepalive) is int and type(mq.session_expiry) is int
    assert (bus.ping_interval, bus.flush_timeout, bus.connect_timeout, bus.publish_timeout) == (20, 0.5, 1, 3)
    assert (k.session_timeout_ms, k.heartbeat_interval_ms, k.linger_ms) == (10_000, 1000, 5)
    assert (k.fetch_max_wait_ms, k.commit_interval_ms, k.request_timeout_ms) == (0, 200, 60_000)
    r, q, ask = (route.section for route in cfg.routes[:3])
    stream, topic = cfg.routes[0].source, cfg.routes[1].source
    assert isinstance(stream, NatsSource) and isinstance(topic, KafkaSource)
    assert (stream.ack_wait, r.slow_consumer_deadline, r.stuck_after) == (60, 0, 90)
    assert (r.retry.initial, r.retry.max, r.retry.max_time) == (0.2, 10, 3600)
    assert topic.session_timeout_ms == 6000
    assert ask.request is not None and ask.request.timeout == 1.5
    assert q.name == "q"


# ---------------------------------------------------------------- what is refused, and how it is said

BAD = ["'5 minutes'", "'2x'", "'-1s'", "''", "'1.5.s'", "'30s1m'", "'1m1m'", "'2 s'", "'.5s'", "'1e3s'", "'s'"]


@pytest.mark.parametrize("written", BAD)
def test_a_bad_form_is_refused_with_the_accepted_forms(written: str) -> None:
    text = written.strip("'")
    seconds = only_issue(config(seconds=written), environ={})
    assert seconds.path == SECONDS_KEY
    assert seconds.message == (
        "expected float (seconds) or a duration with units (ms, s, m, h, d) such as "
        f"'500ms', '2s', '1.5m', '1h', '1d', '1m30s', got {text!r}"
    )
    millis = only_issue(config(millis=written), environ={})
    assert millis.path == MILLIS_KEY
    assert millis.message.startswith("expected int (milliseconds) or a duration with units (ms, s, m, h, d)")
    assert millis.message.endswith(f"got {text!r}")


def test_a_number_too_long_to_be_a_duration_is_refused() -> None:
    issue = only_issue(config(seconds="'" + "9" * 400 + "s'"), environ={})
    assert issue.path == SECONDS_KEY and issue.message.startswith("expected float (seconds) or a duration")


@pytest.mark.parametrize(
    ("key", "written", "message"),
    [
        (MILLIS_KEY, "'1.5ms'", "'1.5ms' is 1.5 ms: not a whole number of milliseconds"),
        (MILLIS_KEY, "'0.0001s'", "'0.0001s' is 0.1 ms: not a whole number of milliseconds"),
        ("connectors.mq.keepalive", "'500ms'", "'500ms' is 0.5 s: not a whole number of seconds"),
        ("connectors.mq.keepalive", "'1.5s'", "'1.5s' is 1.5 s: not a whole number of seconds"),
    ],
)
def test_a_fraction_of_an_int_unit_is_refused(key: str, written: str, message: str) -> None:
    extra = f"  mq: {{type: mqtt, keepalive: {written}}}\n" if "keepalive" in key else ""
    text = config(millis=written if key == MILLIS_KEY else None).replace("routes:\n", extra + "routes:\n")
    issue = only_issue(text, environ={})
    assert (issue.path, issue.message) == (key, message)


def test_a_plain_fraction_on_a_millis_key_is_refused_as_before() -> None:
    issue = only_issue(config(millis="2.5"), environ={})
    assert (issue.path, issue.message) == (MILLIS_KEY, "expected int, got float")


@pytest.mark.parametrize(
    ("key", "written", "message"),
    [
        (SECONDS_KEY, "'8d'", "'8d' (691200 s) is out of range: expected float <= 604800.0"),
        (SECONDS_KEY, "'0s'", "'0s' (0 s) is out of range: expected float > 0.0"),
        (SECONDS_KEY, "'0ms'", "'0ms' (0 s) is out of range: expected float > 0.0"),
        (MILLIS_KEY, "'0s'", "'0s' (0 ms) is out of range: expected int >= 1"),
        (MILLIS_KEY, "'169h'", "'169h' (608400000 ms) is out of range: expected int <= 604800000"),
        ("connectors.k.linger_ms", "'16m'", "'16m' (960000 ms) is out of range: expected int <= 900000"),
        ("connectors.mq.keepalive", "'19h'", "'19h' (68400 s) is out of range: expected int <= 65535"),
        ("gateway.http.header_timeout", "'100ms'", "'100ms' (0.1 s) is out of range: expected float >= 0.5"),
        (SECONDS_KEY, "'99999999999999999999d'", "(8.64e+24 s) is out of range: expected float <= 604800.0"),
    ],
)
def test_the_range_applies_after_conversion(key: str, written: str, message: str) -> None:
    text = config(seconds=written if key == SECONDS_KEY else None, millis=written if key == MILLIS_KEY else None)
    if key == "connectors.k.linger_ms":
        text = config(extra_kafka=f", linger_ms: {written}")
    elif key == "connectors.mq.keepalive":
        text = config().replace("routes:\n", f"  mq: {{type: mqtt, keepalive: {written}}}\nroutes:\n")
    elif key.startswith("gateway."):
        text = f"gateway: {{http: {{header_timeout: {written}}}}}\n" + config()
    issue = only_issue(text, environ={})
    assert issue.path == key and issue.message.endswith(message), issue


def test_several_bad_durations_are_each_reported() -> None:
    text = config(seconds="'2x'", millis="'1.5ms'", extra_route="    retry: {initial: 8d, max_time: soon}\n")
    assert [i.path for i in issues_of(text)] == [
        MILLIS_KEY,
        SECONDS_KEY,
        "routes[0].retry.initial",
        "routes[0].retry.max_time",
    ]


# ---------------------------------------------------------------- ${ENV}: substituted first, then read


def test_environment_values_are_substituted_then_read() -> None:
    cfg = parse_config(config(seconds="'${S:-500ms}'", millis="'${MS}'"), environ={"MS": "1m"})
    assert (seconds_of(cfg), millis_of(cfg)) == (0.5, 60_000)
    cfg = parse_config(config(seconds="'${S:-500ms}'", millis="'${MS}'"), environ={"S": "7", "MS": "7"})
    assert (seconds_of(cfg), millis_of(cfg)) == (7.0, 7)
    cfg = parse_config(config(seconds="'${A}${B}'"), environ={"A": "1m", "B": "30s"})
    assert seconds_of(cfg) == 90.0


def test_a_bad_environment_value_is_reported_by_its_reference() -> None:
    issue = only_issue(config(millis="'${MS}'"), environ={"MS": "5 minutes"})
    assert issue.path == MILLIS_KEY and issue.message.startswith("expected int (milliseconds) or a duration")
    assert "${MS}" in issue.message and "5 minutes" not in issue.message  # values put in by ${...} are masked
    issue = only_issue(config(seconds="'${S}'"), environ={"S": "8d"})
    assert issue.message == "'8d' (691200 s) is out of range: expected float <= 604800.0"


def test_an_unset_variable_is_said_once() -> None:
    issue = only_issue(config(millis="'${SURELY_UNSET_MS}'"), environ={})
    assert issue.path == MILLIS_KEY and issue.message == "environment variable SURELY_UNSET_MS is not set"


# ---------------------------------------------------------------- the CLI


def test_validate_reports_a_bad_duration_in_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(config(seconds="2s", millis="1m"))
    bad.write_text(config(seconds="2x", millis="1.5ms"))

    assert main(["validate", "-c", str(good)]) == 0
    assert "ok" in capsys.readouterr().out

    assert main(["validate", "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line.strip() for line in err.splitlines() if line.startswith("  ")]
    assert lines == [
        f"{MILLIS_KEY}: '1.5ms' is 1.5 ms: not a whole number of milliseconds",
        f"{SECONDS_KEY}: expected float (seconds) or a duration with units (ms, s, m, h, d) such as '500ms', '2s', "
        "'1.5m', '1h', '1d', '1m30s', got '2x'",
    ]

    assert main(["validate", "-c", str(bad), "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert [f"{e['path']}: {e['message']}" for e in doc["errors"]] == lines


# ---------------------------------------------------------------- every time key is a duration the loader reads


def durations() -> list[tuple[str, Any, bool]]:
    """Every numeric key reachable from the file's top and each connector kind's entries: (path, type info,
    whether it is a duration), noting whether the way to it crosses a list, a dict or a union of Structs."""
    seen: set[type] = set()
    found: list[tuple[str, Any, bool]] = []

    def walk(t: Any, path: str, direct: bool) -> None:
        if isinstance(t, mi.StructType):
            if t.cls in seen:
                return
            seen.add(t.cls)
            for f in t.fields:
                walk(f.type, f"{t.cls.__name__}.{f.encode_name}", direct)
        elif isinstance(t, mi.UnionType):
            members = [m for m in t.types if not isinstance(m, mi.NoneType)]
            for member in members:
                walk(member, path, direct and len(members) == 1)
        elif isinstance(t, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType):
            walk(t.item_type, path, False)
        elif isinstance(t, mi.TupleType):
            for item in t.item_types:
                walk(item, path, False)
        elif isinstance(t, mi.DictType):
            walk(t.value_type, path, False)
        elif isinstance(t, mi.Metadata):
            is_duration = bool(t.extra and "duration" in t.extra)
            if is_duration:
                assert direct, f"{path}: a duration inside a list, dict or union is not read by the loader"
            found.append((path, t.type, is_duration))
        elif isinstance(t, mi.IntType | mi.FloatType):
            found.append((path, t, False))

    roots: list[Any] = [FileSection, RouteSection]
    for plugin in plugins().values():
        roots += [plugin.config, plugin.source, plugin.target]
    for root in roots:
        walk(mi.type_info(root), "", True)
    return found


TIME_NAME = re.compile(r"_ms$|timeout|interval|expiry|keepalive|wait|deadline|after|delay|initial|\.max$|max_time")


def test_every_key_that_holds_a_time_is_a_duration() -> None:
    found = durations()
    named_like_times = {path for path, _, _ in found if TIME_NAME.search(path)}
    typed_as_durations = {path for path, _, is_duration in found if is_duration}
    assert named_like_times == typed_as_durations
    assert len(typed_as_durations) >= 25


def test_duration_unit_reads_the_marker() -> None:
    from gateway.util.bounds import Count, Millis, MillisOrZero, Seconds, SecondsOrZero

    assert [duration_unit(t) for t in (Seconds, SecondsOrZero, Millis, MillisOrZero)] == [
        ("s", False),
        ("s", False),
        ("ms", True),
        ("ms", True),
    ]
    assert duration_unit(Seconds | None) == ("s", False)
    assert duration_unit(Count) is None and duration_unit(float) is None and duration_unit(int | str) is None
    assert read_duration("2s", "ms", True) == 2000 and read_duration("1ms", "s", False) == 0.001


# ---------------------------------------------------------------- reload


async def test_reload_compares_durations_by_value() -> None:
    def memory(stuck_after: str) -> Config:
        return parse_config(
            memory_config(
                f'  - name: r\n    from: {{connector: a, topic: "x/#"}}\n    to: {{connector: b, topic: y}}\n'
                f"    stuck_after: {stuck_after}\n"
            ),
            environ={},
        )

    gw = Gateway(memory("2s"))
    await gw.start()
    try:
        await gw.wait_ready(5)
        route = gw.routes["r"]
        summary = await gw.reload(memory("2"))  # the same duration, written in plain seconds
        assert summary["routes_kept"] == ["r"] and gw.routes["r"] is route
        summary = await gw.reload(memory("1m"))
        assert summary["routes_kept"] == [] and gw.config.routes[0].section.stuck_after == 60.0
    finally:
        await gw.stop(5)
