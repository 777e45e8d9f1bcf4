"""A limit that learns the account's real capacity from its refusals.

Z.AI's capacity per account is small (1-5 requests in flight), unpublished and changes with the
time of day, so no fixed limit is right. `AdaptiveLimit` is used twice: for requests in flight
(refused with 1302) and for requests started per window (refused with 1303). Only the meaning of
`observed_load` differs: the number of requests in flight, or started in the current window, when
the request was admitted, *that request included*.

- A refusal at load L proves capacity <= L - 1. The limit falls multiplicatively
  (`min(value, L) * beta`), once per burst: refusals within `cooldown` of a decrease are ignored
  (they answer requests admitted before it), and so is a refusal at a load above the current
  value (admitted under an older, higher limit). If capacity really is lower still, the next
  refusal after the cooldown says so.
- The load of each counted refusal is folded into `ceiling` (an EWMA). The limit rises again
  additively, by 1/value per success (about +1 per `value` successes, as TCP does), but only
  while the limit is full (a success below it proves nothing) and only up to
  `hold = ceiling - margin`.
- After `probe_interval` (jittered, doubling after each refused probe up to `probe_interval_max`)
  the limit probes one request above the hold. `probe_successes` successes at that load raise the
  ceiling by one; a refusal puts the limit back to the hold. Probes are the only way the ceiling
  moves up, so a rise in capacity is found within a bounded time, at the cost of one refused
  request per probe interval while capacity stays put.
- A ceiling not confirmed by a refusal or a probe within `ceiling_ttl` is forgotten.

Pure logic: the caller passes the time as wall-clock epoch seconds (`time.time()`), because
the state is shared between replicas and survives restarts; elapsed times are clamped at 0 so
a clock step back cannot break anything. The random source for jitter is injected.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass, fields
from typing import Any

SNAPSHOT_VERSION = 1
_EPSILON = 1e-9  # float slack when flooring a value that should be a whole number


class Adjustment(enum.Enum):
    """What one event did to the limit, for the `adjustments by direction` metric."""

    NONE = "none"
    UP = "up"  # the allowed count (or the held level, after a confirmed probe) rose
    DOWN = "down"  # a refusal lowered the limit
    PROBE = "probe"  # one request above the hold is allowed, to test for more capacity


@dataclass(frozen=True, slots=True)
class AdaptiveParams:
    """Tuning of one adaptive limit. Defaults suit concurrency on a Z.AI account."""

    initial: float = 3.0  # middle of the 1-5 reported for accounts; clipped into the range
    minimum: float = 1.0  # never below one: a success is what lets the limit grow again
    maximum: float = 20.0  # RATE_LIMIT_MAX: an upper bound, not a target
    beta: float = 0.7  # multiplicative decrease: 3 -> 2.1, 4 -> 2.8; falls fast, not to the floor
    cooldown: float = 2.0  # 429s arrive within a round trip of the overshoot; one reaction each
    smoothing: float = 0.5  # weight of the newest refusal in the ceiling: capacity drifts, noise
    margin: float = 1.0  # refused at L (itself included) means at most L - 1 fit: hold there
    probe_interval: float = 15.0  # first probe this long after the last refusal or probe
    probe_interval_max: float = 120.0  # refused probes double the interval up to this
    probe_jitter: float = 0.2  # +-20% so replicas and keys do not probe in lockstep
    probe_successes: int = 3  # successes at the probe load before the ceiling moves up
    ceiling_ttl: float = 1800.0  # an unconfirmed ceiling is from another time of day
    state_ttl: float = 3600.0  # restored state older than this is ignored

    def __post_init__(self) -> None:
        checks = (
            ("minimum", self.minimum >= 1, "at least 1"),
            ("maximum", self.maximum >= self.minimum, "at least minimum"),
            ("initial", self.initial > 0, "positive"),
            ("beta", 0 < self.beta < 1, "between 0 and 1"),
            ("cooldown", self.cooldown >= 0, "zero or more"),
            ("smoothing", 0 < self.smoothing <= 1, "in (0, 1]"),
            ("margin", self.margin > 0, "positive"),
            ("probe_interval", self.probe_interval > 0, "positive"),
            ("probe_interval_max", self.probe_interval_max >= self.probe_interval,
             "at least probe_interval"),
            ("probe_jitter", 0 <= self.probe_jitter < 1, "in [0, 1)"),
            ("probe_successes", self.probe_successes >= 1, "at least 1"),
            ("ceiling_ttl", self.ceiling_ttl > 0, "positive"),
            ("state_ttl", self.state_ttl > 0, "positive"),
        )
        for name in (f.name for f in fields(self)):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")


# Requests started per window (the caller's window, e.g. 1 s). Rates are larger numbers than
# concurrency; the same rules apply, a probe adds one start per window.
START_RATE_PARAMS = AdaptiveParams(initial=10.0, minimum=1.0, maximum=100.0)


@dataclass(slots=True)
class _Learned:
    """What the limit has learned; forgotten as a whole on reset or with its ceiling."""

    value: float
    ceiling: float | None = None  # smoothed load at which the account refused
    ceiling_at: float = 0.0  # last refusal or confirmed probe
    probe_level: int | None = None  # allowed count under test; None when not probing
    probe_wins: int = 0
    failed_probes: int = 0  # in a row; doubles the probe interval
    next_probe_at: float | None = None


class AdaptiveLimit:
    """One adaptive limit (concurrency or start rate). Not thread-safe: one owner calls it."""

    def __init__(self, params: AdaptiveParams | None = None,
                 rng: random.Random | None = None) -> None:
        self.params = params if params is not None else AdaptiveParams()
        self._rng = rng if rng is not None else random.Random()
        self._s = self._fresh()
        self._last_down_at: float | None = None
        self._updated_at: float | None = None
        self.increases = 0
        self.decreases = 0
        self.probes = 0

    # --- reading -------------------------------------------------------------------------

    @property
    def value(self) -> float:
        return self._s.value

    @property
    def ceiling(self) -> float | None:
        """Smoothed load at which the account last refused; None until it has."""
        return self._s.ceiling

    @property
    def hold(self) -> float:
        """Where the limit rises to and stays between probes."""
        p = self.params
        if self._s.ceiling is None:
            return p.maximum
        return min(p.maximum, max(p.minimum, self._s.ceiling - p.margin))

    @property
    def probing(self) -> bool:
        return self._s.probe_level is not None

    def allowed(self) -> int:
        """How many requests (in flight, or starts per window) may go now."""
        return max(1, math.floor(self._s.value + _EPSILON))

    # --- events --------------------------------------------------------------------------

    def on_success(self, now: float, observed_load: float) -> Adjustment:
        """The account accepted a request admitted at `observed_load` (call on its 200)."""
        self._touch(now)
        if observed_load < self.allowed():
            # The limit was not what held traffic back: this proves nothing about capacity.
            return Adjustment.NONE
        if self._s.probe_level is not None:
            return self._probe_success(now, self._s.probe_level)
        hold = self.hold
        if self._s.value < hold:
            before = self.allowed()
            self._s.value = min(hold, self._s.value + 1.0 / self._s.value)
            if self.allowed() > before:
                self.increases += 1
                return Adjustment.UP
            return Adjustment.NONE
        due = self._s.next_probe_at is not None and now >= self._s.next_probe_at
        if due and self.allowed() + 1 <= self.params.maximum:
            return self._start_probe()
        return Adjustment.NONE

    def on_throttle(self, now: float, observed_load: float) -> Adjustment:
        """The account refused (1302 for concurrency, 1303 for rate) at `observed_load`."""
        self._touch(now)
        last = self._last_down_at
        if last is not None and now - last < self.params.cooldown:
            return Adjustment.NONE  # same burst: one reaction per overshoot
        if observed_load > self._s.value + _EPSILON:
            return Adjustment.NONE  # admitted under an older, higher limit: already reacted
        self._last_down_at = now
        self._react(now, observed_load)
        self.decreases += 1
        return Adjustment.DOWN

    def reset(self) -> None:
        """Forget everything learned (admin action)."""
        self._s = self._fresh()
        self._last_down_at = None

    # --- persistence ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Learned state as plain data (JSON-ready; times are wall-clock epoch seconds).

        An unconfirmed probe is not learned: the value saved is the hold it came from.
        """
        s = self._s
        return {
            "version": SNAPSHOT_VERSION,
            "value": self.hold if s.probe_level is not None else s.value,
            "ceiling": s.ceiling,
            "ceiling_at": s.ceiling_at if s.ceiling is not None else None,
            "updated_at": self._updated_at,
        }

    def restore(self, state: dict[str, Any], now: float) -> bool:
        """Take over a snapshot unless it is malformed or older than `state_ttl`.

        The value is clipped into this limit's range, a ceiling older than `ceiling_ttl` is
        dropped, and the snapshot keeps its age (re-saving does not make old state young).
        """
        parsed = _parse_snapshot(state)
        if parsed is None or now - parsed[3] > self.params.state_ttl:
            return False
        value, ceiling, ceiling_at, updated_at = parsed
        learned = self._fresh()
        if ceiling is not None and ceiling_at is not None:
            ceiling_at = min(ceiling_at, now)
            if now - ceiling_at <= self.params.ceiling_ttl:
                learned.ceiling, learned.ceiling_at = ceiling, ceiling_at
                learned.next_probe_at = now + self._interval(0, self._draw_jitter())
        self._s = learned
        learned.value = self._clip(min(value, self.hold))
        self._last_down_at = None
        self._updated_at = updated_at
        return True

    # --- internals -----------------------------------------------------------------------

    def _fresh(self) -> _Learned:
        return _Learned(value=self._clip(self.params.initial))

    def _clip(self, value: float) -> float:
        return min(self.params.maximum, max(self.params.minimum, value))

    def _touch(self, now: float) -> None:
        s = self._s
        if s.ceiling is not None and now - s.ceiling_at > self.params.ceiling_ttl:
            # Unconfirmed for that long, the ceiling likely belongs to another time of day.
            self._s = _Learned(value=min(s.value, self.params.maximum))
        self._updated_at = now if self._updated_at is None else max(self._updated_at, now)

    def _react(self, at: float, load: float) -> None:
        s, p = self._s, self.params
        probe_refused = s.probe_level is not None and load >= s.probe_level
        s.ceiling = load if s.ceiling is None else s.ceiling + p.smoothing * (load - s.ceiling)
        s.ceiling_at = at
        if probe_refused:
            s.failed_probes += 1  # capacity is where we thought: back to the hold
        else:
            s.value = min(s.value, load) * p.beta  # refused at or below the limit: it fell
        s.probe_level, s.probe_wins = None, 0
        s.value = self._clip(min(s.value, self.hold))
        s.next_probe_at = at + self._interval(s.failed_probes, self._draw_jitter())

    def _start_probe(self) -> Adjustment:
        level = self.allowed() + 1
        self._s.probe_level, self._s.probe_wins = level, 0
        self._s.value = float(level)
        self.probes += 1
        return Adjustment.PROBE

    def _probe_success(self, now: float, level: int) -> Adjustment:
        s = self._s
        s.probe_wins += 1
        if s.probe_wins < self.params.probe_successes:
            return Adjustment.NONE
        # The account took the probe load again and again: there is room at least that high.
        s.ceiling = max(s.ceiling or 0.0, level + self.params.margin)
        s.ceiling_at = now
        s.probe_level, s.probe_wins, s.failed_probes = None, 0, 0
        s.value = self._clip(min(s.value, self.hold))
        s.next_probe_at = now + self._interval(0, self._draw_jitter())
        self.increases += 1
        return Adjustment.UP

    def _draw_jitter(self) -> float:
        j = self.params.probe_jitter
        return 1.0 + self._rng.uniform(-j, j)

    def _interval(self, failed_probes: int, jitter: float) -> float:
        p = self.params
        base = min(p.probe_interval_max, p.probe_interval * 2.0 ** min(failed_probes, 32))
        return base * jitter


def _parse_snapshot(state: Any) -> tuple[float, float | None, float | None, float] | None:
    """(value, ceiling, ceiling_at, updated_at) of a well-formed snapshot, else None."""
    if not isinstance(state, dict) or state.get("version") != SNAPSHOT_VERSION:
        return None
    try:
        value, updated_at = float(state["value"]), float(state["updated_at"])
        ceiling = None if state.get("ceiling") is None else float(state["ceiling"])
        ceiling_at = None if state.get("ceiling_at") is None else float(state["ceiling_at"])
    except (KeyError, TypeError, ValueError):
        return None
    numbers = [n for n in (value, updated_at, ceiling, ceiling_at) if n is not None]
    if not all(math.isfinite(n) for n in numbers) or value <= 0:
        return None
    if ceiling is not None and ceiling <= 0:
        return None
    return value, ceiling, ceiling_at, updated_at
