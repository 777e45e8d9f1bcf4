"""Structured JSON logging, with every known secret redacted as a last line of defence."""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Iterable, Mapping

import orjson

# LogRecord attributes that are not user-supplied `extra` fields.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

SecretSource = Callable[[], Iterable[str]]


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str, secrets: SecretSource) -> None:
        super().__init__()
        self.component = component
        self.secrets = secrets
        self._second = -1
        self._second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        fields = {name: value for name, value in vars(record).items()
                  if name not in _STANDARD and not name.startswith("_")}
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return self.line(record.created, record.levelname.lower(), record.name,
                         record.getMessage(), fields)

    def line(self, created: float, level: str, logger: str, message: str,
             fields: Mapping[str, object]) -> str:
        doc: dict[str, object] = {"time": self._timestamp(created), "level": level,
                                  "component": self.component, "logger": logger,
                                  "message": message}
        doc.update(fields)
        # orjson: one "Token usage" line per request is on every request's path.
        return redact(orjson.dumps(doc, default=str).decode(), self.secrets())

    def _timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # strftime once a second, not once a line
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((created - second) * 1000):03d}Z"


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 8 and secret in text:
            text = text.replace(secret, "[REDACTED]")
    return text


# The handler `setup` installed: `info_line` writes through it directly.
_handler: logging.StreamHandler | None = None  # type: ignore[type-arg]


def info_line(logger: logging.Logger, message: str, fields: Mapping[str, object]) -> None:
    """`logger.info(message, extra=fields)` as the same JSON line, without the logging machinery
    (caller lookup, a LogRecord, filters): once per request, it cost more than the line itself.
    Elsewhere (tests, another handler set up) it is exactly `logger.info`."""
    handler = _handler
    if not logger.isEnabledFor(logging.INFO):
        return
    if handler is None or logging.getLogger().handlers != [handler] or logger.handlers:
        logger.info(message, extra=dict(fields))
        return
    formatter = handler.formatter
    assert isinstance(formatter, JsonFormatter)
    text = formatter.line(time.time(), "info", logger.name, message, fields)
    with handler.lock:  # type: ignore[union-attr]
        handler.stream.write(text + "\n")
        handler.flush()


def setup(component: str, level: str, secrets: SecretSource = lambda: ()) -> None:
    global _handler
    handler = _handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component, secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log would duplicate Envoy's, and grpc's are noise at INFO.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
