"""The limiter's shared-state contract, run against LocalStore and RedisStore (a real
redis-server), plus two replicas on one Redis, and FailoverStore across Redis crashes and hangs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
import uuid
from pathlib import Path
from typing import AsyncIterator

import pytest
import redis.asyncio as aioredis

from extproc.limiter.stores.failover import FailoverStore
from extproc.limiter.stores.redis import RedisStore, redacted_location
from extproc.limiter.stores.base import LimiterStore, Start, StoreUnavailable
from extproc.limiter.stores.local import LocalStore
from redis_server import RedisServer, free_port, redis_server, redis_url, start_redis  # noqa: F401

pytestmark = pytest.mark.timeout(30)

T0 = 1_000.0  # an explicit, fake wall clock: every `now` below is exact


def fresh_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}:"


@pytest.fixture(params=["local", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[LimiterStore]:
    if request.param == "local":
        s: LimiterStore = LocalStore()
    else:
        # These tests are about the stores' semantics, not Redis's speed: a loaded CI machine may
        # take more than the production 0.5 s to open 50 connections at once.
        s = RedisStore(request.getfixturevalue("redis_url"), prefix=fresh_prefix(), timeout=5.0)
    yield s
    await s.close()


# -- slots ----------------------------------------------------------------------------------------

async def test_slots_respect_the_limit_under_concurrency(store: LimiterStore) -> None:
    results = await asyncio.gather(*(store.acquire_slot("acct", f"l{i}", 3, T0, 60) for i in range(50)))
    assert sum(results) == 3
    assert await store.in_flight("acct", T0) == 3
    assert await store.in_flight("other", T0) == 0


async def test_release_is_exactly_once(store: LimiterStore) -> None:
    assert await store.acquire_slot("acct", "a", 1, T0, 60)
    assert not await store.acquire_slot("acct", "b", 1, T0, 60)
    assert await store.release_slot("acct", "a") is True
    assert await store.release_slot("acct", "a") is False
    assert await store.release_slot("acct", "never") is False
    assert await store.acquire_slot("acct", "b", 1, T0, 60)


async def test_reacquire_is_idempotent_and_renews(store: LimiterStore) -> None:
    assert await store.acquire_slot("acct", "a", 1, T0, 10)
    assert await store.acquire_slot("acct", "a", 1, T0 + 8, 10)  # renewed: now expires at T0+18
    assert await store.in_flight("acct", T0 + 15) == 1
    assert await store.in_flight("acct", T0 + 18) == 0


async def test_expired_leases_stop_counting_and_are_reaped_once(store: LimiterStore) -> None:
    assert await store.acquire_slot("acct", "a", 2, T0, 10)
    assert await store.acquire_slot("acct", "b", 2, T0 + 5, 10)
    assert not await store.acquire_slot("acct", "c", 2, T0 + 9, 10)
    assert await store.in_flight("acct", T0 + 10) == 1  # a expires at exactly T0+10
    assert await store.acquire_slot("acct", "c", 2, T0 + 10, 10)  # a no longer counts
    assert await store.reap_expired("acct", T0 + 10) == 1
    assert await store.reap_expired("acct", T0 + 10) == 0
    assert await store.release_slot("acct", "a") is False  # reaped, so not released as well
    assert await store.reap_expired("acct", T0 + 100) == 2
    assert await store.in_flight("acct", T0 + 100) == 0


async def test_an_expired_lease_must_find_room_to_come_back(store: LimiterStore) -> None:
    assert await store.acquire_slot("acct", "a", 1, T0, 1)
    assert await store.acquire_slot("acct", "b", 1, T0 + 2, 10)
    assert not await store.acquire_slot("acct", "a", 1, T0 + 3, 10)


# -- start rate -----------------------------------------------------------------------------------

async def test_start_bucket_burst_then_rate(store: LimiterStore) -> None:
    assert [await store.take_start("acct", 2.0, 3.0, T0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert await store.take_start("acct", 2.0, 3.0, T0) == pytest.approx(0.5)
    assert await store.take_start("acct", 2.0, 3.0, T0 + 0.25) == pytest.approx(0.25)  # nothing taken
    assert await store.take_start("acct", 2.0, 3.0, T0 + 0.5) == 0.0
    assert await store.take_start("acct", 2.0, 3.0, T0 + 0.5) == pytest.approx(0.5)
    # A long pause refills up to the burst only.
    assert [await store.take_start("acct", 2.0, 3.0, T0 + 100) for _ in range(4)][3] == pytest.approx(0.5)


async def test_start_bucket_edges(store: LimiterStore) -> None:
    assert await store.take_start("a", 1.0, 0.0, T0) == 0.0  # burst below one still admits one
    assert await store.take_start("a", 1.0, 0.0, T0) == pytest.approx(1.0)
    assert await store.take_start("b", 0.0, 1.0, T0) == 0.0
    assert await store.take_start("b", 0.0, 1.0, T0 + 50) == math.inf
    # A replica whose clock is behind adds nothing rather than going backwards.
    assert await store.take_start("c", 1.0, 1.0, T0) == 0.0
    assert await store.take_start("c", 1.0, 1.0, T0 - 5) == pytest.approx(1.0)


# -- one admission: the gate, a slot and a start token in one step --------------------------------

async def test_a_start_holds_a_slot_and_a_start_token_both_or_neither(store: LimiterStore) -> None:
    assert await store.start("acct", "a", 2, T0, 60, 1.0, 2.0) == Start(True)
    assert await store.start("acct", "b", 2, T0, 60, 1.0, 2.0) == Start(True)
    # No free slot: nothing taken, the start bucket included.
    assert await store.start("acct", "c", 2, T0, 60, 1.0, 2.0) == Start(False)
    assert await store.in_flight("acct", T0) == 2
    assert await store.release_slot("acct", "a")
    # A free slot but no start token: the slot is not kept, and the wait is the bucket's.
    got = await store.start("acct", "c", 2, T0 + 0.25, 60, 1.0, 2.0)
    assert not got.held and got.gate is None and got.wait == pytest.approx(0.75)
    assert await store.in_flight("acct", T0 + 0.25) == 1
    assert await store.release_slot("acct", "c") is False
    assert await store.start("acct", "c", 2, T0 + 1.0, 60, 1.0, 2.0) == Start(True)
    assert await store.take_start("acct", 1.0, 2.0, T0 + 1.0) == pytest.approx(1.0)  # it took the token


async def test_a_start_under_many_at_once_never_exceeds_the_limit(store: LimiterStore) -> None:
    got = await asyncio.gather(*(store.start("acct", f"l{i}", 3, T0, 60, 100.0, 100.0) for i in range(40)))
    assert sum(start.held for start in got) == 3
    assert await store.in_flight("acct", T0) == 3


async def test_a_start_while_the_gate_is_closed_takes_nothing_and_says_until_when(store: LimiterStore) -> None:
    await store.close_gate("acct", T0 + 100, {"code": "1308", "message": "quota"})
    assert await store.start("acct", "a", 5, T0 + 50, 60, 1.0, 1.0) == Start(
        False, gate=(T0 + 100, {"code": "1308", "message": "quota"}))
    assert await store.in_flight("acct", T0 + 50) == 0
    assert await store.take_start("acct", 1.0, 1.0, T0 + 50) == 0.0  # the token was still there
    assert await store.start("acct", "a", 5, T0 + 100, 60, 1.0, 1.0) == Start(True)  # the reset


# -- learned state and quota gate -----------------------------------------------------------------

async def test_state_round_trips_and_expires(store: LimiterStore) -> None:
    assert await store.load_state("acct") is None
    state = {"limit": 2.5, "ceiling": 3.0, "history": [1, 2], "note": "ok"}
    await store.save_state("acct", state, 60)
    assert await store.load_state("acct") == state
    await store.save_state("short", {"limit": 1}, 0.15)
    assert await store.load_state("short") == {"limit": 1}
    await asyncio.sleep(0.25)
    assert await store.load_state("short") is None
    assert await store.load_state("acct") == state


async def test_gate_closes_until_the_reset_and_only_extends(store: LimiterStore) -> None:
    assert await store.gate("acct", T0) is None
    await store.close_gate("acct", T0 + 100, {"code": "1308", "reset": "12:00"})
    assert await store.gate("acct", T0 + 50) == (T0 + 100, {"code": "1308", "reset": "12:00"})
    await store.close_gate("acct", T0 + 80, {"code": "1304"})  # earlier: the later reset stands
    assert await store.gate("acct", T0 + 50) == (T0 + 100, {"code": "1308", "reset": "12:00"})
    await store.close_gate("acct", T0 + 200, {"code": "1304"})
    assert await store.gate("acct", T0 + 150) == (T0 + 200, {"code": "1304"})
    assert await store.gate("acct", T0 + 200) is None
    assert await store.gate("other", T0) is None
    await store.close_gate("acct", T0 + 500, {})
    await store.open_gate("acct")
    assert await store.gate("acct", T0) is None


# -- worker budgets -------------------------------------------------------------------------------

async def test_budget_is_all_or_nothing(store: LimiterStore) -> None:
    async def take(tokens: float, now: float = T0) -> float:
        return await store.budget_take("w", 5.0, 1.0, 100.0, 10.0, tokens, now)

    assert await take(80) == 0.0  # 4 requests and 20 tokens left
    assert await take(50) == pytest.approx(3.0)  # tokens short: the request is not taken either
    assert [await take(0) for _ in range(4)] == [0.0] * 4
    assert await take(0) == pytest.approx(1.0)  # requests short: nothing taken
    assert await take(20) == pytest.approx(1.0)  # both short: the longer wait
    assert await take(20, T0 + 1) == 0.0


async def test_budget_debt_and_adjustment(store: LimiterStore) -> None:
    async def take(tokens: float, now: float = T0) -> float:
        return await store.budget_take("w", None, 0.0, 100.0, 10.0, tokens, now)

    assert await take(500) == 0.0  # above the whole budget: admitted from a full bucket, into debt
    assert await take(1) == pytest.approx(40.1)
    await store.budget_adjust("w", 100.0, 10.0, -450, T0)  # usage was 50, not 500
    assert await take(1) == 0.0  # 50 left, minus 1
    await store.budget_adjust("w", 100.0, 10.0, 79, T0)  # charged more afterwards: -30
    assert await take(10) == pytest.approx(4.0)
    await store.budget_adjust("w", 100.0, 10.0, -1e6, T0)  # a refund never exceeds the capacity
    assert await take(100) == 0.0
    assert await take(1) == pytest.approx(0.1)


async def test_unlimited_budgets_always_admit(store: LimiterStore) -> None:
    for _ in range(5):
        assert await store.budget_take("w", None, 0.0, None, 0.0, 1e9, T0) == 0.0
    await store.budget_adjust("w", None, 0.0, 1e9, T0)
    assert await store.budget_take("w", None, 0.0, None, 0.0, 1e9, T0) == 0.0
    assert await store.budget_take("r", 1.0, 0.0, None, 0.0, 1e9, T0) == 0.0
    assert await store.budget_take("r", 1.0, 0.0, None, 0.0, 0, T0 + 9) == math.inf


async def test_ping_and_name(store: LimiterStore) -> None:
    assert await store.ping() is True
    assert store.name in ("local", "redis")


# -- Redis specifics ------------------------------------------------------------------------------

async def test_redis_and_local_agree_on_random_operations(redis_url: str) -> None:
    """The Lua scripts and the Python arithmetic are the same algorithm, to the last bit."""
    local, shared = LocalStore(), RedisStore(redis_url, prefix=fresh_prefix())
    rng = random.Random(4)
    now = T0
    try:
        for step in range(300):
            now += rng.choice([0.0, 0.01, 0.3, 1.7, 12.0])
            name, args = random_op(rng, now)
            got_local = await getattr(local, name)(*args)
            got_redis = await getattr(shared, name)(*args)
            assert got_local == got_redis, (step, name, args)
    finally:
        await shared.close()


def random_op(rng: random.Random, now: float) -> tuple[str, tuple[object, ...]]:
    owner, lease = rng.choice("ab"), f"l{rng.randrange(6)}"
    return rng.choice([
        ("acquire_slot", (owner, lease, rng.randrange(1, 4), now, rng.choice([1.0, 5.0, 30.0]))),
        ("release_slot", (owner, lease)),
        ("in_flight", (owner, now)),
        ("reap_expired", (owner, now)),
        ("take_start", (owner, rng.choice([0.5, 1.3, 4.0]), rng.choice([1.0, 2.5]), now)),
        ("start", (owner, lease, rng.randrange(1, 4), now, rng.choice([1.0, 5.0, 30.0]),
                   rng.choice([0.5, 1.3, 4.0]), rng.choice([1.0, 2.5]))),
        ("close_gate", (owner, now + rng.choice([0.5, 3.0]), {"code": "1308"})),
        ("gate", (owner, now)),
        ("budget_take", (owner, rng.choice([None, 3.0]), 0.05, rng.choice([None, 1000.0]), 16.7,
                         rng.randrange(0, 1500), now)),
        ("budget_adjust", (owner, 1000.0, 16.7, rng.uniform(-300, 300), now)),
    ])


async def test_two_replicas_share_one_account(redis_url: str) -> None:
    prefix = fresh_prefix()
    a, b = RedisStore(redis_url, prefix=prefix), RedisStore(redis_url, prefix=prefix)
    try:
        got = await asyncio.gather(*(s.acquire_slot("acct", f"{n}{i}", 3, T0, 60)
                                     for i in range(20) for n, s in (("a", a), ("b", b))))
        assert sum(got) == 3
        assert await a.in_flight("acct", T0) == await b.in_flight("acct", T0) == 3
        held_by_a = [f"a{i}" for i in range(20) if await a.release_slot("acct", f"a{i}")]
        assert await b.in_flight("acct", T0) == 3 - len(held_by_a)
        await a.save_state("acct", {"ceiling": 3}, 60)
        assert await b.load_state("acct") == {"ceiling": 3}
        assert await a.take_start("acct", 1.0, 1.0, T0) == 0.0
        assert await b.take_start("acct", 1.0, 1.0, T0) == pytest.approx(1.0)
        await a.close_gate("acct", T0 + 10, {"code": "1308"})
        assert await b.gate("acct", T0) == (T0 + 10, {"code": "1308"})
        assert await a.budget_take("w", 1.0, 0.1, None, 0.0, 0, T0) == 0.0
        assert await b.budget_take("w", 1.0, 0.1, None, 0.0, 0, T0) == pytest.approx(10.0)
    finally:
        await a.close()
        await b.close()


async def test_prefixes_keep_deployments_apart(redis_url: str) -> None:
    a, b = RedisStore(redis_url, prefix=fresh_prefix()), RedisStore(redis_url, prefix=fresh_prefix())
    try:
        assert await a.acquire_slot("acct", "x", 1, T0, 60)
        assert await b.acquire_slot("acct", "y", 1, T0, 60)
    finally:
        await a.close()
        await b.close()


async def test_dead_redis_fails_fast_with_one_error_type() -> None:
    port = free_port()  # nothing listens there
    s = RedisStore(f"redis://:secret@127.0.0.1:{port}/0")
    assert s.location == f"127.0.0.1:{port}"
    start = time.monotonic()
    try:
        for op in (s.acquire_slot("a", "l", 1, T0, 1), s.release_slot("a", "l"), s.in_flight("a", T0),
                   s.take_start("a", 1, 1, T0), s.start("a", "l", 1, T0, 1, 1, 1), s.load_state("a"),
                   s.gate("a", T0),
                   s.budget_take("w", 1, 1, 1, 1, 1, T0)):
            with pytest.raises(StoreUnavailable) as info:
                await op
            assert "secret" not in str(info.value)
        assert await s.ping() is False
    finally:
        await s.close()
    assert time.monotonic() - start < 2


def test_redacted_location() -> None:
    assert redacted_location("redis://user:pw@redis.internal:6380/1") == "redis.internal:6380"
    assert redacted_location("redis://redis") == "redis:6379"


# -- failover -------------------------------------------------------------------------------------

class Switches:
    def __init__(self) -> None:
        self.seen: list[bool] = []

    def __call__(self, shared: bool) -> None:
        self.seen.append(shared)


async def wait_until_shared(store: FailoverStore, timeout: float = 5.0) -> float:
    """Keep using the store (which schedules the background ping) until it is shared again."""
    start = time.monotonic()
    while not store.shared:
        assert time.monotonic() - start < timeout, "did not go back to shared state"
        await store.in_flight("acct", time.time())
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def failover_store(server: RedisServer, prefix: str, switches: Switches) -> FailoverStore:
    return FailoverStore(RedisStore(server.url, prefix=prefix), LocalStore(), clock=time.monotonic,
                         retry_interval=0.3, on_change=switches)


@contextlib.asynccontextmanager
async def failover_on(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, FailoverStore, RedisStore, Switches]]:
    """A real Redis, a replica's FailoverStore over it, and another replica's view of it."""
    server = start_redis(tmp_path)
    prefix, switches = fresh_prefix(), Switches()
    store = failover_store(server, prefix, switches)
    observer = RedisStore(server.url, prefix=prefix)
    try:
        yield server, store, observer, switches
    finally:
        if server.running:
            server.resume()  # a paused server would hold up the clients' goodbyes
        await store.close()
        await observer.close()
        server.stop()


async def test_failover_on_crash_and_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="extproc.limiter.stores.failover")
    now = time.time()
    async with failover_on(tmp_path) as (server, store, observer, switches):
        assert await store.acquire_slot("acct", "r1", 2, now, 60) and store.name == "redis"
        assert await observer.in_flight("acct", now) == 1
        await asyncio.gather(*(store.take_start("x", 100, 100, now) for _ in range(10)))  # a pool

        server.stop()  # SIGKILL: Redis and its leases are gone
        start = time.monotonic()
        assert await store.acquire_slot("acct", "l1", 2, now, 60)  # redone on local, no error
        assert not await store.acquire_slot("acct", "l2", 2, now, 60)  # r1 still counts
        assert await store.take_start("acct", 1.0, 1.0, now) == 0.0
        await store.save_state("acct", {"ceiling": 2}, 60)
        assert await store.load_state("acct") == {"ceiling": 2}
        assert await store.in_flight("acct", now) == 2
        assert await store.release_slot("acct", "r1") is True  # Redis is down: forgotten here
        assert time.monotonic() - start < 0.5
        assert (store.shared, store.name, switches.seen) == (False, "local", [False])
        assert "Redis unreachable, using local limits" in caplog.text

        await asyncio.sleep(0.4)  # past retry_interval, but Redis is still down: stays local
        await store.in_flight("acct", now)
        await asyncio.sleep(0.1)
        assert not store.shared

        server.start()  # same port, empty
        assert await wait_until_shared(store) < 1.5
        assert switches.seen == [False, True]
        assert "Redis reachable again, shared state restored" in caplog.text

        # Back on Redis, the local lease l1 still counts and is released locally.
        assert await store.acquire_slot("acct", "r2", 2, now, 60)
        assert not await store.acquire_slot("acct", "r3", 2, now, 60)
        assert await observer.in_flight("acct", now) == 1
        assert await store.in_flight("acct", now) == 2
        assert await store.release_slot("acct", "l1") is True
        assert await store.acquire_slot("acct", "r3", 2, now, 60)
        assert await observer.in_flight("acct", now) == 2
        # Pooled connections that died with the old server are reconnected, not a new outage.
        await asyncio.gather(*(store.take_start("x", 100, 100, now) for _ in range(10)))
        assert switches.seen == [False, True]


async def test_failover_on_hang_releases_each_lease_where_it_was_taken(tmp_path: Path) -> None:
    now = time.time()
    async with failover_on(tmp_path) as (server, store, observer, switches):
        assert await store.acquire_slot("acct", "r1", 3, now, 60)
        assert await store.acquire_slot("acct", "r2", 3, now, 60)

        server.pause()  # SIGSTOP: connections hang instead of failing
        start = time.monotonic()
        # Times out, then is redone locally; the script still runs on Redis when it wakes up.
        assert await store.acquire_slot("acct", "l1", 3, now, 60)
        assert time.monotonic() - start < 1.0  # one socket timeout (0.5 s), then local
        assert switches.seen == [False]
        start = time.monotonic()
        assert await store.acquire_slot("acct", "l1", 3, now + 1, 60)  # renewed on local
        assert not await store.acquire_slot("acct", "l2", 3, now, 60)  # r1 + r2 + l1
        assert await store.acquire_slot("acct", "r2", 3, now, 60)  # renewing on hung Redis: kept
        assert await store.release_slot("acct", "r2") is True  # told to Redis when it is back
        assert time.monotonic() - start < 0.1  # no more waiting on the hung Redis

        server.resume()  # Redis kept r1 and r2, and now runs the l1 acquire
        await wait_until_shared(store)
        assert await observer.in_flight("acct", now) == 1  # l1 and r2 released there
        assert await store.release_slot("acct", "l1") is True  # local
        assert await observer.in_flight("acct", now) == 1
        assert await store.release_slot("acct", "r1") is True  # Redis
        assert await observer.in_flight("acct", now) == 0
        assert await store.in_flight("acct", now) == 0
        assert await store.release_slot("acct", "r1") is False
        assert switches.seen == [False, True]


async def test_failover_reaps_and_forgets_expired_leases(tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    store = failover_store(server, fresh_prefix(), Switches())
    try:
        assert await store.acquire_slot("acct", "r1", 1, T0, 10)
        server.stop()
        assert not await store.acquire_slot("acct", "l1", 1, T0 + 5, 10)  # r1 counts until T0+10
        assert await store.acquire_slot("acct", "l1", 1, T0 + 10, 10)
        assert await store.reap_expired("acct", T0 + 30) == 1  # l1 locally; r1 is just forgotten
        assert await store.acquire_slot("acct", "l2", 1, T0 + 30, 10)
        assert await store.in_flight("acct", T0 + 30) == 1
    finally:
        await store.close()
        server.stop()


async def test_ping_switches_explicitly(tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    switches = Switches()
    store = failover_store(server, fresh_prefix(), switches)
    try:
        assert await store.ping() is True
        server.stop()
        assert await store.ping() is False and store.name == "local"
        server.start()
        assert await store.ping() is True and store.name == "redis"
        assert switches.seen == [False, True]
    finally:
        await store.close()
        server.stop()


async def test_a_settled_claim_refuses_strays_for_its_short_ttl_then_is_gone(store: LimiterStore) -> None:
    """A request's claim lives an hour until its request filter settles it; then only the
    settled TTL: the store does not hold every request's claim for an hour."""
    assert await store.claim("record:s", T0, 3600)
    assert not await store.claim("record:s", T0, 3600)
    assert not await store.settle_claim("record:never", T0, 0.3)  # nobody claimed that one
    assert await store.settle_claim("record:s", T0, 0.3)
    assert not await store.claim("record:s", T0 + 0.1, 3600)  # a stray is still refused
    await asyncio.sleep(0.5)  # Redis expires keys on its own clock
    assert await store.claim("record:s", T0 + 0.5, 3600)  # the settled claim is gone


