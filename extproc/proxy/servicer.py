"""The gRPC edge: Envoy's ExternalProcessor streams <-> the plain per-request objects.

Three kinds of stream arrive, told apart by their gRPC metadata: the request filter's (one
`RequestSession`), the observer's (copies of bodies, one `Observation`), and the attempt filter's
(one `AttemptSession` per upstream attempt). Everything here is translation; decisions live in
those objects. Responses that carry no change
are prebuilt once, because the response-body phase runs for every streamed chunk.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Callable, Coroutine, Mapping

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import duration_pb2, struct_pb2

from extproc.lifecycle import run_detached
from extproc.proxy.attempt import AttemptSession
from extproc.proxy.answers import BodyChange, HeaderChanges, Hold, ImmediateReply
from extproc.proxy.observation import Observation
from extproc.proxy.session import Gateway, RequestSession
from extproc.proxy.ticket import METADATA_NAMESPACE, Ticket

log = logging.getLogger(__name__)

# Envoy's upstream (per-attempt) ext_proc filter and the observer (copies of bodies, answered
# with nothing) announce themselves with this gRPC metadata (envoy/envoy.yaml).
ATTEMPT_METADATA = ("x-zai-proxy-phase", "attempt")
OBSERVER_METADATA = ("x-zai-proxy-phase", "observer")
# Routes whose bodies pass the request filter inline say so on its stream (routing/envoy_config.py).
INLINE_METADATA = ("x-zai-proxy-bodies", "inline")


_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# Unchanged-continue answers, shared by every stream (protobuf messages serialize concurrently).
_REQUEST_BODY_OK = pb.ProcessingResponse(request_body=pb.BodyResponse())
_RESPONSE_HEADERS_OK = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
_RESPONSE_BODY_OK = pb.ProcessingResponse(response_body=pb.BodyResponse())
_RESPONSE_TRAILERS_OK = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


def header_map(headers: pb.HttpHeaders) -> dict[str, str]:
    """Envoy sends `raw_value` (bytes); older configurations send `value`."""
    out: dict[str, str] = {}
    for h in headers.headers.headers:
        out[h.key] = h.raw_value.decode("latin-1") if h.raw_value else h.value
    return out


def mutation(changes: HeaderChanges) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=name, raw_value=value.encode("latin-1")),
                append_action=_OVERWRITE)
            for name, value in changes.set],
        remove_headers=list(changes.remove))


# The request-headers answer of every admitted request is one of a few key swaps (per API, per
# path normalisation, per upstream key): each is built once, and each request's answer is a copy
# of it with the request's ticket. Held in memory only, like the key.
_KEY_SWAPS: dict[HeaderChanges, pb.ProcessingResponse] = {}
MAX_KEY_SWAPS = 256


def _key_swap(changes: HeaderChanges) -> pb.ProcessingResponse:
    answer = _KEY_SWAPS.get(changes)
    if answer is None:
        if len(_KEY_SWAPS) >= MAX_KEY_SWAPS:  # a rotated key, odd paths: start over
            _KEY_SWAPS.clear()
        answer = _KEY_SWAPS[changes] = pb.ProcessingResponse(request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=mutation(changes))))
    return answer


def admitted_answer(changes: HeaderChanges, ticket: Ticket | None) -> pb.ProcessingResponse:
    """The key swap, with the ticket in the gateway's metadata namespace."""
    response = pb.ProcessingResponse()
    response.CopyFrom(_key_swap(changes))
    return with_metadata(response, ticket.to_metadata() if ticket is not None else None)


def immediate(reply: ImmediateReply) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=reply.status),
        headers=mutation(HeaderChanges(set=reply.headers)),
        body=reply.body,
        details=reply.details))


def with_metadata(response: pb.ProcessingResponse, fields: Mapping[str, object] | None) -> pb.ProcessingResponse:
    """`fields` as Envoy dynamic metadata in the gateway's namespace. Flat strings and numbers are
    set field by field (every admitted request's ticket goes this way; `Struct.update` walks
    them in Python); anything else takes the general path."""
    if fields:
        target = response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
        for name, value in fields.items():
            if isinstance(value, str):
                target[name].string_value = value
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                target[name].number_value = value
            else:
                general = struct_pb2.Struct()
                general.update({name: value})
                target[name].CopyFrom(general.fields[name])
    return response


