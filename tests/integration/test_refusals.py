"""Broker refusals in words: a wrong password, per protocol, against real brokers with authentication.

The connector's ``last_error`` (what /connz, /readyz and the status page show) and the log line's
``error`` say it in one plain sentence; the protocol's own code stays in a separate log field
(``code`` / ``reason`` for MQTT, ``nats_error`` for NATS, ``kafka_error`` for Kafka). The connector keeps
retrying with its backoff: a refusal is not fatal (the password may be fixed on the broker's side).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from connectors.memory.broker import MemoryBroker
from gateway import Gateway
from gateway.config import parse_config
from tests.support.sasl_proxy import TansuSasl
from tests.support.secure import GW_PASSWORD, GW_USER, Pki, SecureMosquitto, SecureNatsServer
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]

WRONG = "not-the-password"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_mosquitto(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureMosquitto]:
    with SecureMosquitto(pki, workdir=tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker


@pytest.fixture(scope="module")
def secure_nats(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureNatsServer]:
    with SecureNatsServer(pki, mode="users", jetstream=False, workdir=tmp_path_factory.mktemp("nats")) as broker:
        yield broker


@pytest.fixture(scope="module")
def kafka_sasl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuSasl]:
    with TansuSasl(workdir=tmp_path_factory.mktemp("tansu-sasl")) as broker:
        yield broker


async def refused(connector: dict[str, Any], role: str) -> tuple[Gateway, str, list[dict[str, Any]]]:
    """Run a gateway whose connector ``x`` is refused, as a route's source or target, until it has failed
    twice (it keeps retrying); its ``last_error`` and the log lines of the attempts."""
    MemoryBroker.reset()
    kind = connector["type"]
    address = {"subject": "in"} if kind == "nats" else {"topic": "in"}
    mem = {"connector": "mem", "topic": "t"}
    route = {"name": "r", "from": {"connector": "x", **address} if role == "source" else mem}
    route["to"] = mem if role == "source" else {"connector": "x", **address}
    config = {
        "gateway": {"id": "refusals", "reconnect": {"initial": 0.05, "max": 0.2}},
        "connectors": {"x": connector, "mem": {"type": "memory"}},
        "routes": [route],
    }
    with capture_logs() as logs:
        gw = Gateway(parse_config(json.dumps(config), source="test"))  # loggers bound inside the capture
        await gw.start()
        try:
            x = gw.connectors["x"]
            await wait_until(
                lambda: len([e for e in logs if e["event"] == "connector.connect_failed"]) >= 2, 30, "two refusals"
            )
            error = x.last_error
            assert not x.connected.is_set()
            assert x.state.value in ("backoff", "connecting"), "it keeps retrying"
        finally:
            await gw.stop()
    assert error is not None
    return gw, error, logs


def lines(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == event]


@pytest.mark.parametrize(("protocol", "code", "reason"), [(5, "0x87", "Not authorized"), ("3.1.1", "0x05", None)])
async def test_mqtt_wrong_password(
    secure_mosquitto: SecureMosquitto, pki: Pki, protocol: object, code: str, reason: str | None
) -> None:
    connector = {
        "type": "mqtt",
        "url": secure_mosquitto.url,
        "client_id": f"refused-{protocol}",
        "protocol": protocol,
        "username": GW_USER,
        "password": WRONG,
        "tls": {"ca_file": str(pki.ca)},
        "connect_timeout": 5,
    }
    _, error, logs = await refused(connector, "source")
    sentence = "the broker refused the user name or password"
    assert sentence in error, error
    failed = lines(logs, "connector.connect_failed")
    assert all(sentence in f["error"] for f in failed), failed
    said = lines(logs, "connector.refused")
    assert said and said[0]["code"] == code and sentence in said[0]["error"], said
    if reason is not None:
        assert said[0]["reason"] == reason
    else:
        assert said[0]["reason"] == "Connection Refused, not authorized"
    assert WRONG not in repr(logs)


async def test_nats_wrong_password(secure_nats: SecureNatsServer, pki: Pki) -> None:
    connector = {
        "type": "nats",
        "servers": [secure_nats.url],
        "user": GW_USER,
        "password": WRONG,
        "tls": {"ca_file": str(pki.ca)},
        "connect_timeout": 5,
    }
    _, error, logs = await refused(connector, "target")
    sentence = "the server refused the credentials"
    assert sentence in error, error
    assert all(sentence in f["error"] for f in lines(logs, "connector.connect_failed"))
    said = lines(logs, "connector.refused")
    assert said and said[0]["nats_error"] == "Authorization Violation", said
    assert WRONG not in repr(logs)


@pytest.mark.parametrize(("driver", "role"), [("confluent", "target"), ("aiokafka", "target"), ("aiokafka", "source")])
async def test_kafka_wrong_password(kafka_sasl: TansuSasl, driver: str, role: str) -> None:
    connector = {
        "type": "kafka",
        "bootstrap_servers": [kafka_sasl.bootstrap],
        "driver": driver,
        "idempotent": False,
        "request_timeout_ms": 8000,
        "sasl": {"mechanism": "SCRAM-SHA-512", "username": GW_USER, "password": WRONG},
    }
    _, error, logs = await refused(connector, role)
    sentence = "the broker refused the SASL user name or password"
    assert sentence in error, error
    assert all(sentence in f["error"] for f in lines(logs, "connector.connect_failed"))
    said = lines(logs, "connector.refused")
    assert said and said[0]["kafka_error"] in ("SASL_AUTHENTICATION_FAILED", "_AUTHENTICATION"), said
    assert WRONG not in repr(logs) and GW_PASSWORD not in repr(logs)
