"""What one request came to, put together from the phases that show it, and recorded once.

The request filter's session owns one when the bodies pass it inline; the observer stream owns one
when Envoy sends it copies instead (possibly on another replica). Either way it reads the request
body (what was asked, and for OpenAI streams asks for the usage chunk), follows the response
(status, usage, first token, error events) and turns it into one `Outcome` for the recorder.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Mapping

from extproc.accounting.json_splice import set_member
from extproc.accounting.request_body import RequestInfo, RequestPeek, peek_request
from extproc.accounting.response_body import ResponseBody
from extproc.accounting.usage import ResponseFacts
from extproc.api import Endpoint
from extproc.limiter.signals import Signal, classify
from extproc.proxy import header_names
from extproc.proxy.answers import BodyChange, HeaderChanges
from extproc.proxy.gateway import Gateway
from extproc.proxy.outcome import Outcome, Tokens

log = logging.getLogger(__name__)

# Status recorded when the client went away before any response (nginx's convention).
CLIENT_CLOSED = 499


def with_usage_requested(body: bytes) -> bytes:
    """The OpenAI request body with `stream_options.include_usage` on, every other byte as sent."""
    return set_member(body, ("stream_options", "include_usage"), b"true")


@dataclass(eq=False, slots=True)
class RequestRecord:
    gateway: Gateway
    endpoint: Endpoint
    worker: str
    request_id: str
    started: float  # on the gateway's clock
    status: int | None = None
    info: RequestInfo | None = None
    response: ResponseBody | None = None
    usage_injected: bool = False
    response_ended: bool = False  # the response's last byte went by
    body_seen: bool = False  # a response body chunk went by
    went_upstream: bool = True  # False: answered by the gateway itself (no tokens)
    agent_session: str | None = None  # from the client's session header (X-Claude-Code-Session-Id)
    session: str | None = None  # the ticket's session id, where it has one
    recorded: bool = False
    # The model the last upstream attempt was sent with, when MODEL_MAP / MODEL_FALLBACKS changed
    # it (the attempt filter says so in Envoy's dynamic metadata); the client's body names the
    # requested one.
    attempted_model: str | None = None
    _input_count: asyncio.Future[int] | None = None
    _request_parts: list[bytes] = field(default_factory=list)
    _request_size: int = 0

    # -- request ------------------------------------------------------------------------------

    async def on_request_body(self, body: bytes, mutable: bool) -> BodyChange | None:
        """The whole request body: what was asked. A change is proposed only when it can be made
        (inline) and is needed (an OpenAI stream that did not ask for usage)."""
        info = await self.gateway.estimator.parse(body, self.endpoint.api)
        self.info = info
        # The input is counted only if the response does not report it (_input_estimate): Z.AI
        # almost always does, so the common request costs no tokenizer time at all.
        if (mutable and self.endpoint is Endpoint.CHAT_COMPLETIONS and info.malformed is None
                and info.stream and not info.include_usage):
            try:
                new_body = with_usage_requested(body)
            except ValueError as exc:  # not an object after all: forwarded untouched
                log.warning("request body left as sent", extra={"request_id": self.request_id,
                                                               "reason": str(exc)})
                return None
            # Ask for the usage chunk on the client's behalf; it is removed from the response.
            self.usage_injected = True
            return BodyChange(new_body, HeaderChanges(set=(("content-length", str(len(new_body))),)))
        return None

    def on_request_chunk(self, chunk: bytes, end_of_stream: bool) -> None:
        """A copy of a request body chunk (nothing can be changed). The chunks are only kept:
        what the record needs of them is read when the request is recorded, and usually that is
        the model alone (`_read_request`)."""
        if self._request_size <= self.gateway.max_request_body_bytes:
            self._request_parts.append(chunk)
            self._request_size += len(chunk)

    async def _read_request(self, facts: ResponseFacts, status: int) -> RequestPeek | None:
        """The kept copy of the request body, read as far as the record needs. Parsed whole (the
        texts to count) only if the response did not report the input or failed; otherwise its
        model and agent session are peeked at, which costs nothing on the common body."""
        if self.info is not None or not self._request_parts:
            return None
        body = self._request_parts[0] if len(self._request_parts) == 1 else b"".join(self._request_parts)
        self._request_parts = []
        if facts.usage.input is None or not 200 <= status < 300:
            await self.on_request_body(body, mutable=False)
            return None
        return peek_request(body, session_known=self.agent_session is not None)

    # -- response -----------------------------------------------------------------------------

    def on_response_headers(self, headers: Mapping[str, str], end_of_stream: bool) -> None:
        self.status = int(headers.get(header_names.STATUS, "0") or 0)
        streaming = "text/event-stream" in headers.get(header_names.CONTENT_TYPE, "")
        self.response = ResponseBody(self.endpoint.api, streaming, self.usage_injected and streaming)
        if end_of_stream:
            self.response_ended = True

    def on_response_body(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        """Account for one chunk (the hot path); return replacement bytes or None."""
        response = self.response
        if response is None:
            return None
        self.body_seen = True
        if end_of_stream:
            self.response_ended = True
        return response.feed(chunk, end_of_stream, self.gateway.clock)

    # -- the record -----------------------------------------------------------------------------

    async def record(self, completed: bool) -> dict[str, object] | None:
        """Settle the counts and hand the outcome to the recorder, once. Returns what the recorder
        reports (Envoy's dynamic metadata on inline routes), or None when already recorded."""
        if self.recorded:
            return None
        self.recorded = True
        status = self.status if self.status is not None else CLIENT_CLOSED
        facts = self.response.facts if self.response is not None else ResponseFacts()
        peek = await self._read_request(facts, status)
        # A stream that ended in an error event did not complete, whatever its status said.
        completed = (completed or self.response_ended) and facts.error_type is None
        requested = (self.info.model if self.info is not None
                     else peek.model if peek is not None else None)
        # Only a successful generation costs tokens; a rejection (429, 401, ...) or a
        # count_tokens call does not.
        billable = (self.went_upstream and 200 <= status < 300
                    and self.endpoint is not Endpoint.COUNT_TOKENS)
        tokens = await self._settle(facts) if billable else None
        first = facts.first_token_at
        outcome = Outcome(
            endpoint=self.endpoint, worker=self.worker, request_id=self.request_id, status=status,
            duration=max(0.0, self.gateway.clock() - self.started), completed=completed,
            requested_model=requested, model=facts.model or self.attempted_model or requested,
            tokens=tokens,
            time_to_first_token=None if first is None else max(0.0, first - self.started),
            error_type=facts.error_type, error_code=facts.error_code,
            malformed_request=self.info.malformed if self.info is not None else None,
            agent_session=self.agent_session or (
                self.info.agent_session if self.info is not None
                else peek.agent_session if peek is not None else None),
            session=self.session)
        await account_for(self.gateway, outcome)
        return await self.gateway.recorder.record(outcome)

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


async def account_for(gateway: Gateway, outcome: Outcome) -> None:
    """What a recorded request tells the limiter, where there is one (the admission process): an
    error event inside a 200 stream tells it what a 429 would have (the metrics count it from the
    outcome), and the tokens of a billable request settle the worker's budget."""
    limiter = gateway.limiter
    if limiter is None:
        return
    if outcome.status == 200 and outcome.error_type is not None:
        signal = classify(200, outcome.error_code, outcome.error_type)
        if signal is not Signal.SUCCESS:
            limiter.on_attempt(signal, outcome.error_code, None, None)
    if outcome.tokens is not None:
        await limiter.settle_budget(outcome.worker, 0, outcome.tokens.input + outcome.tokens.output)
