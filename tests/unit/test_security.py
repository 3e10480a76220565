"""TLS and credential settings: validation, secret files, redaction in logs, JSON and errors; the HTTP token."""

from __future__ import annotations

import json
import logging
import ssl
from pathlib import Path

import aiohttp
import pytest
import structlog
import trustme

from connectors.kafka.config import KafkaConfig
from connectors.kafka.security import aiokafka_security, librdkafka_security
from connectors.mqtt.config import MqttConfig
from connectors.nats.config import NatsConfig
from gateway.app import Gateway
from gateway.cli import main
from gateway.config.loader import parse_config
from gateway.errors import ConfigError, ConfigIssue
from gateway.ops.logs import configure
from gateway.ops.monitor import Monitor
from gateway.util.redact import scrub


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("localhost")
    client = ca.issue_cert("gateway")
    files = {"ca": d / "ca.pem", "cert": d / "client.pem", "key": d / "client.key", "server": d / "server.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    client.cert_chain_pems[0].write_to_path(str(files["cert"]))
    client.private_key_pem.write_to_path(str(files["key"]))
    server.cert_chain_pems[0].write_to_path(str(files["server"]))
    (d / "not-pem.txt").write_text("hello\n")
    files["junk"] = d / "not-pem.txt"
    return files


def issues(text: str, environ: dict[str, str] | None = None, base_dir: Path | None = None) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, environ=environ or {}, base_dir=base_dir)
    return info.value.issues


def one(connector: str) -> str:
    return f"connectors:\n  x: {connector}\n"


# ---------------------------------------------------------------- TLS blocks


def test_a_full_tls_block_builds_a_verifying_context(pki: dict[str, Path]) -> None:
    cfg = parse_config(
        one(
            f"{{type: mqtt, url: 'mqtts://localhost', tls: {{ca_file: {pki['ca']}, cert_file: {pki['cert']}, "
            f"key_file: {pki['key']}}}}}"
        ),
        environ={},
    ).connectors["x"]
    assert isinstance(cfg, MqttConfig) and cfg.uses_tls and cfg.tls is not None
    ctx = cfg.tls.context()
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2


def test_missing_tls_files_are_config_errors_with_their_key(pki: dict[str, Path]) -> None:
    [issue] = issues(one("{type: nats, servers: ['tls://h:4222'], tls: {ca_file: /nonexistent/ca.pem}}"))
    assert issue.path == "connectors.x.tls.ca_file"
    assert "cannot read /nonexistent/ca.pem" in issue.message


def test_a_file_that_is_not_pem_is_reported_before_any_connect(pki: dict[str, Path]) -> None:
    [issue] = issues(one(f"{{type: mqtt, url: 'mqtts://h', tls: {{ca_file: {pki['junk']}}}}}"))
    assert issue.path == "connectors.x.tls"
    assert "cannot use the TLS files" in issue.message


def test_a_key_that_does_not_match_its_certificate_is_reported(pki: dict[str, Path]) -> None:
    text = one(f"{{type: mqtt, url: 'mqtts://h', tls: {{cert_file: {pki['server']}, key_file: {pki['key']}}}}}")
    [issue] = issues(text)
    assert issue.path == "connectors.x.tls" and "TLS" in issue.message


@pytest.mark.parametrize(
    ("connector", "message"),
    [
        ("{type: mqtt, url: 'mqtt://h', tls: {}}", "use mqtts://"),
        ("{type: mqtt, url: 'mqtts://h', tls: {key_file: k.pem}}", "key_file needs cert_file"),
        ("{type: mqtt, url: 'http://h'}", "expected mqtt://host:port or mqtts://host:port"),
        ("{type: mqtt, password_file: p}", "password_file needs username"),
        ("{type: nats, servers: ['http://h']}", "expected nats://host:port or tls://host:port"),
        ("{type: nats, token: abcd, user: u, password: pass}", "choose one authentication method"),
        ("{type: nats, creds_file: a.creds, nkey_seed_file: u.nk}", "choose one authentication method"),
        ("{type: kafka, bootstrap_servers: [h:9092], tls: {}, security_protocol: PLAINTEXT}", "use SSL or SASL_SSL"),
        ("{type: kafka, bootstrap_servers: [h:9092], security_protocol: SASL_SSL}", "needs a sasl block"),
        ("{type: kafka, bootstrap_servers: [h:9092], sasl: {username: u}}", "exactly one of password"),
        ("{type: kafka, bootstrap_servers: [h:9092], tls: {server_name: n}}", "server_name is not supported"),
    ],
)
def test_inconsistent_security_settings_are_rejected(connector: str, message: str) -> None:
    [issue] = issues(one(connector))
    assert issue.path.startswith("connectors.x"), issue
    assert message in issue.message, issue


def test_kafka_security_protocol_follows_the_blocks(pki: dict[str, Path]) -> None:
    def protocol(extra: str) -> str:
        cfg = parse_config(one(f"{{type: kafka, bootstrap_servers: [h:9092]{extra}}}"), environ={}).connectors["x"]
        assert isinstance(cfg, KafkaConfig)
        return cfg.protocol

    sasl = ", sasl: {mechanism: SCRAM-SHA-256, username: u, password: pass-word}"
    assert protocol("") == "PLAINTEXT"
    assert protocol(f", tls: {{ca_file: {pki['ca']}}}") == "SSL"
    assert protocol(sasl) == "SASL_PLAINTEXT"
    assert protocol(f", tls: {{ca_file: {pki['ca']}}}{sasl}") == "SASL_SSL"


