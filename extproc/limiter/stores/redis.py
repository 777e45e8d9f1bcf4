"""The limiter's shared state in Redis, for several ext_proc replicas serving one account.

Same semantics as `store.LocalStore` (see store.py). Every read-modify-write is one Lua script,
so replicas never race; single-command operations (release, count, reap) need none. Times and
amounts travel as `repr(float)` strings and come back as "%.17g" strings, because Redis turns a
Lua number reply into an integer. Key TTLs are housekeeping only (Redis's own clock): correctness
comes from the times stored in the values, compared with the caller's `now`.

Any failure (refused, timeout, Redis error) raises `StoreUnavailable` quickly: 0.5 s socket
timeouts, no backoff, so `FailoverStore` can switch to local limits without stalling requests.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from extproc.limiter.stores.base import NO_ROOM, STARTED, Start, StoreUnavailable, start_capacity
from extproc.limiter.stores.redis_pipeline import Command, TurnPipeline

# Keys are kept this long after they stop mattering, so a reaper that runs rarely still finds
# (and counts) expired leases, and a fake test clock never races Redis's real one.
_GRACE_MS = 3_600_000

# Shared Lua helpers: token bucket arithmetic as in store.refill / store.wait_for.
_BUCKET_LUA = """
local function fmt(x) return string.format('%.17g', x) end
local function refill(key, tf, uf, cap, rate, now)
  local v = redis.call('HMGET', key, tf, uf)
  local tokens, updated = tonumber(v[1]), tonumber(v[2])
  if not tokens then return cap, now end
  return math.min(cap, tokens + math.max(0, now - updated) * rate), math.max(updated, now)
end
local function wait_for(tokens, need, rate)
  if tokens >= need then return 0 end
  if rate > 0 then return (need - tokens) / rate end
  return math.huge
end
local function full_in_ms(tokens, cap, rate)
  if tokens >= cap then return 0 end
  if rate > 0 then return math.ceil((cap - tokens) / rate * 1000) end
  return 86400000
end
"""

# Shared Lua helpers of the slots and the start bucket (_ACQUIRE, _TAKE_START, _START).
_SLOTS_LUA = _BUCKET_LUA + """
local function hold(key, lease, now, ttl, grace_ms)
  redis.call('ZADD', key, fmt(now + ttl), lease)
  local keep = math.ceil(ttl * 1000) + grace_ms
  if redis.call('PTTL', key) < keep then redis.call('PEXPIRE', key, keep) end
end
local function take_start(key, rate, cap, now, grace_ms)
  local tokens, updated = refill(key, 'tokens', 'updated', cap, rate, now)
  local wait = wait_for(tokens, 1, rate)
  if wait == 0 then tokens = tokens - 1 end
  redis.call('HSET', key, 'tokens', fmt(tokens), 'updated', fmt(updated))
  redis.call('PEXPIRE', key, full_in_ms(tokens, cap, rate) + grace_ms)
  return wait
end
"""

# KEYS: slots zset (member lease_id, score expiry). ARGV: lease_id, limit, now, ttl, grace_ms.
# Unexpired leases count; a held unexpired lease is renewed without a check. 1 if held.
_ACQUIRE = _SLOTS_LUA + """
local key, lease = KEYS[1], ARGV[1]
local limit, now, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local held = redis.call('ZSCORE', key, lease)
if (not held) or tonumber(held) <= now then
  if redis.call('ZCOUNT', key, '(' .. ARGV[3], '+inf') >= limit then return 0 end
end
hold(key, lease, now, ttl, tonumber(ARGV[5]))
return 1
"""

# KEYS: bucket hash. ARGV: rate, capacity, now, grace_ms. Takes one token or nothing; returns
# the wait.
_TAKE_START = _SLOTS_LUA + """
return fmt(take_start(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])))
"""

# KEYS: gate hash, slots zset, start bucket hash. ARGV: lease_id, limit, now, ttl, grace_ms, rate,
# capacity. One admission (`LimiterStore.start`): _CLOSE_GATE's gate read, then _ACQUIRE for a new
# lease and _TAKE_START, both or neither. Replies {'gate', until, info}, {'full'}, {'wait', wait}
# or {'held'}.
_START = _SLOTS_LUA + """
local now, grace_ms = tonumber(ARGV[3]), tonumber(ARGV[5])
local gate = redis.call('HMGET', KEYS[1], 'until', 'info')
if gate[1] and tonumber(gate[1]) > now then return {'gate', gate[1], gate[2]} end
if redis.call('ZCOUNT', KEYS[2], '(' .. ARGV[3], '+inf') >= tonumber(ARGV[2]) then return {'full'} end
local wait = take_start(KEYS[3], tonumber(ARGV[6]), tonumber(ARGV[7]), now, grace_ms)
if wait > 0 then return {'wait', fmt(wait)} end
hold(KEYS[2], ARGV[1], now, tonumber(ARGV[4]), grace_ms)
return {'held'}
"""

# KEYS: budget hash (fields rt/ru: requests, tt/tu: tokens). ARGV: requests capacity ('' = none),
# requests rate, tokens capacity ('' = none), tokens rate, tokens, now, grace_ms.
# Takes 1 request and the tokens from both buckets or nothing; returns the longer wait.
_BUDGET_TAKE = _BUCKET_LUA + """
local key, now = KEYS[1], tonumber(ARGV[6])
local rcap, rrate = tonumber(ARGV[1]), tonumber(ARGV[2])
local tcap, trate, want = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local wait, keep = 0, 0
local r, ru, t, tu
if rcap then
  r, ru = refill(key, 'rt', 'ru', rcap, rrate, now)
  wait = math.max(wait, wait_for(r, 1, rrate))
end
if tcap then
  t, tu = refill(key, 'tt', 'tu', tcap, trate, now)
  wait = math.max(wait, wait_for(t, math.min(want, tcap), trate))
end
if rcap then
  if wait == 0 then r = r - 1 end
  redis.call('HSET', key, 'rt', fmt(r), 'ru', fmt(ru))
  keep = math.max(keep, full_in_ms(r, rcap, rrate))
end
if tcap then
  if wait == 0 then t = t - want end
  redis.call('HSET', key, 'tt', fmt(t), 'tu', fmt(tu))
  keep = math.max(keep, full_in_ms(t, tcap, trate))
end
if rcap or tcap then redis.call('PEXPIRE', key, keep + tonumber(ARGV[7])) end
return fmt(wait)
"""

# KEYS: budget hash. ARGV: tokens capacity, tokens rate, delta, now, grace_ms.
# Refills the token bucket, then charges delta (negative refunds, capped at capacity).
_BUDGET_ADJUST = _BUCKET_LUA + """
local key, cap, rate = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local t, tu = refill(key, 'tt', 'tu', cap, rate, tonumber(ARGV[4]))
t = math.min(cap, t - tonumber(ARGV[3]))
redis.call('HSET', key, 'tt', fmt(t), 'tu', fmt(tu))
local keep = full_in_ms(t, cap, rate)
local pttl = redis.call('PTTL', key)
if pttl < keep + tonumber(ARGV[5]) then redis.call('PEXPIRE', key, keep + tonumber(ARGV[5])) end
"""

# KEYS: gate hash. ARGV: until, info JSON, keep_ms. A gate closed for longer stays so.
_CLOSE_GATE = """
local current = tonumber(redis.call('HGET', KEYS[1], 'until'))
if current and current > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'until', ARGV[1], 'info', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def redacted_location(url: str) -> str:
    """host:port of a Redis URL, without its password (safe to log)."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}"


# KEYS[1] a set; ARGV: member, limit. 1 when the member is (now) in the set.
_JOIN_CAPPED = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
"""


# Every script by its SHA-1, as EVALSHA names it.
_SHAS = {source: hashlib.sha1(source.encode()).hexdigest()
         for source in (_ACQUIRE, _TAKE_START, _START, _BUDGET_TAKE, _BUDGET_ADJUST, _CLOSE_GATE, _JOIN_CAPPED)}


