#!/usr/bin/env python3
"""MQTT client library benchmark / feature probe for the asyncio bridge gateway.

One library x one scenario per invocation; prints exactly ONE JSON line on stdout.

Libraries (--lib):
  aiomqtt    aiomqtt 2.5.1 (paho wrapper, asyncio socket callbacks)
  gmqtt      gmqtt 0.8 (asyncio Protocol, callback API)
  zmqtt      zmqtt 0.2.5 (asyncio streams, async iterator API)
  paho       paho-mqtt 2.2 with its threaded network loop (loop_start), called from asyncio
  paho_aio   paho-mqtt 2.2 driven by the asyncio loop (add_reader/add_writer + loop_misc)
  mqtt5raw   throwaway asyncio.Protocol on the `mqtt5` Rust codec (ceiling probe)
  gateway    the gateway's own transport (connectors/mqtt), MQTT 5; gateway311 the same on MQTT 3.1.1

Scenarios (--scenario):
  pubsub_qos0       one connection publishes N msgs at QoS 0, another receives them
  pubsub_qos1       same at QoS 1, publisher keeps --window PUBLISHes in flight
  recv_qos1_queued  persistent session preloaded with N QoS 1 msgs, library connects and drains
  feat_manual_ack   scripted fake broker: 3 QoS 1 msgs, app acks late and in reverse order
  feat_resend       scripted fake broker: drops the connection with 3 unacked QoS 1 publishes
  feat_flow         scripted fake broker: Receive Maximum 10, PUBACKs withheld 1 s, app sends 30 QoS 1
  feat_props        publish+receive user properties / response topic / correlation data via broker

All libraries speak MQTT 5 here (every one of them supports it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import sys
import time
import traceback
import uuid

import mqtt5

HOST = "127.0.0.1"
LIBS = ["aiomqtt", "gmqtt", "zmqtt", "paho", "paho_aio", "mqtt5raw", "gateway", "gateway311"]
SCENARIOS = ["pubsub_qos0", "pubsub_qos1", "recv_qos1_queued", "feat_manual_ack", "feat_resend", "feat_props", "feat_flow"]

now = time.perf_counter


def cpu_time() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


BROKER_PID = 0


def broker_cpu() -> float | None:
    """utime+stime of the broker process (if --broker-pid given), seconds."""
    if not BROKER_PID:
        return None
    try:
        with open(f"/proc/{BROKER_PID}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def cpu_delta(a, b):
    return round(b - a, 3) if a is not None and b is not None else None


def make_payloads(n: int, size: int) -> list[bytes]:
    pad = b"x" * (size - 8)
    return [i.to_bytes(8, "big") + pad for i in range(n)]


class Sink:
    """Counts received payloads (first 8 bytes = sequence number). Thread-agnostic (GIL)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.dups = 0
        self.out_of_order = 0
        self.last = -1
        self.seen = bytearray(n)
        self.t_first: float | None = None
        self.t_last: float | None = None

    def add(self, payload: bytes) -> None:
        t = now()
        if self.t_first is None:
            self.t_first = t
        self.t_last = t
        seq = int.from_bytes(payload[:8], "big")
        if seq >= self.n:
            return
        if self.seen[seq]:
            self.dups += 1
            return
        self.seen[seq] = 1
        if seq < self.last:
            self.out_of_order += 1
        self.last = seq
        self.count += 1


# --------------------------------------------------------------------------------------
# Raw asyncio.Protocol on the mqtt5 codec (throwaway; codec ceiling probe)
# --------------------------------------------------------------------------------------
Q0 = mqtt5.QoS.AT_MOST_ONCE
Q1 = mqtt5.QoS.AT_LEAST_ONCE
PublishPacket = mqtt5.PublishPacket
PubAckPacket = mqtt5.PubAckPacket


class RawMQTT(asyncio.Protocol):
    def __init__(self, on_publish=None, auto_ack: bool = True) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.on_publish = on_publish
        self.auto_ack = auto_ack
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future = loop.create_future()
        self.closed: asyncio.Future = loop.create_future()
        self.waiters: dict[int, asyncio.Future] = {}
        self.in_use: set[int] = set()
        self.next_id = 1
        self.acked = 0
        self.window = 0
        self.wake_at = 0
        self.window_waiter: asyncio.Future | None = None
        self.paused = False
        self.drain_waiter: asyncio.Future | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        err = exc or ConnectionResetError("connection closed")
        for f in [self.connack, self.closed, self.window_waiter, self.drain_waiter, *self.waiters.values()]:
            if f is not None and not f.done():
                if f is self.closed:
                    f.set_result(exc)
                else:
                    f.set_exception(err)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        mv = memoryview(buf)
        off = 0
        acks = []
        read = mqtt5.read
        try:
            while True:
                try:
                    pkt, n = read(mv[off:])
                except IndexError:  # incomplete packet
                    break
                off += n
                t = type(pkt)
                if t is PublishPacket:
                    if pkt.qos is Q1 and self.auto_ack:
                        acks.append(PubAckPacket(pkt.packet_id).write())
                    if self.on_publish is not None:
                        self.on_publish(pkt)
                elif t is PubAckPacket:
                    self._on_puback(pkt.packet_id)
                elif t is mqtt5.ConnAckPacket:
                    if not self.connack.done():
                        self.connack.set_result(pkt)
                elif t is mqtt5.SubAckPacket:
                    f = self.waiters.pop(pkt.packet_id, None)
                    self.in_use.discard(pkt.packet_id)
                    if f is not None and not f.done():
                        f.set_result(pkt)
                elif t is mqtt5.DisconnectPacket:
                    self.transport.close()
        finally:
            mv.release()
        if off:
            del buf[:off]
        if acks:
            self.transport.write(b"".join(acks))

    # -- helpers
    def _on_puback(self, pid: int) -> None:
        self.in_use.discard(pid)
        self.acked += 1
        w = self.window_waiter
        if w is not None and not w.done() and len(self.in_use) <= self.wake_at:
            w.set_result(None)

    def _alloc_id(self) -> int:
        pid = self.next_id
        in_use = self.in_use
        while pid in in_use:
            pid = pid % 65535 + 1
        self.next_id = pid % 65535 + 1
        in_use.add(pid)
        return pid

    async def connect(self, client_id: str, clean_start: bool = True, session_expiry: int = 0,
                      receive_max: int = 65535):
        self.transport.write(mqtt5.ConnectPacket(client_id, clean_start=clean_start, keep_alive=60,
                                                 session_expiry_interval=session_expiry,
                                                 receive_max=receive_max).write())
        return await self.connack

    async def subscribe(self, topic: str, qos: int):
        pid = self._alloc_id()
        f = self.loop.create_future()
        self.waiters[pid] = f
        self.transport.write(mqtt5.SubscribePacket(pid, [mqtt5.TopicFilter(topic, max_qos=mqtt5.QoS(qos))]).write())
        return await f

    async def publish_many(self, topic: str, payloads, qos: int, window: int, yield_every: int) -> None:
        """Pipelined publish: at most `window` unacked QoS 1 PUBLISHes; resume when the window is
        3/4 free; PUBLISHes are corked into one transport.write() per batch (<= 64 packets)."""
        self.window = window
        self.wake_at = window - max(1, window // 4)
        in_use = self.in_use
        target = self.acked + len(payloads)
        pending: list[bytes] = []

        def flush():
            if pending:
                self.transport.write(b"".join(pending))
                pending.clear()

        for i, p in enumerate(payloads):
            if qos:
                if len(in_use) >= window:
                    flush()
                    while len(in_use) > self.wake_at:
                        self.window_waiter = self.loop.create_future()
                        await self.window_waiter
                pending.append(PublishPacket(topic, p, qos=Q1, packet_id=self._alloc_id()).write())
            else:
                pending.append(PublishPacket(topic, p).write())
            if len(pending) >= 64:
                flush()
            if self.paused:
                flush()
                self.drain_waiter = self.loop.create_future()
                await self.drain_waiter
            if yield_every and i % yield_every == 0:
                flush()
                await asyncio.sleep(0)
        flush()
        if qos:
            self.wake_at = 0  # wake only when everything is acked
            while self.acked < target:
                self.window_waiter = self.loop.create_future()
                await self.window_waiter

    async def disconnect(self, session_expiry: int | None = None) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(mqtt5.DisconnectPacket(session_expiry_interval=session_expiry).write())
        self.transport.close()
        try:
            await asyncio.wait_for(self.closed, 5)
        except Exception:
            pass


async def raw_client(port: int, on_publish=None, auto_ack=True) -> RawMQTT:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: RawMQTT(on_publish, auto_ack), HOST, port)
    return proto


