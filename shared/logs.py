"""Structured logging for pgveil: one JSON object per line (default) or plain text.

Callers pass facts as keyword fields (`log.info("session.end", user=..., bytes=...)`).
This module must never be handed query text, parameter values, row data or error messages
that came from the server: those can hold personal data. Only pgveil's own words, role and
database names, addresses, counts and SQLSTATE codes belong here.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

_LOGGER = logging.getLogger("pgveil")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        return json.dumps(entry, default=str, separators=(",", ":"))


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        return f"{ts} {record.levelname.lower():7} {record.getMessage()} {extra}".rstrip()


def configure(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Log to `stream` (standard error unless given)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    _LOGGER.handlers[:] = [handler]
    _LOGGER.setLevel(level.upper())
    _LOGGER.propagate = False


class Log:
    """Thin keyword-field façade over the 'pgveil' logger."""

    def debug(self, event: str, **fields: Any) -> None:
        if _LOGGER.isEnabledFor(logging.DEBUG):
            _LOGGER.debug(event, extra={"fields": fields})

    def info(self, event: str, **fields: Any) -> None:
        _LOGGER.info(event, extra={"fields": fields})

    def warning(self, event: str, **fields: Any) -> None:
        _LOGGER.warning(event, extra={"fields": fields})

    def error(self, event: str, **fields: Any) -> None:
        _LOGGER.error(event, extra={"fields": fields})


log = Log()
