"""Request routes: what the config accepts, and the table of requests waiting for an answer.

The end-to-end behaviour (NATS ↔ MQTT 5 / 3.1.1, timeouts, the 100 000-request flood) is in
tests/e2e/test_request_reply.py; here, the rules and the table's bookkeeping without brokers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.config.loader import parse_config
from gateway.config.options import RequestConfig, RequestLeg
from gateway.core.envelope import Envelope
from gateway.core.flight import Delivery, RoutePlan
from gateway.core.policies import RouteState
from gateway.core.route import Route
from gateway.errors import ConfigError
from gateway.routes.requests import Requests

CONNECTORS = """\
connectors:
  m: {type: mqtt, url: "mqtt://127.0.0.1:1883"}
  old: {type: mqtt, url: "mqtt://127.0.0.1:1883", protocol: "3.1.1"}
  n: {type: nats}
  k: {type: kafka, bootstrap_servers: ["127.0.0.1:9092"]}
gateway: {id: "edge 1"}
routes:
"""


def problems(routes: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(CONNECTORS + routes, environ={})
    return [f"{i.path}: {i.message}" for i in info.value.issues]


def test_a_request_route_gets_a_companion_route_for_the_answers() -> None:
    config = parse_config(
        CONNECTORS
        + """\
  - name: cmd
    from: {connector: n, subject: "cmd.{device}"}
    to: {connector: m, topic: "devices/{device}/cmd"}
    request: {timeout: 2}
  - name: legacy
    from: {connector: n, subject: "legacy.{device}"}
    to: {connector: old, topic: "legacy/{device}/cmd"}
    request: {}
  - name: ask
    from: {connector: m, topic: "ask/{svc}"}
    to: {connector: n, subject: "svc.{svc}"}
    request: {reply_to: "_INBOX.mine"}
""",
        environ={},
    )
    routes = {rc.name: rc for rc in config.routes}
    assert list(routes) == ["cmd", "cmd.replies", "legacy", "legacy.replies", "ask", "ask.replies"]
    cmd, replies = routes["cmd"], routes["cmd.replies"]
    assert cmd.request is not None and cmd.request.mode == "properties"
    assert cmd.request.reply_to == "gateway/edge_1/replies/cmd", "unsafe characters of the id are replaced"
    assert replies.request is not None and replies.request.replies_for == "cmd"
    assert replies.section.from_ == {"connector": "m", "topic": "gateway/edge_1/replies/cmd", "qos": 1}
    assert replies.targets[0].spec.connector == "n"
    legacy = routes["legacy"].request
    assert legacy is not None and legacy.mode == "topic", "3.1.1 connectors default to the topic convention"
    assert routes["legacy.replies"].section.from_["topic"] == "gateway/edge_1/replies/legacy/+"
    assert routes["ask.replies"].section.from_ == {"connector": "n", "subject": "_INBOX.mine.*"}


def test_request_routes_are_checked() -> None:
    found = problems(
        """\
  - name: a
    from: {connector: k, topic: "x"}
    to: {connector: n, subject: "y"}
    request: {}
  - name: b
    from: {connector: n, subject: "x"}
    to: [{connector: m, topic: "y"}, {connector: m, topic: "z"}]
    request: {}
  - name: c
    from: {connector: n, subject: "x2"}
    to: {connector: old, topic: "y"}
    request: {correlation: properties}
  - name: d
    from: {connector: m, topic: "q"}
    to: {connector: n, subject: "s", jetstream: true}
    request: {}
  - name: e
    from: {connector: m, topic: "q2"}
    to: {connector: n, subject: "s"}
    request: {reply_to: "bad.*.x"}
  - name: f
    from: {connector: n, subject: "x3"}
    to: {connector: m, topic: "y"}
    request: {reply_to: "a/#", timeout: 0}
  - name: g
    from: {connector: n, subject: "x4"}
    to: {connector: n, subject: "y4"}
    request: {correlation: topic}
  - name: h.replies
    from: {connector: n, subject: "x5"}
    to: {connector: m, topic: "y5"}
  - name: h
    from: {connector: n, subject: "x6", stream: S}
    to: {connector: m, topic: "y6"}
    request: {}
  - name: j
    from: {connector: old, topic: "ask311"}
    to: {connector: n, subject: "svc"}
    request: {}
  - name: i.replies
    from: {connector: n, subject: "x7"}
    to: {connector: m, topic: "y7"}
  - name: i
    from: {connector: n, subject: "x8"}
    to: {connector: m, topic: "y8"}
    request: {}
"""
    )
    assert found == [
        "routes[0].request: request/reply needs a NATS or MQTT source, not kafka",
        "routes[1].request: a request route has exactly one target (the responder's side)",
        "routes[2].request.correlation: properties needs MQTT 5; connector 'old' speaks 3.1.1 (use correlation: topic)",
        "routes[3].request: request/reply needs a core NATS target (jetstream/kv publishes are not requests)",
        "routes[4].request.reply_to: 'bad.*.x' cannot be published to: NATS subjects have no empty, wildcard or "
        "whitespace tokens",
        "routes[5].request.timeout: expected float > 0.0",
        "routes[6].request.correlation: applies to MQTT targets only",
        "routes[8].request: request/reply needs a core NATS source (without stream or kv)",
        "routes[9].request: MQTT requests carry their response topic in MQTT 5 properties; connector 'old' "
        "speaks 3.1.1",
        "routes[11].name: 'i.replies', the route carrying the answers, is taken by routes[10]",
    ]


class Answers:
    """Stands in for the companion route: records what would be published to which requester."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, dict[str, str]]] = []
        self.state = RouteState.RUNNING

    def deliver(self, env: Envelope, entry: Any) -> None:
        self.sent.append((entry.address, env.correlation, dict(env.headers or ())))