async def test_failover_of_a_start_on_hang_counts_both_sides_and_undoes_the_lost_one(tmp_path: Path) -> None:
    now = time.time()
    async with failover_on(tmp_path) as (server, store, observer, switches):
        assert (await store.start("acct", "r1", 2, now, 60, 100.0, 100.0)).held
        server.pause()  # the next start times out on Redis (its script runs there later)
        assert (await store.start("acct", "l1", 2, now, 60, 100.0, 100.0)).held  # redone locally
        assert await store.start("acct", "l2", 2, now, 60, 100.0, 100.0) == Start(False)  # r1 + l1
        assert switches.seen == [False]
        server.resume()
        await wait_until_shared(store)
        assert await observer.in_flight("acct", now) == 1  # r1; l1's late script undone there
        assert await store.release_slot("acct", "l1") is True  # where it was granted: locally
        assert await store.release_slot("acct", "r1") is True
        assert await observer.in_flight("acct", now) == 0


async def test_commands_issued_together_go_to_redis_over_one_connection(redis_url: str) -> None:
    store = RedisStore(redis_url, prefix=fresh_prefix())
    observer = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        before = (await observer.info("clients"))["connected_clients"]
        got = await asyncio.gather(*(store.start("acct", f"l{i}", 3, T0, 60, 100.0, 100.0) for i in range(40)),
                                   *(store.claim(f"c{i % 20}", T0, 60) for i in range(40)))
        assert sum(start.held for start in got[:40]) == 3  # each still atomic, in order
        assert got[40:] == [True] * 20 + [False] * 20  # each caller its own reply
        assert (await observer.info("clients"))["connected_clients"] == before + 1
    finally:
        await store.close()
        await observer.aclose()


