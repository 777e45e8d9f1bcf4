"""Admission in front of the limits, with the in-process store and a controllable wall clock."""

from __future__ import annotations

import asyncio

import pytest

from extproc.limiter.adaptive import AdaptiveLimit, AdaptiveParams
from extproc.limiter.admission import Admission, AdmissionHooks, Rejected
from extproc.limiter.quota import QuotaGate
from extproc.limiter.signals import Signal
from extproc.limiter.stores.local import LocalStore


class Wall:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def admission(limit: int = 2, max_wait: float = 5.0, max_queue: int = 10, wall: Wall | None = None,
              events: list | None = None) -> Admission:
    wall = wall or Wall()
    events = events if events is not None else []
    fixed = AdaptiveParams(initial=limit, minimum=limit, maximum=limit)
    rate = AdaptiveParams(initial=6000, minimum=6000, maximum=6000)
    return Admission("acct", LocalStore(clock=wall), AdaptiveLimit(fixed), AdaptiveLimit(rate),
                     QuotaGate(minimum_closure=1.0), max_wait=max_wait, max_queue=max_queue,
                     lease_ttl=100.0, poll_interval=0.01, wall=wall,
                     hooks=AdmissionHooks(rejected=events.append,
                                          reclaimed=lambda n: events.append(("reclaimed", n))))


async def test_over_the_limit_waits_and_is_admitted_on_release():
    adm = admission(limit=1)
    first = await adm.admit("a")
    waiting = asyncio.ensure_future(adm.admit("b"))
    await asyncio.sleep(0.05)
    assert not waiting.done() and len(adm.queue) == 1
    assert await first.release(Signal.SUCCESS) is True
    assert await first.release(Signal.SUCCESS) is False  # exactly once
    second = await asyncio.wait_for(waiting, 1)
    assert second.worker == "b" and adm.in_flight == 1
    await second.release(None)
    assert adm.in_flight == 0 and await adm.store.in_flight("acct", adm.wall()) == 0


async def test_full_queue_and_wait_timeout_are_rejected_with_retry_after():
    events: list = []
    adm = admission(limit=1, max_wait=0.1, max_queue=1, events=events)
    held = await adm.admit("a")
    queued = asyncio.ensure_future(adm.admit("b"))
    await asyncio.sleep(0.01)
    with pytest.raises(Rejected) as full:
        await adm.admit("c")
    assert full.value.reason == "queue_full" and full.value.retry_after > 0
    with pytest.raises(Rejected) as late:
        await queued
    assert late.value.reason == "wait_timeout" and "retry-after" in late.value.message
    assert events == ["queue_full", "wait_timeout"] and len(adm.queue) == 0
    await held.release(None)


async def test_a_client_that_leaves_while_queued_leaves_the_queue():
    adm = admission(limit=1)
    held = await adm.admit("a")
    waiting = asyncio.ensure_future(adm.admit("b"))
    await asyncio.sleep(0.02)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert len(adm.queue) == 0
    await held.release(None)
    await asyncio.sleep(0.05)
    assert adm.in_flight == 0  # nobody was admitted for the departed client


async def test_closed_quota_gate_rejects_at_once():
    wall = Wall()
    adm = admission(wall=wall)
    adm.gate.close(wall.now + 30, "1308", "limit will reset at ...", now_wall=wall.now)
    with pytest.raises(Rejected) as gated:
        await adm.admit("a")
    assert gated.value.reason == "quota" and 29 <= gated.value.retry_after <= 30
    wall.now += 31
    permit = await adm.admit("a")
    await permit.release(None)


async def test_lost_leases_are_reclaimed_and_counted():
    wall = Wall()
    events: list = []
    adm = admission(limit=1, wall=wall, events=events)
    await adm.admit("a")  # never released: its replica "died"
    wall.now += 101
    assert await adm.reap() == 1
    assert ("reclaimed", 1) in events
    assert await adm.store.in_flight("acct", wall.now) == 0


async def test_refusal_load_counts_only_requests_zai_is_serving():
    adm = admission(limit=3)
    permits = [await adm.admit(w) for w in "abc"]
    permits[0].mark_answered()
    permits[0].mark_answered()  # idempotent
    assert adm.answered == 1
    for p in permits:
        await p.release(None)
    assert adm.answered == 0


async def test_start_history_stays_bounded_without_any_upstream_answer():
    """The per-minute start count keeps only the last minute, even when no request is ever
    answered (every one cut or failed): memory does not grow with traffic."""
    wall = Wall()
    adm = admission(limit=5, wall=wall)
    for _ in range(600):
        permit = await adm.admit("a")
        await permit.release(None)
        wall.now += 0.5  # 120 starts a minute
    assert len(adm._starts) <= 121


async def test_quota_gate_closing_refuses_the_queue_at_once():
    events: list = []
    wall = Wall()
    adm = admission(limit=1, max_wait=30.0, wall=wall, events=events)
    held = await adm.admit("a")
    queued = [asyncio.ensure_future(adm.admit(w)) for w in ("b", "c")]
    await asyncio.sleep(0.02)
    assert len(adm.queue) == 2
    adm.gate.close(wall.now + 600, "1308", "Usage limit reached", now_wall=wall.now)
    for waiting in queued:
        with pytest.raises(Rejected) as refused:
            await asyncio.wait_for(waiting, 1)  # long before the 30 s queue timeout
        assert refused.value.reason == "quota" and refused.value.retry_after == pytest.approx(600)
    assert len(adm.queue) == 0 and events.count("quota") == 2
    await held.release(None)
    assert adm.in_flight == 0


async def test_a_gate_another_replica_closed_in_the_store_refuses_here_at_once():
    wall, events = Wall(), []
    adm = admission(wall=wall, events=events)
    # Another replica, on the same store, learned that the quota ran out.
    await adm.store.close_gate("acct", wall.now + 120, {"code": "1308", "message": "Usage limit reached"})
    with pytest.raises(Rejected) as gated:
        await adm.admit("a")
    assert gated.value.reason == "quota" and gated.value.retry_after == pytest.approx(120)
    assert "Usage limit reached" in gated.value.message and events == ["quota"]
    assert adm.in_flight == 0 and await adm.store.in_flight("acct", wall.now) == 0
    wall.now += 121
    permit = await adm.admit("a")
    await permit.release(None)


async def test_a_gate_another_replica_closes_refuses_the_queue_here():
    wall, events = Wall(), []
    adm = admission(limit=1, max_wait=30.0, wall=wall, events=events)
    held = await adm.admit("a")
    queued = [asyncio.ensure_future(adm.admit(w)) for w in ("b", "c")]
    await asyncio.sleep(0.02)
    await adm.store.close_gate("acct", wall.now + 600, {"code": "1308", "message": "Usage limit reached"})
    await held.release(None)  # the slot frees; the next start finds the gate instead
    for waiting in queued:
        with pytest.raises(Rejected) as refused:
            await asyncio.wait_for(waiting, 1)
        assert refused.value.reason == "quota" and refused.value.retry_after == pytest.approx(600)
    assert len(adm.queue) == 0 and adm.in_flight == 0 and events.count("quota") == 2
