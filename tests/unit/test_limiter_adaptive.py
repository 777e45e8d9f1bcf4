import copy
import math
import random
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Callable

import pytest
from hypothesis import given, settings, strategies as st

from extproc.limiter.adaptive import (START_RATE_PARAMS, AdaptiveLimit, AdaptiveParams,
                                      Adjustment)

T0 = 1_800_000_000.0
EXACT = AdaptiveParams(probe_jitter=0.0)  # probe times to the second


def limit(params: AdaptiveParams = EXACT, seed: int = 0) -> AdaptiveLimit:
    return AdaptiveLimit(params, random.Random(seed))


def learned(ceiling_load: int, params: AdaptiveParams = EXACT) -> AdaptiveLimit:
    """A limit refused once at `ceiling_load`, grown back to its hold."""
    lim = limit(replace(params, initial=ceiling_load))
    assert lim.on_throttle(T0, ceiling_load) is Adjustment.DOWN
    for i in range(50):
        lim.on_success(T0 + 1 + i * 0.01, lim.allowed())
    return lim


# --- the rules, one by one -----------------------------------------------------------------

def test_starts_at_initial_clipped_into_the_range():
    assert limit(replace(EXACT, initial=3)).allowed() == 3
    assert limit(replace(EXACT, initial=50, maximum=8)).value == 8
    assert limit(replace(EXACT, initial=0.2, minimum=2)).value == 2


def test_throttle_falls_multiplicatively_from_the_refused_load():
    lim = limit(replace(EXACT, initial=5))
    assert lim.on_throttle(T0, 4) is Adjustment.DOWN  # refused at 4: min(5, 4) * 0.7
    assert lim.value == pytest.approx(2.8) and lim.allowed() == 2
    assert lim.ceiling == 4 and lim.hold == 3
    assert lim.decreases == 1


def test_decrease_never_goes_below_minimum():
    lim = limit(replace(EXACT, initial=1))
    lim.on_throttle(T0, 1)
    assert lim.value == 1 and lim.allowed() == 1 and lim.hold == 1


def test_rises_by_one_over_value_per_success_while_the_limit_is_full():
    lim = limit(replace(EXACT, initial=2))
    results = [lim.on_success(T0, 2) for _ in range(3)]  # 2 -> 2.5 -> 2.9 -> 3.24
    assert results == [Adjustment.NONE, Adjustment.NONE, Adjustment.UP]
    assert lim.value == pytest.approx(2 + 1 / 2 + 1 / 2.5 + 1 / 2.9) and lim.allowed() == 3
    ups = [lim.on_success(T0, 3) for _ in range(3)]  # 3.24 -> 3.55 -> 3.83 -> 4.09
    assert ups == [Adjustment.NONE, Adjustment.NONE, Adjustment.UP]
    assert lim.allowed() == 4 and lim.increases == 2


def test_successes_below_the_limit_teach_nothing():
    lim = limit(replace(EXACT, initial=3))
    for _ in range(100):
        assert lim.on_success(T0, 2) is Adjustment.NONE
    assert lim.value == 3


def test_holds_just_under_the_ceiling():
    lim = learned(4)
    assert lim.ceiling == 4 and lim.hold == 3 and lim.allowed() == 3
    for i in range(100):  # well before the probe is due
        lim.on_success(T0 + 2 + i * 0.1, 3)
    assert lim.allowed() == 3 and not lim.probing


def test_cooldown_one_reaction_per_burst():
    lim = limit(replace(EXACT, initial=5))
    assert lim.on_throttle(T0, 5) is Adjustment.DOWN  # -> 3.5, ceiling 5
    assert lim.on_throttle(T0 + 0.5, 3) is Adjustment.NONE
    assert lim.on_throttle(T0 + 1.9, 2) is Adjustment.NONE
    assert lim.value == pytest.approx(3.5) and lim.ceiling == 5 and lim.decreases == 1
    assert lim.on_throttle(T0 + 2.0, 3) is Adjustment.DOWN  # cooldown over
    # min(3.5, 3) * 0.7 = 2.1; ceiling 5 + 0.5 * (3 - 5) = 4, hold 3
    assert lim.value == pytest.approx(2.1) and lim.ceiling == 4 and lim.decreases == 2


