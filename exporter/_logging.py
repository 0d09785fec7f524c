"""Structured logging: one line per record, the message plus its ``extra`` key/values."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            fields[key] = value
    if record.exc_info:
        fields["exc"] = logging.Formatter().formatException(record.exc_info)
    return fields


# Quoted: separators, and every control character (C0, DEL, C1), so that a value that
# came from the network (a path, a header) cannot forge a line or move a terminal's cursor.
_NEEDS_QUOTES = re.compile(r'[\s"=\x00-\x1f\x7f-\x9f]')


def _logfmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return json.dumps(text).replace("\x7f", "\\u007f")


class LogfmtFormatter(logging.Formatter):
    """``key=value`` lines, readable by people and by Loki/Vector parsers."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one logfmt line."""
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one JSON line."""
        return json.dumps(_fields(record), default=str)


def configure_logging(level: str, fmt: str) -> None:
    """Send the exporter's logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
