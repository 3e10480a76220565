"""gateway/config/loader.py and gateway/cli.py: validation with key paths, interpolation, the CLI."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from connectors.kafka.config import KafkaConfig, KafkaSource, KafkaTarget
from connectors.mqtt.config import MqttConfig, MqttSource, MqttTarget
from connectors.nats.config import NatsConfig, NatsSource, NatsTarget
from gateway import __version__
from gateway.cli import main
from gateway.config import Config, load_config
from gateway.config.loader import parse_config
from gateway.errors import ConfigError, GatewayError
from tests.support.harness import MEMORY, issues_of, only_issue

EXAMPLE = """\
connectors:
  devices:  {type: mqtt,  url: "mqtt://127.0.0.1:1883", client_id: gw-1, protocol: 5}
  bus:      {type: nats,  servers: ["nats://127.0.0.1:4222"]}
  platform: {type: kafka, bootstrap_servers: ["127.0.0.1:9092"]}
routes:
  - name: telemetry
    from: {connector: devices, topic: "devices/{device}/telemetry/#", qos: 1}
    to:
      - {connector: platform, topic: telemetry, key: "{device}"}
      - {connector: bus, subject: "iot.{device}.telemetry.{#}"}
  - name: commands
    from: {connector: bus, subject: "cmd.{device}.>", queue: gateway}
    to:   {connector: devices, topic: "devices/{device}/cmd/{>}", qos: 1}
  - name: orders-to-services
    from: {connector: platform, topic: orders, group: gateway}
    to:   {connector: bus, subject: events.orders, jetstream: true}
  - name: orders-archive
    from: {connector: bus, stream: ORDERS, subject: "orders.>", durable: gateway}
    to:   {connector: platform, topic: orders-archive}
