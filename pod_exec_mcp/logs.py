"""One log format for everything the server logs: ours, uvicorn's and fastmcp's.

Every logger stays a plain stdlib logger; one handler on the root logger renders every
record through structlog's ProcessorFormatter, as JSON (one object per line) or as text
(one line per event, `key=value` fields after the message). Extra fields given with
`logger.info(..., extra={...})` become fields of the event (that is how the audit trail
carries its data). uvicorn and fastmcp install handlers of their own (fastmcp a Rich
console handler that wraps at 80 columns); they are removed, and their records propagate
to the root handler like everyone else's.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

LogFormat = Literal["text", "json"]

# Loggers that libraries configure with handlers of their own; we take those away.
_LIBRARY_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "fastmcp", "mcp")

# The MCP SDK logs raw Mcp-Session-Id values at info; on a server without auth such an id
# is all it takes to drive that session's sandbox. Shown at debug level only.
_SESSION_ID_LOGGERS = ("mcp.server.streamable_http", "mcp.server.streamable_http_manager")

# Extra record attributes that only make sense to a colour terminal.
_DROPPED = ("color_message",)

# The fields every event starts with, in this order; the rest follow as they come.
_FIRST = ("time", "level", "logger", "event")

_configured: LogFormat | None = None

# Every field of an event is cut to a fixed length (both formats), whoever filled it in: a
# sandbox's host name, a client's path, a rule list, an exception's text. So one event is a
# line of bounded size, whatever a sandbox or client sends.
MAX_MESSAGE_CHARS = 4096
MAX_FIELD_CHARS = 4096
MAX_EXCEPTION_CHARS = 16384

# C0 controls, DEL and C1 controls: what a terminal acts on (ESC starts CSI and OSC
# sequences, 0x9b is an 8-bit CSI). In text lines they are written as escapes.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def resolve_format(fmt: str, stream: TextIO) -> LogFormat:
    """`auto` is text on a terminal (a person reads it) and JSON otherwise (a collector)."""
    if fmt == "auto":
        return "text" if stream.isatty() else "json"
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}")
    return fmt  # type: ignore[return-value]


def _record_time(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """The record's own creation time (not the time it was formatted), UTC, ISO 8601."""
    record = event.get("_record")
    created = record.created if record is not None else dt.datetime.now(dt.UTC).timestamp()
    stamp = dt.datetime.fromtimestamp(created, dt.UTC)
    event["time"] = stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return event


def _uvicorn_access_fields(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """uvicorn's access line, as fields: its args are (client, method, path, version, status)."""
    record = event.get("_record")
    args = event.pop("positional_args", None)
    is_access = record is not None and record.name == "uvicorn.access"
    if is_access and isinstance(args, tuple) and len(args) == 5:
        client, method, path, _version, status = args
        event.update(client=client, method=method, path=path, status=status)
    for name in _DROPPED:
        event.pop(name, None)
    return event


def _ordered(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    first = {key: event.pop(key) for key in _FIRST if key in event}
    return {**first, **event}


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [cut: {len(text)} characters]"


def _bounded(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Every field cut to its fixed length (MAX_*_CHARS); a field that is not a plain
    value (a list, an object) is cut as its text."""
    for key, value in event.items():
        limit = MAX_MESSAGE_CHARS if key == "event" else MAX_FIELD_CHARS
        if key in ("exception", "stack"):
            limit = MAX_EXCEPTION_CHARS
        if isinstance(value, str):
            event[key] = _cut(value, limit)
        elif not isinstance(value, (int, float, bool, type(None))):
            text = json.dumps(value, ensure_ascii=False, default=str)
            if len(text) > limit:
                event[key] = _cut(text, limit)
    return event


def _escape(text: str) -> str:
    """`text` with every control character (C0, DEL, C1) written as an escape."""
    return _CONTROL.sub(lambda m: _NAMED.get(m[0]) or f"\\x{ord(m[0]):02x}", text)


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and not any(c in value for c in ' "=\\'):
        return _escape(value)
    # JSON escapes C0 controls; DEL and C1 it leaves as they are.
    return _escape(json.dumps(value, ensure_ascii=False, default=str))


def _render_text(_: WrappedLogger, __: str, event: EventDict) -> str:
    """`TIME LEVEL LOGGER: MESSAGE key=value ...` on exactly one line (tracebacks included:
    their newlines are escaped inside a quoted field), with no control character: a
    terminal tailing the log shows them as escapes (`\\x1b`) and acts on none."""
    time = event.pop("time", "")
    level = str(event.pop("level", "")).upper()
    logger = _escape(str(event.pop("logger", "")))
    message = _escape(str(event.pop("event", "")))
    fields = " ".join(f"{_escape(str(key))}={_text_value(value)}" for key, value in event.items())
    return f"{time} {level:<7} {logger}: {message}" + (f" {fields}" if fields else "")


def _formatter(fmt: LogFormat) -> logging.Formatter:
    pre_chain: list[Any] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        _uvicorn_access_fields,
        _record_time,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(ensure_ascii=False, default=str)
        if fmt == "json"
        else _render_text
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        pass_foreign_args=True,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _bounded,
            _ordered,
            renderer,
        ],
    )


def configure_logging(
    fmt: str = "auto", level: str = "info", stream: TextIO | None = None
) -> LogFormat:
    """Route every logger of the process through one handler and one format; returns the
    format chosen (auto resolved). Safe to call again (it replaces what it set before)."""
    global _configured
    # Imported first: importing fastmcp installs its own handlers, which we then remove.
    import fastmcp  # noqa: F401

    stream = stream or sys.stderr
    chosen = resolve_format(fmt, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_formatter(chosen))
    handler.setLevel(level.upper())
    handler.addFilter(_AgentMistakes(handler.level))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        for old in library.handlers[:]:
            library.removeHandler(old)
        library.propagate = True
        library.setLevel(logging.NOTSET)
    for name in _SESSION_ID_LOGGERS:
        quiet = logging.DEBUG if level.lower() == "debug" else logging.WARNING
        logging.getLogger(name).setLevel(quiet)
    _quiet_fastmcp()
    _configured = chosen
    return chosen


class _AgentMistakes(logging.Filter):
    """An agent's own mistake (bad arguments) is info, not a warning: fastmcp logs it as
    one, and the audit trail already records it (issue 25: every agent mistake was logged
    at ERROR or WARNING). Our own tool errors carry their level (server._agent_errors)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("fastmcp") and str(record.msg).startswith(
            "Invalid arguments for tool"
        ):
            record.levelno, record.levelname = logging.INFO, "INFO"
            return record.levelno >= self.level
        return True


def _quiet_fastmcp() -> None:
    """fastmcp re-installs its Rich handlers whenever it reconfigures its logger (e.g. in
    `temporary_log_level`), unless its `log_enabled` setting is off."""
    import fastmcp

    try:
        fastmcp.settings.log_enabled = False
    except Exception:  # a frozen settings object in some future release: nothing to undo
        logging.getLogger(__name__).debug("could not turn fastmcp's own logging off")


def fatal(message: str) -> None:
    """A start-up failure, on one line: plain `pod_exec_mcp: error: ...` on a terminal or
    before logging is set up, a JSON event when the logs are JSON."""
    if _configured == "json":
        logging.getLogger("pod_exec_mcp").critical(message)
    else:
        print(f"pod_exec_mcp: error: {message}", file=sys.stderr)