# --------------------------------------------------------------------------------------
# Library adapters: connect / subscribe / publish_many / disconnect
# on_message receives the payload bytes.
# --------------------------------------------------------------------------------------
class Adapter:
    name = "?"
    notes = ""

    def __init__(self, port: int, window: int) -> None:
        self.port = port
        self.window = window


class RawAdapter(Adapter):
    name = "mqtt5raw"

    async def connect(self, client_id, on_message=None, clean_start=True, session_expiry=0):
        cb = (lambda pkt: on_message(pkt.payload)) if on_message else None
        self.c = await raw_client(self.port, cb)
        ca = await self.c.connect(client_id, clean_start, session_expiry)
        assert ca.reason_code == 0, ca

    async def subscribe(self, topic, qos):
        await self.c.subscribe(topic, qos)

    async def publish_many(self, topic, payloads, qos, yield_every):
        await self.c.publish_many(topic, payloads, qos, self.window, yield_every)

    async def disconnect(self):
        await self.c.disconnect()


class GmqttAdapter(Adapter):
    name = "gmqtt"

    async def connect(self, client_id, on_message=None, clean_start=True, session_expiry=0):
        import gmqtt
        from gmqtt.storage import PersistentStorage

        loop = asyncio.get_running_loop()

        class CountingStorage(PersistentStorage):
            """Public hook (Client(persistent_storage=...)) used to learn about PUBACKs."""

            def __init__(s):
                super().__init__()
                s.n = 0
                s.acked = 0
                s.waiter = None
                s.wake_below = 0

            def push_message(s, mid, raw):
                if mid not in s._messages:
                    s.n += 1
                super().push_message(mid, raw)

            def remove_message_by_mid(s, mid):
                if mid in s._messages:
                    s.n -= 1
                    s.acked += 1
                super().remove_message_by_mid(mid)
                w = s.waiter
                if w is not None and not w.done() and s.n < s.wake_below:
                    w.set_result(None)

        self.storage = CountingStorage()
        kw = {}
        if session_expiry:
            kw["session_expiry_interval"] = session_expiry
        c = gmqtt.Client(client_id, clean_session=clean_start, persistent_storage=self.storage, **kw)
        self.suback = None
        self.connected = loop.create_future()

        def on_connect(client, flags, rc, properties):
            if not self.connected.done():
                self.connected.set_result(rc)

        def on_subscribe(client, mid, qos, properties):
            if self.suback is not None and not self.suback.done():
                self.suback.set_result(qos)

        c.on_connect = on_connect
        c.on_subscribe = on_subscribe
        if on_message is not None:
            def _on_message(client, topic, payload, qos, properties):
                on_message(payload)
                return 0
            c.on_message = _on_message
        self.c = c
        await c.connect(HOST, self.port, keepalive=60)
        await self.connected

    async def subscribe(self, topic, qos):
        self.suback = asyncio.get_running_loop().create_future()
        self.c.subscribe(topic, qos=qos)
        await self.suback

    async def publish_many(self, topic, payloads, qos, yield_every):
        c = self.c
        st = self.storage
        loop = asyncio.get_running_loop()
        window = self.window
        target = st.acked + len(payloads)
        pub = c.publish
        for i, p in enumerate(payloads):
            if qos:
                while st.n >= window:
                    st.wake_below = window
                    st.waiter = loop.create_future()
                    await st.waiter
            pub(topic, p, qos=qos)
            if yield_every and i % yield_every == 0:
                await asyncio.sleep(0)
        if qos:
            while st.acked < target:
                st.wake_below = 1
                st.waiter = loop.create_future()
                await st.waiter

    async def disconnect(self):
        await self.c.disconnect()


class ZmqttAdapter(Adapter):
    name = "zmqtt"

    async def connect(self, client_id, on_message=None, clean_start=True, session_expiry=0):
        import zmqtt
        self.zmqtt = zmqtt
        self.on_message = on_message
        self.c = zmqtt.create_client(HOST, self.port, client_id=client_id, clean_session=clean_start,
                                     session_expiry_interval=session_expiry, version="5.0")
        await self.c.connect()
        self.tasks = []

    naive_subscribe = False

    async def subscribe(self, topic, qos):
        sub = self.c.subscribe(topic, qos=self.zmqtt.QoS(qos))
        on_message = self.on_message

        async def consume():
            async for msg in sub:
                on_message(msg.payload)

        if self.naive_subscribe:
            # documented pattern: `async with client.subscribe(...) as sub: async for m in sub`.
            # Deadlocks if > receive_buffer_size (1000) msgs arrive before the SUBACK.
            await sub.start()
            self.tasks.append(asyncio.create_task(consume()))
        else:
            # consume concurrently with start() so the bounded queue keeps draining while
            # the SUBACK is still behind the session's queued PUBLISHes
            self.tasks.append(asyncio.create_task(consume()))
            await sub.start()

    async def publish_many(self, topic, payloads, qos, yield_every):
        await publish_with_workers(self.c.publish, topic, payloads, qos, self.window, yield_every,
                                   qos_arg=self.zmqtt.QoS(qos), kw=True)

    async def disconnect(self):
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.c.disconnect()


