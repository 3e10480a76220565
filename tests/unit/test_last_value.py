"""Last-value state: the config of kv sources and targets, Kafka tombstones, MQTT ``retained_only``.

The brokers' side (KV puts and deletes, tombstones, retained publishes) is in
tests/e2e/test_state.py; here: what ``validate`` accepts and refuses, what the
templates render to, and that a ``retained_only`` route acknowledges what it
leaves out in arrival order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import jsonschema
import pytest
import yaml
from mqtt5 import PublishPacket, QoS

from connectors.kafka.config import KafkaTarget
from connectors.mqtt.client import MqttConnection
from connectors.mqtt.codec import PUBACK, ack
from connectors.mqtt.config import MqttSource
from connectors.mqtt.source import RetainedSubscriber, Subscriber
from connectors.nats.config import NatsSource, NatsTarget, is_kv_key
from gateway.cli import main
from gateway.config.loader import parse_config
from tests.support.harness import dispatcher_for, issues_of, only_issue

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "examples" / "last-value.yaml"

BASE = """\
connectors:
  devices: {type: mqtt, url: "mqtt://127.0.0.1:1883"}
  bus: {type: nats}
  platform: {type: kafka, bootstrap_servers: ["127.0.0.1:9092"]}
routes:
"""


def routes(text: str) -> str:
    return BASE + text


TO_KV = routes("""\
  - name: to-kv
    from: {connector: devices, topic: "devices/{device}/state", retained_only: true}
    to: {connector: bus, kv: BUCKET, subject: "KEY"}
""")
FROM_KV = routes("""\
  - name: from-kv
    from: {connector: bus, kv: BUCKET, subject: "devices.{device}.config"EXTRA}
    to: {connector: devices, topic: "devices/{device}/config", retain: true}
""")


def to_kv(bucket: str = "state", key: str = "{topic}") -> str:
    return TO_KV.replace("BUCKET", bucket).replace("KEY", key)


def from_kv(bucket: str = "config", extra: str = "") -> str:
    return FROM_KV.replace("BUCKET", bucket).replace("EXTRA", extra)


# ---------------------------------------------------------------- the worked example


def test_the_example_parses_into_kv_and_tombstone_endpoints() -> None:
    config = parse_config(EXAMPLE.read_text(), environ={})
    by_name = {r.section.name: r for r in config.routes}

    to_kv_route = by_name["state-to-kv"]
    assert isinstance(to_kv_route.source, MqttSource) and to_kv_route.source.retained_only
    kv_target = to_kv_route.targets[0].spec
    assert isinstance(kv_target, NatsTarget)
    assert (kv_target.kv, kv_target.jetstream) == ("device-state", True)  # a put awaits its PubAck
    assert to_kv_route.targets[0].address.text == "$KV.device-state.{topic}"

    kafka_target = by_name["state-to-kafka"].targets[0].spec
    assert isinstance(kafka_target, KafkaTarget) and kafka_target.tombstones and kafka_target.key == "{topic}"

    source = by_name["config-to-devices"].source
    assert isinstance(source, NatsSource)
    assert source.at_least_once
    assert (source.stream_name, source.subject_prefix) == ("KV_device-config", "$KV.device-config.")
    assert source.effective_deliver_policy == "last_per_subject"


def test_explain_renders_kv_keys_kafka_keys_and_mqtt_topics(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "-c", str(EXAMPLE), "--from", "devices", "devices/d1/state"]) == 0
    out = capsys.readouterr().out
    assert "-> services (nats) subject='$KV.device-state.devices.d1.state'" in out
    assert "-> platform (kafka) topic='device-state' key='devices/d1/state'" in out

    # A kv source's topic is the key (without `$KV.<bucket>.`): captures and {topic} work on it.
    assert main(["explain", "-c", str(EXAMPLE), "--from", "services", "devices.d1.config"]) == 0
    assert "-> devices (mqtt) topic='devices/d1/config'" in capsys.readouterr().out


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("bucket", ["device.state", "device state", "dev*", "dev>", "dév", '""'])
def test_an_invalid_bucket_name_is_refused_on_either_side(bucket: str) -> None:
    issue = only_issue(to_kv(bucket=bucket))
    assert issue.path == "routes[0].to"
    assert "is not a key-value bucket name (letters, digits, '_' and '-')" in issue.message

    issue = only_issue(from_kv(bucket=bucket))
    assert issue.path == "routes[0].from"
    assert "is not a key-value bucket name" in issue.message


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("state:{device}", "is not a key-value key: ':'"),
        ("state {device}", "is not a key-value key: ' '"),
        (".{device}", "starts or ends with '.'"),
        ("{device}.", "starts or ends with '.'"),
    ],
)
def test_a_key_template_with_characters_a_key_cannot_hold_is_refused(key: str, message: str) -> None:
    issue = only_issue(to_kv(key=key))
    assert issue.path == "routes[0].to"
    assert message in issue.message


@pytest.mark.parametrize("key", ["{topic}", "devices.{device}.state", "state-{device}", "a/b_{device}=x"])
def test_key_templates_a_key_can_hold_are_accepted(key: str) -> None:
    parse_config(to_kv(key=key), environ={})


def test_a_kv_key_template_must_fit_the_source_like_any_template() -> None:
    issue = only_issue(to_kv(key="{dev}"))
    assert issue.path == "routes[0].to.subject"
    assert "{dev} is not a capture" in issue.message


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (", stream: CONFIG", "set stream or kv, not both"),
        (", queue: q", "queue is for core subscriptions"),
    ],
)
def test_kv_source_conflicts(extra: str, message: str) -> None:
    issue = only_issue(from_kv(extra=extra))
    assert issue.path == "routes[0].from"
    assert message in issue.message


def test_a_kv_source_may_name_its_durable_and_deliver_policy() -> None:
    config = parse_config(from_kv(extra=", durable: cfg-reader, deliver_policy: all"), environ={})
    source = config.routes[0].source
    assert isinstance(source, NatsSource)
    assert (source.durable, source.effective_deliver_policy) == ("cfg-reader", "all")


def test_deliver_policy_defaults_and_needs_a_jetstream_source() -> None:
    stream = parse_config(
        routes("""\
  - name: s
    from: {connector: bus, stream: ORDERS, subject: "orders.>"}
    to: {connector: platform, topic: orders}