def test_a_burst_of_refusals_does_not_crash_the_limit():
    lim = limit(replace(EXACT, initial=10))
    for i in range(40):  # 40 workers refused at every load the old limit allowed
        lim.on_throttle(T0 + i * 0.01, 10 - i % 10)
    assert lim.value == pytest.approx(7.0) and lim.decreases == 1


def test_refusal_above_the_current_limit_is_stale():
    lim = limit(replace(EXACT, initial=6))
    lim.on_throttle(T0, 6)  # -> 4.2
    assert lim.on_throttle(T0 + 5, 5) is Adjustment.NONE
    assert lim.value == pytest.approx(4.2) and lim.decreases == 1


def test_probe_after_interval_refused_falls_back_to_hold_and_backs_off():
    lim = learned(4)  # refused at T0; probe due at T0 + 15
    assert lim.on_success(T0 + 14.9, 3) is Adjustment.NONE
    assert lim.on_success(T0 + 15, 3) is Adjustment.PROBE
    assert lim.probing and lim.allowed() == 4 and lim.probes == 1
    assert lim.on_throttle(T0 + 15.1, 4) is Adjustment.DOWN
    assert not lim.probing and lim.allowed() == 3 and lim.ceiling == 4
    # Next probes wait 30, 60, 120, 120 s (doubling up to probe_interval_max).
    at = T0 + 15.1
    for wait in (30, 60, 120, 120):
        assert lim.on_success(at + wait - 0.1, 3) is Adjustment.NONE
        assert lim.on_success(at + wait, 3) is Adjustment.PROBE
        at += wait
        lim.on_throttle(at, 4)


def test_confirmed_probe_raises_the_ceiling_and_resets_the_interval():
    lim = learned(4)
    assert lim.on_success(T0 + 15, 3) is Adjustment.PROBE
    assert [lim.on_success(T0 + 16 + i, 4) for i in range(3)] == [
        Adjustment.NONE, Adjustment.NONE, Adjustment.UP]
    assert lim.ceiling == 5 and lim.hold == 4 and lim.allowed() == 4 and not lim.probing
    assert lim.on_success(T0 + 18 + 14.9, 4) is Adjustment.NONE
    assert lim.on_success(T0 + 18 + 15, 4) is Adjustment.PROBE
    assert lim.allowed() == 5


def test_probe_successes_must_be_at_the_probe_load():
    lim = learned(4)
    lim.on_success(T0 + 15, 3)
    for i in range(10):
        lim.on_success(T0 + 16 + i, 3)
    assert lim.probing and lim.ceiling == 4


def test_refusal_below_the_hold_while_probing_is_a_real_decrease():
    lim = learned(5)  # hold 4
    lim.on_success(T0 + 15, 4)
    assert lim.probing
    lim.on_throttle(T0 + 16, 3)  # capacity fell under the hold
    assert lim.value == pytest.approx(2.1) and not lim.probing


def test_no_probe_at_the_maximum():
    lim = learned(4, replace(EXACT, maximum=4))
    assert lim.on_success(T0 + 15, 3) is Adjustment.PROBE
    for i in range(3):
        lim.on_success(T0 + 16 + i, 4)
    assert lim.hold == 4 and lim.ceiling == 5
    assert lim.on_success(T0 + 1000, 4) is Adjustment.NONE and not lim.probing
    assert lim.allowed() == 4


def test_jitter_comes_from_the_injected_rng():
    def probe_time(seed):
        lim = AdaptiveLimit(replace(EXACT, probe_jitter=0.2, initial=4), random.Random(seed))
        lim.on_throttle(T0, 4)
        t = T0 + 1
        while lim.on_success(t, lim.allowed()) is not Adjustment.PROBE:
            t += 0.01
        return t - T0
    times = {round(probe_time(seed), 2) for seed in range(8)}
    assert len(times) > 1 and all(12 - 0.01 <= t <= 18 + 0.01 for t in times)
    assert probe_time(3) == probe_time(3)


def test_old_ceiling_is_forgotten():
    lim = learned(3)
    assert lim.allowed() == 2
    lim.on_success(T0 + 1801, 1)
    assert lim.ceiling is None and lim.hold == EXACT.maximum
    for i in range(20):
        lim.on_success(T0 + 1802 + i, lim.allowed())
    assert lim.allowed() > 3


def test_reset_forgets_everything():
    lim = learned(3)
    lim.reset()
    assert lim.ceiling is None and lim.value == EXACT.initial


