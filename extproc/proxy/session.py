"""Per-request state of the request filter, driven by the ext_proc phases.

One `RequestSession` lives for one HTTP request on the request filter's stream: it swaps the key,
admits the request to the account's limits (holding it in the fair queue), holds its slot until the
request ends, and sees the response status. Where the bodies pass this stream inline, it also
accounts for them and records the request. Where Envoy sends copies of the bodies to the observer
stream instead, that stream records the request (`observation.py`), perhaps on another replica:
the two never share memory. The first of them to claim the request's session in the state store
records it, so a request is recorded exactly once wherever its streams land (README: "One record
per request").

It knows nothing of gRPC: its inputs are plain header maps and bytes, its outputs are the plain
answers of `answers.py`.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Mapping

from extproc.accounting.request_body import clean_session
from extproc.api import Api, Endpoint, Entrance, entrance_for_path, error_body
from extproc.limiter.account import AccountLimiter
from extproc.limiter.admission import Permit, Rejected
from extproc.limiter.signals import Signal
from extproc.proxy import header_names
from extproc.proxy.answers import BodyChange, HeaderChanges, Hold, ImmediateReply
from extproc.proxy.attempt import AttemptVerdict
from extproc.proxy.keys import KeyUnavailable
from extproc.proxy.request_record import CLIENT_CLOSED, RequestRecord, with_usage_requested
from extproc.proxy.gateway import Claims, Gateway
from extproc.proxy.ticket import Ticket, new_session_id

__all__ = ["CLIENT_CLOSED", "Claims", "Gateway", "RequestSession", "client_token",
           "with_usage_requested"]

NOT_FOUND = ("zai-proxy: no such endpoint. Use POST /api/anthropic/v1/messages (or /v1/messages, "
             "/v1/messages/count_tokens) for the Anthropic API, POST /v1/chat/completions for the "
             "OpenAI API, GET /health or GET /metrics.")

# What Envoy answers when the upstream resets after its response headers, before they went out,
# and how soon after them the stream must end for that to be the case.
UPSTREAM_RESET_STATUS = 502
UPSTREAM_RESET_WINDOW = 0.05

# What a request's 2xx answer tells the limiter (failed attempts come from the attempt filter).
SUCCESS = AttemptVerdict(Signal.SUCCESS, None, None, None)


def client_token(headers: Mapping[str, str]) -> str | None:
    """The worker's credential: `x-api-key` (SDKs) or `Authorization: Bearer` (Claude Code)."""
    key = headers.get(header_names.API_KEY)
    if key:
        return key.strip()
    auth = headers.get(header_names.AUTHORIZATION, "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


@dataclass(eq=False, slots=True)
class RequestSession:
    """One HTTP request on the request filter's stream. `inline`: its bodies pass this stream
    (the route says so); otherwise they go to the observer stream as copies."""

    gateway: Gateway
    inline: bool = True
    session_id: str = field(default_factory=new_session_id)
    record: RequestRecord | None = None
    entrance: Entrance | None = None
    ticket: Ticket | None = None  # set once admitted: the request goes upstream
    permit: Permit | None = None
    _headers_seen_at: float | None = None
    _held: HeaderChanges | None = None  # the key swap of a request waiting for admission
    _done: bool = False

    @property
    def endpoint(self) -> Endpoint:
        return self.record.endpoint if self.record is not None else Endpoint.MESSAGES

    @property
    def api(self) -> Api:
        return self.entrance.api if self.entrance is not None else self.endpoint.api

    @property
    def worker(self) -> str:
        return self.record.worker if self.record is not None else "unknown"

    @property
    def status(self) -> int | None:
        return self.record.status if self.record is not None else None

    @status.setter
    def status(self, value: int | None) -> None:
        assert self.record is not None
        self.record.status = value

    # -- request headers: key swap and admission ---------------------------------------------------

    def on_request_headers(self, headers: Mapping[str, str]) -> HeaderChanges | ImmediateReply:
        """The key swap (and who the worker is); admission follows in `request_headers`."""
        entrance = self.entrance = entrance_for_path(headers.get(header_names.PATH, "/"))
        record = self.record = RequestRecord(
            self.gateway, entrance.endpoint or Endpoint.UNKNOWN, "unknown",
            headers.get(header_names.REQUEST_ID, ""), self.gateway.clock(), went_upstream=False,
            agent_session=clean_session(headers.get(header_names.AGENT_SESSION)))
        self.gateway.open.add(self)
        if entrance.endpoint is None:
            return self._reply(404, "not_found", NOT_FOUND)
        worker = self.gateway.worker_keys.identify(client_token(headers))
        if worker is None:
            return self._reply(401, "authentication",
                               "zai-proxy: missing or unknown worker key. Send the key your gateway "
                               "operator gave you as x-api-key or `Authorization: Bearer <key>`.")
        record.worker = worker
        try:
            key = self.gateway.upstream_key.current()
        except KeyUnavailable:
            return self._reply(503, "unavailable",
                               "zai-proxy: the upstream Z.AI key cannot be read (check "
                               "ZAI_API_KEY_FILE); the request was not sent. Retry shortly.")
        record.went_upstream = True
        return self._auth_changes(headers, key)

    async def request_headers(self, headers: Mapping[str, str]) -> HeaderChanges | ImmediateReply | Hold:
        """The request-headers phase: the key swap, then admission to the account's limits. The
        answer, or `Hold` when the request must wait for room on the account (Envoy must extend
        its message timeout first; then `admit_held` waits and gives the answer). A coroutine,
        not an async generator: every request passes here, and one of those costs a hook call
        and a weak reference per request."""
        answer = self.on_request_headers(headers)
        if not isinstance(answer, HeaderChanges):
            return answer
        limiter = self._limiter()
        if limiter is not None:
            try:
                self.permit = await limiter.try_admit(
                    self.worker, priority=self.gateway.worker_keys.is_priority(self.worker))
            except Rejected as refused:
                return self._rejected(refused)
            if self.permit is None:
                self._held = answer
                return Hold(limiter.settings.max_wait)
        return self._admitted(answer)

    async def admit_held(self) -> HeaderChanges | ImmediateReply:
        """The answer to a request `request_headers` held: after its wait in the fair queue."""
        limiter, answer = self.gateway.limiter, self._held
        assert limiter is not None and answer is not None
        try:
            self.permit = await limiter.admit_waiting(self.worker)
        except Rejected as refused:
            return self._rejected(refused)
        return self._admitted(answer)

    def _admitted(self, answer: HeaderChanges) -> HeaderChanges:
        """From here on the request may reach an observer stream, which takes the ticket."""
        record = self.record
        assert record is not None
        self.ticket = Ticket(self.session_id, record.worker, record.endpoint, record.request_id,
                             record.started, record.agent_session)
        if self.permit is not None:
            self.gateway.admitted[self.session_id] = self.upstream_answered
        if not self.inline:  # an observer stream here decides who records it without the store
            self.gateway.claims.expect(self.session_id)
        return answer

    def _limiter(self) -> AccountLimiter | None:
        """The limiter, when this request goes through it (count_tokens costs the account nothing)."""
        limiter = self.gateway.limiter
        if (limiter is None or self.record is None or not self.record.went_upstream
                or self.endpoint is Endpoint.COUNT_TOKENS):
            return None
        return limiter

    def _rejected(self, rejection: Rejected) -> ImmediateReply:
        assert self.record is not None
        self.record.went_upstream = False
        retry_after = str(max(1, math.ceil(rejection.retry_after)))
        return self._reply(429, "rate_limit", rejection.message,
                           details=f"zai_proxy_{rejection.reason}",
                           headers=(("retry-after", retry_after),))

    # -- bodies (inline routes only) ---------------------------------------------------------------

    async def on_request_body(self, body: bytes, end_of_stream: bool) -> BodyChange | None:
        assert self.record is not None
        return await self.record.on_request_body(body, mutable=True)

    def on_response_body(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        """Account for one chunk (the hot path); return replacement bytes or None."""
        record = self.record
        return record.on_response_body(chunk, end_of_stream) if record is not None else None

    # -- response headers ------------------------------------------------------------------------

    def on_response_headers(self, headers: Mapping[str, str], end_of_stream: bool) -> None:
        """The response status (inline routes; elsewhere the observer stream sees it)."""
        assert self.record is not None
        self._headers_seen_at = self.gateway.clock()
        self.record.on_response_headers(headers, end_of_stream)
        if 200 <= (self.record.status or 0) < 300:
            self.upstream_answered()

    def upstream_answered(self) -> None:
        """Z.AI took the request: the limiter learns the success, and the slot counts as load."""
        if self.permit is not None and not self.permit.answered:
            self.gateway.on_attempt(SUCCESS)
            self.permit.mark_answered()

    async def response_headers(self, headers: Mapping[str, str], end_of_stream: bool) -> dict[str, object] | None:
        """The response-headers phase; a response without a body ends an inline request here
        (what the recorder reports goes into Envoy's dynamic metadata)."""
        self.on_response_headers(headers, end_of_stream)
        if end_of_stream and self.inline:
            return await self.complete(completed=True)
        return None

    # -- the end ---------------------------------------------------------------------------------

    async def complete(self, completed: bool) -> dict[str, object] | None:
        """The request is over on this stream: the slot goes back, and the request is recorded
        here unless its observer stream records it. Returns what the recorder reports (for
        Envoy's dynamic metadata), or None when not recorded here. Runs once."""
        if self._done:
            return None
        self._done = True
        try:
            if self.permit is not None:
                # First, and whatever happens below: the slot goes back exactly once.
                self.gateway.admitted.pop(self.session_id, None)
                await self.permit.release(None)
            if self.record is None:
                return None
            if self.inline and not completed:
                self._upstream_reset_before_headers_went_out()
            if self.inline or self.ticket is None or await self._observer_absent():
                return await self.record.record(completed)
            return None
        finally:
            self.gateway.open.discard(self)

    def _upstream_reset_before_headers_went_out(self) -> None:
        """This stream held the response headers (inline routes answer them). If the upstream
        reset before Envoy had this stream's answer, Envoy never sent those headers: the client
        got Envoy's 502 instead. That is a 2xx with no body chunk (Envoy sends those only after
        the headers went on) whose stream closed at once; a client that leaves while waiting for
        the first token does so later, and saw the 2xx."""
        record = self.record
        assert record is not None
        if (200 <= (record.status or 0) < 300 and not record.body_seen
                and not record.response_ended and self._headers_seen_at is not None
                and self.gateway.clock() - self._headers_seen_at < UPSTREAM_RESET_WINDOW):
            record.status = UPSTREAM_RESET_STATUS

    async def _observer_absent(self) -> bool:
        """Whether this stream must record the request because its observer stream never claimed
        it: the client left before any body went by, or that stream was lost."""
        claims = self.gateway.claims
        assert self.ticket is not None
        if await claims.settle(self.session_id):
            return False
        await asyncio.sleep(self.gateway.observer_grace)
        return await claims.claim(self.session_id)

    # -- helpers ---------------------------------------------------------------------------------

    def _auth_changes(self, headers: Mapping[str, str], key: str) -> HeaderChanges:
        internal = tuple(name for name in headers if name.startswith(header_names.INTERNAL_PREFIX))
        # Bodies must stay readable for token accounting.
        identity = ("accept-encoding", "identity")
        # A trailing or repeated slash is taken off: the route and Z.AI know the bare path.
        path = ((":path", self.entrance.normalised),) if self.entrance and self.entrance.normalised else ()
        if self.api is Api.ANTHROPIC:
            return HeaderChanges(set=(("x-api-key", key), identity) + path,
                                 remove=("authorization",) + internal)
        return HeaderChanges(set=(("authorization", f"Bearer {key}"), identity) + path,
                             remove=("x-api-key",) + internal)

    def _reply(self, status: int, kind: str, message: str, details: str | None = None,
               headers: tuple[tuple[str, str], ...] = ()) -> ImmediateReply:
        assert self.record is not None
        self.record.status = status
        return ImmediateReply(status, error_body(self.api, kind, message),
                              (("content-type", "application/json"),) + headers,
                              details or f"zai_proxy_{kind}")
