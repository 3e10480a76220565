"""The status page (``/``) in a real browser.

Headless Chromium (Debian package ``chromium``, installed by ``scripts/setup.sh``)
is driven over the Chrome DevTools protocol with aiohttp's websocket client: one
page stays open, so its own 1 s polling runs in real time. The tests read what
the page rendered (``data-route``/``data-field``/``data-value`` attributes, the
topology picture's ``data-node``/``data-edge`` elements) and save a full-page
screenshot into the test's tmp dir.

* against a gateway process with traffic flowing: the numbers of an MQTT -> NATS
  route, read twice a few seconds apart, moved and agree with ``/routez``; then
  the gateway stops and the page says it is unreachable;
* against an in-process gateway whose JetStream route has a backlog (its memory
  target holds every message, as in ``tests/integration/test_lag.py``), among 20
  routes: the lag, the broker's counters behind it and the freshness columns show
  what ``/routez`` says, and the topology picture has one node per connector and
  route and one line per link.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from connectors.memory.broker import MemoryBroker
from gateway import Gateway
from gateway.config import parse_config
from gateway.ops.monitor import Monitor
from tests.support.brokers import Mosquitto, NatsServer
from tests.support.clients.mqtt import MqttPublisher
from tests.support.clients.nats import js_publish_all, nats_connect
from tests.support.configs import gateway_config, mqtt_connector, nats_connector
from tests.support.gateway_process import GatewayProcess
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.timeout(60)]

ROUTE = "telemetry"
RATE = 300
"""Messages per second the test publishes."""
DEVICES = 5


def chromium_binary() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
    if found is None:
        pytest.fail("chromium is not installed: run scripts/setup.sh (installs the Debian package 'chromium')")
    return found


# ------------------------------------------------------------------ a minimal DevTools client


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol (a websocket)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.profile = workdir / "chromium-profile"
        self.stderr_path = workdir / "chromium.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    async def start(self, timeout: float = 20.0) -> None:
        self.profile.mkdir(parents=True, exist_ok=True)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    chromium_binary(),
                    "--headless=new",
                    "--disable-gpu",
                    "--no-sandbox",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--hide-scrollbars",
                    "--window-size=1280,900",
                    "--remote-debugging-port=0",
                    f"--user-data-dir={self.profile}",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        port_file = self.profile / "DevToolsActivePort"  # written once the browser listens
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"chromium did not start (rc={self.proc.poll()}):\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        async with self._http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
        page = next(t for t in targets if t["type"] == "page")
        self._ws = await self._http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def send(self, method: str, timeout: float = 10.0, **params: Any) -> dict[str, Any]:
        """One command; waits for its answer (events in between are ignored)."""
        assert self._ws is not None
        msg_id = next(self._ids)
        await self._ws.send_json({"id": msg_id, "method": method, "params": params})
        async with asyncio.timeout(timeout):
            while True:
                msg = await self._ws.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise AssertionError(f"DevTools connection closed ({msg.type}):\n{self.log_tail()}")
                data = json.loads(msg.data)
                if data.get("id") == msg_id:
                    if "error" in data:
                        raise AssertionError(f"{method}: {data['error']}")
                    return dict(data.get("result", {}))

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        """Until ``expression`` is truthy in the page; returns its value."""
        deadline = time.monotonic() + timeout
        while not (value := await self.evaluate(expression)):
            if time.monotonic() > deadline:
                body = await self.evaluate("document.body.innerText")
                raise AssertionError(f"page: not {what} after {timeout}s; it shows:\n{body}")
            await asyncio.sleep(0.1)
        return value

    async def screenshot(self, path: Path) -> Path:
        """The whole page, beyond the window's height too."""
        size = (await self.send("Page.getLayoutMetrics"))["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        result = await self.send("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(result["data"]))
        return path

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    async def close(self) -> None:
        """Browser.close over DevTools (SIGTERM without it), SIGKILL to its process group after 5 s."""
        asked = False
        if self._ws is not None:
            with suppress(Exception):
                await self._ws.send_json({"id": next(self._ids), "method": "Browser.close"})
                asked = True
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        proc = self.proc
        if proc is not None:
            if not asked and proc.poll() is None:
                proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the browser and its helpers only
                proc.wait()


