"""Logs: in JSON mode every line on stderr is one JSON object (gateway events, stdlib records, stray reports)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from gateway.config.loader import parse_config
from gateway.ops.logs import _Handler, _loop_exception, configure
from gateway.util.flood import Flood

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure() changes process-wide state: put it back (structlog defaults, no handler of ours)."""
    root = logging.getLogger()
    level = root.level
    yield
    structlog.reset_defaults()
    for handler in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(handler)
    root.setLevel(level)


def json_lines(text: str) -> list[dict[str, object]]:
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]  # raises on the first line that is not JSON
    assert all(isinstance(p, dict) for p in parsed)
    return parsed


@pytest.mark.usefixtures("restore_logging")
def test_stdlib_records_are_json_lines_with_logger_and_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    parse_config("connectors: {n: {type: nats, user: gw, password: stdlib-secret-71}}\n", environ={})
    configure("info", "json")
    configure("info", "json")  # again: still one handler, one line per record
    try:
        raise ConnectionResetError("peer reset while sending stdlib-secret-71")
    except ConnectionResetError:
        logging.getLogger("nats.aio.client").warning("reconnect to %s failed", "nats://h:4222", exc_info=True)
    logging.getLogger("aiokafka").error("two\nlines")
    logging.getLogger("aiokafka").info("below the root level: not shown")
    structlog.get_logger("t").info("gateway.event", route="r")

    first, second, third = json_lines(capsys.readouterr().err)
    assert first["event"] == "reconnect to nats://h:4222 failed"
    assert (first["logger"], first["level"]) == ("nats.aio.client", "warning")
    [exc] = first["exception"]  # type: ignore[misc]
    assert exc["exc_type"] == "ConnectionResetError" and exc["exc_value"] == "peer reset while sending ***"
    assert all("locals" not in frame for frame in exc["frames"])
    assert (second["event"], second["logger"], second["level"]) == ("two\nlines", "aiokafka", "error")
    assert (third["event"], third["route"]) == ("gateway.event", "r")
    assert all("timestamp" in line for line in (first, second, third))


@pytest.mark.usefixtures("restore_logging")
def test_console_mode_renders_stdlib_records_for_people(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "console")
    logging.getLogger("nats.aio.client").warning("reconnecting")
    err = capsys.readouterr().err
    assert "reconnecting" in err and "nats.aio.client" in err
    assert not err.startswith("{")


@pytest.mark.usefixtures("restore_logging")
def test_the_loop_handler_survives_a_context_it_cannot_print(capsys: pytest.CaptureFixture[str]) -> None:
    class Unprintable:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    configure("info", "json")
    context = {"message": "Fatal error on transport", "transport": Unprintable(), "n": 3, "event": "x"}
    _loop_exception(None, context)  # type: ignore[arg-type]
    _loop_exception(None, {"exception": OSError("x")})  # type: ignore[arg-type]
    first, second = json_lines(capsys.readouterr().err)
    assert first["event"] == "loop.exception" and first["message"] == "Fatal error on transport"
    assert first["transport"] == "<Unprintable (repr failed)>" and first["n"] == 3 and first["context_event"] == "x"
    assert second["message"] == "unhandled exception in the event loop"
    assert second["exception"][0]["exc_type"] == "OSError"  # type: ignore[index]


STRAY = r"""
import asyncio, gc, logging, threading, warnings
import uvloop
from gateway.ops.logs import configure, install_loop_handler

configure("info", "json")


async def fail():
    raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")


async def wait(fut):
    await fut


class Broken:
    def __del__(self):
        raise ValueError("raised in __del__")


async def main():
    loop = asyncio.get_running_loop()
    install_loop_handler(loop)
    task = loop.create_task(fail())
    await asyncio.sleep(0.01)
    del task
    fut = loop.create_future()
    task = loop.create_task(wait(fut))
    await asyncio.sleep(0)
    del task, fut
    gc.collect()
    warnings.warn("a warning", DeprecationWarning)
    thread = threading.Thread(target=lambda: 1 / 0, name="worker")
    thread.start()
    thread.join()
    Broken()
    gc.collect()


uvloop.run(main())
raise SystemError("nobody caught this")
"""


def test_every_stray_report_is_one_json_line() -> None:
    """What Python and asyncio print by themselves, in a process of its own (its stderr is what is checked)."""
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", STRAY],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    events = json_lines(done.stderr)
    by_event: dict[object, list[dict[str, object]]] = {}
    for e in events:
        by_event.setdefault(e["event"] if e.get("logger") != "py.warnings" else "warning", []).append(e)
    assert sorted(str(e["message"]) for e in by_event.pop("loop.exception")) == [
        "Task exception was never retrieved",
        "Task was destroyed but it is pending!",
    ]
    [warning] = by_event.pop("warning")
    assert str(warning["event"]).endswith("DeprecationWarning: a warning") and warning["level"] == "warning"
    [thread] = by_event.pop("thread.uncaught_exception")
    assert thread["thread"] == "worker"
    [unraisable] = by_event.pop("process.unraisable")
    assert "Broken.__del__" in str(unraisable["object"])
    [uncaught] = by_event.pop("process.uncaught_exception")
    assert uncaught["level"] == "critical" and uncaught["exception"][0]["exc_type"] == "SystemError"  # type: ignore[index]
    assert not by_event, by_event


@pytest.mark.usefixtures("restore_logging")
def test_a_secret_that_json_escapes_is_masked_too(capsys: pytest.CaptureFixture[str]) -> None:
    secret = 'pa"ss\\wörd-\tx'
    parse_config(
        "connectors: {n: {type: nats, user: gw, password: '${PW}'}}\n",
        environ={"PW": secret},
    )
    configure("info", "json")
    logging.getLogger("nats.aio.client").warning("login with %s refused", secret)
    structlog.get_logger("t").warning("gateway.event", detail=f"password {secret} refused")
    text = capsys.readouterr().err
    lines = json_lines(text)
    assert [line["event"] for line in lines[:1]] == ["login with *** refused"], text
    assert lines[1]["detail"] == "password *** refused", text
    assert "ss\\\\w" not in text and "w\\u00f6rd" not in text


def test_a_flood_logs_its_first_event_then_a_count_per_interval() -> None:
    flood = Flood(interval=3600)
    assert flood.count() == 1  # the first is reported at once
    assert [flood.count() for _ in range(5)] == [0] * 5  # then nothing within the interval
    flood._last -= 3600  # the interval passed
    assert flood.count() == 6  # the five held back and this one
    assert flood.count() == 0
