"""Per-request state, driven by the ext_proc phases.

One `RequestSession` lives for one HTTP request. The gRPC servicer feeds it the phases Envoy sends
(request headers, request body, response headers, response body chunks) and translates what it
returns into protobuf. It knows nothing of gRPC: its inputs are plain header maps and bytes, its
outputs are `HeaderChanges`, replacement bodies or an `ImmediateReply`, and `complete` records
the request exactly once however it ends.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol


from extproc.api import Api, Endpoint, endpoint_for_path, error_body
from extproc.proxy.answers import BodyChange, HeaderChanges, Hold, ImmediateReply
from extproc.proxy.outcome import Outcome, Recorder, Tokens
from extproc.proxy.keys import KeyUnavailable, UpstreamKey, WorkerKeys
from extproc.limiter.account import AccountLimiter
from extproc.limiter.admission import Permit, Rejected
from extproc.proxy.attempt import AttemptVerdict
from extproc.limiter.signals import Signal
from extproc.accounting.json_splice import set_member
from extproc.accounting.request_body import RequestInfo
from extproc.accounting.response_body import ResponseBody
from extproc.accounting.usage import ResponseFacts

# Headers the gateway uses internally to carry identity or variant: never accepted from clients.
INTERNAL_HEADER_PREFIX = "x-zai-proxy-"

# Status recorded when the client went away before any response (nginx's convention).
CLIENT_CLOSED = 499

# How long a finished request waits for the observer stream's last copies before it is recorded:
# Envoy keeps that stream open 1 s after the request (envoy.yaml, deferred_close_timeout).
OBSERVER_WAIT_SECONDS = 2.5
# ... and for an observer stream that never showed up (no body, no response: nothing to wait for,
# unless its first message is still in flight).
OBSERVER_ABSENT_WAIT_SECONDS = 0.25

_session_ids = itertools.count(1)

# What a request's 2xx answer tells the limiter (failed attempts come from the attempt filter).
SUCCESS = AttemptVerdict(Signal.SUCCESS, None, None, None)


class Estimator(Protocol):
    """Token counting (tiktoken, cached, off the event loop for large inputs)."""

    async def parse(self, body: bytes, api: Api) -> RequestInfo: ...
    async def count(self, info: RequestInfo) -> int: ...
    async def count_text(self, text: str) -> int: ...


@dataclass
class Gateway:
    """Long-lived collaborators shared by every session."""

    upstream_key: UpstreamKey
    worker_keys: WorkerKeys
    recorder: Recorder
    estimator: Estimator
    clock: Callable[[], float] = time.monotonic
    count_tokens: bool = True
    limiter: AccountLimiter | None = None
    max_request_body_bytes: int = 32 * 1024 * 1024
    on_attempt: Callable[[AttemptVerdict], None] = lambda verdict: None
    # Requests between their headers and their record, by session id: the observer stream
    # (Envoy's copies of bodies) finds its request here.
    sessions: dict[str, "RequestSession"] = field(default_factory=dict)


def client_token(headers: Mapping[str, str]) -> str | None:
    """The worker's credential: `x-api-key` (SDKs) or `Authorization: Bearer` (Claude Code)."""
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def with_usage_requested(body: bytes) -> bytes:
    """The OpenAI request body with `stream_options.include_usage` on, every other byte as sent."""
    return set_member(body, ("stream_options", "include_usage"), b"true")


