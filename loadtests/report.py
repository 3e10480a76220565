"""RESULTS.md and throughput.png from the harness's JSON lines."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from loadtests.scenarios import BY_NAME, ROUTES

REQUIRED: dict[str, tuple[str, float]] = {
    # route: (what is required, threshold): msgs/s, or for core NATS sources the offered rate without loss
    "kafka_to_nats": ("≥ 100 000 msgs/s", 100_000),
    "jetstream_to_kafka": ("≥ 32 000 msgs/s", 32_000),
    "corenats_to_kafka": ("no loss at 20 000 msgs/s offered", 0),
    "mqtt_to_kafka": ("≥ 45 000 msgs/s", 45_000),
    "mqtt_to_nats": ("≥ 60 000 msgs/s", 60_000),
    "kafka_to_mqtt": ("≥ 12 000 msgs/s", 12_000),
    "corenats_to_mqtt": ("no loss at 10 000 msgs/s offered", 0),
    "fanout_mqtt": ("—", 0),
    "mqtt_to_kafka_kafkadriver_aiokafka": ("(driver comparison)", 0),
    "kafka_to_nats_kafkadriver_aiokafka": ("(driver comparison)", 0),
    "mqtt_to_kafka_compression_none": ("(codec comparison)", 0),
    "mqtt_to_kafka_spool": ("(store-and-forward cost)", 0),
    "kafka_to_nats_workers_2": ("(2 workers)", 0),
    "jetstream_to_kafka_workers_2": ("(2 workers)", 0),
    "mqtt_to_kafka_keyed": ("(16 keys, 1 worker)", 0),
    "mqtt_to_kafka_workers_2": ("(2 workers)", 0),
    "mqtt_to_kafka_keyed_workers_2": ("(16 keys, 2 workers)", 0),
}
WORKER_ROWS = (
    # (one worker, two workers, the peer's route), measured in the same run
    ("kafka_to_nats", "kafka_to_nats_workers_2", "kafka_to_nats"),
    ("jetstream_to_kafka", "jetstream_to_kafka_workers_2", "jetstream_to_kafka"),
    ("mqtt_to_kafka", "mqtt_to_kafka_workers_2", "mqtt_to_kafka"),
    ("mqtt_to_kafka_keyed", "mqtt_to_kafka_keyed_workers_2", "mqtt_to_kafka"),
)
SINK_OF = {r.name: r.sinks[0] if len(r.sinks) == 1 else "kafka" for r in ROUTES}


def _runs(rows: list[dict[str, Any]], kind: str, route: str, size: int = 128) -> list[dict[str, Any]]:
    return [
        r
        for r in rows
        if r["test"] == "throughput"
        and r.get("kind") == kind
        and r["route"] == route
        and r.get("size") == size
        and "error" not in r
    ]


def _median(runs: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else 0.0


def _direct(rows: list[dict[str, Any]], sink: str) -> float:
    vals = [r["end_to_end_msgs_s"] for r in rows if r["test"] == "direct" and r["sink"] == sink]
    return vals[0] if vals else 0.0


def _fmt(x: float) -> str:
    return f"{x:,.0f}".replace(",", " ") if x else "—"


def _verdict(route: str, gw: list[dict[str, Any]]) -> str:
    threshold = REQUIRED[route][1]
    if not gw:
        return "not measured"
    if BY_NAME[route].offered is not None:
        lost = max(r["lost"] for r in gw)
        return "met (0 lost)" if lost == 0 else f"**not met** ({lost} lost)"
    if not threshold:
        return ""
    value = _median(gw, "steady_msgs_s")
    return "met" if value >= threshold else "**not met**"


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| route | required | gateway msgs/s (median) | peer msgs/s | sink broker limit | gateway/peer | "
        "gateway/limit | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for route in ROUTES:
        gw, peer = _runs(rows, "gateway", route.name), _runs(rows, "peer", route.name)
        if not gw and not peer:
            continue
        g, pe, lim = _median(gw, "steady_msgs_s"), _median(peer, "steady_msgs_s"), _direct(rows, SINK_OF[route.name])
        if route.offered is not None:
            g_txt = f"{_fmt(g)} ({max((r['lost'] for r in gw), default=0)} lost of {gw[0]['n'] if gw else 0})"
            p_txt = f"{_fmt(pe)} ({max((r['lost'] for r in peer), default=0)} lost)" if peer else "—"
        else:
            g_txt, p_txt = _fmt(g), _fmt(pe)
        out.append(
            f"| {route.label} | {REQUIRED[route.name][0]} | {g_txt} | {p_txt} | {_fmt(lim)} | "
            f"{g / pe:.2f}× | {g / lim:.2f}× | {_verdict(route.name, gw)} |"
            if pe and lim
            else f"| {route.label} | {REQUIRED[route.name][0]} | {g_txt} | {p_txt} | {_fmt(lim)} | — | "
            f"{(g / lim) if lim else 0:.2f}× | {_verdict(route.name, gw)} |"
        )
    return "\n".join(out)


SIZES = {128: "128 B", 4096: "4 KiB", 65536: "64 KiB"}
CPU_ROUTES = ("kafka_to_nats", "mqtt_to_nats", "mqtt_to_kafka")
"""Routes whose CPU per message is held to the peer's (issue: performance II)."""