async def publish_with_workers(publish, topic, payloads, qos, window, yield_every, qos_arg, kw):
    """For await-per-publish APIs: QoS 0 sequential, QoS 1 with `window` concurrent workers."""
    n = len(payloads)
    if qos == 0:
        for i in range(n):
            if kw:
                await publish(topic, payloads[i], qos=qos_arg)
            else:
                await publish(topic, payloads[i], qos_arg)
            if yield_every and i % yield_every == 0:
                await asyncio.sleep(0)
        return

    async def worker(k):
        for i in range(k, n, window):
            if kw:
                await publish(topic, payloads[i], qos=qos_arg)
            else:
                await publish(topic, payloads[i], qos_arg)

    await asyncio.gather(*(worker(k) for k in range(min(window, n))))


class AiomqttAdapter(Adapter):
    name = "aiomqtt"

    async def connect(self, client_id, on_message=None, clean_start=True, session_expiry=0):
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry
        self.c = aiomqtt.Client(HOST, self.port, identifier=client_id, protocol=aiomqtt.ProtocolVersion.V5,
                                clean_start=clean_start, properties=props,
                                max_inflight_messages=self.window, timeout=60)
        # aiomqtt logs a WARNING for every publish once >10 are pending; silence that (public attr)
        self.c.pending_calls_threshold = 10**9
        await self.c.__aenter__()
        self.task = None
        if on_message is not None:
            async def consume():
                async for m in self.c.messages:
                    on_message(m.payload)
            self.task = asyncio.create_task(consume())

    async def subscribe(self, topic, qos):
        await self.c.subscribe(topic, qos)

    async def publish_many(self, topic, payloads, qos, yield_every):
        await publish_with_workers(self.c.publish, topic, payloads, qos, self.window, yield_every,
                                   qos_arg=qos, kw=True)

    async def disconnect(self):
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.c.__aexit__(None, None, None)


class PahoAdapter(Adapter):
    """paho-mqtt 2.2 used directly. threaded=True: loop_start() network thread;
    threaded=False: socket registered on the asyncio loop (like aiomqtt does) + loop_misc task."""

    name = "paho"
    threaded = True

    async def connect(self, client_id, on_message=None, clean_start=True, session_expiry=0):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        loop = asyncio.get_running_loop()
        self.loop = loop
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        c.max_inflight_messages_set(self.window)
        c.max_queued_messages_set(0)
        self.acked = 0
        self.connected = loop.create_future()
        self.suback = None
        self.ack_waiter = None
        self.ack_target = 0

        def done(fut, val=None):
            if fut is not None and not fut.done():
                fut.set_result(val)

        def on_connect(client, userdata, flags, rc, props):
            loop.call_soon_threadsafe(done, self.connected, rc)

        def on_subscribe(client, userdata, mid, rcs, props):
            loop.call_soon_threadsafe(done, self.suback, rcs)

        def on_publish(client, userdata, mid, rc, props):
            self.acked += 1
            if self.ack_waiter is not None and self.acked >= self.ack_target:
                if self.threaded:
                    loop.call_soon_threadsafe(done, self.ack_waiter)
                else:
                    done(self.ack_waiter)

        c.on_connect = on_connect
        c.on_subscribe = on_subscribe
        c.on_publish = on_publish
        if on_message is not None:
            c.on_message = lambda client, userdata, msg: on_message(msg.payload)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry
        self.c = c
        if self.threaded:
            c.connect(HOST, self.port, keepalive=60, clean_start=clean_start, properties=props)
            c.loop_start()
        else:
            c.on_socket_open = lambda cl, ud, sock: loop.add_reader(sock, cl.loop_read)
            c.on_socket_close = lambda cl, ud, sock: loop.remove_reader(sock)
            c.on_socket_register_write = lambda cl, ud, sock: loop.add_writer(sock, cl.loop_write)
            c.on_socket_unregister_write = lambda cl, ud, sock: loop.remove_writer(sock)
            c.connect(HOST, self.port, keepalive=60, clean_start=clean_start, properties=props)

            async def misc():
                while c.loop_misc() == mqtt.MQTT_ERR_SUCCESS:
                    await asyncio.sleep(1)
            self.misc_task = asyncio.create_task(misc())
        rc = await self.connected
        assert not rc.is_failure, rc

    async def subscribe(self, topic, qos):
        self.suback = self.loop.create_future()
        self.c.subscribe(topic, qos)
        await self.suback

    async def publish_many(self, topic, payloads, qos, yield_every):
        # paho.publish never blocks: QoS>0 messages beyond max_inflight_messages (=window) are
        # queued inside paho and released as PUBACKs arrive.
        self.ack_target = self.acked + len(payloads)
        if qos:
            self.ack_waiter = self.loop.create_future()
        pub = self.c.publish
        for i, p in enumerate(payloads):
            pub(topic, p, qos)
            if yield_every and i % yield_every == 0:
                await asyncio.sleep(0)
        if qos:
            if self.acked < self.ack_target:
                await self.ack_waiter
            self.ack_waiter = None

    async def disconnect(self):
        self.c.disconnect()
        if self.threaded:
            await asyncio.get_running_loop().run_in_executor(None, self.c.loop_stop)
        else:
            self.misc_task.cancel()


class PahoAioAdapter(PahoAdapter):
    name = "paho_aio"
    threaded = False


class GatewayAdapter(Adapter):
    """The gateway's own MQTT transport (connectors/mqtt/client.py + codec.py), used as a client.

    Receiving goes through the connector's real in-order acknowledgement path
    (InboundAcks / MqttReceipt); each message is settled as soon as it is counted.
    """

    name = "gateway"
    version = 5

    async def connect(self, client_id, on_message=None, clean_start=True, session_expiry=0):
        from connectors.mqtt.client import open_connection
        from connectors.mqtt.codec import PUBACK, codec_for
        from connectors.mqtt.source import InboundAcks, MqttReceipt

        self.codec = codec_for(self.version)
        self.inflight = 0
        self.room = asyncio.Event()
        adapter = self

        class Handler:
            def on_publishes(self, packets):
                for p in packets:
                    self.on_publish(p)

            def on_publish(self, p):
                if on_message is not None:
                    on_message(p.payload)
                if int(p.qos):  # mqtt5.QoS is not an int subclass: QoS 0 is truthy
                    r = MqttReceipt(adapter.acks, p.packet_id, int(p.qos))
                    adapter.acks.pending.append(r)
                    r.settle()

            def on_ack(self, kind, pid, reason):
                if kind == PUBACK:
                    adapter.inflight -= 1
                    adapter.room.set()

        self.conn = await open_connection(HOST, self.port, self.codec, Handler(), timeout=10)
        self.acks = InboundAcks(self.conn)
        self.conn.write(self.codec.connect(client_id, clean_start=clean_start, keepalive=60,
                                           session_expiry=session_expiry, receive_maximum=65535,
                                           username=None, password=None))
        ca = await self.conn.connack
        assert int(ca.reason_code) == 0, ca
        self.pid = 0

    async def subscribe(self, topic, qos):
        fut = asyncio.get_running_loop().create_future()
        self.conn.subacks[60000] = fut
        self.conn.write(self.codec.subscribe(60000, [(topic, qos)]))
        await fut

    async def publish_many(self, topic, payloads, qos, yield_every):
        out = bytearray()
        for i, payload in enumerate(payloads):
            pid = None
            if qos:
                while self.inflight >= self.window:
                    if out:
                        self.conn.write(out)
                        out = bytearray()
                    self.room.clear()
                    await self.room.wait()
                self.pid = self.pid % 59999 + 1
                pid = self.pid
                self.inflight += 1
            out += self.codec.publish(topic, payload, qos, False, pid, False, None, None, None)
            if yield_every and i % yield_every == yield_every - 1:
                self.conn.write(out)
                out = bytearray()
                await self.conn.writable()
                await asyncio.sleep(0)
        if out:
            self.conn.write(out)
        while self.inflight:
            self.room.clear()
            await self.room.wait()

    async def disconnect(self):
        await self.conn.disconnect()


