"""The ``where`` language of routes: conditions on a message's topic, headers and payload fields.

Conditions (``where``) are mappings, combined with ``all`` / ``any`` / ``not``::

    where:
      all:
        - {payload.temp: {gt: 80}}
        - {header.site: {in: [north, south]}}
        - {payload.alarm: {exists: true}}

A leaf is ``{PATH: {OP: VALUE}}`` or ``{PATH: VALUE}`` (equality); PATH is
``topic``, ``header.NAME`` or ``payload.FIELD[.FIELD...]``; OP is one of ``eq``,
``ne``, ``gt``, ``ge``, ``lt``, ``le``, ``in``, ``exists``.

A condition is compiled once when the config is loaded, into a function of (message, decoded payload).
Pure: it reads what :class:`Message` names and imports nothing of the runtime.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, Protocol

from gateway.errors import GatewayError


class Message(Protocol):
    """What a condition reads of a message (:class:`gateway.core.envelope.Envelope` has it)."""

    @property
    def topic(self) -> str: ...

    @property
    def headers(self) -> list[tuple[str, str]] | None: ...


MISSING = object()
"""A field the message does not have (a condition on it is false)."""
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
    "in": lambda a, b: a in b,
}

Condition = Callable[[Message, Any], bool]
"""(envelope, decoded payload or MISSING) → keep the message?"""


class WhereError(GatewayError, ValueError):
    """A ``where`` that does not compile; the message starts with the key path of the bad part."""


def compile_where(spec: Any, path: str = "where") -> tuple[Condition, bool]:
    """A condition function, and whether it reads the payload. Raises WhereError naming the bad part."""
    if not isinstance(spec, dict) or not spec:
        raise WhereError(f"{path}: expected a mapping (a condition, or all/any/not)")
    if len(spec) != 1:
        parts = [compile_where({k: v}, path) for k, v in spec.items()]  # several leaves: all of them
        return _all([p for p, _ in parts]), any(n for _, n in parts)
    [(key, value)] = spec.items()
    if key in ("all", "any"):
        if not isinstance(value, list) or not value:
            raise WhereError(f"{path}.{key}: expected a non-empty list of conditions")
        parts = [compile_where(v, f"{path}.{key}[{i}]") for i, v in enumerate(value)]
        fns = [p for p, _ in parts]
        return (_all(fns) if key == "all" else _any(fns)), any(n for _, n in parts)
    if key == "not":
        inner, needs = compile_where(value, f"{path}.not")
        return (lambda env, doc: not inner(env, doc)), needs
    return _leaf(str(key), value, f"{path}.{key}")


def _all(fns: list[Condition]) -> Condition:
    return lambda env, doc: all(f(env, doc) for f in fns)


def _any(fns: list[Condition]) -> Condition:
    return lambda env, doc: any(f(env, doc) for f in fns)


def _leaf(field: str, test: Any, path: str) -> tuple[Condition, bool]:
    op, arg = ("eq", test) if not isinstance(test, dict) else _one_op(test, path)
    getter, needs_payload = _getter(field, path)
    if op == "exists":
        if not isinstance(arg, bool):
            raise WhereError(f"{path}.exists: expected true or false")
        return (lambda env, doc: (getter(env, doc) is not MISSING) is arg), needs_payload
    if op == "in" and not isinstance(arg, list):
        raise WhereError(f"{path}.in: expected a list")
    fn = _OPS[op]

    def check(env: Message, doc: Any) -> bool:
        value = getter(env, doc)
        if value is MISSING:
            return False
        try:
            return bool(fn(value, arg))
        except TypeError:  # "abc" > 80: not comparable, so not a match
            return False

    return check, needs_payload


def _one_op(test: dict[str, Any], path: str) -> tuple[str, Any]:
    if len(test) != 1:
        raise WhereError(f"{path}: one operator per condition (got {', '.join(map(str, test))})")
    [(op, arg)] = test.items()
    if op not in _OPS and op != "exists":
        raise WhereError(f"{path}: unknown operator {op!r} (one of: {', '.join([*_OPS, 'exists'])})")
    return str(op), arg


def _getter(field: str, path: str) -> tuple[Callable[[Message, Any], Any], bool]:
    if field == "topic":
        return (lambda env, doc: env.topic), False
    kind, _, rest = field.partition(".")
    if kind == "header" and rest:
        name = rest.lower()

        def header(env: Message, doc: Any) -> Any:
            for k, v in env.headers or ():
                if k.lower() == name:
                    return v
            return MISSING

        return header, False
    if kind == "payload" and rest:
        keys = rest.split(".")

        def payload(env: Message, doc: Any) -> Any:
            for k in keys:
                if not isinstance(doc, dict) or k not in doc:
                    return MISSING
                doc = doc[k]
            return doc

        return payload, True
    raise WhereError(f"{path}: a condition reads topic, header.NAME or payload.FIELD")
