"""Hostile and careless config files, as a new user or an attacker who can write the file would try them.

Through the real CLI (``validate``, ``validate --json``, ``explain``, ``run``) and through ``POST /reload``
on a running gateway moving messages between Mosquitto and nats-server:

- a marker secret put into the config by ``${file:PATH}`` or ``${ENV}`` at every kind of key never
  appears in any output: not in errors, ``--json``, logs or the endpoint's answers;
- "billion laughs" alias expansion, nesting hundreds deep, a list as a mapping key, an endless
  ``${file:/dev/zero}``: exit 2 with a message naming the limit, never a traceback, and a running gateway
  keeps answering /healthz and moving messages while such a file is offered to it;
- absurd numbers are refused, every one of them at once, by key path;
- standard YAML merge keys (``<<: *defaults``) work, with anchors kept under top-level ``x-`` keys;
- 10 000 routes validate.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.support.brokers import Mosquitto, NatsServer
from tests.support.clients.mqtt import MqttPublisher
from tests.support.clients.nats import NatsCollector, nats_connect
from tests.support.configs import mqtt_to_nats
from tests.support.gateway_process import run_cli
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.timeout(180)]

MARKER = "TOPSECRET-7f3a9c"
"""Planted in the secret file's every line and in an environment variable; must never be printed."""
ENV = "E2E_GATEWAY_PLANTED_SECRET"

BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
connectors: {}
"""


def secret_file(tmp_path: Path) -> Path:
    """Like a file of account hashes: several lines, each carrying the marker."""
    path = tmp_path / "accounts"
    path.write_text("".join(f"{MARKER}-user{i}:$6$salt$hash{i}\n" for i in range(30)))
    return path


def leaking_configs(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Configs where the planted value lands where an error could quote it, one kind of key each."""
    secret = secret_file(tmp_path)
    file_ref, env_ref = f"${{file:{secret}}}", f"${{{ENV}}}"

    def base() -> dict[str, Any]:
        return {
            "connectors": {
                "mq": {"type": "mqtt", "url": "mqtt://127.0.0.1:1883", "client_id": "hostile"},
                "bus": {"type": "nats", "servers": ["nats://127.0.0.1:4222"]},
            },
            "routes": [
                {
                    "name": "r",
                    "from": {"connector": "mq", "topic": "in/{device}"},
                    "to": {"connector": "bus", "subject": "out.{device}"},
                }
            ],
        }

    cases: dict[str, dict[str, Any]] = {}
    for how, ref in (("file", file_ref), ("env", env_ref)):
        c = base()
        c["routes"][0]["from"]["connector"] = ref
        cases[f"{how}-source-connector"] = c
        c = base()
        c["routes"][0]["to"]["connector"] = ref
        cases[f"{how}-target-connector"] = c
        c = base()
        c["routes"][0]["from"]["topic"] = f"in/{ref}/+/#/x"
        cases[f"{how}-topic"] = c
        c = base()
        c["routes"][0]["to"]["subject"] = f"out.{ref}.{{nothing}}"
        cases[f"{how}-subject"] = c
        c = base()
        c["connectors"]["mq"]["password_file"] = ref
        c["connectors"]["mq"]["username"] = "u"
        cases[f"{how}-password-file"] = c
        c = base()
        c["connectors"]["bus"]["password"] = ref
        c["connectors"]["bus"]["max_payload"] = ref
        cases[f"{how}-password-and-number"] = c
        c = base()
        c["connectors"]["mq"]["url"] = f"mqtt://user:{ref}@127.0.0.1:notaport"
        cases[f"{how}-url"] = c
        c = base()
        c["gateway"] = {"id": ref, "http": {"listen": ref}}
        cases[f"{how}-gateway"] = c
    return cases


def leaks(*outputs: str) -> list[str]:
    return [line for out in outputs for line in out.splitlines() if MARKER in line or "$6$salt" in line]


def test_planted_secret_is_never_printed(tmp_path: Path) -> None:
    env = {ENV: "\n".join(f"{MARKER}-env{i}" for i in range(3))}
    for name, config in leaking_configs(tmp_path).items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        for args in (
            ("validate", "-c", str(path)),
            ("validate", "--json", "-c", str(path)),
            ("explain", "-c", str(path), "--from", "mq", "in/x"),
            ("run", "-c", str(path), "--log-format", "json"),
        ):
            proc = run_cli(*args, env=env)
            out = proc.stdout + proc.stderr
            assert proc.returncode == 2, f"{name}: {' '.join(args)} exit {proc.returncode}\n{out}"
            assert "Traceback" not in out, f"{name}: {args[0]} printed a traceback\n{out}"
            assert not leaks(out), f"{name}: {' '.join(args)} printed the planted secret:\n{out}"
            if name.endswith("-connector"):
                assert "${" in out, f"{name}: the error should name the reference instead of the value\n{out}"


