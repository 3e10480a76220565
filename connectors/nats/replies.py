"""Request/reply on NATS: reply subjects, and the NATS service convention for errors.

A requester's reply subject travels with its request; the gateway forwards the request to responders
with the reply subject ``<reply_to>.<id>`` and reads the answers on ``<reply_to>.*``. A request nobody
listens to comes back as a status message (header ``Status: 503``, no payload).
"""

from __future__ import annotations

import re
from typing import Any

from gateway.config.plugin import Replies, ReplyError, SourceSpec, TargetSpec

ERROR_CODE = "Nats-Service-Error-Code"
ERROR_TEXT = "Nats-Service-Error"
"""The headers of an error reply (the NATS micro-service convention)."""
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text) or "_"


class NatsReplies(Replies):
    publishes_reply = True

    def check_requester(self, connector: Any, source: SourceSpec) -> None:
        if getattr(source, "stream", None) is not None or getattr(source, "kv", None) is not None:
            raise ReplyError("request/reply needs a core NATS source (without stream or kv)")

    def reply_target(self, connector: str, config: Any) -> dict[str, Any]:
        return {"connector": connector, "subject": "gateway.reply"}  # the envelope's reply subject wins

    def error_headers(self, code: int, text: str) -> list[tuple[str, str]]:
        return [(ERROR_CODE, str(code)), (ERROR_TEXT, text)]

    def mode(self, connector: Any, target: TargetSpec, correlation: str | None) -> str:
        if getattr(target, "jetstream", False) or getattr(target, "kv", None):
            raise ReplyError("request/reply needs a core NATS target (jetstream/kv publishes are not requests)")
        if correlation is not None:
            raise ReplyError("applies to MQTT targets only", "correlation")
        return "subject"

    def default_reply_to(self, gateway_id: str, route: str) -> str:
        return f"_INBOX.{_safe(gateway_id)}.{_safe(route)}"

    def answer_source(self, connector: str, reply_to: str, mode: str) -> dict[str, Any]:
        return {"connector": connector, "subject": f"{reply_to}.*"}

    def forward(self, reply_to: str, mode: str, token: str) -> tuple[str | None, str | None]:
        return f"{reply_to}.{token}", None

    def answer(
        self, topic: str, correlation: bytes | None, payload: bytes, headers: Any, mode: str
    ) -> tuple[bytes, tuple[int, str] | None]:
        key = topic.rpartition(".")[2].encode()
        if not payload and headers and (status := dict(headers).get("Status")):
            if status == "503":
                return key, (503, "no responder on the subject")
            return key, (502, f"NATS status {status}")
        return key, None
