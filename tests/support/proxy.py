"""A controllable TCP proxy for fault tests: cut, refuse, stall, slow down.

Sits between a client (e.g. the gateway) and a broker and forwards bytes both
ways until told otherwise.  Synchronous, standard library only, and free of
pytest, like :mod:`tests.support.brokers`::

    from tests.support.proxy import TcpProxy

    with NatsServer() as nats, TcpProxy(nats.address) as proxy:
        gateway_config.nats_url = proxy.url("nats")
        proxy.blackhole()        # peer stalls: connections stay open, nothing moves
        proxy.resume()           # held bytes are delivered, traffic flows again
        proxy.cut()              # every open connection is closed now
        proxy.refuse()           # new connections: ECONNREFUSED
        proxy.accept()
        proxy.latency(50)        # +50 ms one-way, each direction
        proxy.bandwidth(100_000, "downstream")
        print(proxy.stats())

Threading model
    The proxy runs its own asyncio event loop (the standard library's, never
    uvloop) in a daemon thread.  Every control method is thread-safe, may be
    called from synchronous code (fixtures) or from a coroutine running on
    *another* event loop (async tests), and returns once the change is in
    effect.  The calls block only for the moment the proxy's loop needs to
    apply the change (microseconds to a few milliseconds; ``cut()`` waits for
    the sockets to be closed).  Calling one from the proxy's own thread raises
    ``RuntimeError``.

Directions
    ``"upstream"`` is client -> target (what the client sends), ``"downstream"``
    is target -> client; ``"both"`` means both.

Memory bound
    Per connection and direction the proxy holds at most ``buffer_bytes`` +
    one read (``chunk_bytes``) of unforwarded data (``ProxyStats.held_*``),
    plus asyncio's stream buffer (``2 * chunk_bytes`` + one socket read of at
    most 256 KiB) and transport write buffer (64 KiB high-water mark).  When
    that is full the proxy stops reading from the sender, so the kernel
    socket buffers fill and TCP flow control pushes back on the sender -- in
    every mode: pass-through with a slow receiver, latency, bandwidth limits
    and blackhole alike.

Connections are accepted on 127.0.0.1 and, for each one, a new connection to
the target is opened (timeout ``connect_timeout``).  If the target cannot be
reached the client connection is closed right after being accepted (counted
in ``ProxyStats.upstream_failures``).  Half-close (EOF in one direction) is
forwarded; a reset or error on either side closes both sides.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import struct
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from tests.support.brokers import StartStop, free_port

__all__ = ["Direction", "ProxyStats", "TcpProxy"]

LOOPBACK = "127.0.0.1"

Direction = Literal["upstream", "downstream", "both"]
_Dir = Literal["upstream", "downstream"]
_DIRS: tuple[_Dir, _Dir] = ("upstream", "downstream")

_T = TypeVar("_T")

#: Longest single sleep while waiting out latency/bandwidth, so that a changed
#: setting (e.g. latency lowered) takes effect within this time.
_MAX_SLEEP = 0.05
#: Bandwidth shaping sends pieces of ``rate * _PACE_SLICE`` bytes.
_PACE_SLICE = 0.02
#: How long a graceful close may wait for the peer before aborting.
_CLOSE_TIMEOUT = 5.0


def run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Body of a proxy's thread: run ``loop`` until stopped, then cancel what is left and close it."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            asyncio.set_event_loop(None)
            loop.close()


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """A consistent snapshot of the proxy's counters.

    Byte counters count bytes *forwarded* (written towards the receiver);
    ``held_*`` is what has been read from the sender but not forwarded yet
    (waiting out latency or bandwidth, or held by ``blackhole()``).  Counters
    accumulate over the proxy's lifetime, across ``stop()``/``start()``.
    """

    bytes_upstream: int
    bytes_downstream: int
    held_upstream: int
    held_downstream: int
    connections_total: int  # client connections accepted
    connections_active: int  # currently open (including ones still connecting to the target)
    connections_cut: int  # closed by cut()
    upstream_failures: int  # accepted, but the target could not be reached


class _Flow:
    """One direction of one connection: a byte-bounded FIFO of (arrival time, data).

    ``b""`` is the EOF marker.  Single producer (the read pump), single
    consumer (the write pump); ``held`` counts bytes until actually written.
    """

    def __init__(self, direction: _Dir, limit: int) -> None:
        self.direction: _Dir = direction
        self.limit = limit
        self.items: deque[tuple[float, bytes]] = deque()
        self.held = 0
        self.next_send = 0.0  # bandwidth pacing: earliest time for the next piece
        self._ready = asyncio.Event()
        self._space = asyncio.Event()

    async def put(self, arrived: float, data: bytes) -> None:
        while self.held >= self.limit:
            self._space.clear()
            await self._space.wait()
        self.items.append((arrived, data))
        self.held += len(data)
        self._ready.set()

    async def get(self) -> tuple[float, bytes]:
        while not self.items:
            self._ready.clear()
            await self._ready.wait()
        return self.items.popleft()

    def forwarded(self, n: int) -> None:
        self.held -= n
        if self.held < self.limit:
            self._space.set()


class _Conn:
    __slots__ = ("client", "flows", "reset", "task", "upstream")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.client: asyncio.StreamWriter | None = None
        self.upstream: asyncio.StreamWriter | None = None
        self.flows: tuple[_Flow, _Flow] | None = None
        self.reset = False


def _expand(direction: Direction) -> tuple[_Dir, ...]:
    if direction == "both":
        return _DIRS
    if direction in _DIRS:
        return (direction,)
    raise ValueError(f"direction must be 'upstream', 'downstream' or 'both', not {direction!r}")


class TcpProxy(StartStop):
    """A TCP proxy on ``127.0.0.1:port`` forwarding to ``target`` with injectable faults.

    ``buffer_bytes`` bounds unforwarded data per connection and direction (see
    the module docstring); ``chunk_bytes`` is the largest single read.
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        port: int | None = None,
        buffer_bytes: int = 256 * 1024,
        chunk_bytes: int = 64 * 1024,
        connect_timeout: float = 5.0,
        backlog: int = 128,
    ) -> None:
        if buffer_bytes < 1 or chunk_bytes < 1:
            raise ValueError("buffer_bytes and chunk_bytes must be positive")
        self.target: tuple[str, int] = (target[0], int(target[1]))
        self.host = LOOPBACK
        # An explicit port (never 0): on Linux it keeps the port bound while
        # refusing, see _stop_listening().
        self.port = port if port else free_port()
        self.buffer_bytes = buffer_bytes
        self.chunk_bytes = chunk_bytes
        self.connect_timeout = connect_timeout
        self.backlog = backlog

        self._lifecycle = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lsock: socket.socket | None = None
        self._listening = False
        self._accept_task: asyncio.Task[None] | None = None
        self._conns: set[_Conn] = set()
        self._flow_event: asyncio.Event | None = None

        # Settings: only mutated on the proxy loop while it runs.
        self._refusing = False
        self._flowing = True
        self._latency: dict[_Dir, float] = {"upstream": 0.0, "downstream": 0.0}
        self._rate: dict[_Dir, float | None] = {"upstream": None, "downstream": None}

        # Counters: only mutated on the proxy loop.
        self._bytes: dict[_Dir, int] = {"upstream": 0, "downstream": 0}
        self._connections_total = 0
        self._connections_cut = 0
        self._upstream_failures = 0
        self._errors: list[str] = []

    # ------------------------------------------------------------ properties

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect: ``("127.0.0.1", port)``."""
        return (self.host, self.port)

    def url(self, scheme: str) -> str:
        """``f"{scheme}://127.0.0.1:{port}"``, e.g. ``proxy.url("nats")``."""
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def refusing(self) -> bool:
        return self._refusing

    @property
    def blackholed(self) -> bool:
        return not self._flowing

    @property
    def errors(self) -> list[str]:
        """Unexpected errors (proxy bugs, failing ``accept()``), not network errors; should stay empty."""
        return list(self._errors)

    # ------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 10.0) -> None:
        """Bind the port, start the loop thread and (unless refusing) listen.

        No-op if already running.  Raises ``OSError`` if the port cannot be bound.
        """
        with self._lifecycle:
            if self._thread is not None:
                return
            self._lsock = self._bind()
            loop = asyncio.SelectorEventLoop()
            loop.set_exception_handler(self._on_loop_error)
            thread = threading.Thread(target=run_loop, args=(loop,), name=f"tcp-proxy-{self.port}", daemon=True)
            self._loop = loop
            self._thread = thread
            thread.start()
            try:
                self._submit(self._startup, timeout)
            except BaseException:
                self._teardown_thread(timeout)
                raise

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection and the listener, stop the thread.  Idempotent.

        Settings (refusing, blackhole, latency, bandwidth) and counters are
        kept for a later ``start()`` on the same port.
        """
        with self._lifecycle:
            if self._thread is None:
                return
            try:
                self._submit(self._shutdown, timeout)
            finally:
                self._teardown_thread(timeout)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        faults = [
            name
            for name, on in (
                ("refusing", self._refusing),
                ("blackhole", not self._flowing),
                ("latency", any(self._latency.values())),
                ("bandwidth", any(r is not None for r in self._rate.values())),
            )
            if on
        ]
        return (
            f"<TcpProxy {self.host}:{self.port} -> {self.target[0]}:{self.target[1]} "
            f"{state}{' ' + ','.join(faults) if faults else ''}>"
        )

    # -------------------------------------------------------------- controls

    def cut(self, *, reset: bool = False) -> int:
        """Close every current connection (both sides) now; keep accepting new ones.

        Data the proxy still holds for those connections is discarded.  Both
        peers see the connection closed (FIN, or RST if unread data was
        pending); with ``reset=True`` they see a TCP RST (``SO_LINGER`` 0).
        Returns once the sockets are closed, with the number of connections cut.
        """
        return self._control(lambda: self._cut(reset), lambda: 0)

    def refuse(self) -> None:
        """Reject new connections (``ECONNREFUSED``); open connections are unaffected.

        On Linux the port stays bound (the listening socket is shut down, not
        closed).  Connections that completed the handshake but were not yet
        accepted by the proxy are reset.
        """
        self._control(self._do_refuse, lambda: setattr(self, "_refusing", True))

    def accept(self) -> None:
        """Accept new connections again (undoes ``refuse()``)."""
        self._control_sync(self._do_accept, lambda: setattr(self, "_refusing", False))

    def blackhole(self) -> None:
        """Stall: keep every connection open but forward nothing, either way.

        Applies to current and new connections (new ones are still accepted
        and connected to the target, but no byte moves).  In effect on
        return: the proxy hands nothing more to any socket; bytes it had
        already written (transport buffer, kernel send buffer) still arrive.
        What the senders write is read into the per-direction buffer until it
        is full; then the proxy stops reading and TCP flow control pushes back
        on the sender, like a peer that stopped reading.  EOFs are held like
        data.  No keepalive or timeout closes the connections by itself.
        """

        def apply() -> None:
            self._flowing = False
            if self._flow_event is not None:
                self._flow_event.clear()

        self._control_sync(apply, apply)

    def resume(self) -> None:
        """Forward again after ``blackhole()``, delivering what was held, in order.

        Nothing is dropped: a stalled TCP peer delivers its data late, never
        loses it (dropping bytes mid-stream would corrupt the protocol instead
        of modelling a network fault).  To model "stalled, then the connection
        died", call ``cut()`` before ``resume()``.  Held bytes already older
        than the configured latency are sent at once (bandwidth limits apply).
        """

        def apply() -> None:
            self._flowing = True
            if self._flow_event is not None:
                self._flow_event.set()

        self._control_sync(apply, apply)

    def latency(self, ms: float, direction: Direction = "both") -> None:
        """Delay every byte by ``ms`` milliseconds one-way in ``direction`` (0 = off).

        A chunk read at time t is forwarded no earlier than t + latency, so a
        request/response round trip gains ``2 * ms`` with ``"both"``.  Data is
        pipelined (throughput is not divided by the delay, but bounded by
        ``buffer_bytes`` per latency period).  Changes apply to held data too.
        """
        if ms < 0:
            raise ValueError("latency must be >= 0 ms")
        dirs = _expand(direction)

        def apply() -> None:
            for d in dirs:
                self._latency[d] = ms / 1000.0

        self._control_sync(apply, apply)

    def bandwidth(self, bytes_per_s: float | None, direction: Direction = "both") -> None:
        """Limit each connection to ``bytes_per_s`` in ``direction`` (None or 0 = unlimited).

        The limit is per connection and direction (not shared between
        connections).  Bytes are paced in slices of ``bytes_per_s / 50``, so
        sending N bytes takes at least ``(N - bytes_per_s / 50) / bytes_per_s`` s.
        """
        if bytes_per_s is not None and bytes_per_s < 0:
            raise ValueError("bandwidth must be >= 0 bytes/s or None")
        rate = float(bytes_per_s) if bytes_per_s else None
        dirs = _expand(direction)

        def apply() -> None:
            for d in dirs:
                self._rate[d] = rate

        self._control_sync(apply, apply)

    def heal(self) -> None:
        """Clear every fault: accept, resume, no latency, no bandwidth limit."""
        self.accept()
        self.latency(0)
        self.bandwidth(None)
        self.resume()

    def stats(self) -> ProxyStats:
        """A consistent snapshot of the counters (see :class:`ProxyStats`)."""
        return self._control_sync(self._snapshot, self._snapshot)

    # ------------------------------------------------------ thread plumbing

    def _teardown_thread(self, timeout: float) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
        if self._lsock is not None:
            self._lsock.close()
            self._lsock = None
        self._listening = False
        self._loop = None
        self._thread = None
        self._accept_task = None
        self._flow_event = None
        self._conns.clear()

    def _submit(self, fn: Callable[[], Awaitable[_T]], timeout: float) -> _T:
        loop = self._loop
        assert loop is not None
        if threading.current_thread() is self._thread:
            raise RuntimeError("TcpProxy controls must not be called from the proxy's own thread")

        async def call() -> _T:
            return await fn()

        fut = asyncio.run_coroutine_threadsafe(call(), loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"{self!r}: control call did not complete within {timeout} s") from None

    def _control(self, on_loop: Callable[[], Awaitable[_T]], stopped: Callable[[], _T]) -> _T:
        with self._lifecycle:
            if self._loop is None:
                return stopped()
            return self._submit(on_loop, 10.0)

    def _control_sync(self, on_loop: Callable[[], _T], stopped: Callable[[], _T]) -> _T:
        async def run() -> _T:
            return on_loop()

        return self._control(run, stopped)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        self._errors.append(f"{context.get('message')}: {context.get('exception')!r}")
        loop.default_exception_handler(context)

    # --------------------------------------------------------- on the loop

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.setblocking(False)
            if not self._refusing:
                sock.listen(self.backlog)
                self._listening = True
        except BaseException:
            sock.close()
            raise
        return sock

    async def _startup(self) -> None:
        self._flow_event = asyncio.Event()
        if self._flowing:
            self._flow_event.set()
        if self._listening and self._lsock is not None:
            self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(self._lsock))

    async def _shutdown(self) -> None:
        await self._stop_accepting()
        await self._close_all(reset=False)

    async def _do_refuse(self) -> None:
        self._refusing = True
        await self._stop_accepting()  # unregisters the fd before the socket changes
        self._stop_listening()

    def _do_accept(self) -> None:
        self._refusing = False
        if self._listening:
            return
        if self._lsock is None:
            self._lsock = self._bind()  # non-Linux fallback: the listener was closed
        else:
            self._lsock.listen(self.backlog)
            self._listening = True
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(self._lsock))

    def _stop_listening(self) -> None:
        if not self._listening or self._lsock is None:
            return
        self._listening = False
        if sys.platform.startswith("linux"):
            # shutdown() on a listening socket puts it back into CLOSE state:
            # new SYNs get RST (ECONNREFUSED), the explicitly bound port stays
            # reserved, and listen() works again later.
            try:
                self._lsock.shutdown(socket.SHUT_RD)
                return
            except OSError:
                pass
        self._lsock.close()
        self._lsock = None

    async def _stop_accepting(self) -> None:
        task, self._accept_task = self._accept_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                csock, _ = await loop.sock_accept(lsock)
            except OSError as exc:
                if not self._listening:
                    return
                # EMFILE and friends: back off instead of spinning.
                self._errors.append(f"accept failed: {exc!r}")
                await asyncio.sleep(0.1)
                continue
            self._connections_total += 1
            conn = _Conn()
            self._conns.add(conn)
            conn.task = loop.create_task(self._serve(conn, csock))

    async def _cut(self, reset: bool) -> int:
        n = await self._close_all(reset=reset)
        self._connections_cut += n
        return n

    async def _close_all(self, *, reset: bool) -> int:
        conns = list(self._conns)
        tasks = []
        for conn in conns:
            conn.reset = reset
            if conn.task is not None:
                conn.task.cancel()
                tasks.append(conn.task)
        if tasks:
            await asyncio.wait(tasks)
        return len(conns)

    def _snapshot(self) -> ProxyStats:
        held = {d: 0 for d in _DIRS}
        for conn in self._conns:
            if conn.flows is not None:
                for flow in conn.flows:
                    held[flow.direction] += flow.held
        return ProxyStats(
            bytes_upstream=self._bytes["upstream"],
            bytes_downstream=self._bytes["downstream"],
            held_upstream=held["upstream"],
            held_downstream=held["downstream"],
            connections_total=self._connections_total,
            connections_active=len(self._conns),
            connections_cut=self._connections_cut,
            upstream_failures=self._upstream_failures,
        )

    # ------------------------------------------------------- one connection

    async def _serve(self, conn: _Conn, csock: socket.socket) -> None:
        graceful = False
        try:
            try:
                creader, cwriter = await asyncio.open_connection(sock=csock, limit=self.chunk_bytes)
            except BaseException:
                csock.close()
                raise
            conn.client = cwriter
            try:
                ureader, uwriter = await asyncio.wait_for(
                    asyncio.open_connection(self.target[0], self.target[1], limit=self.chunk_bytes),
                    self.connect_timeout,
                )
            except (OSError, TimeoutError):
                self._upstream_failures += 1
                return
            conn.upstream = uwriter
            up = _Flow("upstream", self.buffer_bytes)
            down = _Flow("downstream", self.buffer_bytes)
            conn.flows = (up, down)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._read_pump(creader, up))
                    tg.create_task(self._write_pump(uwriter, up))
                    tg.create_task(self._read_pump(ureader, down))
                    tg.create_task(self._write_pump(cwriter, down))
                graceful = True
            except* OSError:
                pass  # reset, broken pipe...: close both sides
        except Exception as exc:
            self._errors.append(f"connection handler failed: {exc!r}")
        finally:
            try:
                await self._close_conn(conn, graceful=graceful)
            finally:
                self._conns.discard(conn)

    async def _close_conn(self, conn: _Conn, *, graceful: bool) -> None:
        writers = [w for w in (conn.client, conn.upstream) if w is not None]
        for w in writers:
            if graceful:
                w.close()  # flushes what is still buffered, then FIN
                continue
            if conn.reset:
                sock = w.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
        try:
            for w in writers:
                try:
                    await asyncio.wait_for(w.wait_closed(), _CLOSE_TIMEOUT)
                except TimeoutError:
                    w.transport.abort()  # peer does not read what is left
                except OSError:
                    pass
        except BaseException:
            # Cancelled (cut/stop) during a graceful close: do not leave a
            # transport behind that may never finish flushing.
            for w in writers:
                w.transport.abort()
            raise

    async def _read_pump(self, reader: asyncio.StreamReader, flow: _Flow) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await reader.read(self.chunk_bytes)
            await flow.put(loop.time(), data)
            if not data:
                return

    async def _wait_latency(self, arrived: float, d: _Dir) -> None:
        """Sleep until ``arrived + latency`` (re-read, so a changed setting applies)."""
        loop = asyncio.get_running_loop()
        while (wait := arrived + self._latency[d] - loop.time()) > 0:
            await asyncio.sleep(min(wait, _MAX_SLEEP))

    async def _wait_pace(self, flow: _Flow) -> None:
        """Sleep until the bandwidth limit allows the next piece (if limited)."""
        loop = asyncio.get_running_loop()
        while self._rate[flow.direction] is not None and (wait := flow.next_send - loop.time()) > 0:
            await asyncio.sleep(min(wait, _MAX_SLEEP))

    async def _wait_flowing(self) -> None:
        event = self._flow_event
        assert event is not None
        while not self._flowing:
            await event.wait()

    async def _write_pump(self, writer: asyncio.StreamWriter, flow: _Flow) -> None:
        loop = asyncio.get_running_loop()
        d = flow.direction
        while True:
            arrived, data = await flow.get()
            await self._wait_latency(arrived, d)
            if not data:
                await self._wait_flowing()
                if writer.can_write_eof():
                    writer.write_eof()
                return
            view = memoryview(data)
            pos = 0
            while pos < len(view):
                await self._wait_pace(flow)
                # No await between this check and the write: blackhole() is
                # in effect as soon as it returns.
                await self._wait_flowing()
                rate = self._rate[d]
                n = len(view) - pos if rate is None else max(1, min(len(view) - pos, int(rate * _PACE_SLICE)))
                writer.write(view[pos : pos + n])
                pos += n
                self._bytes[d] += n
                flow.forwarded(n)
                if rate is not None:
                    flow.next_send = max(flow.next_send, loop.time()) + n / rate
                await writer.drain()
