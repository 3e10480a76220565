"""Request/reply on MQTT: MQTT 5 response topics and correlation data, or the 3.1.1 topic convention.

- MQTT 5 responder (``correlation: properties``): the request carries Response Topic ``<reply_to>`` and
  Correlation Data ``<id>``; the device answers on the response topic with the correlation data;
- MQTT 3.1.1 responder (``correlation: topic``): the request goes to ``<topic>/<id>`` and the device
  answers on ``<reply_to>/<id>``.

Error replies carry the NATS service convention's names as MQTT 5 user properties, so one client
library reads errors from both protocols.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.config.plugin import Replies, ReplyError, SourceSpec, TargetSpec

ERROR_CODE = "Nats-Service-Error-Code"
ERROR_TEXT = "Nats-Service-Error"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text) or "_"


class MqttReplies(Replies):
    def check_requester(self, connector: Any, source: SourceSpec) -> None:
        if getattr(connector, "version", 5) != 5:
            raise ReplyError(
                f"MQTT requests carry their response topic in MQTT 5 properties; connector "
                f"{source.connector!r} speaks 3.1.1"
            )

    def reply_target(self, connector: str, config: Any) -> dict[str, Any]:
        return {"connector": connector, "topic": "gateway/reply", "qos": config.reply_qos}

    def error_headers(self, code: int, text: str) -> list[tuple[str, str]]:
        return [(ERROR_CODE, str(code)), (ERROR_TEXT, text)]

    def mode(self, connector: Any, target: TargetSpec, correlation: str | None) -> str:
        mqtt5 = getattr(connector, "version", 5) == 5
        mode = correlation or ("properties" if mqtt5 else "topic")
        if mode == "properties" and not mqtt5:
            raise ReplyError(
                f"properties needs MQTT 5; connector {target.connector!r} speaks 3.1.1 (use correlation: topic)",
                "correlation",
            )
        return mode

    def default_reply_to(self, gateway_id: str, route: str) -> str:
        return f"gateway/{_safe(gateway_id)}/replies/{_safe(route)}"

    def answer_source(self, connector: str, reply_to: str, mode: str) -> dict[str, Any]:
        return {"connector": connector, "topic": f"{reply_to}/+" if mode == "topic" else reply_to, "qos": 1}

    def forward(self, reply_to: str, mode: str, token: str) -> tuple[str | None, str | None]:
        if mode == "properties":
            return reply_to, None
        return None, f"/{token}"  # MQTT 3.1.1: the id is the last level of the request topic

    def answer(
        self, topic: str, correlation: bytes | None, payload: bytes, headers: Any, mode: str
    ) -> tuple[bytes, tuple[int, str] | None]:
        if mode == "properties":
            return correlation or b"", None
        return topic.rpartition("/")[2].encode(), None
