"""Pacing the account's quota windows: how used a window is now, when it runs out at the current
burn rate, and whether only priority workers may still start requests.

Z.AI's report (polled every minute) is the truth for the whole account, every replica and every
other user of the key included; between polls the tokens this process counted move the estimate
on where the report names the allowance (CREDIT_LIMIT). The burn rate is the change of the
reported share over the recent polls. Pure: times are passed in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from extproc.limiter.quota_report import QuotaReport, Window

# Polls older than this do not count towards the burn rate: it should follow the current load.
BURN_HORIZON_SECONDS = 15 * 60.0


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    ratio: float
    tokens: float  # this process's token count at the poll


class WindowPace:
    """One window's recent polls, and what they imply."""

    def __init__(self, horizon: float = BURN_HORIZON_SECONDS) -> None:
        self.horizon = horizon
        self.samples: deque[Sample] = deque()
        self.window: Window | None = None

    def observe(self, window: Window, tokens: float, now: float) -> None:
        last = self.window
        if last is not None and window.reset_at != last.reset_at:
            self.samples.clear()  # the window reset: older shares belong to another window
        self.window = window
        self.samples.append(Sample(now, window.used_ratio, tokens))
        while len(self.samples) > 2 and now - self.samples[0].at > self.horizon:
            self.samples.popleft()

    def ratio_per_token(self) -> float | None:
        """What one token costs of the window, where the report names the allowance
        (CREDIT_LIMIT). A percentage-only report gives no exact rate, and one learned from
        two reports would mistake other users of the key for this gateway's tokens."""
        w = self.window
        return 1.0 / w.allowance if w is not None and w.allowance else None

    def used_now(self, tokens: float) -> float | None:
        """The share used now: the last report plus what this process spent since (where the
        allowance is known)."""
        if self.window is None:
            return None
        per_token = self.ratio_per_token() or 0.0
        since = max(0.0, tokens - self.samples[-1].tokens)
        return self.window.used_ratio + since * per_token

    def burn_rate(self) -> float | None:
        """Share of the window used per second over the recent polls (None: not known yet)."""
        if len(self.samples) < 2:
            return None
        first, last = self.samples[0], self.samples[-1]
        if last.at <= first.at:
            return None
        return max(0.0, (last.ratio - first.ratio) / (last.at - first.at))

    def runs_out_at(self, tokens: float, now: float) -> float | None:
        """When the window is used up at the current burn rate; None when it will not be before
        it resets (or nothing is known). A spent window runs out now."""
        used = self.used_now(tokens)
        if used is None:
            return None
        if used >= 1.0:
            return now
        rate = self.burn_rate()
        if not rate:
            return None
        at = now + (1.0 - used) / rate
        reset_at = self.window.reset_at if self.window is not None else None
        return None if reset_at is not None and at >= reset_at else at


@dataclass(frozen=True, slots=True)
class ReserveBreach:
    window: str
    used: float  # share used now
    reset_at: float | None
    reserve: float  # the share kept for priority workers, which `used` reached


class Pacer:
    """Every window's pace, fed by the poller and the recorder."""

    def __init__(self, reserve_percent: float = 0.0,
                 horizon: float = BURN_HORIZON_SECONDS) -> None:
        if not 0.0 <= reserve_percent < 100.0:
            raise ValueError("the reserve is a percentage in [0, 100)")
        self.reserve = reserve_percent / 100.0
        self.horizon = horizon
        self.windows: dict[str, WindowPace] = {}
        self.tokens = 0.0  # every token this process recorded

    def count(self, tokens: int) -> None:
        self.tokens += tokens

    def observe(self, report: QuotaReport, now: float) -> None:
        for name, window in report.windows.items():
            self.windows.setdefault(name, WindowPace(self.horizon)).observe(
                window, self.tokens, now)

    def used_now(self, name: str) -> float | None:
        pace = self.windows.get(name)
        return pace.used_now(self.tokens) if pace is not None else None

    def runs_out_at(self, name: str, now: float) -> float | None:
        pace = self.windows.get(name)
        return pace.runs_out_at(self.tokens, now) if pace is not None else None

    def reserve_breach(self, now: float) -> ReserveBreach | None:
        """The most used window past 100 - QUOTA_RESERVE_PERCENT (None: all below, or no
        reserve). A window whose reset has passed is not held against anyone."""
        if not self.reserve:
            return None
        worst: ReserveBreach | None = None
        for name, pace in self.windows.items():
            window = pace.window
            used = pace.used_now(self.tokens)
            if window is None or used is None or name not in ("5h", "weekly"):
                continue
            if window.reset_at is not None and now >= window.reset_at:
                continue
            if used >= 1.0 - self.reserve and (worst is None or used > worst.used):
                worst = ReserveBreach(name, used, window.reset_at, self.reserve)
        return worst
