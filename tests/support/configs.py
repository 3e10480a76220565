"""Gateway configs for tests, as plain mappings (what ``yaml.safe_dump`` writes for ``gateway run``).

Connector entries with short timeouts (a failing test fails fast) and a gateway section with quick
reconnects and the monitoring endpoint on a free port (``GatewayProcess.http_url`` finds it).
"""

from __future__ import annotations

from typing import Any


def mqtt_connector(url: str, client_id: str, **extra: Any) -> dict[str, Any]:
    """An MQTT connector with a fixed client id (persistent session) and a short connect timeout."""
    return {"type": "mqtt", "url": url, "client_id": client_id, "connect_timeout": 3, **extra}


def nats_connector(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "nats", "servers": [url], **extra}


def kafka_connector(bootstrap: str, **extra: Any) -> dict[str, Any]:
    """Tansu: no producer ids (``idempotent: false``); group join takes ~half the session timeout."""
    return {
        "type": "kafka",
        "bootstrap_servers": [bootstrap],
        "idempotent": False,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000,
        **extra,
    }


def gateway_config(gateway_id: str, connectors: dict[str, Any], routes: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "gateway": {
            "id": gateway_id,
            "shutdown_timeout": 15,
            "reconnect": {"initial": 0.1, "max": 2.0},
            "http": {"listen": "127.0.0.1:0"},  # a free port: see GatewayProcess.http_url
        },
        "connectors": connectors,
        "routes": routes,
    }


def mqtt_to_nats(gateway_id: str, mqtt_url: str, nats_url: str, topic: str, subject: str) -> dict[str, Any]:
    """A gateway with one MQTT QoS 1 → core NATS route named ``flow`` (connectors ``mq`` and ``bus``)."""
    return gateway_config(
        gateway_id,
        {"mq": mqtt_connector(mqtt_url, gateway_id), "bus": nats_connector(nats_url)},
        [
            {
                "name": "flow",
                "from": {"connector": "mq", "topic": topic, "qos": 1},
                "to": {"connector": "bus", "subject": subject},
            }
        ],
    )
