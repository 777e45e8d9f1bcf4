"""Where the rate limiter keeps the state its replicas share: the `LimiterStore` contract, and
`LocalStore`, the in-process implementation (no Redis URL configured, or Redis is down).

Every time is wall-clock epoch seconds passed in by the caller (`now`), so behaviour is exact
under test and the same on every replica; TTLs are seconds. The Redis implementation
(`redis_store.RedisStore`) has the same semantics, enforced by one contract test suite.

Semantics shared by both implementations:
- A slot is a lease that expires at `now + ttl`, so a replica that dies cannot leak it. An expired
  lease no longer counts against the limit but stays until `reap_expired` removes (and counts) it,
  so the "reclaimed leases" metric sees every one exactly once; a lease ends either by
  `release_slot` (True) or by being reaped, never both. Re-acquiring a held lease renews it.
- A token bucket starts full, refills at its rate up to its capacity, and a take that cannot be
  satisfied takes nothing and says how long to wait (`math.inf` if the rate is zero).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

Clock = Callable[[], float]


class StoreUnavailable(RuntimeError):
    """The shared store cannot be reached (connection refused, timeout, Redis error)."""


@runtime_checkable
class LimiterStore(Protocol):
    name: str

    async def acquire_slot(self, account: str, lease_id: str, limit: int, now: float,
                           ttl: float) -> bool:
        """Hold a lease if fewer than `limit` unexpired ones are held (renews a held lease)."""
        ...

    async def release_slot(self, account: str, lease_id: str) -> bool:
        """End a lease; True if it was held (expired but not yet reaped counts as held)."""
        ...

    async def in_flight(self, account: str, now: float) -> int:
        """Unexpired leases."""
        ...

    async def reap_expired(self, account: str, now: float) -> int:
        """Remove leases past their expiry; how many."""
        ...

    async def take_start(self, account: str, rate_per_second: float, burst: float,
                         now: float) -> float:
        """0.0 if a start token was taken, else seconds until one is available."""
        ...

    async def load_state(self, account: str) -> dict[str, Any] | None:
        ...

    async def save_state(self, account: str, state: dict[str, Any], ttl: float) -> None:
        ...

    async def budget_take(self, worker: str, requests_capacity: float | None,
                          requests_per_second: float, tokens_capacity: float | None,
                          tokens_per_second: float, tokens: float, now: float) -> float:
        """Take 1 request and `tokens` tokens, or nothing; 0.0, else seconds until both allow."""
        ...

    async def budget_adjust(self, worker: str, tokens_capacity: float | None,
                            tokens_per_second: float, delta_tokens: float, now: float) -> None:
        """Charge `delta_tokens` more (negative refunds); the bucket may go into debt."""
        ...

    async def close_gate(self, account: str, until: float, info: dict[str, Any]) -> None:
        """Close the quota gate until `until` (a gate closed for longer stays so)."""
        ...

    async def open_gate(self, account: str) -> None:
        ...

    async def gate(self, account: str, now: float) -> tuple[float, dict[str, Any]] | None:
        """(until, info) while the gate is closed, else None."""
        ...

    async def ping(self) -> bool:
        ...

    async def close(self) -> None:
        ...


# -- token bucket arithmetic (the Lua scripts in redis_store.py mirror these lines) --------------

@dataclass
class Bucket:
    tokens: float
    updated: float


def refill(bucket: Bucket | None, capacity: float, rate: float, now: float) -> Bucket:
    """The bucket as of `now`; a missing bucket is full. A clock behind `updated` adds nothing."""
    if bucket is None:
        return Bucket(capacity, now)
    elapsed = max(0.0, now - bucket.updated)
    return Bucket(min(capacity, bucket.tokens + elapsed * rate), max(bucket.updated, now))


def wait_for(tokens: float, need: float, rate: float) -> float:
    """Seconds until a bucket holding `tokens` holds `need`."""
    if tokens >= need:
        return 0.0
    return (need - tokens) / rate if rate > 0 else math.inf


def start_capacity(burst: float) -> float:
    # A bucket that can never hold one token would block starts forever.
    return max(burst, 1.0)


def token_need(tokens: float, capacity: float) -> float:
    # A request estimated above the whole budget is let through when the bucket is full
    # (then it runs into debt) rather than waiting forever.
    return min(tokens, capacity)


# -- the in-process store --------------------------------------------------------------------

class LocalStore:
    """The limiter's state in this process only. Every method finishes without awaiting, so each
    is atomic on the event loop, like a Lua script on Redis."""

    name = "local"

    def __init__(self, clock: Clock = time.time) -> None:
        # The clock is used only for state and gate expiry, whose API takes no `now`.
        self._clock = clock
        self._leases: dict[str, dict[str, float]] = {}  # account -> lease_id -> expiry
        self._starts: dict[str, Bucket] = {}
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}
        self._states: dict[str, tuple[float, str]] = {}  # account -> (expiry, JSON)
        self._gates: dict[str, tuple[float, dict[str, Any]]] = {}

    async def acquire_slot(self, account: str, lease_id: str, limit: int, now: float,
                           ttl: float) -> bool:
        leases = self._leases.setdefault(account, {})
        held = leases.get(lease_id)
        if held is None or held <= now:
            if sum(1 for expiry in leases.values() if expiry > now) >= limit:
                return False
        leases[lease_id] = now + ttl
        return True

    async def release_slot(self, account: str, lease_id: str) -> bool:
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

    async def take_start(self, account: str, rate_per_second: float, burst: float,
                         now: float) -> float:
        bucket = refill(self._starts.get(account), start_capacity(burst), rate_per_second, now)
        wait = wait_for(bucket.tokens, 1.0, rate_per_second)
        if wait == 0.0:
            bucket.tokens -= 1.0
        self._starts[account] = bucket
        return wait

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
            self._requests[worker] = requests
        if tokens_bucket is not None:
            self._tokens[worker] = tokens_bucket
        return wait

    async def budget_adjust(self, worker: str, tokens_capacity: float | None,
                            tokens_per_second: float, delta_tokens: float, now: float) -> None:
        if tokens_capacity is None:
            return
        bucket = refill(self._tokens.get(worker), tokens_capacity, tokens_per_second, now)
        bucket.tokens = min(tokens_capacity, bucket.tokens - delta_tokens)
        self._tokens[worker] = bucket

    async def close_gate(self, account: str, until: float, info: dict[str, Any]) -> None:
        current = self._gates.get(account)
        if current is None or until >= current[0]:
            self._gates[account] = (until, json.loads(json.dumps(info)))

    async def open_gate(self, account: str) -> None:
        self._gates.pop(account, None)

    async def gate(self, account: str, now: float) -> tuple[float, dict[str, Any]] | None:
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
