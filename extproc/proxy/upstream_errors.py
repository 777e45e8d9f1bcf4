"""Z.AI's refusals as the client receives them: Z.AI's code and words, in the client's API format,
plus the gateway's one-line hint (what happened, what the gateway did, what to do).

Z.AI's Anthropic endpoint puts the business code in `error.type` (e.g. "1302"), which SDKs do not
know; the client gets the Anthropic type its status means, with the code kept in `error.code`.
OpenAI-format bodies get the `type` OpenAI clients expect. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import orjson

from extproc.limiter.codes import lookup

HINT_PREFIX = "[zai-proxy: "
MAX_BODY_BYTES = 64 * 1024  # an error body is small; anything bigger passes untouched

_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 529: "overloaded_error", 503: "overloaded_error"}
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


def _anthropic_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def _openai_type(status: int) -> str:
    return _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


EXAMPLE_MODEL = "glm-4.7"


def hint_for(code: str | None, suggested_model: str | None = None,
             refused_model: str | None = None) -> str | None:
    known = lookup(code)
    if known is None:
        return None
    if code == "1311":
        if suggested_model and suggested_model != refused_model:
            instead = suggested_model
        elif refused_model != EXAMPLE_MODEL:
            instead = f"a model the plan includes (for example {EXAMPLE_MODEL})"
        else:
            instead = "a model the plan includes"
        return f"{known.hint} Use {instead} instead."
    return known.hint


def annotate(body: bytes, status: int, code: str | None, suggested_model: str | None = None,
             refused_model: str | None = None) -> bytes | None:
    """The error body the client should get, or None to pass `body` as it is (not a Z.AI error
    we know, already annotated, or not JSON). `suggested_model`: where MODEL_FALLBACKS would go
    next; `refused_model`: the model this attempt asked for (never suggested)."""
    hint = hint_for(code, suggested_model, refused_model)
    if hint is None or len(body) > MAX_BODY_BYTES:
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict):
        return None
    raw = error.get("message")
    message = raw if isinstance(raw, str) else ""
    if HINT_PREFIX in message:
        return None
    error["message"] = f"{message} {HINT_PREFIX}{hint}]".strip()
    error["code"] = code
    if doc.get("type") == "error":  # Anthropic
        error["type"] = _anthropic_type(status)
    elif not isinstance(error.get("type"), str) or error["type"].isdigit():
        error["type"] = _openai_type(status)
    return orjson.dumps(doc)