class Gateway311Adapter(GatewayAdapter):
    name = "gateway311"
    version = 4


ADAPTERS = {
    a.name: a
    for a in [
        AiomqttAdapter, GmqttAdapter, ZmqttAdapter, PahoAdapter, PahoAioAdapter, RawAdapter, GatewayAdapter,
        Gateway311Adapter,
    ]
}


# --------------------------------------------------------------------------------------
# Throughput scenarios
# --------------------------------------------------------------------------------------
async def wait_sink(sink: Sink, pub_done: list, idle: float, deadline: float) -> bool:
    """Return True on timeout. pub_done[0] is the time publishing finished (or None)."""
    while sink.count < sink.n:
        await asyncio.sleep(0.02)
        t = now()
        if t > deadline:
            return True
        if pub_done[0] is not None:
            ref = max(pub_done[0], sink.t_last or 0)
            if t - ref > idle:
                return False
    return False


def base_result(args, **kw):
    d = {"lib": args.lib, "scenario": args.scenario, "n": args.n, "payload": args.payload,
         "proto": "5.0", "loop": "uvloop", "ok": True}
    d.update(kw)
    return d


async def scenario_pubsub(args, qos: int) -> dict:
    A = ADAPTERS[args.lib]
    run = uuid.uuid4().hex[:8]
    topic = f"bench/{args.lib}/{run}"
    payloads = make_payloads(args.n, args.payload)
    sink = Sink(args.n)
    deadline = now() + args.deadline
    sub = A(args.port, args.window)
    pub = A(args.port, args.window)
    STATE.update(stage="connect/subscribe", sink=sink)
    await sub.connect(f"sub-{run}", on_message=sink.add)
    await sub.subscribe(topic, qos)
    await pub.connect(f"pub-{run}")
    pub_done = [None]
    errors = []
    c0, b0 = cpu_time(), broker_cpu()
    t0 = now()

    async def publisher():
        try:
            await pub.publish_many(topic, payloads, qos, args.yield_every)
        except Exception as e:  # noqa: BLE001
            errors.append(f"publisher: {e!r}")
        pub_done[0] = now()

    STATE.update(stage="publishing", t0=t0)
    ptask = asyncio.create_task(publisher())
    timeout = await wait_sink(sink, pub_done, args.idle, deadline)
    if not ptask.done():  # all received; let the publisher collect its last PUBACKs
        await asyncio.wait([ptask], timeout=max(0.1, deadline - now()))
    c1, b1 = cpu_time(), broker_cpu()
    if not ptask.done():
        ptask.cancel()
        errors.append("publisher did not finish before deadline")
    await asyncio.gather(ptask, return_exceptions=True)
    for a in (pub, sub):
        try:
            await asyncio.wait_for(a.disconnect(), 5)
        except Exception as e:  # noqa: BLE001
            errors.append(f"disconnect: {e!r}")
    elapsed = (sink.t_last - t0) if sink.t_last else None
    pub_elapsed = (pub_done[0] - t0) if pub_done[0] else None
    return base_result(
        args, qos=qos, window=args.window if qos else None, yield_every=args.yield_every,
        received=sink.count, lost=args.n - sink.count, dups=sink.dups, out_of_order=sink.out_of_order,
        elapsed_s=round(elapsed, 4) if elapsed else None,
        msgs_per_s=round(sink.count / elapsed) if elapsed else 0,
        pub_elapsed_s=round(pub_elapsed, 4) if pub_elapsed else None,
        pub_msgs_per_s=round(args.n / pub_elapsed) if pub_elapsed else None,
        cpu_s=round(c1 - c0, 3), broker_cpu_s=cpu_delta(b0, b1), timeout=timeout, errors=errors,
        ok=(sink.count == args.n and not errors),
    )


async def scenario_queued(args) -> dict:
    A = ADAPTERS[args.lib]
    run = uuid.uuid4().hex[:8]
    topic = f"bench/q/{args.lib}/{run}"
    cid = f"gw-{args.lib}-{run}"
    expiry = 300
    errors = []
    # 1. create the persistent session (raw client), subscribe QoS 1, go offline
    r = await raw_client(args.port)
    await r.connect(cid, clean_start=True, session_expiry=expiry)
    await r.subscribe(topic, 1)
    await r.disconnect()
    # 2. preload N QoS 1 messages with a fast pipelined publisher (raw mqtt5 client)
    payloads = make_payloads(args.n, args.payload)
    p = await raw_client(args.port)
    await p.connect(f"pre-{run}")
    tp0 = now()
    await p.publish_many(topic, payloads, 1, 1000, 500)
    preload_s = now() - tp0
    await p.disconnect()
    del payloads
    await asyncio.sleep(0.2)
    # 3. library connects to the session and drains
    sink = Sink(args.n)
    deadline = now() + args.deadline
    lib = A(args.port, args.window)
    c0, b0 = cpu_time(), broker_cpu()
    t0 = now()
    STATE.update(stage="library connect", sink=sink, t0=t0)
    await lib.connect(cid, on_message=sink.add, clean_start=False, session_expiry=expiry)
    t_conn = now()
    STATE.update(stage="draining")
    if args.lib == "zmqtt":
        STATE.update(stage="zmqtt subscribe")
        # zmqtt routes inbound PUBLISHes only to local Subscription objects; messages of a
        # resumed session without one are held in a 1000-msg replay buffer (overflow = abort).
        await lib.subscribe(topic, 1)
    timeout = await wait_sink(sink, [t_conn], args.idle, deadline)
    STATE.update(stage="verify")
    c1, b1 = cpu_time(), broker_cpu()
    await asyncio.sleep(0.3)  # let the last PUBACKs leave
    try:
        await asyncio.wait_for(lib.disconnect(), 5)
    except Exception as e:  # noqa: BLE001
        errors.append(f"disconnect: {e!r}")
    await asyncio.sleep(0.2)
    # 4. verify: anything the broker still considers unacked is redelivered on resume
    redelivered = Sink(args.n)
    v = await raw_client(args.port, lambda pkt: redelivered.add(pkt.payload))
    ca = await v.connect(cid, clean_start=False, session_expiry=expiry)
    await asyncio.sleep(1.0)
    await v.disconnect(session_expiry=0)  # delete the session
    elapsed = (sink.t_last - t0) if sink.t_last else None
    drain = (sink.t_last - t_conn) if sink.t_last else None
    return base_result(
        args, qos=1, window=None, received=sink.count, lost=args.n - sink.count, dups=sink.dups,
        out_of_order=sink.out_of_order, elapsed_s=round(elapsed, 4) if elapsed else None,
        msgs_per_s=round(sink.count / elapsed) if elapsed else 0,
        connect_s=round(t_conn - t0, 4), drain_after_connect_msgs_per_s=round(sink.count / drain) if drain else 0,
        preload_s=round(preload_s, 3), preload_msgs_per_s=round(args.n / preload_s),
        session_present_on_verify=ca.session_present, redelivered_after_disconnect=redelivered.count,
        cpu_s=round(c1 - c0, 3), broker_cpu_s=cpu_delta(b0, b1), timeout=timeout, errors=errors,
        ok=(sink.count == args.n and redelivered.count == 0 and not errors),
    )


