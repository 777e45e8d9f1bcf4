"""The emulator's aiohttp application: Z.AI's API routes plus /_emulator control routes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import socket
import struct
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import anthropic_sse, monitor, openai_sse
from .content import tokenizer_name
from .errors import (
    ApiFormat,
    ZaiError,
    auth_missing,
    auth_wrong,
    bad_options_header,
    error_body,
    internal_error,
    overloaded,
    quota_exhausted,
    rejection,
    weekly_limit_exhausted,
)
from .limits import Limits
from .options import OPTIONS_HEADER, EmulatorOptions, parse_reject_models
from .quota import FIVE_HOUR, TOOLS, QuotaWindows, WindowView
from .records import RequestLog, redact_path
from .reply import (
    Reply,
    SseEvent,
    StreamPlan,
    failure,
    input_tokens_for,
    plan_reply,
    response_model,
    validate_request,
)

log = logging.getLogger(__name__)

ANTHROPIC_PREFIX = "/api/anthropic"
OPENAI_PREFIXES = ("/api/coding/paas/v4", "/api/paas/v4")
# Agent requests reach several MB (whole conversations); aiohttp's default is 1 MiB.
MAX_BODY_BYTES = 64 * 1024 * 1024
# How often a sleeping handler checks whether its client has gone.
_WATCH_STEP = 0.05

Clock = Callable[[], float]


@dataclass
class EmulatorState:
    """Everything the handlers share. `options` is the live object the control API edits."""

    options: EmulatorOptions
    clock: Clock
    wall_clock: Clock
    limits: Limits = field(default_factory=Limits)
    quota: QuotaWindows = field(default_factory=QuotaWindows)
    log: RequestLog = field(default_factory=RequestLog)
    outcomes: Counter[str] = field(default_factory=Counter)
    # Quota endpoint answers by business code (200 = success), for GET /_emulator/stats.
    quota_calls: Counter[str] = field(default_factory=Counter)
    # server_error_percent: what the requests that asked for errors have accumulated.
    server_error_credit: float = 0.0

    def server_error_due(self, percent: float) -> bool:
        """Whether this request is one of the `percent`% that fail (evenly spread)."""
        self.server_error_credit += percent / 100.0
        if self.server_error_credit >= 1.0 - 1e-9:
            self.server_error_credit -= 1.0
            return True
        return False


STATE = web.AppKey("emulator_state", EmulatorState)


class ClientGone(Exception):
    """The client closed the connection while we were still answering."""


def build_app(
    options: EmulatorOptions,
    *,
    clock: Clock = time.monotonic,
    wall_clock: Clock = time.time,
) -> web.Application:
    """The emulator app. `clock` (monotonic seconds) drives the rate window and the
    `quota_requests` reset; `wall_clock` (epoch seconds) dates reset messages and
    drives the 5-hour and weekly quota windows (Z.AI states those as wall-clock
    instants). Both are injectable so tests control time exactly; sleeps use real
    time."""
    tokenizer_name()  # load the tokenizer now, not inside the first request
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE] = EmulatorState(options, clock, wall_clock)
    app.router.add_post(f"{ANTHROPIC_PREFIX}/v1/messages", _anthropic_messages)
    app.router.add_post(f"{ANTHROPIC_PREFIX}/v1/messages/count_tokens", _count_tokens)
    for prefix in OPENAI_PREFIXES:
        app.router.add_post(f"{prefix}/chat/completions", _openai_chat)
    app.router.add_get(monitor.PATH, _quota_limit)
    app.router.add_get("/_emulator/config", _get_config)
    app.router.add_post("/_emulator/config", _post_config)
    app.router.add_get("/_emulator/requests", _get_requests)
    app.router.add_post("/_emulator/reset", _post_reset)
    app.router.add_get("/_emulator/stats", _get_stats)
    app.router.add_get("/_emulator/quota", _get_quota)
    app.router.add_post("/_emulator/quota", _post_quota)
    return app


# ---------------------------------------------------------------- API routes


async def _anthropic_messages(request: web.Request) -> web.StreamResponse:
    return await _api_call(request, ApiFormat.ANTHROPIC, _generate)


async def _count_tokens(request: web.Request) -> web.StreamResponse:
    return await _api_call(request, ApiFormat.ANTHROPIC, _count)


async def _openai_chat(request: web.Request) -> web.StreamResponse:
    return await _api_call(request, ApiFormat.OPENAI, _generate)


Action = Callable[..., Awaitable[web.StreamResponse]]


async def _api_call(
    request: web.Request, fmt: ApiFormat, action: Action
) -> web.StreamResponse:
    """Record, authenticate and validate an API call (and its per-request options
    header), then hand it to `action`."""
    state = request.app[STATE]
    options = dataclasses.replace(state.options)  # in-flight requests keep their view
    raw = await request.read()
    record = state.log.start(
        method=request.method,
        path=request.path,
        query=request.query_string,
        headers=request.headers.items(),
        body=raw,
        api_format=fmt.value,
        api_key=options.api_key,
        wall=state.wall_clock(),
        request_id=request.headers.get("x-request-id"),
    )
    started = time.perf_counter()
    try:
        body = _parse_json(raw)
        if isinstance(body, dict):
            state.log.note_body(record, body)
        error = _check_auth(request, fmt, options.api_key)
        if error is None:
            try:
                options = options.with_request_overrides(
                    request.headers.getall(OPTIONS_HEADER, [])
                )
            except ValueError as exc:
                error = bad_options_header(OPTIONS_HEADER, str(exc))
        error = error or validate_request(body)
        if error is not None:
            state.limits.note_rejection(error.code)
            return _error_response(fmt, error, options, record, "rejected")
        assert isinstance(body, dict)
        return await action(request, state, options, fmt, body, record)
    except (ClientGone, ConnectionResetError):
        record["outcome"] = "client_gone"
        return web.Response(status=499)  # never delivered; aiohttp drops it quietly
    except asyncio.CancelledError:  # the runner cancels handlers of vanished clients
        record["outcome"] = "client_gone"
        raise
    finally:
        state.outcomes[record["outcome"]] += 1
        _log_request(request, record, options.api_key, time.perf_counter() - started)


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError included; nesting past Python's limit
        return None


def _check_auth(request: web.Request, fmt: ApiFormat, api_key: str) -> ZaiError | None:
    """Z.AI's rules: the Anthropic endpoint reads x-api-key if present, else
    Authorization: Bearer; the OpenAI endpoints read only Authorization: Bearer."""
    presented = _presented_key(request, fmt)
    if presented is None:
        return auth_missing()
    if hmac.compare_digest(presented.encode("utf-8"), api_key.encode("utf-8")):
        return None
    return auth_wrong(fmt)


def _presented_key(request: web.Request, fmt: ApiFormat) -> str | None:
    if fmt is ApiFormat.ANTHROPIC and request.headers.get("x-api-key"):
        return request.headers["x-api-key"]
    authorization = request.headers.get("Authorization", "").strip()
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else authorization


def _error_response(
    fmt: ApiFormat,
    error: ZaiError,
    options: EmulatorOptions,
    record: dict[str, Any],
    outcome: str,
) -> web.Response:
    record.update(status=error.status, code=error.code, outcome=outcome)
    body = error_body(fmt, error, options.anthropic_429_type)
    return web.json_response(body, status=error.status, headers=error.headers)


async def _count(
    request: web.Request,
    state: EmulatorState,
    options: EmulatorOptions,
    fmt: ApiFormat,
    body: dict[str, Any],
    record: dict[str, Any],
) -> web.Response:
    # Not throttled: counting is cheap and does not occupy the model.
    record.update(status=200, outcome="completed")
    tokens = input_tokens_for(body, options)
    return web.json_response(anthropic_sse.count_tokens_body(tokens))


async def _generate(
    request: web.Request,
    state: EmulatorState,
    options: EmulatorOptions,
    fmt: ApiFormat,
    body: dict[str, Any],
    record: dict[str, Any],
) -> web.StreamResponse:
    key_id = hashlib.sha256(options.api_key.encode("utf-8")).hexdigest()
    limits = state.limits
    error = _refusal(state, options, fmt, body)
    if error is not None:
        limits.note_rejection(error.code)
        return _error_response(fmt, error, options, record, "rejected")
    error = limits.admit(key_id, options, state.clock(), state.wall_clock())
    if error is not None:
        return _error_response(fmt, error, options, record, "rejected")
    try:
        reply = plan_reply(body, options, _new_id(fmt), int(state.wall_clock()))
        if body.get("stream") is True:
            plan = _plan(fmt, reply, body, options)
            response = await _stream(request, plan, options, record)
        else:
            response = await _complete(request, fmt, reply, options, record)
        if record["outcome"] == "completed":
            state.quota.spend(_reply_tokens(reply), options, state.wall_clock())
        return response
    finally:
        limits.release(key_id)  # also on client disconnect (cancellation)


def _refusal(
    state: EmulatorState, options: EmulatorOptions, fmt: ApiFormat, body: dict[str, Any]
) -> ZaiError | None:
    """A refusal decided before the limits: `server_error_percent`, `reject_code`,
    then `reject_models`, then a spent quota window."""
    wall = state.wall_clock()
    requested = body.get("model")
    if options.server_error_percent and state.server_error_due(options.server_error_percent):
        return internal_error()
    if options.reject_code:
        return rejection(
            options.reject_code,
            fmt,
            model=response_model(requested, options.model_default),
            reset_epoch=wall + options.quota_reset_after,
            retry_after=options.quota_reset_after,
        )
    code = parse_reject_models(options.reject_models).get(str(requested))
    if code is not None:
        # 1311 names the model as the client asked for it: that is what is listed.
        return rejection(
            code,
            fmt,
            model=str(requested),
            reset_epoch=wall + options.quota_reset_after,
            retry_after=options.quota_reset_after,
        )
    spent = state.quota.blocking(options, wall)
    return None if spent is None else _window_refusal(spent, wall)


def _window_refusal(window: WindowView, wall: float) -> ZaiError:
    """1308 (5-hour) or 1310 (weekly), dated by the window's own next reset, so the
    message, retry-after and the quota endpoint's nextResetTime agree."""
    refuse = quota_exhausted if window.name == FIVE_HOUR else weekly_limit_exhausted
    return refuse(window.next_reset, window.next_reset - wall)


