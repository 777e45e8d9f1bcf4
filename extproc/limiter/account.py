"""The limiter of one upstream account, wired together: adaptive limits, fair admission, the
quota gate, per-worker budgets, learned state that survives restarts, and a housekeeping loop.

This is the edge between the pure algorithms and their I/O (the state store — in-process or
Redis — and the state file); the session and the attempt filter talk only to this.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from extproc.lifecycle import cancel_and_wait
from extproc.limiter.adaptive import AdaptiveLimit, AdaptiveParams, Adjustment
from extproc.limiter.admission import Admission, AdmissionHooks, Permit, Rejected
from extproc.limiter.budget import EVERY_WORKER, BudgetConfig, parse_budgets
from extproc.limiter.pacing import Pacer, ReserveBreach
from extproc.limiter.quota import QuotaGate, format_reset
from extproc.limiter.codes import Code, Reset, lookup
from extproc.limiter.signals import (Signal, next_midnight, quota_reset_at,
                                     reset_from_retry_after)
from extproc.limiter.stores.base import LimiterStore, StoreUnavailable

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL = 1.0
REAP_INTERVAL = 10.0
STATE_TTL = 3600.0


@dataclass(frozen=True)
class LimiterSettings:
    initial: int
    minimum: int
    maximum: int
    rate_initial: float
    rate_minimum: float
    rate_maximum: float
    max_wait: float
    max_queue: int
    lease_ttl: float
    probe_interval: float
    state_file: str | None
    budgets: dict[str, BudgetConfig]


def load_budgets(path: str | None) -> dict[str, BudgetConfig]:
    if path is None:
        return {}
    with open(path, encoding="utf-8") as fh:
        return parse_budgets(fh.read())


class AccountLimiter:
    def __init__(self, account: str, settings: LimiterSettings, store: LimiterStore,
                 hooks: AdmissionHooks | None = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
        self.account = account
        self.settings = settings
        self.store = store
        self.wall = wall
        rng = rng or random.Random()
        self.concurrency = AdaptiveLimit(AdaptiveParams(
            initial=settings.initial, minimum=settings.minimum, maximum=settings.maximum,
            probe_interval=settings.probe_interval,
            probe_interval_max=max(settings.probe_interval, 120.0), state_ttl=STATE_TTL), rng)
        self.rate = AdaptiveLimit(AdaptiveParams(
            initial=settings.rate_initial, minimum=settings.rate_minimum,
            maximum=settings.rate_maximum, probe_interval=settings.probe_interval,
            probe_interval_max=max(settings.probe_interval, 120.0), state_ttl=STATE_TTL), rng)
        # Z.AI's reset time is honoured as given (a floor of 1 s guards against clock skew).
        self.gate = QuotaGate(minimum_closure=1.0)
        self.hooks = hooks or AdmissionHooks()
        self._report_adjusted = self.hooks.adjusted
        self.hooks.adjusted = self._on_adjusted
        self.admission = Admission(account, store, self.concurrency, self.rate, self.gate,
                                   max_wait=settings.max_wait, max_queue=settings.max_queue,
                                   lease_ttl=settings.lease_ttl, clock=clock, wall=wall,
                                   hooks=self.hooks)
        # The quota windows' pace (fed by the quota poller), for the priority reserve.
        self.pacer: Pacer | None = None
        self._dirty = False
        self._shared_seen = 0.0  # `saved_at` of the newest state taken from, or put in, Redis
        self._task: asyncio.Task[None] | None = None
        self._last_reap = 0.0
        self.reclaimed = 0

    # -- requests ----------------------------------------------------------------------------

    def budget_for(self, worker: str) -> BudgetConfig | None:
        budgets = self.settings.budgets
        config = budgets.get(worker) or budgets.get(EVERY_WORKER)
        return None if config is None or config.unlimited else config

    async def admit(self, worker: str, estimated_tokens: int = 0) -> Permit:
        """Admit or raise Rejected (quota gate closed, budget spent, queue full, waited too long)."""
        permit = await self.try_admit(worker, estimated_tokens)
        return permit if permit is not None else await self.admit_waiting(worker)

    async def try_admit(self, worker: str, estimated_tokens: int = 0,
                        priority: bool = False) -> Permit | None:
        """A permit at once, None if the request must wait (`admit_waiting`), or Rejected.

        A gate another replica closed is seen in the store's start (one round trip to Redis for
        the whole admission); it is read first only before a refusal of this replica's own or a
        charge to a budget, which it must take precedence over."""
        self.admission.check_gate()
        breach = None if priority or self.pacer is None else self.pacer.reserve_breach(self.wall())
        if breach is not None:
            await self._check_shared_gate()
            self._refuse_reserved(worker, breach)
        budget = self.budget_for(worker)
        if budget is not None:
            await self._check_shared_gate()
            wait = await self.store.budget_take(
                worker, budget.rpm, (budget.rpm or 0) / 60.0, budget.tpm, (budget.tpm or 0) / 60.0,
                float(estimated_tokens) if budget.tpm else 0.0, self.wall())
            if wait > 0:
                self.hooks.rejected("budget")
                raise Rejected("budget", wait,
                               f"zai-proxy: worker {worker!r} is over its budget "
                               f"({_describe(budget)}); retry after the time in retry-after.")
        return await self.admission.try_admit(worker)

    def _refuse_reserved(self, worker: str, breach: ReserveBreach) -> None:
        """Past 100 - QUOTA_RESERVE_PERCENT of a window, only priority workers start requests."""
        left = max(0.0, 1.0 - breach.used)
        if breach.reset_at is not None:
            wait = max(1.0, breach.reset_at - self.wall())
            when = f"it resets at {format_reset(breach.reset_at)}"
        else:
            wait, when = 60.0, "Z.AI gave no reset time"
        self.hooks.rejected("reserve")
        raise Rejected("reserve", wait,
                       f"zai-proxy: the account's {breach.window} quota window is "
                       f"{breach.used:.0%} used ({left:.0%} left) and the last "
                       f"{breach.reserve:.0%} is reserved for priority workers; worker "
                       f"{worker!r} is not one. {when[0].upper()}{when[1:]}; retry after "
                       f"retry-after, or ask the operator to mark this worker as priority.")

    async def admit_waiting(self, worker: str) -> Permit:
        """Wait in the fair queue for a permit (the budget was taken by `try_admit`)."""
        return await self.admission.admit_waiting(worker)

    async def settle_budget(self, worker: str, estimated: int, actual: int) -> None:
        """Replace the tokens charged at admission by the real usage."""
        budget = self.budget_for(worker)
        if budget is not None and budget.tpm and actual != estimated:
            await self.store.budget_adjust(worker, budget.tpm, budget.tpm / 60.0,
                                           float(actual - estimated), self.wall())

    # -- what upstream said ------------------------------------------------------------------

    def on_attempt(self, signal: Signal, code: str | None, message: str | None,
                   retry_after: str | None) -> None:
        """One upstream attempt's outcome (Envoy retries included)."""
        known = lookup(code)
        if known is not None and known.log_level >= logging.WARNING:
            # What the operator must know (a spent window, the key refused, fair-use throttling);
            # Z.AI's message never contains the key.
            log.log(known.log_level, "Z.AI refused the account: %s", known.meaning,
                    extra={"code": code, "zai_message": (message or "")[:300], "hint": known.hint})
        if signal is Signal.QUOTA:
            now = self.wall()
            self.close_gate(self._reset_of(known, message, retry_after, now), code or "quota",
                            message or "")
        elif signal in (Signal.KEY_REJECTED, Signal.MODEL_UNAVAILABLE):
            pass  # no limit of the account is at fault
        else:
            self.admission.learn(signal)

    def _reset_of(self, known: Code | None, message: str | None, retry_after: str | None,
                  now: float) -> float | None:
        """When the gate a quota answer closes opens again (None: the default closure)."""
        reset = known.reset if known is not None else Reset.MESSAGE
        if reset is Reset.MIDNIGHT:
            return next_midnight(now)
        if reset is Reset.RETRY:
            return None
        until = quota_reset_at(message or "", now)
        if until is not None:
            return until + 1.0  # Z.AI states the reset to the second: it may happen within it
        return reset_from_retry_after(retry_after, now)

    def close_gate(self, until: float | None, code: str, message: str) -> float:
        """Close the quota gate for every replica of the account until `until` (None: the
        default closure); returns the reopening time."""
        until = self.gate.close(until, code, message, now_wall=self.wall())
        info = {"code": code, "message": message}
        asyncio.ensure_future(self._share_gate(until, info))
        log.warning("quota gate closed", extra={"code": code, "until": until})
        self.admission._kick()
        return until

    async def _share_gate(self, until: float, info: dict[str, Any]) -> None:
        try:
            await self.store.close_gate(self.account, until, info)
        except StoreUnavailable:
            pass

    async def _check_shared_gate(self) -> None:
        """Rejected while the gate is closed here or, as the store says, by another replica
        (adopted here)."""
        try:
            shared = await self.store.gate(self.account, self.wall())
        except StoreUnavailable:
            shared = None
        if shared is not None:
            self.admission.adopt_gate(*shared)
        self.admission.check_gate()

    # -- admin -------------------------------------------------------------------------------

    async def reset(self) -> None:
        """Forget the learned limits and open the quota gate (admin action)."""
        self.concurrency.reset()
        self.rate.reset()
        self.gate.open()
        try:
            await self.store.open_gate(self.account)
        except StoreUnavailable:
            pass
        self._mark_dirty()
        await self._save()
        self.admission._kick()

    def state(self) -> dict[str, Any]:
        closure = self.gate.closure
        return {
            "store": self.store.name,
            "concurrency_limit": self.concurrency.allowed(),
            "concurrency_value": round(self.concurrency.value, 3),
            # Between probes the limit holds here; while probing it is one step above.
            "concurrency_probing": self.concurrency.probing,
            "concurrency_ceiling": self.concurrency.ceiling,
            "start_rate_limit": round(self.rate.value, 3),
            "start_rate_ceiling": self.rate.ceiling,
            "in_flight": self.admission.in_flight,
            "queued": len(self.admission.queue),
            "quota_gate": None if closure is None else {
                "until": closure.until, "code": closure.code, "message": self.gate.reason()},
            "reclaimed_leases": self.reclaimed,
        }

    # -- state across restarts, and housekeeping ---------------------------------------------

    async def start(self) -> None:
        await self._load()
        self._task = asyncio.ensure_future(self._housekeeping())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        await self._save()

    def _mark_dirty(self) -> None:
        self._dirty = True

    def _on_adjusted(self, kind: str, adjustment: Adjustment) -> None:
        self._mark_dirty()  # saved by the housekeeping loop, at most once a second
        self._report_adjusted(kind, adjustment)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            try:
                now = self.wall()
                if now - self._last_reap >= REAP_INTERVAL:
                    self._last_reap = now
                    self.reclaimed += await self.admission.reap()
                if self._dirty:
                    await self._save()
                elif self.store.name == "redis":
                    await self._adopt_shared()
            except StoreUnavailable:
                pass  # the failover store already switched; try again next round
            except Exception:  # housekeeping must never die
                log.exception("limiter housekeeping failed")

    def _snapshot(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency.snapshot(), "rate": self.rate.snapshot(),
                "gate": self.gate.snapshot(), "saved_at": self.wall()}

    def _restore(self, state: dict[str, Any]) -> None:
        now = self.wall()
        if isinstance(state.get("concurrency"), dict):
            self.concurrency.restore(state["concurrency"], now)
        if isinstance(state.get("rate"), dict):
            self.rate.restore(state["rate"], now)
        self.gate.restore(state.get("gate"), now)

    async def _save(self) -> None:
        self._dirty = False
        state = self._snapshot()
        if self.store.name == "redis":
            await self.store.save_state(self.account, state, STATE_TTL)
            self._shared_seen = state["saved_at"]
        if self.settings.state_file:
            _write_state_file(self.settings.state_file, self.account, state)

    async def _load(self) -> None:
        state: dict[str, Any] | None = None
        try:
            state = await self.store.load_state(self.account)
        except StoreUnavailable:
            state = None
        if state is None and self.settings.state_file:
            state = _read_state_file(self.settings.state_file, self.account)
        if state:
            self._restore(state)
            self._shared_seen = state.get("saved_at", 0.0)
            log.info("limiter state restored", extra={
                "concurrency_limit": self.concurrency.allowed(),
                "concurrency_ceiling": self.concurrency.ceiling})

    async def _adopt_shared(self) -> None:
        """Another replica learned something: take it over (one learned limit per account)."""
        state = await self.store.load_state(self.account)
        if state and state.get("saved_at", 0.0) > self._shared_seen:
            self._shared_seen = state["saved_at"]
            self._restore(state)


def _describe(budget: BudgetConfig) -> str:
    parts = [f"{budget.rpm} requests/min" if budget.rpm else "",
             f"{budget.tpm} tokens/min" if budget.tpm else ""]
    return ", ".join(p for p in parts if p)


def _read_state_file(path: str, account: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("limiter state file unreadable; starting fresh",
                    extra={"path": path, "error": exc.__class__.__name__})
        return None
    state = doc.get(account) if isinstance(doc, dict) else None
    return state if isinstance(state, dict) else None


def _write_state_file(path: str, account: str, state: dict[str, Any]) -> None:
    """Atomic replace, so a crash mid-write never leaves a broken file."""
    try:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {}
        if target.exists():
            try:
                loaded = json.loads(target.read_text())
                doc = loaded if isinstance(loaded, dict) else {}
            except ValueError:
                doc = {}
        doc[account] = state
        tmp = target.with_suffix(target.suffix + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, target)
    except OSError as exc:
        log.warning("limiter state file not written", extra={"path": path, "error": str(exc)})
