"""Read, interpolate and validate a config file, reporting every problem by key path.

Checks run per connector, per route and per target, so one pass reports
every broken entry, each as ``routes[1].to[0].topic: <what is wrong>``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import msgspec
import yaml

from gateway.config.model import Config, FileSection, RouteConfig, RouteSection, TargetConfig
from gateway.config.options import RequestLeg, reply_route_name
from gateway.config.plugin import ConnectorPlugin, PatternError, ReplyError, SourceSpec, TargetSpec
from gateway.config.registry import plugins
from gateway.errors import ConfigError, ConfigIssue, TemplateError
from gateway.routing.loops import echo
from gateway.routing.patterns import SourcePattern
from gateway.routing.templates import Template, compile_header, compile_template
from gateway.routing.where import WhereError, compile_where
from gateway.util.bounds import Unit, duration_unit, read_duration
from gateway.util.redact import MASK, MIN_SECRET_LENGTH
from gateway.util.tls import check_files

_INTERP = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_MSGSPEC_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
CONNECTOR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


MAX_CONFIG_BYTES = 64 << 20
"""The largest config file read (64 MiB; a file of 10 000 routes is about 1 MiB)."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and lists (a ``where`` of ``all``/``any``/``not`` nests a few levels)."""
MAX_NODES = 2_000_000
"""Values a config may expand to, aliases counted each time they are used (10 000 routes are ~150 000):
stops "billion laughs" files, whose few hundred bytes expand to billions of values."""
MAX_FILE_REFERENCE_BYTES = 1 << 20
"""The largest file a ``${file:PATH}`` reads (a secret, a token, a certificate fits in far less)."""
MAX_MESSAGE = 500
"""Characters of one problem's message; longer ones are cut (a value quoted in full could be anything)."""
_QUOTED = 200
"""How much of a long name the pattern and template checks quote (``name[:200]``, tokens ``[:100]``)."""
_NOT_SECRET = frozenset({"type"})
"""Keys whose interpolated values may be quoted in errors; any other ``${...}`` value is masked."""

_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml parses ~10x faster when present
_MERGE = "tag:yaml.org,2002:merge"


class _StrictLoader(_Base):  # type: ignore[misc]
    """YAML safe loader that refuses duplicate keys instead of keeping the last one."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE:
            continue  # ``<<: *defaults``: the merged keys may be overridden, that is the point
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a plain value, not a list or a mapping", key_node.start_mark
            ) from None
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {first})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _check_shape(text: str, source: str) -> None:
    """Refuse a document nested deeper than MAX_DEPTH or expanding to more than MAX_NODES values.

    Runs over the parser's events, before anything is built: an alias costs what its anchor holds,
    computed once per anchor, so a "billion laughs" file is refused after reading its few hundred bytes.
    """
    sizes: dict[str, int] = {}
    stack: list[list[Any]] = [[0, None]]  # [values so far, anchor] per open mapping or list
    total = 0
    for event in yaml.parse(text, Loader=_StrictLoader):
        if isinstance(event, yaml.ScalarEvent):
            size = 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            size = sizes.get(event.anchor or "", 1)
        elif isinstance(event, yaml.CollectionStartEvent):
            stack.append([1, event.anchor])
            if len(stack) - 1 > MAX_DEPTH:
                raise _shape_error(source, event, f"nested deeper than {MAX_DEPTH} levels")
            continue
        elif isinstance(event, yaml.CollectionEndEvent):
            size, anchor = stack.pop()
            if anchor is not None:
                sizes[anchor] = size
        else:
            continue
        stack[-1][0] += size
        total += size if isinstance(event, yaml.AliasEvent) else 1
        if total > MAX_NODES:
            raise _shape_error(
                source, event, f"expands to more than {MAX_NODES:,} values (aliases count each time they are used)"
            )


def _shape_error(source: str, event: yaml.Event, problem: str) -> ConfigError:
    mark = event.start_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return ConfigError([ConfigIssue("", f"{source}: {where}{problem}")])


def load_config(path: str | Path, *, environ: dict[str, str] | None = None, worker: int | None = None) -> Config:
    """Load and fully validate ``path``; raise :class:`ConfigError` listing every problem."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read {p}: {exc.strerror or exc}")]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigIssue("", f"cannot read {p}: larger than {MAX_CONFIG_BYTES >> 20} MiB")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read {p}: not UTF-8 text (byte {exc.start})")]) from None
    return parse_config(text, source=str(p), environ=environ, base_dir=p.parent, worker=worker)


