"""``scripts/demo.py`` (what ``make demo`` runs): its verdict, its plain and its terminal output.

One short demo run end to end (its own brokers and gateway process, output piped: the plain report, no
escape codes, PASS and exit 0); the in-place redraw and the duplicate/loss tally are checked on the
script's own classes, without brokers.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.gateway_process import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]


def load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


demo = load_demo()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_piped_reports_plain_lines_and_passes(tmp_path: Path) -> None:
    env = {**os.environ, "GATEWAY_HTTP": f"127.0.0.1:{free_port()}", "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "scripts/demo.py", "--seconds", "6"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "\x1b" not in out
    assert re.search(r"^t=\s+5s  telemetry\s+MQTT → Kafka telemetry\s+in [\d,.]+/s", out, re.M), out
    verdicts = [line for line in out.splitlines() if line.endswith(("  ok", "  FAIL"))]
    assert len(verdicts) == 5, out
    assert all(line.endswith("  ok") for line in verdicts), out
    assert out.rstrip().splitlines()[-1].startswith("PASS: "), out


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_table_is_redrawn_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("COLUMNS", "80")
    out = FakeTerminal()
    screen = demo.Screen(out)
    traffic = demo.Traffic()
    table = demo.Table(traffic)
    routes = {"telemetry": {"in_flight": 7, "lag": 3}, "commands": {"in_flight": 0}}
    screen.show("t=  1s", table.sample(routes))
    first = out.getvalue()
    screen.show("t=  2s", table.sample(routes))
    second = out.getvalue()[len(first) :]
    rows = 2 + len(traffic.targets)
    assert first.startswith("\x1b[?25l")  # the cursor hidden while the table lives
    assert second.startswith(f"\x1b[{rows}A\r")  # back to the top of the block, no scrolling
    assert second.count("\x1b[2K") == rows
    lines = second.split("\x1b[2K")[1:]
    assert all(len(line.rstrip("\n\x1b[J")) < 80 for line in lines)  # no wrap: the cursor-up count holds
    assert re.search(r"^telemetry .* 7 +3$", lines[2], re.M), lines[2]
    assert lines[4].split()[-2:] == ["0", demo.NONE]  # commands: no lag field -> a dash
    screen.close()
    assert out.getvalue().endswith("\x1b[?25h")


def test_tally_counts_losses_and_duplicates_exactly() -> None:
    stream = demo.Stream()
    stream.sent = 10
    target = demo.Target("r", "a → b", stream)
    for seq in [1, 0, 3, 2, 3, 5, 6, 0, 9, 8]:  # 4 and 7 lost; 3 and 0 twice
        target.arrived(f"dev{seq % 8}:{seq}".encode())
    v = target.verdict()
    assert (v.sent, v.delivered, v.lost, v.duplicates, v.unexpected, v.ok) == (10, 8, 2, 2, 0, False)
    assert target.seqs.floor == 4  # everything below 4 arrived; the set holds only what lies above the gap
    for seq in (4, 7):
        target.arrived(f"x:{seq}".encode())
    assert target.complete and target.verdict().ok
    assert target.seqs.above == set()