def _metadata_string(request: pb.ProcessingRequest, key: str) -> str | None:
    """A string in the forwarded `zai_proxy` dynamic metadata of `request`, or None."""
    fields = request.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
    value = fields.fields.get(key) if fields is not None else None
    if value is None or value.WhichOneof("kind") != "string_value" or not value.string_value:
        return None
    return value.string_value


_BUFFER_RESPONSE_BODY = processing_mode_pb2.ProcessingMode(
    response_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED)


def extend_timeout(seconds: float) -> pb.ProcessingResponse:
    """Ask Envoy to wait longer for the answer to the current message (queued for admission)."""
    return pb.ProcessingResponse(
        override_message_timeout=duration_pb2.Duration(seconds=max(1, int(seconds) + 1)))


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, gateway: Gateway, on_stream: Callable[[int], None] = lambda delta: None):
        self.gateway = gateway
        self._on_stream = on_stream
        self._closing: set[asyncio.Future[object]] = set()

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProcessingResponse]:
        metadata = context.invocation_metadata() or ()
        if OBSERVER_METADATA in metadata:
            await self._observer(request_iterator)
            return
        if ATTEMPT_METADATA in metadata:
            async for response in self._attempt(request_iterator):
                yield response
            return
        session = RequestSession(self.gateway, inline=INLINE_METADATA in metadata)
        self._on_stream(1)
        try:
            async for request in request_iterator:
                phase = request.WhichOneof("request")
                if phase == "response_body":
                    body = request.response_body
                    replacement = session.on_response_body(body.body, body.end_of_stream)
                    if replacement is None and not body.end_of_stream:
                        yield _RESPONSE_BODY_OK
                    else:
                        yield await self._response_body(session, replacement, body.end_of_stream)
                elif phase == "request_headers":
                    answer = await session.request_headers(header_map(request.request_headers))
                    if isinstance(answer, Hold):  # Envoy waits longer, then the request waits
                        yield extend_timeout(answer.seconds)
                        answer = await session.admit_held()
                    yield self._headers_answer(session, answer)
                    if isinstance(answer, ImmediateReply):  # answered here: the request is over
                        await session.complete(completed=True)
                elif phase == "request_body":
                    body = request.request_body
                    change = await session.on_request_body(body.body, body.end_of_stream)
                    yield _REQUEST_BODY_OK if change is None else self._body_change(change)
                elif phase == "response_headers":
                    headers = request.response_headers
                    if session.record is not None:  # the model the attempt filter sent (model rules)
                        session.record.attempted_model = _metadata_string(request, "model")
                    fields = await session.response_headers(header_map(headers), headers.end_of_stream)
                    yield _RESPONSE_HEADERS_OK if fields is None else with_metadata(
                        pb.ProcessingResponse(response_headers=pb.HeadersResponse()), fields)
                elif phase == "response_trailers":
                    # Asked for only to keep this stream open until the request ends.
                    yield _RESPONSE_TRAILERS_OK
                else:
                    log.debug("unexpected ext_proc phase", extra={"phase": phase})
        finally:
            # Envoy closes the stream when the request ends, the client leaves or Envoy resets
            # it. Recording may await a token count, so it runs as its own task: awaiting here
            # could be interrupted by the stream's cancellation.
            self._record_later(session.complete(completed=False))
            self._on_stream(-1)

    async def _attempt(self, request_iterator: AsyncIterator[pb.ProcessingRequest]) -> AsyncIterator[pb.ProcessingResponse]:
        """One upstream attempt (Envoy's upstream filter): classify it, mark retryable 429s."""
        attempt = AttemptSession(self.gateway.on_attempt, self.gateway.models)
        async for request in request_iterator:
            phase = request.WhichOneof("request")
            if phase == "response_headers":
                headers = request.response_headers
                buffer, changes = attempt.on_response_headers(header_map(headers), headers.end_of_stream)
                response = pb.ProcessingResponse(response_headers=pb.HeadersResponse(
                    response=pb.CommonResponse(header_mutation=mutation(HeaderChanges(set=changes)))))
                if buffer:
                    response.mode_override.CopyFrom(_BUFFER_RESPONSE_BODY)
                yield response
            elif phase == "response_body":
                changes, body = attempt.on_response_body(request.response_body.body)
                common = pb.CommonResponse(header_mutation=mutation(HeaderChanges(set=changes)))
                if body is not None:  # Z.AI's refusal with the gateway's hint
                    common.body_mutation.body = body
                if attempt.chain_code is not None and attempt.model is not None:
                    self.gateway.on_chain(attempt.model, attempt.moved_to, attempt.chain_code)
                yield with_metadata(pb.ProcessingResponse(response_body=pb.BodyResponse(response=common)),
                                    {"fallback_model": attempt.moved_to} if attempt.moved_to else None)
            elif phase == "request_headers":
                # Sent only with model rules (MODEL_MAP / MODEL_FALLBACKS), as is the body.
                attempt.on_request_metadata(_metadata_string(request, "fallback_model"))
                yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())
            elif phase == "request_body":
                attempt.on_request_metadata(_metadata_string(request, "fallback_model"))
                change, fields = await attempt.on_request_body(request.request_body.body)
                if change is None and not fields:
                    yield _REQUEST_BODY_OK
                else:  # a fresh message: the prebuilt answer is shared
                    yield with_metadata(pb.ProcessingResponse(request_body=pb.BodyResponse())
                                        if change is None else self._body_change(change), fields)

    async def _observer(self, request_iterator: AsyncIterator[pb.ProcessingRequest]) -> None:
        """The observer's stream: copies of one request's bodies and response headers, sent by
        Envoy without waiting (observability mode), so nothing is answered. What it needs of the
        request comes in the ticket its request filter put into the forwarded dynamic metadata."""
        observation: Observation | None = None
        looked_up = False
        try:
            async for request in request_iterator:
                if not looked_up:  # once: a stream whose request is recorded elsewhere is drained
                    looked_up = True
                    ticket = self._ticket_of(request)
                    if ticket is not None:
                        candidate = Observation(self.gateway, ticket)
                        if await candidate.attach():
                            observation = candidate
                phase = request.WhichOneof("request")
                if phase == "response_body":
                    body = request.response_body
                    if observation is not None:
                        observation.on_response_body(body.body, body.end_of_stream)
                    if body.end_of_stream:
                        break
                elif phase == "request_body":
                    body = request.request_body
                    if observation is not None:
                        observation.on_request_chunk(body.body, body.end_of_stream)
                elif phase == "response_headers":
                    headers = request.response_headers
                    if observation is not None:
                        # The model the attempt filter sent upstream (model rules), if it did.
                        observation.record.attempted_model = _metadata_string(request, "model")
                        observation.on_response_headers(header_map(headers), headers.end_of_stream)
                    if headers.end_of_stream:
                        break
            # The response is over: end the stream from this side. Envoy would otherwise cancel
            # it after deferred_close_timeout, and grpcio's asyncio server leaks native memory
            # for every cancelled call (grpc/grpc#43360).
        finally:
            if observation is not None:
                self._record_later(observation.end())

    def _record_later(self, recording: Coroutine[Any, Any, object]) -> None:
        """Recording may await a token count or the state store, so it is detached from the
        stream: awaiting in a stream's `finally` could be interrupted by its cancellation. It
        becomes a task only if it has to wait."""
        run_detached(recording, self._closing)

    @staticmethod
    def _ticket_of(request: pb.ProcessingRequest) -> Ticket | None:
        namespace = request.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
        if namespace is None:
            return None
        # Each value read by name: iterating the Struct builds every entry in Python first.
        get = namespace.fields.get
        session, worker, endpoint, request_id, started = (
            get("session"), get("worker"), get("endpoint"), get("request_id"), get("started"))
        if session is None or worker is None or endpoint is None or request_id is None or started is None:
            return None
        agent_session = get("agent_session")
        return Ticket.of(session.string_value, worker.string_value, endpoint.string_value,
                         request_id.string_value, started.number_value,
                         None if agent_session is None else agent_session.string_value)

    @staticmethod
    def _headers_answer(session: RequestSession,
                        answer: HeaderChanges | ImmediateReply) -> pb.ProcessingResponse:
        if isinstance(answer, ImmediateReply):
            return immediate(answer)
        return admitted_answer(answer, session.ticket)

    @staticmethod
    def _body_change(change: BodyChange) -> pb.ProcessingResponse:
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
            header_mutation=mutation(change.headers),
            body_mutation=pb.BodyMutation(body=change.body))))

    @staticmethod
    async def _response_body(session: RequestSession, replacement: bytes | None,
                             end_of_stream: bool) -> pb.ProcessingResponse:
        common = pb.CommonResponse()
        if replacement == b"":
            common.body_mutation.clear_body = True  # all of it held back (a partial event)
        elif replacement is not None:
            common.body_mutation.body = replacement
        response = pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))
        if end_of_stream:
            return with_metadata(response, await session.complete(completed=True))
        return response
