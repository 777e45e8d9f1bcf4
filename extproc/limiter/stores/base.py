"""The contract of the store where the rate limiter keeps the state its replicas share
(`LimiterStore`), and the token-bucket arithmetic both implementations follow.

Every time is wall-clock epoch seconds passed in by the caller (`now`), so behaviour is exact
under test and the same on every replica; TTLs are seconds. The implementations (`local.LocalStore`
in-process, `redis.RedisStore` shared) have the same semantics, enforced by one contract test suite.

Semantics shared by both implementations:
- A slot is a lease that expires at `now + ttl`, so a replica that dies cannot leak it. An expired
  lease no longer counts against the limit but stays until `reap_expired` removes (and counts) it,
  so the "reclaimed leases" metric sees every one exactly once; a lease ends either by
  `release_slot` (True) or by being reaped, never both. Re-acquiring a held lease renews it.
- A token bucket starts full, refills at its rate up to its capacity, and a take that cannot be
  satisfied takes nothing and says how long to wait (`math.inf` if the rate is zero).
- `start` is what one admission needs, as one step (one round trip to Redis): the account's
  quota gate is read, then a lease is held and a start token taken, both or neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Protocol, runtime_checkable

Clock = Callable[[], float]


class Start(NamedTuple):
    """What `LimiterStore.start` did. Only `held` holds anything (the lease, and the start token
    taken); otherwise nothing was taken, and the fields say why."""

    held: bool
    wait: float = 0.0  # no start token: seconds until one (0.0 with `held` False: no free slot)
    gate: tuple[float, dict[str, Any]] | None = None  # the quota gate is closed: (until, info)


NO_ROOM = Start(False)
STARTED = Start(True)


class StoreUnavailable(RuntimeError):
    """The shared store cannot be reached (connection refused, timeout, Redis error)."""


@runtime_checkable
class LimiterStore(Protocol):
    @property
    def name(self) -> str: ...

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

    async def start(self, account: str, lease_id: str, limit: int, now: float, ttl: float,
                    rate_per_second: float, burst: float) -> Start:
        """One admission, atomically: while the account's gate is closed, nothing; else a new
        lease (as `acquire_slot`) and a start token (as `take_start`), both or neither."""
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

    async def claim(self, key: str, now: float, ttl: float) -> bool:
        """Take `key` for `ttl` seconds if nobody holds it; True if this call took it."""
        ...

    async def settle_claim(self, key: str, now: float, ttl: float) -> bool:
        """Whether somebody holds `key`; if so, it is kept only `ttl` seconds more (its request
        is settled: nobody asks again, a stray claim is still refused), so that claims do not
        pile up for their whole TTL."""
        ...

    async def join_capped(self, key: str, member: str, limit: int) -> bool:
        """Add `member` to the set `key` unless it already holds `limit` others; True when
        `member` is in the set afterwards (bounded label values shared by every replica)."""
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
