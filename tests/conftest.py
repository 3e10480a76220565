"""Shared fixtures: real brokers, started lazily once per session.

``mosquitto``, ``nats_server`` and ``kafka_broker`` are session-scoped and only
start when a test asks for them.  Tests that stop, kill or restart a broker
must create their own instance (``Mosquitto(workdir=tmp_path)`` etc.) instead
of touching the shared ones.

Relies on pytest-asyncio and pytest-timeout (``asyncio_mode = "auto"`` or a
``pytest.mark.asyncio`` marker on async tests).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
import uvloop

from tests.support.brokers import Mosquitto, NatsServer, Tansu


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], object]]:
    """Async tests run on uvloop, like the gateway in production."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    with Mosquitto(workdir=tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(workdir=tmp_path_factory.mktemp("nats")) as broker:
        yield broker


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tansu]:
    with Tansu(workdir=tmp_path_factory.mktemp("tansu")) as broker:
        yield broker


@pytest.fixture
def unique() -> str:
    """Short random hex string for per-test topic/subject/stream names."""
    return uuid.uuid4().hex[:12]
