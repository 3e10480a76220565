"""Fixtures of the unit suite: gateways on in-memory brokers A, B and C."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from connectors.memory.broker import MemoryBroker
from gateway.app import Gateway
from gateway.config.loader import parse_config
from tests.unit.harness import memory_config

StartGateway = Callable[[str], Awaitable[Gateway]]


@pytest.fixture(autouse=True)
def brokers() -> None:
    MemoryBroker.reset()


@pytest.fixture
async def start_gateway() -> AsyncIterator[StartGateway]:
    started: list[Gateway] = []

    async def start(routes: str) -> Gateway:
        gw = Gateway(parse_config(memory_config(routes), environ={}))
        started.append(gw)
        await gw.start()
        await gw.wait_ready(timeout=5)
        return gw

    yield start
    for name in ("A", "B", "C"):
        MemoryBroker.named(name).release()
    for gw in started:
        await gw.stop(timeout=5)
