"""What a route may do to a message besides routing it: filter (``where``), validate (``schema``),
convert (``codec``) and enrich (``headers``). All of it is compiled when the config is loaded.

A route without any of these keeps the pass-through path: the payload is never
decoded. With them, the payload is decoded at most once per message (JSON, or
msgpack for ``codec: msgpack_to_json``), and only when a condition, the schema
or the conversion needs it.

Conditions (``where``) are the language of :mod:`gateway.routing.where`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from random import getrandbits
from typing import Any

import msgspec

from gateway.config.options import Codec, SchemaConfig
from gateway.core.envelope import Envelope
from gateway.errors import PayloadError, TemplateError
from gateway.routing.templates import (
    CAPTURE,
    GATEWAY,
    LIT,
    RECEIVED,
    RECEIVED_MS,
    TOPIC,
    Match,
    Parts,
    compile_header,
    payload_field,
)
from gateway.routing.where import MISSING as _MISSING
from gateway.routing.where import Condition, compile_where

_TYPES: dict[str, Any] = {"str": str, "int": int, "float": float, "bool": bool, "any": Any}


HeaderTemplate = Parts


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
            if kind in (RECEIVED, RECEIVED_MS) and not received:
                # wall-clock time of the source's receive stamp (monotonic), one reading per message
                now = time.time_ns()
                received = now - (time.monotonic_ns() - env.received_ns) if env.received_ns else now
            if kind == LIT:
                out.append(value)
            elif kind == TOPIC:
                out.append(env.topic)
            elif kind == CAPTURE:
                out.append(match.captures.get(value, "") if match is not None else "")
            elif kind == GATEWAY:
                out.append(self._gateway)
            elif kind == RECEIVED:
                seconds, ns = divmod(received, 1_000_000_000)
                out.append(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ns // 1_000_000:03d}Z")
            elif kind == RECEIVED_MS:
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