def _reply_tokens(reply: Reply) -> int:
    """What a completed response's usage reports, all kinds together: Z.AI's
    windows count every token the request cost."""
    return (reply.input_tokens + reply.output_tokens
            + reply.cache_read_tokens + reply.cache_write_tokens)


def _new_id(fmt: ApiFormat) -> str:
    if fmt is ApiFormat.ANTHROPIC:
        return "msg_" + uuid.uuid4().hex[:24]
    return "chatcmpl-" + uuid.uuid4().hex


def _plan(
    fmt: ApiFormat, reply: Reply, body: dict[str, Any], options: EmulatorOptions
) -> StreamPlan:
    if fmt is ApiFormat.ANTHROPIC:
        return anthropic_sse.stream_plan(reply, options)
    return openai_sse.stream_plan(reply, body, options)


async def _stream(
    request: web.Request,
    plan: StreamPlan,
    options: EmulatorOptions,
    record: dict[str, Any],
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)  # status + headers go out now, like a real server
    record["status"] = 200
    await _sleep_watching(request, options.first_event_delay)
    sent_text = False
    for index, event in enumerate(plan.events):
        generated = event.text is not None or event.error or index == plan.cut_at
        if generated and sent_text:
            await _sleep_watching(request, options.event_interval)
        if index == plan.cut_at:
            return _reset_connection(request, response, record)
        await _send_event(request, response, event, record)
        sent_text = sent_text or event.text is not None
    if plan.cut_at == len(plan.events):
        return _reset_connection(request, response, record)
    await response.write_eof()
    record["outcome"] = "error_event" if plan.events[-1].error else "completed"
    return response


