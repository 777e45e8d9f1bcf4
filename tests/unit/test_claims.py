"""Who records a request (`Claims`): decided in memory when its streams meet in one process, by the
shared store when they landed in two; exactly one of them records either way."""

import asyncio

from hypothesis import given, settings, strategies as st

from extproc.limiter.stores.local import LocalStore
from extproc.proxy.gateway import SETTLED_CLAIM_TTL_SECONDS, Claims


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingStore(LocalStore):
    """The shared store (Redis in production), counting what reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def claim(self, key, now, ttl):
        self.calls.append(f"claim {key}")
        return await super().claim(key, now, ttl)

    async def settle_claim(self, key, now, ttl):
        self.calls.append(f"settle {key}")
        return await super().settle_claim(key, now, ttl)


async def test_streams_in_one_process_never_reach_the_store():
    store, clock = CountingStore(), Clock()
    claims = Claims(store, clock)
    claims.expect("s-1")
    assert await claims.claim("s-1")  # the observer stream here
    assert not await claims.claim("s-1")  # a second claim of it
    assert await claims.settle("s-1")  # the request filter: the observer has it
    clock.now += SETTLED_CLAIM_TTL_SECONDS - 1
    assert not await claims.claim("s-1")  # a stray duplicate, late
    assert store.calls == []


async def test_a_request_settled_before_its_observer_came_is_decided_by_the_store():
    store, clock = CountingStore(), Clock()
    claims = Claims(store, clock)
    claims.expect("s-1")
    assert not await claims.settle("s-1")  # no observer claimed it here, nor elsewhere
    assert await claims.claim("s-1")  # the request filter after the grace: its own record
    assert not await claims.claim("s-1")  # the observer stream, late, here: too late
    assert store.calls == ["settle record:s-1", "claim record:s-1", "claim record:s-1"]


async def test_streams_in_two_processes_meet_in_the_store():
    store = CountingStore()
    admitting, observing = Claims(store, Clock()), Claims(store, Clock())
    admitting.expect("s-1")
    assert await observing.claim("s-1")  # the observer stream landed on the other replica
    assert await admitting.settle("s-1")  # so its request filter finds the claim in the store
    assert store.calls == ["claim record:s-1", "settle record:s-1"]


async def test_a_settled_claim_refuses_strays_only_while_it_lasts():
    store, clock = CountingStore(), Clock()
    claims = Claims(store, clock)
    claims.expect("s-1")
    await claims.claim("s-1")
    await claims.settle("s-1")
    clock.now += SETTLED_CLAIM_TTL_SECONDS + 1
    assert await claims.claim("s-1")  # forgotten here, as the store forgets a settled claim
    assert store.calls == ["claim record:s-1"]


# One request, its request filter in process 0, its observer stream in process 0 or 1; the steps
# of both streams interleaved in any order the event loop allows.
@settings(max_examples=300, deadline=None)
@given(observer_process=st.sampled_from([0, 1]), observer_first=st.booleans(),
       observer_claims=st.integers(1, 3), stray_after=st.booleans())
def test_exactly_one_stream_records_a_request(observer_process, observer_first, observer_claims,
                                              stray_after):
    async def scenario() -> int:
        store, clock = LocalStore(), Clock()
        processes = [Claims(store, clock), Claims(store, clock)]
        here, there = processes[0], processes[observer_process]
        here.expect("s-1")
        records = 0

        async def observer() -> None:
            nonlocal records
            for _ in range(observer_claims):  # repeated claims: duplicates, handed over twice
                records += await there.claim("s-1")

        async def request_filter() -> None:
            nonlocal records
            if not await here.settle("s-1"):  # the observer never claimed it: after the grace
                records += await here.claim("s-1")

        if observer_first:
            await observer()
            await request_filter()
        else:
            await request_filter()
            await observer()
        if stray_after:
            records += await there.claim("s-1")
        return records

    assert asyncio.run(scenario()) == 1