# --------------------------------------------------------------------------------------
# Feature probes with a scripted fake broker (mqtt5 codec)
# --------------------------------------------------------------------------------------
class FakeBroker:
    def __init__(self, mode: str, n_msgs: int = 3) -> None:
        self.mode = mode
        self.n_msgs = n_msgs
        self.conns = 0
        self.connects: list[dict] = []
        self.log: list[tuple] = []
        self.t0 = now()
        self.pubacks: list[tuple[int, float]] = []
        self.publishes: list[dict] = []
        self.c2_connected = asyncio.Event()
        self.unacked: list[int] = []
        self.max_unacked = 0
        self.flow_conn = None

    def release(self) -> None:
        """flow mode: ack everything received so far."""
        c = self.flow_conn
        if c is not None and not c.t.is_closing():
            c.t.write(b"".join(PubAckPacket(pid).write() for pid in self.unacked))
        self.unacked.clear()

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: FakeConn(self), HOST, 0)
        return self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        self.server.close()


class FakeConn(asyncio.Protocol):
    def __init__(self, broker: FakeBroker) -> None:
        self.b = broker
        self.buf = bytearray()
        self.idx = None
        self.got = 0

    def connection_made(self, transport) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        mv = memoryview(self.buf)
        off = 0
        pkts = []
        try:
            while True:
                try:
                    pkt, n = mqtt5.read(mv[off:])
                except IndexError:
                    break
                off += n
                pkts.append(pkt)
        finally:
            mv.release()
        del self.buf[:off]
        for p in pkts:
            self.handle(p)

    def handle(self, p) -> None:
        b = self.b
        t = now() - b.t0
        if isinstance(p, mqtt5.ConnectPacket):
            self.idx = b.conns
            b.conns += 1
            b.connects.append({"conn": self.idx, "t": round(t, 3), "clean_start": p.clean_start,
                               "session_expiry": p.session_expiry_interval, "receive_max": p.receive_max,
                               "keep_alive": p.keep_alive})
            sp = b.mode == "resend" and self.idx > 0
            rm = 10 if b.mode == "flow" else 65535
            self.t.write(mqtt5.ConnAckPacket(session_present=sp, receive_max=rm).write())
            if b.mode == "flow":
                b.flow_conn = self
            if self.idx > 0:
                b.c2_connected.set()
        elif isinstance(p, mqtt5.SubscribePacket):
            codes = [mqtt5.SubAckReasonCode(int(f.max_qos)) for f in p.topic_filters]
            self.t.write(mqtt5.SubAckPacket(p.packet_id, codes).write())
            if b.mode == "ack" and not b.log:
                topic = p.topic_filters[0].pattern
                out = b"".join(PublishPacket(topic, f"m{i}".encode(), qos=Q1, packet_id=i).write()
                               for i in range(1, b.n_msgs + 1))
                b.log.append(("sent", round(t, 3)))
                self.t.write(out)
        elif isinstance(p, PubAckPacket):
            b.pubacks.append((p.packet_id, t))  # unrounded: compared with the app's ack time
        elif isinstance(p, PublishPacket):
            b.publishes.append({"conn": self.idx, "packet_id": p.packet_id, "dup": p.duplicate,
                                "payload": p.payload.decode(), "t": round(t, 3)})
            if b.mode == "flow":
                b.unacked.append(p.packet_id)
                b.max_unacked = max(b.max_unacked, len(b.unacked))
            elif b.mode == "resend" and self.idx == 0:
                self.got += 1
                if self.got >= b.n_msgs:
                    self.t.abort()  # drop the connection without acking anything
            elif p.qos is Q1:
                self.t.write(PubAckPacket(p.packet_id).write())
        elif isinstance(p, mqtt5.PingReqPacket):
            self.t.write(mqtt5.PingRespPacket().write())
        elif isinstance(p, mqtt5.DisconnectPacket):
            self.t.close()


