"""structlog set-up: JSON lines under systemd/journald, readable text on a terminal.

Every line carries the device id and the running model's version: they are kept in a
process-wide dict (not contextvars, which new threads would not inherit).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

_GLOBAL_FIELDS: dict[str, Any] = {}
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def bind_global(**fields: Any) -> None:
    """Fields added to every log line from now on (device_id, model_version, ...)."""
    _GLOBAL_FIELDS.update(fields)


def _add_global_fields(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in _GLOBAL_FIELDS.items():
        event.setdefault(key, value)
    return event


# syslog priorities by level: journald reads a "<N>" prefix on each line of a stream it
# collects (SyslogLevelPrefix=, on by default), so `journalctl -p err` finds our errors.
_PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "info": 6, "debug": 7}


def is_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream systemd connected (``$JOURNAL_STREAM``)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def _with_priority(render: Any) -> Any:
    def prefixed(logger: Any, method: str, event: dict[str, Any]) -> str:
        level = str(event.get("level", method))
        return f"<{_PRIORITY.get(level, 6)}>{render(logger, method, event)}"

    return prefixed


def wants_json(fmt: str, stream: TextIO) -> bool:
    if fmt != "auto":
        return fmt == "json"
    if os.environ.get("JOURNAL_STREAM"):
        return True
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """(Re)configure logging; logs go to stderr so stdout stays free for results."""
    out = stream or sys.stderr
    as_json = wants_json(fmt, out)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _add_global_fields,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if as_json:
        render = structlog.processors.JSONRenderer(sort_keys=False)
        processors += [
            structlog.processors.format_exc_info,
            _with_priority(render) if is_journal(out) else render,
        ]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=out.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
