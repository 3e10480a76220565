"""Smoke tests of the TLS/auth broker fixtures (tests/support/secure.py) with plain client libraries.

paho-mqtt, nats-py and confluent-kafka, never the gateway: each fixture accepts
the right certificates and credentials and rejects a wrong CA, a wrong
hostname, a missing client certificate and wrong credentials.
"""

from __future__ import annotations

import queue
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import paho.mqtt.client as paho
import pytest
from nats.aio.client import Client as NatsClient
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.clients.kafka import kafka_errors, kafka_roundtrip
from tests.support.secure import (
    CLIENT_CN,
    GW_PASSWORD,
    GW_USER,
    SERVER_NAME,
    Pki,
    SecureMosquitto,
    SecureNatsServer,
    TansuTls,
)

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def test_pki_files(pki: Pki) -> None:
    for path in (pki.ca, pki.other_ca, pki.server_cert, pki.server_key, pki.client_cert, pki.client_key):
        assert path.read_bytes().startswith(b"-----BEGIN ")
    assert b"ENCRYPTED" in pki.client_key_encrypted.read_bytes()
    ctx = ssl.create_default_context()
    ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key_encrypted), password=pki.client_key_password)
    assert CLIENT_CN == "gateway"


# ---------------------------------------------------------------- MQTT (paho)


class MqttRefused(Exception):
    """The broker did not accept the MQTT session (CONNACK failure or closed connection)."""


class _Mqtt:
    def __init__(self, client: paho.Client) -> None:
        self.client = client
        self.messages: queue.Queue[bytes] = queue.Queue()

    def roundtrip(self, topic: str, payload: bytes) -> bytes:
        self.client.subscribe(topic, qos=1)  # the broker handles it before the publish (same connection)
        self.client.publish(topic, payload, qos=1)
        return self.messages.get(timeout=5)


class _ClosingContext(ssl.SSLContext):
    """Remembers its sockets: paho does not close the socket when the TLS handshake fails."""

    sockets: list[ssl.SSLSocket]

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        self.sockets.append(sock)
        return sock


def _mqtt_tls(
    pki: Pki, *, ca: Path | None = None, client_cert: bool = False, check_hostname: bool = True
) -> ssl.SSLContext:
    ctx = _ClosingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.sockets = []
    ctx.load_verify_locations(str(ca or pki.ca))
    ctx.check_hostname = check_hostname
    if client_cert:
        ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return ctx


