"""With ``--log-format json`` every line the gateway process writes is one JSON object.

1. A connection storm: the gateway's NATS connection goes through a TCP proxy that resets it every
   200 ms and refuses new connections now and then, and the NATS server is killed and restarted,
   while messages flow MQTT -> NATS. Every line of the process's output (stdout and stderr, merged)
   parses as a JSON object, and the gateway delivers again once the storm is over.
2. What Python and asyncio print by themselves, injected into a real ``gateway run``: a task whose
   exception nobody retrieves (what nats-py leaves behind in reconnect storms: "unable to perform
   operation on TCPTransport"), a task destroyed while pending, a warning, an exception in another
   thread and one in ``__del__``. Each becomes one JSON line with its traceback as a field.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

import gateway.cli
from tests.support.brokers import Mosquitto, NatsServer
from tests.support.clients.mqtt import MqttClient
from tests.support.clients.nats import NatsCollector, nats_connect
from tests.support.configs import gateway_config, mqtt_connector, nats_connector
from tests.support.gateway_process import GatewayProcess
from tests.support.proxy import TcpProxy

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.fault, pytest.mark.timeout(90)]

STORM_SECONDS = 8.0


def non_json_lines(text: str) -> list[str]:
    bad = []
    for line in text.splitlines():
        try:
            ok = isinstance(json.loads(line), dict)
        except ValueError:
            ok = False
        if not ok:
            bad.append(line)
    return bad


async def test_every_output_line_is_json_through_a_connection_storm(
    gateways: Callable[..., GatewayProcess], mosquitto: Mosquitto, tmp_path: Path, unique: str
) -> None:
    with NatsServer(workdir=tmp_path / "nats", jetstream=False) as nats, TcpProxy(nats.address) as proxy:
        config = gateway_config(
            f"jsonlog-{unique}",
            {
                "mq": mqtt_connector(mosquitto.url, f"gw-jsonlog-{unique}"),
                "bus": nats_connector(proxy.url("nats"), connect_timeout=1),
            },
            [
                {
                    "name": "up",
                    "from": {"connector": "mq", "topic": f"jl/{unique}/{{dev}}", "qos": 1},
                    "to": {"connector": "bus", "subject": f"jl.{unique}.{{dev}}"},
                }
            ],
        )
        config["gateway"]["reconnect"] = {"initial": 0.05, "max": 0.3}
        gw = gateways(config)
        await gw.astart()
        pub = MqttClient(mosquitto.port, f"pub-jsonlog-{unique}")
        pub.connect()
        try:
            deadline = time.monotonic() + STORM_SECONDS
            seq = cuts = 0
            restarted = False
            while time.monotonic() < deadline:
                for _ in range(20):
                    pub.client.publish(f"jl/{unique}/d{seq % 3}", str(seq).encode(), qos=1)
                    seq += 1
                await asyncio.sleep(0.2)
                cuts += await asyncio.to_thread(proxy.cut, reset=True)
                if cuts and seq % 400 == 0:
                    await asyncio.to_thread(proxy.refuse)
                    await asyncio.sleep(0.3)
                    await asyncio.to_thread(proxy.accept)
                if not restarted and time.monotonic() > deadline - STORM_SECONDS / 2:
                    restarted = True
                    await asyncio.to_thread(nats.restart, hard=True)
            # After the storm the gateway delivers again: a message sent now reaches a NATS subscriber.
            nc = await nats_connect(nats.url)
            try:
                collector = await NatsCollector().subscribe(nc, f"jl.{unique}.after")
                for _ in range(100):
                    pub.client.publish(f"jl/{unique}/after", b"after", qos=1)
                    await asyncio.sleep(0.2)
                    if collector.messages:
                        break
                assert collector.messages, f"nothing delivered after the storm\n{gw.log_tail()}"
            finally:
                await nc.close()
        finally:
            pub.close()
        await gw.astop()
    text = gw.log_text()
    events = Counter(json.loads(line).get("event") for line in text.splitlines() if not non_json_lines(line))
    print(f"\nSTORM: {seq} messages, {cuts} connections reset, NATS restarted; {len(text.splitlines())} log lines")
    print("events:", dict(events.most_common(12)))
    bad = non_json_lines(text)
    assert not bad, f"{len(bad)} lines are not JSON objects, e.g.:\n" + "\n".join(bad[:20])
    assert events["connector.disconnected"] + events["connector.connect_failed"] >= 3, events


INJECT = """
import asyncio, gc, sys, threading, warnings
import gateway.cli as cli

