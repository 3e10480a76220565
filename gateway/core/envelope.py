"""The message as it crosses the gateway, and the handle that acknowledges its source.

An :class:`Envelope` is created once per received message by the source
connector and handed to the dispatcher. Its payload is the bytes object the
broker client produced: it is never decoded, re-encoded or copied on the way
to the sinks.
"""

from __future__ import annotations

import msgspec

Headers = list[tuple[str, str]]
"""Ordered (name, value) pairs: MQTT 5 user properties, NATS headers, Kafka headers."""


class Receipt:
    """The source's acknowledgement handle for one message.

    The dispatcher sets ``pending`` to the number of routes the message entered
    and calls :meth:`settle` once every route finished with it: every target
    confirmed, or failed under a policy that lets the source go. A source
    subclasses this to send its PUBACK, JetStream ack or Kafka offset, and
    :meth:`release` for what must come back.
    """

    __slots__ = ("pending", "released")

    def __init__(self) -> None:
        self.pending = 0
        self.released = False
        """Some route gave the message up undelivered: :meth:`release` instead of :meth:`settle`."""

    def settle(self) -> None:
        """Acknowledge the message at its source. Called exactly once (or :meth:`release`)."""
        raise NotImplementedError

    def release(self) -> None:
        """Do not acknowledge: let the source redeliver it (NAK, no commit, no PUBACK). At most once.

        The default does nothing, which is right where an unacknowledged message comes back by
        itself once its connection is reset (MQTT) or its ack wait expires.
        """

    def position(self) -> str:
        """Where the source keeps the message (``topic/partition/offset``, stream sequence), or "".

        Computed on demand (dedup ids, dead-letter headers), never per message.
        """
        return ""


class Envelope(msgspec.Struct, gc=False):
    """One message in flight. Mutable only by the source that made it, before dispatch.

    Not tracked by the cyclic garbage collector (``gc=False``): an envelope is
    created per message, and nothing it references may refer back to it
    (receipts, headers and payloads never do), so it cannot be part of a cycle.
    """

    topic: str
    """MQTT topic, NATS subject or Kafka topic, as the source broker spells it."""
    payload: bytes
    headers: Headers | None = None
    key: bytes | None = None
    """The Kafka record key of a Kafka source; ``None`` elsewhere."""
    qos: int = 0
    reply: str | None = None
    """NATS reply subject, or MQTT 5 response topic."""
    correlation: bytes | None = None
    """MQTT 5 correlation data."""
    received_ns: int = 0
    """``time.monotonic_ns()`` when the source received it (end-to-end latency)."""
    receipt: Receipt | None = None
    """``None`` for at-most-once sources (core NATS, MQTT QoS 0): nothing to acknowledge."""
    age_ns: int = -1
    """How old the message was when the source received it, from the broker's timestamp (Kafka record
    timestamp, JetStream message time); -1 where the protocol has none (MQTT, core NATS)."""
