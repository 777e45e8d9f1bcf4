"""The request log behind GET /_emulator/requests, with secrets hashed.

A header (or query parameter) is treated as secret when its name is `authorization`,
`x-api-key` or `cookie`, or contains "key", "token", "auth", "secret" or "cookie",
or when its value contains the configured upstream key. Its value is replaced by
"sha256:" + sha256(value).hexdigest() (of the whole value, e.g. "Bearer <key>"), so
tests can check which credential arrived without the credential ever being shown.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import deque
from typing import Any, Iterable, Mapping
from urllib.parse import parse_qsl, urlencode

MAX_RECORDS = 1000
_SECRET_NAMES = frozenset({"authorization", "proxy-authorization", "x-api-key", "cookie"})
_SECRET_PARTS = ("key", "token", "auth", "secret", "cookie")


def digest(value: str) -> str:
    return "sha256:" + hashlib.sha256(value.encode("utf-8")).hexdigest()


def is_secret(name: str, value: str, api_key: str) -> bool:
    lowered = name.lower()
    if lowered in _SECRET_NAMES or any(part in lowered for part in _SECRET_PARTS):
        return True
    return bool(api_key) and api_key in value


def redact_pairs(pairs: Iterable[tuple[str, str]], api_key: str) -> list[list[str]]:
    """[name, value] pairs in arrival order, secret values hashed."""
    return [
        [name, digest(value) if is_secret(name, value, api_key) else value]
        for name, value in pairs
    ]


def redact_headers(headers: Iterable[tuple[str, str]], api_key: str) -> dict[str, str]:
    """Lower-cased name -> value (repeats joined by ", "), secret values hashed."""
    merged: dict[str, str] = {}
    for name, value in redact_pairs(headers, api_key):
        key = name.lower()
        merged[key] = f"{merged[key]}, {value}" if key in merged else value
    return merged


def redact_path(path: str, api_key: str) -> str:
    return path.replace(api_key, "<redacted>") if api_key else path


def redact_query(query: str, api_key: str) -> str:
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode([(name, value) for name, value in redact_pairs(pairs, api_key)])


class RequestLog:
    """Bounded ring buffer of request records (dicts, updated as requests progress)."""

    def __init__(self, limit: int = MAX_RECORDS) -> None:
        self._records: deque[dict[str, Any]] = deque(maxlen=limit)
        self._ids = itertools.count(1)

    def start(
        self,
        *,
        method: str,
        path: str,
        query: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        api_format: str,
        api_key: str,
        wall: float,
    ) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": next(self._ids),
            "time": wall,
            "method": method,
            "path": redact_path(path, api_key),
            "query": redact_query(query, api_key),
            "format": api_format,
            "headers": redact_headers(headers, api_key),
            "body_size": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "model": None,
            "stream": None,
            "status": None,
            "code": None,
            "outcome": "in_progress",
        }
        self._records.append(record)
        return record

    def note_body(self, record: dict[str, Any], body: Mapping[str, Any]) -> None:
        model = body.get("model")
        record["model"] = model if isinstance(model, str) else None
        record["stream"] = body.get("stream") is True

    def all(self) -> list[dict[str, Any]]:
        return list(self._records)

    def clear(self) -> None:
        self._records.clear()
