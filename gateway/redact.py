"""Keep secrets out of logs, errors and status output."""

from __future__ import annotations

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