# ------------------------------------------------------------------ traffic


class Traffic:
    """An MQTT QoS 1 publisher in a thread, at about ``rate`` messages per second, until stopped."""

    def __init__(self, port: int, client_id: str, topic: str, rate: int) -> None:
        self.pub = MqttPublisher(port, client_id)
        self.topic = topic
        self.rate = rate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._closed = False
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            batch, t0 = max(1, self.rate // 20), time.monotonic()
            for seq in itertools.count(0, batch):
                for s in range(seq, seq + batch):
                    self.pub.publish_seq(self.topic.format(device=f"dev{s % DEVICES}"), s, DEVICES)
                ahead = t0 + (seq + batch) / self.rate - time.monotonic()
                if self._stop.wait(max(0.0, ahead)):
                    return
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def start(self) -> Traffic:
        self.pub.connect()
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop publishing (idempotent); returns how many messages were published."""
        self._stop.set()
        if not self._closed:
            self._closed = True
            self._thread.join(10)
            self.pub.close()
        if self.error is not None:
            raise AssertionError(f"publisher failed: {self.error!r}")
        return self.pub.published


# ------------------------------------------------------------------ the test

READ_ROUTE = """(route) => {
  const value = (node) => node && node.dataset.value !== "" ? Number(node.dataset.value) : null;
  const varz = (k) => document.querySelector(`[data-varz="${k}"]`).dataset.value;
  const row = document.querySelector(`[data-route="${CSS.escape(route)}"]`);
  if (!row) return null;
  const f = (n) => row.querySelector(`[data-field="${n}"]`);
  const detail = document.querySelector(`[data-backlog-of="${CSS.escape(route)}"]`);
  const conns = {};
  for (const c of document.querySelectorAll("[data-connector]"))
    conns[c.dataset.connector] = c.querySelector('[data-field="state"]').textContent;
  return {
    status: document.getElementById("status").dataset.state,
    id: varz("id"), ready: varz("ready"), sha: varz("config_sha"), uptime: Number(varz("uptime")),
    connectors: conns, state: f("state").textContent, path: f("path").textContent,
    received: value(f("received")), acked: value(f("acked")),
    rate_in: value(f("rate_in")), rate_out: value(f("rate_out")),
    in_flight: value(f("in_flight")), dropped: value(f("dropped")), failed: value(f("failed")),
    dead_lettered: value(f("dead_lettered")), p99_ms: value(f("latency_p99")),
    sparkline_points: row.querySelector("svg.spark.in polyline").getAttribute("points").split(" ").length,
    lag: value(f("lag")), lag_text: f("lag").textContent,
    backlog: Object.fromEntries([...(detail ? detail.querySelectorAll("[data-counter]") : [])].map(
      (n) => [n.dataset.counter, n.textContent])),
    backlog_open: Boolean(detail && !detail.hidden),
    age_p99: value(f("age_p99")), age_text: f("age_p99").textContent,
    oldest_in_flight: value(f("oldest_in_flight")),
  };
}"""
READ_PAGE = f"({READ_ROUTE})({json.dumps(ROUTE)})"
"""What the page shows: the header, the connectors' states and the route's row (numbers from ``data-value``)."""

READ_TOPOLOGY = """(() => {
  const svg = document.getElementById("topology");
  return {
    nodes: [...svg.querySelectorAll("[data-node]")].map((n) => n.dataset.node).sort(),
    edges: [...svg.querySelectorAll("[data-edge]")].map((e) => e.dataset.edge + " " + e.dataset.role).sort(),
    dashed: [...svg.querySelectorAll("[data-edge]")].filter((e) => getComputedStyle(e).strokeDasharray !== "none")
      .map((e) => e.dataset.edge).sort(),
    width: svg.getBoundingClientRect().width, height: svg.getBoundingClientRect().height,
  };
})()"""
"""The topology picture: its nodes (``connector:NAME``, ``route:NAME``), its lines and their sizes on screen."""


def expected_topology(routez: dict[str, Any], connz: dict[str, Any]) -> dict[str, list[str]]:
    """What the picture must hold, from ``/routez`` and ``/connz``: a node per connector and route; a line from a
    route's source, one to each connector among its targets (several targets on one connector: one line),
    a dashed one to its dead letter."""
    nodes = {f"connector:{c['name']}" for c in connz["connectors"]}
    edges, dashed = set(), set()
    for r in routez["routes"]:
        nodes.add(f"route:{r['name']}")
        edges.add(f"{r['source']}→{r['name']} source")
        edges |= {f"{r['name']}→{t.split(':', 1)[0]} target" for t in r["targets"]}
        if r["dead_letter"]:
            edges.add(f"{r['name']}→{r['dead_letter']} dead-letter")
            dashed.add(f"{r['name']}→{r['dead_letter']}")
    return {"nodes": sorted(nodes), "edges": sorted(edges), "dashed": sorted(dashed)}


async def fetch_json(url: str) -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, http.get(url) as resp:
        return await resp.json()


async def test_status_page_in_chromium(
    gateways: Any, mosquitto: Mosquitto, nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    chromium_binary()  # fail first, with the fix, when it is missing
    t_start = time.monotonic()
    u = unique
    gw: GatewayProcess = gateways(
        gateway_config(
            f"gw-{u}",
            {"mq": mqtt_connector(mosquitto.url, f"gw-{u}-mq"), "bus": nats_connector(nats_server.url)},
            [
                {
                    "name": ROUTE,
                    "from": {"connector": "mq", "topic": f"status/{u}/{{device}}/up", "qos": 1},
                    "to": {"connector": "bus", "subject": f"status.{u}.{{device}}.up"},
                }
            ],
        )
    )
    await gw.astart()
    await gw.await_until(lambda: gw.http_url is not None, 10, "listening on HTTP")
    url = f"{gw.http_url}/"
    traffic = await asyncio.to_thread(Traffic(mosquitto.port, f"pub-{u}", f"status/{u}/{{device}}/up", RATE).start)
    browser = Browser(tmp_path)
    try:
        await browser.start()
        await browser.send("Page.enable")
        await browser.send("Page.navigate", url=url)
        await browser.wait_for(
            f"(() => {{ const r = {READ_PAGE}; return r && r.rate_in > 0 && r.rate_out > 0; }})()",
            15,
            "showing a rate in and out",
        )
        first = await browser.evaluate(READ_PAGE)
        await asyncio.sleep(4.0)
        second = await browser.evaluate(READ_PAGE)
        routez = await fetch_json(f"{gw.http_url}/routez")
        varz = await fetch_json(f"{gw.http_url}/varz")
        connz = await fetch_json(f"{gw.http_url}/connz")
        topology = await browser.evaluate(READ_TOPOLOGY)
        shot = await browser.screenshot(tmp_path / "status-page.png")
        published = await asyncio.to_thread(traffic.stop)

        print(f"\nSTATUS PAGE first:  {first}\nSTATUS PAGE second: {second}")
        print(f"STATUS PAGE screenshot: {shot} ({shot.stat().st_size} bytes); published {published} messages")

        # the header and the connectors table
        assert second["status"] == "ok"
        assert second["id"] == f"gw-{u}"
        assert second["ready"] == "true"
        assert second["sha"] == varz["config"]["sha256"][:12]
        assert second["uptime"] > first["uptime"]
        assert second["connectors"] == {"mq": "connected", "bus": "connected"}
        # the route row: the numbers moved while the page stayed open
        assert second["state"] == "running"
        assert second["path"] == f"mq → bus:status.{u}.{{device}}.up"
        assert second["received"] > first["received"] > 0
        assert second["acked"] > first["acked"] > 0
        moved = second["received"] - first["received"]
        assert moved >= RATE, f"received moved by {moved} in 4 s at {RATE} msgs/s"
        for key in ("rate_in", "rate_out"):
            assert RATE / 4 < second[key] < RATE * 4, f"{key} {second[key]} msgs/s, publishing {RATE} msgs/s"
        assert second["sparkline_points"] >= 3
        assert second["p99_ms"] is not None and second["p99_ms"] > 0
        assert second["dropped"] == second["failed"] == second["dead_lettered"] == 0
        assert 0 <= second["in_flight"] <= 10_000
        # what the page shows is what the gateway said a moment before
        [route] = [r for r in routez["routes"] if r["name"] == ROUTE]
        assert first["received"] <= second["received"] <= route["received"]
        assert second["acked"] <= route["acked"]
        # lag and freshness: an MQTT source measures its receive window every few seconds (— before that);
        # MQTT messages carry no broker timestamp: no age
        assert second["lag"] is None or 0 <= second["lag"] <= 10_000, second
        assert second["lag_text"] == ("—" if second["lag"] is None else f"{second['lag']:,}")
        if "age" not in route:
            assert second["age_p99"] is None and second["age_text"] == "—"
        assert second["oldest_in_flight"] is not None and second["oldest_in_flight"] >= 0
        # the topology: mq -> telemetry -> bus
        assert topology["nodes"] == ["connector:bus", "connector:mq", f"route:{ROUTE}"]
        assert topology["edges"] == [f"mq→{ROUTE} source", f"{ROUTE}→bus target"]
        assert {k: topology[k] for k in ("nodes", "edges", "dashed")} == expected_topology(routez, connz)
        assert 0 < topology["height"] < 200, f"one route, a small picture: {topology}"

        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert shot.stat().st_size > 20_000, "screenshot looks empty"

        # the gateway goes away: the page says so
        await gw.astop()
        shown = await browser.wait_for(
            """(() => { const s = document.getElementById("status");
                       return s.dataset.state === "unreachable" && s.textContent; })()""",
            5,
            "reporting the gateway unreachable",
        )
        assert "gateway unreachable" in shown
        print(f"STATUS PAGE after stop: {shown!r}; test took {time.monotonic() - t_start:.1f} s")
    finally:
        await browser.close()
        with suppress(AssertionError):  # already reported, or the test failed before
            await asyncio.to_thread(traffic.stop)
    problems = gw.problems()
    assert not problems, "gateway logged errors:\n" + "\n".join(problems[:10])


# ------------------------------------------------------------------ lag, freshness and the topology

HELD_ROUTE = "backlog"
BACKLOG = 300
"""Messages waiting in the JetStream stream before the gateway starts."""
BUDGET = 20
"""The held route's max_in_flight: what it takes before its source stops pulling."""
QUIET_ROUTES = 18
"""Routes from an in-memory source nobody publishes to: the picture holds 20 routes in all."""


def _lag_config(u: str, nats_url: str) -> Any:
    quiet = "\n".join(
        f"""  - name: quiet-{i:02d}
    from: {{connector: devices, topic: "d/{i}/{{device}}/#"}}
    to: [{{connector: {"archive" if i % 3 else "held"}, topic: "q/{i}/{{device}}"}}"""
        + (', {connector: bus, subject: "q.{device}"}]' if i % 4 == 0 else "]")
        + ("\n    dead_letter: {connector: dead, topic: dlq}" if i % 5 == 0 else "")
        for i in range(QUIET_ROUTES)
    )
    return parse_config(
        f"""
gateway: {{id: page-{u}}}
connectors:
  bus: {{type: nats, servers: ["{nats_url}"]}}
  devices: {{type: memory, broker: devices}}
  held: {{type: memory, broker: held}}
  archive: {{type: memory, broker: archive}}
  dead: {{type: memory, broker: dead}}
routes:
  - name: {HELD_ROUTE}
    from: {{connector: bus, subject: "page.{u}.>", stream: "PAGE_{u}", durable: "gw_{u}"}}
    to: {{connector: held, topic: "out"}}
    dead_letter: {{connector: dead, topic: dlq}}
    max_in_flight: {BUDGET}
    slow_consumer_deadline: 0
  - name: commands
    from: {{connector: bus, subject: "cmd.{u}.>"}}
    to: {{connector: devices, topic: "cmd/{u}"}}
{quiet}
""",
        source="test",
    )


async def test_status_page_shows_lag_freshness_and_topology(
    nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    chromium_binary()
    t_start = time.monotonic()
    u = unique
    MemoryBroker.reset()
    held = MemoryBroker.named("held")
    held.hold = True  # the target confirms nothing: the route fills its budget, the rest waits in the stream
    nc = await nats_connect(nats_server.url)
    try:
        await nc.jetstream().add_stream(name=f"PAGE_{u}", subjects=[f"page.{u}.>"])
        await js_publish_all(nc, [(f"page.{u}.d{i % 3}", b"%d" % i, None) for i in range(BACKLOG)])
    finally:
        await nc.close()
    gw = Gateway(_lag_config(u, nats_server.url))
    monitor = Monitor(gw, "127.0.0.1:0")
    browser = Browser(tmp_path)
    await gw.start()
    try:
        await monitor.start()
        base = f"http://127.0.0.1:{monitor.port}"
        await gw.wait_ready(10)
        route = gw.routes[HELD_ROUTE]
        await wait_until(
            lambda: route.backlog is not None and (route.backlog.messages or 0) >= BACKLOG - 2 * BUDGET,
            30,
            "the lag measured",
        )
        await browser.start()
        await browser.send("Page.enable")
        await browser.send("Page.navigate", url=f"{base}/")
        read = f"({READ_ROUTE})({json.dumps(HELD_ROUTE)})"
        await browser.wait_for(
            f"(() => {{ const r = {read}; return r && r.lag >= {BACKLOG - 2 * BUDGET}; }})()", 15, "showing the lag"
        )
        # open the backlog's detail (a click on the lag): it stays open across the page's redraws
        await browser.evaluate(
            "window.__row = document.querySelector('[data-route=\"backlog\"]');"
            "window.__row.querySelector('button[data-field=backlog]').click()"
        )
        await browser.wait_for(
            "document.querySelector('[data-route=\"backlog\"]') !== window.__row", 5, "redrawn once more"
        )
        shown = await browser.evaluate(read)
        quiet = await browser.evaluate(f"({READ_ROUTE})('quiet-01')")
        topology = await browser.evaluate(READ_TOPOLOGY)
        routez = await fetch_json(f"{base}/routez")
        connz = await fetch_json(f"{base}/connz")
        shot = await browser.screenshot(tmp_path / "status-page-topology.png")
        print(f"\nSTATUS PAGE held route: {shown}\nSTATUS PAGE quiet route: {quiet}")
        print(
            f"STATUS PAGE topology: {len(topology['nodes'])} nodes, {len(topology['edges'])} lines, "
            f"{topology['width']:.0f}x{topology['height']:.0f} px"
        )
        print(f"STATUS PAGE screenshot: {shot} ({shot.stat().st_size} bytes)")

        [view] = [r for r in routez["routes"] if r["name"] == HELD_ROUTE]
        backlog = view["backlog"]
        # lag: the number, and the broker's counters behind it in the opened detail (held: they stand still)
        assert shown["lag"] == view["lag"] == backlog["pending"], (shown, backlog)
        assert shown["lag_text"] == f"{view['lag']:,}"
        assert shown["backlog_open"], "the opened detail closed on the next redraw"
        for counter in ("pending", "ack_pending", "redelivered"):
            assert shown["backlog"][counter] == f"{backlog[counter]:,}", (counter, shown["backlog"], backlog)
        assert backlog["ack_pending"] >= BUDGET
        # freshness: the oldest message in flight is as old as the hold; the age p99 where JetStream's stamps are read
        assert shown["oldest_in_flight"] is not None and shown["oldest_in_flight"] > 0
        assert shown["in_flight"] == BUDGET
        if "age" in view:
            assert shown["age_p99"] == pytest.approx(view["age"]["p99"])
            assert shown["age_text"].startswith("p99 ")
        else:
            assert shown["age_p99"] is None and shown["age_text"] == "—"
        # a route whose source measures no lag and stamps no time shows —, not 0
        assert quiet["lag"] is None and quiet["lag_text"] == "—"
        assert quiet["age_p99"] is None and quiet["age_text"] == "—"
        # the topology: every connector and route once, a line per link, dead letters dashed
        want = expected_topology(routez, connz)
        assert len(want["nodes"]) == 5 + 2 + QUIET_ROUTES
        assert {k: topology[k] for k in ("nodes", "edges", "dashed")} == want
        assert f"{HELD_ROUTE}→dead" in topology["dashed"] and "commands→devices target" in topology["edges"]
        assert 300 < topology["height"] < 700 and topology["width"] > 600, f"20 routes, readable: {topology}"

        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert shot.stat().st_size > 20_000, "screenshot looks empty"
        print(f"STATUS PAGE lag test took {time.monotonic() - t_start:.1f} s")
    finally:
        await browser.close()
        held.release()
        await monitor.stop()
        await gw.stop(5)
        MemoryBroker.reset()
