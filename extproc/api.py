"""The two client APIs the gateway speaks, and errors shaped like each.

Clients (Claude Code, the Anthropic and OpenAI SDKs) only retry and report errors well when they
arrive in their own API's format, so every gateway-made error goes through `error_body`.
"""

from __future__ import annotations

import enum
import functools
import json
import re
from dataclasses import dataclass


class Api(enum.Enum):
    ANTHROPIC = "anthropic"
    OPENAI = "openai"


class Endpoint(enum.Enum):
    """Bounded metric label for what was called."""

    MESSAGES = "messages"
    COUNT_TOKENS = "count_tokens"
    CHAT_COMPLETIONS = "chat_completions"
    UNKNOWN = "unknown"  # no such endpoint: refused by the gateway with a 404

    @property
    def api(self) -> Api:
        return Api.OPENAI if self is Endpoint.CHAT_COMPLETIONS else Api.ANTHROPIC


# Paths that can only mean the OpenAI API (the Anthropic API has no such endpoints); any other
# path is answered in Anthropic's format. One pattern for Envoy (its own error replies, its 404)
# and the ext_proc, applied to the whole :path (query string included). RE2 and Python agree on it.
OPENAI_PATH_REGEX = r"^[^?]*/(chat/completions|completions|embeddings)(/[^?]*)?(\?.*)?$"
_OPENAI_PATH = re.compile(OPENAI_PATH_REGEX)
# Entrances pinned to one variant carry its name first; workers' base URLs may end in /api/anthropic.
_PREFIXES = ("/production/", "/canary/")
_ENDPOINTS = {"/v1/messages": Endpoint.MESSAGES, "/v1/messages/count_tokens": Endpoint.COUNT_TOKENS,
              "/v1/chat/completions": Endpoint.CHAT_COMPLETIONS}


def api_for_path(path: str) -> Api:
    """The API a path implies, for errors about it (known or not)."""
    return Api.OPENAI if _OPENAI_PATH.match(path) else Api.ANTHROPIC


@dataclass(frozen=True)
class Entrance:
    """What a request's path asks for: its API, its endpoint (None: no such endpoint), and the
    path to send upstream when it needed normalising (None: as sent)."""

    api: Api
    endpoint: Endpoint | None
    normalised: str | None = None


# Clients send a handful of distinct paths (query strings included); each is classified once.
@functools.lru_cache(maxsize=1024)
def entrance_for_path(path: str) -> Entrance:
    """Classify the client's path. Repeated slashes and a trailing slash are normalised (Z.AI
    would not accept them); anything but the three endpoints is no endpoint."""
    bare, sep, query = path.partition("?")
    clean = re.sub("/{2,}", "/", bare)
    clean = clean.rstrip("/") or "/"
    inner = clean
    for prefix in _PREFIXES:
        if inner.startswith(prefix):
            inner = inner[len(prefix) - 1:]
            break
    if inner.startswith("/api/anthropic/"):
        inner = inner[len("/api/anthropic"):]
    endpoint = _ENDPOINTS.get(inner)
    api = endpoint.api if endpoint is not None else api_for_path(path)
    return Entrance(api, endpoint, None if clean == bare else clean + sep + query)


def endpoint_for_path(path: str) -> Endpoint:
    """The endpoint a path asks for (UNKNOWN for none: the gateway refuses those)."""
    return entrance_for_path(path).endpoint or Endpoint.UNKNOWN


# Error `type` values per API for the situations the gateway itself reports.
_TYPES: dict[str, dict[Api, str]] = {
    "authentication": {Api.ANTHROPIC: "authentication_error", Api.OPENAI: "invalid_api_key"},
    "unavailable": {Api.ANTHROPIC: "api_error", Api.OPENAI: "service_unavailable"},
    "invalid_request": {Api.ANTHROPIC: "invalid_request_error", Api.OPENAI: "invalid_request_error"},
    "rate_limit": {Api.ANTHROPIC: "rate_limit_error", Api.OPENAI: "rate_limit_exceeded"},
    "not_found": {Api.ANTHROPIC: "not_found_error", Api.OPENAI: "invalid_request_error"},
}


def error_body(api: Api, kind: str, message: str) -> bytes:
    """JSON error body in the client's API format; `kind` is a key of _TYPES."""
    err_type = _TYPES[kind][api]
    if api is Api.ANTHROPIC:
        doc: dict[str, object] = {"type": "error", "error": {"type": err_type, "message": message}}
    else:
        doc = {"error": {"message": message, "type": err_type, "code": err_type}}
    return json.dumps(doc, separators=(",", ":")).encode()