until_stopped = cli._until_stopped


async def faulty(gw, stop):
    loop = asyncio.get_running_loop()

    async def fail():
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    async def wait(fut):
        await fut

    task = loop.create_task(fail())
    await asyncio.sleep(0.05)
    del task  # its exception was never retrieved
    fut = loop.create_future()
    task = loop.create_task(wait(fut))
    await asyncio.sleep(0)
    del task, fut  # destroyed while pending
    warnings.warn("injected warning", UserWarning)
    thread = threading.Thread(target=lambda: 1 / 0, name="injected-thread")
    thread.start()
    thread.join()

    class Broken:
        def __del__(self):
            raise ValueError("injected in __del__")

    Broken()
    gc.collect()
    print("injected", flush=True, file=sys.stderr)  # the one line that is not JSON, on purpose
    return await until_stopped(gw, stop)


cli._until_stopped = faulty
sys.exit(cli.main(sys.argv[1:]))
"""


class InjectingGateway(GatewayProcess):
    """``gateway run`` through :func:`gateway.cli.main`, with faults injected once the loop runs."""

    def command(self) -> list[str]:
        python, _, _, *args = super().command()  # python -m gateway run ...
        return [python, "-c", INJECT, *args]


@pytest.mark.skipif(
    "install_loop_handler" not in inspect.getsource(gateway.cli._serve),
    reason="gateway.cli._serve does not call gateway.ops.logs.install_loop_handler yet",
)
async def test_what_python_and_asyncio_print_themselves_becomes_json_lines(tmp_path: Path, unique: str) -> None:
    config = gateway_config(
        f"inject-{unique}",
        {"a": {"type": "memory", "broker": "a"}, "b": {"type": "memory", "broker": "b"}},
        [{"name": "r", "from": {"connector": "a", "topic": "in/#"}, "to": {"connector": "b", "topic": "out"}}],
    )
    gw = InjectingGateway(tmp_path, config)
    try:
        await gw.astart()
        await gw.await_until(lambda: "injected" in gw.log_text().splitlines(), 20, "the faults injected")
        await gw.astop()
    finally:
        gw.cleanup()
    bad = [line for line in non_json_lines(gw.log_text()) if line != "injected"]
    assert not bad, f"{len(bad)} lines are not JSON objects:\n" + "\n".join(bad[:30])
    events = gw.events()
    print("\nINJECTED:", [(e["event"], e.get("message") or e.get("logger")) for e in events if e["level"] != "info"])
    loop = [e for e in events if e["event"] == "loop.exception"]
    never_retrieved, destroyed = "Task exception was never retrieved", "Task was destroyed but it is pending!"
    assert {e["message"] for e in loop} == {never_retrieved, destroyed}, loop
    [never] = [e for e in loop if e["message"] == never_retrieved]
    assert never["exception"][0]["exc_type"] == "RuntimeError" and "TCPTransport" in never["exception"][0]["exc_value"]
    assert "fail()" in never["future"]
    [warning] = [e for e in events if e.get("logger") == "py.warnings"]
    assert "injected warning" in warning["event"] and warning["level"] == "warning"
    [thread] = [e for e in events if e["event"] == "thread.uncaught_exception"]
    assert thread["thread"] == "injected-thread" and thread["exception"][0]["exc_type"] == "ZeroDivisionError"
    [unraisable] = [e for e in events if e["event"] == "process.unraisable"]
    assert unraisable["exception"][0]["exc_value"] == "injected in __del__" and "Broken.__del__" in unraisable["object"]
