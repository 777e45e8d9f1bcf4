"""Per-request state, driven by the ext_proc phases.

One `RequestSession` lives for one HTTP request. The gRPC servicer feeds it the phases Envoy sends
(request headers, request body, response headers, response body chunks) and translates what it
returns into protobuf. It knows nothing of gRPC: its inputs are plain header maps and bytes, its
outputs are `HeaderChanges` or an `ImmediateReply`, and `finish` runs exactly once however the
request ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

from .api import Api, Endpoint, endpoint_for_path, error_body
from .keys import KeyUnavailable, UpstreamKey, WorkerKeys

# Headers the gateway uses internally to carry identity or variant: never accepted from clients.
INTERNAL_HEADER_PREFIX = "x-zai-proxy-"
CLIENT_AUTH_HEADERS = ("authorization", "x-api-key")

# Status recorded when the client went away before any response (nginx's convention).
CLIENT_CLOSED = 499


@dataclass(frozen=True)
class HeaderChanges:
    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImmediateReply:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
    # Envoy's response code details; the `zai_proxy` prefix tells the local-reply mappers in
    # envoy/envoy.yaml to leave this body alone.
    details: str = "zai_proxy"


@dataclass
class Outcome:
    """What the request came to; handed to the recorder once."""

    endpoint: Endpoint
    worker: str
    request_id: str
    status: int
    duration: float
    completed: bool  # the response reached its end (vs. cut short / client gone)


class Recorder(Protocol):
    def record(self, outcome: Outcome) -> None: ...


@dataclass
class Gateway:
    """Long-lived collaborators shared by every session."""

    upstream_key: UpstreamKey
    worker_keys: WorkerKeys
    recorder: Recorder
    clock: Callable[[], float] = time.monotonic


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


@dataclass
class RequestSession:
    gateway: Gateway
    started: float = 0.0
    endpoint: Endpoint = Endpoint.MESSAGES
    worker: str = "unknown"
    request_id: str = ""
    status: int | None = None
    finished: bool = field(default=False)

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
        return self._auth_changes(headers, key)

    def on_request_body(self, body: bytes, end_of_stream: bool) -> None:
        """Request bodies arrive whole (BUFFERED mode); token accounting reads them."""

    def on_response_headers(self, headers: Mapping[str, str], end_of_stream: bool) -> None:
        self.status = int(headers.get(":status", "0") or 0)
        if end_of_stream:
            self.finish(completed=True)

    def on_response_body(self, chunk: bytes, end_of_stream: bool) -> None:
        if end_of_stream:
            self.finish(completed=True)

    def finish(self, completed: bool = False) -> None:
        """Record the outcome exactly once, whichever phase or failure ends the request."""
        if self.finished:
            return
        self.finished = True
        status = self.status if self.status is not None else CLIENT_CLOSED
        self.gateway.recorder.record(Outcome(
            endpoint=self.endpoint, worker=self.worker, request_id=self.request_id, status=status,
            duration=max(0.0, self.gateway.clock() - self.started), completed=completed))

    # -- helpers ----------------------------------------------------------------------------

    def _auth_changes(self, headers: Mapping[str, str], key: str) -> HeaderChanges:
        internal = tuple(name for name in headers if name.startswith(INTERNAL_HEADER_PREFIX))
        if self.api is Api.ANTHROPIC:
            return HeaderChanges(set=(("x-api-key", key),),
                                 remove=("authorization",) + internal)
        return HeaderChanges(set=(("authorization", f"Bearer {key}"),),
                             remove=("x-api-key",) + internal)

    def _reply(self, status: int, kind: str, message: str) -> ImmediateReply:
        self.status = status
        reply = ImmediateReply(status, error_body(self.api, kind, message), details=f"zai_proxy_{kind}")
        self.finish(completed=True)
        return reply
