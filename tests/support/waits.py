"""Bounded waits for tests against real brokers and gateway processes: poll, never sleep a fixed time.

Two kinds, each in one place:

* :func:`wait_until` (and :func:`wait_until_blocking` for threads and synchronous code): a condition
  must come true within a deadline, or the test fails with what it waited for.
* :func:`wait_progress`: a stream of deliveries is drained; it ends when everything arrived, when
  nothing new came for ``stall`` seconds, or at the deadline, and never fails by itself: the caller
  asserts on what arrived, which names what is missing better than a timeout would.

A condition may be a plain function or a coroutine function (an HTTP request, a stream's info).
The poll interval starts at 10 ms and backs off to 100 ms, so a quick condition is seen quickly and
a slow one costs little.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

Check = Callable[[], object] | Callable[[], Awaitable[object]]
"""A condition: true when done (a coroutine function is awaited)."""
Count = Callable[[], int] | Callable[[], Awaitable[int]]
What = Callable[[], str] | str
"""What was awaited, for the failure message (a callable is called only on failure)."""

FIRST_POLL = 0.01
MAX_POLL = 0.1


async def _value(fn: Callable[[], object]) -> object:
    value = fn()
    return await value if inspect.isawaitable(value) else value


def _describe(what: What) -> str:
    return what() if callable(what) else what


async def wait_until(
    check: Check, timeout: float, what: What = "condition", *, error: type[AssertionError] = AssertionError
) -> None:
    """Poll ``check`` until true; ``error`` (an AssertionError) naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    delay = FIRST_POLL
    while not await _value(check):
        if time.monotonic() >= deadline:
            raise error(f"timed out after {timeout} s: {_describe(what)}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_POLL)


def wait_until_blocking(
    check: Callable[[], object],
    timeout: float,
    what: What = "condition",
    *,
    error: type[AssertionError] = AssertionError,
) -> None:
    """:func:`wait_until` for a thread or synchronous code (blocks the calling thread)."""
    deadline = time.monotonic() + timeout
    delay = FIRST_POLL
    while not check():
        if time.monotonic() >= deadline:
            raise error(f"timed out after {timeout} s: {_describe(what)}")
        time.sleep(delay)
        delay = min(delay * 2, MAX_POLL)


async def wait_progress(
    count: Count, done: Callable[[int], bool], *, timeout: float, stall: float, interval: float = 0.05
) -> float:
    """Until ``done(count())``, or ``count()`` stayed the same for ``stall`` s, or ``timeout``.

    Returns the seconds waited. ``count`` measures progress (messages seen, records stored) and may
    be a coroutine function; ``done`` says whether that is everything (``lambda c: c >= n``, or a
    check of its own such as "every accepted seq was seen").
    """
    t0 = time.monotonic()
    last, last_change = -1, t0
    while True:
        c = await _value(count)
        assert isinstance(c, int)
        now = time.monotonic()
        if done(c):
            return now - t0
        if c != last:
            last, last_change = c, now
        if now - t0 > timeout or now - last_change > stall:
            return now - t0
        await asyncio.sleep(interval)
