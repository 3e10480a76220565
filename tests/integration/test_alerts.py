"""The shipped alert rules (``deploy/prometheus/alerts.yaml``) with Prometheus' own tool: ``promtool check
rules`` parses them, ``promtool test rules`` runs ``alerts.test.yaml`` (synthetic series: each alert fires for
the unhealthy series, only after its ``for:``, and stays silent for the healthy ones), and ``promtool check
config`` accepts the example ``prometheus.yml``. Every alert has a severity, a summary and a description
that says what to do, and a case in the test file. promtool comes with the Debian package ``prometheus``,
which ``scripts/setup.sh`` installs; without it these tests are skipped and say so."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.brokers import prometheus_bin

pytestmark = pytest.mark.timeout(60)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = DEPLOY / "alerts.yaml"
RULE_TESTS = DEPLOY / "alerts.test.yaml"
SEVERITIES = {"critical", "warning"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = prometheus_bin("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian package prometheus; scripts/setup.sh installs it)")
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=30, cwd=DEPLOY, check=False, stdin=subprocess.DEVNULL
    )


def alerts() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_promtool_checks_the_rules() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_promtool_unit_tests_pass() -> None:
    done = promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_example_prometheus_config_is_valid() -> None:
    done = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_labelled_explained_and_tested() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    }
    fired = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)), "alert names are unique"
    for rule in alerts():
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert set(rule["annotations"]) == {"summary", "description"}, name
        assert len(rule["annotations"]["description"]) > 60, f"{name}: say what to do"
    assert set(names) == tested == fired, "every alert has a case where it fires and one where it does not"
    signals = {
        "GatewayNotReady", "GatewayRouteStalled", "GatewayRouteSaturated", "GatewayRouteSlowConsumerCut",
        "GatewayRouteDropping", "GatewayRouteFailing", "GatewayRouteLatencyHigh", "GatewayConnectorFlapping",
        "GatewayMemoryHigh", "GatewayRouteLagGrowing", "GatewayRouteMessagesOld",
    }  # fmt: skip
    assert signals <= set(names), "the golden signals of README Operations"
