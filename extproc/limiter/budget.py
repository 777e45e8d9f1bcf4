"""Per-worker budgets: requests per minute and tokens per minute, as token buckets.

Tokens are charged on the request-side estimate at admission (the real count is known only at
the end) and corrected by `settle` once the real usage is known; a correction may leave a bucket
in debt, which refill repays before the worker is admitted again. Times are seconds from any
clock the caller keeps consistent (wall-clock epoch when buckets are shared or persisted).

Budget file, one worker per line (`#` starts a comment):

    *      rpm=60 tpm=200000    # default for every worker without a line of its own
    alice  tpm=1000000          # only a token budget
    ci-bot                      # no budget at all, even with a `*` line
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

DEFAULT_WORKER = "*"
# A shortfall that refills within a microsecond counts as none: epoch-second floats are only
# precise to ~0.2 us, so waiting exactly the returned time must always be enough.
_SLACK_SECONDS = 1e-6


class TokenBucket:
    """`capacity` units, refilled continuously at `refill_per_second`; starts full."""

    __slots__ = ("capacity", "refill_per_second", "_level", "_at")

    def __init__(self, capacity: float, refill_per_second: float) -> None:
        if not (capacity > 0 and math.isfinite(capacity)):
            raise ValueError(f"capacity must be a positive number, got {capacity!r}")
        if not (refill_per_second > 0 and math.isfinite(refill_per_second)):
            raise ValueError(
                f"refill_per_second must be a positive number, got {refill_per_second!r}")
        self.capacity = float(capacity)
        self.refill_per_second = float(refill_per_second)
        self._level = self.capacity
        self._at: float | None = None

    def level(self, now: float) -> float:
        """Units available at `now` (negative while in debt)."""
        self._refill(now)
        return self._level

    def wait(self, amount: float, now: float) -> float:
        """Seconds until `amount` can be taken; 0.0 if it can be now. Charges nothing.

        An amount larger than the capacity can never fit: it waits for a full bucket and
        then goes, leaving the bucket in debt (otherwise it would wait forever).
        """
        self._refill(now)
        need = min(amount, self.capacity)
        if self._level + _SLACK_SECONDS * self.refill_per_second >= need:
            return 0.0
        return (need - self._level) / self.refill_per_second

    def try_take(self, amount: float, now: float) -> float:
        """Take `amount` and return 0.0, or take nothing and return the seconds to wait."""
        wait = self.wait(amount, now)
        if wait == 0.0:
            self._level -= amount
        return wait

    def adjust(self, delta: float, now: float) -> None:
        """Charge `delta` more (negative: refund) after the fact; never above capacity."""
        self._refill(now)
        self._level = min(self.capacity, self._level - delta)

    def full(self, now: float) -> bool:
        return self.level(now) >= self.capacity

    def snapshot(self) -> dict[str, float | None]:
        return {"level": self._level, "at": self._at}

    def restore(self, state: Mapping[str, Any]) -> bool:
        try:
            level = float(state["level"])
            at = None if state.get("at") is None else float(state["at"])
        except (KeyError, TypeError, ValueError):
            return False
        if not math.isfinite(level) or (at is not None and not math.isfinite(at)):
            return False
        self._level, self._at = min(self.capacity, level), at
        return True

    def _refill(self, now: float) -> None:
        if self._at is not None and now > self._at:
            gained = (now - self._at) * self.refill_per_second
            self._level = min(self.capacity, self._level + gained)
        # Never move the stamp back: a clock step back must not refill the same time twice.
        self._at = now if self._at is None else max(self._at, now)


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """A worker's limits; None means unlimited on that axis."""

    rpm: int | None = None
    tpm: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.rpm is None and self.tpm is None


class WorkerBudget:
    """A request bucket (rpm) and a token bucket (tpm), charged together or not at all."""

    __slots__ = ("config", "requests", "tokens")

    def __init__(self, rpm: int | None, tpm: int | None) -> None:
        self.config = BudgetConfig(rpm, tpm)
        self.requests = TokenBucket(rpm, rpm / 60.0) if rpm is not None else None
        self.tokens = TokenBucket(tpm, tpm / 60.0) if tpm is not None else None

    def admit(self, estimated_tokens: float, now: float) -> float:
        """0.0 and both buckets charged, or the seconds to wait (the longer of the two)
        with neither charged."""
        wait = max(self.requests.wait(1, now) if self.requests is not None else 0.0,
                   self.tokens.wait(estimated_tokens, now) if self.tokens is not None else 0.0)
        if wait > 0.0:
            return wait
        if self.requests is not None:
            self.requests.try_take(1, now)
        if self.tokens is not None:
            self.tokens.try_take(estimated_tokens, now)
        return 0.0

    def settle(self, estimated: float, actual: float, now: float) -> None:
        """Replace the admission estimate by the real usage (input + output tokens)."""
        if self.tokens is not None:
            self.tokens.adjust(actual - estimated, now)

    def idle(self, now: float) -> bool:
        """Both buckets full: the same as a fresh budget, safe to drop."""
        return all(b.full(now) for b in (self.requests, self.tokens) if b is not None)

    def snapshot(self) -> dict[str, Any]:
        return {"rpm": self.config.rpm, "tpm": self.config.tpm,
                "requests": self.requests.snapshot() if self.requests is not None else None,
                "tokens": self.tokens.snapshot() if self.tokens is not None else None}


