"""OpenAI chat-completions bodies and SSE streams, as Z.AI's /api/(coding/)paas/v4 sends them.

Stream: `data: <chat.completion.chunk json>\\n\\n` per text delta (the first also
carries role "assistant"), a chunk with an empty delta and finish_reason "stop", then,
only when the request set `stream_options.include_usage: true`, one chunk with
`choices: []` and `usage`, and finally `data: [DONE]\\n\\n`.

Usage: prompt_tokens = input_tokens + cache_read_tokens (OpenAI counts cached tokens
inside prompt_tokens), prompt_tokens_details.cached_tokens = cache_read_tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import ApiFormat, stream_error_data
from .options import EmulatorOptions
from .reply import Reply, SseEvent, StreamPlan, make_plan

DONE = SseEvent(None, "[DONE]")


def usage(reply: Reply) -> dict[str, Any]:
    prompt = reply.input_tokens + reply.cache_read_tokens
    completion = reply.output_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": reply.cache_read_tokens},
    }


def recorded_usage(usage: Mapping[str, Any]) -> dict[str, int]:
    """Reported OpenAI usage in the record's Anthropic terms: cached tokens are
    taken out of prompt_tokens; OpenAI reports no cache writes."""
    cached = int(usage["prompt_tokens_details"]["cached_tokens"])
    return {
        "input": int(usage["prompt_tokens"]) - cached,
        "output": int(usage["completion_tokens"]),
        "cache_read": cached,
        "cache_write": 0,
    }


def completion(reply: Reply) -> dict[str, Any]:
    """The non-streaming response body."""
    return {
        "id": reply.response_id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text},
                "finish_reason": "stop",
            }
        ],
        "usage": usage(reply),
    }


def wants_usage(request: Mapping[str, Any]) -> bool:
    options = request.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


def _chunk(reply: Reply, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": reply.response_id,
        "object": "chat.completion.chunk",
        "created": reply.created,
        "model": reply.model,
        "choices": choices,
    }


def stream_events(reply: Reply, include_usage: bool) -> list[SseEvent]:
    """The complete, successful stream."""
    events = []
    for i, piece in enumerate(reply.deltas):
        delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
        choice = {"index": 0, "delta": delta, "finish_reason": None}
        events.append(SseEvent(None, _chunk(reply, [choice]), text=piece))
    finish = {"index": 0, "delta": {}, "finish_reason": "stop"}
    events.append(SseEvent(None, _chunk(reply, [finish])))
    if include_usage:
        reported = usage(reply)
        events.append(
            SseEvent(
                None, {**_chunk(reply, []), "usage": reported}, usage=recorded_usage(reported)
            )
        )
    events.append(DONE)
    return events


def stream_plan(
    reply: Reply, request: Mapping[str, Any], options: EmulatorOptions
) -> StreamPlan:
    """The stream as configured: complete, or with an error line or a cut."""
    error = SseEvent(None, stream_error_data(ApiFormat.OPENAI), error=True)
    return make_plan(stream_events(reply, wants_usage(request)), error, options)
