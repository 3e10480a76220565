"""Helpers for unit tests: a :class:`Gateway` over in-memory brokers, a dispatcher alone, fakes of the
connector side, and config checks (what a config is refused for)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway, build_routes
from gateway.config.loader import parse_config
from gateway.core.dispatch import Delivery, Dispatcher, Flight, Route
from gateway.core.envelope import Envelope, Receipt
from gateway.core.sink import Item, Sink
from gateway.errors import ConfigError, ConfigIssue
from gateway.routing.patterns import MQTT

StartGateway = Callable[[str], Awaitable[Gateway]]
"""``start(routes)``: a gateway on memory brokers A, B, C with these routes; or, for ``start_config``,
``start(config_text)``: a gateway from a whole config (connectors with their own settings)."""

MEMORY = """\
connectors:
  a: {type: memory}
routes:
  - name: r
    from: {connector: a, topic: "in/{x}"}
    to: {connector: a, topic: "out/{x}"}
"""
"""The smallest valid config: one memory connector, one route."""

WAIT = 5.0
"""Upper bound for any wait on a condition; a healthy run needs a few event-loop turns."""


async def until(predicate: Callable[[], bool], *, check: Callable[[], None] | None = None) -> None:
    """Yield to the event loop until ``predicate()`` holds (bounded by :data:`WAIT`).

    ``check`` runs at every observation, before the predicate (invariants).
    """
    async with asyncio.timeout(WAIT):
        while True:
            if check is not None:
                check()
            if predicate():
                return
            await asyncio.sleep(0)


async def turns(n: int = 50) -> None:
    """Give every runnable task ``n`` event-loop turns: the chance to do what it should not."""
    for _ in range(n):
        await asyncio.sleep(0)


def issues_of(text: str, environ: dict[str, str] | None = None, base_dir: Path | None = None) -> list[ConfigIssue]:
    """What ``text`` is refused for (fails if it is accepted)."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, environ={} if environ is None else environ, base_dir=base_dir)
    return info.value.issues


def only_issue(text: str, environ: dict[str, str] | None = None) -> ConfigIssue:
    issues = issues_of(text, environ)
    assert len(issues) == 1, issues
    return issues[0]


def memory_config(routes: str, brokers: tuple[str, ...] = ("A", "B", "C"), *, extra: str = "") -> str:
    """A config with one memory connector per broker (connector ``a`` on broker ``A``, ...)."""
    lines = ["connectors:"]
    lines += [f"  {name.lower()}: {{type: memory, broker: {name}}}" for name in brokers]
    return "\n".join(lines) + "\n" + extra + "routes:\n" + routes


class RecordingReceipt(Receipt):
    __slots__ = ("settled",)

    def __init__(self) -> None:
        super().__init__()
        self.settled = 0

    def settle(self) -> None:
        self.settled += 1


class RecordingSink(Sink):
    """A sink that only records what routes submit; the test confirms by calling ``flight.done()``."""

    def __init__(self) -> None:
        super().__init__()
        self.items: list[Item] = []

    def submit(self, flight: Flight, delivery: Delivery) -> None:
        self.items.append((flight, delivery))

    def submit_many(self, flights: list[Flight], delivery: Delivery) -> None:
        self.items.extend((flight, delivery) for flight in flights)

    async def write_batch(self, batch: list[Item]) -> None:  # pragma: no cover - never run by these tests
        raise AssertionError("RecordingSink has no writer")

    def confirm(self, n: int | None = None, error: BaseException | None = None) -> None:
        """Finish the first ``n`` recorded items (all by default), oldest first."""
        n = len(self.items) if n is None else n
        done, self.items = self.items[:n], self.items[n:]
        for flight, delivery in done:
            if error is None:
                flight.done()
            else:
                flight.fail(delivery, error)


def dispatcher_for(
    routes_yaml: str, *, cache_size: int = 10_000
) -> tuple[Dispatcher, dict[str, Route], dict[str, RecordingSink]]:
    """A dispatcher over the routes reading from connector ``a``; one RecordingSink per target connector."""
    config = parse_config(memory_config(routes_yaml), environ={})
    routes = build_routes(config)
    sinks: dict[str, RecordingSink] = {}
    for route in routes.values():
        for target in route.targets:
            target.sink = sinks.setdefault(target.connector, RecordingSink())
    own = [r for r in routes.values() if r.source == "a"]
    return Dispatcher(MQTT, own, cache_size=cache_size), routes, sinks


def envelope(topic: str, payload: bytes = b"x") -> tuple[Envelope, RecordingReceipt]:
    receipt = RecordingReceipt()
    return Envelope(topic, payload, receipt=receipt), receipt


@dataclass
class FakeTarget:
    """A route target as a sink reads it: its ``spec`` (the connector's target config)."""

    spec: Any


@dataclass
class FakeDelivery:
    """A rendered target as a sink reads it: the address and the target."""

    address: str
    target: FakeTarget


@dataclass
class FakeFlight:
    """What a connector's sink needs of a flight, for sink tests without a route: its envelope, and where its
    outcome goes (``failed``, ``done_count``). Sinks tell a flight's route when they requeue it; ignored here."""

    env: Envelope
    failed: list[BaseException] = field(default_factory=list)
    done_count: int = 0
    closed: bool = False

    @property
    def route(self) -> FakeFlight:
        return self

    def handed_over(self, flight: Any, now: float) -> None:
        pass

    def fail(self, delivery: Any, error: BaseException) -> None:
        self.failed.append(error)

    def done(self) -> None:
        self.done_count += 1


class FakeTransport:
    """What a protocol (MqttConnection) needs of an asyncio transport; keeps what is written."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.aborted = False

    def write(self, data: bytes | bytearray) -> None:
        self.written += data

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass
