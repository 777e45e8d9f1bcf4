"""Token usage from Z.AI responses: Anthropic and OpenAI formats, streamed or whole.

Stream trackers see every SSE event but parse JSON only for the events that can carry usage or
an error (Anthropic `message_start`, `message_delta`, `error`; OpenAI chunks with a `usage`
object or an `error`). Content deltas are kept as raw bytes and parsed only if the stream ends
without usage, to estimate what was delivered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from extproc.api import Api
from extproc.accounting.sse import SseEvent, SseParser, block_fields

# Past this much retained delta data the fallback estimate stops growing (memory bound).
MAX_RETAINED_DELTA_BYTES = 16 * 1024 * 1024

_ANTHROPIC_TYPE = re.compile(rb'"type"\s*:\s*"([a-z_]+)"')
_OPENAI_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_OPENAI_ERROR = re.compile(rb'"error"\s*:')
_OPENAI_TOKEN = re.compile(rb'"(?:content|reasoning_content)"\s*:\s*"[^"]|"tool_calls"\s*:\s*\[')


@dataclass(slots=True)
class Usage:
    """Token counts as reported; None where the response did not say."""

    input: int | None = None
    output: int | None = None
    cache_read: int | None = None
    cache_write: int | None = None

    @property
    def reported(self) -> bool:
        return self.input is not None or self.output is not None


@dataclass(slots=True)
class ResponseFacts:
    usage: Usage = field(default_factory=Usage)
    model: str | None = None
    first_token_at: float | None = None
    error_type: str | None = None  # an error reported in the body (after a 200, or the error body)
    error_code: str | None = None  # Z.AI business code, e.g. "1302"
    complete: bool = False  # the response reached its proper end (message_stop / [DONE] / JSON)
    output_final: bool = False  # usage.output is the final count, not message_start's placeholder


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def anthropic_usage(usage: Any, into: Usage) -> None:
    """Fold an Anthropic `usage` object into `into`; fields absent here keep their value."""
    if not isinstance(usage, dict):
        return
    for name, attr in (("input_tokens", "input"), ("output_tokens", "output"),
                       ("cache_read_input_tokens", "cache_read"),
                       ("cache_creation_input_tokens", "cache_write")):
        value = _int(usage.get(name))
        if value is not None:
            setattr(into, attr, value)


def openai_usage(usage: Any, into: Usage) -> None:
    """OpenAI's prompt_tokens include cached tokens; input is the uncached part."""
    if not isinstance(usage, dict):
        return
    prompt = _int(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
    if prompt is not None:
        into.input = prompt - min(cached or 0, prompt)
    into.cache_read = cached if cached is not None else into.cache_read
    completion = _int(usage.get("completion_tokens"))
    if completion is not None:
        into.output = completion


def error_fields(doc: Any) -> tuple[str | None, str | None]:
    """(type, Z.AI code) of an error document in any of the shapes Z.AI and Anthropic use."""
    if not isinstance(doc, dict):
        return None, None
    err = doc.get("error")
    if not isinstance(err, dict):
        return None, None
    err_type = err.get("type")
    code = err.get("code")
    code = str(code) if isinstance(code, (str, int)) and not isinstance(code, bool) else None
    if isinstance(err_type, str) and err_type.isdigit():
        code = code or err_type  # Z.AI's Anthropic endpoint puts the business code in `type`
    return (err_type if isinstance(err_type, str) else None), code


class _DeltaText:
    """Raw content-delta payloads, decoded to text only when an estimate is needed: an event's
    data, or (in a 1-tuple) a chunk of whole events kept without being parsed."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes | tuple[bytes]] = []
        self.size = 0

    def keep(self, data: bytes | tuple[bytes]) -> None:
        if self.size < MAX_RETAINED_DELTA_BYTES:
            self.parts.append(data)
            self.size += len(data) if isinstance(data, bytes) else len(data[0])


# Bytes every event the Anthropic tracker records must contain: usage (message_start,
# message_delta), message_stop, an error (its event name or payload). In content, quotes are
# escaped, so `"error"` cannot come from a model's text. Searched with `bytes.find` (memchr
# speed), not one regex: an alternation of literals makes `re` try every position, ~10x slower.
_MARKERS = (b"message_", b'"error"', b"event: error", b"event:error")
_FIRST_TOKEN = b"content_block_delta"


def _marked_blocks(chunk: bytes, first_seen: bool) -> list[tuple[int, int]]:
    """The (start, end) of each event in `chunk` (whole events, LF only) that holds a marker, and
    of the first content delta while no first token was seen, in order: found by searching the
    bytes, so the events between them cost nothing."""
    spans: dict[int, int] = {}
    find, rfind = chunk.find, chunk.rfind

    def add(at: int) -> int:
        """Keep the event around `at`; its end (found: the chunk ends with a blank line, and no
        marker holds a line feed)."""
        start = rfind(b"\n\n", 0, at)
        end = spans[0 if start < 0 else start + 2] = find(b"\n\n", at)
        return end

    for marker in _MARKERS:
        at = find(marker)
        while at != -1:
            at = find(marker, add(at))  # the next event holding it
    if not first_seen and (at := find(_FIRST_TOKEN)) != -1:
        add(at)
    return sorted(spans.items())


class AnthropicStream:
    """Usage and facts from an Anthropic Messages event stream."""

    __slots__ = ("facts", "_deltas")

    def __init__(self) -> None:
        self.facts = ResponseFacts()
        self._deltas = _DeltaText()

    def feed_whole(self, chunk: bytes, parser: SseParser, now: float) -> bool:
        """Take `chunk` without the parser when it holds whole events (it ends at an event
        boundary, LF line ends, none pending): only the events that can carry what the tracker
        records are parsed, found by bytes each of them must contain (usage in message_start
        and message_delta, message_stop, an error's name or payload; in content, quotes are
        escaped), and the first content delta. The rest (deltas, pings, block starts and stops)
        is kept raw for the fallback estimate. False: the parser must take the chunk."""
        if not chunk.endswith(b"\n\n") or parser.pending() or b"\r" in chunk:
            return False
        # Every delta stays in the raw chunk, in order: the events parsed here keep none.
        self._deltas.keep((chunk,))
        for start, end in _marked_blocks(chunk, self.facts.first_token_at is not None):
            event, data = block_fields(chunk[start:end])
            if data:
                joined = b"\n".join(data)
                self._record(event or self._sniff(joined), joined, now, False)
        return True

    def on_event(self, event: SseEvent, now: float, keep: bool = True) -> bool:
        """Record one event; always forwarded (returns True). `keep`: a content delta's data is
        kept for the fallback estimate (False: its raw chunk is)."""
        self._record(event.event or self._sniff(event.data), event.data, now, keep)
        return True

    def _record(self, name: bytes, data: bytes, now: float, keep: bool) -> None:
        if name == b"content_block_delta":
            if self.facts.first_token_at is None:
                self.facts.first_token_at = now
            if keep:
                self._deltas.keep(data)
        elif name == b"message_start":
            doc = _loads(data)
            message = doc.get("message") if isinstance(doc, dict) else None
            if isinstance(message, dict):
                anthropic_usage(message.get("usage"), self.facts.usage)
                if isinstance(message.get("model"), str):
                    self.facts.model = message["model"]
        elif name == b"message_delta":
            doc = _loads(data)
            if isinstance(doc, dict) and isinstance(doc.get("usage"), dict):
                anthropic_usage(doc["usage"], self.facts.usage)
                self.facts.output_final = self.facts.usage.output is not None
        elif name == b"message_stop":
            self.facts.complete = True
        elif name == b"error":
            self.facts.error_type, self.facts.error_code = error_fields(_loads(data))
            self.facts.error_type = self.facts.error_type or "error"

    def _delta_payloads(self) -> list[bytes]:
        payloads: list[bytes] = []
        for part in self._deltas.parts:
            if isinstance(part, bytes):
                payloads.append(part)
                continue
            for event in SseParser().feed(part[0], True):
                if (event.event or self._sniff(event.data)) == b"content_block_delta":
                    payloads.append(event.data)
        return payloads

    @staticmethod
    def _sniff(data: bytes) -> bytes:
        """The event type from the payload, for streams that omit `event:` lines."""
        match = _ANTHROPIC_TYPE.search(data, 0, 64)
        return match.group(1) if match else b""

    def delivered_text(self) -> str:
        texts: list[str] = []
        for raw in self._delta_payloads():
            doc = _loads(raw)
            delta = doc.get("delta") if isinstance(doc, dict) else None
            if isinstance(delta, dict):
                for key in ("text", "thinking", "partial_json"):
                    value = delta.get(key)
                    if isinstance(value, str):
                        texts.append(value)
        return "".join(texts)


class OpenAIStream:
    """Usage and facts from an OpenAI chat-completions chunk stream.

    With `drop_usage_chunk`, the usage-only chunk (`choices: []`) is not forwarded: the gateway
    asked for it on the client's behalf, and the client must see the stream it asked for.
    """

    __slots__ = ("facts", "_deltas", "drop_usage_chunk")

    def __init__(self, drop_usage_chunk: bool = False) -> None:
        self.facts = ResponseFacts()
        self._deltas = _DeltaText()
        self.drop_usage_chunk = drop_usage_chunk

    def feed_whole(self, chunk: bytes, parser: SseParser, now: float) -> bool:
        return False  # OpenAI streams pass inline, where each chunk may be re-framed

    def on_event(self, event: SseEvent, now: float) -> bool:
        data = event.data
        if data == b"[DONE]":
            self.facts.complete = True
            return True
        if _OPENAI_USAGE.search(data):
            doc = _loads(data)
            if isinstance(doc, dict):
                openai_usage(doc.get("usage"), self.facts.usage)
                self.facts.output_final = self.facts.usage.output is not None
                if isinstance(doc.get("model"), str):
                    self.facts.model = doc["model"]
                if self.drop_usage_chunk and not doc.get("choices"):
                    return False
        elif _OPENAI_ERROR.search(data, 0, 32):
            self.facts.error_type, self.facts.error_code = error_fields(_loads(data))
            self.facts.error_type = self.facts.error_type or "error"
            return True
        if self.facts.first_token_at is None and _OPENAI_TOKEN.search(data):
            self.facts.first_token_at = now
        self._deltas.keep(data)
        return True

    def delivered_text(self) -> str:
        # Only events' data is kept here (no whole chunks: `feed_whole` declines them).
        return "".join(_openai_choices_text(_loads(raw), "delta")
                       for raw in self._deltas.parts if isinstance(raw, bytes))


def facts_from_json(api: Api, body: bytes) -> tuple[ResponseFacts, str]:
    """Facts and the delivered text of a whole (non-streamed) JSON response body."""
    facts = ResponseFacts()
    doc = _loads(body)
    if not isinstance(doc, dict):
        return facts, ""
    facts.error_type, facts.error_code = error_fields(doc)
    if facts.error_type is not None or facts.error_code is not None:
        return facts, ""
    if isinstance(doc.get("model"), str):
        facts.model = doc["model"]
    if api is Api.ANTHROPIC:
        anthropic_usage(doc.get("usage"), facts.usage)
        text = _anthropic_content_text(doc.get("content"))
    else:
        openai_usage(doc.get("usage"), facts.usage)
        text = _openai_choices_text(doc, "message")
    facts.complete = True
    facts.output_final = facts.usage.output is not None
    return facts, text


def _anthropic_content_text(content: Any) -> str:
    parts: list[str] = []
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        for key in ("text", "thinking"):
            if isinstance(block.get(key), str):
                parts.append(block[key])
        if block.get("type") == "tool_use" and "input" in block:
            parts.append(orjson.dumps(block["input"]).decode())
    return "".join(parts)


def _openai_choices_text(doc: Any, part: str) -> str:
    """Text of every choice's `part` ("delta" in a chunk, "message" in a whole response)."""
    choices = doc.get("choices") if isinstance(doc, dict) else None
    texts: list[str] = []
    for choice in choices if isinstance(choices, list) else ():
        message = choice.get(part) if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        for key in ("reasoning_content", "content"):
            if isinstance(message.get(key), str):
                texts.append(message[key])
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                texts.append(function["arguments"])
    return "".join(texts)