@pytest.mark.parametrize("change, field", [
    (dict(minimum=0.5), "minimum"), (dict(maximum=0.5), "maximum"), (dict(beta=1.0), "beta"),
    (dict(smoothing=0), "smoothing"), (dict(probe_interval_max=1), "probe_interval_max"),
    (dict(probe_jitter=1.0), "probe_jitter"), (dict(probe_successes=0), "probe_successes"),
    (dict(cooldown=float("nan")), "cooldown"), (dict(initial=0), "initial"),
])
def test_params_are_validated(change, field):
    with pytest.raises(ValueError, match=field):
        replace(EXACT, **change)


# --- persistence ---------------------------------------------------------------------------

def test_snapshot_restore_keeps_the_ceiling():
    lim = learned(4)
    state = lim.snapshot()
    assert state == {"version": 1, "value": 3.0, "ceiling": 4.0, "ceiling_at": T0,
                     "updated_at": lim.snapshot()["updated_at"]}
    other = limit()
    assert other.restore(state, T0 + 60)
    assert other.ceiling == 4 and other.allowed() == 3 and other.snapshot() == state


def test_snapshot_does_not_save_an_unconfirmed_probe():
    lim = learned(4)
    lim.on_success(T0 + 15, 3)
    assert lim.probing and lim.snapshot()["value"] == 3


def test_stale_state_is_ignored():
    lim = learned(4)
    state = lim.snapshot()
    other = limit()
    assert not other.restore(state, state["updated_at"] + EXACT.state_ttl + 1)
    assert other.ceiling is None and other.value == EXACT.initial


def test_restored_old_ceiling_is_dropped_but_value_kept():
    lim = learned(4)
    state = dict(lim.snapshot(), updated_at=T0 + 2000)
    other = limit()
    assert other.restore(state, T0 + 2000)
    assert other.ceiling is None and other.value == 3


def test_restore_clips_into_the_current_range():
    state = learned(8).snapshot()
    narrow = limit(replace(EXACT, maximum=4))
    assert narrow.restore(state, T0 + 10)
    assert narrow.value == 4 and narrow.allowed() == 4
    wide_floor = limit(replace(EXACT, minimum=9, maximum=20))
    assert wide_floor.restore(state, T0 + 10) and wide_floor.value == 9


@pytest.mark.parametrize("state", [
    {}, None, "x", {"version": 2, "value": 3, "updated_at": T0},
    {"version": 1, "value": "three", "updated_at": T0},
    {"version": 1, "value": 3}, {"version": 1, "value": float("nan"), "updated_at": T0},
    {"version": 1, "value": -1, "updated_at": T0},
    {"version": 1, "value": 3, "updated_at": T0, "ceiling": 0, "ceiling_at": T0},
])
def test_malformed_state_is_ignored(state):
    lim = limit()
    assert not lim.restore(state, T0)
    assert lim.value == EXACT.initial


# --- properties ----------------------------------------------------------------------------

params_strategy = st.builds(
    lambda lo, span, initial, jitter: AdaptiveParams(
        minimum=lo, maximum=lo + span, initial=initial, probe_jitter=jitter),
    st.integers(1, 4), st.integers(0, 20), st.floats(0.1, 40), st.floats(0, 0.5))

events_strategy = st.lists(
    st.tuples(st.sampled_from(["success", "throttle"]), st.floats(0, 60), st.integers(1, 30)),
    min_size=1, max_size=60)


def replay(lim: AdaptiveLimit, events) -> float:
    now, last_down = T0, None
    for kind, gap, load in events:
        now += gap
        result = (lim.on_success if kind == "success" else lim.on_throttle)(now, load)
        assert isinstance(result, Adjustment)
        check_bounds(lim)
        if result is Adjustment.DOWN:  # cooldown: never two decreases closer than it
            assert last_down is None or now - last_down >= lim.params.cooldown
            last_down = now
    return now


def check_bounds(lim: AdaptiveLimit) -> None:
    p = lim.params
    assert p.minimum <= lim.value <= p.maximum
    assert p.minimum <= lim.hold <= p.maximum
    assert max(1, math.floor(p.minimum)) <= lim.allowed() <= max(1, math.floor(p.maximum))
    assert lim.ceiling is None or lim.ceiling > 0