class RedisStore:
    """`LimiterStore` on Redis; keys are `{prefix}{kind}:{account or worker}`."""

    name = "redis"

    def __init__(self, url: str, prefix: str = "zai-proxy:", timeout: float = 0.5) -> None:
        self.location = redacted_location(url)
        self._prefix = prefix
        # One immediate retry on a broken connection only: a pooled connection is stale after a
        # Redis restart and fails once. No retry on timeouts and no backoff: a dead or hung Redis
        # must fail within one timeout, so the caller can go on with local limits.
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            retry_on_timeout=False, decode_responses=True)
        self._pipeline = TurnPipeline(self._redis)

    def _key(self, kind: str, owner: str) -> str:
        return f"{self._prefix}{kind}:{owner}"

    async def _run(self, command: Command) -> Any:
        """One command, sent with the others of this loop turn (redis_pipeline.py)."""
        try:
            return await self._pipeline.call(command)
        except (RedisError, OSError) as exc:  # OSError includes TimeoutError
            raise StoreUnavailable(f"Redis at {self.location}: {exc.__class__.__name__}: {exc}") from exc

    async def _script(self, source: str, keys: list[str], args: list[Any]) -> Any:
        sha = _SHAS[source]

        def run(pipe: Pipeline) -> object:
            return pipe.evalsha(sha, len(keys), *keys, *args)

        try:
            return await self._run(run)
        except StoreUnavailable as exc:
            if not isinstance(exc.__cause__, NoScriptError):
                raise
        # A restarted or flushed Redis lost the scripts: load this one, then run it again.
        await self._run(lambda pipe: pipe.script_load(source))
        return await self._run(run)

    async def acquire_slot(self, account: str, lease_id: str, limit: int, now: float,
                           ttl: float) -> bool:
        held = await self._script(_ACQUIRE, [self._key("slots", account)],
                                  [lease_id, int(limit), _num(now), _num(ttl), _GRACE_MS])
        return held == 1

    async def release_slot(self, account: str, lease_id: str) -> bool:
        key = self._key("slots", account)
        return await self._run(lambda pipe: pipe.zrem(key, lease_id)) == 1

    async def in_flight(self, account: str, now: float) -> int:
        key = self._key("slots", account)
        return int(await self._run(lambda pipe: pipe.zcount(key, f"({now!r}", "+inf")))

    async def reap_expired(self, account: str, now: float) -> int:
        key = self._key("slots", account)
        return int(await self._run(lambda pipe: pipe.zremrangebyscore(key, "-inf", now)))

    async def take_start(self, account: str, rate_per_second: float, burst: float,
                         now: float) -> float:
        wait = await self._script(_TAKE_START, [self._key("start", account)],
                                  [_num(rate_per_second), _num(start_capacity(burst)), _num(now), _GRACE_MS])
        return float(wait)

    async def start(self, account: str, lease_id: str, limit: int, now: float, ttl: float,
                    rate_per_second: float, burst: float) -> Start:
        reply = await self._script(
            _START, [self._key("gate", account), self._key("slots", account), self._key("start", account)],
            [lease_id, int(limit), _num(now), _num(ttl), _GRACE_MS, _num(rate_per_second),
             _num(start_capacity(burst))])
        kind = reply[0]
        if kind == "held":
            return STARTED
        if kind == "full":
            return NO_ROOM
        if kind == "wait":
            return Start(False, float(reply[1]))
        return Start(False, gate=(float(reply[1]), json.loads(reply[2])))

    async def load_state(self, account: str) -> dict[str, Any] | None:
        key = self._key("state", account)
        raw = await self._run(lambda pipe: pipe.get(key))
        return None if raw is None else json.loads(raw)

    async def save_state(self, account: str, state: dict[str, Any], ttl: float) -> None:
        key, value = self._key("state", account), json.dumps(state)
        await self._run(lambda pipe: pipe.set(key, value, px=_ms(ttl)))

    async def budget_take(self, worker: str, requests_capacity: float | None,
                          requests_per_second: float, tokens_capacity: float | None,
                          tokens_per_second: float, tokens: float, now: float) -> float:
        wait = await self._script(
            _BUDGET_TAKE, [self._key("budget", worker)],
            [_num(requests_capacity), _num(requests_per_second), _num(tokens_capacity),
             _num(tokens_per_second), _num(tokens), _num(now), _GRACE_MS])
        return float(wait)

    async def budget_adjust(self, worker: str, tokens_capacity: float | None,
                            tokens_per_second: float, delta_tokens: float, now: float) -> None:
        if tokens_capacity is None:
            return
        await self._script(_BUDGET_ADJUST, [self._key("budget", worker)],
                           [_num(tokens_capacity), _num(tokens_per_second), _num(delta_tokens),
                            _num(now), _GRACE_MS])

    async def close_gate(self, account: str, until: float, info: dict[str, Any]) -> None:
        # `until` is compared with the caller's clock; the key's TTL (Redis's clock) only has to
        # outlive it.
        keep_ms = _ms(max(until - time.time(), 0.0)) + _GRACE_MS
        await self._script(_CLOSE_GATE, [self._key("gate", account)], [_num(until), json.dumps(info), keep_ms])

    async def open_gate(self, account: str) -> None:
        key = self._key("gate", account)
        await self._run(lambda pipe: pipe.delete(key))

    async def gate(self, account: str, now: float) -> tuple[float, dict[str, Any]] | None:
        key = self._key("gate", account)
        until, info = await self._run(lambda pipe: pipe.hmget(key, "until", "info"))
        if until is None or float(until) <= now:
            return None
        return float(until), json.loads(info)

    async def claim(self, key: str, now: float, ttl: float) -> bool:
        name = self._key("claim", key)
        return bool(await self._run(lambda pipe: pipe.set(name, "1", nx=True, px=_ms(ttl))))

    async def settle_claim(self, key: str, now: float, ttl: float) -> bool:
        # PEXPIRE answers whether the key exists, and shortens it if so: one command.
        name = self._key("claim", key)
        return bool(await self._run(lambda pipe: pipe.pexpire(name, _ms(ttl))))

    async def join_capped(self, key: str, member: str, limit: int) -> bool:
        return bool(await self._script(_JOIN_CAPPED, [self._key("set", key)], [member, limit]))

    async def ping(self) -> bool:
        try:
            return bool(await self._run(lambda pipe: pipe.ping()))
        except StoreUnavailable:
            return False

    async def close(self) -> None:
        await self._pipeline.close()
        await self._redis.aclose()
