"""The canary's statistics on known cases: textbook values, Prometheus' quantile, and verdicts on
traffic drawn with fixed seeds (equal rates pass, a clear difference fails, tiny samples are
inconclusive), plus how often each happens over many seeds."""

from __future__ import annotations

import math
import random

import pytest

from extproc.canary import stats
from extproc.canary.analysis import (FAIL, INCONCLUSIVE, PASS, SKIP, Sample, VariantSample, analyze,
                                     proportion_check, quantile_check)
from extproc.canary.thresholds import Thresholds

INF = math.inf


def test_fisher_exact_textbook_values():
    # 3 bad of 6, all 3 in the canary's 3: 1 / C(6,3).
    assert stats.fisher_greater(3, 3, 0, 3) == pytest.approx(1 / 20)
    # Lady tasting tea, one-sided: 3 of 4 right -> 17/70.
    assert stats.fisher_greater(3, 4, 1, 4) == pytest.approx(17 / 70)
    assert stats.fisher_greater(0, 40, 0, 760) == pytest.approx(1.0)
    assert stats.fisher_greater(0, 10, 5, 10) == pytest.approx(1.0)


def test_two_proportion_z_textbook_value():
    # 60/100 vs 40/100: pooled 0.5, z = 0.2 / sqrt(0.25 * 0.02) = 2.828, one-sided p = 0.00234.
    assert stats.two_proportion_z(60, 100, 40, 100) == pytest.approx(0.002339, abs=1e-5)
    assert stats.two_proportion_z(0, 100, 0, 100) == 0.5
    assert stats.two_proportion_z(5, 100, 5, 100) == pytest.approx(0.5)


def test_large_counts_use_the_z_test_and_agree_with_fisher_where_both_run():
    big = stats.proportion_greater(30_000, 100_000, 29_000, 100_000)
    assert big.method == "z" and big.p_value < 1e-5
    fisher = stats.fisher_greater(600, 2000, 540, 2000)
    z = stats.two_proportion_z(600, 2000, 540, 2000)
    assert fisher == pytest.approx(z, rel=0.25)


def test_binomial_tail():
    assert stats.binomial_tail(1, 10, 0.1) == pytest.approx(1 - 0.9 ** 10)
    assert stats.binomial_tail(2, 2, 0.5) == pytest.approx(0.25)
    assert stats.binomial_tail(0, 5, 0.3) == 1.0 and stats.binomial_tail(6, 5, 0.3) == 0.0
    # The normal approximation takes over for large n and stays close.
    assert stats.binomial_tail(5_200, 100_000, 0.05) == pytest.approx(0.0018, abs=0.0005)


def test_histogram_quantile_is_prometheus():
    buckets = [(0.1, 50), (0.5, 90), (1.0, 100), (INF, 100)]
    assert stats.histogram_quantile(0.95, buckets) == pytest.approx(0.75)
    assert stats.histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    # The rank in +Inf: the highest finite bound.
    assert stats.histogram_quantile(0.95, [(1.0, 90), (INF, 100)]) == 1.0
    # No observations, or no +Inf bucket: NaN.
    assert math.isnan(stats.histogram_quantile(0.95, [(1.0, 0), (INF, 0)]))
    assert math.isnan(stats.histogram_quantile(0.95, [(1.0, 5)]))
    # increase() of buckets may dip: made monotonic first.
    assert stats.histogram_quantile(0.95, [(0.1, 50), (0.5, 49.5), (1.0, 100), (INF, 100)]) == \
        pytest.approx(0.5 + 0.5 * (45 / 50))


def test_count_above_interpolates_as_the_quantile_does():
    buckets = [(0.1, 50), (0.5, 90), (1.0, 100), (INF, 104)]
    assert stats.count_above(buckets, 0.5) == pytest.approx(14)
    assert stats.count_above(buckets, 0.3) == pytest.approx(14 + 40 * 0.5)
    assert stats.count_above(buckets, 2.0) == 0.0
    # Consistent with histogram_quantile: above its p95 are 5% of the observations.
    p95 = stats.histogram_quantile(0.95, buckets)
    assert stats.count_above(buckets, p95) == pytest.approx(0.05 * 104)


# ----------------------------------------------------------------- verdicts on drawn traffic

def draw(rng: random.Random, n: int, p: float) -> int:
    return sum(rng.random() < p for _ in range(n))


