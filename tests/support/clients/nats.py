"""NATS test clients (nats-py): connections, collectors, publishers and the server's monitoring view."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

import nats
from nats.aio.client import Client as NatsClient

from tests.support.messages import Received, headers, payload
from tests.support.waits import wait_until

Headers = list[tuple[str, str]]


async def _quiet(*args: Any) -> None:
    """Callbacks of a reconnecting client: the tests count outcomes themselves; reconnect noise is expected."""


async def nats_connect(url: str, *, reconnect: bool = False) -> NatsClient:
    """A client of ``url``. ``reconnect``: it rides out a restart of its server (a fault test's own clients);
    otherwise a lost server fails the test instead of being waited for."""
    if not reconnect:
        return await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0, allow_reconnect=False)
    return await nats.connect(
        url,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.1,
        connect_timeout=2,
        error_cb=_quiet,
        disconnected_cb=_quiet,
        reconnected_cb=_quiet,
        closed_cb=_quiet,
    )


def _received(msg: Any) -> Received:
    return Received(msg.subject, msg.data, list((msg.headers or {}).items()), where=msg.subject)


class NatsCollector:
    """A core subscription collecting messages (grouped by subject) in ``messages``."""

    def __init__(self) -> None:
        self.messages: list[Received] = []

    async def cb(self, msg: Any) -> None:
        self.messages.append(_received(msg))

    async def subscribe(self, nc: NatsClient, subject: str) -> NatsCollector:
        await nc.subscribe(subject, cb=self.cb, pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30)
        await nc.flush()
        return self


async def publish_all(nc: NatsClient, items: Sequence[tuple[str, bytes, Headers | None]]) -> None:
    """Core publishes of (subject, payload, headers), flushed every 500 and at the end."""
    for i, (subject, data, hdrs) in enumerate(items):
        await nc.publish(subject, data, headers=dict(hdrs) if hdrs else None)
        if i % 500 == 499:
            await nc.flush()
    await nc.flush()


async def js_publish_all(nc: NatsClient, items: Sequence[tuple[str, bytes, Headers | None]]) -> None:
    """JetStream publishes of (subject, payload, headers); returns once every PubAck came."""
    js = nc.jetstream()
    futs = [await js.publish_async(s, p, headers=dict(h) if h else None) for s, p, h in items]
    await asyncio.gather(*futs)


async def stream_messages(
    nc: NatsClient, stream: str, subject: str, expected: int, timeout: float = 30.0
) -> list[Received]:
    """What ``stream`` holds under ``subject``, read (and acknowledged) with an ephemeral pull consumer:
    until ``expected`` messages, or what came within ``timeout`` s."""
    js = nc.jetstream()
    psub = await js.pull_subscribe(subject, stream=stream)
    out: list[Received] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while len(out) < expected and loop.time() < deadline:
            try:
                msgs = await psub.fetch(batch=min(1000, expected - len(out)), timeout=2)
            except TimeoutError:
                continue
            out.extend(_received(m) for m in msgs)
            await asyncio.gather(*(m.ack() for m in msgs))
    finally:
        await psub.unsubscribe()
    return out


class JetStreamPublisher:
    """Pipelined JetStream publishes: each carries a reply subject, PubAcks are tallied as they come.

    Much faster than awaiting ``js.publish`` one by one, and still exact: ``accepted`` holds the
    seqs whose PubAck (without error) came back.
    """

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.inbox = nc.new_inbox()
        self.accepted: set[int] = set()
        self.refused: list[str] = []
        self._sub: Any = None

    async def _on_ack(self, msg: Any) -> None:
        seq = int(msg.subject.rsplit(".", 1)[1])
        try:
            ack = json.loads(msg.data) if msg.data else {"error": f"status {(msg.headers or {}).get('Status')}"}
        except ValueError:
            ack = {"error": msg.data}
        if "error" in ack:
            self.refused.append(f"{seq}: {ack['error']}")
        else:
            self.accepted.add(seq)

    async def start(self) -> JetStreamPublisher:
        self._sub = await self.nc.subscribe(self.inbox + ".*", cb=self._on_ack, pending_msgs_limit=1_000_000)
        return self

    async def publish(self, messages: Iterable[tuple[str, int]], *, devices: int, flush_every: int = 1000) -> None:
        """Publish (subject, seq) pairs; returns once the server has them (PubAcks may still be on their way)."""
        for i, (subject, seq) in enumerate(messages, start=1):
            await self.nc.publish(
                subject, payload(seq, devices), reply=f"{self.inbox}.{seq}", headers=dict(headers(seq, devices))
            )
            if i % flush_every == 0:
                await self.nc.flush()
        await self.nc.flush()

    async def wait_acks(self, n: int, timeout: float = 30.0) -> None:
        await wait_until(
            lambda: len(self.accepted) + len(self.refused) >= n,
            timeout,
            lambda: f"{len(self.accepted)} PubAcks of {n}, refused: {self.refused[:5]}",
        )

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()


async def preload_stream(
    nc: NatsClient, stream: str, subjects: list[str], messages: Sequence[tuple[str, int]], *, devices: int
) -> set[int]:
    """Create ``stream`` and store the messages (subject, seq); returns the seqs the stream acknowledged."""
    await nc.jetstream().add_stream(name=stream, subjects=subjects)
    pub = await JetStreamPublisher(nc).start()
    try:
        await pub.publish(messages, devices=devices)
        await pub.wait_acks(len(messages))
    finally:
        await pub.close()
    return pub.accepted


async def add_stream(url: str, name: str, subjects: list[str]) -> None:
    """Create a JetStream stream on the server at ``url`` (with a connection of its own)."""
    nc = await nats_connect(url)
    try:
        await nc.jetstream().add_stream(name=name, subjects=subjects)
    finally:
        await nc.close()


# ------------------------------------------------------------------ the server's monitoring endpoint


def _connz(monitor_url: str, query: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{monitor_url}/connz?{query}", timeout=5) as resp:
        return list(json.load(resp).get("connections") or [])


def nats_subscriptions(monitor_url: str) -> list[dict[str, Any]]:
    """Every client subscription the server knows (``/connz?subs=detail``), with the client's name."""
    subs = []
    for conn in _connz(monitor_url, "subs=detail&limit=1000"):
        for s in conn.get("subscriptions_list_detail", []) or []:
            subs.append({**s, "client": conn.get("name", "")})
    return subs


def nats_connection(monitor_url: str, name: str) -> dict[str, Any] | None:
    """The server's /connz entry of the open client connection called ``name`` (counters: in_msgs, out_msgs)."""
    return next((c for c in _connz(monitor_url, "limit=10000") if c.get("name") == name), None)


def nats_closed_connections(monitor_url: str, name: str) -> list[dict[str, Any]]:
    """The server's closed connections (``/connz?state=closed``) of the client called ``name``."""
    return [c for c in _connz(monitor_url, "state=closed&limit=10000") if c.get("name") == name]


async def wait_nats_subscription(monitor_url: str, subject: str, timeout: float = 20.0) -> None:
    """Until some client subscribed exactly ``subject`` (the gateway's core source is live)."""

    async def subscribed() -> bool:
        subs = await asyncio.to_thread(nats_subscriptions, monitor_url)
        return any(s["subject"] == subject for s in subs)

    await wait_until(subscribed, timeout, f"nobody subscribed {subject!r}")
