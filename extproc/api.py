"""The two client APIs the gateway speaks, and errors shaped like each.

Clients (Claude Code, the Anthropic and OpenAI SDKs) only retry and report errors well when they
arrive in their own API's format, so every gateway-made error goes through `error_body`.
"""

from __future__ import annotations

import enum
import json


class Api(enum.Enum):
    ANTHROPIC = "anthropic"
    OPENAI = "openai"


class Endpoint(enum.Enum):
    """Bounded metric label for what was called."""

    MESSAGES = "messages"
    COUNT_TOKENS = "count_tokens"
    CHAT_COMPLETIONS = "chat_completions"

    @property
    def api(self) -> Api:
        return Api.OPENAI if self is Endpoint.CHAT_COMPLETIONS else Api.ANTHROPIC


def endpoint_for_path(path: str) -> Endpoint:
    """Classify the client's path (query string allowed); Envoy only routes these three here."""
    bare = path.split("?", 1)[0]
    if bare.endswith("/chat/completions"):
        return Endpoint.CHAT_COMPLETIONS
    if bare.endswith("/count_tokens"):
        return Endpoint.COUNT_TOKENS
    return Endpoint.MESSAGES


# Error `type` values per API for the situations the gateway itself reports.
_TYPES: dict[str, dict[Api, str]] = {
    "authentication": {Api.ANTHROPIC: "authentication_error", Api.OPENAI: "invalid_api_key"},
    "unavailable": {Api.ANTHROPIC: "api_error", Api.OPENAI: "service_unavailable"},
    "invalid_request": {Api.ANTHROPIC: "invalid_request_error", Api.OPENAI: "invalid_request_error"},
    "rate_limit": {Api.ANTHROPIC: "rate_limit_error", Api.OPENAI: "rate_limit_exceeded"},
}


def error_body(api: Api, kind: str, message: str) -> bytes:
    """JSON error body in the client's API format; `kind` is a key of _TYPES."""
    err_type = _TYPES[kind][api]
    if api is Api.ANTHROPIC:
        doc: dict[str, object] = {"type": "error", "error": {"type": err_type, "message": message}}
    else:
        doc = {"error": {"message": message, "type": err_type, "code": err_type}}
    return json.dumps(doc, separators=(",", ":")).encode()
