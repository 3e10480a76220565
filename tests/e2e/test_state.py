"""Last-value state through the ``gateway`` process, with real Mosquitto, nats-server and Tansu.

MQTT retained messages mirrored into a JetStream key-value bucket and a compacted
Kafka topic (a cleared retained message becomes a KV delete / a tombstone, a
message without the retain flag is left out), and a key-value bucket published
to MQTT as retained messages, so that a device that connects later gets the
latest value at once and a deleted key clears it. Also the bad inputs: an
invalid bucket name (a config error), a missing bucket (said clearly, and the
gateway recovers once it exists), and config/examples/last-value.yaml end to end.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.js.errors
import paho.mqtt.client as mqtt
import pytest
import yaml
from nats.aio.client import Client as NatsClient
from nats.js.kv import KeyValue

from tests.support.brokers import Mosquitto, NatsServer, Tansu, running
from tests.support.clients.kafka import create_topics, read_records
from tests.support.clients.mqtt import MqttClient, user_properties
from tests.support.clients.nats import nats_connect
from tests.support.configs import gateway_config, kafka_connector, mqtt_connector, nats_connector
from tests.support.gateway_process import GatewayProcess, routez, run_cli
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.timeout(90)]

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "examples" / "last-value.yaml"
DELETED = "<deleted>"
MISSING = "<missing>"


# Own brokers: retained messages outlive a test, and must not surprise tests sharing the session's Mosquitto.
@pytest.fixture(scope="module")
def mq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    yield from running(Mosquitto(workdir=tmp_path_factory.mktemp("state-mosquitto")))


@pytest.fixture(scope="module")
def ns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    yield from running(NatsServer(workdir=tmp_path_factory.mktemp("state-nats")))


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tansu]:
    yield from running(Tansu(workdir=tmp_path_factory.mktemp("state-tansu")))


# ------------------------------------------------------------------ clients


@dataclass
class Seen:
    topic: str
    payload: bytes
    retain: bool
    headers: list[tuple[str, str]]


class Device(MqttClient):
    """An MQTT 5 device: publishes retained state, records what it receives with the retain flag."""

    def __init__(self, port: int, client_id: str, **kwargs: Any) -> None:
        super().__init__(port, client_id, **kwargs)
        self.seen: list[Seen] = []
        self._lock = threading.Lock()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        seen = Seen(msg.topic, bytes(msg.payload), bool(msg.retain), user_properties(getattr(msg, "properties", None)))
        with self._lock:
            self.seen.append(seen)

    def publish_state(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        info = self.publish(topic, payload, retain=retain)
        info.wait_for_publish(10)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS and info.is_published()

    def seen_on(self, topic: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.topic == topic]


def device(broker: Mosquitto, client_id: str) -> Device:
    d = Device(broker.port, client_id)
    d.connect()
    return d


async def kv_value(kv: KeyValue, key: str) -> bytes | str:
    """The key's value, or DELETED (a delete or purge marker is its latest entry), or MISSING."""
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError as exc:  # nats-py raises this for a deleted key too, with its op
        return DELETED if exc.op is not None else MISSING
    return entry.value or b""


async def wait_kv(kv: KeyValue, key: str, want: bytes | str, timeout: float = 15.0) -> None:
    last: list[bytes | str] = []

    async def check() -> bool:
        last[:] = [await kv_value(kv, key)]
        return last[0] == want

    await wait_until(check, timeout, lambda: f"key {key!r}: {last[0]!r}, expected {want!r}")


async def create_bucket(nc: NatsClient, bucket: str) -> KeyValue:
    return await nc.jetstream().create_key_value(bucket=bucket, history=1)


async def create_compacted_topic(bootstrap: str, name: str) -> None:
    await create_topics(bootstrap, [name], 1, configs={"cleanup.policy": "compact"})


async def kafka_records(bootstrap: str, topic: str, n: int) -> list[tuple[bytes | None, Any]]:
    """The first ``n`` records (key, value) of partition 0; a null value stays None (a tombstone)."""
    records = await read_records(bootstrap, topic, n, timeout=20)
    out = [(r.key, r.value) for r in records]
    assert len(out) >= n, f"{topic}: {len(out)} of {n} records after 20 s: {out}"
    return out


