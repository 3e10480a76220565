"""Sequence-numbered test traffic, and what a test client received of it.

Message ``seq`` (global) belongs to device ``dev<seq % devices>``; its payload is
``b"<device>:<seq>"`` and its headers ``x-seq``/``x-device``/``x-origin``, so that each
message's metadata can be matched to its payload on the other side. :func:`analyse` judges a
received stream against what was sent: loss, duplicates, order per group.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

ORIGIN = "e2e"


def device_of(seq: int, devices: int) -> str:
    return f"dev{seq % devices}"


def payload(seq: int, devices: int) -> bytes:
    return f"{device_of(seq, devices)}:{seq}".encode()


def headers(seq: int, devices: int) -> list[tuple[str, str]]:
    return [("x-seq", str(seq)), ("x-device", device_of(seq, devices)), ("x-origin", ORIGIN)]


def parse_payload(data: bytes) -> tuple[str, int]:
    device, _, seq = data.decode().partition(":")
    return device, int(seq)


@dataclass
class Received:
    """One message as a test client received it."""

    group: str
    """What order is promised within: MQTT topic, NATS subject, or Kafka key."""
    payload: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)
    key: bytes | None = None
    where: str = ""
    """MQTT topic / NATS subject / Kafka topic."""
    partition: int | None = None
    offset: int | None = None
    """Kafka record offset: tells a duplicate record from a record read twice."""
    at: float = field(default_factory=time.monotonic)
    """When the test client got it (monotonic seconds)."""

    @property
    def seq(self) -> int:
        return parse_payload(self.payload)[1]

    @property
    def device(self) -> str:
        return parse_payload(self.payload)[0]


@dataclass
class Analysis:
    """Loss, duplicates and per-group order of a received stream against what was sent."""

    expected: int
    received: int
    distinct: int
    lost: list[int]
    unexpected: list[int]
    duplicates: int
    order_violations: list[tuple[str, int, int]] = field(default_factory=list)
    """(group, previous first-occurrence seq, this seq) where a first occurrence went backwards."""

    def summary(self) -> str:
        return (
            f"expected={self.expected} received={self.received} distinct={self.distinct} "
            f"lost={len(self.lost)} (first: {self.lost[:10]}) unexpected={len(self.unexpected)} "
            f"duplicates={self.duplicates} order_violations={len(self.order_violations)} "
            f"(first: {self.order_violations[:5]})"
        )


def analyse(received: Iterable[Received], sent: Iterable[int]) -> Analysis:
    """Order is judged on first occurrences per group (a redelivered duplicate may come late)."""
    sent_set = set(sent)
    seen: set[int] = set()
    last: dict[str, int] = {}
    violations: list[tuple[str, int, int]] = []
    total = 0
    for r in received:
        total += 1
        seq = r.seq
        if seq in seen:
            continue
        seen.add(seq)
        prev = last.get(r.group)
        if prev is not None and seq < prev:
            violations.append((r.group, prev, seq))
        last[r.group] = seq if prev is None else max(prev, seq)
    return Analysis(
        expected=len(sent_set),
        received=total,
        distinct=len(seen),
        lost=sorted(sent_set - seen),
        unexpected=sorted(seen - sent_set),
        duplicates=total - len(seen),
        order_violations=violations,
    )


def check_metadata(messages: Sequence[Received], *, devices: int, exact: bool = False) -> list[str]:
    """Each message's headers are its own (x-seq matches the payload); returns problems.

    ``exact``: the received headers are exactly ours, in order; otherwise ours must
    appear in order among them (the gateway may add its own, e.g. ``Nats-Msg-Id``).
    """
    problems: list[str] = []
    for m in messages:
        want = headers(m.seq, devices)
        got = list(m.headers)
        ok = got == want if exact else [h for h in got if h[0] in {"x-seq", "x-device", "x-origin"}] == want
        if not ok:
            problems.append(f"seq {m.seq} at {m.where}: headers {got!r}, expected {want!r}")
        if len(problems) >= 5:
            break
    return problems


def throughput(n: int, seconds: float) -> str:
    return f"{n} msgs in {seconds:.2f}s = {n / seconds:,.0f} msg/s" if seconds > 0 else f"{n} msgs"


def flow_rate(messages: Sequence[Received]) -> str:
    """Rate between the first and the last arrival (startup excluded)."""
    if len(messages) < 2:
        return "n/a"
    span = max(m.at for m in messages) - min(m.at for m in messages)
    return f"flow {len(messages) / span:,.0f} msg/s over {span:.2f}s" if span > 0 else "n/a"