async def feat_manual_ack(args) -> dict:
    """Fake broker sends 3 QoS 1 msgs (pid 1,2,3). App waits 0.3 s, then acks 3,2,1 (0.05 s apart).
    Records PUBACK order/timing seen by the broker and the CONNECT fields the library sends by default."""
    fb = FakeBroker("ack")
    port = await fb.start()
    loop = asyncio.get_running_loop()
    received: list = []  # (label, ack_callable)
    got3 = asyncio.Event()
    notes = ""
    method = ""
    cleanup = None

    def note_recv(label, ack):
        received.append((label, ack))
        if len(received) == 3:
            loop.call_soon_threadsafe(got3.set)

    lib = args.lib
    if lib == "aiomqtt":
        import aiomqtt
        c = aiomqtt.Client(HOST, port, identifier="probe", protocol=aiomqtt.ProtocolVersion.V5)
        c._client.manual_ack_set(True)  # NOT exposed by aiomqtt 2.5.1; private paho client
        method = "private: client._client.manual_ack_set(True) + client._client.ack(mid, qos)"
        await c.__aenter__()

        async def consume():
            async for m in c.messages:
                note_recv(m.payload.decode(), (lambda mid=m.mid: c._client.ack(mid, 1)))
        task = asyncio.create_task(consume())
        await c.subscribe("probe/ack", 1)

        async def cleanup():
            task.cancel()
            await c.__aexit__(None, None, None)
    elif lib in ("paho", "paho_aio"):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="probe", protocol=mqtt.MQTTv5, manual_ack=True)
        method = "public: Client(manual_ack=True) + client.ack(mid, qos)"
        c.on_message = lambda cl, ud, m: note_recv(m.payload.decode(), (lambda mid=m.mid: c.ack(mid, 1)))
        connected = asyncio.Event()
        c.on_connect = lambda *a: loop.call_soon_threadsafe(connected.set)
        if lib == "paho":
            c.connect(HOST, port)
            c.loop_start()
        else:
            c.on_socket_open = lambda cl, ud, sock: loop.add_reader(sock, cl.loop_read)
            c.on_socket_close = lambda cl, ud, sock: loop.remove_reader(sock)
            c.on_socket_register_write = lambda cl, ud, sock: loop.add_writer(sock, cl.loop_write)
            c.on_socket_unregister_write = lambda cl, ud, sock: loop.remove_writer(sock)
            c.connect(HOST, port)
        await connected.wait()
        c.subscribe("probe/ack", 1)

        async def cleanup():
            c.disconnect()
            if lib == "paho":
                await loop.run_in_executor(None, c.loop_stop)
    elif lib == "gmqtt":
        import gmqtt
        c = gmqtt.Client("probe", optimistic_acknowledgement=False)
        method = ("public: Client(optimistic_acknowledgement=False) + async on_message; PUBACK is sent "
                  "when the on_message coroutine returns (its return value = reason code)")

        async def on_message(client, topic, payload, qos, properties):
            f = loop.create_future()
            note_recv(payload.decode(), (lambda f=f: f.set_result(None)))
            await f
            return 0
        c.on_message = on_message
        await c.connect(HOST, port)
        c.subscribe("probe/ack", qos=1)

        async def cleanup():
            await c.disconnect()
    elif lib == "zmqtt":
        import zmqtt
        c = zmqtt.create_client(HOST, port, client_id="probe", version="5.0")
        method = "public: client.subscribe(..., auto_ack=False) + await msg.ack()"
        await c.connect()
        sub = c.subscribe("probe/ack", qos=zmqtt.QoS.AT_LEAST_ONCE, auto_ack=False)
        await sub.start()

        async def consume():
            async for m in sub:
                note_recv(m.payload.decode(), m.ack)
        task = asyncio.create_task(consume())

        async def cleanup():
            task.cancel()
            await c.disconnect()
    elif lib == "mqtt5raw":
        r = await raw_client(port, lambda pkt: note_recv(
            pkt.payload.decode(), (lambda pid=pkt.packet_id: r.transport.write(PubAckPacket(pid).write()))),
            auto_ack=False)
        method = "own code: write PubAckPacket(pid) whenever you like"
        await r.connect("probe")
        await r.subscribe("probe/ack", 1)

        async def cleanup():
            await r.disconnect()

    try:
        await asyncio.wait_for(got3.wait(), 10)
    except asyncio.TimeoutError:
        notes += f"only {len(received)} msgs delivered before timeout; "
    await asyncio.sleep(0.3)
    t_app_ack = now() - fb.t0
    app_order = []
    for label, ack in reversed(received):
        app_order.append(label)
        r_ = ack()
        if asyncio.iscoroutine(r_):
            await r_
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    try:
        await asyncio.wait_for(cleanup(), 5)
    except Exception as e:  # noqa: BLE001
        notes += f"cleanup: {e!r}; "
    fb.close()
    early = [pid for pid, t in fb.pubacks if t < t_app_ack]
    label_of = {f"m{i}": i for i in range(1, 4)}
    return base_result(
        args, n=3, method=method, delivered=[lbl for lbl, _ in received],
        app_ack_order_pids=[label_of.get(x) for x in app_order],
        broker_puback_order=[pid for pid, _ in fb.pubacks],
        pubacks_before_app_ack=early,
        manual_ack_works=(len(fb.pubacks) == 3 and not early),
        acks_follow_app_order=[pid for pid, _ in fb.pubacks] == [label_of.get(x) for x in app_order],
        connect_defaults=fb.connects[0] if fb.connects else None, notes=notes,
    )


