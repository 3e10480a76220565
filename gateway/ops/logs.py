"""structlog set-up: JSON lines off a TTY (containers), readable console on one.

In JSON mode every line on stderr is one JSON object: the gateway's own events, what the broker
libraries log through the stdlib (``logger`` names them), and — once :func:`install_loop_handler` ran —
what Python and asyncio would otherwise print by themselves: "Task exception was never retrieved",
"Task was destroyed but it is pending!", uncaught exceptions (main thread or others), "Exception ignored
in ..." and warnings. Tracebacks become an ``exception`` field, never lines of their own.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from types import TracebackType
from typing import Any, Literal, TextIO

import structlog

from gateway.util.redact import scrub

Format = Literal["auto", "json", "console"]


_TRACEBACKS = structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))
"""A traceback as an ``exception`` field: frames without their local variables (they may hold payloads or
credentials a broker library had in hand, and make lines of many kilobytes)."""


def _log() -> Any:
    """The logger of these reports, looked up when needed (they are rare; configure() may run again)."""
    return structlog.get_logger("gateway.process")


def resolved_format(fmt: str) -> str:
    """``json`` or ``console``: what ``auto`` means for this process's stderr (handed down to worker processes)."""
    if fmt != "auto":
        return fmt
    return "json" if not sys.stderr.isatty() else "console"


def configure(level: str = "info", fmt: Format = "auto") -> None:
    """Configure structlog and the stdlib loggers of the broker libraries to write to stderr, one renderer for both."""
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    use_json = resolved_format(fmt) == "json"
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    tracebacks: list[structlog.types.Processor] = []
    if use_json:
        renderer = structlog.processors.JSONRenderer()
        tracebacks.append(_TRACEBACKS)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[*shared, *tracebacks, _scrubbed(renderer)],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line (PrintLogger writes the line and its newline apart): worker processes share the
        # supervisor's stderr, and two writes from two processes would interleave their lines.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Broker libraries and asyncio log through the stdlib: keep their warnings, in the same stream and format.
    handler = _Handler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, _strip, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tracebacks, _scrubbed(renderer)],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(numeric, logging.WARNING))


def install_loop_handler(loop: asyncio.AbstractEventLoop) -> None:
    """Log what would otherwise be printed on stderr as is, through structlog (JSON lines in JSON mode).

    On ``loop``: exceptions nobody retrieved and tasks destroyed while pending (``loop.exception``). For
    the process: uncaught exceptions in the main thread (``process.uncaught_exception``) and in other
    threads (``thread.uncaught_exception``), exceptions raised where Python can only report them, in
    ``__del__`` or a finalizer (``process.unraisable``), and warnings (through the stdlib ``py.warnings``
    logger). Call it once the loop runs, after :func:`configure`.
    """
    loop.set_exception_handler(_loop_exception)
    sys.excepthook = _uncaught
    threading.excepthook = _thread_uncaught
    sys.unraisablehook = _unraisable
    logging.captureWarnings(True)


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    fields = {
        f"context_{k}" if k in _RESERVED else k: _describe(v)
        for k, v in context.items()
        if k not in _LOOP_CONTEXT_SKIPPED
    }
    _log().error(
        "loop.exception",
        message=context.get("message") or "unhandled exception in the event loop",
        **fields,
        exc_info=exc if isinstance(exc, BaseException) else None,
    )


_LOOP_CONTEXT_SKIPPED = frozenset({"message", "exception", "source_traceback", "handle_traceback"})
"""Context keys that are logged otherwise (the exception as ``exception``) or not at all (debug-mode stacks)."""
_RESERVED = frozenset({"event", "exc_info", "level", "timestamp", "logger"})
"""Keys of a log line itself: a context key of that name (a library may add any) is logged as ``context_<key>``."""


def _uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        _log().info("process.interrupted")
        return
    _log().critical("process.uncaught_exception", exc_info=(exc_type, exc, tb))


def _thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return  # as the default hook: a thread that exits is not an error
    exc_info = (args.exc_type, args.exc_value, args.exc_traceback) if args.exc_value is not None else None
    thread = args.thread.name if args.thread is not None else None
    _log().error("thread.uncaught_exception", thread=thread, exc_info=exc_info)


def _unraisable(unraisable: Any) -> None:
    exc = unraisable.exc_value
    _log().error(
        "process.unraisable",
        message=unraisable.err_msg or "Exception ignored in",
        object=_describe(unraisable.object) if unraisable.object is not None else None,
        exc_info=(unraisable.exc_type, exc, unraisable.exc_traceback) if exc is not None else None,
    )


def _strip(logger: Any, method: str, event: Any) -> Any:
    """A stdlib message without the newline some end with (``warnings`` does)."""
    message = event.get("event")
    if isinstance(message, str):
        event["event"] = message.strip()
    return event


def _describe(value: Any) -> Any:
    """A context value as a JSON-safe field: plain values as they are, objects by their repr."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    try:
        return repr(value)
    except Exception:  # a broken __repr__ must not lose the report
        return f"<{type(value).__name__} (repr failed)>"


def _scrubbed(renderer: structlog.types.Processor) -> structlog.types.Processor:
    """The renderer, then every registered secret masked in the rendered line (tracebacks included)."""

    def render(logger: Any, method: str, event: Any) -> Any:
        out = renderer(logger, method, event)
        return scrub(out) if isinstance(out, str) else out

    return render


class _Handler(logging.StreamHandler[TextIO]):
    """The stdlib handler :func:`configure` installs (a second call replaces it, keeping any other)."""