"""),
        environ={},
    ).routes[0]
    assert isinstance(stream.source, NatsSource)
    assert (stream.source.effective_deliver_policy, stream.source.subject_prefix) == ("all", "")

    issue = only_issue(
        routes("""\
  - name: core
    from: {connector: bus, subject: "orders.>", deliver_policy: last_per_subject}
    to: {connector: platform, topic: orders}
""")
    )
    assert (issue.path, issue.message) == (
        "routes[0].from",
        "deliver_policy needs stream or kv (it is a JetStream consumer setting)",
    )


def test_a_plain_nats_target_is_unchanged_by_kv() -> None:
    target = parse_config(
        routes("""\
  - name: r
    from: {connector: devices, topic: "devices/{device}/state"}
    to: {connector: bus, subject: "state.{device}"}
"""),
        environ={},
    ).routes[0]
    spec = target.targets[0].spec
    assert isinstance(spec, NatsTarget)
    assert (spec.kv, spec.jetstream, spec.address()) == (None, False, "state.{device}")


def test_tombstones_and_retained_only_are_booleans() -> None:
    text = routes("""\
  - name: r
    from: {connector: devices, topic: "devices/{device}/state", retained_only: maybe}
    to: {connector: platform, topic: state, key: "{device}", tombstones: 3}
""")
    assert {i.path for i in issues_of(text)} == {"routes[0].from.retained_only", "routes[0].to.tombstones"}


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("devices.d1.config", True),
        ("a/b=c_d-e", True),
        ("a//b", True),  # an MQTT level `a.b` crossing into NATS
        ("", False),
        (".a", False),
        ("a.", False),
        ("a:b", False),
        ("a b", False),
        ("a*", False),
    ],
)
def test_is_kv_key(key: str, ok: bool) -> None:
    assert is_kv_key(key) is ok


# ---------------------------------------------------------------- retained_only on the MQTT source


class FakeConnection:
    """What a subscriber's acknowledgements need of an MQTT connection: bytes queued for the socket."""

    def __init__(self) -> None:
        self.is_open = True
        self.sent = bytearray()

    def queue(self, data: bytes | bytearray) -> None:
        self.sent += data


def publish(pid: int, *, retain: bool, qos: int = 1) -> PublishPacket:
    return PublishPacket(
        "devices/d1/state", b"on", qos=QoS(qos), retain=retain, packet_id=pid if qos else None, duplicate=False
    )


def subscriber(cls: type[Subscriber]) -> tuple[Any, FakeConnection, Any]:
    dispatcher, routes_by_name, sinks = dispatcher_for("""\
  - name: state
    from: {connector: a, topic: "devices/{device}/state"}
    to: {connector: b, topic: "state/{device}"}
""")
    conn = FakeConnection()
    return cls(cast(MqttConnection, conn), dispatcher), conn, (routes_by_name["state"], sinks["b"])


def test_retained_only_routes_retained_messages_and_acks_the_others_in_arrival_order() -> None:
    sub, conn, (route, sink) = subscriber(RetainedSubscriber)

    sub.on_publish(publish(1, retain=True))
    sub.on_publish(publish(2, retain=False))
    sub.on_publish(publish(3, retain=False, qos=0))
    sub.on_publish(publish(4, retain=True))

    assert [flight.env.receipt.packet_id for flight, _ in sink.items] == [1, 4]
    assert conn.sent == b"", "packet 2 waits for packet 1: PUBACKs go in arrival order"
    assert (route.stats.received, route.stats.filtered) == (4, 2)
    sink.confirm(1)
    assert conn.sent == ack(PUBACK, 1) + ack(PUBACK, 2)
    sink.confirm()
    assert conn.sent == ack(PUBACK, 1) + ack(PUBACK, 2) + ack(PUBACK, 4)
    assert route.stats.acked == 2
    assert route.stats.received == route.stats.acked + route.stats.filtered + route.in_flight


def test_a_plain_subscriber_routes_everything() -> None:
    sub, _conn, (route, sink) = subscriber(Subscriber)

    sub.on_publish(publish(1, retain=True))
    sub.on_publish(publish(2, retain=False))

    assert len(sink.items) == 2 and route.stats.filtered == 0


def test_the_example_conforms_to_the_json_schema() -> None:
    schema = json.loads((EXAMPLE.parents[1] / "schema.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    assert [e.message for e in validator.iter_errors(yaml.safe_load(EXAMPLE.read_text()))] == []


def test_retained_only_refuses_a_shared_subscription() -> None:
    issue = only_issue(to_kv().replace("retained_only: true", "retained_only: true, share_group: g"))
    assert issue.path == "routes[0].from"
    assert "retained_only cannot be used with share_group" in issue.message