async def feat_resend(args) -> dict:
    """Fake broker: connection #1 takes 3 QoS 1 PUBLISHes without acking and is aborted.
    Connection #2 gets CONNACK(session_present=1) and acks everything. Did the library
    reconnect by itself, and did it resend the unacked messages (DUP=1)?"""
    fb = FakeBroker("resend")
    port = await fb.start()
    loop = asyncio.get_running_loop()
    lib = args.lib
    notes = ""
    app_reconnect = False
    pub_results: list = []

    async def track(coro, label):
        try:
            await coro
            pub_results.append((label, "ok"))
        except Exception as e:  # noqa: BLE001
            pub_results.append((label, f"raised {type(e).__name__}: {e}"))

    tasks = []
    if lib == "aiomqtt":
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        c = aiomqtt.Client(HOST, port, identifier="probe", protocol=aiomqtt.ProtocolVersion.V5,
                           clean_start=False, properties=props, timeout=8)
        await c.__aenter__()
        for i in range(3):
            tasks.append(asyncio.create_task(track(c.publish("probe/out", f"p{i}", qos=1), f"p{i}")))
        # aiomqtt has no automatic reconnect; the documented pattern is to re-enter `async with client`
        try:
            await asyncio.wait_for(c._disconnected, 5)
        except Exception as e:  # noqa: BLE001
            notes += f"disconnect seen: {type(e).__name__}; "
        try:
            await c.__aexit__(None, None, None)
        except Exception as e:  # noqa: BLE001
            notes += f"__aexit__: {type(e).__name__}; "
        app_reconnect = True
        try:
            await asyncio.wait_for(c.__aenter__(), 5)
        except Exception as e:  # noqa: BLE001
            notes += f"re-enter failed: {e!r}; "

        async def cleanup():
            await c.__aexit__(None, None, None)
    elif lib in ("paho", "paho_aio"):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="probe", protocol=mqtt.MQTTv5)
        c.reconnect_delay_set(1, 2)
        connected = asyncio.Event()
        c.on_connect = lambda *a: loop.call_soon_threadsafe(connected.set)
        if lib == "paho":
            c.connect(HOST, port, clean_start=False, properties=props)
            c.loop_start()  # loop_forever() in a thread: reconnects automatically
        else:
            c.on_socket_open = lambda cl, ud, sock: loop.add_reader(sock, cl.loop_read)
            c.on_socket_close = lambda cl, ud, sock: loop.remove_reader(sock)
            c.on_socket_register_write = lambda cl, ud, sock: loop.add_writer(sock, cl.loop_write)
            c.on_socket_unregister_write = lambda cl, ud, sock: loop.remove_writer(sock)
            c.connect(HOST, port, clean_start=False, properties=props)
        await connected.wait()
        infos = [c.publish("probe/out", f"p{i}", qos=1) for i in range(3)]
        if lib == "paho_aio":
            # no network thread => no automatic reconnect; the app must call reconnect()
            try:
                await asyncio.wait_for(asyncio.shield(fb.c2_connected.wait()), 2)
            except asyncio.TimeoutError:
                app_reconnect = True
                c.reconnect()

        async def cleanup():
            pub_results.extend((f"p{i}", "published" if inf.is_published() else "not published")
                               for i, inf in enumerate(infos))
            c.disconnect()
            if lib == "paho":
                await loop.run_in_executor(None, c.loop_stop)
    elif lib == "gmqtt":
        import gmqtt
        c = gmqtt.Client("probe", clean_session=False, session_expiry_interval=300)
        c.reconnect_delay = 1
        await c.connect(HOST, port)
        for i in range(3):
            c.publish("probe/out", f"p{i}", qos=1)

        async def cleanup():
            await c.disconnect()
    elif lib == "zmqtt":
        import zmqtt
        c = zmqtt.create_client(HOST, port, client_id="probe", clean_session=False, session_expiry_interval=300,
                                version="5.0", reconnect=zmqtt.ReconnectConfig(initial_delay=0.5))
        await c.connect()
        for i in range(3):
            tasks.append(asyncio.create_task(track(c.publish("probe/out", f"p{i}", qos=zmqtt.QoS(1)), f"p{i}")))

        async def cleanup():
            await c.disconnect()
    elif lib == "mqtt5raw":
        fb.close()
        return base_result(args, n=3, not_applicable="raw probe has no session/retry logic; you would write it")

    try:
        await asyncio.wait_for(fb.c2_connected.wait(), 10)
        await asyncio.sleep(1.5)
    except asyncio.TimeoutError:
        notes += "no reconnect within 10 s; "
    if tasks:
        await asyncio.wait(tasks, timeout=3)
    try:
        await asyncio.wait_for(cleanup(), 5)
    except Exception as e:  # noqa: BLE001
        notes += f"cleanup: {e!r}; "
    for t in tasks:
        t.cancel()
    fb.close()
    c1 = [p for p in fb.publishes if p["conn"] == 0]
    c2 = [p for p in fb.publishes if p["conn"] and p["conn"] > 0]
    return base_result(
        args, n=3, connects=fb.connects, auto_reconnected=(fb.conns > 1 and not app_reconnect),
        app_driven_reconnect=app_reconnect,
        sent_on_conn1=len(c1), resent_on_conn2=len(c2), resent_with_dup=sum(1 for p in c2 if p["dup"]),
        conn2_publishes=c2, publish_call_outcome=sorted(pub_results), notes=notes,
    )


async def feat_flow(args) -> dict:
    """Fake broker advertises Receive Maximum = 10 and withholds PUBACKs for 1 s.
    The app tries to put 30 QoS 1 publishes in flight. How many reach the broker unacked?"""
    fb = FakeBroker("flow")
    port = await fb.start()
    lib = args.lib
    errors: list = []
    tasks = []
    cleanup = None

    async def track(coro):
        try:
            await coro
        except Exception as e:  # noqa: BLE001
            errors.append(f"{type(e).__name__}: {e}"[:200])

    if lib == "aiomqtt":
        import aiomqtt
        c = aiomqtt.Client(HOST, port, protocol=aiomqtt.ProtocolVersion.V5, max_inflight_messages=1000)
        c.pending_calls_threshold = 10**9
        await c.__aenter__()
        tasks = [asyncio.create_task(track(c.publish("probe/flow", b"x", qos=1))) for _ in range(30)]

        async def cleanup():
            await c.__aexit__(None, None, None)
    elif lib in ("paho", "paho_aio"):
        a = PahoAdapter(port, 1000) if lib == "paho" else PahoAioAdapter(port, 1000)
        await a.connect("probe")
        for _ in range(30):
            info = a.c.publish("probe/flow", b"x", 1)
            if info.rc:
                errors.append(f"rc={info.rc}")
        cleanup = a.disconnect
    elif lib == "gmqtt":
        import gmqtt
        c = gmqtt.Client("probe")
        await c.connect(HOST, port)
        for _ in range(30):
            try:
                c.publish("probe/flow", b"x", qos=1)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{type(e).__name__}: {e}")

        async def cleanup():
            await c.disconnect()
    elif lib == "zmqtt":
        import zmqtt
        c = zmqtt.create_client(HOST, port, client_id="probe", version="5.0")
        await c.connect()
        tasks = [asyncio.create_task(track(c.publish("probe/flow", b"x", qos=zmqtt.QoS(1)))) for _ in range(30)]

        async def cleanup():
            await c.disconnect()
    elif lib == "mqtt5raw":
        r = await raw_client(port)
        await r.connect("probe")
        tasks = [asyncio.create_task(track(r.publish_many("probe/flow", [b"x" * 8] * 30, 1, 10, 0)))]
        cleanup = r.disconnect
    await asyncio.sleep(1.0)
    in_flight_at_1s = fb.max_unacked
    fb.release()
    await asyncio.sleep(0.5)
    fb.release()
    await asyncio.sleep(0.5)
    fb.release()
    await asyncio.sleep(0.3)
    if tasks:
        await asyncio.wait(tasks, timeout=2)
    try:
        await asyncio.wait_for(cleanup(), 5)
    except Exception as e:  # noqa: BLE001
        errors.append(f"cleanup: {e!r}")
    fb.close()
    total = sum(1 for _ in fb.unacked)  # leftover
    return base_result(args, n=30, broker_receive_max=10, max_unacked_seen_by_broker=in_flight_at_1s,
                       honours_server_receive_max=in_flight_at_1s <= 10, errors=sorted(set(errors)),
                       error_count=len(errors), leftover_unacked=total)


