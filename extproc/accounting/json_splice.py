"""Change one member of a JSON object in its raw bytes, leaving every other byte as sent.

Re-serialising a client's body would alter it (big integers lose precision, escapes and spacing
change, very deep nesting fails to encode), so the gateway splices instead: it finds the member's
value by scanning the bytes (strings skipped whole, nesting counted) and replaces or inserts only
that. The scan is linear in the body's size. Input is assumed to be valid JSON (the caller parsed
it already); `ValueError` if it is not an object.
"""

from __future__ import annotations

import json
import re

_WS = re.compile(rb"[ \t\r\n]*")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_SCALAR = re.compile(rb"[^,}\]\s]+")
_STRUCTURE = re.compile(rb'["{}\[\]]')


def _skip_ws(body: bytes, i: int) -> int:
    return _WS.match(body, i).end()  # type: ignore[union-attr]


def _string_end(body: bytes, i: int) -> int:
    match = _STRING.match(body, i)
    if match is None:
        raise ValueError(f"unterminated string at byte {i}")
    return match.end()


def _value_end(body: bytes, i: int) -> int:
    """The index just past the JSON value starting at `i`."""
    first = body[i:i + 1]
    if first == b'"':
        return _string_end(body, i)
    if first not in (b"{", b"["):
        match = _SCALAR.match(body, i)
        if match is None:
            raise ValueError(f"no value at byte {i}")
        return match.end()
    depth = 0
    while True:
        match = _STRUCTURE.search(body, i)
        if match is None:
            raise ValueError("unbalanced brackets")
        i = match.start()
        char = body[i:i + 1]
        if char == b'"':
            i = _string_end(body, i)
            continue
        depth += 1 if char in (b"{", b"[") else -1
        i += 1
        if depth == 0:
            return i


def _member(body: bytes, start: int, key: str) -> tuple[int, int] | None:
    """The (start, end) of the value of the last member named `key` in the object at `start`
    (JSON parsers keep the last of duplicate keys), or None."""
    found = None
    i = _skip_ws(body, start + 1)
    if body[i:i + 1] == b"}":
        return None
    while True:
        key_end = _string_end(body, i)
        name = json.loads(body[i:key_end])
        i = _skip_ws(body, key_end)
        if body[i:i + 1] != b":":
            raise ValueError(f"expected ':' at byte {i}")
        value_start = _skip_ws(body, i + 1)
        value_end = _value_end(body, value_start)
        if name == key:
            found = (value_start, value_end)
        i = _skip_ws(body, value_end)
        if body[i:i + 1] == b"}":
            return found
        if body[i:i + 1] != b",":
            raise ValueError(f"expected ',' or '}}' at byte {i}")
        i = _skip_ws(body, i + 1)


def _insert_first(body: bytes, start: int, member: bytes) -> bytes:
    """`member` ("key":value) as the first member of the object at `start`."""
    rest = _skip_ws(body, start + 1)
    sep = b"" if body[rest:rest + 1] == b"}" else b","
    return body[:start + 1] + member + sep + body[start + 1:]


def set_member(body: bytes, path: tuple[str, ...], value: bytes) -> bytes:
    """`body` with the member at `path` (keys from the top-level object down) set to the raw JSON
    `value`; objects missing on the way are created, a non-object on the way is replaced."""
    start = _skip_ws(body, 0)
    if body[start:start + 1] != b"{":
        raise ValueError("the body is not a JSON object")
    for depth, key in enumerate(path):
        span = _member(body, start, key)
        rest = path[depth + 1:]
        nested = value
        for inner in reversed(rest):
            nested = b"{" + json.dumps(inner).encode() + b":" + nested + b"}"
        if span is None:
            return _insert_first(body, start, json.dumps(key).encode() + b":" + nested)
        value_start, value_end = span
        if not rest or body[value_start:value_start + 1] != b"{":
            return body[:value_start] + nested + body[value_end:]
        start = value_start
    raise ValueError("empty path")
