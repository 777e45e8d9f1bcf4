"""One upstream attempt, seen from Envoy's upstream ext_proc filter (it runs once per attempt,
retries included), so the limiter learns from every 429 — also those Envoy retried — and Envoy
learns which 429s are worth retrying.

Z.AI puts the reason for a 429 in the body (a business code), but Envoy decides retries on
headers. So for a 429 or 5xx the body is buffered, classified, and a header tells Envoy's retry
policy (`retriable_headers`) whether to retry: yes for 1302/1303/1305 and 5xx, never for quota
errors (1304/1308/1309/1113), which close the quota gate instead.

With `MODEL_MAP` or `MODEL_FALLBACKS` set, the filter also gets each attempt's request body
(extproc/proxy/models.py): the attempt goes out with the chosen model, and a 1312/1311 refusal of
a model in a chain is retried on the chain's next model, or not at all at its end. Where the
request stands travels in Envoy's dynamic metadata (`zai_proxy`: `model`, `requested_model`,
`fallback_model`): an upstream filter's metadata is the request's, so the next attempt reads it
whichever ext_proc process it reaches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import orjson

from extproc.limiter.signals import Signal, business_code, classify, retryable
from extproc.proxy import header_names
from extproc.proxy.answers import BodyChange, HeaderChanges
from extproc.proxy.models import NOT_OURS, ModelRules, rewrite_async
from extproc.proxy.upstream_errors import annotate
from extproc.accounting.usage import error_fields

RETRY_HEADER = "x-zai-proxy-retry"
DEFAULT_RETRY_AFTER = "1"  # seconds, for retried refusals that name no time


@dataclass(frozen=True)
class AttemptVerdict:
    signal: Signal
    code: str | None
    message: str | None
    retry_after: str | None


Report = Callable[[AttemptVerdict], None]


def _message(doc: object) -> str | None:
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        message = doc["error"].get("message")
        return message if isinstance(message, str) else None
    return None


class AttemptSession:
    """Driven by the upstream filter's phases; reports one verdict per attempt."""

    __slots__ = ("report", "status", "retry_after", "reported", "models", "model",
                 "fallen_back_to", "moved_to", "chain_code")

    def __init__(self, report: Report, models: ModelRules | None = None) -> None:
        self.report = report
        self.status = 0
        self.retry_after: str | None = None
        self.reported = False
        self.models = models if models is not None and models.active else None
        self.model: str | None = None  # the model this attempt went out with (bodies read)
        self.fallen_back_to: str | None = None  # where an earlier attempt moved the request
        self.moved_to: str | None = None  # where this attempt's refusal moves it
        self.chain_code: str | None = None  # the model refusal a chain decided (moved or ended)

    # -- the request (only with model rules: the renderer sends bodies then) ----------------------

    def on_request_metadata(self, fallen_back_to: str | None) -> None:
        """The request's `fallback_model`, from the dynamic metadata of an earlier attempt."""
        if fallen_back_to:
            self.fallen_back_to = fallen_back_to

    async def on_request_body(self, body: bytes) -> tuple[BodyChange | None, dict[str, object] | None]:
        """(the body to send instead, or None; the metadata to record where the request stands)."""
        if self.models is None:
            return None, None
        chosen = await rewrite_async(self.models, body, self.fallen_back_to)
        self.model = chosen.model
        if chosen.requested is None:
            return None, None
        metadata: dict[str, object] = {"requested_model": chosen.requested, "model": chosen.model}
        if chosen.body is None:
            return None, metadata
        return BodyChange(chosen.body, HeaderChanges(
            set=(("content-length", str(len(chosen.body))),))), metadata

    def on_response_headers(self, headers: Mapping[str, str], end_of_stream: bool) -> tuple[bool, tuple[tuple[str, str], ...]]:
        """(buffer the body?, headers to set now)."""
        self.status = int(headers.get(header_names.STATUS, "0") or 0)
        self.retry_after = headers.get(header_names.RETRY_AFTER)
        # Every refusal's body is read: its code decides the retry, and the client's copy gets
        # the gateway's hint.
        needs_body = self.status >= 400
        if not needs_body or end_of_stream:
            return False, self._verdict(None)
        return True, ()

    def on_response_body(self, body: bytes) -> tuple[tuple[tuple[str, str], ...], bytes | None]:
        """(headers to set, the body the client gets instead, or None: as it is)."""
        try:
            doc = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            doc = None
        changes = self._verdict(doc)
        error_type, code = error_fields(doc)
        zai_code = business_code(code, error_type)
        if self.retry_after is None and RETRY_HEADER in dict(changes) and self.status in (429, 503, 529):
            # Z.AI sends no retry-after on 1302/1303/1305/1312: say when to come back (Envoy's
            # back-off reads it too, and the client gets it if this is the last attempt).
            changes += (("retry-after", DEFAULT_RETRY_AFTER),)
        annotated = annotate(body, self.status, zai_code, suggested_model=self.moved_to,
                             refused_model=self.model)
        if annotated is None:
            return changes, None
        return changes + (("content-length", str(len(annotated))),), annotated

    def _verdict(self, doc: object) -> tuple[tuple[str, str], ...]:
        if self.reported:
            return ()
        self.reported = True
        err_type, code = error_fields(doc)
        signal = classify(self.status, code, err_type)
        self.report(AttemptVerdict(signal, code, _message(doc), self.retry_after))
        if self.status < 400:
            return ()
        fallback = (self.models.after_failure(self.model, business_code(code, err_type))
                    if self.models is not None else NOT_OURS)
        if fallback.decides:  # a model refusal of a model in a chain: the chain decides
            self.moved_to = fallback.next_model
            self.chain_code = business_code(code, err_type)
            return ((RETRY_HEADER, "true"),) if fallback.next_model is not None else ()
        return ((RETRY_HEADER, "true"),) if retryable(signal) else ()
