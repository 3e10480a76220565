"""config/schema.json is generated from the config Structs, is current, and accepts what the gateway accepts."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
import yaml
from jsonschema.exceptions import best_match

from gateway.config.doc import field_docs
from gateway.config.loader import CONNECTOR_NAME, parse_config
from gateway.config.registry import BUILTIN, plugins
from gateway.config.schema import main, render, schema
from gateway.errors import ConfigError
from tests.support.harness import MEMORY

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "config" / "schema.json"

# Every kind, most keys, ${VAR} in typed values, a dead letter, fan-out, Kafka `topics` and `pattern`.
FULL = """\
gateway:
  id: gw-full
  shutdown_timeout: ${SHUTDOWN:-5}
  max_cached_topics: 100
  reconnect: {initial: 0.5, max: 10}
  http: {listen: "[::1]:0"}
connectors:
  devices:
    type: mqtt
    url: mqtt://user:pw@127.0.0.1:1883
    client_id: gw-full-devices
    protocol: "3.1.1"
    clean_start: false
    session_expiry: 3600
    keepalive: ${KEEPALIVE:-30}
    receive_maximum: 100
    max_inflight: 100
    connect_timeout: 2.5
  bus:
    type: nats
    servers: ["nats://127.0.0.1:4222", "${NATS_URL:-nats://127.0.0.1:4223}"]
    name: gw-full
    token: ${file:token.txt}
    pending_msgs_limit: 1000
  platform:
    type: kafka
    bootstrap_servers: ["127.0.0.1:9092"]
    driver: aiokafka
    idempotent: ${IDEMPOTENT:-false}
    auto_offset_reset: latest
    linger_ms: 0
  local: {type: memory, broker: full}
routes:
  - name: telemetry
    description: device telemetry to the platform and the bus
    from: {connector: devices, topic: "devices/{device}/telemetry/#", qos: 1, share_group: gws}
    to:
      - {connector: platform, topic: telemetry, key: "{device}"}
      - {connector: bus, subject: "iot.{device}.telemetry.{#}", jetstream: true}
    max_in_flight: ${MAX_IN_FLIGHT:-100}
    max_in_flight_bytes: 1048576
    overflow: drop_oldest
    slow_consumer_deadline: 0
    retry: {attempts: 3, initial: 0.1, max: 1, max_time: 5}
    dead_letter: {connector: local, topic: "dead/{device}"}
  - name: commands
    from: {connector: bus, subject: "cmd.{device}.>", queue: gateway}
    to: {connector: devices, topic: "devices/{device}/cmd/{>}", qos: 2, retain: false}
    on_error: stop
  - name: orders
    from: {connector: bus, stream: ORDERS, subject: "orders.>", durable: gw, batch: 10, ack_wait: 5,
           deliver_policy: new}
    to: {connector: platform, topic: orders-archive}
  - name: many-topics
    from: {connector: platform, topics: [a, b], group: gw, session_timeout_ms: 6000, auto_offset_reset: earliest}
    to: {connector: local, topic: copy}
  - name: by-pattern
    from: {connector: platform, pattern: "events\\\\.(?P<kind>[a-z]+)"}
    to: {connector: local, topic: "events/{kind}"}
