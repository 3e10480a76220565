"""TLS, authentication, secrets and hostile input, through the ``gateway`` process against real brokers.

The brokers come from ``tests/support/secure.py``: Mosquitto with a TLS
listener, a password file and ``require_certificate``; nats-server with TLS and
user/password, NKey, token (with client certificates) or operator-mode JWT
users; Tansu behind stunnel for Kafka over TLS / mTLS, and behind the test SASL
proxy (``tests/support/sasl_proxy.py``) for Kafka SASL.

1. One gateway joins all three over mTLS with secrets from files (an encrypted
   Kafka client key included): MQTT traffic reaches NATS and Kafka, and no
   secret appears in its log or in any JSON it serves (which needs the token).
2. Each NATS authentication method carries traffic; Kafka SASL (SCRAM over TLS,
   PLAIN) carries it both ways (librdkafka producing, aiokafka consuming).
3. Every refusal — wrong CA, wrong host name, missing client certificate,
   wrong password, a plaintext server, SASL refused — fails with a clear
   reason, never a plaintext fallback, and the gateway keeps retrying.
4. Oversized payloads and header floods are dead-lettered, not sent; a route
   into its own source is rejected by ``validate``.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import confluent_kafka as ck
import confluent_kafka.admin
import nats
import pytest
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.brokers import Mosquitto, NatsServer, Tansu
from tests.support.clients.mqtt import MqttClient
from tests.support.clients.nats import nats_connect
from tests.support.configs import gateway_config, kafka_connector, mqtt_connector, nats_connector
from tests.support.gateway_process import GatewayProcess, run_cli
from tests.support.sasl_proxy import TansuSasl
from tests.support.secure import GW_PASSWORD, GW_USER, NATS_TOKEN, Pki, SecureMosquitto, SecureNatsServer, TansuTls

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.timeout(120)]

HTTP_TOKEN = "http-token-of-the-security-run-7f3a"
N = 200


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def brokers(pki: Pki) -> Iterator[dict[str, Any]]:
    """Started on first use, stopped at the end of the module."""
    makers: dict[str, Callable[[], Any]] = {
        "mqtt_mtls": lambda: SecureMosquitto(pki, require_certificate=True),
        "nats_operator": lambda: SecureNatsServer(pki, mode="operator"),
        "nats_users": lambda: SecureNatsServer(pki, mode="users", jetstream=False),
        "nats_token_mtls": lambda: SecureNatsServer(pki, mode="token", verify_client=True, jetstream=False),
        "kafka_mtls": lambda: TansuTls(pki, verify_client=True),
        "kafka_wrong_host": lambda: TansuTls(pki, wrong_host=True),
        "kafka_sasl": lambda: TansuTls(pki, authentication=True),
        "plain_mqtt": lambda: Mosquitto(),
        "plain_nats": lambda: NatsServer(),
        "plain_kafka": lambda: Tansu(),
        "kafka_sasl_ssl": lambda: TansuSasl(tls=pki),
        "kafka_sasl_plaintext": lambda: TansuSasl(),
    }

    class Lazy(dict[str, Any]):
        def __missing__(self, key: str) -> Any:
            broker = makers[key]()
            broker.start()
            self[key] = broker
            return broker

    lazy = Lazy()
    yield lazy
    for broker in lazy.values():
        broker.stop()


def secret_file(tmp_path: Path, name: str, value: str) -> str:
    path = tmp_path / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return str(path)


def tls(pki: Pki, *, client: bool = True, ca: Path | None = None, **extra: Any) -> dict[str, Any]:
    block: dict[str, Any] = {"ca_file": str(ca or pki.ca), **extra}
    if client:
        block.update(cert_file=str(pki.client_cert), key_file=str(pki.client_key))
    return block


def memory_route(name: str, *, source: dict[str, Any] | None = None, target: dict[str, Any] | None = None) -> dict:
    """A route that makes ``source``'s or ``target``'s connector connect, with a memory connector on the other end."""
    return {
        "name": name,
        "from": source or {"connector": "mem", "topic": "in"},
        "to": target or {"connector": "mem", "topic": "out"},
    }


def mosquitto_pub(broker: SecureMosquitto, pki: Pki, lines: list[str], topic: str) -> None:
    """Publish one message per line at QoS 1 over mTLS with the C client (keeps stdin open until all are sent)."""
    subprocess.run(
        [
            "mosquitto_pub",
            "-h",
            "localhost",
            "-p",
            str(broker.port),
            "-V",
            "mqttv5",
            "-q",
            "1",
            "--cafile",
            str(pki.ca),
            "--cert",
            str(pki.client_cert),
            "--key",
            str(pki.client_key),
            "-u",
            GW_USER,
            "-P",
            GW_PASSWORD,
            "-i",
            "e2e-security-pub",
            "-t",
            topic,
            "-l",
        ],
        input="\n".join(lines) + "\n",
        text=True,
        check=True,
        timeout=30,
    )


def creds_seed(path: Path) -> str:
    return next(line.strip() for line in Path(path).read_text().splitlines() if line.strip().startswith("SU"))


# ---------------------------------------------------------------- 1. all three over mTLS


async def test_mtls_to_every_broker_carries_traffic_and_leaks_no_secret(
    brokers: dict[str, Any], pki: Pki, tmp_path: Path, gateways: Callable[..., GatewayProcess]
) -> None:
    mq: SecureMosquitto = brokers["mqtt_mtls"]
    ns: SecureNatsServer = brokers["nats_operator"]
    kf: TansuTls = brokers["kafka_mtls"]
    config = gateway_config(
        "gw-secure",
        {
            "devices": mqtt_connector(
                mq.url,
                "gw-secure",
                username=GW_USER,
                password_file=secret_file(tmp_path, "mqtt-password", GW_PASSWORD),
                tls=tls(pki),
            ),
            "bus": nats_connector(ns.url, creds_file=str(ns.creds_file), tls=tls(pki, client=False)),
            "platform": kafka_connector(
                kf.bootstrap,
                tls={
                    "ca_file": str(pki.ca),
                    "cert_file": str(pki.client_cert),
                    "key_file": str(pki.client_key_encrypted),
                    "key_password_file": secret_file(tmp_path, "key-password", pki.client_key_password),
                },
            ),
        },
        [
            {
                "name": "telemetry",
                "from": {"connector": "devices", "topic": "sensors/{id}", "qos": 1},
                "to": [
                    {"connector": "bus", "subject": "sensors.{id}"},
                    {"connector": "platform", "topic": "sensors.{id}"},
                ],
            }
        ],
    )
    config["gateway"]["http"]["token_file"] = secret_file(tmp_path, "http-token", HTTP_TOKEN)
    gw = gateways(config)
    await gw.astart(60)

    nc = await nats.connect(ns.url, tls=pki.client_context(), user_credentials=str(ns.creds_file), connect_timeout=5)
    got: list[bytes] = []

    async def on_msg(msg: Any) -> None:
        got.append(msg.data)

    await nc.subscribe("sensors.>", cb=on_msg)
    await nc.flush()
    try:
        await asyncio.to_thread(mosquitto_pub, mq, pki, [f"m{i}" for i in range(N)], "sensors/d1")
        await gw.await_until(lambda: len(got) >= N, 30, "all on NATS")
    finally:
        await nc.close()
    assert sorted(got) == sorted(f"m{i}".encode() for i in range(N))
    kafka_values = await asyncio.to_thread(consume_tls, kf, pki, "sensors.d1", N)
    assert sorted(kafka_values) == sorted(f"m{i}".encode() for i in range(N))

    # The endpoint wants the token; with it, nothing it serves contains a secret, nor does the log.
    secrets = [GW_PASSWORD, pki.client_key_password, HTTP_TOKEN, creds_seed(ns.creds_file)]
    base = gw.http_url
    assert base is not None
    served = []
    async with aiohttp.ClientSession() as http:
        for path in ("/varz", "/connz", "/routez", "/metrics"):
            async with http.get(base + path) as resp:
                assert resp.status == 401, path
            async with http.get(base + path, headers={"Authorization": f"Bearer {HTTP_TOKEN}"}) as resp:
                assert resp.status == 200, path
                served.append(await resp.text())
    await gw.astop()
    validate = run_cli("validate", "--json", "-c", str(gw.config_path))
    assert validate.returncode == 0, validate.stderr
    for text in (*served, gw.log_text(), validate.stdout, validate.stderr):
        for secret in secrets:
            assert secret not in text
    assert "Traceback" not in gw.log_text()


def consume_tls(kf: TansuTls, pki: Pki, topic: str, n: int) -> list[bytes]:
    consumer = ck.Consumer(
        {
            "bootstrap.servers": kf.bootstrap,
            "group.id": "unused",
            "security.protocol": "ssl",
            "ssl.ca.location": str(pki.ca),
            "ssl.certificate.location": str(pki.client_cert),
            "ssl.key.location": str(pki.client_key),
            "enable.auto.commit": False,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([ck.TopicPartition(topic, p, ck.OFFSET_BEGINNING) for p in partitions])
        values: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(values) < n and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=0.5):
                if msg.error() is None:
                    values.append(msg.value())
        return values
    finally:
        consumer.close()


# ---------------------------------------------------------------- 2. NATS authentication methods


@pytest.mark.parametrize("method", ["password_file", "nkey_seed_file", "token_file+mtls"])
async def test_each_nats_auth_method_carries_traffic(
    method: str, brokers: dict[str, Any], pki: Pki, tmp_path: Path, gateways: Callable[..., GatewayProcess]
) -> None:
    if method == "token_file+mtls":
        ns: SecureNatsServer = brokers["nats_token_mtls"]
        auth: dict[str, Any] = {"token_file": secret_file(tmp_path, "token", NATS_TOKEN), "tls": tls(pki)}
        client: dict[str, Any] = {"token": NATS_TOKEN, "tls": pki.client_context(client_cert=True)}
    else:
        ns = brokers["nats_users"]
        if method == "password_file":
            auth = {"user": GW_USER, "password_file": secret_file(tmp_path, "pw", GW_PASSWORD)}
        else:
            auth = {"nkey_seed_file": str(ns.nkey_seed_file)}
        auth["tls"] = tls(pki, client=False)
        client = {"user": GW_USER, "password": GW_PASSWORD, "tls": pki.client_context()}
    config = gateway_config(
        f"gw-{method}",
        {"bus": nats_connector(ns.url, **auth)},
        [
            {
                "name": "copy",
                "from": {"connector": "bus", "subject": "in.{x}"},
                "to": {"connector": "bus", "subject": "out.{x}"},
            }
        ],
    )
    gw = gateways(config)
    await gw.astart(30)
    nc = await nats.connect(ns.url, connect_timeout=5, allow_reconnect=False, **client)
    got: list[bytes] = []

    async def on_msg(msg: Any) -> None:
        got.append(msg.data)

    try:
        await nc.subscribe("out.>", cb=on_msg)
        await nc.flush()
        for i in range(50):
            await nc.publish(f"in.{i % 3}", str(i).encode())
        await nc.flush()
        await gw.await_until(lambda: len(got) >= 50, 20, "all 50 copied")
    finally:
        await nc.close()
    await gw.astop()


# ---------------------------------------------------------------- 2b. Kafka SASL


@pytest.mark.parametrize(
    ("broker", "mechanism"), [("kafka_sasl_ssl", "SCRAM-SHA-512"), ("kafka_sasl_plaintext", "PLAIN")]
)
async def test_kafka_sasl_login_carries_traffic_both_ways(
    broker: str,
    mechanism: str,
    brokers: dict[str, Any],
    pki: Pki,
    tmp_path: Path,
    gateways: Callable[..., GatewayProcess],
) -> None:
    """SASL to a Kafka-protocol broker (the test SASL proxy in front of Tansu): librdkafka produces, aiokafka
    consumes, each logs in with the password from a file. Over TLS (SASL_SSL) unless the broker is plaintext."""
    kf: TansuSasl = brokers[broker]
    topic = f"sasl-{mechanism.lower()}"
    admin = ck.admin.AdminClient(
        {k: v for k, v in kf.librdkafka_config(mechanism).items() if k != "enable.idempotence"}
    )
    for future in admin.create_topics([ck.admin.NewTopic(topic, 1)]).values():
        future.result(timeout=20)  # the consumer subscribes to an existing topic
    logins_before = kf.logins_ok
    with NatsServer() as ns:
        sasl = {"mechanism": mechanism, "username": GW_USER, "password_file": secret_file(tmp_path, "pw", GW_PASSWORD)}
        platform = kafka_connector(kf.bootstrap, sasl=sasl)
        if kf.security_protocol == "SASL_SSL":
            platform["tls"] = tls(pki, client=False)
        config = gateway_config(
            f"gw-sasl-{mechanism}",
            {"bus": nats_connector(ns.url), "platform": platform},
            [
                {
                    "name": "out",
                    "from": {"connector": "bus", "subject": "in.{x}"},
                    "to": {"connector": "platform", "topic": topic},
                },
                {
                    "name": "back",
                    "from": {"connector": "platform", "topic": topic},
                    "to": {"connector": "bus", "subject": "back.all"},
                },
            ],
        )
        gw = gateways(config)
        await gw.astart(60)
        nc = await nats_connect(ns.url)
        got: list[bytes] = []

        async def on_msg(msg: Any) -> None:
            got.append(msg.data)

        try:
            await nc.subscribe("back.>", cb=on_msg)
            await nc.flush()
            for i in range(100):
                await nc.publish("in.d1", str(i).encode())
            await nc.flush()
            await gw.await_until(lambda: len(set(got)) >= 100, 60, "all 100 back through Kafka")
        finally:
            await nc.close()
        await gw.astop()
    assert {int(v) for v in got} == set(range(100))
    assert kf.logins_ok > logins_before, "the gateway logged in over SASL"
    assert GW_PASSWORD not in gw.log_text()


# ---------------------------------------------------------------- 3. refusals


def refusal_cases() -> dict[str, tuple[str, Callable[[dict[str, Any], Pki, Path], dict[str, Any]], str, list[str]]]:
    """case → (broker key, connector entry, role, what the error must say (any of))."""

    def mqtt(b: dict[str, Any], pki: Pki, tmp: Path, **over: Any) -> dict[str, Any]:
        entry = {"username": GW_USER, "password": GW_PASSWORD, "tls": tls(pki), **over}
        return mqtt_connector(b["mqtt_mtls"].url, "gw-refused", **entry)

    def natsu(b: dict[str, Any], pki: Pki, tmp: Path, **over: Any) -> dict[str, Any]:
        entry = {"user": GW_USER, "password": GW_PASSWORD, "tls": tls(pki, client=False), **over}
        return nats_connector(b["nats_users"].url, **entry)

    def kafka(b: dict[str, Any], pki: Pki, tmp: Path, key: str = "kafka_mtls", **over: Any) -> dict[str, Any]:
        return kafka_connector(b[key].bootstrap, **{"tls": tls(pki), **over})

    cert = ["certificate verify failed", "TLS certificate rejected", "SSL handshake failed", "certificate"]
    host = ["Hostname mismatch", "hostname", "certificate"]
    return {
        "mqtt-wrong-ca": ("mqtt_mtls", lambda b, p, t: mqtt(b, p, t, tls=tls(p, ca=p.other_ca)), "sink", cert),
        "mqtt-wrong-host": (
            "mqtt_mtls",
            lambda b, p, t: mqtt(b, p, t, tls=tls(p, server_name="wrong.example")),
            "sink",
            host,
        ),
        "mqtt-no-client-cert": (
            "mqtt_mtls",
            lambda b, p, t: mqtt(b, p, t, tls=tls(p, client=False)),
            "sink",
            ["certificate required", "CONNACK", "Connection", "closed", "reset"],
        ),
        "mqtt-wrong-password": (
            "mqtt_mtls",
            lambda b, p, t: mqtt(b, p, t, password="not-the-password"),
            "source",
            ["refused the connection", "NOT_AUTHORIZED", "BAD_USER_NAME_OR_PASSWORD"],
        ),
        "mqtt-plaintext-broker": (
            "plain_mqtt",
            lambda b, p, t: mqtt_connector(b["plain_mqtt"].url.replace("mqtt://", "mqtts://"), "gw-r", tls=tls(p)),
            "sink",
            ["during the TLS handshake", "WRONG_VERSION_NUMBER", "record layer"],
        ),
        "nats-wrong-ca": (
            "nats_users",
            lambda b, p, t: natsu(b, p, t, tls=tls(p, client=False, ca=p.other_ca)),
            "sink",
            cert,
        ),
        "nats-wrong-host": (
            "nats_users",
            lambda b, p, t: natsu(b, p, t, tls=tls(p, client=False, server_name="wrong.example")),
            "sink",
            host,
        ),
        "nats-no-client-cert": (
            "nats_token_mtls",
            lambda b, p, t: nats_connector(b["nats_token_mtls"].url, token=NATS_TOKEN, tls=tls(p, client=False)),
            "sink",
            ["certificate required", "TLS", "closed", "Connection", "EOF", "empty response", "Broken pipe"],
        ),
        "nats-wrong-password": (
            "nats_users",
            lambda b, p, t: natsu(b, p, t, password="not-the-password"),
            "source",
            ["Authorization Violation", "authorization"],
        ),
        "nats-plaintext-server": (
            "plain_nats",
            lambda b, p, t: nats_connector(b["plain_nats"].url, tls=tls(p, client=False)),
            "sink",
            ["does not require TLS"],
        ),
        "kafka-wrong-ca": (
            "kafka_mtls",
            lambda b, p, t: kafka(b, p, t, tls=tls(p, ca=p.other_ca)),
            "sink",
            [*cert, "SSL"],
        ),
        "kafka-wrong-ca-consumer": (
            "kafka_mtls",
            lambda b, p, t: kafka(b, p, t, tls=tls(p, ca=p.other_ca)),
            "source",
            [*cert, "SSL", "KafkaConnectionError", "Unable to bootstrap"],
        ),
        "kafka-wrong-host": (
            "kafka_wrong_host",
            lambda b, p, t: kafka(b, p, t, "kafka_wrong_host"),
            "sink",
            [*host, "SSL"],
        ),
        "kafka-no-client-cert": (
            "kafka_mtls",
            lambda b, p, t: kafka(b, p, t, tls=tls(p, client=False)),
            "sink",
            ["SSL", "handshake", "Disconnected", "certificate", "timed out", "Timed out"],
        ),
        "kafka-sasl-refused": (
            "kafka_sasl",
            lambda b, p, t: kafka(
                b, p, t, "kafka_sasl", tls=tls(p, client=False), sasl={"username": GW_USER, "password": GW_PASSWORD}
            ),
            "sink",
            ["SASL", "Authentication", "authentication"],
        ),
        "kafka-sasl-wrong-password": (
            "kafka_sasl_ssl",
            lambda b, p, t: kafka_connector(
                b["kafka_sasl_ssl"].bootstrap,
                tls=tls(p, client=False),
                sasl={"mechanism": "SCRAM-SHA-512", "username": GW_USER, "password": "not-the-password"},
            ),
            "sink",
            ["SASL authentication error", "Authentication failed"],
        ),
        "kafka-plaintext-broker": (
            "plain_kafka",
            lambda b, p, t: kafka_connector(b["plain_kafka"].bootstrap, tls=tls(p, client=False)),
            "sink",
            ["SSL", "handshake", "Broker transport failure"],  # Tansu keeps the socket open, librdkafka says no more
        ),
    }


CASES = refusal_cases()


@pytest.mark.parametrize("case", list(CASES))
async def test_a_refused_connection_says_why_and_keeps_retrying(
    case: str, brokers: dict[str, Any], pki: Pki, tmp_path: Path, gateways: Callable[..., GatewayProcess]
) -> None:
    key, entry, role, reasons = CASES[case]
    brokers[key]
    connector = entry(brokers, pki, tmp_path)
    if connector["type"] == "kafka":
        connector["request_timeout_ms"] = 8000
    else:
        connector["connect_timeout"] = 5
    source = {"connector": "x", **({"topic": "in"} if connector["type"] != "nats" else {"subject": "in"})}
    target = {"connector": "x", **({"topic": "out"} if connector["type"] != "nats" else {"subject": "out"})}
    route = memory_route("r", source=source) if role == "source" else memory_route("r", target=target)
    config = gateway_config(f"gw-{case}", {"x": connector, "mem": {"type": "memory"}}, [route])
    config["gateway"]["reconnect"] = {"initial": 0.1, "max": 0.5}
    gw = gateways(config)
    gw.spawn()
    failures = await gw.await_event("connector.connect_failed", 20, count=2, connector="x")
    errors = " | ".join(str(f["error"]) for f in failures)
    assert any(r in errors for r in reasons), f"{case}: {errors}"
    assert gw.running, "the gateway must keep retrying, not exit"
    base = gw.http_url
    assert base is not None
    async with aiohttp.ClientSession() as http, http.get(base + "/readyz") as resp:
        assert resp.status == 503
    assert not gw.events("connector.connected", connector="x"), "no plaintext fallback, no partial success"
    log = gw.log_text()
    assert "Traceback" not in log and GW_PASSWORD not in log
    await gw.astop()


# ---------------------------------------------------------------- 4. hostile input


async def test_oversized_payloads_and_header_floods_are_dead_lettered(
    tmp_path: Path, gateways: Callable[..., GatewayProcess]
) -> None:
    with Mosquitto() as mq, NatsServer() as ns:
        config = gateway_config(
            "gw-limits",
            {"devices": mqtt_connector(mq.url, "gw-limits"), "bus": nats_connector(ns.url)},
            [
                {
                    "name": "telemetry",
                    "from": {"connector": "devices", "topic": "t/{id}", "qos": 1},
                    "to": {"connector": "bus", "subject": "t.{id}"},
                    "max_payload": 1000,
                    "dead_letter": {"connector": "bus", "subject": "dead.{id}"},
                }
            ],
        )
        config["gateway"]["max_headers"] = 8
        gw = gateways(config)
        await gw.astart(30)
        nc = await nats_connect(ns.url)
        got: dict[str, list[Any]] = {"t": [], "dead": []}

        async def on_msg(msg: Any) -> None:
            got[msg.subject.split(".")[0]].append(msg)

        await nc.subscribe("t.>", cb=on_msg)
        await nc.subscribe("dead.>", cb=on_msg)
        await nc.flush()
        pub = MqttClient(mq.port, "limits-pub")
        pub.connect()
        try:
            flood = Properties(PacketTypes.PUBLISH)
            flood.UserProperty = [(f"h{i}", "v") for i in range(20)]
            infos = [
                pub.client.publish("t/ok", b"x" * 1000, qos=1),
                pub.client.publish("t/big", b"x" * 1001, qos=1),
                pub.client.publish("t/flood", b"small", qos=1, properties=flood),
            ]
            for info in infos:
                info.wait_for_publish(10)
            await gw.await_until(lambda: len(got["t"]) + len(got["dead"]) >= 3, 20, "three outcomes")
        finally:
            pub.close()
            await nc.close()
        assert [m.subject for m in got["t"]] == ["t.ok"], "nothing over a limit is published"
        errors = {m.subject: dict(m.headers or {}) for m in got["dead"]}
        assert errors["dead.big"]["x-gateway-error-type"] == "PayloadTooLarge"
        assert errors["dead.flood"]["x-gateway-error-type"] == "HeadersTooLarge"
        await gw.astop()


def test_validate_rejects_an_echo_loop(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "connectors": {"bus": {"type": "nats"}},
                "routes": [
                    {
                        "name": "echo",
                        "from": {"connector": "bus", "subject": "a.>"},
                        "to": {"connector": "bus", "subject": "a.copy.{>}"},
                    }
                ],
            }
        )
    )
    proc = run_cli("validate", "-c", str(path))
    assert proc.returncode == 2
    assert "routes[0].to.subject" in proc.stderr and "echo loop" in proc.stderr and "allow_loop" in proc.stderr
    assert "Traceback" not in proc.stderr