@dataclass
class RequestSession:
    """One HTTP request. Its phases arrive on one or two ext_proc streams: the request filter's
    (headers; on inline routes also the bodies, answered in place) and, on observed routes, the
    observer's (copies of the request body, response headers and response body, not answered)."""

    gateway: Gateway
    session_id: str = field(default_factory=lambda: str(next(_session_ids)))
    started: float = 0.0
    endpoint: Endpoint = Endpoint.MESSAGES
    worker: str = "unknown"
    request_id: str = ""
    status: int | None = None
    info: RequestInfo | None = None
    response: ResponseBody | None = None
    usage_injected: bool = False
    _input_count: asyncio.Future[int] | None = None
    permit: Permit | None = None
    _done: bool = field(default=False)
    _tokens_expected: bool = False  # the request went upstream, so it may have cost tokens
    response_ended: bool = False  # the response's last byte went by
    _observer: asyncio.Event | None = None  # set once the observer stream is attached, when it is done
    _request_parts: list[bytes] = field(default_factory=list)
    _request_size: int = 0

    @property
    def api(self) -> Api:
        return self.endpoint.api

    # -- phases -----------------------------------------------------------------------------

    def on_request_headers(self, headers: Mapping[str, str]) -> HeaderChanges | ImmediateReply:
        self.started = self.gateway.clock()
        self.endpoint = endpoint_for_path(headers.get(":path", "/"))
        self.request_id = headers.get("x-request-id", "")
        worker = self.gateway.worker_keys.identify(client_token(headers))
        if worker is None:
            return self._reply(401, "authentication",
                               "zai-proxy: missing or unknown worker key. Send the key your gateway "
                               "operator gave you as x-api-key or `Authorization: Bearer <key>`.")
        self.worker = worker
        try:
            key = self.gateway.upstream_key.current()
        except KeyUnavailable:
            return self._reply(503, "unavailable",
                               "zai-proxy: the upstream Z.AI key cannot be read (check "
                               "ZAI_API_KEY_FILE); the request was not sent. Retry shortly.")
        self._tokens_expected = True
        self.gateway.sessions[self.session_id] = self
        return self._auth_changes(headers, key)

    async def on_request_body(self, body: bytes, end_of_stream: bool, mutable: bool = True) -> BodyChange | None:
        """The whole request body (BUFFERED mode, or the observer's copies put together): what
        was asked, and the input estimate. A change is only proposed when it can be made."""
        info = await self.gateway.estimator.parse(body, self.api)
        self.info = info
        # The input is counted only if the response does not report it (_input_estimate): Z.AI
        # almost always does, so the common request costs no tokenizer time at all.
        if (mutable and self.endpoint is Endpoint.CHAT_COMPLETIONS and info.malformed is None
                and info.stream and not info.include_usage):
            # Ask for the usage chunk on the client's behalf; it is removed from the response.
            new_body = with_usage_requested(body)
            self.usage_injected = True
            return BodyChange(new_body, HeaderChanges(set=(("content-length", str(len(new_body))),)))
        return None

    async def request_headers(self, headers: Mapping[str, str]) -> AsyncIterator[HeaderChanges | ImmediateReply | Hold]:
        """The request-headers phase: the key swap, then admission to the account's limits (the
        request waits here, before anything goes upstream, until the account has room). Yields
        `Hold` first when admission will keep it waiting, then the answer."""
        answer = self.on_request_headers(headers)
        if isinstance(answer, HeaderChanges):
            limiter = self._limiter()
            if limiter is not None:
                if limiter.will_wait():
                    yield Hold(limiter.settings.max_wait)
                rejection = await self._admit(limiter)
                if rejection is not None:
                    answer = rejection
        yield answer
        if isinstance(answer, ImmediateReply):
            await self.complete(completed=True)

    def _limiter(self) -> AccountLimiter | None:
        """The limiter, when this request goes through it (count_tokens costs the account nothing)."""
        limiter = self.gateway.limiter
        if limiter is None or not self._tokens_expected or self.endpoint is Endpoint.COUNT_TOKENS:
            return None
        return limiter

    async def _admit(self, limiter: AccountLimiter) -> ImmediateReply | None:
        """Hold the request until the account has room; a 429 in the client's format if not."""
        # Admission comes at the request headers, before the body: nothing is charged to a token
        # budget now; the real usage is, when the request ends (settle_budget).
        try:
            self.permit = await limiter.admit(self.worker, 0)
        except Rejected as rejection:
            self._tokens_expected = False
            retry_after = str(max(1, math.ceil(rejection.retry_after)))
            return self._reply(429, "rate_limit", rejection.message,
                               details=f"zai_proxy_{rejection.reason}",
                               headers=(("retry-after", retry_after),))
        return None

    # -- the observer's copies ---------------------------------------------------------------

    def observer_attached(self) -> None:
        self._observer = asyncio.Event()

    def observer_done(self) -> None:
        if self._observer is not None:
            self._observer.set()

    async def on_request_chunk(self, chunk: bytes, end_of_stream: bool) -> None:
        """A copy of a request body chunk; the whole body is read at its end (nothing to change:
        it has gone upstream already)."""
        if self._request_size <= self.gateway.max_request_body_bytes:
            self._request_parts.append(chunk)
            self._request_size += len(chunk)
        if end_of_stream:
            body = b"".join(self._request_parts)
            self._request_parts = []
            await self.on_request_body(body, True, mutable=False)

    # -- response -----------------------------------------------------------------------------

    def on_response_headers(self, headers: Mapping[str, str], end_of_stream: bool) -> None:
        self.status = int(headers.get(":status", "0") or 0)
        if self.permit is not None and 200 <= self.status < 300:
            # Failed attempts are reported by the per-attempt filter; the success, from here.
            self.gateway.on_attempt(SUCCESS)
            self.permit.mark_answered()
        streaming = "text/event-stream" in headers.get("content-type", "")
        self.response = ResponseBody(self.api, streaming, self.usage_injected and streaming)
        if end_of_stream:
            self._response_end()

    def on_response_body(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        """Account for one chunk (the hot path); return replacement bytes or None."""
        response = self.response
        if response is None:
            return None
        if end_of_stream:
            self._response_end()
        return response.feed(chunk, end_of_stream, self.gateway.clock())

    def _response_end(self) -> None:
        self.response_ended = True
        self.observer_done()

    async def complete(self, completed: bool) -> dict[str, object] | None:
        """Settle the counts and record the outcome, once. Returns what the recorder reports
        (for Envoy's dynamic metadata), or None when already recorded."""
        if self._done:
            return None
        self._done = True
        try:
            return await self._record(completed)
        finally:
            self.gateway.sessions.pop(self.session_id, None)

    async def _record(self, completed: bool) -> dict[str, object] | None:
        if self.permit is not None:
            # First, and whatever happens below: the slot goes back exactly once.
            await self.permit.release(None)
        if self._tokens_expected and not self.response_ended:
            await self._wait_for_observer()
        completed = completed or self.response_ended
        status = self.status if self.status is not None else CLIENT_CLOSED
        facts = self.response.facts if self.response is not None else ResponseFacts()
        requested = self.info.model if self.info is not None else None
        # Only a successful generation costs tokens; a rejection (429, 401, ...) or a
        # count_tokens call does not.
        billable = (self._tokens_expected and 200 <= status < 300
                    and self.endpoint is not Endpoint.COUNT_TOKENS)
        tokens = await self._settle(facts) if billable else None
        first = facts.first_token_at
        if self.permit is not None and self.gateway.limiter is not None:
            actual = tokens.input + tokens.output if tokens is not None else 0
            await self.gateway.limiter.settle_budget(self.worker, 0, actual)
        return self.gateway.recorder.record(Outcome(
            endpoint=self.endpoint, worker=self.worker, request_id=self.request_id, status=status,
            duration=max(0.0, self.gateway.clock() - self.started), completed=completed,
            requested_model=requested, model=facts.model or requested, tokens=tokens,
            time_to_first_token=None if first is None else max(0.0, first - self.started),
            error_type=facts.error_type, error_code=facts.error_code,
            malformed_request=self.info.malformed if self.info is not None else None))

    # -- helpers ----------------------------------------------------------------------------

    async def _wait_for_observer(self) -> None:
        """On observed routes the request ends (this stream closes) while the observer's last
        copies may still be on their way: wait for them, within bounds."""
        observer = self._observer
        try:
            if observer is None:
                await asyncio.sleep(OBSERVER_ABSENT_WAIT_SECONDS)
                observer = self._observer
            if observer is not None:
                await asyncio.wait_for(observer.wait(), OBSERVER_WAIT_SECONDS)
        except asyncio.TimeoutError:
            pass

    async def _settle(self, facts: ResponseFacts) -> Tokens:
        """Reported usage where Z.AI sent it; estimates where it did not."""
        usage = facts.usage
        input_tokens, input_estimated = usage.input, False
        if input_tokens is None:
            input_tokens, input_estimated = await self._input_estimate(), True
        output_tokens, output_estimated = usage.output, False
        if not facts.output_final:
            # Cut, or silent about usage: count what was delivered.
            output_tokens, output_estimated = await self._delivered_estimate(), True
        return Tokens(input=input_tokens or 0, output=output_tokens or 0,
                      cache_read=usage.cache_read or 0, cache_write=usage.cache_write or 0,
                      input_estimated=input_estimated, output_estimated=output_estimated)

    async def _input_estimate(self) -> int:
        info = self.info
        if self._input_count is None:
            if (info is None or info.malformed is not None or not self.gateway.count_tokens
                    or self.endpoint is Endpoint.COUNT_TOKENS):
                return 0
            self._input_count = asyncio.ensure_future(self.gateway.estimator.count(info))
        try:
            return await self._input_count
        except Exception:  # an estimate is best effort; the request already went through
            return 0

    async def _delivered_estimate(self) -> int:
        if self.response is None or not self.gateway.count_tokens:
            return 0
        text = self.response.delivered_text()
        return await self.gateway.estimator.count_text(text) if text else 0

    def _auth_changes(self, headers: Mapping[str, str], key: str) -> HeaderChanges:
        internal = tuple(name for name in headers if name.startswith(INTERNAL_HEADER_PREFIX))
        # Bodies must stay readable for token accounting.
        identity = ("accept-encoding", "identity")
        if self.api is Api.ANTHROPIC:
            return HeaderChanges(set=(("x-api-key", key), identity),
                                 remove=("authorization",) + internal)
        return HeaderChanges(set=(("authorization", f"Bearer {key}"), identity),
                             remove=("x-api-key",) + internal)

    def _reply(self, status: int, kind: str, message: str, details: str | None = None,
               headers: tuple[tuple[str, str], ...] = ()) -> ImmediateReply:
        self.status = status
        return ImmediateReply(status, error_body(self.api, kind, message),
                              (("content-type", "application/json"),) + headers,
                              details or f"zai_proxy_{kind}")
