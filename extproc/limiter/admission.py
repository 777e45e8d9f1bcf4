"""Admission to the upstream account: the fair queue in front of the adaptive limits.

A request gets a `Permit` when the account has a free slot (in-flight below the learned
concurrency limit) and a start token (start rate below the learned rate); otherwise it waits in
the fair queue, up to `max_wait`. Every permit is released exactly once — `Permit.release` is
idempotent and the session releases in the path that runs however a request ends — and leases in
the store expire after `lease_ttl`, so a lost release (a replica killed) cannot leak a slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from extproc.ids import unique_id
from extproc.lifecycle import run_detached
from extproc.limiter.adaptive import Adjustment, AdaptiveLimit
from extproc.limiter.fair_queue import FairQueue
from extproc.limiter.quota import QuotaGate
from extproc.limiter.signals import Signal
from extproc.limiter.stores.base import LimiterStore

log = logging.getLogger(__name__)


class Rejected(Exception):
    """The request cannot be admitted; `retry_after` seconds is what the client should wait."""

    def __init__(self, reason: str, retry_after: float, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # queue_full | wait_timeout | quota | budget | reserve
        self.retry_after = retry_after
        self.message = message


@dataclass
class Permit:
    lease_id: str
    worker: str
    waited: float
    _admission: "Admission" = field(repr=False)
    released: bool = False
    answered: bool = False  # Z.AI accepted it (a 2xx started): it occupies a slot there now

    def mark_answered(self) -> None:
        """The upstream accepted this request; until release it counts as load on the account."""
        if not self.answered and not self.released:
            self.answered = True
            self._admission.answered += 1

    async def release(self, signal: Signal | None) -> bool:
        """Give the slot back, feeding the limiter what the upstream said; False if already done."""
        if self.released:
            return False
        self.released = True
        await self._admission._release(self, signal)
        return True


@dataclass
class AdmissionHooks:
    """Where admission reports what it does (metrics); no-ops by default."""

    queue_wait: Callable[[float], None] = lambda seconds: None
    rejected: Callable[[str], None] = lambda reason: None
    adjusted: Callable[[str, Adjustment], None] = lambda kind, adjustment: None
    reclaimed: Callable[[int], None] = lambda count: None


class Admission:
    def __init__(self, account: str, store: LimiterStore, concurrency: AdaptiveLimit,
                 rate: AdaptiveLimit, gate: QuotaGate, *, max_wait: float, max_queue: int,
                 lease_ttl: float, poll_interval: float = 0.05,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 hooks: AdmissionHooks | None = None) -> None:
        self.account = account
        self.store = store
        self.concurrency = concurrency
        self.rate = rate
        self.gate = gate
        self.max_wait = max_wait
        self.lease_ttl = lease_ttl
        self.poll_interval = poll_interval
        self.clock = clock
        self.wall = wall
        self.hooks = hooks or AdmissionHooks()
        self.queue: FairQueue[asyncio.Future[Permit]] = FairQueue(max_queue)
        self.in_flight_by_worker: dict[str, int] = {}
        self.in_flight = 0  # this replica's permits
        # Permits whose request Z.AI accepted and is serving. Admitted requests in Envoy's retry
        # backoff are not load on the account, so a refusal is judged against this count.
        self.answered = 0
        self._starts: deque[float] = deque()  # start times in the last minute: the rate's load
        self._pumping = False
        self._pump_again = False
        self._timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Future[Any]] = set()

    # -- admission ---------------------------------------------------------------------------

    async def admit(self, worker: str) -> Permit:
        """A permit now, or after a fair wait; raises Rejected."""
        permit = await self.try_admit(worker)
        return permit if permit is not None else await self.admit_waiting(worker)

    async def try_admit(self, worker: str) -> Permit | None:
        """A permit now if the account has room and nobody is waiting, else None (the caller
        then waits with `admit_waiting`); raises Rejected while the quota gate is closed."""
        self.check_gate()
        if not len(self.queue):
            permit = await self._try_start(worker)
            if permit is not None:
                self.hooks.queue_wait(0.0)
                return permit
            self.check_gate()  # closed by another replica, as the store just said
        return None

    async def admit_waiting(self, worker: str) -> Permit:
        """A permit after a fair wait in the queue, up to `max_wait`; raises Rejected."""
        started = self.clock()
        waiter: asyncio.Future[Permit] = asyncio.get_running_loop().create_future()
        if not self.queue.push(worker, waiter, self.in_flight_by_worker.get(worker, 0)):
            raise self._reject("queue_full", self.max_wait,
                               "zai-proxy: too many requests are already waiting for the Z.AI "
                               "account; retry after the time in retry-after.")
        self._kick()
        try:
            permit = await asyncio.wait_for(asyncio.shield(waiter), self.max_wait)
        except asyncio.TimeoutError:
            if not self.queue.remove(worker, waiter) and waiter.done() and not waiter.cancelled():
                permit = waiter.result()  # admitted at the last moment: take it
            else:
                waiter.cancel()
                raise self._reject(
                    "wait_timeout", max(1.0, self.max_wait / 4),
                    f"zai-proxy: waited {self.max_wait:.0f}s for a free slot on the Z.AI account "
                    "(its capacity is in use); retry after the time in retry-after.") from None
        except asyncio.CancelledError:
            # The client left while queued: leave the queue at once, or hand back a slot that
            # was granted in the same instant.
            if self.queue.remove(worker, waiter):
                waiter.cancel()
            elif waiter.done() and not waiter.cancelled():
                asyncio.ensure_future(waiter.result().release(None))
            raise
        permit.waited = self.clock() - started
        self.hooks.queue_wait(permit.waited)
        return permit

    def check_gate(self) -> None:
        retry_after = self.gate.check(self.wall())
        if retry_after is not None:
            reason = self.gate.reason() or "the account is closed"  # closed: it has a reason
            raise self._reject("quota", retry_after, "zai-proxy: " + reason)

    async def _try_start(self, worker: str) -> Permit | None:
        """A permit if the store grants a start (a slot and a start token), else None: the
        account is full, the start rate wants a wait (the queue looks again then), or another
        replica closed the quota gate (adopted here: the caller checks the gate)."""
        now = self.wall()
        lease_id = unique_id()
        per_second = self.rate.value / 60.0  # the rate limit is learned in requests per minute
        # Cancelled (the client left) during the await, the lease may be held in the store: it is
        # released in the background, never left to its TTL.
        try:
            # A burst of a few seconds' worth: agents start in bursts, and 1303 is per unit of time.
            started = await self.store.start(self.account, lease_id, self.concurrency.allowed(), now,
                                             self.lease_ttl, per_second, max(1.0, per_second * 5))
        except BaseException:
            self._release_in_background(lease_id)
            raise
        if not started.held:
            if started.gate is not None:
                self.adopt_gate(*started.gate)
            elif started.wait > 0:
                self._schedule(started.wait)
            return None
        self.in_flight += 1
        self.in_flight_by_worker[worker] = self.in_flight_by_worker.get(worker, 0) + 1
        self._starts.append(now)
        self._recent_starts(now)  # bounded to the last minute even if no answer ever comes
        return Permit(lease_id, worker, 0.0, self)

    def adopt_gate(self, until: float, info: dict[str, Any]) -> None:
        """A quota gate another replica closed (read from the shared store)."""
        self.gate.close(until, str(info.get("code", "quota")), str(info.get("message", "")),
                        now_wall=self.wall())

    def _release_in_background(self, lease_id: str) -> None:
        task = asyncio.ensure_future(self.store.release_slot(self.account, lease_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- the queue pump ----------------------------------------------------------------------

    def _kick(self) -> None:
        # Nothing queued, nothing to pump (a pump in flight re-checks the queue itself): every
        # release kicks, and a task per request for nothing cost more than the release.
        if len(self.queue):
            asyncio.ensure_future(self._pump())

    def _schedule(self, delay: float) -> None:
        if self._timer is None or self._timer.when() > asyncio.get_running_loop().time() + delay:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._kick()

    async def _pump(self) -> None:
        """Admit queued requests while slots are free; one pump at a time."""
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            while True:
                self._pump_again = False
                await self._admit_queued()
                if not self._pump_again:
                    break
        finally:
            self._pumping = False
        if len(self.queue):
            # Another replica may free a slot, or the rate may allow a start: look again soon.
            self._schedule(self.poll_interval)

    async def _admit_queued(self) -> None:
        if len(self.queue) and self.gate.check(self.wall()) is not None:
            self._refuse_queued()  # the quota ran out while they waited: nothing would pass
            return
        while len(self.queue):
            choice = self.queue.peek(self.in_flight_by_worker)
            assert choice is not None
            worker, waiter = choice
            if waiter.done():  # timed out or cancelled; its owner removes it
                self.queue.remove(worker, waiter)
                continue
            permit = await self._try_start(worker)
            if permit is None:
                if self.gate.check(self.wall()) is not None:
                    self._refuse_queued()  # closed by another replica, as the store just said
                return
            if not waiter.done() and self.queue.head(worker) is waiter:
                self.queue.pop(worker)  # advances the worker's turn
                waiter.set_result(permit)
            else:
                await permit.release(None)

    def _refuse_queued(self) -> None:
        """Every queued request gets the quota gate's 429 now, instead of at its queue timeout."""
        while len(self.queue):
            choice = self.queue.peek(self.in_flight_by_worker)
            assert choice is not None
            worker, waiter = choice
            self.queue.pop(worker)
            if not waiter.done():
                try:
                    self.check_gate()
                except Rejected as rejection:
                    waiter.set_exception(rejection)

    # -- release -----------------------------------------------------------------------------

    async def _release(self, permit: Permit, signal: Signal | None) -> None:
        load = self.answered
        self.in_flight -= 1
        if permit.answered:
            self.answered -= 1
        left = self.in_flight_by_worker.get(permit.worker, 1) - 1
        if left > 0:
            self.in_flight_by_worker[permit.worker] = left
        else:
            self.in_flight_by_worker.pop(permit.worker, None)
        try:
            # Detached: a release interrupted by its caller's cancellation still reaches the store
            # (and the usual in-process release costs no task).
            pending = run_detached(self.store.release_slot(self.account, permit.lease_id),
                                   self._background)
            if pending is not None:
                await asyncio.shield(pending)
        finally:
            if signal is not None:
                self.learn(signal, load)
            self._kick()

    def learn(self, signal: Signal, load: int | None = None) -> None:
        """Feed an upstream answer to the adaptive limits (also used for retried attempts).

        The load is what Z.AI was serving for us: the requests it accepted and is still
        answering, plus the one it just answered (refused or accepted).
        """
        now = self.wall()
        load = self.answered + 1 if load is None else load
        if signal is Signal.SUCCESS:
            self._adjusted("concurrency", self.concurrency.on_success(now, load))
            self._adjusted("rate", self.rate.on_success(now, self._recent_starts(now)))
        elif signal is Signal.CONCURRENCY:
            self._adjusted("concurrency", self.concurrency.on_throttle(now, load))
        elif signal is Signal.FREQUENCY:
            self._adjusted("rate", self.rate.on_throttle(now, self._recent_starts(now)))

    def _recent_starts(self, now: float) -> int:
        """Requests started in the last minute (the rate limit is per minute)."""
        while self._starts and self._starts[0] < now - 60.0:
            self._starts.popleft()
        return len(self._starts)

    def _adjusted(self, kind: str, adjustment: Adjustment | None) -> None:
        if adjustment is not None and adjustment is not Adjustment.NONE:
            self.hooks.adjusted(kind, adjustment)
            if adjustment is not Adjustment.DOWN:
                self._kick()

    def _reject(self, reason: str, retry_after: float, message: str) -> Rejected:
        self.hooks.rejected(reason)
        return Rejected(reason, retry_after, message)

    async def reap(self) -> int:
        """Reclaim leases that outlived the longest allowed stream."""
        count = await self.store.reap_expired(self.account, self.wall())
        if count:
            log.warning("reclaimed expired limiter leases", extra={"count": count})
            self.hooks.reclaimed(count)
            self._kick()
        return count
