"""The account's Coding Plan quota windows: the 5-hour and weekly token allowances.

Pure bookkeeping, no I/O: every call takes the wall-clock time (epoch seconds) from
the caller, which reads the app's injectable `wall_clock`, so tests move time
exactly. Z.AI reports these windows by wall-clock instants (`nextResetTime`, epoch
ms) and dates its 1308/1310 refusals the same way, so one clock serves both and the
endpoint, the refusal text and retry-after cannot disagree.

A window is anchored the first time it is looked at (next reset = then + length).
When the clock reaches its next reset, used goes back to 0 and the next reset moves
on by whole window lengths (so a clock that jumped several windows ahead lands in
the current one). Allowances and lengths are read from the options at each call, so
changing them with POST /_emulator/config takes effect at once.

The emulator accepts a single upstream key, so there is one account and one set of
windows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from .options import EmulatorOptions

FIVE_HOUR = "5h"
WEEKLY = "weekly"
TOOLS = "tools"
# Windows that requests spend and that the control route may set.
TOKEN_WINDOWS = (FIVE_HOUR, WEEKLY)
# The tool allowance (web search, reader, ...) is a monthly count of calls, sized by
# plan tier as the real service reports it; the emulator serves no tool calls, so
# only its reset time moves.
TOOL_ALLOWANCE_BY_LEVEL = {"lite": 100, "pro": 1000, "max": 4000}
TOOL_PERIOD_SECONDS = 30 * 86400.0
_CONTROL_FIELDS = frozenset({"window", "used_percent", "reset_in"})


@dataclass(frozen=True)
class WindowSpec:
    allowance: int
    seconds: float


def window_spec(name: str, options: EmulatorOptions) -> WindowSpec:
    """Allowance and length of a window under the given options."""
    if name == FIVE_HOUR:
        return WindowSpec(options.quota_window_tokens, options.quota_window_seconds)
    if name == WEEKLY:
        return WindowSpec(options.quota_weekly_tokens, options.quota_weekly_seconds)
    if name == TOOLS:
        allowance = TOOL_ALLOWANCE_BY_LEVEL.get(options.quota_level.lower(), 100)
        return WindowSpec(allowance, TOOL_PERIOD_SECONDS)
    raise ValueError(f"unknown quota window {name!r}")


@dataclass(frozen=True)
class WindowView:
    """A window as it stands at one instant (after any due reset)."""

    name: str
    used: int
    allowance: int
    next_reset: float  # epoch seconds
    seconds: float

    @property
    def percentage(self) -> int:
        """Whole percent used, rounded down and capped at 100, as Z.AI shows it."""
        return min(100, self.used * 100 // self.allowance)

    @property
    def remaining(self) -> int:
        return max(0, self.allowance - self.used)

    @property
    def spent(self) -> bool:
        return self.used >= self.allowance

    @property
    def next_reset_ms(self) -> int:
        return int(self.next_reset * 1000)

    def public(self) -> dict[str, Any]:
        """The window as GET /_emulator/quota shows it."""
        return {
            "used": self.used,
            "allowance": self.allowance,
            "percentage": self.percentage,
            "next_reset": self.next_reset,
            "window_seconds": self.seconds,
        }


@dataclass
class _Window:
    used: int = 0
    next_reset: float | None = None  # epoch seconds; None until first looked at

    def roll(self, spec: WindowSpec, wall: float) -> None:
        if self.next_reset is None:
            self.next_reset = wall + spec.seconds
        elif wall >= self.next_reset:
            periods = math.floor((wall - self.next_reset) / spec.seconds) + 1
            self.next_reset += periods * spec.seconds
            self.used = 0


def _new_windows() -> dict[str, _Window]:
    return {name: _Window() for name in (*TOKEN_WINDOWS, TOOLS)}


@dataclass
class QuotaWindows:
    _windows: dict[str, _Window] = field(default_factory=_new_windows)

    def view(self, name: str, options: EmulatorOptions, wall: float) -> WindowView:
        spec = window_spec(name, options)
        window = self._rolled(name, spec, wall)
        assert window.next_reset is not None  # roll() anchors it
        return WindowView(name, window.used, spec.allowance, window.next_reset, spec.seconds)

    def views(self, options: EmulatorOptions, wall: float) -> dict[str, WindowView]:
        """The two token windows, by name."""
        return {name: self.view(name, options, wall) for name in TOKEN_WINDOWS}

    def blocking(self, options: EmulatorOptions, wall: float) -> WindowView | None:
        """The spent window that keeps requests out longest, or None.

        When both are spent, the later reset is the one that matters: a client told
        the earlier time would come back and be refused again.
        """
        spent = [v for v in self.views(options, wall).values() if v.spent]
        return max(spent, key=lambda v: v.next_reset, default=None)

    def spend(self, tokens: int, options: EmulatorOptions, wall: float) -> None:
        """Charge a served request's tokens to both windows."""
        for name in TOKEN_WINDOWS:
            self._rolled(name, window_spec(name, options), wall).used += max(0, tokens)

    def control(
        self, changes: Any, options: EmulatorOptions, wall: float
    ) -> WindowView:
        """Apply a POST /_emulator/quota body; ValueError says what is wrong.

        {"window": "5h"|"weekly", "used_percent": P, "reset_in": S}: used becomes
        ceil(allowance * P / 100) (rounded up so the endpoint shows at least P, and
        exactly the allowance at 100); reset_in moves the next reset to now + S.
        At least one of used_percent / reset_in is required.
        """
        name, percent, reset_in = _parse_control(changes)
        spec = window_spec(name, options)
        window = self._rolled(name, spec, wall)
        if percent is not None:
            window.used = math.ceil(spec.allowance * percent / 100)
        if reset_in is not None:
            window.next_reset = wall + reset_in
        return self.view(name, options, wall)

    def reset(self) -> None:
        """Forget all use and anchors (POST /_emulator/reset)."""
        self._windows = _new_windows()

    def _rolled(self, name: str, spec: WindowSpec, wall: float) -> _Window:
        window = self._windows[name]
        window.roll(spec, wall)
        return window


def _parse_control(changes: Any) -> tuple[str, Fraction | None, float | None]:
    if not isinstance(changes, Mapping):
        raise ValueError(
            'quota update must be a JSON object like {"window": "5h", "used_percent": 85}'
        )
    unknown = sorted(set(changes) - _CONTROL_FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(_CONTROL_FIELDS))}")
    name = changes.get("window")
    if name not in TOKEN_WINDOWS:
        raise ValueError(f"'window' must be one of {', '.join(TOKEN_WINDOWS)}, got {name!r}")
    if "used_percent" not in changes and "reset_in" not in changes:
        raise ValueError("give 'used_percent', 'reset_in' or both")
    percent = _number(changes, "used_percent")
    reset_in = _number(changes, "reset_in")
    # Exact arithmetic: 40_000_000 * 0.29 in floats would round down past 29%.
    return name, None if percent is None else Fraction(str(percent)), reset_in


def _number(changes: Mapping[str, Any], name: str) -> float | None:
    if name not in changes:
        return None
    value = changes[name]
    # bool is an int subclass; true is a mistake, not 1.
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not (math.isfinite(value) and value >= 0)):
        raise ValueError(f"'{name}' must be a finite number >= 0, got {value!r}")
    return value
