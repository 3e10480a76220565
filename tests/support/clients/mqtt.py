"""MQTT test clients: paho-mqtt with its network loop in a thread (never the gateway's own code).

:class:`MqttClient` connects (waiting for the CONNACK), subscribes (waiting for the SUBACK),
publishes and keeps what its subscriptions receive in ``messages``; :class:`MqttPublisher` also
records which sequence numbers the broker acknowledged (PUBACK); :class:`MqttCollector` is a
subscriber started in one call. Subclasses replace a callback by overriding ``_on_connect``,
``_on_message`` or ``_on_publish``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.messages import Received, headers, payload
from tests.support.waits import wait_until_blocking

Headers = list[tuple[str, str]]


def user_properties(props: Any) -> Headers:
    """The MQTT 5 user properties of a received message (none on 3.1.1)."""
    if props is None:
        return []
    return [(str(k), str(v)) for k, v in getattr(props, "UserProperty", None) or []]


class MqttClient:
    """A paho client on 127.0.0.1; MQTT 5 unless ``protocol`` says otherwise (``mqtt.MQTTv311`` = 4).

    ``clean_start`` may also be ``mqtt.MQTT_CLEAN_START_FIRST_ONLY`` (reconnects resume the session).
    ``max_inflight`` 0 leaves the in-flight window to the broker. ``connect_properties`` go with the
    CONNECT packet (MQTT 5: session expiry, receive maximum).
    """

    def __init__(
        self,
        port: int,
        client_id: str = "",
        *,
        protocol: int = mqtt.MQTTv5,
        clean_start: bool | int = True,
        keepalive: int = 30,
        max_inflight: int = 0,
        connect_properties: Properties | None = None,
    ) -> None:
        self.port = port
        self.protocol = protocol
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        self.messages: list[Received] = []
        """What the client's subscriptions received, in arrival order."""
        self._clean_start = clean_start
        self._keepalive = keepalive
        self._connect_properties = connect_properties
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if not reason_code.is_failure:
            self._connected.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        self.messages.append(Received(msg.topic, bytes(msg.payload), user_properties(props), where=msg.topic))

    def connect(self, timeout: float = 10.0) -> Self:
        """Connect and start the network thread; fails unless the broker accepted within ``timeout`` s."""
        if self.protocol == mqtt.MQTTv5:
            self.client.connect(
                "127.0.0.1",
                self.port,
                keepalive=self._keepalive,
                clean_start=self._clean_start,
                properties=self._connect_properties,
            )
        else:
            self.client.connect("127.0.0.1", self.port, keepalive=self._keepalive)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise AssertionError(f"MQTT client could not connect to port {self.port}")
        return self

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 10.0) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic_filter, qos=qos)
        if not self._subscribed.wait(timeout):
            raise AssertionError(f"no SUBACK for {topic_filter}")

    def publish(
        self, topic: str, data: bytes, qos: int = 1, headers: Headers | None = None, *, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        """One PUBLISH; ``headers`` become MQTT 5 user properties (dropped on 3.1.1)."""
        props = None
        if headers and self.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = headers
        return self.client.publish(topic, data, qos=qos, retain=retain, properties=props)

    def publish_all(self, items: list[tuple[str, bytes, Headers | None]], qos: int = 1) -> None:
        """Publish (topic, payload, headers) items and wait until paho handed each one over."""
        infos = [self.publish(t, p, qos, h) for t, p, h in items]
        for info in infos:
            info.wait_for_publish(30)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class MqttPublisher(MqttClient):
    """Records which sequence numbers the broker acknowledged (``accepted``) or refused (``refused``).

    A publish is tracked by its message id: :meth:`track` after ``client.publish``. The PUBACK may
    race ahead of ``publish()`` returning the id; such early acknowledgements are kept until then.
    """

    def __init__(self, port: int, client_id: str = "", **kwargs: Any) -> None:
        super().__init__(port, client_id, **kwargs)
        self._lock = threading.Lock()
        self._mid_seq: dict[int, int] = {}
        self._early: dict[int, bool] = {}
        self.accepted: set[int] = set()
        """Sequence numbers the broker acknowledged."""
        self.refused = 0
        """Publishes the broker answered with a failure reason code."""
        self.published = 0
        """Publishes handed to paho (first attempts)."""
        self.client.on_publish = self._on_publish

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        ok = not reason_code.is_failure
        with self._lock:
            seq = self._mid_seq.pop(mid, None)
            if seq is None:
                self._early[mid] = ok
            elif ok:
                self.accepted.add(seq)
            else:
                self.refused += 1

    def track(self, info: mqtt.MQTTMessageInfo, seq: int, *, allow: tuple[int, ...] = ()) -> None:
        """Count ``seq`` as published by ``info``; fail if paho did not take it (``allow``: other codes to accept,
        e.g. ``MQTT_ERR_NO_CONN``: paho keeps the message and sends it after the reconnect)."""
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc not in allow:
            raise AssertionError(f"paho publish failed: {mqtt.error_string(info.rc)}")
        with self._lock:
            self.published += 1
            early = self._early.pop(info.mid, None)
            if early is None:
                self._mid_seq[info.mid] = seq
            elif early:
                self.accepted.add(seq)
            else:
                self.refused += 1

    def publish_seq(self, topic: str, seq: int, devices: int, *, qos: int = 1) -> None:
        """Sequence-numbered message ``seq`` (payload and headers of :mod:`tests.support.messages`)."""
        self.track(self.publish(topic, payload(seq, devices), qos, headers(seq, devices)), seq)

    def publish_paced(
        self, topic_of: Callable[[int], str], seqs: Iterable[int], devices: int, *, rate: float | None = None
    ) -> None:
        """:meth:`publish_seq` every seq to ``topic_of(seq)``, ``rate`` per second (None: as fast as paho takes
        them), paced every 50 messages. Blocks: run it in a thread."""
        t0 = time.monotonic()
        for i, seq in enumerate(seqs, start=1):
            self.publish_seq(topic_of(seq), seq, devices)
            if rate is not None and i % 50 == 0:
                ahead = t0 + i / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)

    def unacknowledged(self) -> int:
        """Publishes still waiting for their PUBACK."""
        with self._lock:
            return len(self._mid_seq)

    def wait_accepted(self, n: int, timeout: float = 30.0) -> None:
        wait_until_blocking(
            lambda: len(self.accepted) >= n, timeout, lambda: f"broker acknowledged {len(self.accepted)} of {n}"
        )


class MqttCollector(MqttClient):
    """Subscribes ``topic_filter`` (QoS 1 by default) in :meth:`start` and collects what arrives."""

    def __init__(self, port: int, client_id: str, topic_filter: str, *, qos: int = 1, **kwargs: Any) -> None:
        super().__init__(port, client_id, **kwargs)
        self.topic_filter = topic_filter
        self.qos = qos

    def start(self, timeout: float = 10.0) -> Self:
        self.connect(timeout)
        self.subscribe(self.topic_filter, self.qos, timeout)
        return self

    def distinct(self) -> int:
        return len({m.payload for m in list(self.messages)})