def parse_config(
    text: str,
    *,
    source: str = "<string>",
    environ: dict[str, str] | None = None,
    base_dir: Path | None = None,
    worker: int | None = None,
) -> Config:
    """Validate a config's text. ``worker``: the index of the worker process reading it (its gateway id, and
    what derives from it, gets ``-w<index>``; see :mod:`gateway.config.workers`)."""
    masks: list[tuple[str, str]] = []
    try:
        env = os.environ if environ is None else environ
        return _parse(text, source, env, base_dir or Path.cwd(), masks, worker)
    except ConfigError as exc:
        raise ConfigError([ConfigIssue(i.path, _masked(i.message, masks)) for i in exc.issues]) from None
    except RecursionError:  # the shape check bounds nesting; this is the net under it
        raise ConfigError([ConfigIssue("", f"{source}: nested too deeply")]) from None


def _parse(
    text: str, source: str, env: Any, base_dir: Path, masks: list[tuple[str, str]], worker: int | None = None
) -> Config:
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigIssue("", f"{source}: larger than {MAX_CONFIG_BYTES >> 20} MiB")])
    try:
        _check_shape(text, source)
        loader = _StrictLoader(text)
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue("", f"{source}: YAML syntax error: {where}{problem}")]) from None
    if not isinstance(raw, dict):
        raise ConfigError([ConfigIssue("", f"{source}: expected a mapping with 'connectors' and 'routes'")])
    issues: list[ConfigIssue] = []
    # ``x-...`` keys at the top hold YAML anchors for ``<<: *name`` merges (as in Compose files): not config
    raw = {k: v for k, v in raw.items() if not (isinstance(k, str) and k.startswith("x-"))}
    raw = _interpolate(raw, "", env, base_dir, issues, masks)
    top = _convert(raw, FileSection, "", issues)
    if top is None and "gateway" in raw:  # a bad gateway: section; check the rest all the same
        top = _convert({k: v for k, v in raw.items() if k != "gateway"}, FileSection, "", [])
    if top is None:
        raise ConfigError(issues)
    if worker is not None:
        top = msgspec.structs.replace(
            top, gateway=msgspec.structs.replace(top.gateway, id=f"{top.gateway.id}-w{worker}")
        )
    connectors = _connectors(top.connectors, issues)
    broken = set(top.connectors) - set(connectors)
    routes = _routes(top.routes, connectors, broken, issues, top.gateway.id)
    if issues:
        raise ConfigError(issues)
    return Config(
        gateway=top.gateway,
        connectors={name: cfg for name, (cfg, _) in connectors.items()},
        routes=tuple(routes),
        source=source,
        digest=hashlib.sha256(text.encode()).hexdigest(),
    )


