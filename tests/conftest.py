"""Shared fixtures: real brokers, started lazily once per session, and gateway processes.

``mosquitto``, ``nats_server`` and ``kafka_broker`` are session-scoped and only
start when a test asks for them; ``prometheus`` is one server per test.  Tests that stop, kill or restart a broker
must create their own instance (``Mosquitto(workdir=tmp_path)`` etc.) instead
of touching the shared ones.  ``gateways`` makes gateway processes that never
outlive their test.  The helpers behind them are in ``tests/support``.

Relies on pytest-asyncio and pytest-timeout (``asyncio_mode = "auto"`` or a
``pytest.mark.asyncio`` marker on async tests).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from tests.support.brokers import Mosquitto, NatsServer, Prometheus, Tansu, prometheus_bin, running
from tests.support.gateway_process import GatewayProcess


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], object]]:
    """Async tests run on uvloop, like the gateway in production."""
    return {"uvloop": uvloop.new_event_loop}


BROKER_FIXTURES = frozenset({"mosquitto", "nats_server", "kafka_broker", "prometheus"})
LAYER_MARKERS = {"e2e": "e2e", "fault": "fault"}
"""Directories whose every test carries that marker."""


def marker_problems(items: list[pytest.Item]) -> list[str]:
    """Modules whose ``pytestmark`` contradicts what their tests use (one line each).

    Markers are declared once per module (``pytestmark``): ``broker`` if a test needs a real broker,
    ``e2e`` if it runs the gateway process, ``fault`` if it kills or stalls a broker or the gateway.
    This catches what can be seen from outside: a broker fixture without ``broker``, ``gateways``
    without ``e2e``, a module of tests/e2e or tests/fault without its layer's marker, a unit test with any.
    """
    problems: set[str] = set()
    for item in items:
        marks = {m.name for m in item.iter_markers()} & {"broker", "e2e", "fault"}
        used = set(getattr(item, "fixturenames", ()))
        layer = item.path.parent.name
        where = item.path.relative_to(item.config.rootpath)
        need = {LAYER_MARKERS[layer]} if layer in LAYER_MARKERS else set()
        if used & BROKER_FIXTURES:
            need.add("broker")
        if "gateways" in used:
            need.add("e2e")
        if need - marks:
            problems.add(f"{where}: pytestmark lacks {', '.join(sorted(need - marks))}")
        if layer == "unit" and marks:
            problems.add(f"{where}: a unit test marked {', '.join(sorted(marks))}")
    return sorted(problems)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check the markers (:func:`marker_problems`); give every async test an asyncio deadline a little
    inside its pytest-timeout.

    pytest-timeout's SIGALRM cannot interrupt a test blocked inside uvloop (the
    signal handler's exception never reaches the test), so a hung async test would
    hang the whole run; cancelling it from inside the loop fails it cleanly.
    """
    problems = marker_problems(items)
    if problems:
        raise pytest.UsageError("markers do not match what the tests use:\n  " + "\n  ".join(problems))
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
    yield from running(Mosquitto(workdir=tmp_path_factory.mktemp("mosquitto")))


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    yield from running(NatsServer(workdir=tmp_path_factory.mktemp("nats")))


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tansu]:
    yield from running(Tansu(workdir=tmp_path_factory.mktemp("tansu")))


@pytest.fixture
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A Prometheus server of the test's own (scrape and rule evaluation every second), no targets or rules
    yet: ``prometheus.scrape("127.0.0.1:PORT")``, ``prometheus.load_rules({...})``."""
    if prometheus_bin() is None:
        pytest.skip("prometheus is not installed (Debian package prometheus; scripts/setup.sh installs it)")
    yield from running(Prometheus(workdir=tmp_path_factory.mktemp("prometheus")))


@pytest.fixture
def unique() -> str:
    """Short random hex string for per-test topic/subject/stream names."""
    return uuid.uuid4().hex[:12]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item (``rep_call``): ``gateways`` prints log tails on failure."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def gateways(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """``make(config, name=...)`` -> GatewayProcess in ``tmp_path``; all are SIGKILLed at teardown if still up.

    When the test failed, the log tail of every gateway it made is printed (shown by pytest).
    """
    made: list[GatewayProcess] = []

    def make(config: dict[str, Any], *, name: str = "gateway", **kwargs: Any) -> GatewayProcess:
        gw = GatewayProcess(tmp_path, config, name=name, **kwargs)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.cleanup()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for gw in made:
            print(gw.log_tail(80))
