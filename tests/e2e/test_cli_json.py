"""``gateway validate --json`` and ``gateway explain --json`` as a subprocess: one JSON document, exit 0 or 2.

Nothing connects to a broker: both commands only read the config. Whatever is
wrong (a missing or unreadable file, broken YAML, an invalid config, an
unknown connector), stdout holds one JSON document, stderr stays empty and the
exit code is 2; the JSON carries what the human output says, key paths included.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.gateway_process import run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def config() -> dict[str, Any]:
    """A valid config over every broker kind (nothing needs to listen: it is only read)."""
    return {
        "gateway": {"id": "json-e2e", "http": {"listen": "127.0.0.1:0"}},
        "connectors": {
            "devices": {"type": "mqtt", "url": "mqtt://127.0.0.1:1883", "client_id": "json-e2e"},
            "bus": {"type": "nats", "servers": ["nats://127.0.0.1:4222"]},
            "platform": {"type": "kafka", "bootstrap_servers": ["127.0.0.1:9092"], "idempotent": False},
            "local": {"type": "memory"},
        },
        "routes": [
            {
                "name": "telemetry",
                "from": {"connector": "devices", "topic": "devices/{device}/telemetry/#"},
                "to": [
                    {"connector": "platform", "topic": "telemetry", "key": "{device}"},
                    {"connector": "bus", "subject": "iot.{device}.telemetry.{#}"},
                ],
                "dead_letter": {"connector": "local", "topic": "dead/{device}"},
            },
            {
                "name": "status",
                "from": {"connector": "devices", "topic": "devices/{device}/status"},
                "to": {"connector": "bus", "subject": "status.{device}"},
            },
            {
                "name": "commands",
                "from": {"connector": "bus", "subject": "cmd.{device}.>", "queue": "gateway"},
                "to": {"connector": "devices", "topic": "devices/{device}/cmd/{>}", "qos": 1},
            },
        ],
    }


def write(tmp_path: Path, cfg: dict[str, Any], name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_json(*args: str) -> tuple[int, Any]:
    """Run the CLI with ``--json``: (exit code, the parsed document); stdout must be JSON alone, stderr empty."""
    proc = run_cli(*args, "--json")
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert proc.stderr == "", f"--json must not write to stderr:\n{proc.stderr}"
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"stdout is not one JSON document:\n{proc.stdout}")
    assert isinstance(doc, dict) and isinstance(doc.get("ok"), bool), doc
    assert doc["ok"] is (proc.returncode == 0), (proc.returncode, doc)
    return proc.returncode, doc


def human(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args)


# ------------------------------------------------------------------ validate


ONE = {"mode": "one", "how": "one worker", "order": "as the source delivers"}
"""How a route runs with one worker (the default): see docs/scaling.md for several."""


def test_validate_json_valid_config(tmp_path: Path) -> None:
    path = write(tmp_path, config())

    code, doc = run_json("validate", "-c", str(path))

    assert code == 0
    assert doc == {
        "ok": True,
        "config": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "connectors": [
            {"name": "devices", "kind": "mqtt"},
            {"name": "bus", "kind": "nats"},
            {"name": "platform", "kind": "kafka"},
            {"name": "local", "kind": "memory"},
        ],
        "routes": [
            {"name": "telemetry", "from": "devices", "to": ["platform", "bus"], "dead_letter": "local", "split": ONE},
            {"name": "status", "from": "devices", "to": ["bus"], "dead_letter": None, "split": ONE},
            {"name": "commands", "from": "bus", "to": ["devices"], "dead_letter": None, "split": ONE},
        ],
        "workers": 1,
    }


def test_validate_json_demo_config() -> None:
    code, doc = run_json("validate", "-c", "config/demo.yaml")

    assert code == 0
    assert [r["name"] for r in doc["routes"]] == ["telemetry", "commands", "orders-to-services", "orders-archive"]


def test_validate_json_lists_every_problem_by_key_path(tmp_path: Path) -> None:
    cfg = config()
    cfg["connectors"]["bus"]["pending_msgs_limitt"] = 5
    cfg["connectors"]["platform"]["linger_ms"] = "soon"
    cfg["routes"][0]["dead_letter"]["topic"] = "dead/{sensor}"  # the other targets are on broken connectors
    cfg["routes"][1]["to"]["connector"] = "nowhere"
    cfg["routes"][2]["to"] = []
    path = write(tmp_path, cfg)

    code, doc = run_json("validate", "-c", str(path))

    assert code == 2
    assert set(doc) == {"ok", "config", "errors"} and doc["config"] == str(path)
    paths = [e["path"] for e in doc["errors"]]
    assert paths == [
        "connectors.bus.pending_msgs_limitt",
        "connectors.platform.linger_ms",
        "routes[0].dead_letter.topic",
        "routes[1].to.connector",
        "routes[2].to",
    ]
    messages = dict(zip(paths, (e["message"] for e in doc["errors"]), strict=True))
    assert messages["connectors.bus.pending_msgs_limitt"].startswith("unknown key")
    assert "expected int" in messages["connectors.platform.linger_ms"]
    assert "{sensor}" in messages["routes[0].dead_letter.topic"]
    assert "'nowhere'" in messages["routes[1].to.connector"]
    assert "at least one target" in messages["routes[2].to"]

    # The same problems as the human report, one line each.
    text = human("validate", "-c", str(path))
    assert text.returncode == 2
    lines = [line.strip() for line in text.stderr.splitlines() if line.startswith("  ")]
    assert lines == [f"{e['path']}: {e['message']}" for e in doc["errors"]]


def test_validate_json_missing_env_variable(tmp_path: Path) -> None:
    cfg = config()
    cfg["connectors"]["devices"]["client_id"] = "${JSON_E2E_SURELY_UNSET}"
    code, doc = run_json("validate", "-c", str(write(tmp_path, cfg)))

    assert code == 2
    [error] = doc["errors"]
    assert error["path"] == "connectors.devices.client_id" and "JSON_E2E_SURELY_UNSET" in error["message"]


@pytest.mark.parametrize(
    ("case", "content", "mention"),
    [
        ("missing", None, "cannot read"),
        ("directory", "", "cannot read"),
        ("malformed", "connectors:\n  mq: {type: mqtt\nroutes: []\n", "YAML syntax error: line "),
        ("duplicate-key", "connectors: {}\nconnectors: {}\n", "duplicate key 'connectors'"),
        ("not-a-mapping", "- connectors\n", "expected a mapping"),
        ("empty", "", "expected a mapping"),
        ("not-utf8", b"connectors: {a: {type: memory, broker: \xff}}\n", "not UTF-8"),
    ],
)
def test_validate_json_unreadable_file(tmp_path: Path, case: str, content: str | bytes | None, mention: str) -> None:
    path = tmp_path / f"{case}.yaml"
    if case == "directory":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)

    code, doc = run_json("validate", "-c", str(path))

    assert code == 2
    assert doc["config"] == str(path)
    [error] = doc["errors"]
    assert error["path"] == ""
    assert mention in error["message"], error


# ------------------------------------------------------------------ explain


def test_explain_json_fan_out_with_key_and_dead_letter(tmp_path: Path) -> None:
    path = write(tmp_path, config())

    code, doc = run_json("explain", "-c", str(path), "--from", "devices", "devices/d1/telemetry/room/temp")

    assert code == 0
    assert doc == {
        "ok": True,
        "config": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "connector": "devices",
        "kind": "mqtt",
        "topic": "devices/d1/telemetry/room/temp",
        "routes": [
            {
                "name": "telemetry",
                "patterns": ["devices/{device}/telemetry/#"],
                "targets": [
                    {
                        "connector": "platform",
                        "kind": "kafka",
                        "address_key": "topic",
                        "address": "telemetry",
                        "key": "d1",
                        "error": None,
                    },
                    {
                        "connector": "bus",
                        "kind": "nats",
                        "address_key": "subject",
                        "address": "iot.d1.telemetry.room.temp",
                        "key": None,
                        "error": None,
                    },
                ],
                "dead_letter": {
                    "connector": "local",
                    "kind": "memory",
                    "address_key": "topic",
                    "address": "dead/d1",
                    "key": None,
                    "error": None,
                },
                "split": ONE,
                "shard_key": None,
                "worker": None,
            }
        ],
    }


def test_explain_json_render_error(tmp_path: Path) -> None:
    path = write(tmp_path, config())

    code, doc = run_json("explain", "-c", str(path), "--from", "bus", "cmd.d+1.reboot")

    assert code == 0
    [route] = doc["routes"]
    [target] = route["targets"]
    assert target["connector"] == "devices" and target["kind"] == "mqtt"
    assert target["address"] is None and target["key"] is None
    assert "'d+1' cannot be an MQTT topic level" in target["error"]


def test_explain_json_no_route(tmp_path: Path) -> None:
    code, doc = run_json("explain", "-c", str(write(tmp_path, config())), "--from", "devices", "elsewhere/d1")

    assert code == 0
    assert doc["routes"] == [] and doc["topic"] == "elsewhere/d1" and doc["kind"] == "mqtt"


def test_explain_json_unknown_connector(tmp_path: Path) -> None:
    code, doc = run_json("explain", "-c", str(write(tmp_path, config())), "--from", "nope", "a/b")

    assert code == 2
    [error] = doc["errors"]
    assert error == {"path": "", "message": "unknown connector 'nope' (connectors: bus, devices, local, platform)"}


def test_explain_json_invalid_config(tmp_path: Path) -> None:
    cfg = config()
    cfg["routes"][1]["to"]["subject"] = "status.{sensor}"

    code, doc = run_json("explain", "-c", str(write(tmp_path, cfg)), "--from", "devices", "devices/d1/status")

    assert code == 2
    assert [e["path"] for e in doc["errors"]] == ["routes[1].to.subject"]


def test_explain_json_missing_file(tmp_path: Path) -> None:
    code, doc = run_json("explain", "-c", str(tmp_path / "nope.yaml"), "--from", "devices", "a/b")

    assert code == 2
    assert "cannot read" in doc["errors"][0]["message"]


@pytest.mark.parametrize(
    ("connector", "topic"),
    [("devices", "devices/d1/telemetry/room/temp"), ("devices", "devices/d 2/status"), ("bus", "cmd.d3.a//b.go")],
)
def test_explain_json_says_what_the_human_output_says(tmp_path: Path, connector: str, topic: str) -> None:
    """Rebuild the human report from the JSON document: the two must agree line for line."""
    path = write(tmp_path, config())
    code, doc = run_json("explain", "-c", str(path), "--from", connector, topic)
    text = human("explain", "-c", str(path), "--from", connector, topic)
    assert code == text.returncode == 0

    n = len(doc["routes"])
    lines = [f"{topic!r} from {connector} ({doc['kind']}): {n} route{'s' if n != 1 else ''}"]
    for route in doc["routes"]:
        lines.append(f"  route {route['name']} (from {', '.join(route['patterns'])})")
        ends = [("->", t) for t in route["targets"]]
        ends += [("-> dead letter:", route["dead_letter"])] if route["dead_letter"] else []
        for arrow, t in ends:
            if t["error"] is not None:
                lines.append(f"    -> {t['connector']} ({t['kind']}): cannot render: {t['error']}")
                continue
            key = f" key={t['key']!r}" if t["key"] is not None else ""
            lines.append(f"    {arrow} {t['connector']} ({t['kind']}) {t['address_key']}={t['address']!r}{key}")
    assert text.stdout.splitlines() == lines
