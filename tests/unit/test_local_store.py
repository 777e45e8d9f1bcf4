"""The in-process store's slots: counted without a scan per admission, and still exactly the leases
that have not expired (the Redis store's Lua script counts them the same way)."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings, strategies as st

from extproc.limiter.stores.local import LocalStore

# (operation, lease, limit, time step, ttl): acquire or release one of a few leases as time moves.
OPERATIONS = st.lists(st.tuples(st.sampled_from(["acquire", "release"]), st.integers(0, 5),
                                st.integers(1, 4), st.sampled_from([0.0, 0.5, 1.0, 3.0]),
                                st.sampled_from([1.0, 2.0, 10.0])), max_size=60)


class Reference:
    """Slots as the contract states them: a lease counts while it has not expired."""

    def __init__(self) -> None:
        self.leases: dict[str, float] = {}

    def acquire(self, lease: str, limit: int, now: float, ttl: float) -> bool:
        held = self.leases.get(lease)
        if held is None or held <= now:
            if sum(1 for expiry in self.leases.values() if expiry > now) >= limit:
                return False
        self.leases[lease] = now + ttl
        return True

    def release(self, lease: str) -> bool:
        return self.leases.pop(lease, None) is not None


@settings(max_examples=300, deadline=None)
@given(OPERATIONS)
def test_slots_match_the_reference_for_any_sequence(operations: list[tuple[str, int, int, float, float]]) -> None:
    async def run() -> None:
        store, reference, now = LocalStore(), Reference(), 1_000.0
        for operation, lease, limit, step, ttl in operations:
            now += step
            name = f"lease-{lease}"
            if operation == "acquire":
                assert await store.acquire_slot("acct", name, limit, now, ttl) == \
                    reference.acquire(name, limit, now, ttl)
            else:
                assert await store.release_slot("acct", name) == reference.release(name)
            live = sum(1 for expiry in reference.leases.values() if expiry > now)
            assert await store.in_flight("acct", now) == live
    asyncio.run(run())


def test_expired_leases_make_room_at_the_limit() -> None:
    async def run() -> None:
        store = LocalStore()
        assert await store.acquire_slot("acct", "a", 2, 0.0, 1.0)
        assert await store.acquire_slot("acct", "b", 2, 0.0, 10.0)
        assert not await store.acquire_slot("acct", "c", 2, 0.5, 10.0)  # both live: full
        assert await store.acquire_slot("acct", "c", 2, 1.0, 10.0)  # a expired: its room is free
        assert not await store.acquire_slot("acct", "d", 2, 1.0, 10.0)
    asyncio.run(run())