def test_kafka_clients_get_tls_and_sasl_settings(pki: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("kafka-pass-1\n")
    cfg = parse_config(
        one(
            f"{{type: kafka, bootstrap_servers: [h:9092], tls: {{ca_file: {pki['ca']}, cert_file: {pki['cert']}, "
            f"key_file: {pki['key']}}}, sasl: {{username: gw, password_file: {tmp_path / 'pw'}}}}}"
        ),
        environ={},
    ).connectors["x"]
    assert isinstance(cfg, KafkaConfig)
    rd = librdkafka_security(cfg)
    assert rd["security.protocol"] == "sasl_ssl" and rd["ssl.ca.location"] == str(pki["ca"])
    assert rd["ssl.endpoint.identification.algorithm"] == "https"
    assert (rd["sasl.mechanism"], rd["sasl.username"], rd["sasl.password"]) == ("SCRAM-SHA-512", "gw", "kafka-pass-1")
    ak = aiokafka_security(cfg)
    assert ak["security_protocol"] == "SASL_SSL" and isinstance(ak["ssl_context"], ssl.SSLContext)
    assert ak["sasl_plain_password"] == "kafka-pass-1"


# ---------------------------------------------------------------- secrets


def test_secret_files_are_read_at_connect_time_and_checked_at_load(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("nats-token-1\n")
    cfg = parse_config(one(f"{{type: nats, token_file: {token}}}"), environ={}).connectors["x"]
    assert isinstance(cfg, NatsConfig) and cfg.token is None and cfg.token_file == str(token)
    [issue] = issues(one(f"{{type: nats, token_file: {tmp_path / 'missing'}}}"))
    assert issue.path == "connectors.x.token_file" and "cannot read" in issue.message


def test_secrets_from_env_and_files_are_masked_in_text(tmp_path: Path) -> None:
    (tmp_path / "mqtt.pw").write_text("file-secret-42\n")
    parse_config(
        "connectors:\n"
        "  m: {type: mqtt, username: gw, password: '${file:mqtt.pw}'}\n"
        "  n: {type: nats, user: gw, password: '${NATS_PW}'}\n"
        "  u: {type: mqtt, url: 'mqtt://gw:url-secret-7@h:1883'}\n",
        environ={"NATS_PW": "env-secret-17"},
        base_dir=tmp_path,
    )
    text = "auth failed for file-secret-42 / env-secret-17 / mqtt://gw:url-secret-7@h"
    assert scrub(text) == "auth failed for *** / *** / mqtt://gw:***@h"


def test_log_lines_never_show_a_registered_secret(capsys: pytest.CaptureFixture[str]) -> None:
    parse_config(one("{type: nats, user: gw, password: log-secret-99}"), environ={})
    configure("info", "json")
    try:
        structlog.get_logger("t").warning("x.failed", error="server said: bad password log-secret-99")
        try:
            raise RuntimeError("boom log-secret-99")
        except RuntimeError:
            structlog.get_logger("t").exception("x.crashed")
        logging.getLogger("nats.aio.client").warning("reconnect with log-secret-99")
    finally:
        structlog.reset_defaults()
    err = capsys.readouterr().err
    assert "log-secret-99" not in err
    assert err.count("***") >= 2


def test_validate_json_and_errors_never_show_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pw").write_text("json-secret-55\n")
    good = tmp_path / "good.yaml"
    good.write_text(
        "connectors:\n  m: {type: mqtt, url: 'mqtt://gw:url-secret-56@h', client_id: c}\n"
        f"  n: {{type: nats, user: gw, password: '${{file:{tmp_path / 'pw'}}}'}}\n"
        "routes:\n  - {name: r, from: {connector: m, topic: a}, to: {connector: n, subject: b}}\n"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("client_id: c", "client_id: c, protocol: 7"))
    assert main(["validate", "--json", "-c", str(good)]) == 0
    assert main(["validate", "--json", "-c", str(bad)]) == 2
    assert main(["validate", "-c", str(bad)]) == 2
    out = capsys.readouterr()
    assert json.loads(out.out.split("\n}\n")[0] + "\n}")["ok"] is True
    for secret in ("json-secret-55", "url-secret-56"):
        assert secret not in out.out and secret not in out.err


# ---------------------------------------------------------------- the HTTP endpoint


def test_http_token_must_be_long_enough() -> None:
    [issue] = issues("connectors: {}\ngateway: {http: {token: short}}\n")
    assert issue.path == "gateway.http" and "16 characters" in issue.message


async def test_http_token_guards_everything_but_the_probes_and_the_page() -> None:
    token = "t0ken-of-the-test-1234"
    gw = Gateway(parse_config("connectors: {a: {type: memory}}\n", environ={}))
    monitor = Monitor(gw, "127.0.0.1:0", token=token)
    await monitor.start()
    try:
        base = f"http://127.0.0.1:{monitor.port}"
        async with aiohttp.ClientSession() as http:
            for path in ("/healthz", "/"):
                async with http.get(base + path) as resp:
                    assert resp.status == 200, path
            for path in ("/varz", "/metrics", "/routez", "/connz"):
                async with http.get(base + path) as resp:
                    assert resp.status == 401, path
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                async with http.get(base + path, headers={"Authorization": "Bearer wrong-token-000000"}) as resp:
                    assert resp.status == 401, path
                async with http.get(base + path, headers={"Authorization": f"Bearer {token}"}) as resp:
                    assert resp.status == 200, path
            async with http.post(base + "/reload") as resp:
                assert resp.status == 401
    finally:
        await monitor.stop()


def test_served_json_masks_a_secret_that_reached_an_error_text() -> None:
    from gateway.ops.monitor import _dumps

    parse_config(one("{type: nats, token: json-secret-token-31}"), environ={})
    assert json.loads(_dumps({"last_error": "refused json-secret-token-31"})) == {"last_error": "refused ***"}
