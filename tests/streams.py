"""Recorded-style SSE streams for tests, built with the emulator's own event builders, with the
variations real servers produce (line endings, comments, multi-line data, non-ASCII text)."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from extproc.emulator import anthropic_sse, openai_sse
from extproc.emulator.reply import Reply

TEXTS = st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)),
                         min_size=1, max_size=12), min_size=1, max_size=8)


def reply(deltas: list[str], input_tokens: int = 1234, cache_read: int = 56, cache_write: int = 7) -> Reply:
    return Reply(response_id="r1", created=1700000000, model="glm-4.7", deltas=tuple(deltas),
                 input_tokens=input_tokens, cache_read_tokens=cache_read, cache_write_tokens=cache_write)


def encode(event, newline: str, multiline: bool, comment: bool) -> bytes:
    payload = event.data if isinstance(event.data, str) else json.dumps(
        event.data, ensure_ascii=False, separators=(",", ":"))
    lines = []
    if comment:
        lines.append(": keep-alive")
    if event.name is not None:
        lines.append(f"event: {event.name}")
    if multiline and payload.startswith("{") and '"text"' not in payload and '"content"' not in payload:
        # JSON stays valid split between members: the parser joins data lines with "\n".
        parts = payload.split(',"')
        chunks = [parts[0]] + ['"' + p for p in parts[1:]]
        lines.extend("data: " + c + ("," if i < len(chunks) - 1 else "") for i, c in enumerate(chunks))
    else:
        lines.append(f"data: {payload}")
    return (newline.join(lines) + newline + newline).encode("utf-8")


@st.composite
def anthropic_stream(draw):
    deltas = draw(TEXTS)
    r = reply(deltas)
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    events = anthropic_sse.stream_events(r)
    body = b"".join(encode(e, newline, draw(st.booleans()), draw(st.booleans())) for e in events)
    return r, body


@st.composite
def openai_stream(draw, include_usage: bool = True):
    deltas = draw(TEXTS)
    r = reply(deltas, cache_write=0)
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    events = openai_sse.stream_events(r, include_usage)
    body = b"".join(encode(e, newline, draw(st.booleans()), draw(st.booleans())) for e in events)
    return r, body


@st.composite
def splits(draw, body: bytes):
    """`body` cut at arbitrary points (possibly mid-line, mid-CRLF, mid-UTF-8 character)."""
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(body) - 1)), max_size=12)))
    edges = [0, *[c for c in cuts if c < len(body)], len(body)]
    return [body[a:b] for a, b in zip(edges, edges[1:])]
