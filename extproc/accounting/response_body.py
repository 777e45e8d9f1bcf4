"""A response body on its way to the client: facts (usage, first token, errors) and, for OpenAI
streams whose usage chunk the gateway requested itself, the bytes the client should get instead.

Pure logic: chunks in, optional replacement bytes out.
"""

from __future__ import annotations

from extproc.api import Api
from extproc.accounting.sse import SseParser
from extproc.accounting.usage import AnthropicStream, OpenAIStream, ResponseFacts, facts_from_json

# A non-streamed body is parsed whole at its end; past this size it is not kept (no usage then).
MAX_JSON_BODY_BYTES = 32 * 1024 * 1024


class ResponseBody:
    __slots__ = ("api", "streaming", "_parser", "_stream", "_reframe", "_json_parts", "_json_size",
                 "_json_facts", "_json_text")

    def __init__(self, api: Api, streaming: bool, drop_usage_chunk: bool = False) -> None:
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

    def feed(self, chunk: bytes, end_of_stream: bool, now: float) -> bytes | None:
        """Account for `chunk`; return the bytes to forward instead, or None to forward it as is."""
        if not self.streaming:
            self._keep_json(chunk, end_of_stream)
            return None
        if not self._reframe and self._stream.feed_whole(chunk, self._parser, now):
            return None
        events = self._parser.feed(chunk, end_of_stream) if chunk or end_of_stream else []
        on_event = self._stream.on_event
        if not self._reframe:
            for event in events:
                on_event(event, now)
            return None
        # Re-framing: forward whole events only (holding a partial one back), minus dropped ones.
        out = b"".join([event.raw for event in events if on_event(event, now)])
        if end_of_stream:
            out += self._parser.tail()
        return None if out == chunk else out

    def _keep_json(self, chunk: bytes, end_of_stream: bool) -> None:
        if self._json_size <= MAX_JSON_BODY_BYTES:
            self._json_parts.append(chunk)
            self._json_size += len(chunk)
        if end_of_stream and self._json_size <= MAX_JSON_BODY_BYTES:
            self._json_facts, self._json_text = facts_from_json(self.api, b"".join(self._json_parts))
            self._json_parts = []

    @property
    def facts(self) -> ResponseFacts:
        if not self.streaming:
            return self._json_facts or ResponseFacts()
        return self._stream.facts

    def delivered_text(self) -> str:
        return self._stream.delivered_text() if self.streaming else self._json_text
