"""The long-lived collaborators every request's objects share, and their contracts."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Protocol

from extproc.accounting.request_body import RequestInfo
from extproc.api import Api
from extproc.limiter.account import AccountLimiter
from extproc.limiter.signals import Signal
from extproc.limiter.stores.local import MAX_CLAIMS, LocalStore, expire_front
from extproc.proxy.attempt import AttemptVerdict
from extproc.proxy.keys import UpstreamKey, WorkerKeys
from extproc.proxy.models import ModelRules
from extproc.proxy.outcome import Recorder

# How long a request whose observer stream has not claimed it yet waits for that stream before
# recording it itself (the observer's first copy can trail the request's end on a busy replica).
OBSERVER_GRACE_SECONDS = 5.0
# Claims outlive any request's record by far; they only need to outlive the grace.
CLAIM_TTL_SECONDS = 3600.0
# Once the request filter has settled a request, its claim only refuses strays (a duplicate
# outcome handed over late, which comes within milliseconds) for this long.
SETTLED_CLAIM_TTL_SECONDS = 10.0

class Estimator(Protocol):
    """Token counting (tiktoken, cached, off the event loop for large inputs)."""

    async def parse(self, body: bytes, api: Api) -> RequestInfo: ...
    async def count(self, info: RequestInfo) -> int: ...
    async def count_text(self, text: str) -> int: ...


class ClaimStore(Protocol):
    async def claim(self, key: str, now: float, ttl: float) -> bool: ...
    async def settle_claim(self, key: str, now: float, ttl: float) -> bool: ...


class Claims:
    """Who records a request: the first stream to claim its session, in the state store that
    every replica of the account shares (Redis), or in-process when there is only one.

    A request whose observer stream lands in the process that admitted it (one process per
    variant; the admission process of observer processes, which claims for them; one stream in
    N over N replicas) is decided in memory: its request filter says it expects the claim here
    (`expect`), the observer's claim and the request filter's settle then never reach the store.
    Only a request whose two streams landed in two processes is decided by the store: once its
    request filter has settled without a claim here, nothing about it is decided here any more."""

    def __init__(self, store: ClaimStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        # Session -> claimed here yet; the settled ones (True) with their expiry, oldest first.
        self._here: dict[str, bool] = {}
        self._settled: OrderedDict[str, float] = OrderedDict()

    def expect(self, session: str) -> None:
        """The request filter here admitted `session`: an observer stream here claims it here."""
        if len(self._here) < MAX_CLAIMS:  # past it (streams never ended): the store decides
            self._here[session] = False

    async def claim(self, session: str) -> bool:
        claimed = self._here.get(session)
        if claimed is not None:
            self._here[session] = True
            return not claimed
        if self._settled and self._refused(session):
            return False
        return await self.store.claim(f"record:{session}", self.clock(), CLAIM_TTL_SECONDS)

    async def settle(self, session: str) -> bool:
        """Whether an observer claimed the request; asked once, by its request filter at its end
        (after which nobody asks), so the claim is kept only SETTLED_CLAIM_TTL_SECONDS more:
        otherwise every request's claim would stay in the store for CLAIM_TTL_SECONDS
        (in-process ~200 bytes a request, for an hour)."""
        claimed = self._here.pop(session, None)
        if claimed:  # by an observer stream here; a stray claim later is refused here
            now = self.clock()
            expire_front(self._settled, now)
            self._settled[session] = now + SETTLED_CLAIM_TTL_SECONDS
            return True
        return await self.store.settle_claim(f"record:{session}", self.clock(),
                                             SETTLED_CLAIM_TTL_SECONDS)

    def _refused(self, session: str) -> bool:
        """A stray claim of a request settled here (a late duplicate): refused while its settled
        claim lasts, as the store refuses one."""
        expire_front(self._settled, self.clock())
        return session in self._settled


def _local_claims() -> Claims:
    return Claims(LocalStore())


@dataclass
class Gateway:
    """Long-lived collaborators shared by every session."""

    upstream_key: UpstreamKey
    worker_keys: WorkerKeys
    recorder: Recorder
    estimator: Estimator
    # Wall-clock seconds: a request's start travels to other replicas in its ticket.
    clock: Callable[[], float] = time.time
    count_tokens: bool = True
    limiter: AccountLimiter | None = None
    max_request_body_bytes: int = 32 * 1024 * 1024
    # Every upstream attempt's verdict: the successes from here, the failures from the attempt
    # filter; both reach the limiter and the metrics through this one callable.
    on_attempt: Callable[[AttemptVerdict], None] = lambda verdict: None
    claims: Claims = field(default_factory=_local_claims)
    observer_grace: float = OBSERVER_GRACE_SECONDS
    # Requests and observations not recorded (or handed over) yet: /health?detail=1 shows them.
    open: set[object] = field(default_factory=set)
    # Admitted requests of this process by session id, until their slot is back: an observer
    # stream that lands here tells its request that Z.AI took it (the limiter's load). Only a
    # refinement: the record never depends on finding its request here.
    admitted: dict[str, Callable[[], None]] = field(default_factory=dict)
    # MODEL_MAP and MODEL_FALLBACKS, applied per upstream attempt by the attempt filter, and
    # each decision a fallback chain takes (model, next model or None, code) for the metrics.
    models: ModelRules = field(default_factory=ModelRules)
    on_chain: Callable[[str, str | None, str], None] = lambda model, next_model, code: None

    def upstream_answered(self, session: str) -> None:
        """Z.AI accepted a request (a 2xx started): its slot now counts as load on the account."""
        mark = self.admitted.get(session)
        if mark is not None:
            mark()
        else:  # its slot is held by another process: the limiter here still learns the success
            self.on_attempt(AttemptVerdict(Signal.SUCCESS, None, None, None))