"""


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# ---------------------------------------------------------------- the example


def test_example_config_validates() -> None:
    config = parse_config(EXAMPLE, environ={})

    assert isinstance(config, Config)
    assert {name: config.kind(name) for name in config.connectors} == {
        "devices": "mqtt",
        "bus": "nats",
        "platform": "kafka",
    }
    assert isinstance(config.connectors["devices"], MqttConfig)
    assert config.connectors["devices"].client_id == "gw-1"
    assert isinstance(config.connectors["bus"], NatsConfig)
    assert isinstance(config.connectors["platform"], KafkaConfig)
    assert [r.name for r in config.routes] == ["telemetry", "commands", "orders-to-services", "orders-archive"]


def test_example_routes_are_typed_and_compiled() -> None:
    telemetry, commands, orders, archive = parse_config(EXAMPLE, environ={}).routes

    assert isinstance(telemetry.source, MqttSource)
    assert [p.native_filter() for p in telemetry.patterns] == ["devices/+/telemetry/#"]
    assert [type(t.spec) for t in telemetry.targets] == [KafkaTarget, NatsTarget]
    assert telemetry.targets[0].key is not None
    assert telemetry.targets[0].key.text == "{device}"
    assert telemetry.targets[1].address.text == "iot.{device}.telemetry.{#}"

    assert isinstance(commands.source, NatsSource)
    assert commands.source.queue == "gateway"
    assert not commands.source.at_least_once  # core NATS
    assert [p.native_filter() for p in commands.patterns] == ["cmd.*.>"]
    assert isinstance(commands.targets[0].spec, MqttTarget)

    assert isinstance(orders.source, KafkaSource)
    assert orders.source.group == "gateway"
    assert isinstance(orders.targets[0].spec, NatsTarget)
    assert orders.targets[0].spec.jetstream
    assert orders.targets[0].address.is_constant

    assert isinstance(archive.source, NatsSource)
    assert archive.source.at_least_once  # JetStream durable
    assert archive.targets[0].key is None


def test_gateway_section_defaults_and_route_defaults() -> None:
    config = parse_config(EXAMPLE, environ={})

    assert config.gateway.shutdown_timeout == 30.0
    assert config.routes[0].section.max_in_flight == 10_000


def test_load_config_records_source_and_digest(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(EXAMPLE)

    config = load_config(path)

    assert config.source == str(path)
    assert config.digest == hashlib.sha256(EXAMPLE.encode()).hexdigest()


def test_load_config_of_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_config_error_is_a_gateway_error_listing_every_issue() -> None:
    text = edit(edit(EXAMPLE, "client_id: gw-1", "clientid: gw-1"), "stream: ORDERS, ", "")
    with pytest.raises(GatewayError) as info:
        parse_config(text, environ={})

    assert isinstance(info.value, ConfigError)
    assert str(info.value).splitlines() == [str(i) for i in info.value.issues]
    assert len(info.value.issues) == 2


# ---------------------------------------------------------------- one issue per problem, by key path


@pytest.mark.parametrize(
    ("old", "new", "path", "message"),
    [
        pytest.param(
            "client_id: gw-1",
            "clientid: gw-1",
            "connectors.devices.clientid",
            "unknown key (did you mean 'client_id'?)",
            id="unknown-connector-key",
        ),
        pytest.param("routes:", "routez:", "routez", "unknown key (did you mean 'routes'?)", id="unknown-top-key"),
        pytest.param(
            "queue: gateway}",
            "queue: gateway, max_inflight: 3}",
            "routes[1].from.max_inflight",
            "unknown key",
            id="unknown-from-key",
        ),
        pytest.param(
            "  - name: commands\n",
            "  - name: commands\n    max_inflight: 10\n",
            "routes[1].max_inflight",
            "unknown key (did you mean 'max_in_flight'?)",
            id="unknown-route-key",
        ),
        pytest.param("protocol: 5", "protocol: 7", "connectors.devices.protocol", "invalid enum value 7", id="enum"),
        pytest.param(
            "client_id: gw-1", "client_id: [gw, 1]", "connectors.devices.client_id", "expected str", id="type"
        ),
        pytest.param(
            '"devices/{device}/telemetry/#", qos: 1}',
            '"devices/{device}/telemetry/#", qos: 3}',
            "routes[0].from.qos",
            "invalid enum value 3",
            id="qos",
        ),
        pytest.param(
            "  - name: commands\n",
            "  - name: commands\n    max_in_flight: 0\n",
            "routes[1].max_in_flight",
            "expected int >= 1",
            id="bound",
        ),
        pytest.param(
            "type: kafka",
            "type: kafak",
            "connectors.platform.type",
            "unknown connector type 'kafak' (known: kafka, memory, mqtt, nats)",
            id="unknown-connector-type",
        ),
        pytest.param(
            "bus:      {type: nats,  servers",
            "bus:      {servers",
            "connectors.bus.type",
            "required key is missing",
            id="missing-type",
        ),
        pytest.param(
            "- {connector: bus, subject",
            "- {connector: buss, subject",
            "routes[0].to[1].connector",
            "unknown connector 'buss' (connectors: bus, devices, platform)",
            id="unknown-target-connector",
        ),
        pytest.param(
            'from: {connector: bus, subject: "cmd',
            'from: {connector: bux, subject: "cmd',
            "routes[1].from.connector",
            "unknown connector 'bux'",
            id="unknown-source-connector",
        ),
        pytest.param(
            'to:   {connector: devices, topic: "devices/{device}/cmd/{>}", qos: 1}',
            'to:   {connector: devicez, topic: "devices/{device}/cmd/{>}", qos: 1}',
            "routes[1].to.connector",
            "unknown connector 'devicez'",
            id="unknown-connector-single-target",
        ),
        pytest.param(
            "iot.{device}.telemetry",
            "iot.{dev}.telemetry",
            "routes[0].to[1].subject",
            "{dev} is not a capture of the source pattern 'devices/{device}/telemetry/#' (captures: {device})",
            id="capture-not-in-source",
        ),
        pytest.param(
            'key: "{device}"',
            'key: "{id}"',
            "routes[0].to[0].key",
            "{id} is not a capture",
            id="key-capture-not-in-source",
        ),
        pytest.param(
            "devices/{device}/cmd/{>}",
            "devices/{device}/cmd/{#}/{device}",
            None,
            None,
            id="valid-control",
        ),
        pytest.param(
            "subject: events.orders",
            'subject: "events.{#}"',
            "routes[2].to.subject",
            "{#} needs a multi-level wildcard",
            id="remainder-without-wildcard",
        ),
        pytest.param(
            'topic: "devices/{device}/telemetry/#"',
            'topic: "devices/{device}/#/telemetry"',
            "routes[0].from.topic",
            "'#' must be the last level",
            id="bad-source-pattern",
        ),
        pytest.param(
            "name: commands",
            "name: telemetry",
            "routes[1].name",
            "duplicate route name 'telemetry' (also routes[0])",
            id="duplicate-route-name",
        ),
        pytest.param(
            "topic: orders, group",
            "topic: orders, topics: [a, b], group",
            "routes[2].from",
            "set exactly one of topic, topics or pattern (got topic, topics)",
            id="kafka-topic-and-topics",
        ),
        pytest.param(
            "stream: ORDERS, ",
            "",
            "routes[3].from",
            "durable needs stream",
            id="nats-durable-without-stream",
        ),
        pytest.param(
            "stream: ORDERS, ",
            "stream: ORDERS, queue: q, ",
            "routes[3].from",
            "queue is for core subscriptions",
            id="nats-stream-with-queue",
        ),
        pytest.param(
            'url: "mqtt://127.0.0.1:1883"',
            'url: "http://127.0.0.1"',
            "connectors.devices",
            "expected mqtt://host:port",
            id="mqtt-url",
        ),
        pytest.param(
            'bootstrap_servers: ["127.0.0.1:9092"]',
            "bootstrap_servers: []",
            "connectors.platform",
            "at least one host:port",
            id="kafka-no-servers",
        ),
        pytest.param(
            "routes:",
            "gateway: {reconnect: {initial: 1, maxx: 2}}\nroutes:",
            "gateway.reconnect.maxx",
            "unknown key",
            id="nested-unknown-key",
        ),
        pytest.param(
            "routes:",
            "gateway: {shutdown_timeout: 0}\nroutes:",
            "gateway.shutdown_timeout",
            "expected float > 0.0",
            id="gateway-bound",
        ),
    ],
)
def test_each_problem_is_one_issue_naming_its_key_path(
    old: str, new: str, path: str | None, message: str | None
) -> None:
    text = edit(EXAMPLE, old, new)
    if path is None:  # the control case: the edit keeps the config valid
        parse_config(text, environ={})
        return
    issue = only_issue(text)
    assert issue.path == path
    assert message is not None
    assert message in issue.message
    assert str(issue) == f"{path}: {issue.message}"


def test_unknown_key_without_a_close_match_lists_the_known_keys() -> None:
    issue = only_issue(edit(EXAMPLE, "qos: 1}\n    to:\n", "qos: 1, zzz: 2}\n    to:\n"))

    assert issue.path == "routes[0].from.zzz"
    assert issue.message == "unknown key (known keys: connector, qos, retained_only, share_group, topic)"


def test_target_list_entry_with_an_unknown_connector_is_indexed() -> None:
    text = edit(
        EXAMPLE,
        'to:   {connector: devices, topic: "devices/{device}/cmd/{>}", qos: 1}',
        'to:\n      - {connector: devices, topic: "devices/{device}/cmd/{>}", qos: 1}\n'
        '      - {connector: nowhere, topic: "x"}',
    )

    issue = only_issue(text)

    assert issue.path == "routes[1].to[1].connector"
    assert issue.message == "unknown connector 'nowhere' (connectors: bus, devices, platform)"


def test_problems_in_several_places_are_all_reported_in_file_order() -> None:
    text = EXAMPLE
    text = edit(text, "client_id: gw-1", "clientid: gw-1")
    text = edit(text, "iot.{device}.telemetry", "iot.{dev}.telemetry")
    text = edit(text, "name: commands", "name: telemetry")
    text = edit(text, "stream: ORDERS, ", "")

    assert [i.path for i in issues_of(text)] == [
        "connectors.devices.clientid",
        "routes[1].name",
        "routes[3].from",
    ]


def test_endpoints_on_a_broken_connector_are_not_reported_again() -> None:
    # `devices` is broken; the two routes that use it say nothing more about it.
    issue = only_issue(edit(EXAMPLE, "client_id: gw-1", "clientid: gw-1"))

    assert issue.path == "connectors.devices.clientid"


def test_a_capture_error_is_reported_per_target() -> None:
    text = edit(EXAMPLE, "iot.{device}.telemetry", "iot.{dev}.telemetry")
    text = edit(text, 'key: "{device}"', 'key: "{id}"')

    assert [i.path for i in issues_of(text)] == ["routes[0].to[0].key", "routes[0].to[1].subject"]


def test_a_route_without_targets_is_an_issue() -> None:
    issue = only_issue(edit(MEMORY, 'to: {connector: a, topic: "out/{x}"}', "to: []"))

    assert issue.path == "routes[0].to"
    assert "at least one target" in issue.message


def test_connector_names_are_restricted() -> None:
    issue = only_issue("connectors:\n  'bad name': {type: memory}\n")

    assert issue.path == "connectors.bad name"


@pytest.mark.parametrize("text", ["- a\n", "just a string\n", ""])
def test_a_file_that_is_not_a_mapping_is_one_issue(text: str) -> None:
    issue = only_issue(text)

    assert "expected a mapping" in issue.message


def test_kafka_topics_list_templates_must_fit_every_topic() -> None:
    text = """\