def _goal(route: str, size: int) -> tuple[float | None, float | None]:
    """(throughput ratio to reach, CPU ratio not to exceed) against the peer; None where none is set."""
    rate = {128: 1.0, 4096: 0.8}.get(size)
    cpu = {128: 1.25, 4096: 1.5}.get(size) if route in CPU_ROUTES else None
    return rate, cpu


def vs_peer(rows: list[dict[str, Any]]) -> str:
    """Throughput and CPU per message beside the peer, per route and payload size (medians)."""
    out = [
        "| route | payload | gateway msgs/s | peer msgs/s | gateway/peer | CPU s/100k gateway / peer | CPU ratio | "
        "steady window s gateway / peer | goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for route in ROUTES:
        for size, label in SIZES.items():
            gw, peer = _runs(rows, "gateway", route.name, size), _runs(rows, "peer", route.name, size)
            if not gw or not peer:
                continue
            g, p = _median(gw, "steady_msgs_s"), _median(peer, "steady_msgs_s")
            gc, pc = _median(gw, "cpu_s_per_100k"), _median(peer, "cpu_s_per_100k")
            gwin, pwin = _median(gw, "steady_window_s"), _median(peer, "steady_window_s")
            rate_goal, cpu_goal = _goal(route.name, size)
            ratio = g / p if p else 0.0
            cpu_ratio = gc / pc if pc else 0.0
            goals = []
            if rate_goal is not None and route.offered is None:
                goals.append(f"rate ≥ {rate_goal}× {'met' if ratio >= rate_goal else '**not met**'}")
            if cpu_goal is not None:
                goals.append(f"CPU ≤ {cpu_goal}× {'met' if cpu_ratio <= cpu_goal else '**not met**'}")
            out.append(
                f"| {route.label} | {label} | {_fmt(g)} | {_fmt(p)} | {ratio:.2f}× | {gc:.2f} / {pc:.2f} | "
                f"{cpu_ratio:.2f}× | {gwin:.1f} / {pwin:.1f} | {'; '.join(goals) or '—'} |"
            )
    return "\n".join(out)


def _details(rows: list[dict[str, Any]]) -> str:
    out = [
        "| route | bridge | 128 B runs (msgs/s) | 4 KiB msgs/s | 64 KiB msgs/s | lost | dup | idle RSS MB | "
        "peak RSS MB | CPU s / 100k (128 B / 4 KiB / 64 KiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for route in ROUTES:
        for kind in ("gateway", "peer"):
            small, large = _runs(rows, kind, route.name), _runs(rows, kind, route.name, 4096)
            huge = _runs(rows, kind, route.name, 65536)
            errors = [
                r
                for r in rows
                if r["test"] == "throughput" and r.get("kind") == kind and r["route"] == route.name and "error" in r
            ]
            if not small and not large and not errors:
                continue
            runs = ", ".join(_fmt(r["steady_msgs_s"]) for r in small) or "—"
            if errors:
                runs += f" ({len(errors)} failed: {errors[0]['error'][:60]})"
            allr = small + large + huge
            idle = [r for r in rows if r["test"] == "latency" and r.get("kind") == kind and r["route"] == route.name]
            out.append(
                f"| {route.label} | {kind} | {runs} | {_fmt(_median(large, 'steady_msgs_s'))} | "
                f"{_fmt(_median(huge, 'steady_msgs_s'))} | "
                f"{max((r['lost'] for r in allr), default=0)} | {max((r['duplicates'] for r in allr), default=0)} | "
                f"{round(_median(idle, 'idle_rss_mb') or _median(small, 'idle_rss_mb'), 1)} | "
                f"{max((r['peak_rss_mb'] for r in allr), default=0)} | "
                f"{_median(small, 'cpu_s_per_100k')} / {_median(large, 'cpu_s_per_100k') or '—'} / "
                f"{_median(huge, 'cpu_s_per_100k') or '—'} |"
            )
    return "\n".join(out)


def _latency(rows: list[dict[str, Any]]) -> str:
    out = [
        "| route | bridge | offered msgs/s | p50 / p99 / max ms | no bridge p50 / p99 ms | added p50 / p99 ms | "
        "Kafka hop alone p50 / p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["test"] != "latency":
            continue
        label = BY_NAME[r["route"]].label
        if "error" in r:
            out.append(f"| {label} | {r['kind']} | {r['rate']:,.0f} | error: {r['error'][:60]} | | |")
            continue
        d = r["direct"]
        hop = r.get("source_hop")
        hop_txt = f"{hop['p50_ms']} / {hop['p99_ms']}" if hop else ""
        out.append(
            f"| {label} | {r['kind']} | {r['rate']:,.0f} | {r['p50_ms']} / {r['p99_ms']} / {r['max_ms']} | "
            f"{d['p50_ms']} / {d['p99_ms']} | {r['added_p50_ms']} / {r['added_p99_ms']} | {hop_txt} |"
        )
    return "\n".join(out)


def _router(rows: list[dict[str, Any]]) -> str:
    rr = [r for r in rows if r["test"] == "router"]
    if not rr:
        return ""
    base = rr[0]["us_per_trie_lookup"]
    out = [
        "| rules | trie lookups/s (same topics) | µs per lookup | vs 10 rules | "
        "trie lookups/s (topics over all rules) | cached plan lookups/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rr:
        out.append(
            f"| {r['rules']:,} | {_fmt(r['trie_lookups_s'])} | {r['us_per_trie_lookup']} | "
            f"{r['us_per_trie_lookup'] / base:.2f}× | {_fmt(r['trie_lookups_s_spread'])} | "
            f"{_fmt(r['cached_lookups_s'])} |"
        )
    return "\n".join(out)


def _profile(rows: list[dict[str, Any]]) -> str:
    prof = [r for r in rows if r["test"] == "profile"]
    if not prof:
        return ""
    p = prof[-1]
    label = BY_NAME[p["route"]].label
    return (
        f"\n## Where the gateway spends its CPU ({label}, {_fmt(p['steady_msgs_s'])} msgs/s)\n\n"
        f"py-spy samples of the gateway process during one more throughput run "
        f"(`python -m loadtests.profile {p['route']}` does the same alone):\n\n```\n{p['summary']}\n```\n"
    )


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routes = [r for r in ROUTES if _runs(rows, "gateway", r.name)]
    labels = [r.label for r in routes]
    gw = [_median(_runs(rows, "gateway", r.name), "steady_msgs_s") for r in routes]
    peer = [_median(_runs(rows, "peer", r.name), "steady_msgs_s") for r in routes]
    lim = [_direct(rows, SINK_OF[r.name]) for r in routes]
    x = range(len(routes))
    fig, ax = plt.subplots(figsize=(12, 5.5))
    w = 0.27
    ax.bar([i - w for i in x], gw, w, label="gateway", color="#2a7ab9")
    ax.bar(list(x), peer, w, label="mq-bridge 1.2 (peer)", color="#e08a2c")
    ax.bar([i + w for i in x], lim, w, label="sink broker limit (no bridge)", color="#9aa5b1")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=9)
    ax.set_ylabel("messages/s (128-byte payloads, median)")
    ax.set_title("Steady throughput per route (core NATS sources: at their fixed offered rate)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def workers_table(rows: list[dict[str, Any]]) -> str:
    """One worker against two, beside the peer, at 128 B (medians); CPU of the brokers during the 2-worker runs."""
    out = [
        "| route | 1 worker msgs/s | 2 workers msgs/s | 2 / 1 | peer msgs/s | 2 workers / peer | "
        "CPU s/100k 1 w / 2 w / peer | msgs per CPU second, 1 worker | CPU % in the 2-worker runs | "
        "supervisor idle RSS MB | lost |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for one_name, two_name, peer_name in WORKER_ROWS:
        one, two = _runs(rows, "gateway", one_name), _runs(rows, "gateway", two_name)
        peer = _runs(rows, "peer", peer_name)
        if not two:
            continue
        g1, g2, p = (_median(x, "steady_msgs_s") for x in (one, two, peer))
        c1, c2, cp = (_median(x, "cpu_s_per_100k") for x in (one, two, peer))
        per_core = 100_000 / c1 if c1 else 0.0
        shares: dict[str, list[float]] = {}
        for r in two:
            for who, pct in (r.get("cpu_percent") or {}).items():
                shares.setdefault(who, []).append(pct)
        cpu = ", ".join(f"{who} {statistics.median(v):.0f}" for who, v in sorted(shares.items()))
        sup = _median(two, "supervisor_idle_rss_mb")
        lost = max((r["lost"] for r in (*one, *two)), default=0)
        out.append(
            f"| {BY_NAME[two_name].label} | {_fmt(g1)} | {_fmt(g2)} | {g2 / g1 if g1 else 0:.2f}× | {_fmt(p)} | "
            f"{g2 / p if p else 0:.2f}× | {c1:.2f} / {c2:.2f} / {cp:.2f} | {_fmt(per_core)} | {cpu} | {sup:.1f} | "
            f"{lost} |"
        )
    return "\n".join(out)


def _workers_section(rows: list[dict[str, Any]]) -> str:
    table_text = workers_table(rows)
    if table_text.count("\n") < 2:
        return ""
    return f"""
## Several workers (`gateway.workers: 2`)

The same routes with one worker process and with two under a supervisor, beside the peer, 128 B, in this
run. Kafka → NATS splits by partition (4 partitions); JetStream → Kafka takes the shared durable
(`order: none`); the MQTT rows publish round-robin to 16 device topics and shard by `{{device}}` (every
worker reads every message, forwards its keys; the one-worker row is the same config). *CPU %* is each
process's CPU over the run's wall time (100 = one core): the brokers, the harness's own clients and the
gateway (supervisor and workers) share the machine's 2 cores (200 %). *Msgs per CPU second* is the
per-core figure docs/scaling.md works from.

{table_text}
"""


def _hotpath() -> str:
    """The hand-kept before/after measurements of changes to the per-message path."""
    path = Path(__file__).with_name("HOTPATH.md")
    return path.read_text() if path.exists() else ""


def write(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    chart(rows, out / "throughput.png")
    text = f"""# Load-test results

Generated by `loadtests/run.py` (do not edit by hand; rerun it).

- **Date**: {meta["date"]}
- **Machine**: {meta["machine"]}
- **Command**: `.venv/bin/{meta["command"]}` ({meta["minutes"]} min)
- **Brokers**: Mosquitto 2.0.11, nats-server 2.15 (JetStream), Tansu 0.6 (Kafka protocol, memory storage),
  all on loopback, started by the harness. Raw lines: [`results.jsonl`](results.jsonl).

Throughput is the steady rate (10th to 90th percentile arrival) at the sink, median of the runs;
each run moves enough messages for that window to last seconds for both bridges (the windows are in
the table below: shorter runs measure the peer's prefetch burst, not its sustained rate). Durable
sources were preloaded before the bridge started; core NATS sources were offered at a fixed rate.
The gateway runs with the configuration a user would write: no tuning keys beyond what the connector
reference tells users to set for Tansu (`fetch_max_wait_ms`, see the latency section).
The *sink broker limit* is the harness's own clients publishing
straight into the sink broker and counting at the same consumer, in the same run. Both bridges ran
as separate processes beside the brokers and the harness on the same 2 cores.

## Summary

{table(rows)}

## Beside the peer: throughput and CPU per message, by payload size

CPU seconds per 100 000 messages delivered, whole process (all threads), medians; the goals are the
performance issue's (throughput ≥ 1.0× the peer at 128 B and ≥ 0.8× at 4 KiB; CPU per message
≤ 1.25× at 128 B and ≤ 1.5× at 4 KiB on the three main routes); 64 KiB is measured, not held to a goal.

{vs_peer(rows)}

![throughput per route](throughput.png)

## Throughput details

*Idle RSS* is sampled 1 s after the bridge connected with nothing to move (the latency runs' start);
*peak RSS* is the highest sample over the throughput runs, which start on a preloaded backlog.

{_details(rows)}

## Latency (128-byte payloads, offered rate, bridge vs. no bridge)

"No bridge" is the same clients publishing straight to the sink broker; "added" is the difference
(so for Kafka sources it includes the Kafka hop itself, shown alone in the last column: the
harness producing into Tansu and consuming from it, no bridge). The first 10 % of each series is
dropped as warm-up. Fixed-rate producers send without lingering; the gateway's Kafka connectors
use `fetch_max_wait_ms: 2` here because Tansu holds every empty fetch for the whole wait.

{_latency(rows)}

## Router micro-benchmark

{_router(rows)}
{_workers_section(rows)}{_profile(rows)}
{_hotpath()}"""
    (out / "RESULTS.md").write_text(text)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
