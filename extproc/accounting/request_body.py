"""Read a client's request body once: model, `stream`, and what to count for the input estimate.

`parse_request` turns an Anthropic Messages (or `count_tokens`, same shape) or OpenAI chat body
into a `RequestInfo`: the texts to tokenize, one segment per content block so that
`extproc.accounting.tokens.TokenCounter` can cache each block's count across an agent's turns (every turn
resends the whole conversation), plus `fixed_tokens` added by rule. It never raises: a body that is
not a JSON object is reported in `malformed` (the caller forwards it untouched; the estimate is
unknown), and fields of an unexpected type are counted as their compact JSON or skipped.

The estimate is an estimate. Rules, all deliberately erring high ("better over than under", as it
feeds rate limits and budgets):

- Text, thinking text, tool results and `text/plain` documents are counted as text with cl100k
  (GLM's own tokenizer is not public; cl100k is within ~10-20% on English and code).
- `tool_use` / OpenAI `tool_calls`: the tool name plus the compact JSON of the input/arguments.
  Tool definitions: name, description and compact JSON schema, one segment per tool (so the
  ~20 definitions Claude Code resends are each cached as a unit). Block ids are not counted.
- Per message: `MESSAGE_OVERHEAD_TOKENS` (3 framing tokens + 1 for the role, OpenAI's cookbook
  rule), plus `REPLY_PRIMING_TOKENS` once per request. Used for both APIs.
- Images: `IMAGE_TOKENS` = 1,600 flat, whatever the size or source. Anthropic documents an image's
  cost as width*height/750 after downscaling to at most ~1.15 megapixels, so 1,600 is its ceiling;
  OpenAI's high-detail cost for a 1024x1024 image is 765, so the flat rule over-counts there.
- PDFs (Anthropic base64 `document`, OpenAI `file.file_data`): one token per
  `PDF_BYTES_PER_TOKEN` = 25 decoded bytes, at least `PDF_MIN_TOKENS` = 4,000. Anthropic bills
  each page as its text (1,500-3,000 tokens) plus an image of the page (up to ~1,600), i.e.
  roughly 4,000 tokens per page, and a typical page of a text-and-figures PDF weighs ~100 KB, hence
  100,000 / 4,000 = 25 bytes per token. A PDF given by URL or file id (size unknown) counts as one
  page. Scanned PDFs (heavier pages) are over-counted; very dense text-only PDFs under-counted.
- Anything else (unknown block or part types, server tools, wrong-typed content) is counted as its
  compact JSON text. Blocks nested deeper than `MAX_BLOCK_DEPTH` tool results are counted the same
  way rather than walked.
"""

from __future__ import annotations

import re

import asyncio
import concurrent.futures
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import orjson
from stringzilla import Str

from extproc.api import Api

MESSAGE_OVERHEAD_TOKENS = 4
REPLY_PRIMING_TOKENS = 3
IMAGE_TOKENS = 1_600
PDF_BYTES_PER_TOKEN = 25
PDF_MIN_TOKENS = 4_000
# tool_result -> content blocks -> tool_result ... is legal but never deep in practice; the bound
# keeps hostile bodies (orjson accepts 1,024 levels) from exhausting the Python stack.
MAX_BLOCK_DEPTH = 8


@dataclass(frozen=True, slots=True)
class RequestInfo:
    model: str | None
    stream: bool
    include_usage: bool | None  # OpenAI `stream_options.include_usage`; None when absent
    segments: tuple[str, ...]  # texts to count, one per content block
    fixed_tokens: int  # added by rule: images, documents, per-message overhead
    malformed: str | None  # None when the body is a JSON object we understood
    agent_session: str | None = None  # the agent's conversation, from `metadata.user_id`


