"""Structured JSON logging, with every known secret redacted as a last line of defence."""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Iterable

import orjson

# LogRecord attributes that are not user-supplied `extra` fields.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

SecretSource = Callable[[], Iterable[str]]


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str, secrets: SecretSource) -> None:
        super().__init__()
        self.component = component
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                doc[name] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        # orjson: one "Token usage" line per request is on every request's path.
        return redact(orjson.dumps(doc, default=str).decode(), self.secrets())


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 8 and secret in text:
            text = text.replace(secret, "[REDACTED]")
    return text


def setup(component: str, level: str, secrets: SecretSource = lambda: ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component, secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log would duplicate Envoy's, and grpc's are noise at INFO.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