def errors_verdict(seed: int, n_c: int, p_c: float, n_p: int, p_p: float, minimum: int = 100) -> str:
    rng = random.Random(seed)
    x_c, x_p = draw(rng, n_c, p_c), draw(rng, n_p, p_p)
    return proportion_check("errors", "5xx", x_c, n_c, x_p, n_p, 0.10, 0.02, 0.01, minimum).verdict


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_equal_rates_pass(seed):
    assert errors_verdict(seed, 400, 0.03, 4000, 0.03) == PASS


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_clear_difference_fails(seed):
    assert errors_verdict(seed, 200, 0.20, 4000, 0.01) == FAIL


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tiny_samples_are_inconclusive_even_when_all_fail(seed):
    assert errors_verdict(seed, 12, 1.0, 4000, 0.01) == INCONCLUSIVE


def test_false_alarms_are_rare_and_real_regressions_are_caught():
    equal = [errors_verdict(seed, 300, 0.05, 3000, 0.05) for seed in range(200)]
    assert equal.count(FAIL) <= 2, equal.count(FAIL)  # alpha 0.01, and it must also exceed a limit
    worse = [errors_verdict(seed, 150, 0.20, 3000, 0.02) for seed in range(100)]
    assert worse.count(FAIL) >= 97, worse.count(FAIL)


def test_over_a_limit_without_significance_waits_for_more_traffic():
    # 4 of 100 vs 15 of 1000: 2.5 points above production, not significant at 0.01 (p=0.086).
    result = proportion_check("errors", "5xx", 4, 100, 15, 1000, 0.10, 0.02, 0.01, 100)
    assert result.verdict == INCONCLUSIVE and "not significantly yet" in result.reason
    # Production as bad as the canary (Z.AI is down for everyone): not the canary's fault.
    same = proportion_check("errors", "5xx", 30, 100, 300, 1000, 0.10, 0.02, 0.01, 100)
    assert same.verdict == INCONCLUSIVE


def test_without_a_production_baseline_only_a_clear_excess_fails():
    assert proportion_check("errors", "5xx", 40, 100, 0, 5, 0.10, 0.02, 0.01, 50).verdict == FAIL
    assert proportion_check("errors", "5xx", 2, 100, 0, 5, 0.10, 0.02, 0.01, 50).verdict == INCONCLUSIVE


def latency_buckets(rng: random.Random, n: int, scale: float) -> tuple[tuple[float, float], ...]:
    bounds = (0.25, 0.5, 1, 2, 5, 10, 30, INF)
    samples = [rng.expovariate(1 / scale) for _ in range(n)]
    return tuple((le, float(sum(s <= le for s in samples))) for le in bounds)


@pytest.mark.parametrize("seed", [7, 8])
def test_latency_same_distribution_passes_double_fails_tiny_is_inconclusive(seed):
    rng = random.Random(seed)
    production = latency_buckets(rng, 3000, 1.0)
    same = quantile_check("latency_p95", "duration", latency_buckets(rng, 300, 1.0), production,
                          2.0, 1.0, 0.01, 100)
    assert same.verdict == PASS
    slow = quantile_check("latency_p95", "duration", latency_buckets(rng, 300, 5.0), production,
                          2.0, 1.0, 0.01, 100)
    assert slow.verdict == FAIL and slow.p_value is not None and slow.p_value < 0.01
    tiny = quantile_check("latency_p95", "duration", latency_buckets(rng, 20, 3.0), production,
                          2.0, 1.0, 0.01, 100)
    assert tiny.verdict == INCONCLUSIVE
    nothing = quantile_check("ttft_p95", "time to first token", (), (), 2.0, 0.5, 0.01, 100)
    assert nothing.verdict == SKIP


def test_analyze_combines_checks_fail_beats_inconclusive_beats_pass():
    rng = random.Random(11)
    production = VariantSample(requests=3000, ok=2970, errors=30, tokens=300_000,
                               duration=latency_buckets(rng, 3000, 1.0), ttft=latency_buckets(rng, 3000, 0.3))
    healthy = VariantSample(requests=300, ok=297, errors=3, tokens=30_000,
                            duration=latency_buckets(rng, 300, 1.0), ttft=latency_buckets(rng, 300, 0.3))
    t = Thresholds()
    assert analyze(Sample(600, 0, production, healthy), t).verdict == PASS
    broken = VariantSample(requests=300, ok=240, errors=60, tokens=24_000,
                           duration=healthy.duration, ttft=healthy.ttft)
    report = analyze(Sample(600, 0, production, broken), t)
    assert report.verdict == FAIL and report.failing() == ["errors"] and report.exit_code == 1
    quiet = VariantSample(requests=10, ok=10, tokens=1000)
    report = analyze(Sample(600, 0, production, quiet), t)
    assert report.verdict == INCONCLUSIVE and report.exit_code == 3
    assert report.reasons()[0].startswith("errors: only 10 canary requests")
    # No traffic anywhere: nothing passes, so nothing is promoted.
    assert analyze(Sample(600, 0, VariantSample(), VariantSample()), t).verdict == INCONCLUSIVE