connectors:
  k: {type: kafka, bootstrap_servers: [x]}
  a: {type: memory}
routes:
  - name: r
    from: {connector: k, topics: [orders.eu, "orders.{region}"]}
    to: {connector: a, topic: "orders/{region}"}
"""
    issue = only_issue(text)

    assert issue.path == "routes[0].to.topic"
    assert "'orders.eu'" in issue.message


def test_kafka_regex_named_groups_feed_templates() -> None:
    text = """\
connectors:
  k: {type: kafka, bootstrap_servers: [x]}
  a: {type: memory}
routes:
  - name: r
    from: {connector: k, pattern: "orders-(?P<region>[a-z]+)"}
    to: {connector: a, topic: "orders/{region}"}
"""
    [route] = parse_config(text, environ={}).routes

    assert route.patterns[0].captures == frozenset({"region"})


def test_kafka_invalid_regex_names_the_pattern_key() -> None:
    text = "connectors:\n  k: {type: kafka, bootstrap_servers: [x]}\nroutes:\n"
    text += "  - {name: r, from: {connector: k, pattern: 'a('}, to: {connector: k, topic: t}}\n"

    issue = only_issue(text)

    assert issue.path == "routes[0].from.pattern"
    assert "invalid regular expression" in issue.message


@pytest.mark.parametrize("value", ["[a]", "{b: 1}"])
def test_a_non_string_connector_reference_is_an_issue_not_a_crash(value: str) -> None:
    issue = only_issue(edit(MEMORY, "from: {connector: a,", f"from: {{connector: {value},"))

    assert issue.path == "routes[0].from.connector"


def test_an_empty_connector_entry_names_the_connector() -> None:
    issue = only_issue("connectors:\n  devices:\n")

    assert issue.path == "connectors.devices"


def test_a_duplicate_key_is_an_issue_not_a_silent_override() -> None:
    text = edit(MEMORY, "  a: {type: memory}\n", "  a: {type: memory, broker: A}\n  a: {type: memory, broker: B}\n")

    issue = only_issue(text)

    assert "connectors" in issue.path or "line 3" in issue.message
    assert "duplicate" in issue.message


def test_a_config_error_does_not_echo_a_secret() -> None:
    text = edit(EXAMPLE, 'url: "mqtt://127.0.0.1:1883"', 'url: "ftp://gw:${MQTT_PASSWORD}@broker:8883"')

    issue = only_issue(text, {"MQTT_PASSWORD": "s3cr3t-pw"})

    assert issue.path.startswith("connectors.devices")
    assert "s3cr3t-pw" not in str(issue)


# ---------------------------------------------------------------- YAML syntax


def test_yaml_syntax_error_gives_the_line_number() -> None:
    text = EXAMPLE + "  - name: broken\n   from: [\n"

    issue = only_issue(text)

    assert issue.path == ""
    assert "YAML syntax error" in issue.message
    assert re.search(r"line 21, column \d+", issue.message), issue.message


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("connectors: {a: {type: memory}\n")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    [issue] = info.value.issues
    assert issue.message.startswith(f"{path}: YAML syntax error: line ")


# ---------------------------------------------------------------- interpolation


def client_id(text: str, environ: dict[str, str], base_dir: Path | None = None) -> str:
    config = parse_config(edit(EXAMPLE, "client_id: gw-1", f'client_id: "{text}"'), environ=environ, base_dir=base_dir)
    return str(config.connectors["devices"].client_id)


def test_env_reference_is_replaced() -> None:
    assert client_id("${GW_ID}", {"GW_ID": "edge-7"}) == "edge-7"
    assert client_id("gw-${SITE}-${N}", {"SITE": "paris", "N": "3"}) == "gw-paris-3"


def test_missing_env_reference_is_an_issue_at_its_key() -> None:
    issue = only_issue(edit(EXAMPLE, "client_id: gw-1", 'client_id: "${GW_ID}"'))

    assert issue.path == "connectors.devices.client_id"
    assert issue.message == "environment variable GW_ID is not set"


def test_every_missing_env_reference_is_reported() -> None:
    text = edit(EXAMPLE, "client_id: gw-1", 'client_id: "${A}-${B}"')
    text = edit(text, "queue: gateway", 'queue: "${C}"')

    assert [(i.path, i.message) for i in issues_of(text)] == [
        ("connectors.devices.client_id", "environment variable A is not set"),
        ("connectors.devices.client_id", "environment variable B is not set"),
        ("routes[1].from.queue", "environment variable C is not set"),
    ]


def test_env_reference_inside_a_list_names_the_index() -> None:
    issue = only_issue(edit(EXAMPLE, '["nats://127.0.0.1:4222"]', '["nats://a:1", "${NATS_URL}"]'))

    assert issue.path == "connectors.bus.servers[1]"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [({}, "fallback"), ({"GW_ID": ""}, "fallback"), ({"GW_ID": "set"}, "set")],
    ids=["unset", "empty", "set"],
)
def test_env_default(environ: dict[str, str], expected: str) -> None:
    assert client_id("${GW_ID:-fallback}", environ) == expected


def test_env_default_may_be_empty() -> None:
    assert client_id("x${GW_ID:-}y", {}) == "xy"


def test_double_dollar_escapes_a_reference() -> None:
    assert client_id("$${GW_ID}", {"GW_ID": "no"}) == "${GW_ID}"
    assert client_id("a-$${X}-${Y}", {"X": "no", "Y": "yes"}) == "a-${X}-yes"


def test_a_lone_dollar_is_kept() -> None:
    assert client_id("pa$$word$", {}) == "pa$$word$"


def test_invalid_reference_is_an_issue() -> None:
    issue = only_issue(edit(EXAMPLE, "client_id: gw-1", 'client_id: "${1BAD}"'))

    assert issue.path == "connectors.devices.client_id"
    assert "invalid reference ${1BAD}" in issue.message


def test_env_comes_from_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_UNIT_TEST_ID", "from-os")
    text = edit(EXAMPLE, "client_id: gw-1", 'client_id: "${GW_UNIT_TEST_ID}"')

    assert parse_config(text).connectors["devices"].client_id == "from-os"


def test_file_reference_is_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    (conf / "secrets").mkdir(parents=True)
    (conf / "secrets" / "client-id").write_text("from-file\n")
    path = conf / "gateway.yaml"
    path.write_text(edit(EXAMPLE, "client_id: gw-1", 'client_id: "${file:secrets/client-id}"'))
    monkeypatch.chdir(tmp_path)  # not the config's directory

    config = load_config(path)

    assert config.connectors["devices"].client_id == "from-file"  # trailing newline stripped


def test_file_reference_may_be_absolute(tmp_path: Path) -> None:
    secret = tmp_path / "id.txt"
    secret.write_text("abs")

    assert client_id(f"${{file:{secret}}}", {}) == "abs"


def test_unreadable_file_reference_is_an_issue(tmp_path: Path) -> None:
    text = edit(EXAMPLE, "client_id: gw-1", 'client_id: "${file:missing.txt}"')

    [issue] = issues_of(text, base_dir=tmp_path)

    assert issue.path == "connectors.devices.client_id"
    assert issue.message.startswith("cannot read ${file:missing.txt}")


def test_interpolated_values_are_not_interpolated_again() -> None:
    assert client_id("${A}", {"A": "${B}", "B": "no"}) == "${B}"


def test_env_reference_can_set_a_numeric_field() -> None:
    text = edit(
        MEMORY,
        'to: {connector: a, topic: "out/{x}"}',
        'to: {connector: a, topic: "out/{x}"}\n    max_in_flight: ${MAX_IN_FLIGHT:-100}',
    )

    [route] = parse_config(text, environ={}).routes

    assert route.section.max_in_flight == 100


# ---------------------------------------------------------------- CLI


@pytest.fixture
def example_file(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(EXAMPLE)
    return path


def test_cli_validate_ok(example_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "-c", str(example_file)]) == 0

    out, err = capsys.readouterr()
    assert out.strip() == f"{example_file}: ok (3 connectors, 4 routes)"
    assert err == ""


def test_cli_validate_invalid_prints_one_line_per_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    text = edit(EXAMPLE, "client_id: gw-1", "clientid: gw-1")
    text = edit(text, "subject: events.orders", 'subject: "events.{region}"')
    path.write_text(text)

    assert main(["validate", "-c", str(path)]) == 2

    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == f"{path}: invalid config (2 problems):"
    assert lines[1:] == [
        "  connectors.devices.clientid: unknown key (did you mean 'client_id'?)",
        "  routes[2].to.subject: {region} is not a capture of the source pattern 'orders' (captures: none); "
        "{topic} and {payload.FIELD} work too",
    ]
    assert "Traceback" not in err


def test_cli_validate_one_problem_is_singular(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(edit(EXAMPLE, "protocol: 5", "protocol: 7"))

    assert main(["validate", "-c", str(path)]) == 2

    assert capsys.readouterr().err.splitlines()[0].endswith("invalid config (1 problem):")


def test_cli_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "-c", str(tmp_path / "nope.yaml")]) == 2

    err = capsys.readouterr().err
    assert "cannot read" in err
    assert "Traceback" not in err


def test_cli_validate_yaml_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("connectors:\n  a: {type: memory\n")

    assert main(["validate", "-c", str(path)]) == 2

    err = capsys.readouterr().err
    assert "YAML syntax error: line " in err
    assert len(err.splitlines()) == 2


def test_cli_explain_telemetry(example_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "-c", str(example_file), "--from", "devices", "devices/d1/telemetry/temp"]) == 0

    out = capsys.readouterr().out
    assert out.splitlines() == [
        "'devices/d1/telemetry/temp' from devices (mqtt): 1 route",
        "  route telemetry (from devices/{device}/telemetry/#)",
        "    -> platform (kafka) topic='telemetry' key='d1'",
        "    -> bus (nats) subject='iot.d1.telemetry.temp'",
    ]


def test_cli_explain_commands(example_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "-c", str(example_file), "--from", "bus", "cmd.d1.a//b.reboot"]) == 0

    out = capsys.readouterr().out
    assert "route commands (from cmd.{device}.>)" in out
    assert "-> devices (mqtt) topic='devices/d1/cmd/a.b/reboot'" in out
    assert "orders-archive" not in out


def test_cli_explain_shows_render_errors(example_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "-c", str(example_file), "--from", "bus", "cmd.d+1.x"]) == 0

    assert "-> devices (mqtt): cannot render: 'd+1' cannot be an MQTT topic level" in capsys.readouterr().out


def test_cli_explain_unrouted_topic(example_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "-c", str(example_file), "--from", "devices", "other/d1"]) == 0

    assert capsys.readouterr().out.splitlines() == ["'other/d1' from devices (mqtt): 0 routes"]


def test_cli_explain_unknown_connector(example_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "-c", str(example_file), "--from", "nope", "a/b"]) == 2

    assert "unknown connector 'nope' (connectors: bus, devices, platform)" in capsys.readouterr().err


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0

    assert capsys.readouterr().out.strip() == f"gateway {__version__}"


def test_cli_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["validate"])

    assert info.value.code == 2
    assert "-c/--config" in capsys.readouterr().err
