"""Kafka records as real producers write them, for the Kafka record tests.

- :func:`produce_librdkafka`: records written by librdkafka (confluent-kafka) with a ``compression.type``,
  as most non-Java producers write them: null keys, null values, null header values, repeated header
  names and binary header values included;
- :func:`raw_batch` / :func:`send_raw`: a record batch built byte by byte and sent in a Produce request,
  for batches no well-behaved client writes (a header name that is not UTF-8, a corrupt compressed
  batch) but that a broker stores and a consumer must get past;
- :func:`batch_codecs`: the codec of each stored batch, read with a raw Fetch request (what a consumer
  cannot tell: it sees decompressed records).

Read them back with :func:`tests.support.clients.read_records` (raw bytes, ``None`` kept).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable, Sequence

import confluent_kafka as ck
from aiokafka import TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
CODEC_IDS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
"""The codec bits of a record batch's attributes."""

Header = tuple[str, bytes | None]
Rec = tuple[bytes | None, bytes | None, list[Header]]
"""(key, value, headers) of one record."""


def produce_librdkafka(
    bootstrap: str, topic: str, records: Iterable[tuple[int, Rec]], *, compression: str = "none"
) -> int:
    """Produce (partition, record) pairs with librdkafka, ``linger.ms`` 5 so that batches hold many
    records; returns how many the broker acknowledged (blocking: run it in a thread)."""
    producer = ck.Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": False,  # Tansu grants no producer ids
            "compression.type": compression,
            "linger.ms": 5,
            "log_level": 0,
        }
    )
    acked = 0
    errors: list[ck.KafkaError] = []

    def report(err: ck.KafkaError | None, _msg: object) -> None:
        nonlocal acked
        if err is None:
            acked += 1
        else:
            errors.append(err)

    for partition, (key, value, headers) in records:
        producer.produce(topic, value, key, partition=partition, headers=headers or None, on_delivery=report)
        producer.poll(0)
    assert producer.flush(30) == 0, "librdkafka could not deliver everything"
    assert not errors, errors[:3]
    return acked


def raw_batch(records: Sequence[Rec], *, header_name_bytes: dict[str, bytes] | None = None, codec: int = 0) -> bytes:
    """A v2 record batch (offsets from 0: the broker assigns them). ``header_name_bytes`` replaces a
    header name's UTF-8 by other bytes of the same length; ``codec`` sets the codec bits without
    compressing (a corrupt compressed batch). The CRC is computed last, so the broker accepts it."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    now = int(time.time() * 1000)
    for i, (key, value, headers) in enumerate(records):
        builder.append(i, timestamp=now, key=key, value=value, headers=headers)
    buf = bytearray(builder.build())
    for name, raw in (header_name_bytes or {}).items():
        encoded = name.encode()
        assert len(raw) == len(encoded)
        at = buf.find(encoded)
        assert at >= 0
        buf[at : at + len(raw)] = raw
    if codec:
        (attributes,) = struct.unpack_from(">h", buf, 21)
        struct.pack_into(">h", buf, 21, attributes | codec)
    struct.pack_into(">I", buf, 17, calc_crc32c(bytes(buf[21:])))  # CRC-32C of attributes..end
    return bytes(buf)


async def send_raw(bootstrap: str, topic: str, partition: int, batch: bytes) -> None:
    """One Produce request holding ``batch``; fails unless the broker stored it."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        await client._wait_on_metadata(topic)
        node = client.cluster.leader_for_partition(TopicPartition(topic, partition))
        request = ProduceRequest(
            transactional_id=None, required_acks=-1, timeout=10_000, topics=[(topic, [(partition, batch)])]
        )
        response = await client.send(node, request)
        for _topic, partitions in response.topics:
            for part in partitions:
                assert part[1] == 0, f"the broker refused the batch: error {part[1]}"
    finally:
        await client.close()


async def batch_codecs(bootstrap: str, topic: str, partition: int = 0) -> list[int]:
    """The codec id of every stored batch of a partition, in order (a raw Fetch from offset 0)."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        await client._wait_on_metadata(topic)
        node = client.cluster.leader_for_partition(TopicPartition(topic, partition))
        codecs: list[int] = []
        offset = 0
        while True:
            request = FetchRequest(
                max_wait_time=100,
                min_bytes=1,
                max_bytes=8 << 20,
                isolation_level=0,
                topics=[(topic, [(partition, offset, 8 << 20)])],
            )
            response = await client.send(node, request)
            found = 0
            for _topic, partitions in response.topics:
                for _partition, error, _highwater, *rest in partitions:
                    assert error == 0, f"fetch error {error}"
                    records = MemoryRecords(rest[-1])
                    while records.has_next():
                        batch = records.next_batch()
                        if batch is None:
                            break
                        codecs.append(batch.compression_type)
                        offset = batch.next_offset
                        found += 1
            if not found:
                return codecs
    finally:
        await client.close()
