"""Logging in a worker: gunicorn starts workers in a fresh interpreter that never configured
logging, so without this only warnings reached stderr (Python's last-resort handler) and the
``apirouter.audit`` lines the README promises were never written.

Every ``apirouter.*`` line is one JSON object on stderr: ts, level, logger, pid, and either the
event's own fields (audit events are logged as a JSON object) or ``message``. Callers never
log a key, a token or a prompt; this formatter adds nothing from the request.
"""

from __future__ import annotations

import logging
import os
import sys

import orjson

from apirouter.config import LOG_LEVEL_ENV


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
        }
        event = None
        if message.startswith("{"):
            try:
                event = orjson.loads(message)
            except orjson.JSONDecodeError:
                event = None
        if isinstance(event, dict):
            line.update(event)
        else:
            line["message"] = message
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def configure(level: str | None = None) -> None:
    """Route the ``apirouter`` loggers of this worker to stderr as JSON lines."""
    logger = logging.getLogger("apirouter")
    if any(isinstance(h.formatter, JsonLines) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    logger.addHandler(handler)
    logger.setLevel((level or os.environ.get(LOG_LEVEL_ENV) or "info").upper())
    logger.propagate = False
