"""Fuzz the NATS sink against a real nats-server: random subjects, replies, headers and payloads.

Each example submits a few messages to the gateway's own ``NatsSink`` on one connection that lives for
the whole module. Whatever happens, no exception escapes the sink's writer, the server never closes the
connection, every message either arrives (subject, payload and headers intact, in order) or fails alone
for a reason an independent reading of nats-server's rules confirms, and every message the rules allow
arrives (nothing is refused for nothing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
import uvloop
from hypothesis import event, given, settings
from hypothesis import strategies as st

from connectors.nats import wire
from connectors.nats.client import GatewayClient
from connectors.nats.config import NatsConfig, NatsTarget
from connectors.nats.sink import NatsSink
from gateway.core.envelope import Envelope
from gateway.core.flight import Delivery, Flight, RoutePlan, Target
from gateway.core.route import Route
from gateway.routing.headers import from_text, to_bytes
from gateway.routing.patterns import MQTT, NATS, compile_pattern
from gateway.routing.templates import compile_template
from tests.support.brokers import NatsServer
from tests.support.nats_rules import HEADERS, NOT_BYTES, SUBJECTS, name_ok, subject_ok

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

MAX_PAYLOAD = 4096

_MESSAGE = st.tuples(
    SUBJECTS,
    st.one_of(st.just(""), st.just("_INBOX.r.1"), SUBJECTS),  # a request route's reply subject
    HEADERS,
    st.one_of(st.binary(max_size=64), st.integers(3900, 4200).map(lambda n: b"p" * n)),
)


@dataclass
class Rig:
    runner: asyncio.Runner
    server: NatsServer
    nc: GatewayClient
    sink: NatsSink
    subscriber: Any
    received: list[Any] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    routes: int = 0


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir: Path = tmp_path_factory.mktemp("nats-fuzz")
    with (
        NatsServer(workdir=workdir, jetstream=False, extra_config=f"max_payload: {MAX_PAYLOAD}\n") as server,
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        received: list[Any] = []

        async def start() -> Rig:
            nc = GatewayClient()
            await nc.connect(servers=[server.url], allow_reconnect=False, max_reconnect_attempts=1)
            sink = NatsSink(NatsConfig(servers=[server.url]))
            await sink.attach(nc)
            sub = await nats.connect(server.url, allow_reconnect=False)

            async def collect(msg: Any) -> None:
                received.append(msg)

            await sub.subscribe(">", cb=collect, pending_msgs_limit=100_000)
            await sub.flush()
            found = Rig(runner, server, nc, sink, sub, received)
            found.tasks = [asyncio.create_task(sink.run_writer()), asyncio.create_task(sink.run_confirmer())]
            return found

        found = runner.run(start())
        yield found

        async def stop() -> None:
            for task in found.tasks:
                task.cancel()
            await asyncio.gather(*found.tasks, return_exceptions=True)
            await found.subscriber.close()
            await found.nc.close()

        runner.run(stop())


def _refusal(subject: str, reply: str, headers: list[tuple[str, str]] | None, payload: bytes) -> str | None:
    """Why nats-server's rules (or the README's name rules) forbid this message, independently of the sink."""
    raw = subject.encode("utf-8", "surrogatepass")
    if not subject_ok(raw) or any(c.isspace() for c in subject):
        return "subject"
    if reply and (not subject_ok(reply.encode("utf-8", "surrogatepass")) or any(c.isspace() for c in reply)):
        return "reply"
    if headers and not all(name_ok(n) for n, _ in headers):
        return "header name"
    if headers and any(NOT_BYTES.search(v) for _, v in headers):
        return "header value"
    block = wire.encode_headers(headers) if headers else b""
    sizes = f"{len(block)} {len(block) + len(payload)}" if block else f"{len(payload)}"
    line = f"{'HPUB' if block else 'PUB'} {subject}{' ' + reply if reply else ''} {sizes}\r\n"
    if len(line.encode()) > wire.MAX_CONTROL_LINE:
        return "control line"
    if len(block) + len(payload) > MAX_PAYLOAD:
        return "max_payload"
    return None


async def _deliver(rig: Rig, messages: list[tuple[str, str, list[tuple[str, str]] | None, bytes]]) -> None:
    rig.routes += 1
    route = Route(f"fuzz-{rig.routes}", "src", None, [])
    template = compile_template("x", compile_pattern("in/#", MQTT), NATS)
    plain = Target(route, 0, "nats", NatsTarget(connector="nats", subject="x"), template, None)
    request = Target(route, 1, "nats", NatsTarget(connector="nats", subject="x"), template, None)
    request.replies = True
    plain.sink = request.sink = rig.sink
    first = len(rig.received)
    flights: list[tuple[Flight, str | None]] = []
    for subject, reply, headers, payload in messages:
        d = Delivery(request if reply else plain, subject, None, None)
        env = Envelope("in/x", payload, headers, None, 0, reply or None)
        flight = Flight(route, env, RoutePlan(route, (d,), None), len(payload))
        route.in_flight += 1
        flights.append((flight, _refusal(subject, reply, headers, payload)))
        rig.sink.submit(flight, d)
    stats = route.stats
    async with asyncio.timeout(10):
        while stats.acked + stats.failed < len(messages):
            await asyncio.sleep(0.002)
        while len(rig.received) - first < stats.acked:
            await asyncio.sleep(0.002)
    assert rig.nc.is_connected and rig.nc.server_error is None and rig.sink.nc is rig.nc, "the connection stayed"
    assert not any(t.done() for t in rig.tasks), "nothing escaped the writer or the confirmer"
    got = rig.received[first:]
    delivered = [(f, why) for f, why in flights if f.error is None]
    assert len(got) == len(delivered)
    for (flight, why), msg in zip(delivered, got, strict=True):
        assert why is None, f"delivered although {why} forbids it"
        env = flight.env
        assert msg.subject == flight.plan.deliveries[0].address and msg.data == env.payload
        assert msg.reply == (env.reply or "")
        sent = {n: to_bytes(v) for n, v in env.headers or ()}
        assert dict(from_text(n, v) for n, v in (msg.headers or {}).items()) == sent, "headers byte for byte"
    for flight, why in flights:
        event(f"refused: {why}" if why is not None else "delivered")  # --hypothesis-show-statistics
        if flight.error is not None:
            assert why is not None, f"refused for nothing: {flight.error}"


@settings(max_examples=150, deadline=None)
@given(st.lists(_MESSAGE, min_size=1, max_size=6))
def test_random_messages_either_arrive_intact_or_fail_alone(
    rig: Rig, messages: list[tuple[str, str, list[tuple[str, str]] | None, bytes]]
) -> None:
    rig.runner.run(_deliver(rig, messages))