@settings(max_examples=300)
@given(params_strategy, events_strategy, st.integers(0, 2**32))
def test_bounds_and_cooldown_hold_for_any_events(params, events, seed):
    replay(AdaptiveLimit(params, random.Random(seed)), events)


@settings(max_examples=100)
@given(params_strategy, st.lists(st.tuples(st.sampled_from(["success", "throttle"]),
                                           st.floats(-30, 60), st.integers(1, 30)), max_size=60))
def test_bounds_hold_when_the_clock_steps_back(params, events):
    lim, now = AdaptiveLimit(params, random.Random(0)), T0
    for kind, gap, load in events:
        now += gap
        (lim.on_success if kind == "success" else lim.on_throttle)(now, load)
        check_bounds(lim)


@settings(max_examples=200)
@given(params_strategy, events_strategy, st.integers(0, 2**32))
def test_snapshot_restore_round_trips(params, events, seed):
    lim = AdaptiveLimit(params, random.Random(seed))
    now = replay(lim, events)
    other = AdaptiveLimit(params, random.Random(seed))
    assert other.restore(lim.snapshot(), now)
    assert other.snapshot() == lim.snapshot()
    if not lim.probing:
        assert other.allowed() == lim.allowed()
    check_bounds(other)


@settings(max_examples=200)
@given(params_strategy, events_strategy, st.lists(st.tuples(st.floats(0, 0.3), st.integers(1, 30)),
                                                  min_size=1, max_size=6),
       st.integers(0, 2**32))
def test_a_burst_within_cooldown_reacts_once(params, events, burst, seed):
    lim = AdaptiveLimit(params, random.Random(seed))
    now = replay(lim, events) + params.cooldown + 1  # any earlier burst is over
    twin = copy.deepcopy(lim)
    results = []
    for gap, load in burst:  # total gaps <= 1.8 s < cooldown (2 s)
        now += gap
        results.append((now, load, lim.on_throttle(now, load)))
    downs = [(t, load) for t, load, result in results if result is Adjustment.DOWN]
    assert len(downs) <= 1
    for t, load in downs:  # the one reaction is the same as that refusal alone
        twin.on_throttle(t, load)
    assert (lim.value, lim.ceiling) == (twin.value, twin.ceiling)
    assert lim.value >= params.minimum


# --- simulations -----------------------------------------------------------------------------

@dataclass
class Run:
    """What a simulation saw: per step (time, allowed, floor of hold); per start (time, refused)."""

    steps: list[tuple[float, int, int]] = field(default_factory=list)
    starts: list[tuple[float, bool]] = field(default_factory=list)

    def allowed(self, a: float, b: float) -> Counter[int]:
        return Counter(al for t, al, _ in self.steps if a <= t < b)

    def holds(self, a: float, b: float) -> set[int]:
        return {h for t, _, h in self.steps if a <= t < b}

    def refused_ratio(self, a: float, b: float) -> float:
        window = [refused for t, refused in self.starts if a <= t < b]
        return sum(window) / len(window)

    def first(self, after: float, test: Callable[[int, int], bool]) -> float:
        return next(t for t, al, h in self.steps if t >= after and test(al, h)) - after


def simulate_concurrency(lim: AdaptiveLimit, capacity: Callable[[float], int], until: float,
                         duration: float = 5.0, workers: int = 40, dt: float = 0.1,
                         retry_after: float = 0.5) -> Run:
    """Workers that always want to run; the account refuses a start beyond `capacity(t)` at once."""
    run, ends, ready = Run(), [], [0.0] * workers
    for i in range(round(until / dt)):
        now = i * dt
        ends = [end for end in ends if end > now + 1e-9]
        for w in range(workers):
            if ready[w] > now + 1e-9:
                continue
            if len(ends) >= lim.allowed():
                break
            load = len(ends) + 1
            refused = len(ends) >= capacity(now)
            if refused:
                lim.on_throttle(T0 + now, load)
                ready[w] = now + retry_after
            else:
                lim.on_success(T0 + now, load)
                ends.append(now + duration)
                ready[w] = now + duration
            run.starts.append((now, refused))
        run.steps.append((now, lim.allowed(), math.floor(lim.hold + 1e-9)))
    return run