@dataclass(slots=True)
class _Tally:
    segments: list[str] = field(default_factory=list)
    fixed: int = 0

    def add(self, value: object) -> None:
        """A string counts as text; any other non-null value as its compact JSON."""
        if isinstance(value, str):
            if value:
                self.segments.append(value)
        elif value is not None:
            self.segments.append(compact_json(value))


def parse_request(body: bytes, api: Api) -> RequestInfo:
    """Everything the gateway needs from a request body; never raises."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _malformed("not JSON" if body.strip() else "empty body")
    if not isinstance(doc, dict):
        return _malformed("not a JSON object")
    tally = _Tally()
    if api is Api.ANTHROPIC:
        _anthropic(doc, tally)
    else:
        _openai(doc, tally)
    model = doc.get("model")
    return RequestInfo(
        model=model if isinstance(model, str) else None,
        stream=doc.get("stream") is True,
        include_usage=_include_usage(doc) if api is Api.OPENAI else None,
        segments=tuple(tally.segments),
        fixed_tokens=tally.fixed,
        malformed=None,
        agent_session=agent_session_of(doc),
    )


async def parse_request_async(body: bytes, api: Api,
                              executor: concurrent.futures.Executor | None = None,
                              inline_limit_bytes: int = 256 * 1024) -> RequestInfo:
    """`parse_request`, in `executor` (None: the loop's default) for bodies of the limit or more.

    orjson holds the GIL while it parses (~2-3 ms per MB), so for big bodies the thread spares the
    loop the walk over the document and the freeing of it, not the parse itself.
    """
    if len(body) < inline_limit_bytes:
        return parse_request(body, api)
    return await asyncio.get_running_loop().run_in_executor(executor, parse_request, body, api)


# A body whose top-level members before "model" are all scalars (SDKs built in JavaScript, Claude
# Code among them, send the model first): its model is read without parsing the conversation.
_MODEL_FIRST = re.compile(
    rb'\s*\{(?:\s*"(?:[^"\\]|\\.)*"\s*:\s*(?:"(?:[^"\\]|\\.)*"|-?[0-9][0-9.eE+-]*|true|false|null)\s*,)*?'
    rb'\s*"model"\s*:\s*"((?:[^"\\]|\\.)*)"')


class RequestPeek(NamedTuple):
    """What a record needs of a request body when the response reported its usage (a named
    tuple: one is built for nearly every request)."""

    model: str | None
    agent_session: str | None


def peek_request(body: bytes, session_known: bool = False) -> RequestPeek:
    """The top-level model and the agent's session of a JSON object, exactly as `parse_request`
    reads them, at a fraction of its cost on a long conversation: a body that names its model
    first and carries no `user_id` is not parsed at all, any other is parsed but not walked.
    (Of a body cut short, the peek still reads a model named first; the parse reads none.)
    `session_known`: the request's header named the session already (Claude Code sends it), so
    the body is not searched for one (that search costs ~0.2 ms on a 300 KB conversation)."""
    match = _MODEL_FIRST.match(body)
    if match is not None and (session_known or not mentions_user_id(body)):
        raw = match.group(1)
        if b"\\" not in raw:
            try:
                return RequestPeek(raw.decode(), None)
            except UnicodeDecodeError:
                pass
        else:
            try:
                return RequestPeek(orjson.loads(b'"' + raw + b'"'), None)
            except orjson.JSONDecodeError:
                pass
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return RequestPeek(None, None)
    if not isinstance(doc, dict):
        return RequestPeek(None, None)
    model = doc.get("model")
    return RequestPeek(model if isinstance(model, str) else None, agent_session_of(doc))


# The key `metadata.user_id` needs, as it must appear outside strings (inside one its quotes are
# escaped): a body without it has no session to read.
_USER_ID_KEY = b'"user_id"'


def mentions_user_id(body: bytes) -> bool:
    """Whether `body` may carry a `user_id` member. StringZilla's SIMD search, as `bytes.find`
    barely skips on JSON (quotes and common letters fill its skip filter): 18 vs 143 µs for a
    300 KB conversation (bench/RESULTS.md, issue 16, ninth session). `Str` is a view, no copy."""
    return Str(body).find(_USER_ID_KEY) >= 0


# Claude Code's `metadata.user_id`: `user_<hash>_account_<uuid>_session_<uuid>`.
_SESSION_IN_USER_ID = re.compile(r"session_([0-9A-Za-z-]{8,64})")
MAX_SESSION_CHARS = 64


def agent_session_of(doc: dict[str, object]) -> str | None:
    """The agent's session inside `metadata.user_id`, if the client put one there."""
    metadata = doc.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not isinstance(user_id, str):
        return None
    match = _SESSION_IN_USER_ID.search(user_id)
    return match.group(1) if match else None


def clean_session(value: str | None) -> str | None:
    """A session id a client sent in a header, if it looks like one (bounded, printable)."""
    if not value:
        return None
    value = value.strip()
    if not value or len(value) > MAX_SESSION_CHARS or not value.isprintable():
        return None
    return value


def _malformed(reason: str) -> RequestInfo:
    return RequestInfo(model=None, stream=False, include_usage=None, segments=(), fixed_tokens=0,
                       malformed=reason)


def _include_usage(doc: dict[str, object]) -> bool | None:
    options = doc.get("stream_options")
    if not isinstance(options, dict):
        return None
    value = options.get("include_usage")
    return value if isinstance(value, bool) else None


def _messages(doc: dict[str, object], tally: _Tally) -> list[dict[str, object]]:
    """The well-formed messages, with their per-message overhead tallied; others count as JSON."""
    messages = doc.get("messages")
    if not isinstance(messages, list):
        tally.add(messages)
        return []
    good = []
    for message in messages:
        if isinstance(message, dict):
            good.append(message)
        else:
            tally.add(message)
    tally.fixed += MESSAGE_OVERHEAD_TOKENS * len(messages)
    if messages:
        tally.fixed += REPLY_PRIMING_TOKENS
    return good


def _each(value: object, tally: _Tally) -> list[object]:
    """The items of a list-valued field; a non-list value counts as JSON and yields nothing."""
    if isinstance(value, list):
        return value
    tally.add(value)
    return []


# -- Anthropic Messages ---------------------------------------------------------------------------

def _anthropic(doc: dict[str, object], tally: _Tally) -> None:
    for tool in _each(doc.get("tools"), tally):
        tally.add(_anthropic_tool(tool))
    _anthropic_content(doc.get("system"), tally, 0)
    for message in _messages(doc, tally):
        _anthropic_content(message.get("content"), tally, 0)


def _anthropic_tool(tool: object) -> str:
    """One segment per tool definition, so each is cached as a unit."""
    if isinstance(tool, dict) and "input_schema" in tool:
        return "\n".join((_str(tool.get("name")), _str(tool.get("description")),
                          compact_json(tool.get("input_schema"))))
    return compact_json(tool)  # server tools (web search, ...) and anything unexpected


def _anthropic_content(content: object, tally: _Tally, depth: int) -> None:
    """`system`, a message's `content`, or a tool result's `content`: a string or blocks."""
    if isinstance(content, list):
        for block in content:
            _anthropic_block(block, tally, depth)
    else:
        tally.add(content)


def _anthropic_block(block: object, tally: _Tally, depth: int) -> None:
    if not isinstance(block, dict) or depth > MAX_BLOCK_DEPTH:
        tally.add(block)
        return
    match block.get("type"):
        case "text":
            tally.add(block.get("text"))
        case "thinking":
            tally.add(block.get("thinking"))
        case "tool_use" | "server_tool_use":
            tally.add(f"{_str(block.get('name'))} {compact_json(block.get('input'))}")
        case "tool_result":
            _anthropic_content(block.get("content"), tally, depth + 1)
        case "image":
            tally.fixed += IMAGE_TOKENS
        case "document":
            _anthropic_document(block, tally, depth)
        case _:
            tally.add(block)


def _anthropic_document(block: dict[str, object], tally: _Tally, depth: int) -> None:
    tally.add(block.get("title"))
    tally.add(block.get("context"))
    source = block.get("source")
    if not isinstance(source, dict):
        tally.add(source)
        return
    kind, data = source.get("type"), source.get("data")
    if kind == "text":
        tally.add(data)
    elif kind == "content":
        _anthropic_content(source.get("content"), tally, depth + 1)
    elif kind == "base64" and isinstance(data, str):
        tally.fixed += pdf_tokens(len(data))
    else:  # url / file id: size unknown
        tally.fixed += PDF_MIN_TOKENS


# -- OpenAI chat completions ----------------------------------------------------------------------

def _openai(doc: dict[str, object], tally: _Tally) -> None:
    for tool in _each(doc.get("tools"), tally):
        function = tool.get("function") if isinstance(tool, dict) else None
        tally.add(_openai_function(function if isinstance(function, dict) else tool))
    for function in _each(doc.get("functions"), tally):  # the legacy form of `tools`
        tally.add(_openai_function(function))
    for message in _messages(doc, tally):
        _openai_message(message, tally)


def _openai_function(function: object) -> str:
    if isinstance(function, dict) and "name" in function:
        return "\n".join((_str(function.get("name")), _str(function.get("description")),
                          compact_json(function.get("parameters"))))
    return compact_json(function)


def _openai_message(message: dict[str, object], tally: _Tally) -> None:
    tally.add(message.get("name"))
    content = message.get("content")
    if isinstance(content, list):
        for part in content:
            _openai_part(part, tally)
    else:
        tally.add(content)
    for call in _each(message.get("tool_calls"), tally):
        function = call.get("function") if isinstance(call, dict) else None
        tally.add(_openai_call(function) if isinstance(function, dict) else call)
    legacy = message.get("function_call")
    tally.add(_openai_call(legacy) if isinstance(legacy, dict) else legacy)


def _openai_call(function: dict[str, object]) -> str:
    arguments = function.get("arguments")  # a JSON string, as the model wrote it
    text = arguments if isinstance(arguments, str) else compact_json(arguments)
    return f"{_str(function.get('name'))} {text}"


def _openai_part(part: object, tally: _Tally) -> None:
    if not isinstance(part, dict):
        tally.add(part)
        return
    match part.get("type"):
        case "text":
            tally.add(part.get("text"))
        case "refusal":
            tally.add(part.get("refusal"))
        case "image_url":
            tally.fixed += IMAGE_TOKENS
        case "file":
            file = part.get("file")
            data = file.get("file_data") if isinstance(file, dict) else None
            tally.fixed += pdf_tokens(len(data)) if isinstance(data, str) else PDF_MIN_TOKENS
        case _:
            tally.add(part)


# -- helpers --------------------------------------------------------------------------------------

def pdf_tokens(base64_chars: int) -> int:
    """The PDF rule (see the module docstring) for a base64 payload of this many characters."""
    decoded_bytes = base64_chars * 3 // 4
    return max(PDF_MIN_TOKENS, math.ceil(decoded_bytes / PDF_BYTES_PER_TOKEN))


def _str(value: object) -> str:
    return value if isinstance(value, str) else "" if value is None else compact_json(value)


def compact_json(value: object) -> str:
    """Compact JSON text of a parsed value, as the model would see it serialized."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson refuses nesting deeper than 254 levels: only hostile bodies do that
        return " ".join(_leaves(value))


def _leaves(value: object) -> list[str]:
    """The scalars of a value of any depth, without recursion."""
    out: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(reversed([v for kv in item.items() for v in kv]))
        elif isinstance(item, list):
            stack.extend(reversed(item))
        elif item is not None:
            out.append(item if isinstance(item, str) else compact_json(item))
    return out
