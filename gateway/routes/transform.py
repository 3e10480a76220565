"""What a route may do to a message besides routing it: filter (``where``), validate (``schema``),
convert (``codec``) and enrich (``headers``). All of it is compiled when the config is loaded.

A route without any of these keeps the pass-through path: the payload is never
decoded. With them, the payload is decoded at most once per message (JSON, or
msgpack for ``codec: msgpack_to_json``), and only when a condition, the schema
or the conversion needs it.

Conditions (``where``) are mappings, combined with ``all`` / ``any`` / ``not``::

    where:
      all:
        - {payload.temp: {gt: 80}}
        - {header.site: {in: [north, south]}}
        - {payload.alarm: {exists: true}}

A leaf is ``{PATH: {OP: VALUE}}`` or ``{PATH: VALUE}`` (equality); PATH is
``topic``, ``header.NAME`` or ``payload.FIELD[.FIELD...]``; OP is one of ``eq``,
``ne``, ``gt``, ``ge``, ``lt``, ``le``, ``in``, ``exists``.
"""

from __future__ import annotations

import operator
import re
import time
from collections.abc import Callable, Iterable
from random import getrandbits
from typing import Any

import msgspec

from gateway.config.options import Codec, SchemaConfig
from gateway.core.envelope import Envelope
from gateway.errors import PayloadError, TemplateError
from gateway.routing.templates import Match, payload_field

_TYPES: dict[str, Any] = {"str": str, "int": int, "float": float, "bool": bool, "any": Any}
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
    "in": lambda a, b: a in b,
}
_MISSING = object()


Condition = Callable[[Envelope, Any], bool]
"""(envelope, decoded payload or _MISSING) → keep the message?"""


class WhereError(ValueError):
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
        return (lambda env, doc: (getter(env, doc) is not _MISSING) is arg), needs_payload
    if op == "in" and not isinstance(arg, list):
        raise WhereError(f"{path}.in: expected a list")
    fn = _OPS[op]

    def check(env: Envelope, doc: Any) -> bool:
        value = getter(env, doc)
        if value is _MISSING:
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


def _getter(field: str, path: str) -> tuple[Callable[[Envelope, Any], Any], bool]:
    if field == "topic":
        return (lambda env, doc: env.topic), False
    kind, _, rest = field.partition(".")
    if kind == "header" and rest:
        name = rest.lower()

        def header(env: Envelope, doc: Any) -> Any:
            for k, v in env.headers or ():
                if k.lower() == name:
                    return v
            return _MISSING

        return header, False
    if kind == "payload" and rest:
        keys = rest.split(".")

        def payload(env: Envelope, doc: Any) -> Any:
            for k in keys:
                if not isinstance(doc, dict) or k not in doc:
                    return _MISSING
                doc = doc[k]
            return doc

        return payload, True
    raise WhereError(f"{path}: a condition reads topic, header.NAME or payload.FIELD")


_HEADER_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_LIT, _TOPIC, _CAPTURE, _GATEWAY, _RECEIVED, _RECEIVED_MS, _PAYLOAD = range(7)
_NAMED = {"topic": _TOPIC, "gateway": _GATEWAY, "received": _RECEIVED, "received_ms": _RECEIVED_MS}
HeaderTemplate = tuple[tuple[int, str], ...]


def compile_header(text: str, captures: Iterable[str] = ()) -> tuple[HeaderTemplate, bool]:
    """A header value template, and whether it reads the payload; ValueError on a bad placeholder.

    ``{topic}``, ``{gateway}`` (the gateway id), ``{received}`` (receive time, RFC 3339 UTC),
    ``{received_ms}`` (Unix milliseconds), ``{payload.FIELD}``, a capture of the source pattern.
    """
    known = set(captures)
    parts: list[tuple[int, str]] = []
    pos = 0
    for m in _HEADER_PLACEHOLDER.finditer(text):
        if m.start() > pos:
            parts.append((_LIT, text[pos : m.start()]))
        pos = m.end()
        token, name = m.group(0), m.group(1)
        if token in ("{{", "}}"):
            parts.append((_LIT, token[0]))
        elif name is None:
            raise ValueError(f"unbalanced {token!r} (write {token}{token} for a literal brace)")
        elif name in _NAMED:
            parts.append((_NAMED[name], ""))
        elif name.startswith("payload.") and all(name.split(".")[1:]):
            parts.append((_PAYLOAD, name[len("payload.") :]))
        elif name in known:
            parts.append((_CAPTURE, name))
        else:
            names = ", ".join(f"{{{n}}}" for n in [*_NAMED, *sorted(known), "payload.FIELD"])
            raise ValueError(f"unknown placeholder {{{name}}} (one of: {names})")
    if pos < len(text):
        parts.append((_LIT, text[pos:]))
    return tuple(parts), any(kind == _PAYLOAD for kind, _ in parts)


