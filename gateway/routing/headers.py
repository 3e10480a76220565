"""Header values between protocols whose headers are bytes (Kafka) and text (NATS, MQTT 5).

Inside the gateway a header value is ``str``. A Kafka source decodes its bytes
with :func:`from_bytes` (UTF-8, ``surrogateescape``): a value that is not valid
UTF-8 keeps every byte as a lone surrogate, and :func:`to_bytes` gives the same
bytes back on a Kafka target, so Kafka → Kafka is byte-identical.

A text target cannot carry such a value, nor characters its protocol forbids
(CR/LF in a NATS header, control characters in MQTT strings). The rule, after
gRPC's binary metadata: such a header is written as ``NAME-bin`` with the
base64 of its bytes (:func:`to_text`). A name that already ends in ``-bin`` is
written that way too, so the mapping stays reversible; a Kafka target turns a
``NAME-bin`` header whose value is valid base64 back into ``NAME`` with the
original bytes (:func:`from_text`). The suffix ``-bin`` is therefore reserved
for this rule.

Nothing here runs for a message without headers.
"""

from __future__ import annotations

import base64
import binascii
import re

BIN_SUFFIX = "-bin"

NATS_UNSAFE = re.compile(r"[\r\n\x00\ud800-\udfff]")
"""Characters a NATS header value cannot carry verbatim (line breaks end it; surrogates are not UTF-8)."""
MQTT_UNSAFE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff"
    + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(1, 17))
    + "]"
)
"""What MQTT strings (topics, user properties) may not hold: control characters, surrogates, the
non-characters of every plane. Brokers drop the connection over them (Mosquitto: "malformed UTF-8")."""


def from_bytes(value: bytes | None) -> str:
    """A header value read from a bytes protocol; ``None`` (a Kafka header without a value) is ``""``."""
    if value is None:
        return ""
    return value.decode("utf-8", "surrogateescape")


def to_bytes(value: str) -> bytes:
    """The exact bytes :func:`from_bytes` read (valid UTF-8 for any other text)."""
    return value.encode("utf-8", "surrogateescape")


def to_text(name: str, value: str, unsafe: re.Pattern[str]) -> tuple[str, str]:
    """The (name, value) to write on a text target: unchanged, or ``NAME-bin`` with base64 of the bytes."""
    if name.endswith(BIN_SUFFIX) or unsafe.search(value) is not None:
        return name + BIN_SUFFIX, base64.b64encode(to_bytes(value)).decode("ascii")
    return name, value


def from_text(name: str, value: str) -> tuple[str, bytes]:
    """The (name, bytes) to write on a bytes target: ``NAME-bin`` base64 values are decoded back."""
    if name.endswith(BIN_SUFFIX) and len(name) > len(BIN_SUFFIX):
        try:
            return name[: -len(BIN_SUFFIX)], base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            pass
    return name, to_bytes(value)
