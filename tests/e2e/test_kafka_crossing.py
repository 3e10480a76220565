"""Kafka records as librdkafka writes them, through the gateway process to NATS and MQTT 5 and back.

A topic per codec (none, gzip, snappy, lz4, zstd; 500 records each over 3
partitions) and one with the odd records Kafka allows (null keys, null
values, a header without a value, a repeated header name, binary header
values), all produced by librdkafka. One gateway process:

- Kafka -> core NATS, and Kafka -> MQTT 5 (a gateway each): every record
  arrives, in order per partition, with its headers; no connector reconnects;
- the odd records come back to Kafka from NATS (from MQTT 5): binary header
  values are byte-identical after the trip (a text protocol carries them as
  ``NAME-bin: base64``, ``gateway.routing.headers``).
"""

from __future__ import annotations

import asyncio
import base64
from collections import defaultdict
from typing import Any

import aiohttp
import pytest

from tests.support.brokers import Mosquitto, NatsServer, Tansu
from tests.support.clients.kafka import create_topics, read_records
from tests.support.clients.mqtt import MqttCollector
from tests.support.clients.nats import NatsCollector, nats_connect
from tests.support.configs import gateway_config, kafka_connector, mqtt_connector, nats_connector
from tests.support.gateway_process import routez
from tests.support.kafka_batches import CODECS, Rec, produce_librdkafka
from tests.support.messages import Received

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.timeout(120)]

N = 500
PARTITIONS = 3
ODD = 60
BINARY = b"\x00\xff\xfe\r\nschema:\x01"
"""A header value no text protocol carries verbatim (NUL, CR/LF, bytes that are not UTF-8)."""


def codec_record(codec: str, i: int) -> tuple[int, Rec]:
    key = None if i % 5 == 0 else f"k{i % 7}".encode()
    return i % PARTITIONS, (key, f"{codec}:{i % PARTITIONS}:{i}".encode(), [("seq", str(i).encode())])


def odd_record(i: int) -> tuple[int, Rec]:
    """Every 4th record has a null value; every record a null-valued header, a repeated name and
    a binary value (its seq in the last byte, so that a mix-up shows)."""
    headers: list[tuple[str, bytes | None]] = [
        ("seq", str(i).encode()),
        ("empty", None),
        ("dup", b"first"),
        ("dup", b"second"),
        ("schema-id", BINARY + bytes([i])),
        ("utf8", "température ✓".encode()),
    ]
    value = None if i % 4 == 0 else f"odd:{i % PARTITIONS}:{i}".encode()
    return i % PARTITIONS, (None if i % 2 else b"key", value, headers)


async def connectors(http_url: str | None) -> dict[str, dict[str, Any]]:
    """The gateway's ``/connz``, by connector name."""
    assert http_url is not None
    async with aiohttp.ClientSession() as http, http.get(http_url + "/connz") as resp:
        body: dict[str, Any] = await resp.json()
    return {c["name"]: c for c in body["connectors"]}


def seq_of(headers: list[tuple[str, Any]]) -> int:
    return int(dict(headers)["seq"])


def assert_in_order(received: list[tuple[str, int]], expected: dict[str, int], label: str) -> None:
    """(topic kind, seq) pairs: every seq once per kind, increasing within each source partition."""
    by_part: dict[tuple[str, int], list[int]] = defaultdict(list)
    for kind, seq in received:
        by_part[(kind, seq % PARTITIONS)].append(seq)
    for kind, n in expected.items():
        for p in range(PARTITIONS):
            want = list(range(p, n, PARTITIONS))
            assert by_part[(kind, p)] == want, f"{label}: {kind} partition {p}: {by_part[(kind, p)][:10]}..."