async def feat_props(args) -> dict:
    """Round-trip a PUBLISH with user properties, response topic and correlation data via Mosquitto."""
    lib = args.lib
    topic = f"probe/props/{uuid.uuid4().hex[:6]}"
    got: dict = {}
    ev = asyncio.Event()
    loop = asyncio.get_running_loop()
    up = [("k1", "v1"), ("k2", "v2")]
    rt, cd = "reply/here", b"\x01\x02corr"
    if lib in ("aiomqtt", "paho", "paho_aio"):
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        pp = Properties(PacketTypes.PUBLISH)
        pp.UserProperty = up
        pp.ResponseTopic = rt
        pp.CorrelationData = cd

        def from_paho(p):
            return {"user_properties": getattr(p, "UserProperty", None), "response_topic": getattr(p, "ResponseTopic", None),
                    "correlation_data": getattr(p, "CorrelationData", None)}
    if lib == "aiomqtt":
        import aiomqtt
        async with aiomqtt.Client(HOST, args.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
            await c.subscribe(topic, 1)
            await c.publish(topic, b"x", qos=1, properties=pp)
            m = await asyncio.wait_for(anext(aiter(c.messages)), 5)
            got = from_paho(m.properties)
    elif lib in ("paho", "paho_aio"):
        a = PahoAdapter(args.port, 10) if lib == "paho" else PahoAioAdapter(args.port, 10)
        await a.connect(f"pp-{uuid.uuid4().hex[:6]}")

        def on_msg(cl, ud, m):
            got.update(from_paho(m.properties))
            loop.call_soon_threadsafe(ev.set)
        a.c.on_message = on_msg
        await a.subscribe(topic, 1)
        a.c.publish(topic, b"x", 1, properties=pp)
        await asyncio.wait_for(ev.wait(), 5)
        await a.disconnect()
    elif lib == "gmqtt":
        import gmqtt
        c = gmqtt.Client(f"pp-{uuid.uuid4().hex[:6]}")

        def on_msg(client, t, payload, qos, properties):
            got.update({"user_properties": properties.get("user_property"),
                        "response_topic": properties.get("response_topic"),
                        "correlation_data": properties.get("correlation_data")})
            ev.set()
            return 0
        c.on_message = on_msg
        await c.connect(HOST, args.port)
        c.subscribe(topic, qos=1)
        await asyncio.sleep(0.2)
        c.publish(topic, b"x", qos=1, user_property=up, response_topic=rt, correlation_data=cd)
        await asyncio.wait_for(ev.wait(), 5)
        await c.disconnect()
    elif lib == "zmqtt":
        import zmqtt
        c = zmqtt.create_client(HOST, args.port, version="5.0")
        async with c:
            async with c.subscribe(topic, qos=zmqtt.QoS(1)) as sub:
                await c.publish(topic, b"x", qos=zmqtt.QoS(1), properties=zmqtt.PublishProperties(
                    user_properties=tuple(up), response_topic=rt, correlation_data=cd))
                m = await asyncio.wait_for(sub.get_message(), 5)
                p = m.properties
                got = {"user_properties": p.user_properties, "response_topic": p.response_topic,
                       "correlation_data": p.correlation_data}
    elif lib == "mqtt5raw":
        def on_pub(pkt):
            got.update({"user_properties": pkt.user_properties, "response_topic": pkt.response_topic,
                        "correlation_data": pkt.correlation_data})
            ev.set()
        r = await raw_client(args.port, on_pub)
        await r.connect(f"pp-{uuid.uuid4().hex[:6]}")
        await r.subscribe(topic, 1)
        r.transport.write(PublishPacket(topic, b"x", qos=Q1, packet_id=7, user_properties=up,
                                        response_topic=rt, correlation_data=cd).write())
        await asyncio.wait_for(ev.wait(), 5)
        await r.disconnect()
    norm = {k: (repr(v) if isinstance(v, bytes) else v) for k, v in got.items()}
    ok = (got.get("response_topic") in (rt, [rt]) and got.get("correlation_data") in (cd, [cd])
          and [tuple(x) for x in (got.get("user_properties") or [])] == up)
    return base_result(args, n=1, received_properties=norm, roundtrip_ok=ok)


# --------------------------------------------------------------------------------------
STATE: dict = {}


async def main_async(args) -> dict:
    ZmqttAdapter.naive_subscribe = args.naive_subscribe
    try:
        res = await asyncio.wait_for(main_async2(args), args.deadline + 5)
    except asyncio.TimeoutError:
        sink = STATE.get("sink")
        res = base_result(args, ok=False, error=f"hung: internal watchdog fired during stage '{STATE.get('stage')}'",
                          received=sink.count if sink else None, timeout=True)
    if args.naive_subscribe:
        res["variant"] = "naive_subscribe"
    return res


async def main_async2(args) -> dict:
    if args.scenario == "pubsub_qos0":
        return await scenario_pubsub(args, 0)
    if args.scenario == "pubsub_qos1":
        return await scenario_pubsub(args, 1)
    if args.scenario == "recv_qos1_queued":
        return await scenario_queued(args)
    if args.scenario == "feat_manual_ack":
        return await feat_manual_ack(args)
    if args.scenario == "feat_resend":
        return await feat_resend(args)
    if args.scenario == "feat_props":
        return await feat_props(args)
    if args.scenario == "feat_flow":
        return await feat_flow(args)
    raise SystemExit(f"unknown scenario {args.scenario}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", required=True, choices=LIBS)
    ap.add_argument("--scenario", required=True, choices=SCENARIOS)
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--payload", type=int, default=128)
    ap.add_argument("--window", type=int, default=1000, help="QoS 1 publish pipelining window")
    ap.add_argument("--yield-every", type=int, default=100,
                    help="publisher does `await asyncio.sleep(0)` every K messages (0 = never)")
    ap.add_argument("--idle", type=float, default=5.0, help="stop waiting after this many idle seconds")
    ap.add_argument("--deadline", type=float, default=50.0, help="internal time budget (s)")
    ap.add_argument("--naive-subscribe", action="store_true",
                    help="zmqtt only: await sub.start() before consuming (documented pattern)")
    ap.add_argument("--broker-pid", type=int, default=0, help="record the broker's CPU time (/proc)")
    ap.add_argument("--broker-max-inflight", type=int, default=None,
                    help="recorded only: the broker's max_inflight_messages setting")
    ap.add_argument("--run", type=int, default=0, help="repetition index (recorded only)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    global BROKER_PID
    BROKER_PID = args.broker_pid
    import uvloop

    t_start = time.time()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            res = runner.run(main_async(args))
    except BaseException as e:  # noqa: BLE001
        res = base_result(args, ok=False, error=f"{type(e).__name__}: {e}",
                          traceback=traceback.format_exc()[-2000:])
    res["run"] = args.run
    res["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    if args.broker_max_inflight is not None:
        res["broker_max_inflight"] = args.broker_max_inflight
    res["wall_s"] = round(time.time() - t_start, 2)
    res["versions"] = versions(args.lib)
    sys.stdout.write(json.dumps(res, default=str) + "\n")
    sys.stdout.flush()
    os._exit(0)  # do not hang on leftover non-daemon threads / transports


def versions(lib: str) -> str:
    from importlib.metadata import version
    dist = {"aiomqtt": "aiomqtt", "gmqtt": "gmqtt", "zmqtt": "zmqtt", "paho": "paho-mqtt",
            "paho_aio": "paho-mqtt", "mqtt5raw": "mqtt5", "gateway": "mp-gateway", "gateway311": "mp-gateway"}[lib]
    try:
        return f"{dist} {version(dist)}"
    except Exception:  # noqa: BLE001
        return dist


if __name__ == "__main__":
    main()
