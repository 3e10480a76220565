"""Fixtures of the unit suite: gateways on in-memory brokers A, B and C."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from connectors.memory.broker import MemoryBroker
from gateway.app import Gateway
from gateway.config.loader import parse_config
from tests.support.harness import StartGateway, memory_config


@pytest.fixture(autouse=True)
def brokers() -> None:
    MemoryBroker.reset()


@pytest.fixture
async def start_config() -> AsyncIterator[StartGateway]:
    started: list[Gateway] = []

    async def start(text: str) -> Gateway:
        gw = Gateway(parse_config(text, environ={}))
        started.append(gw)
        await gw.start()
        await gw.wait_ready(timeout=5)
        return gw

    yield start
    for name in ("A", "B", "C"):
        MemoryBroker.named(name).release()
    for gw in started:
        await gw.stop(timeout=5)


@pytest.fixture
def start_gateway(start_config: StartGateway) -> StartGateway:
    async def start(routes: str) -> Gateway:
        return await start_config(memory_config(routes))

    return start
