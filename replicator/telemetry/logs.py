"""Logging: one JSON object (or one readable line) per record, every line redacted.

Modules log with the standard library (``logging.getLogger(__name__)``) and attach context as
``extra={"lsn": "0/16B3748", "table": "res_partner", "rows": 1000}``; those fields become keys
of the JSON object. Every JSON line has ts, level, logger, msg and event: a stable name for
what happened, to filter and alert on (``extra={"event": ...}``, else the message as
written in the code, before %-arguments, so it never carries a value). Redaction happens
in the formatters, so no handler installed here can write a registered secret or a
conninfo password, whatever a caller passes.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from ..config.settings import LoggingSettings
from ..errors import ConfigError
from ..redact import redact
from .console import printable

__all__ = ["JsonFormatter", "TextFormatter", "setup_logging"]

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",  # 3.12+
}
_CORE_KEYS = ("ts", "level", "logger", "msg", "event")
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1  # what orjson can write as a number


def _utc_iso(created: float) -> str:
    stamp = datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRS and key not in _CORE_KEYS and not key.startswith("_")
    }


def _scrub(value: Any) -> Any:
    """A JSON-ready copy of ``value`` with every string redacted.

    Objects become their str(): orjson would otherwise serialise a dataclass field by field,
    password included, where str() goes through the class's repr (a Secret shows ***).
    """
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if _INT64_MIN <= value <= _UINT64_MAX else str(value)
    if isinstance(value, Mapping):
        return {redact(str(k)): _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v) for v in value]
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "msg": ..., "event": ..., **extra}``, one per
    line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _utc_iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
            "event": redact(str(getattr(record, "event", None) or record.msg)),
        }
        for key, value in _extras(record).items():
            entry[key] = _scrub(value)
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        return orjson.dumps(entry).decode()


class TextFormatter(logging.Formatter):
    """A readable line, extras as key=value:

    ``2026-01-14T10:00:00.123Z info    replicator.pipeline.supervisor: batch applied rows=1000``
    """

    def format(self, record: logging.LogRecord) -> str:
        message = " ".join(record.getMessage().splitlines())  # one record, one line
        parts = [_utc_iso(record.created), f"{record.levelname.lower():<7}", f"{record.name}:",
                 message]
        for key, value in _extras(record).items():
            parts.append(f"{key}={_text_value(value)}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        # Read on a terminal: names from the databases must not drive it (JSON escapes them).
        return printable(redact(line), multiline=True)


def _text_value(value: Any) -> str:
    if isinstance(value, list | tuple | set | frozenset):
        # tables=a,b rather than tables=['a', 'b']
        text = ",".join(str(v) for v in (sorted(value) if isinstance(value, set | frozenset)
                                         else value))
    else:
        text = value if isinstance(value, str) else str(value)
    # Quote only when needed, so `key=value` pairs stay greppable and unambiguous.
    if not text or any(c.isspace() or c in "\"=" for c in text):
        return orjson.dumps(text).decode()
    return text


class _StdStreamHandler(logging.StreamHandler):
    """Writes to sys.stdout / sys.stderr as they are at each write, not at setup.

    So redirections made later (pytest's capture, a test harness, contextlib.redirect_stdout)
    are honoured.
    """

    def __init__(self, stream_name: str) -> None:
        self._stream_name = stream_name  # not `_name`: logging.Handler uses that for .name
        super().__init__()

    @property
    def stream(self) -> Any:
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # StreamHandler.__init__ assigns sys.stderr; the property decides instead


_OURS = "_replicator_handler"


def _as_json(settings: LoggingSettings) -> bool:
    """format "auto": text for a person at a terminal, JSON for a container or a file."""
    if settings.format != "auto":
        return settings.format == "json"
    if settings.output not in ("stdout", "stderr"):
        return True
    stream = getattr(sys, settings.output)
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):   # a closed or odd stream
        return True


def setup_logging(settings: LoggingSettings) -> logging.Handler:
    """Send all logging (ours and libraries') to ``settings.output`` in ``settings.format``.

    Installs one handler on the root logger and sets the root level. Calling it again
    replaces the handler it installed before (other handlers are left alone), so tests and
    the CLI can call it more than once. Returns the handler.
    """
    handler: logging.Handler
    if settings.output in ("stdout", "stderr"):
        handler = _StdStreamHandler(settings.output)
    else:
        path = Path(settings.output)
        try:
            # Watched: after logrotate moves the file, the next record reopens it.
            handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"[logging] output: cannot open {path}: {exc.strerror}",
                "create the directory or fix its permissions, or use output = \"stdout\"",
            ) from None
    handler.setFormatter(JsonFormatter() if _as_json(settings) else TextFormatter())
    setattr(handler, _OURS, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(settings.level.upper())
    return handler
