"""Shared fixtures: real brokers, started lazily once per session.

``mosquitto``, ``nats_server`` and ``kafka_broker`` are session-scoped and only
start when a test asks for them.  Tests that stop, kill or restart a broker
must create their own instance (``Mosquitto(workdir=tmp_path)`` etc.) instead
of touching the shared ones.

Relies on pytest-asyncio and pytest-timeout (``asyncio_mode = "auto"`` or a
``pytest.mark.asyncio`` marker on async tests).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import uuid
from collections.abc import Awaitable, Callable, Iterator

import pytest
import uvloop

from tests.support.brokers import Mosquitto, NatsServer, Tansu


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], object]]:
    """Async tests run on uvloop, like the gateway in production."""
    return {"uvloop": uvloop.new_event_loop}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give every async test an asyncio deadline a little inside its pytest-timeout.

    pytest-timeout's SIGALRM cannot interrupt a test blocked inside uvloop (the
    signal handler's exception never reaches the test), so a hung async test would
    hang the whole run; cancelling it from inside the loop fails it cleanly.
    """
    default = float(config.getini("timeout") or 0)
    for item in items:
        func = getattr(item, "obj", None)
        if not (isinstance(item, pytest.Function) and inspect.iscoroutinefunction(func)):
            continue
        marker = item.get_closest_marker("timeout")
        limit = float(marker.args[0]) if marker is not None and marker.args else default
        if limit > 0:
            item.obj = _with_deadline(func, max(1.0, limit - 2.0))


def _with_deadline(func: Callable[..., Awaitable[object]], seconds: float) -> Callable[..., Awaitable[object]]:
    @functools.wraps(func)
    async def run(*args: object, **kwargs: object) -> object:
        try:
            async with asyncio.timeout(seconds):
                return await func(*args, **kwargs)
        except TimeoutError:
            pytest.fail(f"timed out after {seconds:.0f} s (asyncio deadline; see pytest_collection_modifyitems)")

    return run


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
