"""A connector the broker keeps dropping soon after each connect is not ready, and says why."""

from __future__ import annotations

import asyncio

from gateway.core.channel import FLAPPING_DROPS
from gateway.core.connector import Connector, ConnectorContext
from gateway.core.sink import Sink
from gateway.errors import ConnectorError
from gateway.util.backoff import Backoff
from tests.support.harness import until


class Dropped(Connector):
    """Connects, then loses the connection ``drops`` times in a row; after that it stays up."""

    def __init__(self, drops: int) -> None:
        super().__init__("flaky", None, ConnectorContext("gw", backoff=Backoff(initial=0.001, max=0.001)))
        self.drops = drops
        self.sessions = 0
        self.stay = asyncio.Event()

    def make_sink(self) -> Sink:
        raise NotImplementedError

    async def session(self) -> None:
        self.sessions += 1
        self.mark_connected()
        if self.sessions <= self.drops:
            raise ConnectorError("broker closed the connection: malformed packet")
        self.stay.set()
        await asyncio.Event().wait()


async def run(conn: Dropped) -> asyncio.Task[None]:
    task = asyncio.create_task(conn.run(()))
    await until(conn.stay.is_set)
    return task


async def test_a_connector_dropped_right_after_each_connect_is_not_healthy() -> None:
    conn = Dropped(FLAPPING_DROPS)
    task = await run(conn)
    try:
        assert conn.connected.is_set(), "it is connected at this moment"
        assert conn.flapping and not conn.healthy, "but the broker dropped it every time so far"
        assert conn.last_error is not None and "malformed packet" in conn.last_error, "the error is kept to show"
        conn.channels[0].connected_at -= 60  # a connection that lasted: stable again
        assert conn.healthy and not conn.flapping
    finally:
        await conn.close()
        await task


async def test_fewer_quick_drops_are_an_ordinary_reconnect() -> None:
    conn = Dropped(FLAPPING_DROPS - 1)
    task = await run(conn)
    try:
        assert conn.healthy and conn.last_error is None
        assert conn.reconnects == FLAPPING_DROPS - 1
    finally:
        await conn.close()
        await task