@pytest.mark.parametrize("via", ["nats", "mqtt"])
async def test_kafka_records_through_text_protocol_and_back(
    gateways: Any, request: pytest.FixtureRequest, kafka_broker: Tansu, unique: str, via: str
) -> None:
    """Kafka -> core NATS (or MQTT 5) for every topic, and the odd topic's records back to Kafka from there."""
    u = unique
    bootstrap = kafka_broker.bootstrap
    kinds = [*CODECS, "odd"]
    await create_topics(bootstrap, [f"kx-{u}.{k}" for k in kinds], PARTITIONS)
    await create_topics(bootstrap, [f"kx-{u}-back"], 1)
    for codec in CODECS:
        records = (codec_record(codec, i) for i in range(N))
        acked = await asyncio.to_thread(produce_librdkafka, bootstrap, f"kx-{u}.{codec}", records, compression=codec)
        assert acked == N
    assert await asyncio.to_thread(produce_librdkafka, bootstrap, f"kx-{u}.odd", map(odd_record, range(ODD))) == ODD

    source = {"connector": "kafka", "topic": f"kx-{u}.{{kind}}", "group": f"g-{u}"}
    back = {"connector": "kafka", "topic": f"kx-{u}-back"}
    if via == "nats":
        nats_server: NatsServer = request.getfixturevalue("nats_server")
        text = nats_connector(nats_server.url)
        out = {"connector": "text", "subject": f"kx.{u}.{{kind}}"}
        back_from = {"connector": "text", "subject": f"kx.{u}.odd"}
    else:
        mosquitto: Mosquitto = request.getfixturevalue("mosquitto")
        text = mqtt_connector(mosquitto.url, f"gw-{u}", protocol=5)
        out = {"connector": "text", "topic": f"kx/{u}/{{kind}}", "qos": 1}
        back_from = {"connector": "text", "topic": f"kx/{u}/odd", "qos": 1}
    config = gateway_config(
        f"gw-{u}",
        {"kafka": kafka_connector(bootstrap), "text": text},
        [{"name": "out", "from": source, "to": out}, {"name": "back", "from": back_from, "to": back}],
    )
    gw = gateways(config)
    nc = None
    if via == "nats":
        nc = await nats_connect(nats_server.url)
        collector: Any = await NatsCollector().subscribe(nc, f"kx.{u}.>")
    else:
        collector = await asyncio.to_thread(MqttCollector(mosquitto.port, f"sub-{u}", f"kx/{u}/#").start)
    total = N * len(CODECS) + ODD
    try:
        await gw.astart(60)
        await gw.await_until(lambda: len(collector.messages) >= total, 60, f"{total} at {via}")
        returned: list[Any] = []
        for _ in range(100):
            returned = await read_records(bootstrap, f"kx-{u}-back")
            if len(returned) >= ODD:
                break
            await asyncio.sleep(0.2)
        stats = await routez(gw.http_url)
        connz = await connectors(gw.http_url)
        await gw.astop()
    finally:
        if nc is not None:
            await nc.close()
        else:
            await asyncio.to_thread(collector.close)

    messages: list[Received] = collector.messages
    sep = "." if via == "nats" else "/"
    assert len(messages) == total, f"{len(messages)} of {total} (duplicates?)"
    expected = {**dict.fromkeys(CODECS, N), "odd": ODD}
    assert_in_order([(m.where.split(sep)[-1], seq_of(m.headers)) for m in messages], expected, via)
    for m in messages:
        kind, seq = m.where.split(sep)[-1], seq_of(m.headers)
        if kind != "odd":
            assert m.payload == f"{kind}:{seq % PARTITIONS}:{seq}".encode()
            continue
        h = dict(m.headers)
        assert m.payload == (b"" if seq % 4 == 0 else f"odd:{seq % PARTITIONS}:{seq}".encode())
        assert h["empty"] == "" and h["utf8"] == "température ✓", h
        assert base64.b64decode(h["schema-id-bin"]) == BINARY + bytes([seq]), h
        assert "schema-id" not in h
        dups = [v for k, v in m.headers if k == "dup"]
        # NATS headers are a map: the last value of a repeated name; MQTT 5 user properties keep both
        assert dups == (["second"] if via == "nats" else ["first", "second"]), dups

    assert sorted(seq_of(r.headers) for r in returned) == list(range(ODD)), f"back via {via}"
    for r in returned:
        seq = seq_of(r.headers)
        h = defaultdict(list)
        for k, v in r.headers:
            h[k].append(v)
        assert h["schema-id"] == [BINARY + bytes([seq])], f"via {via}: binary header altered: {h}"
        assert h["utf8"] == ["température ✓".encode()] and h["empty"] == [b""], h
        assert (r.value or b"") == (b"" if seq % 4 == 0 else f"odd:{seq % PARTITIONS}:{seq}".encode())

    for name, want in (("out", total), ("back", ODD)):
        s = stats[name]
        assert s["received"] == s["acked"] == want and s["failed"] == 0, (name, s)
    assert {name: c["reconnects"] for name, c in connz.items()} == {"kafka": 0, "text": 0}, connz
    problems = gw.problems()
    assert not problems, "gateway logged errors:\n" + "\n".join(problems[:10])