async def _complete(
    request: web.Request,
    fmt: ApiFormat,
    reply: Reply,
    options: EmulatorOptions,
    record: dict[str, Any],
) -> web.StreamResponse:
    kind, after = failure(options)
    deltas = len(reply.deltas) if kind is None else min(after, len(reply.deltas))
    # Non-streaming still takes the time the stream would have taken.
    delay = options.first_event_delay + max(0, deltas - 1) * options.event_interval
    await _sleep_watching(request, delay)
    if kind == "disconnect":
        return _reset_connection(request, web.Response(), record)
    if kind == "error":
        return _error_response(fmt, overloaded(fmt), options, record, "error_response")
    record.update(status=200, outcome="completed")
    if fmt is ApiFormat.ANTHROPIC:
        data = anthropic_sse.message(reply)
        usage = anthropic_sse.recorded_usage(data["usage"])
    else:
        data = openai_sse.completion(reply)
        usage = openai_sse.recorded_usage(data["usage"])
    response = web.json_response(data)
    # Sent here rather than by aiohttp after we return, so the record's usage
    # means "delivered" (set first, so a client that has read it finds it).
    RequestLog.note_usage(record, usage)
    try:
        await response.prepare(request)
        await response.write_eof()
    except BaseException:
        RequestLog.note_usage(record, None)
        raise
    return response


