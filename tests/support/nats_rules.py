"""nats-server's rules for subjects and header names, read independently of the gateway's code, and
hypothesis strategies that hit every rule (the NATS fuzz tests, unit and against a real server)."""

from __future__ import annotations

import re

from hypothesis import strategies as st

HEADER_NAME = re.compile(rb"[!-9;-~]+")
"""A header name nats-server takes: printable ASCII without ``:``."""
NOT_BYTES = re.compile("[\ud800-\udc7f\udd00-\udfff]")
"""Lone surrogates that no bytes decode into (``surrogateescape`` gives U+DC80..U+DCFF only)."""

# Characters chosen to hit every rule: separators, wildcards, whitespace, controls, non-ASCII, surrogates.
_TRICKY = st.sampled_from(list(".*>: \t\r\n\x00\x01\x7f\u00a0\u2028ü€\U0001f600\udcff\ud800-_$/"))
TEXT = st.text(alphabet=st.one_of(st.characters(), _TRICKY), max_size=40)
_TOKEN = st.text(alphabet=st.one_of(st.characters(codec="ascii"), _TRICKY), min_size=0, max_size=12)
_GOOD_TOKEN = st.from_regex(r"[A-Za-z0-9_$:/\-ü€]{1,8}", fullmatch=True)
SUBJECTS = st.one_of(
    TEXT,
    st.lists(st.one_of(_GOOD_TOKEN, _GOOD_TOKEN, _TOKEN), min_size=1, max_size=6).map(".".join),
    st.integers(3000, 5000).map(lambda n: "s." + "x" * n),  # around the control-line limit
)
_NAME_TEXT = st.one_of(st.from_regex(r"[!-9;-~]{1,12}", fullmatch=True), _TOKEN)
HEADERS = st.one_of(st.none(), st.lists(st.tuples(_NAME_TEXT, TEXT), max_size=4, unique_by=lambda h: h[0]))


def name_ok(name: str) -> bool:
    return name.isascii() and HEADER_NAME.fullmatch(name.encode()) is not None


def subject_ok(subject: bytes) -> bool:
    """nats-server's view, independently: UTF-8, no empty token, no blank or control byte, no wildcard."""
    try:
        subject.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if re.search(rb"[\x00-\x20\x7f*>]", subject):
        return False
    return all(subject.split(b"."))
