"""The quota gate: after a quota error, stop spending upstream calls until the reset.

Quota codes (1304 daily, 1308 window, 1310 weekly/monthly, 1309 plan expired, 1113 arrears,
and the account-unusable codes) are the same for every worker and no retry helps, so the first
one closes the gate for everyone until the reset time Z.AI gave; meanwhile workers get a 429 at
once with `check()`'s seconds as `retry-after` and `reason()` as the message.
Times are wall-clock epoch seconds (reset times are wall-clock facts).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from extproc.limiter.signals import ZAI_TZ

# Without a reset time (1309, 1113, 1304 without one) try again after this long: long enough
# not to spend calls in a loop, short enough that a renewed plan is noticed soon.
DEFAULT_CLOSURE = 300.0
# A reset time already past (clocks disagree) still means Z.AI refused just now.
MINIMUM_CLOSURE = 10.0
MAX_MESSAGE_CHARS = 300

_WHAT: dict[str, str] = {
    "1304": "the account's daily call limit is used up",
    "1308": "the account's usage limit for the current window is used up",
    "1310": "the account's weekly/monthly limit is used up",
    "1313": "Z.AI throttles the account under its fair-use policy until a review; the operator "
            "must request one",
    "1309": "the account's plan has expired; renew it on Z.AI",
    "1113": "the account is in arrears; recharge it on Z.AI",
    "1110": "the account is inactive; check it on Z.AI",
    "1112": "the account is locked; contact Z.AI support",
    "1121": "the account is locked for irregular activity; contact Z.AI support",
}
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Closure:
    until: float
    code: str
    message: str  # Z.AI's own words, whitespace-collapsed and truncated
    closed_at: float
    reset_given: bool  # False: `until` is our default, not a time Z.AI gave


class QuotaGate:
    """Open, or closed until a time. Not thread-safe: one owner calls it."""

    def __init__(self, default_closure: float = DEFAULT_CLOSURE,
                 minimum_closure: float = MINIMUM_CLOSURE) -> None:
        if not (0 < minimum_closure <= default_closure and math.isfinite(default_closure)):
            raise ValueError("need 0 < minimum_closure <= default_closure, both finite")
        self.default_closure = default_closure
        self.minimum_closure = minimum_closure
        self._closure: Closure | None = None

    @property
    def closure(self) -> Closure | None:
        return self._closure

    def close(self, until_wall: float | None, code: str, message: str, *,
              now_wall: float) -> float:
        """Close until `until_wall` (None: for `default_closure`); returns the reopening time.

        Already closed until later, it stays closed until later: an in-flight request's
        error cannot shorten what an earlier answer said.
        """
        if until_wall is not None and math.isfinite(until_wall):
            until, given = max(until_wall, now_wall + self.minimum_closure), True
        else:
            until, given = now_wall + self.default_closure, False
        current = self._closure
        if current is not None and now_wall < current.until and until <= current.until:
            return current.until
        text = _SPACE.sub(" ", message).strip()[:MAX_MESSAGE_CHARS]
        self._closure = Closure(until, code, text, now_wall, given)
        return until

    def open(self) -> None:
        """Reopen now (admin action, or a success proves the quota is back)."""
        self._closure = None

    def check(self, now_wall: float) -> float | None:
        """None when open; else the seconds until it reopens (the `retry-after`)."""
        closure = self._closure
        if closure is None:
            return None
        if now_wall >= closure.until:
            self._closure = None
            return None
        return closure.until - now_wall

    def reason(self) -> str | None:
        """What to tell a worker while closed: what happened, until when, what to do."""
        c = self._closure
        if c is None:
            return None
        what = _WHAT.get(c.code, "the account cannot take requests")
        said = f' ("{c.message}")' if c.message else ""
        when = format_reset(c.until)
        if c.reset_given:
            tail = f"It resets at {when}; the gateway sends no requests to Z.AI until then."
        else:
            tail = (f"Z.AI gave no reset time; the gateway sends no requests to Z.AI until "
                    f"{when} and then tries again.")
        return (f"Z.AI refused with code {c.code}: {what}{said}. {tail} "
                f"Retry after that time (see retry-after).")

    def snapshot(self) -> dict[str, Any] | None:
        return asdict(self._closure) if self._closure is not None else None

    def restore(self, state: Mapping[str, Any] | None, now_wall: float) -> bool:
        """Take over a saved closure that is well-formed and not yet over."""
        if state is None:
            return False
        try:
            closure = Closure(float(state["until"]), str(state["code"]), str(state["message"]),
                              float(state["closed_at"]), bool(state["reset_given"]))
        except (KeyError, TypeError, ValueError):
            return False
        if not math.isfinite(closure.until) or closure.until <= now_wall:
            return False
        self._closure = closure
        return True


def format_reset(epoch: float) -> str:
    """`2026-11-23 13:04:05 UTC (2026-11-23 21:04:05 UTC+8)`: ours and Z.AI's time zone."""
    utc = datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    beijing = datetime.fromtimestamp(epoch, tz=ZAI_TZ).strftime("%Y-%m-%d %H:%M:%S")
    return f"{utc} UTC ({beijing} UTC+8)"
