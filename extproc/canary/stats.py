"""The statistics of a canary verdict, by hand with `math` (no scipy here): small and exact.

Counts come from Prometheus' `increase()`, which extrapolates and may give 41.7 requests; callers
round them (`count`). Every test is one-sided: the question is always "is the canary worse?".

- `proportion_greater`: is the canary's share of bad requests (5xx, limiter rejections) higher than
  production's? Fisher's exact test while the counts are small enough to sum exactly (it is right
  for tiny counts, where the normal approximation is not), the two-proportion z-test beyond.
- `binomial_tail`: how likely is it to see k or more of n requests above a latency when at most a
  share p of them should be (the latency checks: 5% of requests are above any p95).
- `histogram_quantile` and `count_above`: Prometheus' own quantile estimate from cumulative bucket
  counts, and how many observations are above a value by the same estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# Above this many bad requests in total, Fisher's sum gives way to the z-test (both agree there).
EXACT_LIMIT = 20_000

Buckets = Sequence[tuple[float, float]]  # (upper bound `le`, cumulative count), +Inf included


def count(value: float) -> int:
    """A count from `increase()` (extrapolated, never negative in meaning)."""
    if value is None or math.isnan(value):
        return 0
    return max(0, int(round(value)))


def normal_sf(z: float) -> float:
    """P(Z >= z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


@dataclass(frozen=True)
class ProportionTest:
    method: str  # "fisher" or "z"
    p_value: float  # one-sided: the chance of a canary this much worse if it were not worse at all
    canary_ratio: float
    production_ratio: float


def _ratio(x: int, n: int) -> float:
    return x / n if n else float("nan")


def two_proportion_z(x1: int, n1: int, x2: int, n2: int) -> float:
    """One-sided p-value that proportion 1 exceeds proportion 2 (pooled two-proportion z-test)."""
    if n1 <= 0 or n2 <= 0:
        return 1.0
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0.0:
        return 0.5 if p1 == p2 else (0.0 if p1 > p2 else 1.0)
    return normal_sf((p1 - p2) / se)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_greater(x1: int, n1: int, x2: int, n2: int) -> float:
    """One-sided Fisher's exact test: P(X >= x1) for X the bad requests the canary would get if
    the `x1 + x2` bad ones fell at random among all `n1 + n2` (hypergeometric)."""
    bad, total = x1 + x2, n1 + n2
    if n1 <= 0 or n2 <= 0:
        return 1.0
    denominator = _log_comb(total, n1)
    top = min(n1, bad)
    terms = [_log_comb(bad, i) + _log_comb(total - bad, n1 - i) - denominator
             for i in range(x1, top + 1) if n1 - i <= total - bad]
    if not terms:
        return 0.0
    peak = max(terms)
    return min(1.0, math.exp(peak) * sum(math.exp(t - peak) for t in terms))


def proportion_greater(x1: int, n1: int, x2: int, n2: int) -> ProportionTest:
    """Is the canary's share (x1 of n1) higher than production's (x2 of n2)? The right test for
    the counts: exact while they are small, the z-test when summing exactly would be long."""
    if x1 + x2 <= EXACT_LIMIT:
        return ProportionTest("fisher", fisher_greater(x1, n1, x2, n2), _ratio(x1, n1), _ratio(x2, n2))
    return ProportionTest("z", two_proportion_z(x1, n1, x2, n2), _ratio(x1, n1), _ratio(x2, n2))


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): exact in log space while n is moderate, else the normal
    approximation with continuity correction."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    if n <= 50_000:
        logs = [_log_comb(n, i) + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
        peak = max(logs)
        return min(1.0, math.exp(peak) * sum(math.exp(x - peak) for x in logs))
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    return normal_sf((k - 0.5 - mean) / sd)


def _monotonic(buckets: Buckets) -> list[tuple[float, float]]:
    """Sorted by bound, cumulative counts made non-decreasing (as Prometheus does: increase()
    of each bucket is extrapolated on its own and may dip)."""
    out: list[tuple[float, float]] = []
    running = 0.0
    for le, value in sorted(buckets, key=lambda b: b[0]):
        running = max(running, 0.0 if math.isnan(value) else value)
        out.append((le, running))
    return out


def total(buckets: Buckets) -> float:
    """Observations in a histogram (its +Inf bucket); 0 without one."""
    ordered = _monotonic(buckets)
    return ordered[-1][1] if ordered and math.isinf(ordered[-1][0]) else 0.0


def histogram_quantile(q: float, buckets: Buckets) -> float:
    """Prometheus' `histogram_quantile` on one histogram's cumulative bucket counts: linear
    interpolation inside the bucket that holds the rank; the highest finite bound if the rank is
    in +Inf; NaN without observations."""
    ordered = _monotonic(buckets)
    if len(ordered) < 2 or not math.isinf(ordered[-1][0]) or ordered[-1][1] == 0:
        return float("nan")
    rank = q * ordered[-1][1]
    for index, (le, cumulative) in enumerate(ordered):
        if cumulative >= rank:
            break
    if math.isinf(le):
        return ordered[-2][0]
    if index == 0 and le <= 0:
        return le
    start, below = (0.0, 0.0) if index == 0 else ordered[index - 1]
    inside = cumulative - below
    if inside <= 0:
        return le
    return start + (le - start) * ((rank - below) / inside)


def count_above(buckets: Buckets, threshold: float) -> float:
    """Observations above `threshold`, estimated as `histogram_quantile` estimates: those in
    higher buckets, plus the part of the bucket holding `threshold` above it (observations spread
    evenly inside a bucket)."""
    ordered = _monotonic(buckets)
    if not ordered:
        return 0.0
    everything = ordered[-1][1]
    lower, below = 0.0, 0.0
    for le, cumulative in ordered:
        if le >= threshold:
            if math.isinf(le):
                return 0.0  # above the highest bound: unknown, so not counted
            inside = cumulative - below
            share = (le - threshold) / (le - lower) if le > lower else 0.0
            return (everything - cumulative) + inside * share
        lower, below = le, cumulative
    return 0.0
