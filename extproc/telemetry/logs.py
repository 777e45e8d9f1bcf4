"""Structured JSON logging, with every known secret redacted as a last line of defence."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
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
        return self.line_bytes(created, level, logger, message, fields).decode()

    def line_bytes(self, created: float, level: str, logger: str, message: str,
                   fields: Mapping[str, object]) -> bytes:
        doc: dict[str, object] = {"time": self._timestamp(created), "level": level,
                                  "component": self.component, "logger": logger,
                                  "message": message}
        doc.update(fields)
        # orjson: one "Token usage" line per request is on every request's path.
        return redact_bytes(orjson.dumps(doc, default=str), self.secrets())

    def _timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # strftime once a second, not once a line
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((created - second) * 1000):03d}Z"


def redact_bytes(data: bytes, secrets: Iterable[str]) -> bytes:
    """Every known secret (8 characters or more) in a line's UTF-8 replaced: the last line of
    defence, should a value ever carry one."""
    for secret in secrets:
        if secret and len(secret) >= 8:
            encoded = secret.encode()
            if encoded in data:
                data = data.replace(encoded, b"[REDACTED]")
    return data


class _LineHandler(logging.StreamHandler):
    """The process's handler: before any line of its own, the usage lines still waiting for
    the end of their event-loop turn go out, so the log keeps the order things happened in."""

    def emit(self, record: logging.LogRecord) -> None:
        flush_lines()
        super().emit(record)


# The handler `setup` installed: `info_line` writes through it directly.
_handler: _LineHandler | None = None
# Usage lines of the current event-loop turn, written together when it ends: one `write` for
# every request that finished in the turn (a system call per line cost as much as the line).
_waiting: list[bytes] = []
_flush_on: asyncio.AbstractEventLoop | None = None  # the loop whose turn's end writes them


def info_line(logger: logging.Logger, message: str, fields: Mapping[str, object]) -> None:
    """`logger.info(message, extra=fields)` as the same JSON line, without the logging machinery
    (caller lookup, a LogRecord, filters): once per request, it cost more than the line itself.
    On an event loop the line is written at the end of the loop's turn, with the turn's other
    usage lines; elsewhere at once. With another handler set up (tests) it is `logger.info`."""
    handler = _handler
    if not logger.isEnabledFor(logging.INFO):
        return
    if handler is None or logging.getLogger().handlers != [handler] or logger.handlers:
        logger.info(message, extra=dict(fields))
        return
    formatter = handler.formatter
    assert isinstance(formatter, JsonFormatter)
    data = formatter.line_bytes(time.time(), "info", logger.name, message, fields) + b"\n"
    _waiting.append(data)
    global _flush_on
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no event loop in this thread: nothing to wait for
        flush_lines()
        return
    if _flush_on is not loop:  # the turn's first line (or lines a stopped loop left behind)
        _flush_on = loop
        loop.call_soon(flush_lines)


def flush_lines() -> None:
    """Write the usage lines waiting for the end of their loop turn (also at exit)."""
    global _flush_on
    _flush_on = None
    handler = _handler
    if not _waiting or handler is None:
        return
    data = _waiting[0] if len(_waiting) == 1 else b"".join(_waiting)
    _waiting.clear()
    with handler.lock:  # type: ignore[union-attr]  # Handler.__init__ always makes it
        _write(handler, data)


def _write(handler: logging.StreamHandler, data: bytes) -> None:
    """One `write` to the stream's file descriptor: the handler flushes after every line it
    writes, so nothing of its own waits in the stream's buffer to be overtaken. A stream without
    one (a test's capture) takes the text."""
    try:
        fd = handler.stream.fileno()
    except (AttributeError, OSError, ValueError):
        handler.stream.write(data.decode())
        handler.flush()
        return
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def setup(component: str, level: str, secrets: SecretSource = lambda: ()) -> None:
    global _handler
    flush_lines()  # to the handler they were meant for
    handler = _handler = _LineHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component, secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log would duplicate Envoy's, and grpc's are noise at INFO.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


atexit.register(flush_lines)  # a loop that stopped before its turn ended leaves lines behind
