"""What the Kafka target's ``compression`` costs: librdkafka producing JSON telemetry into Tansu per codec.

    .venv/bin/python -m loadtests.kafka_compression [--n 200000] [--size 128]   # ~1 min; a Markdown table

For each codec (none, gzip, snappy, lz4, zstd): a fresh topic, the gateway's own producer settings
(``connectors.kafka.confluent_sink.producer_config``, with ``compression``), N records of a JSON
document padded to about ``--size`` bytes with random digits (so that compression has real work),
then flush. Reported: msgs/s over the produce+flush and the producer process's CPU µs per record
(librdkafka's threads included). The machine is shared and noisy: compare codecs within one run.
"""

from __future__ import annotations

import argparse
import random
import resource
import time

from confluent_kafka import Producer

from connectors.kafka.config import COMPRESSIONS, KafkaConfig
from connectors.kafka.confluent_sink import producer_config
from tests.support.brokers import Tansu


def payloads(n: int, size: int) -> list[bytes]:
    rng = random.Random(7)
    out = []
    for i in range(n):
        head = b'{"device":"d%d","temp":%.2f,"seq":%d,"pad":"' % (i % 100, rng.uniform(-20, 40), i)
        pad = "".join(rng.choice("0123456789") for _ in range(max(0, size - len(head) - 2))).encode()
        out.append(head + pad + b'"}')
    return out


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    data = payloads(args.n, args.size)
    rows = []
    with Tansu() as kafka:
        for codec in COMPRESSIONS:
            topic = f"compression-{codec}-{args.size}"
            cfg = KafkaConfig(bootstrap_servers=[kafka.bootstrap], compression=codec)
            p = Producer(producer_config(cfg, f"bench-{codec}"))
            p.produce(topic, b"warm-up")
            p.flush(30)
            c0, t0 = cpu(), time.monotonic()
            for v in data:
                while True:
                    try:
                        p.produce(topic, v)
                        break
                    except BufferError:
                        p.poll(0.001)
            p.flush(120)
            wall, used = time.monotonic() - t0, cpu() - c0
            rows.append((codec, args.n / wall, used / args.n * 1e6))
    print(f"| codec | {args.size} B msgs/s | CPU µs per record (producer process) |")
    print("|---|---|---|")
    for codec, rate, us in rows:
        print(f"| {codec} | {rate:,.0f} | {us:.2f} |")


if __name__ == "__main__":
    main()