async def _send_event(
    request: web.Request, response: web.StreamResponse, event: SseEvent, record: dict[str, Any]
) -> None:
    """Write one event; the one carrying the final usage also sets the record's usage
    (first, so a client that has read the event finds it; taken back on failure)."""
    if event.usage is None:
        await _write(request, response, event.encode())
        return
    RequestLog.note_usage(record, event.usage)
    try:
        await _write(request, response, event.encode())
    except BaseException:
        RequestLog.note_usage(record, None)
        raise


async def _write(request: web.Request, response: web.StreamResponse, data: bytes) -> None:
    if _client_gone(request):
        raise ClientGone()
    await response.write(data)


async def _sleep_watching(request: web.Request, seconds: float) -> None:
    """Sleep, but notice a client that goes away meanwhile (whatever the runner's
    handler_cancellation setting), so its concurrency slot is freed promptly."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        if _client_gone(request):
            raise ClientGone()
        await asyncio.sleep(min(remaining, _WATCH_STEP))
    if _client_gone(request):
        raise ClientGone()


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _reset_connection(
    request: web.Request, response: web.StreamResponse, record: dict[str, Any]
) -> web.StreamResponse:
    """Cut the TCP connection with an RST, as a crashed upstream or middlebox would."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                linger = struct.pack("ii", 1, 0)  # on, 0 s: close() sends RST
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        transport.abort()
    record["outcome"] = "disconnected"
    if record["status"] is None:
        record["status"] = 0  # nothing was sent
    return response


def _log_request(
    request: web.Request, record: dict[str, Any], api_key: str, seconds: float
) -> None:
    log.info(
        "%s %s %s code=%s outcome=%s %.3fs",
        request.method,
        redact_path(request.path, api_key),
        record["status"],
        record["code"] or "-",
        record["outcome"],
        seconds,
    )


# ---------------------------------------------------------------- control routes


async def _get_config(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].options.public_dict())


async def _post_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    changes = _parse_json(await request.read())
    try:
        state.options.update(changes)
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(state.options.public_dict())


async def _get_requests(request: web.Request) -> web.Response:
    return web.json_response({"requests": request.app[STATE].log.all()})


async def _post_reset(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.log.clear()
    state.limits.reset()
    state.quota.reset()
    state.outcomes.clear()
    state.quota_calls.clear()
    return web.json_response({"reset": True})


async def _get_stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    limits = state.limits
    return web.json_response(
        {
            "in_flight": limits.in_flight(),
            "max_in_flight": limits.max_in_flight,
            "accepted": limits.accepted,
            "rejected": dict(limits.rejected),
            "outcomes": dict(state.outcomes),
            "tokenizer": tokenizer_name(),
            "quota_endpoint_calls": dict(state.quota_calls),
        }
    )


async def _get_quota(request: web.Request) -> web.Response:
    state = request.app[STATE]
    views = state.quota.views(state.options, state.wall_clock())
    return web.json_response({name: view.public() for name, view in views.items()})


async def _post_quota(request: web.Request) -> web.Response:
    state = request.app[STATE]
    changes = _parse_json(await request.read())
    try:
        state.quota.control(changes, state.options, state.wall_clock())
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return await _get_quota(request)


# ---------------------------------------------------------------- quota endpoint


async def _quota_limit(request: web.Request) -> web.Response:
    """Z.AI's quota endpoint. Takes the per-request options header like the API
    routes (after the key check), so one test can ask for another shape."""
    state = request.app[STATE]
    status, body = _quota_answer(request, state)
    state.quota_calls[str(body["code"])] += 1
    return web.json_response(body, status=status)


def _quota_answer(request: web.Request, state: EmulatorState) -> tuple[int, dict[str, Any]]:
    refused = monitor.check_key(request.headers.get("Authorization"), state.options.api_key)
    if refused is not None:
        return refused
    try:
        options = state.options.with_request_overrides(
            request.headers.getall(OPTIONS_HEADER, [])
        )
    except ValueError as exc:
        problem = bad_options_header(OPTIONS_HEADER, str(exc))
        return 400, monitor.envelope(int(problem.code), problem.message)
    if options.quota_error:
        return 200, monitor.error_body(options.quota_error)
    wall = state.wall_clock()
    windows = state.quota.views(options, wall)
    tools = state.quota.view(TOOLS, options, wall)
    return 200, monitor.limits_body(windows, tools, options)
