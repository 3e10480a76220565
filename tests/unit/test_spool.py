"""Store and forward: the spool file format (gateway/spool.py) and spooled routes (gateway/spooled.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from connectors.memory.broker import MemoryBroker
from gateway.app import Gateway
from gateway.config.loader import parse_config
from gateway.core.envelope import Envelope
from gateway.errors import ConfigError
from gateway.routes.spool import Pending, Spool, SpoolError
from gateway.routes.spooled import SpooledRoute
from tests.support.harness import StartGateway, until

MiB = 1024 * 1024


def env(i: int, size: int = 10) -> Envelope:
    return Envelope(f"in/d{i % 3}", str(i).encode().ljust(size, b"."), [("seq", str(i))], None)


def write(spool: Spool, n: int, start: int = 0, size: int = 10) -> None:
    spool.write([Spool.encode(env(i, size)) for i in range(start, start + n)])


def seqs(entries: list) -> list[int]:  # type: ignore[type-arg]
    return [int(dict(e.headers)["seq"]) for e in entries]


# ---------------------------------------------------------------- the file format


def test_records_come_back_in_order_with_their_parts(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=MiB, fsync=False)
    write(spool, 5)
    entries = spool.read(10)
    assert seqs(entries) == [0, 1, 2, 3, 4]
    assert (entries[1].topic, entries[1].payload, entries[1].key) == ("in/d1", b"1.........", None)
    assert spool.records == 5 and spool.read(10) == []
    spool.close()


def test_reopen_replays_what_was_not_committed(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=MiB, fsync=False)
    write(spool, 10)
    entries = spool.read(10)
    spool.commit(entries[3].end, 4)
    spool.close()
    again = Spool(tmp_path, max_bytes=MiB, fsync=False)
    assert again.records == 6
    assert seqs(again.read(100)) == [4, 5, 6, 7, 8, 9]
    again.close()


def test_a_torn_tail_is_cut_at_the_last_whole_record(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=MiB, fsync=False)
    write(spool, 3)
    spool.close()
    [segment] = tmp_path.glob("*.log")
    data = segment.read_bytes()
    segment.write_bytes(data + data[:7])  # a crash in the middle of the next record's header
    again = Spool(tmp_path, max_bytes=MiB, fsync=False)
    assert seqs(again.read(100)) == [0, 1, 2]
    assert segment.stat().st_size == len(data)
    write(again, 1, start=3)
    assert seqs(again.read(100)) == [3]
    again.close()


def test_segments_roll_and_committed_ones_are_deleted(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=4 * MiB, segment_bytes=64 * 1024, fsync=False)
    for batch in range(40):
        write(spool, 10, start=batch * 10, size=1000)
    assert len(list(tmp_path.glob("*.log"))) > 4
    entries = []
    while chunk := spool.read(64):
        entries += chunk
    assert seqs(entries) == list(range(400))
    spool.commit(entries[-1].end, 400)
    spool.save_commit()
    assert len(list(tmp_path.glob("*.log"))) == 1, "only the segment being written remains"
    spool.close()
    again = Spool(tmp_path, max_bytes=4 * MiB, segment_bytes=64 * 1024, fsync=False)
    assert again.records == 0 and again.read(10) == []
    again.close()


def test_one_process_at_a_time(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=MiB)
    with pytest.raises(SpoolError, match="in use"):
        Spool(tmp_path, max_bytes=MiB)
    spool.close()
    Spool(tmp_path, max_bytes=MiB).close()


def test_pending_commits_only_a_delivered_prefix() -> None:
    p = Pending()
    for end in (10, 20, 30):
        p.add(end)
    assert p.done(20) is None, "10 is still out"
    assert p.done(10) == (20, 2)
    assert p.done(30) == (30, 1)


# ---------------------------------------------------------------- spooled routes


def config(tmp_path: Path, extra: str = "") -> str:
    return f"""\
connectors:
  a: {{type: memory, broker: A}}
  b: {{type: memory, broker: B}}