def table(responder: str = "mqtt", mode: str = "properties", **config: Any) -> tuple[Requests, Answers]:
    t = Requests("cmd", RequestLeg(RequestConfig(**config), responder, mode, "replies/here"))
    answers = Answers()
    t.reply_route = answers  # type: ignore[assignment]
    return t, answers


PLAN = RoutePlan(Route("cmd", "n", None, []), (), None)


def request(reply: str, correlation: bytes | None = None) -> Envelope:
    return Envelope("cmd.d1", b"op", reply=reply, correlation=correlation)


async def test_requests_expire_oldest_first_with_an_error_reply() -> None:
    t, answers = table(timeout=0.05)
    for i in range(3):
        opened = t.open(request(f"_INBOX.{i}"), PLAN)
        assert opened is not None
        env, _ = opened
        assert env.reply == "replies/here" and env.correlation is not None
    assert t.pending == 3
    async with asyncio.timeout(5):
        while t.pending:
            await asyncio.sleep(0.01)
    assert [a for a, _, _ in answers.sent] == ["_INBOX.0", "_INBOX.1", "_INBOX.2"]
    assert {h["Nats-Service-Error-Code"] for _, _, h in answers.sent} == {"504"}
    assert t.stats.as_dict() == {"failed": 0, "forwarded": 3, "late": 0, "rejected": 0, "replied": 0, "timed_out": 3}


async def test_a_full_table_refuses_at_once_and_an_answer_frees_a_place() -> None:
    t, answers = table(max_pending=2)
    first = t.open(request("_INBOX.a", b"mine"), PLAN)
    assert first is not None and t.open(request("_INBOX.b"), PLAN) is not None
    assert t.open(request("_INBOX.c"), PLAN) is None
    assert answers.sent == [("_INBOX.c", None, answers.sent[0][2])]
    assert answers.sent[0][2]["Nats-Service-Error-Code"] == "503"
    env, _ = first
    entry = t.answer(Envelope("replies/here", b"ok", correlation=env.correlation))
    assert entry is not None and (entry.address, entry.correlation) == ("_INBOX.a", b"mine")
    assert t.answer(Envelope("replies/here", b"again", correlation=env.correlation)) is None, "answered once"
    assert t.open(request("_INBOX.d"), PLAN) is not None
    assert (t.stats.replied, t.stats.late, t.stats.rejected) == (1, 1, 1)
    t.close()
    assert t.pending == 0 and len(answers.sent) == 3, "closing answers what still waits"


async def test_nats_responders_and_the_mqtt_311_convention_carry_the_id_in_the_name() -> None:
    t, _ = table(responder="nats", mode="subject")
    opened = t.open(request("_INBOX.x"), PLAN)
    assert opened is not None
    env, _ = opened
    assert env.reply is not None and env.reply.startswith("replies/here.")
    assert t.answer(Envelope(env.reply, b"ok")) is not None
    t.close()
    t311, _ = table(mode="topic")
    route = Route("cmd", "n", None, [])
    target = type("T", (), {"sink": None, "max_payload": 1 << 30, "replies": False})()
    plan = RoutePlan(route, (Delivery(target, "legacy/d1/cmd", None, None),), None)  # type: ignore[arg-type]
    opened = t311.open(request("_INBOX.y"), plan)
    assert opened is not None
    env, new_plan = opened
    assert env.reply is None, "3.1.1 has no response topic"
    topic = new_plan.deliveries[0].address
    assert topic.startswith("legacy/d1/cmd/")
    assert t311.answer(Envelope("replies/here/" + topic.rsplit("/", 1)[1], b"ok")) is not None
    t311.close()


async def test_only_the_forwarded_request_aborts_its_entry_and_no_responders_is_an_error() -> None:
    t, answers = table(responder="nats", mode="subject")
    opened = t.open(request("_INBOX.r1"), PLAN)
    assert opened is not None
    env, _ = opened
    stranger = Envelope("lookup/x", b"", correlation=env.correlation)  # a one-way message with the same bytes
    t.abort(stranger, 502, "nope")
    assert t.pending == 1 and not answers.sent, "another message's correlation cannot end this request"
    assert env.reply is not None
    status = Envelope(env.reply, b"", [("Status", "503")])
    assert t.answer(status) is None
    assert t.pending == 0 and answers.sent[0][0] == "_INBOX.r1"
    assert answers.sent[0][2]["Nats-Service-Error-Code"] == "503"
    assert t.stats.failed == 1 and t.stats.replied == 0


async def test_a_shorter_timeout_from_a_reload_applies_to_waiting_requests() -> None:
    t, answers = table(timeout=60)
    assert t.open(request("_INBOX.slow"), PLAN) is not None
    t.configure(RequestLeg(RequestConfig(timeout=0.05), "mqtt", "properties", "replies/here"))
    async with asyncio.timeout(5):
        while t.pending:
            await asyncio.sleep(0.01)
    assert answers.sent[0][2]["Nats-Service-Error-Code"] == "504"
