"""Z.AI's quota report (`GET /api/monitor/usage/quota/limit`), read into plain numbers.

The endpoint answers `{"code":200,"success":true,"data":{"level":"lite","limits":[...]}}`. Each
limit has a `type` (TOKENS_LIMIT carries only a used `percentage`; CREDIT_LIMIT carries `usage`
(the allowance), `currentValue` (used), `remaining` and `percentage`; TIME_LIMIT is a separate
allowance of tool calls), a `unit` (3: the 5-hour window, 6: the weekly window, 5: the tool
allowance's period) and `nextResetTime` in epoch milliseconds. Types and units we do not know are
skipped and any field may be missing: a report is read as far as it makes sense, never trusted
blindly. Errors come as a non-200 `code`. Pure: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

# Window names, as the metrics' `window` label says them.
FIVE_HOURS = "5h"
WEEKLY = "weekly"
TOOLS = "tools"

# (type, unit) -> window. TOKENS_LIMIT and CREDIT_LIMIT are two shapes of the same windows.
_WINDOWS: dict[tuple[str, int], str] = {
    ("TOKENS_LIMIT", 3): FIVE_HOURS,
    ("TOKENS_LIMIT", 6): WEEKLY,
    ("CREDIT_LIMIT", 3): FIVE_HOURS,
    ("CREDIT_LIMIT", 6): WEEKLY,
    ("TIME_LIMIT", 5): TOOLS,
}
# What a spent window is called in Z.AI's own codes (the gate says the same as a refusal would).
GATE_CODES = {FIVE_HOURS: "1308", WEEKLY: "1310"}


class QuotaReportError(ValueError):
    """The endpoint refused or answered something that is not a report."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Window:
    name: str
    used_ratio: float  # 0..1 (a report may say more than 100 %; kept as said, >= 0)
    reset_at: float | None  # epoch seconds
    allowance: float | None = None  # CREDIT_LIMIT / TIME_LIMIT only
    used: float | None = None
    remaining: float | None = None

    @property
    def exhausted(self) -> bool:
        return self.used_ratio >= 1.0


@dataclass(frozen=True, slots=True)
class QuotaReport:
    level: str | None
    windows: dict[str, Window] = field(default_factory=dict)
    taken_at: float = 0.0  # epoch seconds of the successful poll

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "taken_at": self.taken_at,
                "windows": {name: asdict(w) for name, w in self.windows.items()}}

    @classmethod
    def from_dict(cls, doc: Any) -> "QuotaReport | None":
        """A report as `to_dict` wrote it (shared between replicas), or None if it is not one."""
        try:
            windows = {name: Window(**w) for name, w in doc["windows"].items()}
            return cls(doc.get("level"), windows, float(doc["taken_at"]))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _window(name: str, entry: dict[str, Any]) -> Window | None:
    allowance = _number(entry.get("usage"))
    used = _number(entry.get("currentValue"))
    remaining = _number(entry.get("remaining"))
    percentage = _number(entry.get("percentage"))
    if allowance is not None and allowance > 0 and used is not None:
        ratio = used / allowance  # finer than the rounded percentage
    elif allowance is not None and allowance > 0 and remaining is not None:
        ratio = (allowance - remaining) / allowance
    elif percentage is not None:
        ratio = percentage / 100.0
    else:
        return None  # nothing says how much is used
    reset_ms = _number(entry.get("nextResetTime"))
    reset_at = reset_ms / 1000.0 if reset_ms is not None and reset_ms > 0 else None
    return Window(name, max(0.0, ratio), reset_at, allowance, used, remaining)


def parse_report(doc: Any, taken_at: float) -> QuotaReport:
    """The report in `doc` (the decoded JSON), or QuotaReportError saying what is wrong."""
    if not isinstance(doc, dict):
        raise QuotaReportError("the answer is not a JSON object")
    code = doc.get("code")
    if code != 200 or doc.get("success") is False:
        message = doc.get("msg") if isinstance(doc.get("msg"), str) else "no message"
        raise QuotaReportError(f"Z.AI answered code {code}: {message}",
                               None if code is None else str(code))
    data = doc.get("data")
    if not isinstance(data, dict):
        raise QuotaReportError("the answer has no `data` object")
    level = data.get("level") if isinstance(data.get("level"), str) else None
    windows: dict[str, Window] = {}
    limits = data.get("limits")
    for entry in limits if isinstance(limits, list) else ():
        if not isinstance(entry, dict):
            continue
        unit = _number(entry.get("unit"))
        name = _WINDOWS.get((str(entry.get("type")), int(unit) if unit is not None else -1))
        if name is None or name in windows:
            continue  # a type or unit we do not know, or a second entry for a window
        window = _window(name, entry)
        if window is not None:
            windows[name] = window
    return QuotaReport(level, windows, taken_at)
