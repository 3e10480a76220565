"""An MQTT source session that starts while its route is full still completes its subscription.

Before: the session paused reading as soon as it saw the route full, so the SUBACK (and the backlog
a persistent session sends ahead of it) was never read; the session timed out with "no SUBACK",
started over every few seconds, and the source connector showed as not ready for the sink's fault.
"""

from __future__ import annotations

import asyncio

import pytest

from connectors.memory.broker import MemoryBroker
from gateway import Gateway
from gateway.config import parse_config
from tests.support.brokers import Mosquitto
from tests.support.clients.mqtt import MqttClient
from tests.support.waits import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]


async def test_a_session_started_while_the_route_is_full_subscribes_and_waits(
    mosquitto: Mosquitto, unique: str
) -> None:
    MemoryBroker.reset()
    sink = MemoryBroker.named("held")
    sink.hold = True  # the target takes publishes and never confirms them: the route fills up
    config = f"""
gateway: {{id: rs-{unique}, reconnect: {{initial: 0.05, max: 0.2}}}}
connectors:
  mq: {{type: mqtt, url: "{mosquitto.url}", client_id: "rs-{unique}", connect_timeout: 2}}
  held: {{type: memory, broker: held}}
routes:
  - name: r
    from: {{connector: mq, topic: "rs/{unique}/#", qos: 1}}
    to: {{connector: held, topic: "out"}}
    max_in_flight: 5
    slow_consumer_deadline: 3
"""
    gw = Gateway(parse_config(config, source="test"))
    await gw.start()
    pub = MqttClient(mosquitto.port)
    try:
        await gw.wait_ready(10)
        pub.connect()
        for i in range(30):
            pub.publish(f"rs/{unique}/d", b"%d" % i, qos=1)
        route = gw.routes["r"]
        channel = gw.connectors["mq"].channels[0]
        # Full, cut off as a slow consumer (its session closed), resumed while still full: a new session.
        await wait_until(lambda: route.stats.slow_consumer_disconnects >= 1, 20, "cut off")
        errors, connected = set(), False
        for _ in range(200):  # 4 s, twice connect_timeout: a session stuck on its SUBACK would have failed
            if channel.last_error:
                errors.add(channel.last_error)
            connected = connected or channel.connected.is_set()
            await asyncio.sleep(0.02)
        assert not [e for e in errors if "SUBACK" in e], errors
        assert connected, "the session after the cut subscribed although its route is still full"
        sink.release()  # the target confirms: everything flows
        await wait_until(lambda: route.stats.acked >= 30, 20, "all 30 acknowledged")
    finally:
        pub.close()
        await gw.stop(5)
        MemoryBroker.reset()
