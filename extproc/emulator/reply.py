"""Format-independent reply planning and SSE framing (pure, no I/O)."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .content import (
    count_output_tokens,
    delivered_text,
    estimate_input_tokens,
    split_deltas,
)
from .errors import ZaiError, bad_parameters, invalid_field, missing_field
from .options import EmulatorOptions


@dataclass(frozen=True)
class Reply:
    """Everything a response reports, whichever API format carries it."""

    response_id: str
    created: int
    model: str
    deltas: tuple[str, ...]
    input_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int

    @functools.cached_property
    def text(self) -> str:
        return "".join(self.deltas)

    @functools.cached_property
    def output_tokens(self) -> int:
        return count_output_tokens(self.text)


def response_model(requested: Any, default: str) -> str:
    """Echo GLM model names; Z.AI answers other names (claude-*) with its default."""
    if isinstance(requested, str) and requested.lower().startswith("glm"):
        return requested
    return default


def input_tokens_for(request: Mapping[str, Any], options: EmulatorOptions) -> int:
    if options.input_tokens >= 0:
        return options.input_tokens
    return estimate_input_tokens(request)


def plan_reply(
    request: Mapping[str, Any], options: EmulatorOptions, response_id: str, created: int
) -> Reply:
    n = options.events_per_stream
    return Reply(
        response_id=response_id,
        created=created,
        model=response_model(request.get("model"), options.model_default),
        deltas=tuple(split_deltas(delivered_text(options.text, n), n)),
        input_tokens=input_tokens_for(request, options),
        cache_read_tokens=options.cache_read_tokens,
        cache_write_tokens=options.cache_write_tokens,
    )


@dataclass(frozen=True)
class SseEvent:
    """One server-sent event. `text` is set on events that deliver reply text;
    `error` marks an injected in-stream error; `usage` is set on the event that
    reports the final usage (what the request record shows once it is sent)."""

    name: str | None
    data: Mapping[str, Any] | str
    text: str | None = None
    error: bool = False
    usage: Mapping[str, int] | None = None

    def encode(self) -> bytes:
        if isinstance(self.data, str):
            payload = self.data
        else:
            payload = json.dumps(self.data, ensure_ascii=False, separators=(",", ":"))
        head = f"event: {self.name}\n" if self.name is not None else ""
        return f"{head}data: {payload}\n\n".encode()


@dataclass(frozen=True)
class StreamPlan:
    """The events to send, and where (if anywhere) to reset the connection instead.

    `cut_at` is the index of the first event that is NOT sent: the connection is
    aborted just before it. None = send everything and end the stream normally.
    """

    events: tuple[SseEvent, ...]
    cut_at: int | None = None

    @property
    def sent_events(self) -> tuple[SseEvent, ...]:
        return self.events if self.cut_at is None else self.events[: self.cut_at]


def after_deltas_index(events: Sequence[SseEvent], n: int) -> int:
    """Index just after the first min(n, total) text deltas (before any later event)."""
    delta_positions = [i for i, e in enumerate(events) if e.text is not None]
    if not delta_positions:
        return 0
    if n < len(delta_positions):
        return delta_positions[n]
    return delta_positions[-1] + 1


def failure(options: EmulatorOptions) -> tuple[str | None, int]:
    """Which injected failure applies and after how many deltas.

    ("error", n), ("disconnect", n) or (None, -1). The earlier one wins; a tie goes
    to the disconnect (nothing can be sent after a reset connection).
    """
    error_at, cut_after = options.error_after_events, options.disconnect_after_events
    if error_at >= 0 and (cut_after < 0 or error_at < cut_after):
        return "error", error_at
    if cut_after >= 0:
        return "disconnect", cut_after
    return None, -1


def make_plan(
    events: Sequence[SseEvent], error_event: SseEvent, options: EmulatorOptions
) -> StreamPlan:
    """Apply error_after_events / disconnect_after_events to a complete stream."""
    kind, after = failure(options)
    if kind is None:
        return StreamPlan(tuple(events))
    at = after_deltas_index(events, after)
    if kind == "error":
        return StreamPlan((*events[:at], error_event))
    return StreamPlan(tuple(events), cut_at=at)


def validate_request(body: Any) -> ZaiError | None:
    """The error Z.AI gives for a body missing or mistyping a required field."""
    if not isinstance(body, dict):
        return bad_parameters()
    for name in ("model", "messages"):
        if body.get(name) is None:
            return missing_field(name)
    if not isinstance(body["model"], str) or not body["model"]:
        return invalid_field("model")
    if not isinstance(body["messages"], list):
        return invalid_field("messages")
    if not isinstance(body.get("stream", False), bool):
        return invalid_field("stream")
    return None