def _masked(message: str, masks: list[tuple[str, str]]) -> str:
    """``message`` without any value a ``${...}`` put into the config (each shown as its reference), cut short.

    Values are matched as written and as quoted (``repr``/JSON escape newlines), longest first; each line
    of a multi-line value is masked on its own too, so that no part of a file's content is echoed.
    """
    forms: dict[str, str] = {}
    for value, reference in masks:
        for cut in (value, value[:_QUOTED], value[: _QUOTED // 2]):  # checks quote long names cut short
            forms.setdefault(cut, reference)
            forms.setdefault(repr(cut)[1:-1], reference)
            forms.setdefault(json.dumps(cut)[1:-1], reference)
        for line in value.splitlines():
            if len(line.strip()) >= MIN_SECRET_LENGTH:
                forms.setdefault(line.strip(), MASK)
    for form in sorted(forms, key=len, reverse=True):
        if form in message:
            message = message.replace(form, forms[form])
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"


def _interpolate(
    node: Any, path: str, env: Any, base_dir: Path, issues: list[ConfigIssue], masks: list[tuple[str, str]]
) -> Any:
    """Replace ``${VAR}``, ``${VAR:-default}`` and ``${file:PATH}`` in every string value.

    Every value put in is remembered in ``masks`` (with the reference that produced it) unless its key is
    known not to be secret: errors show the reference, never the value.
    """
    if isinstance(node, dict):
        return {k: _interpolate(v, _join(path, str(k)), env, base_dir, issues, masks) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", env, base_dir, issues, masks) for i, v in enumerate(node)]
    if not isinstance(node, str) or "$" not in node:
        return node
    secret = path.rpartition(".")[2] not in _NOT_SECRET

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        value = _reference(m.group(1), path, env, base_dir, issues)
        if secret and len(value) >= MIN_SECRET_LENGTH:
            masks.append((value, m.group(0)))
        return value

    return _INTERP.sub(sub, node)


def _reference(expr: str, path: str, env: Any, base_dir: Path, issues: list[ConfigIssue]) -> str:
    """The value of ``${expr}`` (an issue and "" when it has none)."""
    if expr.startswith("file:"):
        fpath = Path(expr[5:]).expanduser()
        if not fpath.is_absolute():
            fpath = base_dir / fpath
        try:
            with fpath.open("rb") as f:
                data = f.read(MAX_FILE_REFERENCE_BYTES + 1)
        except OSError as exc:
            issues.append(ConfigIssue(path, f"cannot read ${{file:{expr[5:]}}}: {exc.strerror or exc}"))
            return ""
        if len(data) > MAX_FILE_REFERENCE_BYTES:
            issues.append(
                ConfigIssue(path, f"cannot read ${{file:{expr[5:]}}}: larger than {MAX_FILE_REFERENCE_BYTES >> 20} MiB")
            )
            return ""
        try:
            return data.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            issues.append(ConfigIssue(path, f"cannot read ${{file:{expr[5:]}}}: not UTF-8 text"))
            return ""
    name, sep, default = expr.partition(":-")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        issues.append(ConfigIssue(path, f"invalid reference ${{{expr}}} (use ${{NAME}} or ${{file:PATH}})"))
        return ""
    value = env.get(name)
    if value is None or (sep and value == ""):
        if sep:
            return default
        issues.append(ConfigIssue(path, f"environment variable {name} is not set"))
        return ""
    return str(value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _convert(obj: Any, typ: Any, path: str, issues: list[ConfigIssue]) -> Any:
    """Convert ``obj`` to ``typ``, adding one issue per problem found; returns None on failure.

    Structs are checked key by key first, so one entry with several mistakes
    reports all of them (msgspec alone stops at the first). Scalars are
    converted leniently (``"100"`` → 100) because ``${ENV}`` values are strings.
    """
    if isinstance(typ, type) and issubclass(typ, msgspec.Struct):
        if not isinstance(obj, dict):
            issues.append(ConfigIssue(path, f"expected a mapping, got {_yaml_type(obj)}"))
            return None
        before = len(issues)
        cfg = typ.__struct_config__
        fields = _fields(typ)
        converted: dict[str, Any] = {}  # values as the Struct takes them: nested Structs, durations in their unit
        for key, value in obj.items():
            if key == cfg.tag_field:
                continue
            f = fields.get(key)
            if f is None:
                issues.append(ConfigIssue(_join(path, str(key)), f"unknown key{_suggest(str(key), typ)}"))
                continue
            nested = _struct_of(f.type)
            if nested is not None and value is not None:
                converted[key] = _convert(value, nested, _join(path, str(key)), issues)  # every problem inside
                continue
            duration = duration_unit(f.type) if isinstance(value, str) else None
            if duration is not None:
                converted[key] = _duration(value, f.type, *duration, _join(path, str(key)), issues)
                continue
            try:
                msgspec.convert(value, f.type, strict=False)
            except msgspec.ValidationError as exc:
                issues.append(_issue(str(exc), _join(path, str(key)), f.type))
        for name, f in fields.items():
            if f.required and name not in obj:
                issues.append(ConfigIssue(_join(path, name), "required key is missing"))
        if len(issues) > before:
            return None
        obj = {**obj, **converted}
    try:
        return msgspec.convert(obj, typ, strict=False)
    except msgspec.ValidationError as exc:
        issues.append(_issue(str(exc), path, typ))
        return None


def _duration(text: str, typ: Any, unit: Unit, whole: bool, path: str, issues: list[ConfigIssue]) -> Any:
    """The string value of a duration key, as the key's number: ``"2s"`` is 2000 for a ``*_ms`` key.

    A plain number (``"30"``, as ``${ENV}`` gives) is read as today, in the key's unit; anything else must be
    written with units (:func:`gateway.util.bounds.read_duration`). Either way the key's range applies to the
    converted number. Adds an issue and returns None when the value is not accepted.
    """
    try:
        number: Any = msgspec.convert(text, int if whole else float, strict=False)
    except msgspec.ValidationError:
        try:
            number = read_duration(text, unit, whole)
        except ValueError as exc:
            issues.append(ConfigIssue(path, str(exc)))
            return None
        written = f"{text!r} ({number:.15g} {unit}) is out of range: "
    else:
        written = ""
    try:
        return msgspec.convert(number, typ, strict=False)
    except msgspec.ValidationError as exc:
        issues.append(ConfigIssue(path, written + _issue(str(exc), "", typ).message))
        return None


@functools.cache
def _fields(typ: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {f.encode_name: f for f in msgspec.structs.fields(typ)}


@functools.cache
def _struct_of(typ: Any) -> type[msgspec.Struct] | None:
    """The Struct a field holds (``X`` or ``X | None``), to check it key by key; None for anything else."""
    if isinstance(typ, type) and issubclass(typ, msgspec.Struct):
        return typ
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if typing.get_origin(typ) in (typing.Union, types.UnionType) and len(args) == 1:
        return _struct_of(args[0])
    return None


def _yaml_type(obj: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(obj), type(obj).__name__
    )


def _issue(message: str, path: str, typ: Any) -> ConfigIssue:
    m = _MSGSPEC_AT.match(message)
    assert m is not None
    msg, suffix = m.group("msg"), m.group("path") or ""
    full = (path + suffix).lstrip(".")
    if u := re.match(r"Object contains unknown field `(.+)`", msg):
        key = u.group(1)
        hint = _suggest(key, typ) if not suffix else ""
        return ConfigIssue(_join(full, key), f"unknown key{hint}")
    if r := re.match(r"Object missing required field `(.+)`", msg):
        return ConfigIssue(_join(full, r.group(1)), "required key is missing")
    msg = re.sub(r"`([^`]*)`", r"\1", msg)
    return ConfigIssue(full, msg[0].lower() + msg[1:] if msg else msg)


def _suggest(key: str, typ: Any) -> str:
    if not (isinstance(typ, type) and issubclass(typ, msgspec.Struct)):
        return ""
    names = list(_fields(typ))
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(sorted(names))})"


def _connectors(raw: dict[str, dict[str, Any]], issues: list[ConfigIssue]) -> dict[str, tuple[Any, ConnectorPlugin]]:
    known = plugins()
    out: dict[str, tuple[Any, ConnectorPlugin]] = {}
    for name, body in raw.items():
        path = f"connectors.{name}"
        if not CONNECTOR_NAME.match(name):
            issues.append(ConfigIssue(path, "connector names use letters, digits, '_', '-' and '.'"))
            continue
        if not isinstance(body, dict):
            issues.append(ConfigIssue(path, f"expected a mapping with a 'type', got {_yaml_type(body)}"))
            continue
        kind = body.get("type")
        if kind is None:
            issues.append(ConfigIssue(f"{path}.type", f"required key is missing (one of: {', '.join(sorted(known))})"))
            continue
        plugin = known.get(kind) if isinstance(kind, str) else None
        if plugin is None:
            issues.append(
                ConfigIssue(f"{path}.type", f"unknown connector type {kind!r} (known: {', '.join(sorted(known))})")
            )
            continue
        unresolved = any(i.path.startswith((f"{path}.", f"{path}[")) for i in issues)
        before = len(issues)
        cfg = _convert(body, plugin.config, path, issues)
        if unresolved:
            del issues[before:]  # an unset ${VAR} or unreadable ${file:} inside: said once, not again as a bad value
        if cfg is not None:
            out[name] = (cfg, plugin)
            issues.extend(ConfigIssue(f"{path}.{key}", problem) for key, problem in check_files(cfg))
    return out


def _routes(
    raw: list[dict[str, Any]],
    connectors: dict[str, tuple[Any, ConnectorPlugin]],
    broken: set[str],
    issues: list[ConfigIssue],
    gateway_id: str = "gateway",
) -> list[RouteConfig]:
    """Validate routes; endpoints on a ``broken`` connector (already reported) are skipped quietly."""
    routes: list[RouteConfig] = []
    names: dict[str, int] = {}
    spools: dict[str, int] = {}
    for i, body in enumerate(raw):
        path = f"routes[{i}]"
        section = _convert(body, RouteSection, path, issues)
        if section is None:
            continue
        if section.name in names:
            issues.append(
                ConfigIssue(
                    f"{path}.name", f"duplicate route name {section.name!r} (also routes[{names[section.name]}])"
                )
            )
        names.setdefault(section.name, i)
        if section.where is not None:
            try:
                compile_where(section.where)
            except WhereError as exc:
                location, _, message = str(exc).partition(": ")
                issues.append(ConfigIssue(f"{path}.{location}", message))
        if section.spool is not None:
            where = os.path.realpath(section.spool.path)
            if where in spools:
                issues.append(ConfigIssue(f"{path}.spool.path", f"also the spool of routes[{spools[where]}]"))
            spools.setdefault(where, i)
        source, patterns = _source(section.from_, connectors, broken, f"{path}.from", issues)
        to = _as_list(section.to)
        if not to:
            issues.append(ConfigIssue(f"{path}.to", "a route needs at least one target"))
        targets: list[TargetConfig] = []
        for j, tbody in enumerate(to):
            tpath = f"{path}.to[{j}]" if isinstance(section.to, list) else f"{path}.to"
            target = _target(tbody, patterns, connectors, broken, tpath, issues)
            if target is not None:
                targets.append(target)
        dead_letter = None
        if section.dead_letter is not None:
            dead_letter = _target(section.dead_letter, patterns, connectors, broken, f"{path}.dead_letter", issues)
            if dead_letter is not None and (
                dead_letter.address.reads_payload or (dead_letter.key is not None and dead_letter.key.reads_payload)
            ):
                issues.append(
                    ConfigIssue(
                        f"{path}.dead_letter",
                        "a dead letter cannot read {payload.FIELD}: what fails may not be readable",
                    )
                )
        captures = {c for p in patterns for c in p.captures}
        for hname, htext in (section.headers or {}).items():
            try:
                compile_header(htext, captures)
            except ValueError as exc:
                issues.append(ConfigIssue(f"{path}.headers.{hname}", str(exc)))
        if source is not None and not section.allow_loop:
            _check_loops(source, patterns, targets, dead_letter, section, path, issues)
        shard_key = shard_header = None
        by = section.shard_by
        if source is not None and by is not None and _shardable(section.name, source, f"{path}.shard_by", issues):
            if by.startswith("header."):
                shard_header = _shard_header(by, f"{path}.shard_by", issues)
            else:
                shard_key = _shard_key(by, patterns, f"{path}.shard_by", issues)
        if source is not None and len(targets) == len(to) and (dead_letter is not None or section.dead_letter is None):
            rc = RouteConfig(
                section,
                source,
                tuple(patterns),
                tuple(targets),
                dead_letter,
                shard_key=shard_key,
                shard_header=shard_header,
            )
            if section.request is None:
                routes.append(rc)
                continue
            before = len(issues)
            replies = _request_routes(rc, connectors, broken, path, issues, gateway_id)
            if len(issues) == before and replies is not None:
                companion = replies[1].name
                if companion in names:
                    issues.append(
                        ConfigIssue(
                            f"{path}.name",
                            f"{companion!r}, the route carrying the answers, is taken by routes[{names[companion]}]",
                        )
                    )
                names.setdefault(companion, i)
                routes.extend(replies)
    return routes


def _shardable(route: str, source: SourceSpec, path: str, issues: list[ConfigIssue]) -> bool:
    """Whether ``shard_by`` applies to this source; False with the problem in ``issues``."""
    if source.split == "partitions":
        issues.append(
            ConfigIssue(path, "this source is split among workers by partition, each partition's order kept: remove it")
        )
        return False
    if source.split == "none":
        issues.append(ConfigIssue(path, "this source cannot be read by several workers: shard_by does not apply"))
        return False
    if getattr(source, "retained_only", False):
        issues.append(
            ConfigIssue(path, "a retained_only route mirrors every retained message: shard_by does not apply")
        )
        return False
    explicit = source.broker_split(route)
    if explicit is not None:
        issues.append(
            ConfigIssue(
                path,
                f"every worker reads the whole stream to shard it by key, which the broker's split ({explicit}) "
                "would undo: remove one of the two",
            )
        )
        return False
    return True


_HEADER_NAME = re.compile(r"[!-9;-~]+")
"""A header name as MQTT user properties and NATS headers carry it: printable ASCII without ':' or spaces."""


def _shard_header(text: str, path: str, issues: list[ConfigIssue]) -> str | None:
    """The header name of ``shard_by: header.NAME``, or None with the problem in ``issues``."""
    name = text.removeprefix("header.")
    if not _HEADER_NAME.fullmatch(name):
        issues.append(ConfigIssue(path, "header.NAME: a header name (printable ASCII, no ':' or spaces)"))
        return None
    return name


def _shard_key(
    text: str, patterns: list[SourcePattern], path: str, issues: list[ConfigIssue]
) -> tuple[Template, ...] | None:
    """``shard_by`` (a template of the topic) compiled against each source pattern, or None with the problem in
    ``issues``."""
    keys: list[Template] = []
    for pattern in patterns:
        try:
            key = compile_template(text, pattern, None)
        except ValueError as exc:
            issues.append(ConfigIssue(path, str(exc)))
            return None
        if key.reads_payload:
            issues.append(ConfigIssue(path, "the key comes from the topic: {payload.FIELD} is not available here"))
            return None
        if key.is_constant:
            issues.append(ConfigIssue(path, "a constant key sends every message to one worker: name a capture"))
            return None
        keys.append(key)
    return tuple(keys)


def _reply_kinds() -> str:
    """The connector kinds that carry request/reply, for messages: "NATS or MQTT"."""
    return " or ".join(sorted((k.upper() for k, p in plugins().items() if p.replies is not None), reverse=True))


def _request_routes(
    rc: RouteConfig,
    connectors: dict[str, tuple[Any, ConnectorPlugin]],
    broken: set[str],
    path: str,
    issues: list[ConfigIssue],
    gateway_id: str,
) -> tuple[RouteConfig, RouteConfig] | None:
    """A ``request:`` route with its settings resolved, and its companion route that carries the answers."""
    section, request = rc.section, rc.section.request
    assert request is not None
    where = f"{path}.request"
    source_cfg, source_plugin = connectors[rc.source.connector]
    if source_plugin.replies is None:
        issues.append(ConfigIssue(where, f"request/reply needs a {_reply_kinds()} source, not {source_plugin.kind}"))
        return None
    if len(rc.targets) != 1:
        issues.append(ConfigIssue(where, "a request route has exactly one target (the responder's side)"))
        return None
    if section.spool is not None:
        issues.append(ConfigIssue(where, "a request route cannot be spooled (the requester waits for its answer)"))
        return None
    try:
        source_plugin.replies.check_requester(source_cfg, rc.source)
    except ReplyError as exc:
        issues.append(ConfigIssue(f"{where}.{exc.key}" if exc.key else where, exc.message))
        return None
    if request.reply_to == "":
        issues.append(ConfigIssue(f"{where}.reply_to", "empty: leave it out for the default"))
        return None
    target = rc.targets[0].spec
    target_cfg, target_plugin = connectors[target.connector]
    responder, replies = target_plugin.kind, target_plugin.replies
    if replies is None:
        issues.append(ConfigIssue(where, f"request/reply needs a {_reply_kinds()} target, not {responder}"))
        return None
    try:
        mode = replies.mode(target_cfg, target, request.correlation)
    except ReplyError as exc:
        issues.append(ConfigIssue(f"{where}.{exc.key}" if exc.key else where, exc.message))
        return None
    reply_to = request.reply_to or replies.default_reply_to(gateway_id, section.name)
    try:
        target_plugin.syntax.check_name(reply_to)
        if "{" in reply_to or "}" in reply_to:
            raise TemplateError(f"{reply_to!r}: a reply address is a plain name, without {{placeholders}}")
    except TemplateError as exc:
        issues.append(ConfigIssue(f"{where}.reply_to", str(exc)))
        return None
    name = reply_route_name(section.name)
    from_ = replies.answer_source(target.connector, reply_to, mode)
    to = source_plugin.replies.reply_target(rc.source.connector, request)
    companion = RouteSection(
        name=name,
        from_=from_,
        to=to,
        max_in_flight=section.max_in_flight,
        max_in_flight_bytes=section.max_in_flight_bytes,
        overflow="block",  # an answer is never dropped: the table would wait for it in vain
        slow_consumer_deadline=0,
        allow_loop=True,
        description=f"answers to the requests of route {section.name!r}",
    )
    found: list[ConfigIssue] = []
    source, patterns = _source(from_, connectors, broken, where, found)
    reply_target = _target(to, patterns, connectors, broken, where, found) if source is not None else None
    if found or source is None or reply_target is None:
        issues.extend(ConfigIssue(f"{where}.reply_to", i.message) for i in found)
        return None
    leg = RequestLeg(request, responder, mode, reply_to, requester=source_plugin.kind)
    return (
        dataclasses.replace(rc, request=leg),
        RouteConfig(
            companion,
            source,
            tuple(patterns),
            (reply_target,),
            None,
            dataclasses.replace(leg, replies_for=section.name),
        ),
    )


def _check_loops(
    source: SourceSpec,
    patterns: list[SourcePattern],
    targets: list[TargetConfig],
    dead_letter: TargetConfig | None,
    section: RouteSection,
    path: str,
    issues: list[ConfigIssue],
) -> None:
    """Reject a target that publishes into the route's own source pattern on the same connector."""
    entries = [(f"to[{j}]" if isinstance(section.to, list) else "to", t) for j, t in enumerate(targets)]
    if dead_letter is not None:
        entries.append(("dead_letter", dead_letter))
    for key, target in entries:
        if target.spec.connector != source.connector:
            continue
        for pattern in patterns:
            topic = echo(pattern, target.address)
            if topic is not None:
                issues.append(
                    ConfigIssue(
                        f"{path}.{key}.{target.spec.address_key}",
                        f"publishes {topic!r}, which this route's source {pattern.text!r} reads again on connector "
                        f"{source.connector!r}: an echo loop (set allow_loop: true if that is intended)",
                    )
                )
                break


def _as_list(to: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return to if isinstance(to, list) else [to]


def _endpoint(
    body: dict[str, Any],
    connectors: dict[str, tuple[Any, ConnectorPlugin]],
    broken: set[str],
    path: str,
    issues: list[ConfigIssue],
) -> ConnectorPlugin | None:
    name = body.get("connector")
    if name is None:
        issues.append(ConfigIssue(f"{path}.connector", "required key is missing"))
        return None
    if not isinstance(name, str):
        issues.append(ConfigIssue(f"{path}.connector", f"expected a connector name, got {_yaml_type(name)}"))
        return None
    entry = connectors.get(name)
    if entry is None and name in broken:
        return None  # the connector's own errors were reported; nothing more to say here
    if entry is None:
        known = ", ".join(sorted(set(connectors) | broken)) or "none defined"
        issues.append(ConfigIssue(f"{path}.connector", f"unknown connector {name!r} (connectors: {known})"))
        return None
    return entry[1]


def _source(
    body: dict[str, Any],
    connectors: dict[str, tuple[Any, ConnectorPlugin]],
    broken: set[str],
    path: str,
    issues: list[ConfigIssue],
) -> tuple[SourceSpec | None, list[SourcePattern]]:
    plugin = _endpoint(body, connectors, broken, path, issues)
    if plugin is None:
        return None, []
    spec: SourceSpec | None = _convert(body, plugin.source, path, issues)
    if spec is None:
        return None, []
    try:
        compiled = spec.patterns(plugin.syntax)
    except PatternError as exc:
        issues.append(ConfigIssue(f"{path}.{exc.key}", exc.message))
        return None, []
    return spec, compiled


def _target(
    body: dict[str, Any],
    patterns: list[SourcePattern],
    connectors: dict[str, tuple[Any, ConnectorPlugin]],
    broken: set[str],
    path: str,
    issues: list[ConfigIssue],
) -> TargetConfig | None:
    plugin = _endpoint(body, connectors, broken, path, issues)
    if plugin is None:
        return None
    spec: TargetSpec | None = _convert(body, plugin.target, path, issues)
    if spec is None:
        return None
    address = key = None
    key_text = spec.key_template()
    for pattern in patterns:  # a Kafka `topics` list: the template must fit every one of them
        try:
            address = compile_template(spec.address(), pattern, plugin.syntax)
        except ValueError as exc:
            issues.append(ConfigIssue(f"{path}.{spec.address_key}", str(exc)))
            return None
        try:
            key = compile_template(key_text, pattern, None) if key_text is not None else None
        except ValueError as exc:
            issues.append(ConfigIssue(f"{path}.key", str(exc)))
            return None
    if address is None:
        return None
    return TargetConfig(spec, address, key)
