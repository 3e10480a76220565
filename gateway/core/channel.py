"""One broker connection of a connector, kept up by its own reconnect loop.

A channel runs its connector's session coroutine, and when that ends (a lost
connection, a refused connect) waits a full-jitter backoff and runs it again,
without limit, until the gateway closes. On close it lets the session send its
last acknowledgements (``finish``) before cancelling it. A channel can also be
*cut* (a slow-consumer disconnect of the route it serves): its session is
cancelled at once and it stays down until :meth:`Channel.resume`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any, Protocol

from gateway.errors import ConnectorError
from gateway.util.backoff import Backoff


class ChannelOwner(Protocol):
    """What a channel sees of its connector (:class:`gateway.core.connector.Connector`)."""

    name: str
    log: Any
    intake_stopped: asyncio.Event

    @property
    def backoff(self) -> Backoff: ...

    def channel_changed(self, channel: Channel | None = None) -> None: ...


STABLE_AFTER = 10.0
"""Seconds a connection must last to count as stable (a shorter one that ends is a quick drop)."""
FLAPPING_DROPS = 3
"""Quick drops in a row that make a channel *flapping*: not ready, its last error kept."""
FINISH_TIMEOUT = 10.0
"""Seconds a closing session gets for its last acknowledgements and its goodbye to the broker."""


class ConnectorState(Enum):
    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    HELD = "held"
    """Cut off as a slow consumer; waits to be resumed."""
    CLOSING = "closing"
    CLOSED = "closed"


class Channel:
    def __init__(
        self,
        connector: ChannelOwner,
        name: str,
        session: Callable[[], Awaitable[None]],
        finish: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.connector = connector
        self.name = name
        self._session = session
        self._finish = finish
        self.state = ConnectorState.NEW
        self.reconnects = 0
        self.last_error: str | None = None
        self.connected = asyncio.Event()
        self.held = False
        self.quick_drops = 0
        """Connections in a row that ended within :data:`STABLE_AFTER` (a broker dropping us over and over)."""
        self.connected_at = 0.0
        self.counted = (False, False)
        """(not held, not held and not connected) as the connector last counted it (see ``channel_changed``)."""
        self._kick = asyncio.Event()
        self._resume = asyncio.Event()
        self.log = connector.log if name == connector.name else connector.log.bind(channel=name)

    def mark_connected(self, **info: Any) -> None:
        """The session calls this once the broker accepted it."""
        self.state = ConnectorState.CONNECTED
        self.connected_at = time.monotonic()
        if self.quick_drops < FLAPPING_DROPS:
            self.last_error = None  # a flapping channel keeps the error that keeps dropping it
        self.connected.set()
        self.connector.channel_changed(self)
        self.log.info("connector.connected", reconnects=self.reconnects, **info)

    def mark_unreachable(self, error: str) -> None:
        """The session stays up but its client library lost the broker (and reconnects by itself)."""
        if not self.connected.is_set():
            return
        self.state = ConnectorState.CONNECTING
        self.last_error = error
        self.quick_drops = self.quick_drops + 1 if time.monotonic() - self.connected_at < STABLE_AFTER else 0
        self.connected.clear()
        self.connector.channel_changed(self)
        self.log.warning("connector.unreachable", error=error)

    def mark_reachable(self, **info: Any) -> None:
        """The client library got the broker back after :meth:`mark_unreachable`."""
        if self.connected.is_set() or self.state is not ConnectorState.CONNECTING:
            return
        self.reconnects += 1
        self.mark_connected(**info)

    @property
    def flapping(self) -> bool:
        """Connected and dropped again :data:`FLAPPING_DROPS` times in a row within :data:`STABLE_AFTER` each,
        and not yet connected that long since: "connected" would not be the truth (readiness says so)."""
        if self.quick_drops < FLAPPING_DROPS:
            return False
        return not self.connected.is_set() or time.monotonic() - self.connected_at < STABLE_AFTER

    def cut(self) -> None:
        """Drop the connection now and stay down until :meth:`resume`."""
        self.held = True
        self._resume.clear()
        self._kick.set()

    def resume(self) -> None:
        self.held = False
        self._resume.set()

    async def run(self, closing: asyncio.Event) -> None:
        attempt = 0
        while not closing.is_set():
            if self.held:
                self.state = ConnectorState.HELD
                self.connector.channel_changed(self)
                await first(self._resume.wait(), closing.wait())
                continue
            self.state = ConnectorState.CONNECTING
            self._kick.clear()
            started = time.monotonic()
            session = asyncio.ensure_future(self._session())
            stop = asyncio.ensure_future(closing.wait())
            kick = asyncio.ensure_future(self._kick.wait())
            try:
                await asyncio.wait({session, stop, kick}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                session.cancel()
                raise
            finally:
                stop.cancel()
                kick.cancel()
            if not session.done():
                try:
                    if closing.is_set() and self._finish is not None:
                        # Closing: let the session send its last acks and disconnect, then stop it.
                        self.state = ConnectorState.CLOSING
                        try:
                            await asyncio.wait_for(self._finish(), timeout=FINISH_TIMEOUT)
                        except Exception as exc:  # a failed goodbye must not stop the shutdown
                            self.log.warning("connector.finish_failed", error=repr(exc))
                finally:
                    session.cancel()  # also when this channel is cancelled (a close that ran out of time)
                # Not `await session`: its outcome is read below, and a cancellation of this channel meanwhile
                # must end it rather than be taken for the session's.
                await asyncio.wait({session})
                if not session.cancelled():
                    session.exception()  # retrieved, even when a cut drops the connection below
                if not closing.is_set():  # cut as a slow consumer
                    self.connected.clear()
                    self.connector.channel_changed(self)
                    continue
            if (
                session.done()
                and not session.cancelled()
                and session.exception() is None
                and self.connector.intake_stopped.is_set()
            ):
                # Its sources finished after intake stopped: not a lost connection; wait to be closed.
                await closing.wait()
                continue
            lost = None if session.cancelled() else session.exception()
            while isinstance(lost, BaseExceptionGroup):  # from a session's TaskGroup: report the cause
                lost = lost.exceptions[0]
            if lost is not None and not isinstance(lost, ConnectorError | OSError | TimeoutError):
                # A bug, not a broker problem: say so loudly, then recover like from a lost connection.
                self.log.error("connector.session_crashed", exc_info=lost)
            # Connected in this session, even if its client library lost the broker since (unreachable).
            was_connected = self.connected_at >= started
            still_up = self.connected.is_set()
            self.connected.clear()
            self.connector.channel_changed(self)
            if closing.is_set():
                break
            if was_connected:
                attempt = 0
                self.reconnects += 1
                if still_up:  # a drop its client library reported was counted then (mark_unreachable)
                    quick = time.monotonic() - self.connected_at < STABLE_AFTER
                    self.quick_drops = self.quick_drops + 1 if quick else 0
            self.last_error = f"{type(lost).__name__}: {lost}" if lost is not None else "connection closed"
            delay = self.connector.backoff.delay(attempt)
            attempt += 1
            self.state = ConnectorState.BACKOFF
            self.log.warning(
                "connector.disconnected" if was_connected else "connector.connect_failed",
                error=self.last_error,
                attempt=attempt,
                retry_in=round(delay, 3),
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(first(closing.wait(), self._kick.wait()), timeout=delay)
        self.state = ConnectorState.CLOSED


async def first(*aws: Awaitable[Any]) -> None:
    """Until the first of ``aws`` completes; the others are cancelled (a session or a source waiting for its
    gate to open *or* for intake to stop, say)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
