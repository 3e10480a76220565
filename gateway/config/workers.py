"""Several worker processes on one config (``gateway.workers``): how each route is split among them, and the
config each worker runs.

No home-made cluster: the brokers split the work. A route's source says how its broker shares it
(:attr:`SourceSpec.split`), and the route's ``order`` says what the user needs kept:

========================  =====================================================================================
``partitions``            Kafka: every worker joins the consumer group, the broker gives each its partitions;
                          each partition's order is kept (per key, for keyed producers).
``broker``                ``order: none`` on MQTT / NATS: a shared subscription, a queue group, a shared
                          JetStream durable; each message goes to one worker, no order kept.
``sharded``               ``shard_by`` on MQTT / NATS: every worker reads the whole stream and forwards the keys
                          that hash to it, acknowledging the others; per-key order kept, N reads per message.
``one``                   anything else the broker would split round-robin (or cannot share): worker 0 runs it,
                          the source's own order kept, nothing spread.
``each``                  the companion route of a ``request:`` route: every worker that sends requests reads
                          the answers at its own reply address.
========================  =====================================================================================

Checked at load (:func:`plan`): a route that asks the broker to split it round-robin (``share_group``,
``queue``) while keeping per-key order (the default) is refused with what to write instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import msgspec

from gateway.config.model import Config, RouteConfig
from gateway.config.registry import plugins
from gateway.errors import ConfigError, ConfigIssue

Mode = Literal["partitions", "broker", "sharded", "one", "each"]


def cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_count(setting: int | str) -> int:
    """``gateway.workers`` (or ``--workers``) as a number: ``auto`` is :func:`cores`."""
    return cores() if setting == "auto" else int(setting)


@dataclass(frozen=True, slots=True)
class Split:
    """How one route runs across the workers."""

    route: str
    mode: Mode
    how: str
    """What splits it, in words (``partitions of consumer group g``, ``sharded by {device}``)."""
    order: str
    """What order it keeps, in words."""

    def runs_on(self, worker: int) -> bool:
        return self.mode != "one" or worker == 0


def _index(config: Config) -> dict[str, int]:
    """Route name -> its index in the file's ``routes:`` (a request route's companion shares its index)."""
    out: dict[str, int] = {}
    i = -1
    for rc in config.routes:
        if rc.request is None or rc.request.replies_for is None:
            i += 1
        out[rc.name] = i
    return out


def group_name(route: str) -> str:
    """The name under which the workers share a route's source (MQTT share, NATS queue group), like the
    defaults of a Kafka group (``gateway.<route>``) and a JetStream durable (``gateway-<route>``)."""
    return f"gateway.{route}"


def plan(config: Config, workers: int) -> list[Split]:
    """The split of every route over ``workers`` processes; ConfigError for routes that cannot run as written."""
    issues: list[ConfigIssue] = []
    index = _index(config)
    own: dict[str, Split] = {}
    for rc in config.routes:
        if rc.request is None or rc.request.replies_for is None:
            split = _split(rc, workers, f"routes[{index[rc.name]}]", issues)
            if split is not None:
                own[rc.name] = split
    if issues:
        raise ConfigError(issues)
    splits: list[Split] = []
    for rc in config.routes:
        if rc.request is not None and rc.request.replies_for is not None:
            # Answers come back to the worker that asked: each reads its own reply address.
            asking = own[rc.request.replies_for]
            mode: Mode = "one" if asking.mode == "one" else "each"
            splits.append(Split(rc.name, mode, "each worker reads the answers to its own requests", "as they arrive"))
        else:
            splits.append(own[rc.name])
    return splits


def _split(rc: RouteConfig, workers: int, path: str, issues: list[ConfigIssue]) -> Split | None:
    spec, section, name = rc.source, rc.section, rc.name
    if spec.split == "partitions":
        how = spec.broker_split(name) or "partitions"
        return Split(name, "partitions", how, "per partition (per key, for producers that partition by key)")
    if workers <= 1:
        return Split(name, "one", "one worker", "as the source delivers")
    if spec.split == "none":  # an in-process source: each worker has its own
        return Split(
            name, "each", "every worker runs its own copy (the source is inside each process)", "as it delivers"
        )
    leg = section.request
    if leg is not None and leg.reply_to is not None and (rc.sharded or section.order == "none"):
        issues.append(
            ConfigIssue(
                f"{path}.request.reply_to",
                f"the {workers} workers would share one reply address and read each other's answers: leave "
                "reply_to out (each worker gets its own) or let one worker run the route (no shard_by / order: none)",
            )
        )
        return None
    if rc.sharded:
        key = section.shard_by
        return Split(
            name,
            "sharded",
            f"sharded by {key}: every worker reads every message and forwards the keys that hash to it",
            f"per key ({key})",
        )
    if section.order == "none":
        shared = spec.shared(name, group_name(name))
        if shared is None:
            issues.append(
                ConfigIssue(f"{path}.order", "this source cannot be split by its broker (retained_only): remove it")
            )
            return None
        return Split(name, "broker", shared[1], "none across workers (order: none)")
    explicit = spec.broker_split(name)
    if explicit is not None:
        issues.append(
            ConfigIssue(
                f"{path}.from",
                f"the broker splits this source round-robin among the {workers} workers ({explicit}): per-key "
                "order is lost; add `order: none` to the route to accept that, or keep the order with "
                "`shard_by: {capture}` (and no share_group / queue)",
            )
        )
        return None
    return Split(
        name,
        "one",
        "worker 0 only (add shard_by to spread it by key, or order: none to let the broker split it)",
        "as the source delivers",
    )


def for_worker(config: Config, index: int, count: int, *, http_token: str) -> Config:
    """The config worker ``index`` of ``count`` runs: its own client names, spool directories and monitoring
    endpoint (loopback, a free port, the supervisor's token), and its share of the routes.

    ``config`` was loaded with ``worker=index`` (its gateway id already ends in ``-w<index>``)."""
    splits = {s.route: s for s in plan(config, count)}
    kinds = plugins()
    connectors = {}
    for cname, cfg in config.connectors.items():
        plugin = kinds[config.kind(cname)]
        changes = {f: f"{getattr(cfg, f)}-w{index}" for f in plugin.identity if getattr(cfg, f, "")}
        connectors[cname] = msgspec.structs.replace(cfg, **changes) if changes else cfg
    routes: list[RouteConfig] = []
    for rc in config.routes:
        split = splits[rc.name]
        if not split.runs_on(index):
            continue
        section = rc.section
        if section.spool is not None:
            spool = msgspec.structs.replace(section.spool, path=f"{section.spool.path.rstrip('/')}-w{index}")
            section = msgspec.structs.replace(section, spool=spool)
        source = rc.source
        if split.mode == "broker":
            shared = source.shared(rc.name, group_name(rc.name))
            assert shared is not None  # plan() refused the routes whose source cannot be shared
            source = shared[0]
        elif split.mode == "sharded" and rc.sharded:
            source = source.whole(rc.name, index)
        routes.append(
            RouteConfig(
                section, source, rc.patterns, rc.targets, rc.dead_letter, rc.request, rc.shard_key, rc.shard_header
            )
        )
    http = msgspec.structs.replace(config.gateway.http, listen="127.0.0.1:0", token=http_token, token_file=None)
    gateway = msgspec.structs.replace(config.gateway, http=http)
    return Config(
        gateway=gateway,
        connectors=connectors,
        routes=tuple(routes),
        source=config.source,
        digest=config.digest,
        worker=(index, count),
    )