async def wait_route(gw: GatewayProcess, route: str, check: Callable[[dict[str, Any]], bool], what: str) -> None:
    last: dict[str, Any] = {}

    async def ok() -> bool:
        last.update((await routez(gw.http_url))[route])
        return check(last)

    await wait_until(ok, 15, lambda: f"route {route}: not {what}: {last}\n{gw.log_tail()}")


def assert_clean(gw: GatewayProcess) -> None:
    assert not gw.problems(), gw.problems()


# ------------------------------------------------------------------ MQTT retained -> key-value bucket


async def test_retained_messages_mirror_into_a_kv_bucket(
    gateways: Callable[..., GatewayProcess], mq: Mosquitto, ns: NatsServer, unique: str
) -> None:
    u, bucket = unique, f"state-{unique}"
    nc = await nats_connect(ns.url)
    pub = device(mq, f"pub-{u}")
    try:
        kv = await create_bucket(nc, bucket)
        pub.publish_state(f"{u}/devices/d0/state", b"booted")  # retained before the gateway runs
        gw = gateways(
            gateway_config(
                f"gw-{u}",
                {"mq": mqtt_connector(mq.url, f"gw-{u}-mq"), "bus": nats_connector(ns.url)},
                [
                    {
                        "name": "state",
                        "from": {"connector": "mq", "topic": f"{u}/devices/{{device}}/state", "retained_only": True},
                        "to": {"connector": "bus", "kv": bucket, "subject": "{topic}"},
                    }
                ],
            )
        )
        await gw.astart()
        key = f"{u}.devices.{{}}.state".format
        await wait_kv(kv, key("d0"), b"booted")  # sent by the broker when the route subscribed

        pub.publish_state(f"{u}/devices/d1/state", b"not retained", retain=False)
        pub.publish_state(f"{u}/devices/d2/state", b"on")
        pub.publish_state(f"{u}/devices/d2/state", b"off")  # an update replaces the value
        await wait_kv(kv, key("d2"), b"off")
        await wait_route(gw, "state", lambda r: r["filtered"] == 1 and r["acked"] == 3, "filtered 1, acked 3")
        assert await kv_value(kv, key("d1")) == MISSING, "a message without the retain flag is not state"

        pub.publish_state(f"{u}/devices/d0/state", b"")  # MQTT "clear retained": the key is deleted
        await wait_kv(kv, key("d0"), DELETED)
        history = await kv.history(key("d0"))
        assert [(e.value or b"", e.operation) for e in history][-1] == (b"", "DEL")
        assert await kv_value(kv, key("d2")) == b"off"
        await wait_route(gw, "state", lambda r: r["acked"] == 4 and r["failed"] == 0, "acked 4")
        await gw.astop()
        assert_clean(gw)
    finally:
        pub.publish_state(f"{u}/devices/d2/state", b"")
        pub.close()
        await nc.close()


async def test_retained_only_on_mqtt_311_sees_the_state_at_subscribe_time(
    gateways: Callable[..., GatewayProcess], mq: Mosquitto, ns: NatsServer, unique: str
) -> None:
    """What the README says of 3.1.1: live updates lose the retain flag, so they wait for the next connect."""
    u, bucket = unique, f"state311-{unique}"
    nc = await nats_connect(ns.url)
    pub = device(mq, f"pub-{u}")
    try:
        kv = await create_bucket(nc, bucket)
        pub.publish_state(f"{u}/d0", b"v1")
        gw = gateways(
            gateway_config(
                f"gw-{u}",
                {"mq": mqtt_connector(mq.url, f"gw-{u}-mq", protocol="3.1.1"), "bus": nats_connector(ns.url)},
                [
                    {
                        "name": "state",
                        "from": {"connector": "mq", "topic": f"{u}/{{device}}", "retained_only": True},
                        "to": {"connector": "bus", "kv": bucket, "subject": "{device}"},
                    }
                ],
            )
        )
        await gw.astart()
        assert gw.events("connector.retained_only_needs_mqtt5", route="state")
        await wait_kv(kv, "d0", b"v1")
        pub.publish_state(f"{u}/d0", b"v2")  # forwarded live without the retain flag by a 3.1.1 broker
        await wait_route(gw, "state", lambda r: r["filtered"] == 1, "filtered 1")
        assert await kv_value(kv, "d0") == b"v1"
        await gw.astop()
        await gw.astart()  # subscribing again: the broker sends the retained state, flag set
        await wait_kv(kv, "d0", b"v2")
        await gw.astop()
    finally:
        pub.publish_state(f"{u}/d0", b"")
        pub.close()
        await nc.close()


