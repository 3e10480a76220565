"""Tests of tests/support/sasl_proxy.py: successful and refused Kafka SASL logins through the proxy.

Plain client libraries (confluent-kafka, aiokafka) and the module's own raw
client, never the gateway: every mechanism logs in over SASL_PLAINTEXT and
SASL_SSL, records go through to Tansu and back, wrong credentials are
refused with SASL_AUTHENTICATION_FAILED, and nothing but ApiVersions and the
SASL requests is served before a login.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import confluent_kafka as ck
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed

from tests.support.brokers import recv_exact
from tests.support.clients.kafka import kafka_errors, kafka_roundtrip
from tests.support.sasl_proxy import (
    ALL_MECHANISMS,
    API_SASL_AUTHENTICATE,
    API_SASL_HANDSHAKE,
    ERR_ILLEGAL_SASL_STATE,
    ERR_SASL_AUTHENTICATION_FAILED,
    ERR_UNSUPPORTED_SASL_MECHANISM,
    SaslLoginError,
    TansuSasl,
    api_versions,
    sasl_login,
)
from tests.support.secure import GW_PASSWORD, GW_USER, Pki

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]

SCRAM = ("SCRAM-SHA-256", "SCRAM-SHA-512")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuSasl]:
    with TansuSasl(users={GW_USER: GW_PASSWORD, "other": "other-secret"}, workdir=tmp_path_factory.mktemp("sasl")) as k:
        yield k
        assert k.proxy.errors == []


@pytest.fixture(scope="module")
def kafka_legacy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuSasl]:
    """SaslHandshake v0 only: clients send raw SASL tokens (no SaslAuthenticate)."""
    with TansuSasl(handshake_max_version=0, workdir=tmp_path_factory.mktemp("sasl-v0")) as k:
        yield k
        assert k.proxy.errors == []


@pytest.fixture(scope="module")
def kafka_tls(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuSasl]:
    with TansuSasl(tls=pki, workdir=tmp_path_factory.mktemp("sasl-tls")) as k:
        yield k
        assert k.proxy.errors == []


# ------------------------------------------------------------------ helpers


# ------------------------------------------------------------------ confluent-kafka (librdkafka)


@pytest.mark.parametrize("mechanism", ALL_MECHANISMS)
def test_confluent_sasl_plaintext(kafka: TansuSasl, mechanism: str, unique: str) -> None:
    ok, failed = kafka.logins_ok, kafka.logins_failed
    conf = kafka.librdkafka_config(mechanism)
    assert conf["security.protocol"] == "SASL_PLAINTEXT"
    assert kafka_roundtrip(conf, f"sasl-{unique}", mechanism.encode()) == mechanism.encode()
    assert kafka.logins_ok > ok
    assert kafka.logins_failed == failed
    assert f"ok {mechanism} {GW_USER}" in kafka.auth_log


@pytest.mark.parametrize("mechanism", ALL_MECHANISMS)
def test_confluent_wrong_password(kafka: TansuSasl, mechanism: str) -> None:
    failed = kafka.logins_failed
    err = kafka_errors(kafka.librdkafka_config(mechanism, password="wrong"))[0]
    assert err.code() == ck.KafkaError._AUTHENTICATION, err
    assert "Authentication failed" in err.str()
    assert kafka.logins_failed > failed


def test_confluent_unknown_user_and_disabled_mechanism(tmp_path: Path) -> None:
    with TansuSasl(mechanisms=("SCRAM-SHA-512",), workdir=tmp_path) as k:
        err = kafka_errors(k.librdkafka_config("SCRAM-SHA-512", username="nobody"))[0]
        assert err.code() == ck.KafkaError._AUTHENTICATION, err
        err = kafka_errors(k.librdkafka_config("PLAIN"))[0]
        assert "PLAIN" in err.str() and "SCRAM-SHA-512" in err.str(), err  # "... not supported by broker"
        assert k.logins_ok == 0 and k.logins_failed >= 2


def test_confluent_sasl_ssl(kafka_tls: TansuSasl, pki: Pki, unique: str) -> None:
    conf = kafka_tls.librdkafka_config("SCRAM-SHA-512")
    assert conf["security.protocol"] == "SASL_SSL"
    assert kafka_roundtrip(conf, f"sasl-ssl-{unique}", b"over sasl_ssl") == b"over sasl_ssl"
    assert kafka_tls.logins_ok >= 1
    err = kafka_errors(kafka_tls.librdkafka_config("PLAIN", password="wrong"))[0]
    assert err.code() == ck.KafkaError._AUTHENTICATION, err
    # SASL without TLS on the TLS port does not get anywhere
    kafka_errors({**kafka_tls.librdkafka_config("PLAIN"), "security.protocol": "SASL_PLAINTEXT"})[0]


# ------------------------------------------------------------------ aiokafka


async def _aiokafka_roundtrip(conf: dict[str, Any], topic: str, payload: bytes) -> bytes:
    producer = AIOKafkaProducer(**conf)
    await producer.start()
    try:
        await producer.send_and_wait(topic, payload, partition=0)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(**conf, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        msg = await consumer.getone()
        return bytes(msg.value or b"")
    finally:
        await consumer.stop()


async def test_aiokafka_scram_sha_512(kafka: TansuSasl, unique: str) -> None:
    ok = kafka.logins_ok
    payload = await _aiokafka_roundtrip(kafka.aiokafka_config("SCRAM-SHA-512"), f"aio-{unique}", b"aiokafka")
    assert payload == b"aiokafka"
    assert kafka.logins_ok >= ok + 2  # producer and consumer connections


async def test_aiokafka_sasl_ssl_plain(kafka_tls: TansuSasl, unique: str) -> None:
    payload = await _aiokafka_roundtrip(kafka_tls.aiokafka_config("PLAIN"), f"aio-ssl-{unique}", b"aio ssl")
    assert payload == b"aio ssl"


async def test_aiokafka_wrong_password(kafka: TansuSasl) -> None:
    failed = kafka.logins_failed
    producer = AIOKafkaProducer(**kafka.aiokafka_config("SCRAM-SHA-256", password="wrong"), request_timeout_ms=5000)
    # aiokafka logs the SaslAuthenticationFailed (error 58) and raises "Unable to bootstrap"
    with pytest.raises((SaslAuthenticationFailed, KafkaConnectionError)):
        await producer.start()
    await producer.stop()
    assert kafka.logins_failed > failed
    assert any(line.startswith(f"failed SCRAM-SHA-256 {GW_USER}: Authentication failed") for line in kafka.auth_log), (
        kafka.auth_log
    )


# ------------------------------------------------------------------ SaslHandshake v0: raw SASL tokens


def test_raw_tokens_confluent(kafka_legacy: TansuSasl, unique: str) -> None:
    with kafka_legacy.connect() as sock:
        versions = api_versions(sock)
    assert versions[API_SASL_HANDSHAKE] == (0, 0) and API_SASL_AUTHENTICATE not in versions
    for mechanism in ("PLAIN", "SCRAM-SHA-256"):
        conf = kafka_legacy.librdkafka_config(mechanism)
        assert kafka_roundtrip(conf, f"raw-{mechanism}-{unique}", b"raw") == b"raw"
    failed = kafka_legacy.logins_failed
    kafka_errors(kafka_legacy.librdkafka_config("SCRAM-SHA-512", password="wrong"))  # raw framing: just closed
    assert kafka_legacy.logins_failed > failed
    with kafka_legacy.connect() as sock:
        api_versions(sock)
        sasl_login(sock, "SCRAM-SHA-512", GW_USER, GW_PASSWORD, handshake_version=0)


async def test_raw_tokens_aiokafka(kafka_legacy: TansuSasl, unique: str) -> None:
    ok = kafka_legacy.logins_ok
    payload = await _aiokafka_roundtrip(kafka_legacy.aiokafka_config("SCRAM-SHA-512"), f"raw-aio-{unique}", b"x")
    assert payload == b"x"
    assert kafka_legacy.logins_ok >= ok + 2


# ------------------------------------------------------------------ the proxy's protocol, byte level


@pytest.mark.parametrize("version", [0, 1, 2, 3])
def test_api_versions_advertise_sasl(kafka: TansuSasl, version: int) -> None:
    with kafka.connect() as sock:
        versions = api_versions(sock, version)
    assert versions[API_SASL_HANDSHAKE] == (0, 1)
    assert versions[API_SASL_AUTHENTICATE] == (0, 2)
    assert 0 in versions and 1 in versions and 3 in versions  # Tansu's own Produce, Fetch, Metadata


@pytest.mark.parametrize("auth_version", [0, 1, 2])
@pytest.mark.parametrize("mechanism", ALL_MECHANISMS)
def test_sasl_authenticate_versions(kafka: TansuSasl, mechanism: str, auth_version: int) -> None:
    with kafka.connect() as sock:
        api_versions(sock)
        sasl_login(sock, mechanism, "other", "other-secret", authenticate_version=auth_version)
        assert 3 in api_versions(sock, 3)  # now relayed to Tansu unchanged
    with kafka.connect() as sock:
        with pytest.raises(SaslLoginError) as info:
            sasl_login(sock, mechanism, "other", GW_PASSWORD, authenticate_version=auth_version)
        assert info.value.error_code == ERR_SASL_AUTHENTICATION_FAILED
        assert "Authentication failed" in info.value.message
        assert sock.recv(1) == b""  # closed after the failure


def test_refusals_before_login(kafka: TansuSasl) -> None:
    # Metadata before a login: the connection is closed, nothing is answered
    with kafka.connect() as sock:
        header = struct.pack(">hhih", 3, 0, 7, 1) + b"x" + struct.pack(">i", 0)
        sock.sendall(struct.pack(">i", len(header)) + header)
        assert sock.recv(1) == b""
    # unknown mechanism: UNSUPPORTED_SASL_MECHANISM
    with kafka.connect() as sock, pytest.raises(SaslLoginError) as info:
        sasl_login(sock, "GSSAPI", GW_USER, GW_PASSWORD)
    assert info.value.error_code == ERR_UNSUPPORTED_SASL_MECHANISM
    # SaslAuthenticate without a handshake: ILLEGAL_SASL_STATE
    with kafka.connect() as sock:
        body = struct.pack(">hhih", API_SASL_AUTHENTICATE, 1, 5, 1) + b"x" + struct.pack(">i", 0)
        sock.sendall(struct.pack(">i", len(body)) + body)
        (size,) = struct.unpack(">i", recv_exact(sock, 4))
        corr, error = struct.unpack(">ih", recv_exact(sock, size)[:6])
        assert (corr, error) == (5, ERR_ILLEGAL_SASL_STATE)
    # SCRAM for an unknown user
    for mechanism in SCRAM:
        with kafka.connect() as sock, pytest.raises(SaslLoginError) as info:
            sasl_login(sock, mechanism, "nobody", "pw")
        assert info.value.error_code == ERR_SASL_AUTHENTICATION_FAILED


def test_tls_required_on_tls_port(kafka_tls: TansuSasl) -> None:
    with socket.create_connection(kafka_tls.address, timeout=5) as sock, pytest.raises((ConnectionError, OSError)):
        api_versions(sock)
    with kafka_tls.connect() as sock:
        sasl_login(sock, "SCRAM-SHA-256", GW_USER, GW_PASSWORD, authenticate_version=2)
