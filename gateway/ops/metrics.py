"""The Prometheus text exposition (format 0.0.4) of a gateway, written directly.

A scrape reads the counters the routes and connectors keep anyway; nothing is updated per
message. The text is written here, one f-string per line, rather than through
prometheus_client's metric families, which build a sample tuple and a label dict per line and
format them one by one: at 10 000 routes (about 400 000 lines) that took 3 s, with the event
loop blocked all along. :func:`exposition` hands the text over a slice of routes at a time, and
its caller lets the event loop run between two chunks, so messages keep flowing during a scrape.

Each route is read at once, so its counters agree with each other within a scrape
(``received = acked + failed + dropped + filtered + in_flight``); two routes may be read a few
milliseconds apart, as any two scrapes are.

A route's latency histogram (21 of its ~40 lines) is written once the route acknowledged a
message, as prometheus_client does for the children of a labelled histogram: a config with many
idle routes costs little more than its active ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from gateway import __version__
from gateway.core.channel import ConnectorState
from gateway.core.policies import RouteState
from gateway.core.route import Route
from gateway.core.stats import Ages, Backlog, Latency
from gateway.ops.text import escape, family
from gateway.routes.requests import RequestRoute

if TYPE_CHECKING:
    from gateway.app import Gateway

ROUTES_PER_CHUNK = 100
"""Routes read and written between two pauses of the caller (about 1 ms of work)."""

_COUNTERS = {
    "received": "Messages the route took from its source",
    "sent": "Target deliveries the sink broker confirmed (a fan-out message counts once per target)",
    "acked": "Messages every target confirmed (the source was acknowledged)",
    "failed": "Messages that failed for good (non-retriable error, retries exhausted, unrenderable)",
    "dead_lettered": "Failed messages written to the route's dead-letter target",
    "retried": "Target deliveries tried again after a retriable error",
    "filtered": "Messages the route's where condition left out (acknowledged, not delivered)",
    "slow_consumer_disconnects": "Times the route was cut off as a slow consumer",
    "resubmitted": "Messages the watchdog submitted again after stuck_after without a confirmation",
    "sharded": "Messages acknowledged without forwarding: their shard_by key is another worker's (not received)",
}

_ROUTE_FAMILIES: tuple[tuple[str, str, str], ...] = (
    *((f"gateway_route_{key}_total", "counter", doc) for key, doc in _COUNTERS.items()),
    ("gateway_route_dropped_total", "counter", "Messages dropped, by reason (overflow or released)"),
    ("gateway_route_in_flight", "gauge", "Messages inside the route, not yet confirmed by every target"),
    ("gateway_route_in_flight_bytes", "gauge", "Payload bytes inside the route"),
    ("gateway_route_max_in_flight", "gauge", "The route's message budget"),
    ("gateway_route_max_in_flight_bytes", "gauge", "The route's byte budget"),
    (
        "gateway_route_oldest_in_flight_seconds",
        "gauge",
        "Age of the oldest message in flight (source receive to now); 0 when none",
    ),
    ("gateway_route_state", "gauge", "1 for the route's current state"),
    (
        "gateway_route_requests_total",
        "counter",
        "Request routes: requests forwarded, and how each ended (replied, timed_out, rejected, failed); late: "
        "answers that matched no waiting request",
    ),
    ("gateway_route_requests_pending", "gauge", "Request routes: requests waiting for an answer"),
    (
        "gateway_route_lag_messages",
        "gauge",
        "Consumer lag: messages waiting at the source's broker for this route (Kafka: log-end offset minus "
        "the gateway's position, summed over partitions; JetStream: the durable's pending), measured every "
        "few seconds",
    ),
    (
        "gateway_route_partition_lag_messages",
        "gauge",
        "Kafka sources: per partition, the log-end offset minus the gateway's position (behind) and minus "
        "its committed offset (uncommitted)",
    ),
    (
        "gateway_route_ack_pending_messages",
        "gauge",
        "JetStream sources: messages delivered to the gateway and not acknowledged yet (num_ack_pending)",
    ),
    (
        "gateway_route_redelivered_messages",
        "gauge",
        "JetStream sources: messages of the durable delivered more than once and not acknowledged yet",
    ),
    (
        "gateway_route_message_age_seconds",
        "histogram",
        "Freshness: age of messages when the route admitted them, from the source broker's timestamp (Kafka "
        "record timestamp, JetStream message time; MQTT and core NATS carry none)",
    ),
    (
        "gateway_route_latency_seconds",
        "histogram",
        "End-to-end latency of acknowledged messages: source receive to the last target's confirmation "
        "(written once the route acknowledged a message)",
    ),
)
_N_COUNTERS = len(_COUNTERS)
_STATES = tuple((st, f'",state="{st.value}"}} ') for st in RouteState)
_LE = (*(f'",le="{bound!r}"}} ' for bound in Latency().buckets), '",le="+Inf"} ')
_AGE_LE = (*(f'",le="{bound!r}"}} ' for bound in Ages().buckets), '",le="+Inf"} ')


def exposition(gw: Gateway) -> Iterator[str]:
    """The exposition, in chunks of text; the caller may let the event loop run between two (some are empty)."""
    yield _process(gw)
    routes = list(gw.routes.values())
    families: list[list[str]] = [[] for _ in _ROUTE_FAMILIES]
    for start in range(0, len(routes), ROUTES_PER_CHUNK):
        _write_routes(routes[start : start + ROUTES_PER_CHUNK], families)
        yield ""
    for (name, kind, doc), parts in zip(_ROUTE_FAMILIES, families, strict=True):
        yield f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"
        yield from parts
    yield _connectors(gw)


def _process(gw: Gateway) -> str:
    info = f'{{id="{escape(gw.config.gateway.id)}",version="{__version__}",config_sha256="{gw.config.digest[:12]}"}}'
    return "".join(
        (
            family("gateway_info", "gauge", "The gateway process", [(info, 1)]),
            family("gateway_uptime_seconds", "gauge", "Seconds since the gateway started", [("", gw.uptime)]),
            family("gateway_ready", "gauge", "1 when every used connector is connected", [("", int(gw.ready))]),
            family("gateway_config_reloads_total", "counter", "Configurations applied by reload", [("", gw.reloads)]),
        )
    )


def _write_routes(routes: Sequence[Route], families: list[list[str]]) -> None:
    """Append one fragment per family for ``routes``, each route read at once."""
    out: list[list[str]] = [[] for _ in families]
    counters = out[:_N_COUNTERS]
    keys = tuple(_COUNTERS)
    (dropped, in_flight, in_flight_bytes, max_in_flight, max_in_flight_bytes, oldest, state, requests, pending,
     lag, partition_lag, ack_pending, redelivered, age, latency) = out[_N_COUNTERS:]  # fmt: skip
    now_ns = time.monotonic_ns()
    for r in routes:
        name = escape(r.name)
        lab = f'{{route="{name}"}} '
        s = r.stats
        for lines, key in zip(counters, keys, strict=True):
            lines.append(f"gateway_route_{key}_total{lab}{getattr(s, key)}\n")
        dropped.append(
            f'gateway_route_dropped_total{{route="{name}",reason="overflow"}} {s.dropped_overflow}\n'
            f'gateway_route_dropped_total{{route="{name}",reason="released"}} {s.dropped_released}\n'
        )
        in_flight.append(f"gateway_route_in_flight{lab}{r.in_flight}\n")
        in_flight_bytes.append(f"gateway_route_in_flight_bytes{lab}{r.in_flight_bytes}\n")
        max_in_flight.append(f"gateway_route_max_in_flight{lab}{r.max_in_flight}\n")
        max_in_flight_bytes.append(f"gateway_route_max_in_flight_bytes{lab}{r.max_in_flight_bytes}\n")
        oldest.append(f"gateway_route_oldest_in_flight_seconds{lab}{r.oldest_in_flight(now_ns)}\n")
        for st, suffix in _STATES:
            state.append(f'gateway_route_state{{route="{name}{suffix}{int(r.state is st)}\n')
        if isinstance(r, RequestRoute):
            table = r.requests
            head = f'gateway_route_requests_total{{route="{escape(table.route)}",outcome="'
            requests.extend(f'{head}{outcome}"}} {n}\n' for outcome, n in table.stats.as_dict().items())
            pending.append(f'gateway_route_requests_pending{{route="{escape(table.route)}"}} {table.pending}\n')
        backlog = r.backlog
        if backlog is not None:
            _write_backlog(name, lab, backlog, lag, partition_lag, ack_pending, redelivered)
        _write_histogram("gateway_route_latency_seconds", name, lab, r.latency, _LE, latency)
        if r.ages.count:
            _write_histogram("gateway_route_message_age_seconds", name, lab, r.ages, _AGE_LE, age)
    for parts, lines in zip(families, out, strict=True):
        if lines:
            parts.append("".join(lines))


def _write_histogram(metric: str, name: str, lab: str, hist: Latency, le: tuple[str, ...], lines: list[str]) -> None:
    counts = hist.bucket_counts()
    if any(counts):
        head = f'{metric}_bucket{{route="{name}'
        cumulative = 0
        for suffix, n in zip(le, counts, strict=True):
            cumulative += n
            lines.append(f"{head}{suffix}{cumulative}\n")
        lines.append(f"{metric}_count{lab}{cumulative}\n{metric}_sum{lab}{hist.sum_ns / 1e9}\n")


def _write_backlog(
    name: str,
    lab: str,
    backlog: Backlog,
    lag: list[str],
    partition_lag: list[str],
    ack_pending: list[str],
    redelivered: list[str],
) -> None:
    if backlog.messages is not None:
        lag.append(f"gateway_route_lag_messages{lab}{backlog.messages}\n")
    detail = backlog.detail
    for partition, row in detail.get("partitions", {}).items():
        head = f'gateway_route_partition_lag_messages{{route="{name}",partition="{escape(partition)}",of="'
        if row["lag"] is not None:
            partition_lag.append(f'{head}position"}} {row["lag"]}\n')
        if row["uncommitted"] is not None:
            partition_lag.append(f'{head}committed"}} {row["uncommitted"]}\n')
    if "ack_pending" in detail:
        ack_pending.append(f"gateway_route_ack_pending_messages{lab}{detail['ack_pending']}\n")
        redelivered.append(f"gateway_route_redelivered_messages{lab}{detail['redelivered']}\n")


def _connectors(gw: Gateway) -> str:
    up: list[tuple[str, int]] = []
    state: list[tuple[str, int]] = []
    reconnects: list[tuple[str, int]] = []
    flapping: list[tuple[str, int]] = []
    queue: list[tuple[str, int]] = []
    events: list[tuple[str, int]] = []
    for name, c in gw.connectors.items():
        lab = f'connector="{escape(name)}",kind="{escape(gw.config.kind(name))}"'
        up.append((f"{{{lab}}}", int(c.connected.is_set())))
        state.extend((f'{{{lab},state="{st.value}"}}', int(c.state is st)) for st in ConnectorState)
        reconnects.append((f"{{{lab}}}", c.reconnects))
        flapping.append((f"{{{lab}}}", int(c.flapping)))
        if c.has_sink:
            queue.append((f"{{{lab}}}", c.sink.depth))
        events.extend((f'{{{lab},event="{escape(event)}"}}', n) for event, n in c.counters().items())
    return "".join(
        (
            family("gateway_connector_up", "gauge", "1 while the connector is connected", up),
            family("gateway_connector_state", "gauge", "1 for the connector's state", state),
            family("gateway_connector_reconnects_total", "counter", "Connections made after the first", reconnects),
            family(
                "gateway_connector_flapping",
                "gauge",
                "1 while the broker keeps dropping the connection soon after it is made",
                flapping,
            ),
            family("gateway_sink_queue_depth", "gauge", "Messages waiting for the sink's writer", queue),
            family(
                "gateway_connector_events_total",
                "counter",
                "Connector-specific events (e.g. NATS server_closed)",
                events,
            ),
        )
    )
