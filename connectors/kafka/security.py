"""TLS and SASL settings of a Kafka connector, in each client library's terms."""

from __future__ import annotations

import ssl
from typing import Any

from connectors.kafka.config import KafkaConfig


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
