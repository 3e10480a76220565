"""Freshness: the JetStream publish time read from an ack subject, and the age histogram's buckets."""

from __future__ import annotations

import pytest

from connectors.nats.source import stamp_of
from gateway.core.stats import AGE_BUCKETS, Ages

pytestmark = pytest.mark.timeout(10)

NS = 1_733_100_000_123_456_789


@pytest.mark.parametrize(
    ("reply", "stamp"),
    [
        (f"$JS.ACK.ORDERS.gw.1.42.42.{NS}.7", NS),  # stream, consumer, delivered, seqs, time, pending
        (f"$JS.ACK.hub.ACCHASH.ORDERS.gw.1.42.42.{NS}.7.x9Zq", NS),  # with domain, account hash, token
        ("_INBOX.abc", 0),
        ("$JS.ACK.ORDERS.gw.1.42.42.notanumber.7", 0),
        ("$JS.ACK.ORDERS.gw.1.42.42.²²²²²²²²²²²²²²²²²²².7", 0),  # unicode digits are not a time
    ],
)
def test_the_publish_time_is_read_from_either_ack_subject_form(reply: str, stamp: int) -> None:
    assert stamp_of(reply) == stamp


def test_ages_land_in_doubling_buckets_and_a_negative_age_counts_as_zero() -> None:
    ages = Ages()
    for ns in (-5_000_000, 0, 500_000, 3_000_000_000, 10**15):
        ages.observe_ns(ns)
    counts = ages.bucket_counts()

    assert len(counts) == AGE_BUCKETS + 1 == len(ages.buckets) + 1
    assert counts[0] == 3, "-5 ms (a producer clock ahead), 0 and 0.5 ms: the first bucket (up to ~1 ms)"
    assert counts[-1] == 1, "11 days: the unbounded bucket"
    assert ages.count == 5 and ages.sum_ns == 500_000 + 3_000_000_000 + 10**15
    q = ages.quantile(0.7)
    assert q is not None and 2.1 < q <= 4.3, "3 s lies in the (2.1 s, 4.3 s] bucket"
