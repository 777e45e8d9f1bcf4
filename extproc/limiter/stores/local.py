"""`LocalStore`: the limiter's shared-state contract (`base.LimiterStore`) kept in this process
only, for a single replica without Redis, and as the fallback while Redis is down."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any

from extproc.limiter.stores.base import (NO_ROOM, STARTED, Bucket, Clock, Start, refill,
                                         start_capacity, token_need, wait_for)


# Claims held at most at once (each is one request's record, kept for an hour): the oldest go
# first past this, so memory stays bounded however many requests pass.
MAX_CLAIMS = 200_000
MAX_BUDGET_WORKERS = 10_000


def _keep(buckets: OrderedDict[str, Bucket], worker: str, bucket: Bucket) -> None:
    buckets[worker] = bucket
    buckets.move_to_end(worker)
    while len(buckets) > MAX_BUDGET_WORKERS:
        buckets.popitem(last=False)


class LocalStore:
    """The limiter's state in this process only. Every method finishes without awaiting, so each
    is atomic on the event loop, like a Lua script on Redis."""

    name = "local"

    def __init__(self, clock: Clock = time.time) -> None:
        # The clock is used only for state and gate expiry, whose API takes no `now`.
        self._clock = clock
        self._leases: dict[str, dict[str, float]] = {}  # account -> lease_id -> expiry
        self._starts: dict[str, Bucket] = {}
        # Budget buckets by worker, least recently used first. A worker is whoever holds a token
        # (any token, without WORKER_KEYS_FILE), so these are bounded: past MAX_BUDGET_WORKERS the
        # least recently used bucket goes, which only lets that worker start again from full.
        self._requests: OrderedDict[str, Bucket] = OrderedDict()
        self._tokens: OrderedDict[str, Bucket] = OrderedDict()
        self._states: dict[str, tuple[float, str]] = {}  # account -> (expiry, JSON)
        self._gates: dict[str, tuple[float, dict[str, Any]]] = {}
        self._claims: OrderedDict[str, float] = OrderedDict()  # key -> expiry, oldest first
        self._settled: OrderedDict[str, float] = OrderedDict()  # the same, with the settled TTL
        self._sets: dict[str, set[str]] = {}  # join_capped: bounded by each call's limit

    async def acquire_slot(self, account: str, lease_id: str, limit: int, now: float,
                           ttl: float) -> bool:
        return self._acquire(account, lease_id, limit, now, ttl)

    def _acquire(self, account: str, lease_id: str, limit: int, now: float, ttl: float) -> bool:
        leases = self._leases.setdefault(account, {})
        held = leases.get(lease_id)
        # Fewer leases than the limit, expired or not: room, without looking at each (a scan per
        # admission cost ~50 µs at 1,000 requests in flight). Only at the limit are the expired
        # ones (a holder that never released) told apart.
        if (held is None or held <= now) and len(leases) >= limit:
            if sum(1 for expiry in leases.values() if expiry > now) >= limit:
                return False
        leases[lease_id] = now + ttl
        return True

    async def release_slot(self, account: str, lease_id: str) -> bool:
        return self._release(account, lease_id)

    def _release(self, account: str, lease_id: str) -> bool:
        leases = self._leases.get(account)
        if leases is None or leases.pop(lease_id, None) is None:
            return False
        if not leases:
            del self._leases[account]
        return True

    async def in_flight(self, account: str, now: float) -> int:
        return sum(1 for expiry in self._leases.get(account, {}).values() if expiry > now)

    async def reap_expired(self, account: str, now: float) -> int:
        leases = self._leases.get(account, {})
        expired = [lease for lease, expiry in leases.items() if expiry <= now]
        for lease in expired:
            del leases[lease]
        if not leases:
            self._leases.pop(account, None)
        return len(expired)

    async def claim(self, key: str, now: float, ttl: float) -> bool:
        expire_front(self._claims, now)
        expire_front(self._settled, now)
        if self._claims.get(key, 0.0) > now or self._settled.get(key, 0.0) > now:
            return False
        self._claims[key] = now + ttl
        return True

    async def settle_claim(self, key: str, now: float, ttl: float) -> bool:
        if self._claims.pop(key, 0.0) <= now:
            return False
        self._settled[key] = now + ttl
        return True

    async def join_capped(self, key: str, member: str, limit: int) -> bool:
        members = self._sets.setdefault(key, set())
        if member in members:
            return True
        if len(members) >= limit:
            return False
        members.add(member)
        return True

    async def take_start(self, account: str, rate_per_second: float, burst: float,
                         now: float) -> float:
        return self._take_start(account, rate_per_second, burst, now)

    def _take_start(self, account: str, rate_per_second: float, burst: float, now: float) -> float:
        bucket = refill(self._starts.get(account), start_capacity(burst), rate_per_second, now)
        wait = wait_for(bucket.tokens, 1.0, rate_per_second)
        if wait == 0.0:
            bucket.tokens -= 1.0
        self._starts[account] = bucket
        return wait

    async def start(self, account: str, lease_id: str, limit: int, now: float, ttl: float,
                    rate_per_second: float, burst: float) -> Start:
        gate = self._gate(account, now)
        if gate is not None:
            return Start(False, gate=gate)
        if not self._acquire(account, lease_id, limit, now, ttl):
            return NO_ROOM
        wait = self._take_start(account, rate_per_second, burst, now)
        if wait > 0.0:
            self._release(account, lease_id)
            return Start(False, wait)
        return STARTED

    async def load_state(self, account: str) -> dict[str, Any] | None:
        entry = self._states.get(account)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._states[account]
            return None
        return json.loads(entry[1])

    async def save_state(self, account: str, state: dict[str, Any], ttl: float) -> None:
        # Stored as JSON, like Redis: the caller's dict is not shared, and a value Redis could not
        # store fails here too.
        self._states[account] = (self._clock() + ttl, json.dumps(state))

    async def budget_take(self, worker: str, requests_capacity: float | None,
                          requests_per_second: float, tokens_capacity: float | None,
                          tokens_per_second: float, tokens: float, now: float) -> float:
        requests = tokens_bucket = None
        wait = 0.0
        if requests_capacity is not None:
            requests = refill(self._requests.get(worker), requests_capacity, requests_per_second, now)
            wait = max(wait, wait_for(requests.tokens, 1.0, requests_per_second))
        if tokens_capacity is not None:
            tokens_bucket = refill(self._tokens.get(worker), tokens_capacity, tokens_per_second, now)
            need = token_need(tokens, tokens_capacity)
            wait = max(wait, wait_for(tokens_bucket.tokens, need, tokens_per_second))
        if wait == 0.0:
            if requests is not None:
                requests.tokens -= 1.0
            if tokens_bucket is not None:
                tokens_bucket.tokens -= tokens
        if requests is not None:
            _keep(self._requests, worker, requests)
        if tokens_bucket is not None:
            _keep(self._tokens, worker, tokens_bucket)
        return wait

    async def budget_adjust(self, worker: str, tokens_capacity: float | None,
                            tokens_per_second: float, delta_tokens: float, now: float) -> None:
        if tokens_capacity is None:
            return
        bucket = refill(self._tokens.get(worker), tokens_capacity, tokens_per_second, now)
        bucket.tokens = min(tokens_capacity, bucket.tokens - delta_tokens)
        _keep(self._tokens, worker, bucket)

    async def close_gate(self, account: str, until: float, info: dict[str, Any]) -> None:
        current = self._gates.get(account)
        if current is None or until >= current[0]:
            self._gates[account] = (until, json.loads(json.dumps(info)))

    async def open_gate(self, account: str) -> None:
        self._gates.pop(account, None)

    async def gate(self, account: str, now: float) -> tuple[float, dict[str, Any]] | None:
        return self._gate(account, now)

    def _gate(self, account: str, now: float) -> tuple[float, dict[str, Any]] | None:
        current = self._gates.get(account)
        if current is None:
            return None
        if current[0] <= now:
            del self._gates[account]
            return None
        return current[0], dict(current[1])

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def expire_front(expiries: "OrderedDict[str, float]", now: float) -> None:
    """Expired entries leave from the front (one TTL for all entries of a dict), and the oldest
    past MAX_CLAIMS. (Also the in-memory claims' settled entries: `proxy.gateway.Claims`.)"""
    while expiries:
        oldest, expiry = next(iter(expiries.items()))
        if expiry > now and len(expiries) < MAX_CLAIMS:
            break
        del expiries[oldest]