# ------------------------------------------------------------------ MQTT retained -> compacted Kafka topic


@pytest.mark.parametrize("driver", ["confluent", "aiokafka"])
async def test_retained_messages_mirror_into_a_compacted_topic_with_tombstones(
    gateways: Callable[..., GatewayProcess], mq: Mosquitto, kafka: Tansu, unique: str, driver: str
) -> None:
    u = unique
    compacted, plain = f"state-{u}", f"plain-{u}"
    await create_compacted_topic(kafka.bootstrap, compacted)
    await create_compacted_topic(kafka.bootstrap, plain)
    pub = device(mq, f"pub-{u}")
    try:
        pub.publish_state(f"{u}/devices/d0/state", b"booted")
        gw = gateways(
            gateway_config(
                f"gw-{u}",
                {"mq": mqtt_connector(mq.url, f"gw-{u}-mq"), "kafka": kafka_connector(kafka.bootstrap, driver=driver)},
                [
                    {
                        "name": "state",
                        "from": {"connector": "mq", "topic": f"{u}/devices/{{device}}/state", "retained_only": True},
                        "to": [
                            {"connector": "kafka", "topic": compacted, "key": "{topic}", "tombstones": True},
                            {"connector": "kafka", "topic": plain, "key": "{device}"},  # no tombstones: b""
                        ],
                    }
                ],
            )
        )
        await gw.astart()
        pub.publish_state(f"{u}/devices/d1/state", b"live, not retained", retain=False)
        pub.publish_state(f"{u}/devices/d0/state", b"")  # cleared
        await wait_route(gw, "state", lambda r: r["acked"] == 2 and r["filtered"] == 1, "acked 2, filtered 1")
        key = f"{u}/devices/d0/state".encode()
        assert await kafka_records(kafka.bootstrap, compacted, 2) == [(key, b"booted"), (key, None)]
        assert await kafka_records(kafka.bootstrap, plain, 2) == [(b"d0", b"booted"), (b"d0", b"")]
        await gw.astop()
        assert_clean(gw)
    finally:
        pub.close()


# ------------------------------------------------------------------ key-value bucket -> MQTT retained


async def test_a_kv_bucket_is_published_as_retained_messages(
    gateways: Callable[..., GatewayProcess], mq: Mosquitto, ns: NatsServer, unique: str
) -> None:
    u, bucket = unique, f"config-{unique}"
    nc = await nats_connect(ns.url)
    watcher = device(mq, f"watch-{u}")
    try:
        kv = await create_bucket(nc, bucket)
        await kv.put("devices.d1.config", b'{"rate": 5}')  # before the gateway runs
        await kv.put("devices.d2.config", b'{"rate": 1}')
        await kv.put("devices.d2.config", b'{"rate": 2}')  # only the last value per key is delivered
        await kv.put("other.d9", b"not matched")
        gw = gateways(
            gateway_config(
                f"gw-{u}",
                {"mq": mqtt_connector(mq.url, f"gw-{u}-mq"), "bus": nats_connector(ns.url)},
                [
                    {
                        "name": "config",
                        "from": {"connector": "bus", "kv": bucket, "subject": "devices.{device}.config"},
                        "to": {"connector": "mq", "topic": f"{u}/devices/{{device}}/config", "retain": True},
                    }
                ],
            )
        )
        await gw.astart()
        await wait_route(gw, "config", lambda r: r["acked"] == 2, "acked 2 (the last value of each key)")

        # A device that connects after the value was put gets it at once, as a retained message.
        late = device(mq, f"late-{u}")
        late.subscribe(f"{u}/devices/d1/config")
        await wait_until(lambda: late.seen_on(f"{u}/devices/d1/config"), 5, "the retained config")
        assert [(s.payload, s.retain) for s in late.seen_on(f"{u}/devices/d1/config")] == [(b'{"rate": 5}', True)]
        late.close()

        watcher.subscribe(f"{u}/devices/+/config")
        await wait_until(lambda: len(watcher.seen) == 2, 5, "both retained configs")
        assert {(s.topic, s.payload) for s in watcher.seen} == {
            (f"{u}/devices/d1/config", b'{"rate": 5}'),
            (f"{u}/devices/d2/config", b'{"rate": 2}'),
        }

        await kv.put("devices.d1.config", b'{"rate": 7}')  # an update reaches connected devices live
        await kv.delete("devices.d1.config")  # and a delete clears the retained message
        await kv.put("devices.d3.config", b'{"rate": 3}')
        await kv.purge("devices.d3.config")  # so does a purge
        await kv.put("devices.d4.config", b'{"rate": 4}')
        d1, d3 = f"{u}/devices/d1/config", f"{u}/devices/d3/config"
        await wait_until(lambda: len(watcher.seen_on(d3)) == 2, 10, "d3 put, then purged")
        assert [s.payload for s in watcher.seen_on(d1)] == [b'{"rate": 5}', b'{"rate": 7}', b""]
        assert ("KV-Operation", "DEL") in watcher.seen_on(d1)[-1].headers
        assert ("KV-Operation", "PURGE") in watcher.seen_on(d3)[-1].headers

        fresh = device(mq, f"fresh-{u}")
        fresh.subscribe(f"{u}/devices/+/config")
        await wait_until(lambda: any(s.topic.endswith("/d4/config") for s in fresh.seen), 5, "the retained d4")
        await asyncio.sleep(0.5)  # retained messages come together at subscribe time: nothing else is coming
        assert sorted((s.topic, s.payload, s.retain) for s in fresh.seen) == [
            (f"{u}/devices/d2/config", b'{"rate": 2}', True),
            (f"{u}/devices/d4/config", b'{"rate": 4}', True),
        ], "deleted and purged keys left no retained message"
        fresh.close()
        await gw.astop()
        assert_clean(gw)
    finally:
        for d in ("d2", "d4"):
            watcher.publish_state(f"{u}/devices/{d}/config", b"")
        watcher.close()
        await nc.close()


