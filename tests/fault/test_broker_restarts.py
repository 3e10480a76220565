"""Broker restarts under traffic: each broker, in turn, killed (SIGKILL) or stopped (SIGTERM) and restarted.

Every route starts and ends at a durable endpoint, so nothing a source accepted
may be lost (DESIGN §3). Six scenarios, one table (``SCENARIOS`` in
``tests/support/restarts.py``), each run once with SIGKILL and once with SIGTERM;
the broker that is restarted (the *victim*) is a dedicated instance in
``tmp_path``, the other end uses the session brokers:

==================  =========================================  ==========================
victim              route                                      end point checked
==================  =========================================  ==========================
Mosquitto (source)  MQTT QoS 1, gateway's persistent session   JetStream stream
                    → JetStream
Mosquitto (sink)    JetStream durable → MQTT QoS 1             paho, persistent session
nats-server (src)   JetStream durable → Kafka                  Kafka topic
nats-server (sink)  Kafka group → JetStream (file store)       the victim's own stream
Tansu s3 (source)   Kafka group → JetStream                    JetStream stream
Tansu s3 (sink)     MQTT QoS 1 → Kafka                         the victim's own topic
==================  =========================================  ==========================

The gateway runs in-process on the test's event loop. ``N`` sequence-numbered
messages are published at a fixed rate by independent clients (paho-mqtt,
nats-py, aiokafka) that keep retrying while their broker is down and record
what the broker *accepted* (PUBACK, PubAck, produce acknowledgement). The
first message is sent alone and must arrive before the rest follow, so that
the route is known to flow (Kafka groups take ~3 s to join on Tansu). Once a
third of the messages are out, the victim is killed or stopped, stays down for
``OUTAGE`` seconds and is started again on the same port and data directory.
The last third waits until the victim is back, so traffic always spans the
restart (Tansu 0.6 keeps serving for ~5 s after a SIGTERM before it exits).

Asserted: every accepted message arrived; duplicates are at most the route's
in-flight window (``max_in_flight``; for MQTT sources the session's receive
window, set to the same value) plus what the test's own clients may cause
(a paho publisher resends up to its in-flight window after a reconnect and
Mosquitto stores a QoS 1 resend as a new message; a paho subscriber gets
redelivered what it had not acknowledged); and the gateway never crashed: its
runner is alive and the victim's connector reconnected. Duplicates, and the
recovery times, are printed (``pytest -s``):

- *outage*: kill → the broker answers again;
- *reconnect*: kill → the gateway's connector is connected again;
- *recovery*: kill → the first message that reached the end point after the
  victim was up again (traffic flows end to end again);
- *drained*: kill → everything accepted reached the end point.

End points are read so that a test client's own redeliveries are not counted
as duplicates: JetStream by stream sequence, Kafka by (partition, offset).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.restarts import HOW, SCENARIOS, Scenario, check, run_scenario

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.timeout(180)]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
async def test_broker_restart(
    scenario: Scenario, how: str, tmp_path: Path, unique: str, request: pytest.FixtureRequest
) -> None:
    """The victim killed or stopped under traffic: nothing accepted lost, duplicates bounded, the gateway up."""
    other = request.getfixturevalue(scenario.other.fixture)
    check(await run_scenario(scenario, how, tmp_path, other, unique))
