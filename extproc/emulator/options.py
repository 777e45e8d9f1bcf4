"""Emulator behaviour knobs.

Every field of `EmulatorOptions` can be set at start-up (one CLI flag per field, see
`extproc.emulator.cli`) and changed while running with `POST /_emulator/config`
(a JSON object with the fields to change). A change applies to requests that start
after it; requests already in flight keep the options they started with.

One API request can also carry its own changes in the `x-emulator-options` header
(`OPTIONS_HEADER`): a JSON object of the same fields, coerced and validated the same
way, applied on top of the current options for that request only (`api_key` cannot
be set this way). See `with_request_overrides`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import REJECT_CODES

DEFAULT_TEXT = (
    "Hello from the Z.AI emulator. This reply is deterministic so that tests can "
    "check every delta, the final text and the token counts."
)

# Fields whose value must never be shown by the control API.
SECRET_FIELDS = frozenset({"api_key"})

ANTHROPIC_429_TYPES = ("code", "rate_limit_error")
QUOTA_SHAPES = ("tokens", "credits")

# Request header carrying per-request option changes (a JSON object).
OPTIONS_HEADER = "x-emulator-options"
# Fields a request may not change for itself.
NOT_PER_REQUEST = frozenset({"api_key"})


def _doc(text: str) -> dict[str, str]:
    """Attach a field's documentation where `describe()` and the CLI can find it."""
    return {"doc": text}


