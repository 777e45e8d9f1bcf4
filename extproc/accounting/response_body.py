"""A response body on its way to the client: facts (usage, first token, errors) and, for OpenAI
streams whose usage chunk the gateway requested itself, the bytes the client should get instead.

Pure logic: chunks in, optional replacement bytes out.
"""

from __future__ import annotations

from typing import Callable

from extproc.api import Api
from extproc.accounting.sse import SseParser
from extproc.accounting.usage import AnthropicStream, OpenAIStream, ResponseFacts, facts_from_json

# A non-streamed body is parsed whole at its end; past this size it is not kept (no usage then).
MAX_JSON_BODY_BYTES = 32 * 1024 * 1024
# Once a stream's first token is timed, no later chunk needs its arrival time: the chunks are
# gathered and accounted together when the facts are read, at the end, or past this many bytes.
GATHER_BYTES = 256 * 1024


class ResponseBody:
    __slots__ = ("api", "streaming", "_parser", "_stream", "_reframe", "_json_parts", "_json_size",
                 "_json_facts", "_json_text", "_gathered", "_gathered_size", "_gather_bytes")

    def __init__(self, api: Api, streaming: bool, drop_usage_chunk: bool = False,
                 gather_bytes: int = GATHER_BYTES) -> None:
        self.api = api
        self.streaming = streaming
        self._parser = SseParser()
        self._stream: AnthropicStream | OpenAIStream = (
            AnthropicStream() if api is Api.ANTHROPIC else OpenAIStream(drop_usage_chunk))
        self._reframe = streaming and drop_usage_chunk
        self._json_parts: list[bytes] = []
        self._json_size = 0
        self._json_facts: ResponseFacts | None = None
        self._json_text = ""
        # Chunks not yet accounted (a stream past its first token, forwarded unchanged), or None.
        self._gathered: list[bytes] | None = None
        self._gathered_size = 0
        self._gather_bytes = gather_bytes

    def feed(self, chunk: bytes, end_of_stream: bool, clock: Callable[[], float]) -> bytes | None:
        """Account for `chunk`; return the bytes to forward instead, or None to forward it as is.
        `clock` is read only while the time can matter (before the first token)."""
        gathered = self._gathered
        if gathered is not None:  # the hot path of a stream: one append per chunk
            gathered.append(chunk)
            self._gathered_size += len(chunk)
            if end_of_stream or self._gathered_size >= self._gather_bytes:
                self._account_gathered(end_of_stream)
            return None
        if not self.streaming:
            self._keep_json(chunk, end_of_stream)
            return None
        if not self._reframe:
            self._account(chunk, end_of_stream, clock())
            if self._stream.facts.first_token_at is not None and not end_of_stream:
                self._gathered = []
            return None
        # Re-framing: forward whole events only (holding a partial one back), minus dropped ones.
        now = clock()
        events = self._parser.feed(chunk, end_of_stream) if chunk or end_of_stream else []
        on_event = self._stream.on_event
        out = b"".join([event.raw for event in events if on_event(event, now)])
        if end_of_stream:
            out += self._parser.tail()
        return None if out == chunk else out

    def _account(self, chunk: bytes, end_of_stream: bool, now: float) -> None:
        """Chunks forwarded unchanged: whole events skip the parser (`feed_whole`)."""
        if self._stream.feed_whole(chunk, self._parser, now):
            return
        events = self._parser.feed(chunk, end_of_stream) if chunk or end_of_stream else []
        on_event = self._stream.on_event
        for event in events:
            on_event(event, now)

    def _account_gathered(self, end_of_stream: bool) -> None:
        """The gathered chunks as one: SSE parsing does not depend on where chunks split, and
        past the first token no event needs its time."""
        gathered = self._gathered
        if not gathered:  # none, or none since the last time
            return
        chunk = b"".join(gathered) if len(gathered) != 1 else gathered[0]
        gathered.clear()
        self._gathered_size = 0
        self._account(chunk, end_of_stream, self._stream.facts.first_token_at or 0.0)

    def _keep_json(self, chunk: bytes, end_of_stream: bool) -> None:
        if self._json_size <= MAX_JSON_BODY_BYTES:
            self._json_parts.append(chunk)
            self._json_size += len(chunk)
        if end_of_stream and self._json_size <= MAX_JSON_BODY_BYTES:
            self._json_facts, self._json_text = facts_from_json(self.api, b"".join(self._json_parts))
            self._json_parts = []

    @property
    def facts(self) -> ResponseFacts:
        self._account_gathered(False)  # read before its end: the client left, or Envoy closed it
        if not self.streaming:
            return self._json_facts or ResponseFacts()
        return self._stream.facts

    def delivered_text(self) -> str:
        self._account_gathered(False)
        return self._stream.delivered_text() if self.streaming else self._json_text