def simulate_rate(lim: AdaptiveLimit, cap: Callable[[float], int], until: float,
                  window: float = 1.0, duration: float = 2.0, workers: int = 40,
                  dt: float = 0.05, retry_after: float = 0.25) -> Run:
    """Starts per sliding window: ours counts every start, the account only those it accepts."""
    run, ready = Run(), [0.0] * workers
    ours: deque[float] = deque()
    account: deque[float] = deque()
    for i in range(round(until / dt)):
        now = i * dt
        for starts in (ours, account):
            while starts and starts[0] <= now - window + 1e-9:
                starts.popleft()
        for w in range(workers):
            if ready[w] > now + 1e-9:
                continue
            if len(ours) >= lim.allowed():
                break
            ours.append(now)
            refused = len(account) >= cap(now)
            if refused:
                lim.on_throttle(T0 + now, len(ours))
                ready[w] = now + retry_after
            else:
                account.append(now)
                lim.on_success(T0 + now, len(ours))
                ready[w] = now + duration
            run.starts.append((now, refused))
        run.steps.append((now, lim.allowed(), math.floor(lim.hold + 1e-9)))
    return run


def concurrency_cap(t: float) -> int:
    return 3 if t < 600 else 5 if t < 1800 else 2


@pytest.mark.parametrize("seed", range(4))
def test_simulated_account_concurrency_3_then_5_then_2(seed):
    run = simulate_concurrency(AdaptiveLimit(AdaptiveParams(), random.Random(seed)),
                               concurrency_cap, until=2400)
    # Cap 3: after warm-up the limit holds at 3 (2 allowed too); probes are refused at once.
    assert run.holds(60, 600) <= {2, 3}
    assert set(run.allowed(60, 600)) <= {2, 3, 4}
    assert run.allowed(60, 600)[4] <= 0.01 * sum(run.allowed(60, 600).values())
    assert run.refused_ratio(60, 600) < 0.05
    # Cap 5: found by a probe within probe_interval_max (+ jitter) and two confirmations.
    assert run.first(600, lambda al, h: h >= 4) <= 180
    assert run.first(600, lambda al, h: h >= 5) <= 240
    assert run.holds(900, 1800) == {5}
    assert run.refused_ratio(900, 1800) < 0.05
    # Cap 2: follows down as soon as a refusal comes back, then stays.
    assert run.first(1800, lambda al, h: al <= 2) <= 10
    assert set(run.allowed(1830, 2400)) <= {1, 2, 3}
    assert run.holds(1830, 2400) <= {1, 2}
    assert run.refused_ratio(1830, 2400) < 0.05


def test_simulated_account_concurrency_with_random_request_lengths():
    """Same account, requests of 1-9 s: the limit still settles within [2, 3]."""
    rng = random.Random(7)
    lim = AdaptiveLimit(AdaptiveParams(), random.Random(7))
    lengths = iter(lambda: rng.uniform(1, 9), None)

    run, ends, ready = Run(), [], [0.0] * 40
    for i in range(6000):
        now = i * 0.1
        ends = [end for end in ends if end > now + 1e-9]
        for w in range(40):
            if ready[w] > now + 1e-9 or len(ends) >= lim.allowed():
                continue
            load, refused = len(ends) + 1, len(ends) >= 3
            if refused:
                lim.on_throttle(T0 + now, load)
                ready[w] = now + 0.5
            else:
                lim.on_success(T0 + now, load)
                ends.append(now + next(lengths))
                ready[w] = ends[-1]
            run.starts.append((now, refused))
        run.steps.append((now, lim.allowed(), math.floor(lim.hold + 1e-9)))
    assert run.holds(60, 600) <= {2, 3}
    assert run.refused_ratio(60, 600) < 0.05


def rate_cap(t: float) -> int:
    return 6 if t < 600 else 10 if t < 1800 else 3


@pytest.mark.parametrize("seed", range(2))
def test_simulated_account_start_rate_6_then_10_then_3(seed):
    run = simulate_rate(AdaptiveLimit(START_RATE_PARAMS, random.Random(seed)), rate_cap,
                        until=2400)
    assert run.holds(60, 600) <= {5, 6}
    assert run.refused_ratio(60, 600) < 0.05
    assert run.first(600, lambda al, h: h >= 9) <= 240
    assert run.first(600, lambda al, h: h >= 10) <= 300
    assert run.holds(1000, 1800) <= {9, 10}
    assert run.first(1800, lambda al, h: al <= 3) <= 5
    assert run.holds(1830, 2400) <= {2, 3}
    assert run.refused_ratio(1830, 2400) < 0.05
