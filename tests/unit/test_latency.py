"""The per-route latency histogram: doubling buckets from 2**18 ns, quantiles interpolated in a bucket."""

from __future__ import annotations

import itertools

import pytest

from gateway.core.stats import LATENCY_BUCKETS, Latency


def test_buckets_double_from_a_quarter_millisecond() -> None:
    b = Latency().buckets
    assert len(b) == LATENCY_BUCKETS
    assert b[0] == pytest.approx(262.144e-6)
    assert all(hi == pytest.approx(2 * lo) for lo, hi in itertools.pairwise(b))
    assert b[-1] > 30  # seconds


def test_each_latency_lands_below_its_bucket_bound() -> None:
    lat = Latency()
    for ns in (0, 1, 2**18 - 1, 2**18, 3_000_000, 10**9, 10**12):
        lat.observe_ns(ns)
    counts = lat.bucket_counts()
    assert sum(counts) == lat.count == 7
    assert counts[0] == 3  # 0, 1 and 2**18 - 1 ns
    assert counts[1] == 1  # exactly 2**18 ns
    assert counts[-1] == 1  # 1000 s: the unbounded bucket
    assert lat.sum_ns == sum((0, 1, 2**18 - 1, 2**18, 3_000_000, 10**9, 10**12))


def test_quantiles() -> None:
    lat = Latency()
    assert lat.quantile(0.99) is None
    for _ in range(99):
        lat.observe_ns(1_000_000)  # 1 ms: the bucket (0.52 ms, 1.05 ms]
    lat.observe_ns(100_000_000)  # one at 100 ms
    p50 = lat.quantile(0.5)
    assert p50 is not None and 0.000524 <= p50 <= 0.00105
    p999 = lat.quantile(0.999)
    assert p999 is not None and 0.067 <= p999 <= 0.135