def hostile_files(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name → (file text, what the one error line must say)."""
    deep_where = "{not: " * 300 + "{topic: {eq: a}}" + "}" * 300
    return {
        "billion-laughs": (BOMB, "expands to more than 2,000,000 values"),
        "nested-300-deep": (
            "connectors:\n  mq: {type: mqtt, url: 'mqtt://127.0.0.1:1883'}\nroutes:\n"
            f"  - name: r\n    where: {deep_where}\n",
            "nested deeper than 64 levels",
        ),
        "list-as-key": ("connectors: {}\n? [a, b]\n: 1\n", "a key must be a plain value"),
        "mapping-as-key": ("connectors: {}\n? {a: b}\n: 1\n", "a key must be a plain value"),
        "endless-file": (
            "connectors:\n  mq: {type: mqtt, url: 'mqtt://127.0.0.1:1883', client_id: '${file:/dev/zero}'}\n",
            "larger than 1 MiB",
        ),
    }


@pytest.mark.parametrize("name", ["billion-laughs", "nested-300-deep", "list-as-key", "mapping-as-key", "endless-file"])
def test_hostile_file_is_refused_by_name_of_the_limit(tmp_path: Path, name: str) -> None:
    text, says = hostile_files(tmp_path)[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    proc = run_cli("validate", "-c", str(path), timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out
    assert says in proc.stderr, out
    as_json = run_cli("validate", "--json", "-c", str(path), timeout=60)
    assert as_json.returncode == 2 and "Traceback" not in as_json.stderr, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["ok"] is False and any(says in e["message"] for e in report["errors"]), report


def test_absurd_numbers_are_all_reported_at_once(tmp_path: Path) -> None:
    text = """\
gateway: {shutdown_timeout: -1, max_headers: 0, reconnect: {initial: .inf}}
connectors:
  mq: {type: mqtt, url: "mqtt://127.0.0.1:1883", connect_timeout: .nan}
  bus: {type: nats, servers: ["nats://127.0.0.1:4222"], pending_bytes_limit: 1000000000000000000}
routes:
  - name: r
    max_in_flight: 1000000000000000000
    retry: {attempts: -1, initial: -3, max: -1, max_time: -10}
    from: {connector: mq, topic: "a/#"}
    to: {connector: bus, subject: "b.x"}
  - name: r2
    slow_consumer_deadline: .inf
    retry: {attempts: 1.0e+21, max_time: .inf}
    from: {connector: mq, topic: "c/#"}
    to: {connector: bus, subject: "c.x"}
"""
    path = tmp_path / "numbers.yaml"
    path.write_text(text)
    proc = run_cli("validate", "-c", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = {line.strip().partition(": ")[0] for line in proc.stderr.splitlines() if line.startswith("  ")}
    assert lines == {
        "gateway.shutdown_timeout",
        "gateway.max_headers",
        "gateway.reconnect.initial",
        "connectors.mq.connect_timeout",
        "connectors.bus.pending_bytes_limit",
        "routes[0].max_in_flight",
        "routes[0].retry.attempts",
        "routes[0].retry.initial",
        "routes[0].retry.max",
        "routes[0].retry.max_time",
        "routes[1].slow_consumer_deadline",
        "routes[1].retry.attempts",
        "routes[1].retry.max_time",
    }, proc.stderr


def test_merge_keys_and_many_routes_validate(tmp_path: Path) -> None:
    merged = tmp_path / "merged.yaml"
    merged.write_text(
        "x-route: &route {max_in_flight: 100, overflow: block, retry: {attempts: 2}}\n"
        "connectors:\n  mq: {type: mqtt, url: 'mqtt://127.0.0.1:1883'}\n"
        "routes:\n"
        "  - <<: *route\n    name: a\n    from: {connector: mq, topic: 'a/#'}\n    to: {connector: mq, topic: 'b/x'}\n"
        "  - <<: *route\n    name: c\n    max_in_flight: 5\n"
        "    from: {connector: mq, topic: 'c/#'}\n    to: {connector: mq, topic: 'd/x'}\n"
    )
    proc = run_cli("validate", "-c", str(merged))
    assert proc.returncode == 0, proc.stderr
    many = tmp_path / "many.yaml"
    routes = [
        {
            "name": f"r{i}",
            "from": {"connector": "mq", "topic": f"in/{i}/#"},
            "to": {"connector": "mq", "topic": f"out/{i}/{{#}}"},
        }
        for i in range(10_000)
    ]
    many.write_text(
        yaml.safe_dump({"connectors": {"mq": {"type": "mqtt", "url": "mqtt://127.0.0.1:1"}}, "routes": routes})
    )
    started = time.monotonic()
    proc = run_cli("validate", "-c", str(many), timeout=120)
    took = time.monotonic() - started
    assert proc.returncode == 0 and "10000 routes" in proc.stdout, proc.stdout + proc.stderr
    print(f"\nVALIDATE 10 000 routes: {took:.2f} s")


# ------------------------------------------------------------------ offered to a running gateway


async def test_running_gateway_refuses_hostile_reloads_and_keeps_moving(
    gateways: Any, mosquitto: Mosquitto, nats_server: NatsServer, tmp_path: Path, unique: str
) -> None:
    """Each hostile file copied over the config of a gateway under traffic, then ``POST /reload``: a 400
    naming the problem (never the planted secret), /healthz answers throughout, nothing is lost."""
    u = unique
    config = mqtt_to_nats(f"hostile-{u}", mosquitto.url, nats_server.url, f"hx/{u}/{{dev}}", f"hx.{u}.{{dev}}")
    gw = gateways(config)
    await gw.astart()
    base = gw.http_url.rstrip("/") if gw.http_url else None
    assert base is not None
    good = gw.config_path.read_text()
    offers = {name: text for name, (text, _) in hostile_files(tmp_path).items()}
    for name, leaking in leaking_configs(tmp_path).items():
        offers[name] = yaml.safe_dump(leaking)
    nc = await nats_connect(nats_server.url)
    collector = await NatsCollector().subscribe(nc, f"hx.{u}.>")
    publisher = MqttPublisher(mosquitto.port, f"hx-pub-{u}")
    publisher.connect()
    sent = 0
    slowest = 0.0
    try:
        async with aiohttp.ClientSession() as http:

            async def pump(seconds: float) -> None:
                nonlocal sent
                until = time.monotonic() + seconds
                while time.monotonic() < until:
                    for _ in range(20):
                        publisher.publish_seq(f"hx/{u}/d{sent % 4}", sent, 4)
                        sent += 1
                    await asyncio.sleep(0.05)

            async def health() -> None:
                nonlocal slowest
                while True:
                    t0 = time.monotonic()
                    async with http.get(f"{base}/healthz", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                        assert resp.status == 200
                    slowest = max(slowest, time.monotonic() - t0)
                    await asyncio.sleep(0.05)

            prober = asyncio.ensure_future(health())
            traffic = asyncio.ensure_future(pump(4.0 + 0.3 * len(offers)))
            try:
                for name, text in offers.items():
                    gw.config_path.write_text(text)
                    async with http.post(f"{base}/reload", timeout=aiohttp.ClientTimeout(total=60)) as resp:
                        body = await resp.text()
                    assert resp.status == 400, f"{name}: HTTP {resp.status} {body}"
                    assert "Traceback" not in body and not leaks(body), f"{name}: {body}"
                    assert json.loads(body)["ok"] is False, body
                    await asyncio.sleep(0.3)
                await traffic
            finally:
                gw.config_path.write_text(good)
                prober.cancel()
                traffic.cancel()
        publisher.wait_accepted(sent)
        await wait_until(lambda: len(collector.messages) >= sent, 30, lambda: f"{len(collector.messages)}/{sent}")
    finally:
        publisher.close()
        await nc.close()
    assert not leaks(gw.log_text()), "the log printed the planted secret"
    assert not [line for line in gw.log_text().splitlines() if "Traceback" in line]
    print(f"\nHOSTILE RELOADS: {len(offers)} refused, {sent} messages all delivered, slowest /healthz {slowest:.3f} s")
    assert slowest < 2.0, f"/healthz took {slowest:.2f} s while a hostile file was checked"
