"""The request log behind GET /_emulator/requests, with secrets hashed.

A header (or query parameter) is treated as secret when its name is `authorization`,
`x-api-key` or `cookie`, or contains "key", "token", "auth", "secret" or "cookie",
or when its value contains the configured upstream key. Its value is replaced by
"sha256:" + sha256(value).hexdigest() (of the whole value, e.g. "Bearer <key>"), so
tests can check which credential arrived without the credential ever being shown.

Each record also keeps the raw body (base64, when at most `MAX_BODY_B64` bytes and
free of the upstream key), its sha256, the `x-request-id` header (redacted by the
same rule) and, once it has been sent, the usage reported to the client.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

MAX_RECORDS = 1000
# Bodies up to this size are kept (base64) in the record; larger ones only hashed.
MAX_BODY_B64 = 64 * 1024
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
        request_id: str | None = None,
    ) -> dict[str, Any]:
        if request_id is not None and is_secret("x-request-id", request_id, api_key):
            request_id = digest(request_id)
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
            "body_b64": _body_b64(body, api_key),
            "request_id": request_id,
            "model": None,
            "stream": None,
            "status": None,
            "code": None,
            "outcome": "in_progress",
            "usage": None,
        }
        self._records.append(record)
        return record

    def note_body(self, record: dict[str, Any], body: Mapping[str, Any]) -> None:
        model = body.get("model")
        record["model"] = model if isinstance(model, str) else None
        record["stream"] = body.get("stream") is True

    @staticmethod
    def note_usage(record: dict[str, Any], usage: Mapping[str, int] | None) -> None:
        """The usage reported to the client ({"input", "output", "cache_read",
        "cache_write"}), or None to take back a report that was not delivered."""
        record["usage"] = dict(usage) if usage is not None else None

    def all(self) -> list[dict[str, Any]]:
        return list(self._records)

    def clear(self) -> None:
        self._records.clear()


def _body_b64(body: bytes, api_key: str) -> str | None:
    """The raw body, base64-encoded; None when too large or when it contains the
    upstream key (records never show the key, encoded or not)."""
    if len(body) > MAX_BODY_B64:
        return None
    if api_key and api_key.encode("utf-8") in body:
        return None
    return base64.b64encode(body).decode("ascii")
