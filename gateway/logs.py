"""structlog set-up: JSON lines off a TTY (containers), readable console on one."""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import structlog

from gateway.redact import scrub

Format = Literal["auto", "json", "console"]


def configure(level: str = "info", fmt: Format = "auto") -> None:
    """Configure structlog and the stdlib loggers of the broker libraries to write to stderr."""
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if use_json:
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.dict_tracebacks)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[*shared, _scrubbed(renderer)],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Broker libraries log through the stdlib; keep their warnings, in the same stream.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ScrubbingFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[handler])


def _scrubbed(renderer: structlog.types.Processor) -> structlog.types.Processor:
    """The renderer, then every registered secret masked in the rendered line (tracebacks included)."""

    def render(logger: Any, method: str, event: Any) -> Any:
        out = renderer(logger, method, event)
        return scrub(out) if isinstance(out, str) else out

    return render


class _ScrubbingFormatter(logging.Formatter):
    """Masks registered secrets in what the broker libraries log through the stdlib."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))