class Budgets:
    """Budgets of all workers, created on first use from their config (or the `*` default)."""

    def __init__(self, configs: Mapping[str, BudgetConfig] | None = None) -> None:
        self._configs: dict[str, BudgetConfig] = dict(configs or {})
        self._budgets: dict[str, WorkerBudget] = {}

    def config_for(self, worker: str) -> BudgetConfig:
        return self._configs.get(worker, self._configs.get(DEFAULT_WORKER, BudgetConfig()))

    def get(self, worker: str) -> WorkerBudget | None:
        """The worker's budget; None when it has none (nothing to check or charge)."""
        budget = self._budgets.get(worker)
        if budget is None:
            config = self.config_for(worker)
            if config.unlimited:
                return None
            budget = self._budgets[worker] = WorkerBudget(config.rpm, config.tpm)
        return budget

    def admit(self, worker: str, estimated_tokens: float, now: float) -> float:
        budget = self.get(worker)
        return budget.admit(estimated_tokens, now) if budget is not None else 0.0

    def settle(self, worker: str, estimated: float, actual: float, now: float) -> None:
        budget = self.get(worker)  # pruned meanwhile: a fresh one still takes the correction
        if budget is not None:
            budget.settle(estimated, actual, now)

    def update(self, configs: Mapping[str, BudgetConfig]) -> None:
        """New configs (file changed): budgets whose limits changed start over, full."""
        self._configs = dict(configs)
        for worker, budget in list(self._budgets.items()):
            if budget.config != self.config_for(worker):
                del self._budgets[worker]

    def prune(self, now: float) -> int:
        """Drop budgets that are full again (they equal fresh ones); returns how many.
        Keeps memory bounded when anonymous workers come and go under a `*` default."""
        idle = [worker for worker, budget in self._budgets.items() if budget.idle(now)]
        for worker in idle:
            del self._budgets[worker]
        return len(idle)

    def __len__(self) -> int:
        return len(self._budgets)

    def snapshot(self) -> dict[str, Any]:
        return {worker: budget.snapshot() for worker, budget in self._budgets.items()}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take over bucket levels for workers whose limits are still the same."""
        for worker, saved in state.items():
            budget = self.get(worker) if isinstance(saved, dict) else None
            if budget is None or (saved.get("rpm"), saved.get("tpm")) != (
                    budget.config.rpm, budget.config.tpm):
                continue
            for bucket, key in ((budget.requests, "requests"), (budget.tokens, "tokens")):
                if bucket is not None and isinstance(saved.get(key), dict):
                    bucket.restore(saved[key])


class BudgetFileError(ValueError):
    """A budget file line that cannot be read; the message names the line."""


def parse_budgets(text: str) -> dict[str, BudgetConfig]:
    """`worker [rpm=N] [tpm=N]` lines into configs; `*` is the default for other workers."""
    configs: dict[str, BudgetConfig] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, *settings = line.split()
        if "=" in name:
            raise BudgetFileError(
                f"line {number}: {raw.strip()!r} starts with a setting; a line is "
                f"'<worker> [rpm=N] [tpm=N]', e.g. 'alice rpm=60 tpm=200000'")
        if name in configs:
            raise BudgetFileError(f"line {number}: worker {name!r} is listed twice")
        configs[name] = _parse_settings(number, settings)
    return configs


def _parse_settings(number: int, settings: list[str]) -> BudgetConfig:
    values: dict[str, int] = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or key not in ("rpm", "tpm"):
            raise BudgetFileError(
                f"line {number}: {setting!r} is not a setting; use rpm=N or tpm=N, "
                f"e.g. 'alice rpm=60 tpm=200000'")
        if key in values:
            raise BudgetFileError(f"line {number}: {key} is given twice")
        try:
            amount = int(value)
        except ValueError:
            amount = 0
        if amount <= 0:
            raise BudgetFileError(
                f"line {number}: {setting!r}: {key} must be a positive whole number, e.g. "
                f"{key}={60 if key == 'rpm' else 200000}")
        values[key] = amount
    return BudgetConfig(rpm=values.get("rpm"), tpm=values.get("tpm"))
