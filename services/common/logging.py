"""One log format for every service: readable text by default, JSON lines for shippers."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

# Bearer tokens and API keys never reach a log line.
_SECRET = re.compile(
    r"(?i)\b(bearer\s+|(?:api[_-]?key|authorization|password|token)[\"']?\s*[=:]\s*[\"']?(?:bearer\s+)?)"
    r"([^\s\"',;]{4,})"
)


def redact(text: str) -> str:
    return _SECRET.sub(lambda m: m.group(1) + "[REDACTED]", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and exception text if any."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)-7s {service} %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure_logging(service: str, level: str = "INFO", fmt: str = "text") -> None:
    """Replaces the root logger's handlers with one stderr handler in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and httpx are chatty at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)