# ------------------------------------------------------------------ bad inputs


def test_an_invalid_bucket_name_is_a_config_error(tmp_path: Path) -> None:
    config = gateway_config(
        "gw-bad",
        {"mq": mqtt_connector("mqtt://127.0.0.1:1883", "gw-bad-mq"), "bus": nats_connector("nats://127.0.0.1:4222")},
        [
            {
                "name": "to-kv",
                "from": {"connector": "mq", "topic": "devices/{device}/state", "retained_only": True},
                "to": {"connector": "bus", "kv": "device.state", "subject": "{topic}"},
            },
            {
                "name": "from-kv",
                "from": {"connector": "bus", "kv": "device config", "subject": "devices.{device}.config"},
                "to": {"connector": "mq", "topic": "devices/{device}/config", "retain": True},
            },
            {
                "name": "bad-key",
                "from": {"connector": "mq", "topic": "x/{device}"},
                "to": {"connector": "bus", "kv": "ok", "subject": "state:{device}"},
            },
        ],
    )
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_cli("validate", "-c", str(path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    assert "routes[0].to: kv: 'device.state' is not a key-value bucket name" in out
    assert "routes[1].from: kv: 'device config' is not a key-value bucket name" in out
    assert "routes[2].to: subject: 'state:{device}' is not a key-value key" in out


async def test_a_missing_bucket_is_reported_and_the_gateway_recovers_once_it_exists(
    gateways: Callable[..., GatewayProcess], mq: Mosquitto, ns: NatsServer, unique: str
) -> None:
    """Source: the connector says which bucket is missing and how to create it, and retries. Target: the
    write fails as retriable with the bucket named, then for good once the route's retries are spent."""
    u, src, dst = unique, f"nosrc-{unique}", f"nodst-{unique}"
    nc = await nats_connect(ns.url)
    pub = device(mq, f"pub-{u}")
    try:
        gw = gateways(
            gateway_config(
                f"gw-{u}",
                {"mq": mqtt_connector(mq.url, f"gw-{u}-mq"), "bus": nats_connector(ns.url)},
                [
                    {
                        "name": "from-missing",
                        "from": {"connector": "bus", "kv": src, "subject": "devices.{device}.config"},
                        "to": {"connector": "mq", "topic": f"{u}/devices/{{device}}/config", "retain": True},
                    },
                    {
                        "name": "to-missing",
                        "from": {"connector": "mq", "topic": f"{u}/devices/{{device}}/state", "retained_only": True},
                        "to": {"connector": "bus", "kv": dst, "subject": "{topic}"},
                        "retry": {"attempts": 2, "initial": 0.05, "max": 0.1, "max_time": 2},
                    },
                ],
            )
        )
        gw.spawn()
        failed = await gw.await_event("connector.connect_failed", 20, connector="bus")
        error = failed[0]["error"]
        assert f"key-value bucket {src!r} does not exist" in error and f"nats kv add {src}" in error, error

        kv = await create_bucket(nc, src)  # the next attempt succeeds
        await kv.put("devices.d1.config", b"cfg")
        await gw.await_connected(20, fail_fast=False)
        watcher = device(mq, f"watch-{u}")
        watcher.subscribe(f"{u}/devices/d1/config")
        await wait_until(lambda: watcher.seen, 10, "the config from the bucket created late")
        assert [(s.payload, s.retain) for s in watcher.seen] == [(b"cfg", True)]
        watcher.close()

        pub.publish_state(f"{u}/devices/d1/state", b"on")
        await wait_route(gw, "to-missing", lambda r: r["failed"] == 1, "failed 1")
        routes = await routez(gw.http_url)
        assert routes["to-missing"]["retried"] >= 1
        logged = await gw.await_event("route.delivery_failed", 10, route="to-missing")
        assert f"key-value bucket {dst!r} not found" in logged[0]["error"], logged
        await kv.delete("devices.d1.config")
        await wait_route(gw, "from-missing", lambda r: r["acked"] == 2, "acked 2")
        await gw.astop()
    finally:
        pub.publish_state(f"{u}/devices/d1/state", b"")
        pub.close()
        await nc.close()


# ------------------------------------------------------------------ the worked example


def test_the_example_validates() -> None:
    proc = run_cli("validate", "-c", str(EXAMPLE))
    assert proc.returncode == 0, proc.stderr


async def test_last_value_example_end_to_end(
    gateways: Callable[..., GatewayProcess], mq: Mosquitto, ns: NatsServer, kafka: Tansu, unique: str
) -> None:
    nc = await nats_connect(ns.url)
    pub = device(mq, f"pub-{unique}")
    try:
        state = await create_bucket(nc, "device-state")
        cfg = await create_bucket(nc, "device-config")
        await create_compacted_topic(kafka.bootstrap, "device-state")
        await cfg.put("devices.d1.config", b'{"rate": 5}')
        pub.publish_state("devices/d1/state", b"booted")

        config: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
        config["gateway"] = {"id": f"gw-{unique}", "http": {"listen": "127.0.0.1:0"}}
        config["connectors"]["platform"]["idempotent"] = False  # Tansu grants no producer ids
        env = {"MQTT_URL": mq.url, "NATS_URL": ns.url, "KAFKA_BOOTSTRAP": kafka.bootstrap, "GATEWAY_ID": f"gw-{unique}"}
        gw = gateways(config, env=env)
        await gw.astart()
        await gw.await_event("connector.connected", 20, count=3, connector="devices")  # sink + 2 route sessions

        await wait_kv(state, "devices.d1.state", b"booted")
        await wait_route(gw, "config-to-devices", lambda r: r["acked"] == 1, "acked 1")
        d1 = device(mq, f"d1-{unique}")  # a device connecting now gets its configuration at once
        d1.subscribe("devices/d1/config")
        await wait_until(lambda: d1.seen, 5, "d1's retained configuration")
        assert [(s.payload, s.retain) for s in d1.seen] == [(b'{"rate": 5}', True)]

        pub.publish_state("devices/d2/state", b"telemetry, not state", retain=False)
        pub.publish_state("devices/d1/state", b"")  # cleared: a KV delete and a tombstone
        await wait_kv(state, "devices.d1.state", DELETED)
        records = await kafka_records(kafka.bootstrap, "device-state", 2)
        assert records == [(b"devices/d1/state", b"booted"), (b"devices/d1/state", None)]
        await cfg.delete("devices.d1.config")  # clears the retained configuration
        await wait_until(lambda: len(d1.seen) == 2, 10, "the cleared configuration")
        assert d1.seen[-1].payload == b""
        routes = await routez(gw.http_url)
        assert routes["state-to-kv"]["filtered"] == 1 and routes["state-to-kafka"]["filtered"] == 1
        assert routes["state-to-kv"]["acked"] == 2 and routes["state-to-kafka"]["acked"] == 2
        assert await kv_value(state, "devices.d2.state") == MISSING
        d1.close()
        await gw.astop()
        assert_clean(gw)
    finally:
        pub.close()
        await nc.close()
