"""One error tree for the gateway.

Connectors translate their broker library's exceptions into these at the edge
(``raise SinkError(...) from exc``) so that the core decides retry / fail on
``retriable`` alone and never imports a broker library.
"""

from __future__ import annotations

from dataclasses import dataclass


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""

    retriable: bool = False


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file, located by its key path (``routes[1].to[0].topic``)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(GatewayError):
    """The config is invalid; ``issues`` holds one entry per problem found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


class TemplateError(GatewayError):
    """A target template could not be rendered for a message (e.g. a character the target forbids)."""


class ConnectorError(GatewayError):
    """A broker connection failed or was lost; the connector reconnects by itself."""

    retriable = True


class SinkError(GatewayError):
    """A sink could not deliver a message. ``retriable`` says whether trying again may succeed."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


class Unavailable(SinkError):
    """The target cannot take messages for now although the connection is up (no JetStream stream answers
    yet, no partition leader): waited out with backoff like a lost connection, however long, within the
    route's budget; never counted against ``retry``, so a long outage never turns into failed messages."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=True)


class PayloadTooLarge(SinkError):
    """The message is larger than the target accepts; retrying cannot help."""

    def __init__(self, size: int, limit: int, target: str) -> None:
        super().__init__(f"payload of {size} bytes exceeds {target} limit of {limit} bytes", retriable=False)
        self.size = size
        self.limit = limit


class HeaderError(SinkError):
    """A header the target cannot carry (its name, or a value with no form the target takes): retrying
    cannot help, and the dead letter is written without the message's headers (they would fail it too)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)


class HeadersTooLarge(HeaderError):
    """The message carries more headers, or more header bytes, than the gateway forwards."""

    def __init__(self, count: int, size: int, max_count: int, max_bytes: int) -> None:
        super().__init__(
            f"{count} headers of {size} bytes exceed the limits of {max_count} headers / {max_bytes} bytes"
        )


class PayloadError(SinkError):
    """The payload cannot be decoded, or does not match the route's schema: failed for good."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)

    @classmethod
    def of(cls, exc: Exception) -> PayloadError:
        """Any other error one payload caused while the route worked on it (it fails that message alone)."""
        if isinstance(exc, RecursionError):
            return cls("payload nested too deeply to decode or convert")
        return cls(f"cannot process the payload: {type(exc).__name__}: {exc}")


class BrokerRefusal(ConnectorError):
    """The broker refused the gateway: credentials, authorization, client id, TLS required, busy, quota, banned.

    The message says why in one plain sentence (what ``last_error`` and the log's ``error`` show); ``fields``
    keeps the protocol's own words for the log line (``code="0x86", reason="Bad User Name or Password"`` for
    MQTT, ``nats_error="Authorization Violation"``, ``kafka_error="SASL_AUTHENTICATION_FAILED"``). Retried
    with backoff like a lost connection: a refusal is often fixed on the broker's side while the gateway runs.
    """

    def __init__(self, message: str, **fields: str) -> None:
        super().__init__(message)
        self.fields = fields