routes:
  - name: r
    from: {{connector: a, topic: "in/{{device}}"}}
    to: {{connector: b, topic: "out/{{device}}"}}
    spool: {{path: "{tmp_path / "spool"}", max_bytes: 1048576, fsync: false}}
{extra}"""


Held = tuple[Gateway, SpooledRoute, MemoryBroker, MemoryBroker]


async def held(start: StartGateway, tmp_path: Path, extra: str = "") -> Held:
    """A gateway with the spooled route ``r`` whose target (broker B) holds every delivery; with brokers A, B."""
    b = MemoryBroker.named("B")
    b.hold = True
    gw = await start(config(tmp_path, extra))
    route = gw.routes["r"]
    assert isinstance(route, SpooledRoute)
    return gw, route, MemoryBroker.named("A"), b


def publish(a: MemoryBroker, n: int, size: int | None = None) -> None:
    for i in range(n):
        a.publish(f"in/d{i % 3}", str(i).encode() if size is None else bytes(size))


async def test_the_source_is_acknowledged_from_disk_while_the_target_is_down(
    start_config: StartGateway, tmp_path: Path
) -> None:
    _, route, a, b = await held(start_config, tmp_path)
    publish(a, 200)
    await until(lambda: len(a.acked) == 200)
    assert route.spooled == 200 and b.received == []
    b.release()
    await until(lambda: len(b.received) == 200)
    assert [int(r.payload) for r in b.received] == list(range(200)), "in order"
    await until(lambda: route.spool_view()["backlog"] == 0)
    assert route.stats.acked == 200


async def test_a_restart_delivers_what_the_spool_held(start_config: StartGateway, tmp_path: Path) -> None:
    gw, _, a, b = await held(start_config, tmp_path)
    publish(a, 50)
    await until(lambda: len(a.acked) == 50)
    await gw.stop(timeout=0.5)  # the held target never confirms: the spool keeps all 50
    assert b.received == []
    a.log.clear()  # a new gateway must not see them again from the source
    b.hold = False
    gw2 = await start_config(config(tmp_path))
    await until(lambda: len(b.received) == 50)
    assert [int(r.payload) for r in b.received] == list(range(50))
    assert gw2.routes["r"].stats.acked == 50


async def test_a_full_spool_drops_the_newest_when_told(start_config: StartGateway, tmp_path: Path) -> None:
    _, route, a, _ = await held(start_config, tmp_path, "    overflow: drop_newest\n")
    publish(a, 100, size=20_000)  # 2 MB offered to a 1 MiB spool
    await until(lambda: len(a.acked) == 100)
    view = route.spool_view()
    assert view["spool_dropped"] > 0 and view["spooled"] + view["spool_dropped"] == 100
    assert view["backlog_bytes"] <= MiB


async def test_a_full_spool_blocks_the_source_by_default(start_config: StartGateway, tmp_path: Path) -> None:
    _, route, a, b = await held(start_config, tmp_path)
    publish(a, 100, size=20_000)
    await until(lambda: route.spool_view()["blocked"])
    assert len(a.acked) < 100, "the source is paused, not acknowledged"
    b.release()
    await until(lambda: len(b.received) == 100)
    assert route.spool_view()["spool_dropped"] == 0


def test_spool_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="disconnect does not apply"):
        parse_config(config(tmp_path, "    overflow: disconnect\n"), environ={})
    two = config(tmp_path) + config(tmp_path).split("routes:\n")[1].replace("name: r", "name: r2")
    with pytest.raises(ConfigError, match=r"also the spool of routes\[0\]"):
        parse_config(two, environ={})


async def test_a_reloaded_spooled_route_reopens_its_spool(start_config: StartGateway, tmp_path: Path) -> None:
    gw, _, a, b = await held(start_config, tmp_path)
    publish(a, 20)
    await until(lambda: len(a.acked) == 20)
    changed = config(tmp_path).replace("name: r\n", "name: r\n    description: changed\n")
    summary = await gw.reload(parse_config(changed, environ={}))
    assert summary["routes_changed"] == ["r"]
    route = gw.routes["r"]
    assert isinstance(route, SpooledRoute)
    await until(lambda: route.spool is not None and route.spool_view()["backlog"] == 20)
    b.release()
    await until(lambda: len({r.payload for r in b.received}) == 20)


def test_a_failed_write_leaves_no_partial_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path, max_bytes=MiB, fsync=False)
    write(spool, 2)
    real_write = os.write

    def half(fd: int, data: bytes) -> int:  # the disk fills up in the middle of a batch
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr("gateway.routes.spool.os.write", half)
    with pytest.raises(OSError, match="short write"):
        write(spool, 3, start=2)
    monkeypatch.undo()
    write(spool, 1, start=5)
    assert seqs(spool.read(10)) == [0, 1, 5]
    spool.close()
    again = Spool(tmp_path, max_bytes=MiB, fsync=False)
    assert seqs(again.read(10)) == [0, 1, 5]
    again.close()
