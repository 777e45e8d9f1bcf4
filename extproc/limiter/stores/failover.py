"""Shared limiter state that survives Redis going away: use Redis while it answers, local limits
while it does not, and go back to Redis when it answers again.

Callers never see `StoreUnavailable`: the call that finds Redis down is redone on the local store.
The switch back is a ping in a background task, at most once per `retry_interval`, so no request
waits on a dead Redis more than once per switch.

A lease lives in the store that granted it, so each lease remembers its store and is released
there even after a switch. A lease released while Redis is down, or whose acquire timed out (the
script may still have run), is released on Redis when it answers again, before shared state is
used; if this replica dies first, the lease expires there by its TTL. Leases this
replica still holds on the other side count against the limit on this side, so a switch does not
let this replica exceed the limit it was given. Learned state and budgets kept locally while
Redis was down are not copied back: the limiter saves its state again, and budgets restart.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

from extproc.limiter.stores.redis import RedisStore
from extproc.limiter.stores.base import LimiterStore, Start, StoreUnavailable
from extproc.limiter.stores.local import LocalStore

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Lease:
    store: LimiterStore
    account: str
    expires: float


class FailoverStore:
    """A `LimiterStore` over a primary (Redis) with a local fallback."""

    def __init__(self, primary: RedisStore, fallback: LocalStore, clock: Callable[[], float],
                 retry_interval: float = 2.0,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self._primary = primary
        self._fallback = fallback
        self._clock = clock
        self._retry_interval = retry_interval
        self._on_change = on_change
        self.shared = True
        self._retry_at = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._leases: dict[str, _Lease] = {}
        # How many of them each store holds: a lease held on the other side is rare (a spell on
        # local limits), and this spares every admission a scan of all of them.
        self._held: dict[int, int] = {id(primary): 0, id(fallback): 0}
        # Leases Redis may hold that this replica no longer uses there (lease_id -> account).
        self._orphans: dict[str, str] = {}

    @property
    def name(self) -> str:
        return self._primary.name if self.shared else self._fallback.name

    # -- switching ------------------------------------------------------------------------------

    def _set_shared(self, shared: bool, reason: str = "") -> None:
        if shared == self.shared:
            return
        self.shared = shared
        if shared:
            log.info("Redis reachable again, shared state restored",
                     extra={"redis": self._primary.location})
        else:
            self._retry_at = self._clock() + self._retry_interval
            log.warning("limiter state: Redis unreachable, using local limits",
                        extra={"redis": self._primary.location, "error": reason})
        if self._on_change is not None:
            try:
                self._on_change(shared)
            except Exception:  # a metric hook must not fail a request
                log.exception("limiter store on_change hook failed")

    def _maybe_probe(self) -> None:
        """While on local limits, ping Redis in the background once per retry interval."""
        if self._probe is not None or self._clock() < self._retry_at:
            return
        self._retry_at = self._clock() + self._retry_interval
        self._probe = asyncio.get_running_loop().create_task(self._ping_primary())

    async def _ping_primary(self) -> None:
        try:
            if await self._primary.ping() and await self._release_orphans():
                self._set_shared(True)
        finally:
            self._probe = None

    async def _release_orphans(self) -> bool:
        """Release on Redis the leases it may hold for nobody; False if Redis failed again."""
        for lease_id, account in list(self._orphans.items()):
            try:
                await self._primary.release_slot(account, lease_id)
            except StoreUnavailable:
                return False
            del self._orphans[lease_id]
        return True

    async def _run(self, op: Callable[[LimiterStore], Awaitable[T]]) -> T:
        if self.shared:
            try:
                return await op(self._primary)
            except StoreUnavailable as exc:
                self._set_shared(False, str(exc))
        else:
            self._maybe_probe()
        return await op(self._fallback)

    # -- slots ----------------------------------------------------------------------------------

    def _held_elsewhere(self, account: str, store: LimiterStore, now: float) -> int:
        """Unexpired leases this replica holds for `account` in the store other than `store`."""
        if self._held[id(self._fallback if store is self._primary else self._primary)] == 0:
            return 0
        return sum(1 for lease in self._leases.values()
                   if lease.account == account and lease.store is not store and lease.expires > now)

    def _keep(self, lease_id: str, lease: _Lease) -> None:
        previous = self._leases.get(lease_id)
        if previous is not None:
            self._held[id(previous.store)] -= 1
        self._leases[lease_id] = lease
        self._held[id(lease.store)] += 1

    def _forget(self, lease_id: str) -> _Lease | None:
        lease = self._leases.pop(lease_id, None)
        if lease is not None:
            self._held[id(lease.store)] -= 1
        return lease

    async def acquire_slot(self, account: str, lease_id: str, limit: int, now: float,
                           ttl: float) -> bool:
        known = self._leases.get(lease_id)
        if known is not None:  # renewing: stay on the side that holds it
            if known.store is self._primary and not self.shared:
                return True  # Redis is down: the lease stays held there until it expires
            try:
                return await self._acquire_on(known.store, account, lease_id, limit, now, ttl)
            except StoreUnavailable as exc:
                self._set_shared(False, str(exc))
                return True
        if self.shared:
            try:
                return await self._acquire_on(self._primary, account, lease_id, limit, now, ttl)
            except StoreUnavailable as exc:
                # The script may have run before the reply was lost: undo it once Redis is back.
                self._orphans[lease_id] = account
                self._set_shared(False, str(exc))
        else:
            self._maybe_probe()
        return await self._acquire_on(self._fallback, account, lease_id, limit, now, ttl)

    async def _acquire_on(self, store: LimiterStore, account: str, lease_id: str, limit: int,
                          now: float, ttl: float) -> bool:
        room = limit - self._held_elsewhere(account, store, now)
        held = await store.acquire_slot(account, lease_id, room, now, ttl)
        if held:
            self._keep(lease_id, _Lease(store, account, now + ttl))
        return held

    async def start(self, account: str, lease_id: str, limit: int, now: float, ttl: float,
                    rate_per_second: float, burst: float) -> Start:
        if self.shared:
            try:
                return await self._start_on(self._primary, account, lease_id, limit, now, ttl,
                                            rate_per_second, burst)
            except StoreUnavailable as exc:
                self._orphans[lease_id] = account  # as in acquire_slot
                self._set_shared(False, str(exc))
        else:
            self._maybe_probe()
        return await self._start_on(self._fallback, account, lease_id, limit, now, ttl,
                                    rate_per_second, burst)

    async def _start_on(self, store: LimiterStore, account: str, lease_id: str, limit: int,
                        now: float, ttl: float, rate_per_second: float, burst: float) -> Start:
        room = limit - self._held_elsewhere(account, store, now)
        started = await store.start(account, lease_id, room, now, ttl, rate_per_second, burst)
        if started.held:
            self._keep(lease_id, _Lease(store, account, now + ttl))
        return started

    async def release_slot(self, account: str, lease_id: str) -> bool:
        lease = self._forget(lease_id)
        if lease is None:
            return await self._run(lambda store: store.release_slot(account, lease_id))
        if lease.store is self._primary and not self.shared:
            self._orphans[lease_id] = account  # no timeout per release while Redis hangs
            return True
        try:
            return await lease.store.release_slot(account, lease_id)
        except StoreUnavailable as exc:
            # Released from this replica's side; Redis is told once it is back (or reaps it).
            self._orphans[lease_id] = account
            self._set_shared(False, str(exc))
            return True

    async def in_flight(self, account: str, now: float) -> int:
        async def count(store: LimiterStore) -> int:
            return await store.in_flight(account, now) + self._held_elsewhere(account, store, now)

        return await self._run(count)

    async def reap_expired(self, account: str, now: float) -> int:
        for lease_id, lease in list(self._leases.items()):
            if lease.account == account and lease.expires <= now:
                self._forget(lease_id)
        reaped = await self._run(lambda store: store.reap_expired(account, now))
        if self.shared:  # leases left over from a spell on local limits
            reaped += await self._fallback.reap_expired(account, now)
        return reaped

    # -- everything else: wherever the state currently lives ------------------------------------

    async def take_start(self, account: str, rate_per_second: float, burst: float,
                         now: float) -> float:
        return await self._run(lambda s: s.take_start(account, rate_per_second, burst, now))

    async def load_state(self, account: str) -> dict[str, Any] | None:
        return await self._run(lambda s: s.load_state(account))

    async def save_state(self, account: str, state: dict[str, Any], ttl: float) -> None:
        await self._run(lambda s: s.save_state(account, state, ttl))

    async def budget_take(self, worker: str, requests_capacity: float | None,
                          requests_per_second: float, tokens_capacity: float | None,
                          tokens_per_second: float, tokens: float, now: float) -> float:
        return await self._run(lambda s: s.budget_take(
            worker, requests_capacity, requests_per_second, tokens_capacity, tokens_per_second,
            tokens, now))

    async def budget_adjust(self, worker: str, tokens_capacity: float | None,
                            tokens_per_second: float, delta_tokens: float, now: float) -> None:
        await self._run(lambda s: s.budget_adjust(
            worker, tokens_capacity, tokens_per_second, delta_tokens, now))

    async def close_gate(self, account: str, until: float, info: dict[str, Any]) -> None:
        await self._run(lambda s: s.close_gate(account, until, info))

    async def open_gate(self, account: str) -> None:
        await self._fallback.open_gate(account)  # a gate closed during a spell on local limits
        await self._run(lambda s: s.open_gate(account))

    async def gate(self, account: str, now: float) -> tuple[float, dict[str, Any]] | None:
        return await self._run(lambda s: s.gate(account, now))

    async def claim(self, key: str, now: float, ttl: float) -> bool:
        return await self._run(lambda s: s.claim(key, now, ttl))

    async def settle_claim(self, key: str, now: float, ttl: float) -> bool:
        return await self._run(lambda s: s.settle_claim(key, now, ttl))

    async def join_capped(self, key: str, member: str, limit: int) -> bool:
        return await self._run(lambda s: s.join_capped(key, member, limit))

    async def ping(self) -> bool:
        """Check Redis now and switch accordingly; True while state is shared."""
        up = await self._primary.ping() and await self._release_orphans()
        self._set_shared(up, "ping failed")
        return self.shared

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        await self._primary.close()
        await self._fallback.close()
