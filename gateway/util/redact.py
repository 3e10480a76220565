"""Keep secrets out of logs, errors and status output."""

from __future__ import annotations

import json
from urllib.parse import urlsplit, urlunsplit

MASK = "***"


def redact_url(url: str) -> str:
    """``scheme://user:secret@host`` → ``scheme://user:***@host``; a lone ``token@host`` is masked too."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    if "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, sep, _ = userinfo.partition(":")
    masked = f"{user}:{MASK}" if sep else MASK
    return urlunsplit((parts.scheme, f"{masked}@{hostport}", parts.path, parts.query, parts.fragment))


_secrets: set[str] = set()
MIN_SECRET_LENGTH = 4
"""Shorter values are not scrubbed from text: they would mask unrelated words (and are no secret)."""


def register_secret(value: str | None) -> None:
    """Remember a secret (a password, token, key) so that :func:`scrub` masks it wherever it appears: as is,
    and as JSON and ``repr`` escape it (a ``"``, ``\\``, control or non-ASCII character changes the text that
    a JSON log line or an error carries)."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        _secrets.add(value)
        _secrets.add(json.dumps(value)[1:-1])
        _secrets.add(json.dumps(value, ensure_ascii=False)[1:-1])
        _secrets.add(repr(value)[1:-1])


def scrub(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    if not _secrets:
        return text
    for secret in sorted(_secrets, key=len, reverse=True):  # longest first: a secret may contain another
        if secret in text:
            text = text.replace(secret, MASK)
    return text
