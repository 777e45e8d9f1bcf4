"""Per-key admission: usage quota (1308), request rate (1303), concurrency (1302).

Pure bookkeeping: the caller passes the current monotonic and wall-clock times, so
tests drive time exactly. Checks run in that order, quota first, because an
exhausted quota answers every request regardless of the other limits.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from .errors import ZaiError, quota_exhausted, too_concurrent, too_frequent
from .options import EmulatorOptions


@dataclass
class KeyState:
    in_flight: int = 0
    starts: deque[float] = field(default_factory=deque)
    quota_used: int = 0
    quota_reset_at: float | None = None  # monotonic seconds
    quota_reset_epoch: float | None = None  # wall-clock seconds, for the message


@dataclass
class Limits:
    keys: dict[str, KeyState] = field(default_factory=dict)
    max_in_flight: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def in_flight(self) -> int:
        return sum(state.in_flight for state in self.keys.values())

    def admit(
        self, key_id: str, options: EmulatorOptions, now: float, wall: float
    ) -> ZaiError | None:
        """Take a slot for a request, or return the 429 that refuses it."""
        state = self.keys.setdefault(key_id, KeyState())
        error = (
            _check_quota(state, options, now)
            or _check_rate(state, options, now)
            or _check_concurrency(state, options)
        )
        if error is not None:
            self.rejected[error.code] += 1
            return error
        self._accept(state, options, now, wall)
        return None

    def release(self, key_id: str) -> None:
        self.keys[key_id].in_flight -= 1

    def note_rejection(self, code: str) -> None:
        """Count a refusal made before admission (auth, bad request)."""
        self.rejected[code] += 1

    def reset(self) -> None:
        """Forget history (rate window, quota, counters); keep what is in flight now,
        because those requests will still release their slots."""
        for state in self.keys.values():
            state.starts.clear()
            state.quota_used, state.quota_reset_at, state.quota_reset_epoch = 0, None, None
        self.accepted = 0
        self.rejected.clear()
        self.max_in_flight = self.in_flight()

    def _accept(
        self, state: KeyState, options: EmulatorOptions, now: float, wall: float
    ) -> None:
        state.in_flight += 1
        state.starts.append(now)
        state.quota_used += 1
        if options.quota_requests and state.quota_used >= options.quota_requests:
            state.quota_reset_at = now + options.quota_reset_after
            state.quota_reset_epoch = wall + options.quota_reset_after
        self.accepted += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight())


def _check_quota(state: KeyState, options: EmulatorOptions, now: float) -> ZaiError | None:
    if state.quota_reset_at is not None and (
        now >= state.quota_reset_at or not options.quota_requests
    ):
        state.quota_used, state.quota_reset_at, state.quota_reset_epoch = 0, None, None
    if state.quota_reset_at is None or state.quota_reset_epoch is None:
        return None
    return quota_exhausted(state.quota_reset_epoch, state.quota_reset_at - now)


def _check_rate(state: KeyState, options: EmulatorOptions, now: float) -> ZaiError | None:
    while state.starts and state.starts[0] <= now - options.rate_window:
        state.starts.popleft()
    if options.rate_cap and len(state.starts) >= options.rate_cap:
        return too_frequent()
    return None


def _check_concurrency(state: KeyState, options: EmulatorOptions) -> ZaiError | None:
    if options.concurrency_cap and state.in_flight >= options.concurrency_cap:
        return too_concurrent()
    return None
