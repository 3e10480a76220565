"""Fixtures of the e2e suite: gateway processes that never outlive their test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.gateway_process import GatewayProcess


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
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