def _mqtt_connect(
    broker: SecureMosquitto, ctx: ssl.SSLContext, username: str | None = GW_USER, password: str | None = GW_PASSWORD
) -> _Mqtt:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}")
    client.tls_set_context(ctx)
    if username is not None:
        client.username_pw_set(username, password)
    outcome: queue.Queue[str] = queue.Queue()
    session = _Mqtt(client)

    def on_connect(c: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        outcome.put("ok" if not reason.is_failure else f"refused: {reason}")

    def on_disconnect(c: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        outcome.put(f"disconnected: {reason}")

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = lambda c, u, msg: session.messages.put(bytes(msg.payload))
    try:
        client.connect(SERVER_NAME, broker.port, keepalive=10)  # TCP + TLS handshake: raises on TLS errors
    except OSError:
        for sock in getattr(ctx, "sockets", []):
            sock.close()
        raise
    client.loop_start()
    try:
        result = outcome.get(timeout=5)
    except queue.Empty:
        result = "no CONNACK"
    if result != "ok":
        client.loop_stop()
        client.disconnect()
        raise MqttRefused(result)
    return session


@pytest.fixture
def mqtt_sessions() -> Iterator[list[_Mqtt]]:
    sessions: list[_Mqtt] = []
    yield sessions
    for s in sessions:
        s.client.disconnect()
        s.client.loop_stop()


def test_mqtt_tls_password(pki: Pki, tmp_path: Path, mqtt_sessions: list[_Mqtt]) -> None:
    with SecureMosquitto(pki, workdir=tmp_path) as broker:
        assert broker.url == f"mqtts://localhost:{broker.port}"
        session = _mqtt_connect(broker, _mqtt_tls(pki))
        mqtt_sessions.append(session)
        assert session.roundtrip("secure/t", b"over tls") == b"over tls"

        with pytest.raises(MqttRefused, match="refused"):
            _mqtt_connect(broker, _mqtt_tls(pki), password="wrong")
        with pytest.raises(MqttRefused, match="refused"):
            _mqtt_connect(broker, _mqtt_tls(pki), username=None)  # anonymous
        with pytest.raises(ssl.SSLCertVerificationError):
            _mqtt_connect(broker, _mqtt_tls(pki, ca=pki.other_ca))


def test_mqtt_mtls(pki: Pki, tmp_path: Path, mqtt_sessions: list[_Mqtt]) -> None:
    with SecureMosquitto(pki, require_certificate=True, workdir=tmp_path) as broker:
        session = _mqtt_connect(broker, _mqtt_tls(pki, client_cert=True))
        mqtt_sessions.append(session)
        assert session.roundtrip("secure/m", b"mutual") == b"mutual"
        # TLS 1.3: the server rejects the missing certificate after the client's handshake ends
        with pytest.raises((MqttRefused, ssl.SSLError, OSError)):
            _mqtt_connect(broker, _mqtt_tls(pki))


def test_mqtt_wrong_hostname(pki: Pki, tmp_path: Path, mqtt_sessions: list[_Mqtt]) -> None:
    with SecureMosquitto(pki, wrong_host=True, workdir=tmp_path) as broker:
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            _mqtt_connect(broker, _mqtt_tls(pki))
        # same CA, no hostname check: accepted, so only the name was wrong
        mqtt_sessions.append(_mqtt_connect(broker, _mqtt_tls(pki, check_hostname=False)))


# ---------------------------------------------------------------- NATS (nats-py)


async def _quiet(exc: Exception) -> None:
    pass


async def _nats(url: str, **kwargs: Any) -> NatsClient:
    return await nats.connect(
        url, connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=0, error_cb=_quiet, **kwargs
    )


async def _nats_roundtrip(nc: NatsClient, unique: str, *, jetstream: bool = True) -> None:
    try:
        sub = await nc.subscribe(f"secure.{unique}")
        await nc.publish(f"secure.{unique}", b"hello")
        assert (await sub.next_msg(timeout=5)).data == b"hello"
        if jetstream:
            js = nc.jetstream()
            await js.add_stream(name=f"S{unique}", subjects=[f"js.{unique}.>"])
            ack = await js.publish(f"js.{unique}.x", b"1")
            assert ack.stream == f"S{unique}"
    finally:
        await nc.close()


async def test_nats_users(pki: Pki, tmp_path: Path, unique: str) -> None:
    with SecureNatsServer(pki, mode="users", workdir=tmp_path) as broker:
        assert broker.url == f"tls://localhost:{broker.port}"
        ctx = pki.client_context()
        await _nats_roundtrip(await _nats(broker.url, tls=ctx, user=GW_USER, password=GW_PASSWORD), unique)
        await _nats_roundtrip(
            await _nats(broker.url, tls=ctx, nkeys_seed=str(broker.nkey_seed_file)), unique, jetstream=False
        )
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await _nats(broker.url, tls=ctx, user=GW_USER, password="wrong")
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await _nats(broker.url, tls=ctx)
        with pytest.raises(ssl.SSLCertVerificationError):
            await _nats(broker.url, tls=pki.client_context(ca=pki.other_ca), user=GW_USER, password=GW_PASSWORD)


async def test_nats_token_mtls(pki: Pki, tmp_path: Path, unique: str) -> None:
    with SecureNatsServer(pki, mode="token", verify_client=True, workdir=tmp_path) as broker:
        ctx = pki.client_context(client_cert=True)
        await _nats_roundtrip(await _nats(broker.url, tls=ctx, token=broker.token), unique)
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await _nats(broker.url, tls=ctx, token="wrong")
        with pytest.raises((OSError, nats.errors.Error)):  # no client certificate
            await _nats(broker.url, tls=pki.client_context(), token=broker.token)
        untrusted = pki.client_context()
        untrusted.load_cert_chain(str(pki.other_client_cert), str(pki.other_client_key))
        with pytest.raises((OSError, nats.errors.Error)):  # client certificate from another CA
            await _nats(broker.url, tls=untrusted, token=broker.token)


async def test_nats_operator_creds(pki: Pki, tmp_path: Path, unique: str) -> None:
    with SecureNatsServer(pki, mode="operator", workdir=tmp_path) as broker:
        assert broker.creds_file.read_text().startswith("-----BEGIN NATS USER JWT-----\n")
        ctx = pki.client_context()
        await _nats_roundtrip(await _nats(broker.url, tls=ctx, user_credentials=str(broker.creds_file)), unique)
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await _nats(broker.url, tls=ctx, user_credentials=str(broker.foreign_creds_file))


async def test_nats_wrong_hostname(pki: Pki, tmp_path: Path) -> None:
    with SecureNatsServer(pki, mode="token", wrong_host=True, jetstream=False, workdir=tmp_path) as broker:
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            await _nats(broker.url, tls=pki.client_context(), token=broker.token)
        # same CA, no hostname check: accepted, so only the name was wrong
        await _nats_roundtrip(
            await _nats(broker.url, tls=pki.client_context(check_hostname=False), token=broker.token),
            "wronghost",
            jetstream=False,
        )


# ---------------------------------------------------------------- Kafka (confluent-kafka) via stunnel


def _kafka_conf(broker: TansuTls, pki: Pki, **extra: Any) -> dict[str, Any]:
    return {
        "bootstrap.servers": broker.bootstrap,
        "security.protocol": "SSL",
        "ssl.ca.location": str(pki.ca),
        "enable.idempotence": False,  # Tansu grants no producer ids
        **extra,
    }


def _kafka_first_error(conf: dict[str, Any], timeout: float = 10.0) -> str:
    return "; ".join(f"{e.name()}: {e.str()}" for e in kafka_errors(conf, timeout))


def test_kafka_tls(pki: Pki, tmp_path: Path, unique: str) -> None:
    with TansuTls(pki, workdir=tmp_path) as broker:
        assert broker.bootstrap == f"localhost:{broker.port}"
        assert kafka_roundtrip(_kafka_conf(broker, pki), f"tls-{unique}", b"over tls") == b"over tls"
        assert "certificate verify failed" in _kafka_first_error(
            _kafka_conf(broker, pki, **{"ssl.ca.location": str(pki.other_ca)})
        )
        _kafka_first_error(_kafka_conf(broker, pki, **{"security.protocol": "PLAINTEXT"}))


def test_kafka_mtls_encrypted_key(pki: Pki, tmp_path: Path, unique: str) -> None:
    with TansuTls(pki, verify_client=True, workdir=tmp_path) as broker:
        conf = _kafka_conf(
            broker,
            pki,
            **{
                "ssl.certificate.location": str(pki.client_cert),
                "ssl.key.location": str(pki.client_key_encrypted),
                "ssl.key.password": pki.client_key_password,
            },
        )
        assert kafka_roundtrip(conf, f"mtls-{unique}", b"over tls") == b"over tls"
        assert "certificate required" in _kafka_first_error(_kafka_conf(broker, pki))


def test_kafka_wrong_hostname(pki: Pki, tmp_path: Path) -> None:
    with TansuTls(pki, wrong_host=True, workdir=tmp_path) as broker:
        assert "certificate verify failed" in _kafka_first_error(_kafka_conf(broker, pki))


def test_kafka_sasl_required_rejects_every_login(pki: Pki, tmp_path: Path) -> None:
    """Tansu ``--authentication``: SASL is enforced, but this Tansu build keeps no SCRAM users."""
    with TansuTls(pki, authentication=True, workdir=tmp_path) as broker:
        sasl = {
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": GW_USER,
            "sasl.password": GW_PASSWORD,
        }
        assert "unknown-user" in _kafka_first_error(_kafka_conf(broker, pki, **sasl))
        _kafka_first_error(_kafka_conf(broker, pki))  # TLS without SASL