class Transform:
    """The compiled ``where`` / ``schema`` / ``codec`` / ``headers`` of one route."""

    __slots__ = (
        "_codec",
        "_decode",
        "_encode",
        "_gateway",
        "_headers",
        "_schema",
        "_trace",
        "_where",
        "decodes",
        "doc",
    )

    @classmethod
    def of(
        cls,
        section: Any,
        captures: Iterable[str] = (),
        *,
        gateway_id: str = "",
        payload_templates: bool = False,
        trace: bool = False,
    ) -> Transform | None:
        """The transform of a route section, or None when it has none (the pass-through path).
        ``trace`` is the gateway's default for routes that do not set ``trace``."""
        trace = section.trace if section.trace is not None else trace
        if (
            section.where is None
            and section.schema is None
            and section.codec == "passthrough"
            and not section.headers
            and not trace
            and not payload_templates
        ):
            return None
        where, reads = compile_where(section.where) if section.where is not None else (None, False)
        return cls(
            where=where,
            where_reads_payload=reads or payload_templates,
            schema=section.schema,
            codec=section.codec,
            headers=section.headers,
            trace=trace,
            captures=captures,
            gateway_id=gateway_id,
        )

    def __init__(
        self,
        *,
        where: Condition | None = None,
        where_reads_payload: bool = False,
        schema: SchemaConfig | None = None,
        codec: Codec = "passthrough",
        headers: dict[str, str] | None = None,
        trace: bool = False,
        captures: Iterable[str] = (),
        gateway_id: str = "",
    ) -> None:
        self._where = where
        self._trace = trace
        self._codec = codec
        self._gateway = gateway_id
        compiled = [(k, *compile_header(v, captures)) for k, v in (headers or {}).items()]
        self._headers = [(k, tpl) for k, tpl, _ in compiled]
        reads_payload = any(reads for _, _, reads in compiled)
        self.doc: Any = _MISSING
        """The decoded payload of the message :meth:`apply` last saw (for payload templates)."""
        source_msgpack = codec == "msgpack_to_json"
        self._decode: Callable[[bytes], Any] = msgspec.msgpack.decode if source_msgpack else msgspec.json.decode
        self._encode: Callable[[Any], bytes] | None = {
            "json_to_msgpack": msgspec.msgpack.encode,
            "msgpack_to_json": msgspec.json.encode,
        }.get(codec)
        self._schema: Any = None
        if schema is not None:
            fields = []
            for name, t in schema.fields.items():
                optional = t.endswith("?")
                typ = _TYPES[t.rstrip("?")]
                fields.append((name, typ | None, None) if optional else (name, typ))
            self._schema = msgspec.defstruct("Payload", fields, forbid_unknown_fields=not schema.extra)
        self.decodes = where_reads_payload or reads_payload or self._schema is not None or self._encode is not None
        """Whether the payload is decoded (the pass-through path never decodes)."""

    def apply(self, env: Envelope, match: Match | None = None) -> Envelope | None:
        """The message to deliver (``env`` itself when unchanged), or None when ``where`` filters it out.
        Raises PayloadError for a payload that cannot be decoded, validated or converted (or lacks a field
        a header template reads)."""
        doc: Any = _MISSING
        if self.decodes:
            try:
                doc = self._decode(env.payload)
            except (msgspec.DecodeError, ValueError) as exc:
                kind = "msgpack" if self._codec == "msgpack_to_json" else "JSON"
                raise PayloadError(f"payload is not {kind}: {exc}") from None
        self.doc = doc
        if self._where is not None and not self._where(env, doc):
            return None
        if self._schema is not None:
            try:
                msgspec.convert(doc, self._schema, strict=True)
            except msgspec.ValidationError as exc:
                raise PayloadError(f"payload does not match the schema: {exc}") from None
        headers = env.headers
        if self._trace and (headers is None or not any(k.lower() == "traceparent" for k, _ in headers)):
            headers = [*(headers or ()), ("traceparent", new_traceparent())]
        elif self._encode is None and not self._headers:
            return env
        payload = self._encode(doc) if self._encode is not None else env.payload
        if self._headers:
            headers = [*(headers or ()), *((k, self._render(tpl, env, match, doc)) for k, tpl in self._headers)]
        return msgspec.structs.replace(env, payload=payload, headers=headers)

    def _render(self, tpl: HeaderTemplate, env: Envelope, match: Match | None, doc: Any) -> str:
        out = []
        received = 0
        for kind, value in tpl:
            if kind in (_RECEIVED, _RECEIVED_MS) and not received:
                # wall-clock time of the source's receive stamp (monotonic), one reading per message
                now = time.time_ns()
                received = now - (time.monotonic_ns() - env.received_ns) if env.received_ns else now
            if kind == _LIT:
                out.append(value)
            elif kind == _TOPIC:
                out.append(env.topic)
            elif kind == _CAPTURE:
                out.append(match.captures.get(value, "") if match is not None else "")
            elif kind == _GATEWAY:
                out.append(self._gateway)
            elif kind == _RECEIVED:
                seconds, ns = divmod(received, 1_000_000_000)
                out.append(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ns // 1_000_000:03d}Z")
            elif kind == _RECEIVED_MS:
                out.append(str(received // 1_000_000))
            else:
                try:
                    out.append(payload_field(doc, value))
                except TemplateError as exc:
                    raise PayloadError(str(exc)) from None
        return "".join(out)


def new_traceparent() -> str:
    """A W3C trace context ``traceparent`` starting a new trace (version 00, sampled).

    Ids from ``random.getrandbits`` (as OpenTelemetry's default id generator): unique, not secret.
    """
    ids = "%048x" % (getrandbits(192) | 1 << 64 | 1)
    return "00-" + ids[:32] + "-" + ids[32:] + "-01"