async def test_scripts_lost_by_a_flushed_redis_are_loaded_again(redis_url: str) -> None:
    store = RedisStore(redis_url, prefix=fresh_prefix())
    observer = aioredis.Redis.from_url(redis_url)
    try:
        assert (await store.start("acct", "a", 2, T0, 60, 100.0, 100.0)).held
        await observer.script_flush()
        assert (await store.start("acct", "b", 2, T0, 60, 100.0, 100.0)).held
        assert await store.start("acct", "c", 2, T0, 60, 100.0, 100.0) == Start(False)
    finally:
        await store.close()
        await observer.aclose()


async def test_a_burst_of_requests_keeps_the_shared_state(redis_url: str) -> None:
    """Sent one by one, 300 commands at once took a pooled connection each, and past redis-py's
    100 it refused them: the replica left Redis for local limits. Pipelined, they pass."""
    switches = Switches()
    store = FailoverStore(RedisStore(redis_url, prefix=fresh_prefix()), LocalStore(), clock=time.monotonic,
                          on_change=switches)
    try:
        got = await asyncio.gather(*(store.start("acct", f"l{i}", 50, T0, 60, 1000.0, 1000.0) for i in range(100)),
                                   *(store.claim(f"c{i}", T0, 60) for i in range(100)),
                                   *(store.settle_claim(f"c{i}", T0, 5) for i in range(100)))
        assert switches.seen == [] and store.shared
        assert sum(start.held for start in got[:100]) == 50 and all(got[100:])
    finally:
        await store.close()