"""


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text(encoding="utf-8")))


def errors_of(validator: jsonschema.Draft202012Validator, doc: Any) -> list[str]:
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]


def readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```yaml\n(.*?)^```", text, re.S | re.M)
    return [b for b in blocks if re.search(r"^connectors:", b, re.M)]


# ---------------------------------------------------------------- generated and current


def test_committed_schema_is_up_to_date() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == render(), (
        "run: python -m gateway.config.schema > config/schema.json"
    )


def test_schema_is_valid_draft_2020_12() -> None:
    doc = schema()
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(doc)


def test_comment_says_how_to_use_it_in_an_editor() -> None:
    comment = schema()["$comment"]
    assert "# yaml-language-server: $schema=" in comment
    assert "python -m gateway.config.schema > config/schema.json" in comment


def test_module_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert capsys.readouterr().out == render()
    assert main(["--all"]) == 0
    everything = json.loads(capsys.readouterr().out)
    assert everything["$defs"]["Connector"]["properties"]["type"]["enum"] == list(plugins())


# ---------------------------------------------------------------- built from the Structs


def test_every_connector_kind_is_selected_by_type() -> None:
    doc = schema()
    connector = doc["$defs"]["Connector"]
    assert connector["properties"]["type"]["enum"] == list(BUILTIN)
    chosen = {b["if"]["properties"]["type"]["const"]: b["then"]["$ref"] for b in connector["allOf"]}
    assert chosen == {kind: f"#/$defs/{plugins()[kind].config.__name__}" for kind in BUILTIN}
    assert doc["properties"]["connectors"]["additionalProperties"] == {"$ref": "#/$defs/Connector"}
    assert doc["properties"]["connectors"]["propertyNames"]["pattern"] == CONNECTOR_NAME.pattern


def test_route_endpoints_are_any_kind_of_endpoint() -> None:
    defs = schema()["$defs"]
    assert defs["Source"]["anyOf"] == [{"$ref": f"#/$defs/{plugins()[k].source.__name__}"} for k in BUILTIN]
    assert defs["Target"]["anyOf"] == [{"$ref": f"#/$defs/{plugins()[k].target.__name__}"} for k in BUILTIN]
    route = defs["RouteSection"]
    assert route["required"] == ["name", "from", "to"]
    assert route["properties"]["from"]["$ref"] == "#/$defs/Source"
    for name in (plugins()[k].source.__name__ for k in BUILTIN):
        assert "connector" in defs[name]["required"]


def test_only_the_selected_kinds() -> None:
    doc = schema(["memory"])
    assert doc["$defs"]["Connector"]["properties"]["type"]["enum"] == ["memory"]
    assert "MqttConfig" not in doc["$defs"]


def struct_defs() -> list[type[msgspec.Struct]]:
    from gateway.config.model import GatewaySection, HttpSection, RouteSection
    from gateway.config.options import RetryPolicy
    from gateway.util.backoff import Backoff

    classes: list[type[msgspec.Struct]] = [GatewaySection, HttpSection, Backoff, RouteSection, RetryPolicy]
    for kind in BUILTIN:
        classes += [plugins()[kind].config, plugins()[kind].source, plugins()[kind].target]
    return classes


@pytest.mark.parametrize("cls", struct_defs(), ids=lambda c: c.__name__)
def test_descriptions_are_the_field_docstrings(cls: type[msgspec.Struct]) -> None:
    definition = schema()["$defs"][cls.__name__]
    docs = field_docs(cls)
    fields = msgspec.structs.fields(cls)
    assert set(definition["properties"]) == {f.encode_name for f in fields} | (
        {cls.__struct_config__.tag_field} if cls.__struct_config__.tag_field else set()
    )
    for f in fields:
        if f.name in docs:
            assert definition["properties"][f.encode_name]["description"] == docs[f.name], f.name
    assert definition["additionalProperties"] is False


# ---------------------------------------------------------------- validating real configs


def test_demo_config_conforms(validator: jsonschema.Draft202012Validator) -> None:
    doc = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text(encoding="utf-8"))
    assert errors_of(validator, doc) == []


def test_readme_example_conforms(validator: jsonschema.Draft202012Validator) -> None:
    examples = readme_examples()
    assert examples, "README.md has no ```yaml block with a top-level `connectors:`"
    for text in examples:
        parse_config(text, environ={})  # the gateway accepts it ...
        assert errors_of(validator, yaml.safe_load(text)) == []  # ... and so does the schema


def test_full_config_conforms(validator: jsonschema.Draft202012Validator, tmp_path: Path) -> None:
    (tmp_path / "token.txt").write_text("s3cret\n")
    config = parse_config(FULL, environ={}, base_dir=tmp_path)
    assert {config.kind(n) for n in config.connectors} == set(BUILTIN)
    assert errors_of(validator, yaml.safe_load(FULL)) == []


def test_memory_only_config_conforms(validator: jsonschema.Draft202012Validator) -> None:
    parse_config(MEMORY, environ={})
    assert errors_of(validator, yaml.safe_load(MEMORY)) == []
    assert errors_of(validator, {"connectors": {}}) == []


def _set(path: str, value: Any) -> Any:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


_DELETE = object()

# (mutation of FULL, JSON path of the error): each is also rejected by `gateway validate`.
REJECTED = {
    "unknown-key": (_set("connectors/bus/pending_msgs_limitt", 5), "$.connectors.bus"),
    "wrong-type": (_set("connectors/platform/linger_ms", "soon"), "$.connectors.platform.linger_ms"),
    "out-of-range": (_set("connectors/devices/keepalive", 70000), "$.connectors.devices.keepalive"),
    "unknown-kind": (_set("connectors/platform/type", "amqp"), "$.connectors.platform.type"),
    "kind-missing": (_set("connectors/local/type", _DELETE), "$.connectors.local"),
    "bad-connector-name": (_set("connectors/bad name", {"type": "memory"}), "$.connectors"),
    "bad-choice": (_set("routes/0/overflow", "explode"), "$.routes[0].overflow"),
    "bad-listen": (_set("gateway/http/listen", "nowhere"), "$.gateway.http.listen"),
    "unknown-route-key": (_set("routes/1/colour", "blue"), "$.routes[1]"),
    "route-name-missing": (_set("routes/1/name", _DELETE), "$.routes[1]"),
    "target-connector-missing": (_set("routes/0/to/0/connector", _DELETE), "$.routes[0].to[0]"),
    "target-unknown-key": (_set("routes/0/to/0/colour", "x"), "$.routes[0].to[0]"),
    "no-targets": (_set("routes/1/to", []), "$.routes[1].to"),
    "source-not-a-mapping": (_set("routes/1/from", "bus"), "$.routes[1].from"),
    "list-from-a-string": (_set("connectors/bus/servers", "${NATS_URLS}"), "$.connectors.bus.servers"),
    "top-level-key": (_set("connector", {}), "$"),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_schema_rejects_what_validate_rejects(
    validator: jsonschema.Draft202012Validator, case: str, tmp_path: Path
) -> None:
    mutate, json_path = REJECTED[case]
    doc = copy.deepcopy(yaml.safe_load(FULL))
    mutate(doc)
    errors = list(validator.iter_errors(doc))
    assert len(errors) == 1, errors_of(validator, doc)
    assert best_match(errors).json_path == json_path, errors_of(validator, doc)
    (tmp_path / "token.txt").write_text("s3cret\n")
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(doc), environ={"NATS_URLS": "nats://a:4222"}, base_dir=tmp_path)
    assert len(info.value.issues) == 1, info.value.issues


def test_interpolation_only_where_a_typed_value_is_expected(validator: jsonschema.Draft202012Validator) -> None:
    doc = yaml.safe_load(FULL)
    doc["routes"][0]["max_in_flight"] = "${N}"
    doc["routes"][0]["overflow"] = "${OVERFLOW:-block}"
    doc["connectors"]["devices"]["clean_start"] = "${CLEAN}"
    assert errors_of(validator, doc) == []
    doc["routes"][0]["max_in_flight"] = "many"
    assert [e.json_path for e in validator.iter_errors(doc)] == ["$.routes[0].max_in_flight"]
