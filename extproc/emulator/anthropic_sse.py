"""Anthropic Messages API bodies and SSE streams, as Z.AI's /api/anthropic sends them.

Stream order (the real wire format): message_start, content_block_start, ping,
content_block_delta x N, content_block_stop, message_delta, message_stop. Each is
`event: <type>\\ndata: <json>\\n\\n`. message_start carries input and cache token
counts with output_tokens 1; message_delta carries the cumulative output tokens and,
like Z.AI (unlike Anthropic), repeats the input and cache counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import ApiFormat, stream_error_data
from .options import EmulatorOptions
from .reply import Reply, SseEvent, StreamPlan, make_plan


def _usage(reply: Reply, output_tokens: int) -> dict[str, int]:
    return {
        "input_tokens": reply.input_tokens,
        "cache_creation_input_tokens": reply.cache_write_tokens,
        "cache_read_input_tokens": reply.cache_read_tokens,
        "output_tokens": output_tokens,
    }


def recorded_usage(usage: Mapping[str, int]) -> dict[str, int]:
    """Reported Anthropic usage as the request record shows it."""
    return {
        "input": usage["input_tokens"],
        "output": usage["output_tokens"],
        "cache_read": usage["cache_read_input_tokens"],
        "cache_write": usage["cache_creation_input_tokens"],
    }


def message(reply: Reply) -> dict[str, Any]:
    """The non-streaming response body."""
    return {
        "id": reply.response_id,
        "type": "message",
        "role": "assistant",
        "model": reply.model,
        "content": [{"type": "text", "text": reply.text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": _usage(reply, reply.output_tokens),
    }


def count_tokens_body(input_tokens: int) -> dict[str, int]:
    return {"input_tokens": input_tokens}


def stream_events(reply: Reply) -> list[SseEvent]:
    """The complete, successful stream."""
    start = {
        "type": "message_start",
        "message": {
            "id": reply.response_id,
            "type": "message",
            "role": "assistant",
            "model": reply.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _usage(reply, 1),
        },
    }
    block_start = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    events = [
        SseEvent("message_start", start),
        SseEvent("content_block_start", block_start),
        SseEvent("ping", {"type": "ping"}),
    ]
    events += [_delta(piece) for piece in reply.deltas]
    final_usage = {
        "input_tokens": reply.input_tokens,
        "cache_read_input_tokens": reply.cache_read_tokens,
        "cache_creation_input_tokens": reply.cache_write_tokens,
        "output_tokens": reply.output_tokens,
    }
    events += [
        SseEvent("content_block_stop", {"type": "content_block_stop", "index": 0}),
        SseEvent(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": final_usage,
            },
            usage=recorded_usage(final_usage),
        ),
        SseEvent("message_stop", {"type": "message_stop"}),
    ]
    return events


def _delta(piece: str) -> SseEvent:
    data = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": piece},
    }
    return SseEvent("content_block_delta", data, text=piece)


def stream_plan(reply: Reply, options: EmulatorOptions) -> StreamPlan:
    """The stream as configured: complete, or with an error event or a cut."""
    error = SseEvent("error", stream_error_data(ApiFormat.ANTHROPIC), error=True)
    return make_plan(stream_events(reply), error, options)

