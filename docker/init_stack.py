"""One-shot setup of the compose stack's brokers for docker/gateway.yaml's routes.

Run by the compose service ``init`` (in the gateway image, which has nats-py and aiokafka) before the
gateway starts: creates the JetStream streams the routes read and write (ORDERS: ``orders.>``, EVENTS:
``events.>``) and the Kafka topics (telemetry, orders, orders-archive). Idempotent: what exists is kept.
Waits up to ``INIT_TIMEOUT`` seconds (default 120) for the brokers. Exit 0 when everything exists.
"""

from __future__ import annotations

import asyncio
import os
import sys

import nats  # noqa: TID251 - a setup script, not gateway/
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: TID251
from nats.js.api import StreamConfig  # noqa: TID251
from nats.js.errors import NotFoundError  # noqa: TID251

NATS_URL = os.environ.get("NATS_URL", "nats://nats:4222")
KAFKA_BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "kafka:9092")
STREAMS = {"ORDERS": ["orders.>"], "EVENTS": ["events.>"]}
TOPICS = ("telemetry", "orders", "orders-archive")
PARTITIONS = 4
TOPIC_ALREADY_EXISTS = 36


async def streams() -> None:
    nc = await nats.connect(NATS_URL, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        for name, subjects in STREAMS.items():
            try:
                await js.stream_info(name)
                print(f"init: stream {name} exists", flush=True)
            except NotFoundError:
                await js.add_stream(StreamConfig(name=name, subjects=subjects))
                print(f"init: stream {name} created ({', '.join(subjects)})", flush=True)
    finally:
        await nc.close()


async def topics() -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA_BOOTSTRAP, request_timeout_ms=10_000)
    await admin.start()
    try:
        missing = [t for t in TOPICS if t not in set(await admin.list_topics())]
        if missing:
            resp = await admin.create_topics(
                [NewTopic(t, num_partitions=PARTITIONS, replication_factor=1) for t in missing]
            )
            for topic, code, *_ in resp.topic_errors:
                if code not in (0, TOPIC_ALREADY_EXISTS):
                    raise RuntimeError(f"cannot create Kafka topic {topic}: error code {code}")
        print(f"init: topics {', '.join(TOPICS)} exist (created: {', '.join(missing) or 'none'})", flush=True)
    finally:
        await admin.close()


async def main() -> int:
    deadline = asyncio.get_running_loop().time() + float(os.environ.get("INIT_TIMEOUT", "120"))
    for step in (streams, topics):
        while True:
            try:
                await step()
                break
            except Exception as exc:
                if asyncio.get_running_loop().time() > deadline:
                    print(f"init: {step.__name__} failed: {exc!r}", file=sys.stderr, flush=True)
                    return 1
                print(f"init: {step.__name__} not yet ({exc!r}); retrying", file=sys.stderr, flush=True)
                await asyncio.sleep(2)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
