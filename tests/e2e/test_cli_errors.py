"""The CLI facing user mistakes and a broker that is down at start.

Invalid configs: ``gateway run`` and ``gateway validate`` exit 2 and print one
line per problem naming its key path (``routes[1].to[0].topic: ...``), never a
traceback, and ``run`` connects to nothing. A broker that is down when the
gateway starts: no crash, ``connector.connect_failed`` with a retry delay, and
the connector comes up once the broker does.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.brokers import Mosquitto, NatsServer, free_port
from tests.support.clients.mqtt import MqttPublisher
from tests.support.clients.nats import NatsCollector, nats_connect
from tests.support.configs import gateway_config, mqtt_connector, nats_connector
from tests.support.gateway_process import run_cli
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.timeout(180)]

MISSING_ENV = "E2E_GATEWAY_SURELY_UNSET_VARIABLE"


def base_config() -> dict[str, Any]:
    """A valid config (nothing needs to listen: it is only validated)."""
    return {
        "gateway": {"id": "cli-e2e", "http": {"listen": "127.0.0.1:0"}},
        "connectors": {
            "mq": {"type": "mqtt", "url": "mqtt://127.0.0.1:1883", "client_id": "cli-e2e"},
            "bus": {"type": "nats", "servers": ["nats://127.0.0.1:4222"]},
            "kf": {"type": "kafka", "bootstrap_servers": ["127.0.0.1:9092"], "idempotent": False},
            "mq2": {"type": "mqtt", "url": "mqtt://127.0.0.1:1884"},
        },
        "routes": [
            {
                "name": "ok",
                "from": {"connector": "mq", "topic": "devices/{device}/up"},
                "to": {"connector": "bus", "subject": "up.{device}"},
            },
            {
                "name": "fan",
                "from": {"connector": "mq", "topic": "devices/{device}/telemetry/#"},
                "to": [
                    {"connector": "mq2", "topic": "copy/{device}/{#}"},
                    {"connector": "kf", "topic": "telemetry", "key": "{device}"},
                ],
            },
        ],
    }


def unknown_key(c: dict[str, Any]) -> None:
    c["connectors"]["bus"]["pending_msgs_limitt"] = 5


def wrong_type(c: dict[str, Any]) -> None:
    c["connectors"]["kf"]["linger_ms"] = "soon"


def unknown_connector(c: dict[str, Any]) -> None:
    c["routes"][1]["to"][1]["connector"] = "nowhere"


def absent_capture(c: dict[str, Any]) -> None:
    c["routes"][1]["to"][0]["topic"] = "copy/{sensor}"


def missing_env(c: dict[str, Any]) -> None:
    c["connectors"]["mq"]["client_id"] = "${" + MISSING_ENV + "}"


# (mutation, key path, what the line must also mention)
ERRORS = {
    "unknown-key": (unknown_key, "connectors.bus.pending_msgs_limitt", "unknown key"),
    "wrong-type": (wrong_type, "connectors.kf.linger_ms", "expected int"),
    "unknown-connector": (unknown_connector, "routes[1].to[1].connector", "nowhere"),
    "absent-capture": (absent_capture, "routes[1].to[0].topic", "{sensor}"),
    "missing-env": (missing_env, "connectors.mq.client_id", MISSING_ENV),
}


def write(tmp_path: Path, config: dict[str, Any], name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def issue_lines(stderr: str) -> list[str]:
    """The per-problem lines of an 'invalid config' report (indented under its header)."""
    return [line.strip() for line in stderr.splitlines() if line.startswith("  ")]


def assert_config_rejected(command: str, path: Path, expected: list[tuple[str, str]]) -> None:
    proc = run_cli(command, "-c", str(path), timeout=30)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"{command}: exit {proc.returncode}, expected 2\n{out}"
    assert "Traceback" not in out, f"{command} printed a traceback:\n{out}"
    assert "invalid config" in proc.stderr, out
    lines = issue_lines(proc.stderr)
    assert len(lines) == len(expected), f"{command}: expected {len(expected)} problem lines, got:\n{out}"
    for key_path, mention in expected:
        matching = [line for line in lines if line.startswith(f"{key_path}: ")]
        assert len(matching) == 1, f"{command}: no single line for {key_path}:\n{out}"
        assert mention in matching[0], f"{command}: line for {key_path} does not mention {mention!r}: {matching[0]}"
    if command == "run":
        assert "connector." not in out, f"run with an invalid config must not start connectors:\n{out}"


def test_valid_config_validates(tmp_path: Path) -> None:
    proc = run_cli("validate", "-c", str(write(tmp_path, base_config())))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok" in proc.stdout and "4 connectors, 2 routes" in proc.stdout, proc.stdout


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("error", list(ERRORS))
def test_single_error_reported_by_key_path(tmp_path: Path, command: str, error: str) -> None:
    mutate, key_path, mention = ERRORS[error]
    config = base_config()
    mutate(config)
    assert_config_rejected(command, write(tmp_path, config), [(key_path, mention)])


@pytest.mark.parametrize("command", ["validate", "run"])
def test_every_error_reported_once(tmp_path: Path, command: str) -> None:
    config = base_config()
    for mutate, _, _ in ERRORS.values():
        mutate(config)
    assert_config_rejected(command, write(tmp_path, config), [(p, m) for _, p, m in ERRORS.values()])


def test_two_errors_in_one_entry_both_reported(tmp_path: Path) -> None:
    """DESIGN §5: every error, not only the first one of each entry."""
    config = base_config()
    config["connectors"]["mq"]["keepalive"] = "x"
    config["connectors"]["mq"]["colour"] = "blue"
    assert_config_rejected(
        "validate",
        write(tmp_path, config),
        [("connectors.mq.keepalive", "expected int"), ("connectors.mq.colour", "unknown key")],
    )


@pytest.mark.parametrize("command", ["validate", "run"])
def test_unreadable_and_malformed_files(tmp_path: Path, command: str) -> None:
    missing = run_cli(command, "-c", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2, missing.stderr
    assert "nope.yaml" in missing.stderr and "Traceback" not in missing.stderr + missing.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("connectors:\n  mq: {type: mqtt\nroutes: []\n")
    malformed = run_cli(command, "-c", str(bad))
    assert malformed.returncode == 2, malformed.stderr
    assert re.search(r"YAML syntax error: line \d+", malformed.stderr), malformed.stderr
    assert "Traceback" not in malformed.stderr + malformed.stdout


# ------------------------------------------------------------------ broker down at start


async def test_mqtt_broker_down_at_start(gateways: Any, nats_server: NatsServer, tmp_path: Path, unique: str) -> None:
    """Nothing listens on the MQTT port: the gateway keeps retrying with backoff and connects once it does."""
    port = free_port()
    u = unique
    config = gateway_config(
        f"gw-{u}",
        {
            "mq": mqtt_connector(f"mqtt://127.0.0.1:{port}", f"gw-{u}-mq"),
            "bus": nats_connector(nats_server.url),
        },
        [
            {
                "name": "late-mqtt",
                "from": {"connector": "mq", "topic": f"late/{u}/{{device}}", "qos": 1},
                "to": {"connector": "bus", "subject": f"late.{u}.{{device}}"},
            }
        ],
    )
    config["gateway"]["reconnect"] = {"initial": 0.2, "max": 1.0}
    gw = gateways(config)
    await gw.astart(wait_for=["bus"], fail_fast=False)
    failures = await gw.await_event("connector.connect_failed", 20, count=3, connector="mq")
    assert gw.running, f"gateway died while the broker was down\n{gw.log_tail()}"
    assert not gw.events("connector.connected", connector="mq")
    for i, ev in enumerate(failures[:3], start=1):
        assert ev.get("attempt") == i, ev
        assert isinstance(ev.get("retry_in"), int | float), f"no retry delay logged: {ev}"
        assert 0 <= ev["retry_in"] <= 1.0, f"retry delay outside the configured backoff: {ev}"
        assert str(port) in str(ev.get("error")), f"error should name the address: {ev}"
    assert not gw.problems(), "a refused connection is a warning, not an error:\n" + "\n".join(gw.problems())

    broker = Mosquitto(port=port, workdir=tmp_path / "late-mosquitto")
    await asyncio.to_thread(broker.start)
    nc = await nats_connect(nats_server.url)
    try:
        await gw.await_event("connector.connected", 20, connector="mq")
        col = await NatsCollector().subscribe(nc, f"late.{u}.>")
        pub = MqttPublisher(port, f"pub-{u}")
        await asyncio.to_thread(pub.connect)
        try:
            for seq in range(10):
                pub.publish_seq(f"late/{u}/dev{seq % 2}", seq, 2)
            await asyncio.to_thread(pub.wait_accepted, 10, 10)
        finally:
            await asyncio.to_thread(pub.close)
        await wait_until(lambda: len(col.messages) >= 10, 20, lambda: f"{len(col.messages)} of 10 bridged")
        assert sorted(m.seq for m in col.messages) == list(range(10))
        await gw.astop()
    finally:
        await nc.close()
        await asyncio.to_thread(broker.stop)


async def test_nats_server_down_at_start(gateways: Any, mosquitto: Mosquitto, tmp_path: Path, unique: str) -> None:
    """The same for NATS: no crash, connected once nats-server listens, connect_failed with a retry delay."""
    port = free_port()
    u = unique
    config = gateway_config(
        f"gw-{u}",
        {
            "bus": nats_connector(f"nats://127.0.0.1:{port}", connect_timeout=2),
            "mq": mqtt_connector(mosquitto.url, f"gw-{u}-mq"),
        },
        [
            {
                "name": "late-nats",
                "from": {"connector": "bus", "subject": f"late.{u}.{{device}}"},
                "to": {"connector": "mq", "topic": f"late/{u}/{{device}}", "qos": 1},
            }
        ],
    )
    config["gateway"]["reconnect"] = {"initial": 0.2, "max": 1.0}
    gw = gateways(config)
    await gw.astart(wait_for=["mq"], fail_fast=False)

    def attempts() -> list[dict[str, Any]]:
        return [
            e
            for e in gw.events(connector="bus")
            if e.get("event") in ("connector.connect_failed", "connector.client_error")
        ]

    await gw.await_until(lambda: len(attempts()) >= 2, 20, "two failed connection attempts to NATS")
    assert gw.running, f"gateway died while nats-server was down\n{gw.log_tail()}"
    server = NatsServer(port=port, jetstream=False, workdir=tmp_path / "late-nats")
    await asyncio.to_thread(server.start)
    try:
        await gw.await_event("connector.connected", 20, connector="bus")
        await gw.astop()
    finally:
        await asyncio.to_thread(server.stop)
    failed = gw.events("connector.connect_failed", connector="bus")
    assert failed, "no connector.connect_failed for bus, only: " + ", ".join(e["event"] for e in attempts())
    assert all(0 <= e.get("retry_in", -1) <= 1.0 for e in failed), failed