@dataclass
class EmulatorOptions:
    """What the emulated Z.AI account looks like and how it misbehaves.

    Limits are counted per upstream key; the emulator accepts exactly one key
    (`api_key`), so in practice they are per emulator.
    """

    api_key: str = field(
        metadata=_doc(
            "The upstream key the emulator accepts (what the gateway must send as "
            "x-api-key or Authorization: Bearer). Never shown by the control API."
        ),
    )
    model_default: str = field(
        default="glm-4.7",
        metadata=_doc(
            "Model named in responses when the request names a non-GLM model "
            "(Z.AI maps e.g. claude-* names to its default GLM model). A requested "
            "model starting with 'glm-' is echoed as sent."
        ),
    )
    events_per_stream: int = field(
        default=8,
        metadata=_doc(
            "Number of text deltas per response (>= 1). Each delta carries one or "
            "more consecutive words of `text`; if there are fewer words than deltas "
            "the text is repeated (joined by a space) until there are enough."
        ),
    )
    first_event_delay: float = field(
        default=0.0,
        metadata=_doc(
            "Seconds between sending the 200 status + headers (flushed at once, like "
            "a real server) and the first SSE event. For non-streaming requests: "
            "added to the time before the response is sent."
        ),
    )
    event_interval: float = field(
        default=0.0,
        metadata=_doc(
            "Seconds of 'generation' before each text delta after the first (and "
            "before an injected error or cut that follows a delta). Framing events "
            "(message_start, ping, message_delta, ...) are sent without pause, so "
            "time to first token is first_event_delay in both formats."
        ),
    )
    concurrency_cap: int = field(
        default=0,
        metadata=_doc(
            "Max requests in flight per key (0 = unlimited). Over it: 429 with Z.AI "
            "business code 1302. A slot is held from acceptance until the response "
            "is finished or the client goes away."
        ),
    )
    rate_cap: int = field(
        default=0,
        metadata=_doc(
            "Max accepted request starts per key in any sliding `rate_window` "
            "(0 = unlimited). Over it: 429 code 1303. Rejected requests do not count."
        ),
    )
    rate_window: float = field(
        default=1.0,
        metadata=_doc("Length in seconds of the sliding window for `rate_cap` (> 0)."),
    )
    quota_requests: int = field(
        default=0,
        metadata=_doc(
            "Accepted requests per key before the usage quota is exhausted "
            "(0 = unlimited). Afterwards every request gets 429 code 1308 'Usage "
            "limit reached for 5 hour. Your limit will reset at <UTC+8 time>' until "
            "`quota_reset_after` seconds past the moment of exhaustion; then the "
            "count starts again from zero."
        ),
    )
    quota_reset_after: float = field(
        default=3600.0,
        metadata=_doc("Seconds from quota exhaustion until the quota resets (>= 0)."),
    )
    error_after_events: int = field(
        default=-1,
        metadata=_doc(
            "-1 = off. N >= 0: streaming responses stop after min(N, deltas) text "
            "deltas with an error after the 200 (Anthropic: `event: error` with "
            "overloaded_error; OpenAI: a `data: {\"error\":{\"code\":\"1305\",...}}` "
            "line), then the stream ends cleanly without the usual closing events. "
            "Non-streaming responses fail instead: Anthropic 529 overloaded_error, "
            "OpenAI 429 code 1305."
        ),
    )
    disconnect_after_events: int = field(
        default=-1,
        metadata=_doc(
            "-1 = off. N >= 0: after min(N, deltas) text deltas the TCP connection is "
            "reset (RST, no terminating chunk), as when an upstream dies mid-stream. "
            "Non-streaming requests are cut before any response byte. If "
            "error_after_events is smaller, the error wins."
        ),
    )
    reject_code: str = field(
        default="",
        metadata=_doc(
            "'' = off. A Z.AI business code: every messages / chat-completions request "
            "(not count_tokens, which no limit touches) is refused with that code's "
            "error in the request's format, after authentication and body validation "
            "and before the limits, and counted as a rejection. 1302, 1303: 429 as "
            "for concurrency_cap / rate_cap. 1305: Anthropic 529 overloaded_error, "
            "OpenAI 429. 1308: 429 'Usage limit reached for 5 hour. Your limit will "
            "reset at <UTC+8 time>' and 1310: 429 'Weekly/Monthly Limit Exhausted. "
            "Your limit will reset at <UTC+8 time>', both reset `quota_reset_after` "
            "seconds from now and with that retry-after. 1311: 429 'Your current "
            "subscription plan does not yet include access to <model>' (the model "
            "the reply would name). 1113 (arrears), 1304 (daily limit), 1309 (plan "
            "expired), 1312 (model busy), 1313 (fair-use limit): 429 with Z.AI's "
            "wording. Other codes are refused."
        ),
    )
    server_error_percent: float = field(
        default=0.0,
        metadata=_doc(
            "0 = off. N in (0, 100]: N% of messages / chat-completions requests (not "
            "count_tokens) are answered HTTP 500 with Z.AI's code 500 (Anthropic "
            "api_error), after authentication and body validation and before the "
            "limits. Spread evenly, not at random: each such request adds N/100 to a "
            "running credit and fails when the credit reaches 1 (so 20 fails exactly "
            "every fifth request). Per request (x-emulator-options) it makes one "
            "variant's upstream fail, e.g. from a route's request_headers_to_add."
        ),
    )
    reject_models: str = field(
        default="",
        metadata=_doc(
            "'' = off. Comma-separated model:code pairs, e.g. "
            "'glm-5.1:1312,glm-4.6:1311': a messages / chat-completions request whose "
            "`model` is listed (exact name) is refused with that code as `reject_code` "
            "would refuse it (1311 names the requested model); other models are "
            "served. Codes as for reject_code."
        ),
    )
    quota_level: str = field(
        default="lite",
        metadata=_doc(
            "Plan tier the quota endpoint reports as data.level (Z.AI: lite, pro, max). "
            "Also sizes the tool allowance (TIME_LIMIT usage): lite 100, pro 1000, "
            "max 4000."
        ),
    )
    quota_shape: str = field(
        default="tokens",
        metadata=_doc(
            "How the quota endpoint reports the two windows: 'tokens' (TOKENS_LIMIT "
            "entries with only percentage) or 'credits' (CREDIT_LIMIT entries with "
            "usage = allowance, currentValue = used, remaining, percentage). Both "
            "shapes are seen from the real service."
        ),
    )
    quota_error: str = field(
        default="",
        metadata=_doc(
            "'' = off. A business code (digits): the quota endpoint answers HTTP 200 "
            "with {\"code\": <int>, \"msg\": ..., \"success\": false}, as Z.AI "
            "reports errors there."
        ),
    )
    quota_window_tokens: int = field(
        # Large enough that test suites and trials with multi-MB bodies do not spend it by
        # accident (a spent window closes the gateway's quota gate); tests set it small.
        default=2_000_000_000,
        metadata=_doc(
            "Allowance of the 5-hour window, in tokens (>= 1). Each completed "
            "messages / chat-completions response adds its input + output + cache "
            "tokens; at or over 100% every such request gets 429 code 1308 until "
            "the window resets."
        ),
    )
    quota_weekly_tokens: int = field(
        default=20_000_000_000,
        metadata=_doc(
            "Allowance of the weekly window, in tokens (>= 1); spent -> 429 code 1310."
        ),
    )
    quota_window_seconds: float = field(
        default=5 * 3600.0,
        metadata=_doc(
            "Length of the 5-hour window in seconds (> 0): when the wall clock "
            "reaches its nextResetTime, used goes back to 0 and nextResetTime moves "
            "on by this length."
        ),
    )
    quota_weekly_seconds: float = field(
        default=7 * 86400.0,
        metadata=_doc("Length of the weekly window in seconds (> 0)."),
    )
    input_tokens: int = field(
        default=-1,
        metadata=_doc(
            "Uncached input tokens reported (Anthropic usage.input_tokens). -1 = "
            "derive from the request: ceil(utf-8 bytes of the compact JSON of "
            "system/messages/tools / 4), at least 1."
        ),
    )
    cache_read_tokens: int = field(
        default=0,
        metadata=_doc(
            "Reported cache_read_input_tokens (OpenAI: prompt_tokens_details."
            "cached_tokens, and added to prompt_tokens)."
        ),
    )
    cache_write_tokens: int = field(
        default=0,
        metadata=_doc(
            "Reported cache_creation_input_tokens (Anthropic format only; OpenAI has "
            "no such field)."
        ),
    )
    text: str = field(
        default=DEFAULT_TEXT,
        metadata=_doc(
            "The words the assistant says (must contain a non-space character). "
            "Output tokens reported = cl100k_base token count of the delivered text."
        ),
    )
    anthropic_429_type: str = field(
        default="code",
        metadata=_doc(
            "What the Anthropic endpoint puts in error.type of a 429: 'code' (the "
            "business code, e.g. \"1302\") or 'rate_limit_error'. Both shapes are "
            "reported from the real service; error.code always holds the code."
        ),
    )

    def __post_init__(self) -> None:
        for name in field_types():
            setattr(self, name, _coerce(name, getattr(self, name)))
        _check_ranges(self)

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply a partial update atomically; raise ValueError naming the bad field."""
        if not isinstance(changes, Mapping):
            # ValueError, not TypeError: callers report every bad update the same way.
            raise ValueError("options update must be a JSON object of field: value")  # noqa: TRY004
        candidate = dataclasses.replace(self)
        for name, value in changes.items():
            setattr(candidate, name, _coerce(name, value))
        _check_ranges(candidate)
        for name in changes:
            setattr(self, name, getattr(candidate, name))

    def with_request_overrides(self, header_values: list[str]) -> EmulatorOptions:
        """A copy with the request's `x-emulator-options` changes applied.

        `header_values` are the header's values as received (none = a plain copy).
        Raises ValueError saying what is wrong: not exactly one value, not a JSON
        object, a field that may not be set per request, or any problem `update`
        reports.
        """
        options = dataclasses.replace(self)
        if not header_values:
            return options
        if len(header_values) > 1:
            raise ValueError(f"given {len(header_values)} times; send one JSON object")
        try:
            changes = json.loads(header_values[0])
        except ValueError as exc:
            raise ValueError(f"not valid JSON ({exc})") from None
        if isinstance(changes, dict):
            for name in sorted(NOT_PER_REQUEST & changes.keys()):
                raise ValueError(f"option {name!r} cannot be set per request")
        options.update(changes)  # refuses anything but a JSON object, like the control API
        return options

    def public_dict(self) -> dict[str, Any]:
        """All options as JSON-ready data, secrets masked."""
        data = dataclasses.asdict(self)
        for name in SECRET_FIELDS:
            data[name] = "<redacted>"
        return data


def field_docs() -> dict[str, str]:
    """Field name -> documentation, in declaration order."""
    return {f.name: f.metadata["doc"] for f in dataclasses.fields(EmulatorOptions)}


@functools.cache
def field_types() -> dict[str, type]:
    """Field name -> its Python type (str, int or float)."""
    hints = typing.get_type_hints(EmulatorOptions)
    return {f.name: hints[f.name] for f in dataclasses.fields(EmulatorOptions)}


def _coerce(name: str, value: Any) -> Any:
    types = field_types()
    if name not in types:
        known = ", ".join(types)
        raise ValueError(f"unknown emulator option {name!r}; known options: {known}")
    expected = types[name]
    # bool is an int subclass; a JSON true for a number is a mistake, not 1.
    if isinstance(value, bool) or not _type_ok(expected, value):
        raise ValueError(
            f"option {name!r} must be {expected.__name__}, got {type(value).__name__} "
            f"{_safe_repr(name, value)}"
        )
    return float(value) if expected is float else value


def _type_ok(expected: type, value: Any) -> bool:
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


def _safe_repr(name: str, value: Any) -> str:
    return "<redacted>" if name in SECRET_FIELDS else repr(value)


def _check_ranges(o: EmulatorOptions) -> None:
    rules: list[tuple[bool, str, str]] = [
        (o.events_per_stream >= 1, "events_per_stream", "must be >= 1"),
        (o.first_event_delay >= 0, "first_event_delay", "must be >= 0"),
        (o.event_interval >= 0, "event_interval", "must be >= 0"),
        (o.concurrency_cap >= 0, "concurrency_cap", "must be >= 0 (0 = unlimited)"),
        (o.rate_cap >= 0, "rate_cap", "must be >= 0 (0 = unlimited)"),
        (o.rate_window > 0, "rate_window", "must be > 0 seconds"),
        (o.quota_requests >= 0, "quota_requests", "must be >= 0 (0 = unlimited)"),
        (o.quota_reset_after >= 0, "quota_reset_after", "must be >= 0"),
        (o.error_after_events >= -1, "error_after_events", "must be >= -1"),
        (
            0 <= o.server_error_percent <= 100,
            "server_error_percent",
            "must be from 0 (off) to 100",
        ),
        (o.disconnect_after_events >= -1, "disconnect_after_events", "must be >= -1"),
        (o.input_tokens >= -1, "input_tokens", "must be >= -1 (-1 = derive)"),
        (o.cache_read_tokens >= 0, "cache_read_tokens", "must be >= 0"),
        (o.cache_write_tokens >= 0, "cache_write_tokens", "must be >= 0"),
        (bool(o.api_key), "api_key", "must not be empty"),
        (bool(o.text.strip()), "text", "must contain a non-space character"),
        (bool(o.model_default.strip()), "model_default", "must not be empty"),
        (
            o.reject_code == "" or o.reject_code in REJECT_CODES,
            "reject_code",
            f"must be '' (off) or one of {', '.join(REJECT_CODES)}",
        ),
        (o.quota_window_tokens >= 1, "quota_window_tokens", "must be >= 1"),
        (o.quota_weekly_tokens >= 1, "quota_weekly_tokens", "must be >= 1"),
        (o.quota_window_seconds > 0, "quota_window_seconds", "must be > 0 seconds"),
        (o.quota_weekly_seconds > 0, "quota_weekly_seconds", "must be > 0 seconds"),
        (bool(o.quota_level.strip()), "quota_level", "must not be empty"),
        (
            o.quota_shape in QUOTA_SHAPES,
            "quota_shape",
            f"must be one of {', '.join(QUOTA_SHAPES)}",
        ),
        (
            o.quota_error == "" or (o.quota_error.isascii() and o.quota_error.isdigit()),
            "quota_error",
            "must be '' (off) or a business code of digits, e.g. '1113'",
        ),
        (
            o.anthropic_429_type in ANTHROPIC_429_TYPES,
            "anthropic_429_type",
            f"must be one of {', '.join(ANTHROPIC_429_TYPES)}",
        ),
    ]
    for ok, name, problem in rules:
        if not ok:
            value = _safe_repr(name, getattr(o, name))
            raise ValueError(f"option {name!r} {problem}, got {value}")
    try:
        parse_reject_models(o.reject_models)
    except ValueError as exc:
        raise ValueError(f"option 'reject_models' {exc}, got {o.reject_models!r}") from None


def parse_reject_models(spec: str) -> dict[str, str]:
    """'glm-5.1:1312,glm-4.6:1311' -> {"glm-5.1": "1312", "glm-4.6": "1311"}.

    '' (or only spaces) = no model is refused. Raises ValueError saying what is
    wrong (the caller names the option). The code is split off at the last colon,
    so a model name could itself hold one.
    """
    rejected: dict[str, str] = {}
    if not spec.strip():
        return rejected
    for entry in spec.split(","):
        model, colon, code = (part.strip() for part in entry.rpartition(":"))
        if not colon or not model:
            raise ValueError(
                f"must be '' (off) or comma-separated model:code pairs, e.g. "
                f"'glm-5.1:1312,glm-4.6:1311'; bad entry {entry.strip()!r}"
            )
        if code not in REJECT_CODES:
            raise ValueError(
                f"entry {entry.strip()!r}: code must be one of {', '.join(REJECT_CODES)}"
            )
        if model in rejected:
            raise ValueError(f"model {model!r} is listed twice")
        rejected[model] = code
    return rejected
