"""TLS and SASL settings of a Kafka connector, in each client library's terms."""

from __future__ import annotations

import logging
import ssl
from typing import Any

from connectors.kafka.config import KafkaConfig
from gateway.errors import BrokerRefusal


def warn_if_exposed(cfg: KafkaConfig, log: Any) -> None:
    """Say it loudly when verification is off or credentials go over a plaintext connection (each connect)."""
    if cfg.tls is not None and cfg.tls.insecure_skip_verify:
        log.warning("connector.tls_verification_off", hint="tls.insecure_skip_verify: any server is trusted")
    if cfg.sasl is not None and cfg.protocol == "SASL_PLAINTEXT":
        log.warning(
            "connector.credentials_in_plaintext",
            mechanism=cfg.sasl.mechanism,
            hint="security_protocol SASL_PLAINTEXT: use SASL_SSL (a tls block) outside a lab",
        )


def librdkafka_security(cfg: KafkaConfig) -> dict[str, Any]:
    """``security.protocol``, ``ssl.*`` and ``sasl.*`` for confluent-kafka (secret files read now)."""
    out: dict[str, Any] = {"security.protocol": cfg.protocol.lower()}
    tls = cfg.tls
    if "SSL" in cfg.protocol:
        out["ssl.endpoint.identification.algorithm"] = "https"
        if tls is not None:
            if tls.ca_file is not None:
                out["ssl.ca.location"] = tls.ca_file
            if tls.cert_file is not None:
                out["ssl.certificate.location"] = tls.cert_file
                out["ssl.key.location"] = tls.key_file or tls.cert_file
                if (password := tls.password()) is not None:
                    out["ssl.key.password"] = password
            if tls.insecure_skip_verify:
                out["enable.ssl.certificate.verification"] = False
                out["ssl.endpoint.identification.algorithm"] = "none"
    if cfg.sasl is not None:
        out.update(
            {
                "sasl.mechanism": cfg.sasl.mechanism,
                "sasl.username": cfg.sasl.username,
                "sasl.password": cfg.sasl.secret(),
            }
        )
    return out


def aiokafka_security(cfg: KafkaConfig) -> dict[str, Any]:
    """The same for aiokafka's producer and consumers."""
    out: dict[str, Any] = {"security_protocol": cfg.protocol}
    if "SSL" in cfg.protocol:
        out["ssl_context"] = cfg.tls.context() if cfg.tls is not None else ssl.create_default_context()
    if cfg.sasl is not None:
        out.update(
            sasl_mechanism=cfg.sasl.mechanism,
            sasl_plain_username=cfg.sasl.username,
            sasl_plain_password=cfg.sasl.secret(),
        )
    return out


_REFUSALS = {
    58: ("SASL_AUTHENTICATION_FAILED", "the broker refused the SASL user name or password"),
    33: ("UNSUPPORTED_SASL_MECHANISM", "the broker does not offer this SASL mechanism"),
    34: ("ILLEGAL_SASL_STATE", "the broker broke off the SASL exchange"),
    29: ("TOPIC_AUTHORIZATION_FAILED", "the broker does not authorize this user for the topic"),
    30: ("GROUP_AUTHORIZATION_FAILED", "the broker does not authorize this user for the consumer group"),
    31: (
        "CLUSTER_AUTHORIZATION_FAILED",
        "the broker does not authorize this user for the cluster (an idempotent producer needs IDEMPOTENT_WRITE: "
        "grant it, or set idempotent: false)",
    ),
}
"""Kafka protocol error codes that refuse the gateway (aiokafka's ``errno``, librdkafka's ``code()``)."""
_AUTHENTICATION = -169
"""librdkafka's local ``_AUTHENTICATION``: its SASL failures, told apart by their text."""


def refusal(code: int, detail: str, servers: str) -> BrokerRefusal | None:
    """A Kafka error code that refuses the gateway as :class:`BrokerRefusal` (``kafka_error`` its name)."""
    if code == _AUTHENTICATION:
        low = detail.lower()
        if "mechanism" in low and ("unsupported" in low or "not supported" in low or "not enabled" in low):
            name, said = _REFUSALS[33]
        elif "authentication failed" in low or "invalid credentials" in low or "invalid username" in low:
            name, said = _REFUSALS[58]
        else:
            name, said = "_AUTHENTICATION", "the SASL login failed"
    elif code in _REFUSALS:
        name, said = _REFUSALS[code]
    else:
        return None
    return BrokerRefusal(f"{said} ({servers}: {detail})", kafka_error=name)


class BootstrapRefusals(logging.Filter):
    """What refused aiokafka's bootstrap connections: aiokafka only logs it (``Unable connect to "h:p": err``)
    and raises "Unable to bootstrap", so its log record is where the SASL refusal can be read. Kept by
    address, taken by the connector whose bootstrap failed; never stops a record."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: dict[str, BaseException] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if (
            record.msg.__class__ is str
            and record.msg.startswith("Unable connect to")
            and isinstance(args, tuple)
            and len(args) == 3
            and isinstance(args[2], BaseException)
            and getattr(args[2], "errno", None) in _REFUSALS
        ):
            if len(self.errors) > 1000:
                self.errors.clear()
            self.errors[f"{args[0]}:{args[1]}"] = args[2]
        return True

    def take(self, servers: list[str]) -> BaseException | None:
        """The refusal last logged for one of ``servers`` (``host:port``), forgotten once taken."""
        found = None
        for server in servers:
            found = self.errors.pop(server, None) or found
        return found


_bootstrap: BootstrapRefusals | None = None


def bootstrap_refusals() -> BootstrapRefusals:
    """The filter on aiokafka's client logger, installed on first use."""
    global _bootstrap
    if _bootstrap is None:
        _bootstrap = BootstrapRefusals()
        logging.getLogger("aiokafka").addFilter(_bootstrap)  # aiokafka.client logs as "aiokafka"
    return _bootstrap


def aiokafka_refusal(exc: BaseException | None, servers: list[str]) -> BrokerRefusal | None:
    """An aiokafka error that refuses the gateway (raised, or logged at bootstrap) as :class:`BrokerRefusal`."""
    cause = exc if getattr(exc, "errno", None) in _REFUSALS else bootstrap_refusals().take(servers)
    if cause is None:
        return None
    return refusal(getattr(cause, "errno", 0), str(cause), ", ".join(servers))
