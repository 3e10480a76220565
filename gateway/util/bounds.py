"""The ranges every number in a config file must fall in.

Each numeric config key is typed with one of these, so that a negative,
infinite or absurdly large value (``attempts: 1e21``, ``max_time: .inf``,
``max_in_flight: 10**18``) is refused at load with the range it must meet,
instead of misbehaving at run time. ``tests/unit/test_config_limits.py`` checks
that no numeric key is left without an upper bound.

A key that holds a time is a *duration*: its ``Meta`` carries ``extra=IN_SECONDS``
(or ``IN_MILLIS``), and the loader also accepts it written with units
(``"500ms"``, ``"2s"``, ``"1.5m"``, ``"1h"``, ``"1d"``, ``"1m30s"``), converted to the
key's own unit (:func:`read_duration`) before its range is checked.
"""

from __future__ import annotations

import re
import types
import typing
from fractions import Fraction
from typing import Annotated, Any, Literal

import msgspec

Unit = Literal["s", "ms"]
IN_SECONDS: dict[str, Any] = {"duration": "s"}
"""``Meta(extra=IN_SECONDS)``: a duration key counted in seconds (read-only: every such key shares it)."""
IN_MILLIS: dict[str, Any] = {"duration": "ms"}
"""``Meta(extra=IN_MILLIS)``: a duration key counted in milliseconds (the Kafka client's ``*_ms`` keys)."""

MAX_SECONDS = 7 * 24 * 3600
"""The longest duration any key accepts: a week (no timeout, delay or deadline needs more)."""
MAX_COUNT = 10_000_000
"""The most messages, topics or requests a budget may count."""
MAX_BYTES = 64 << 30
"""The largest byte budget (64 GiB): an in-flight budget is memory the process may fill."""
MAX_PAYLOAD = 1 << 30
"""The largest single message (1 GiB; the brokers' own limits are lower: MQTT 256 MiB, NATS 64 MiB)."""

Seconds = Annotated[float, msgspec.Meta(gt=0, le=MAX_SECONDS, extra=IN_SECONDS)]
"""A duration in seconds, more than 0 and at most a week."""
SecondsOrZero = Annotated[float, msgspec.Meta(ge=0, le=MAX_SECONDS, extra=IN_SECONDS)]
"""A duration in seconds where 0 means "off"."""
Millis = Annotated[int, msgspec.Meta(ge=1, le=MAX_SECONDS * 1000, extra=IN_MILLIS)]
"""A duration in milliseconds (the Kafka client's unit), at least 1."""
MillisOrZero = Annotated[int, msgspec.Meta(ge=0, le=MAX_SECONDS * 1000, extra=IN_MILLIS)]
"""A duration in milliseconds where 0 means "none"."""
Count = Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)]
"""How many messages, topics, requests: at least 1."""
Bytes = Annotated[int, msgspec.Meta(ge=1, le=MAX_BYTES)]
"""A byte budget: at least 1, at most 64 GiB."""
PayloadBytes = Annotated[int, msgspec.Meta(ge=1, le=MAX_PAYLOAD)]
"""The size of one message: at least 1 byte, at most 1 GiB."""

_MS_PER_UNIT = {"d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1_000, "ms": 1}
DURATION_PATTERN = "^(?=[0-9])" + "".join(rf"(?:([0-9]+(?:\.[0-9]+)?){u})?" for u in _MS_PER_UNIT) + "$"
"""A duration with units: numbers each followed by ``d``, ``h``, ``m``, ``s`` or ``ms``, largest first, each unit
at most once (``"1h30m"``, ``"1.5s"``). Written for both Python and JSON Schema (ECMA 262) regular expressions."""
_DURATION = re.compile(DURATION_PATTERN)
UNIT_NAMES: dict[Unit, str] = {"s": "seconds", "ms": "milliseconds"}
_MAX_DIGITS = 24
"""Characters of one number in a duration (far beyond any range; keeps the arithmetic and messages small)."""
DURATION_FORMS = "'500ms', '2s', '1.5m', '1h', '1d', '1m30s'"
"""Examples of the forms with units, for messages and docs."""


def duration_unit(typ: Any) -> tuple[Unit, bool] | None:
    """The unit of a duration key typed ``typ`` (``Seconds``, ``Millis | None`` ...) and whether it counts whole
    units (an ``int``); None when ``typ`` is not a duration."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(typ) if a is not type(None)]
        return duration_unit(members[0]) if len(members) == 1 else None
    if typing.get_origin(typ) is not Annotated:
        return None
    base, *metadata = typing.get_args(typ)
    for meta in metadata:
        if isinstance(meta, msgspec.Meta) and meta.extra and "duration" in meta.extra:
            return meta.extra["duration"], base is int
    return None


def read_duration(text: str, unit: Unit, whole: bool) -> int | float:
    """``text`` written with units (see ``DURATION_PATTERN``) as a number of ``unit``: an ``int`` when ``whole``.

    Exact: ``"0.1s"`` is 100 ms, not 100.00000000000001. Raises ValueError, with a message saying the accepted
    forms, when ``text`` is not such a duration (or has a number of more than 24 characters) or, where ``whole``,
    is not a whole number of ``unit``.
    """
    m = _DURATION.fullmatch(text)
    if m is None or any(n is not None and len(n) > _MAX_DIGITS for n in m.groups()):
        raise ValueError(
            f"expected {'int' if whole else 'float'} ({UNIT_NAMES[unit]}) or a duration with units "
            f"(ms, s, m, h, d) such as {DURATION_FORMS}, got {text!r}"
        )
    ms = sum(Fraction(n) * per for n, per in zip(m.groups(), _MS_PER_UNIT.values(), strict=True) if n is not None)
    value = Fraction(ms) / _MS_PER_UNIT[unit]
    if whole:
        if value.denominator != 1:
            raise ValueError(f"{text!r} is {float(value):.15g} {unit}: not a whole number of {UNIT_NAMES[unit]}")
        return int(value)
    return float(value)
