"""Checks -> verdicts: the canary's metrics against production's over one window, pure.

A `MetricsSource` (Prometheus, in `sources`) gives a `Sample`: for each variant, counts over the
window (requests, 5xx, limiter rejections, tokens) and the cumulative buckets of two histograms
(request duration, time to first token). `analyze` turns it into one `CheckResult` per check and
an overall verdict:

- `fail`: some check fails — the canary is worse beyond its limit, and (where the counts allow a
  test) significantly so;
- `inconclusive`: nothing fails, but some check cannot say yet: too little traffic, no
  production baseline, or a canary over a limit without statistical support (yet);
- `pass`: every check passes (checks with no data in either variant are `skip`).

A worker's own 4xx are not the canary's fault: errors are 5xx (Z.AI's and the gateway's own), and
the gateway's 429s are their own check (`rejections`), compared with production's, since both
variants share one account and its limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from extproc.canary import stats
from extproc.canary.durations import format_duration, iso
from extproc.canary.thresholds import Thresholds

PASS, FAIL, INCONCLUSIVE, SKIP = "pass", "fail", "inconclusive", "skip"
VERDICTS = (PASS, FAIL, INCONCLUSIVE, SKIP)
EXIT_CODES = {PASS: 0, FAIL: 1, INCONCLUSIVE: 3}
# Of any variant's requests, 5% are above its p95: the share the latency tests hold the canary to.
P95_SHARE = 0.05


@dataclass(frozen=True)
class VariantSample:
    """One variant's metrics over the window (counts from increase(), so possibly fractional)."""

    requests: float = 0.0
    ok: float = 0.0  # 2xx
    errors: float = 0.0  # 5xx
    rejections: float = 0.0  # the gateway limiter's 429s
    tokens: float = 0.0
    tokens_estimated: float = 0.0
    duration: tuple[tuple[float, float], ...] = ()  # (le, cumulative count)
    ttft: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class Sample:
    window: float  # seconds
    taken_at: float  # epoch seconds
    production: VariantSample
    canary: VariantSample
    source: str = ""


class MetricsSource(Protocol):
    """Where samples come from (Prometheus; anything else that can count per variant)."""

    def describe(self) -> str: ...

    def sample(self, window: float) -> Sample: ...


@dataclass(frozen=True)
class CheckResult:
    check: str
    verdict: str
    reason: str  # one line a person reads
    canary: str = "-"
    production: str = "-"
    limit: str = "-"
    p_value: float | None = None
    values: dict[str, Any] = field(default_factory=dict)  # numbers behind the line, for JSON

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "verdict": self.verdict, "reason": self.reason,
                "canary": self.canary, "production": self.production, "limit": self.limit,
                "p_value": self.p_value, "values": self.values}


@dataclass(frozen=True)
class Report:
    verdict: str
    checks: tuple[CheckResult, ...]
    window: float
    taken_at: float
    canary_requests: int
    production_requests: int
    source: str = ""

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def reasons(self) -> list[str]:
        """Why the verdict is what it is: the failing checks, else the inconclusive ones."""
        wanted = FAIL if self.verdict == FAIL else INCONCLUSIVE
        found = [f"{c.check}: {c.reason}" for c in self.checks if c.verdict == wanted]
        return found or [f"all checks pass ({', '.join(c.check for c in self.checks if c.verdict == PASS)})"]

    def failing(self) -> list[str]:
        return [c.check for c in self.checks if c.verdict == FAIL]

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "window_seconds": self.window, "taken_at": iso(self.taken_at),
                "source": self.source, "canary_requests": self.canary_requests,
                "production_requests": self.production_requests, "reasons": self.reasons(),
                "checks": [c.as_dict() for c in self.checks]}

    def summary(self) -> dict[str, Any]:
        """What the state file and the audit keep of a report."""
        return {"verdict": self.verdict, "at": iso(self.taken_at), "window_seconds": self.window,
                "reasons": self.reasons(),
                "checks": {c.check: c.verdict for c in self.checks}}


# ------------------------------------------------------------------------------ the checks

def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}%"


def _p(p: float | None) -> str:
    if p is None:
        return ""
    return "p<0.0001" if p < 0.0001 else f"p={p:.4f}" if p < 0.01 else f"p={p:.2f}"


def _seconds(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3g} s"


def _too_few(n: int, minimum: int, what: str = "canary requests") -> str:
    return f"only {n} {what} in the window; {minimum} needed for a verdict"


def proportion_check(name: str, what: str, bad_c: float, n_c: float, bad_p: float, n_p: float,
                     max_ratio: float | None, max_increase: float | None, alpha: float,
                     minimum: int) -> CheckResult:
    """The canary's share of bad requests against production's: fails when it is over a limit
    (`max_ratio`, or `max_increase` above production's) and significantly higher than production's
    (Fisher's exact test / z-test, one-sided, p < alpha)."""
    xc, nc, xp, np_ = stats.count(bad_c), stats.count(n_c), stats.count(bad_p), stats.count(n_p)
    xc, xp = min(xc, nc), min(xp, np_)
    limit = " or ".join(x for x in (
        f">{_pct(max_ratio)}" if max_ratio is not None else "",
        f">prod+{100 * max_increase:g} pts" if max_increase is not None else "") if x)
    shown_c = f"{_pct(xc / nc) if nc else '-'} ({xc}/{nc})"
    shown_p = f"{_pct(xp / np_) if np_ else '-'} ({xp}/{np_})"
    values: dict[str, Any] = {"canary_bad": xc, "canary_total": nc, "production_bad": xp,
                              "production_total": np_}
    row: dict[str, Any] = dict(canary=shown_c, production=shown_p, limit=limit, values=values)
    if nc < minimum:
        return CheckResult(name, INCONCLUSIVE, _too_few(nc, minimum), **row)
    ratio_c = xc / nc
    if np_ < minimum:
        # No baseline: only a share clearly above the absolute limit can fail.
        if max_ratio is not None and ratio_c > max_ratio:
            p = stats.binomial_tail(xc, nc, max_ratio)
            if p < alpha:
                return CheckResult(name, FAIL, f"the canary's {what} share {_pct(ratio_c)} ({xc} of "
                                   f"{nc}) is above {_pct(max_ratio)} ({_p(p)}; production has too "
                                   "little traffic to compare)", p_value=p, **row)
        return CheckResult(name, INCONCLUSIVE, _too_few(np_, minimum, "production requests to compare "
                                                                     "with"), **row)
    ratio_p = xp / np_
    test = stats.proportion_greater(xc, nc, xp, np_)
    over = []
    if max_ratio is not None and ratio_c > max_ratio:
        over.append(f"above {_pct(max_ratio)}")
    if max_increase is not None and ratio_c - ratio_p > max_increase:
        over.append(f"more than {100 * max_increase:g} points above production's {_pct(ratio_p)}")
    row["p_value"] = test.p_value
    values["test"] = test.method
    if not over:
        return CheckResult(name, PASS, f"{what} {_pct(ratio_c)} vs production's {_pct(ratio_p)}, "
                           "within the limits", **row)
    if test.p_value < alpha:
        return CheckResult(name, FAIL, f"the canary's {what} share {_pct(ratio_c)} ({xc} of {nc}) is "
                           f"{' and '.join(over)}, significantly ({_p(test.p_value)}, "
                           f"production {xp} of {np_})", **row)
    return CheckResult(name, INCONCLUSIVE, f"the canary's {what} share {_pct(ratio_c)} is "
                       f"{' and '.join(over)}, but not significantly yet ({_p(test.p_value)}, "
                       f"alpha {alpha:g}): more traffic will tell", **row)


def quantile_check(name: str, what: str, canary: Sequence[tuple[float, float]],
                   production: Sequence[tuple[float, float]], max_factor: float,
                   min_seconds: float, alpha: float, minimum: int) -> CheckResult:
    """The canary's p95 against `max_factor` times production's (and at least `min_seconds`):
    fails when the canary's p95 is above it and significantly more than 5% of its requests were
    (exact binomial test on the requests above it, estimated from the buckets as
    histogram_quantile estimates the p95 itself)."""
    n_c, n_p = stats.count(stats.total(canary)), stats.count(stats.total(production))
    q_c = stats.histogram_quantile(0.95, canary) if n_c else float("nan")
    q_p = stats.histogram_quantile(0.95, production) if n_p else float("nan")
    limit_text = f">{max_factor:g}x prod and >{min_seconds:g} s"
    row: dict[str, Any] = dict(
        canary=f"{_seconds(q_c)} (n={n_c})", production=f"{_seconds(q_p)} (n={n_p})", limit=limit_text,
        values={"canary_p95": q_c, "production_p95": q_p, "canary_count": n_c, "production_count": n_p})
    if n_c == 0 and n_p == 0:
        return CheckResult(name, SKIP, f"no {what} observed in either variant", **row)
    if n_c < minimum:
        return CheckResult(name, INCONCLUSIVE, _too_few(n_c, minimum, f"canary {what} observations"),
                           **row)
    if n_p < minimum:
        return CheckResult(name, INCONCLUSIVE, _too_few(n_p, minimum, f"production {what} "
                                                                      "observations to compare with"),
                           **row)
    limit = max(max_factor * q_p, min_seconds)
    row["values"]["limit_seconds"] = limit
    if q_c <= limit:
        return CheckResult(name, PASS, f"{what} p95 {_seconds(q_c)} vs production's {_seconds(q_p)}, "
                           f"within {_seconds(limit)}", **row)
    k = stats.count(stats.count_above(canary, limit))
    p = stats.binomial_tail(k, n_c, P95_SHARE) if k else 1.0
    row["p_value"] = p
    if p < alpha:
        return CheckResult(name, FAIL, f"{what} p95 {_seconds(q_c)} is more than {max_factor:g}x "
                           f"production's {_seconds(q_p)}: about {k} of {n_c} canary requests took "
                           f"over {_seconds(limit)}, where 5% would ({_p(p)})", **row)
    return CheckResult(name, INCONCLUSIVE, f"{what} p95 {_seconds(q_c)} is above "
                       f"{_seconds(limit)}, but not significantly yet (about {k} of {n_c} requests "
                       f"over it, {_p(p)})", **row)


def estimated_share_check(c: VariantSample, p: VariantSample, max_increase: float,
                          minimum: int) -> CheckResult:
    """Share of tokens the gateway had to estimate (Z.AI's usage missing): a bound, no test
    (tokens come in requests, not as independent trials)."""
    name = "estimated_share"
    share_c = c.tokens_estimated / c.tokens if c.tokens else float("nan")
    share_p = p.tokens_estimated / p.tokens if p.tokens else float("nan")
    row: dict[str, Any] = dict(canary=_pct(share_c), production=_pct(share_p),
                               limit=f">prod+{100 * max_increase:g} pts",
                               values={"canary_share": share_c, "production_share": share_p})
    n_c = stats.count(c.requests)
    if not c.tokens and not p.tokens:
        return CheckResult(name, SKIP, "no tokens counted in either variant", **row)
    if n_c < minimum:
        return CheckResult(name, INCONCLUSIVE, _too_few(n_c, minimum), **row)
    if not c.tokens:
        return CheckResult(name, FAIL, f"the canary counted no tokens in {n_c} requests while "
                           "production did", **row)
    base = 0.0 if math.isnan(share_p) else share_p
    if share_c - base > max_increase:
        return CheckResult(name, FAIL, f"the canary estimated {_pct(share_c)} of its tokens, "
                           f"production {_pct(base)}: Z.AI's usage goes missing more often", **row)
    return CheckResult(name, PASS, f"estimated tokens {_pct(share_c)} vs production's {_pct(base)}",
                       **row)


def tokens_per_request_check(c: VariantSample, p: VariantSample, max_factor: float,
                             minimum: int) -> CheckResult:
    """Tokens per successful (2xx) request, within a factor of production's: a bound, no test."""
    name = "tokens_per_request"
    n_c, n_p = stats.count(c.ok), stats.count(p.ok)
    tpr_c = c.tokens / n_c if n_c else float("nan")
    tpr_p = p.tokens / n_p if n_p else float("nan")
    shown = lambda x: "-" if math.isnan(x) else f"{x:.0f}"  # noqa: E731
    row: dict[str, Any] = dict(canary=shown(tpr_c), production=shown(tpr_p),
                               limit=f"outside {1 / max_factor:g}x..{max_factor:g}x prod",
                               values={"canary": tpr_c, "production": tpr_p})
    if n_c < minimum:
        return CheckResult(name, INCONCLUSIVE, _too_few(n_c, minimum, "successful canary requests"),
                           **row)
    if n_p < minimum:
        return CheckResult(name, INCONCLUSIVE, _too_few(n_p, minimum, "successful production "
                                                                      "requests to compare with"), **row)
    if tpr_c == 0 and tpr_p == 0:
        return CheckResult(name, SKIP, "no tokens counted in either variant", **row)
    ratio = tpr_c / tpr_p if tpr_p else float("inf")
    if not 1 / max_factor <= ratio <= max_factor:
        return CheckResult(name, FAIL, f"{shown(tpr_c)} tokens per request vs production's "
                           f"{shown(tpr_p)} ({ratio:.2f}x): the canary counts tokens differently",
                           **row)
    return CheckResult(name, PASS, f"{shown(tpr_c)} tokens per request vs production's "
                       f"{shown(tpr_p)} ({ratio:.2f}x)", **row)


def analyze(sample: Sample, thresholds: Thresholds) -> Report:
    c, p, t = sample.canary, sample.production, thresholds
    results: list[CheckResult] = []
    for name in t.checks:
        lim = t.limits(name)
        if not lim.enabled:
            continue
        minimum = t.min_for(name)
        if name == "errors":
            results.append(proportion_check(name, "5xx", c.errors, c.requests, p.errors, p.requests,
                                            lim.max_ratio, lim.max_increase, t.alpha, minimum))
        elif name == "rejections":
            results.append(proportion_check(name, "limiter-rejection", c.rejections, c.requests,
                                            p.rejections, p.requests, lim.max_ratio, lim.max_increase,
                                            t.alpha, minimum))
        elif name in ("latency_p95", "ttft_p95"):
            what, attr = ("duration", "duration") if name == "latency_p95" else ("time to first token", "ttft")
            results.append(quantile_check(name, what, getattr(c, attr), getattr(p, attr),
                                          lim.max_factor or 2.0, lim.min_seconds or 0.0, t.alpha, minimum))
        elif name == "estimated_share":
            results.append(estimated_share_check(c, p, lim.max_increase or 0.1, minimum))
        elif name == "tokens_per_request":
            results.append(tokens_per_request_check(c, p, lim.max_factor or 2.0, minimum))
    verdicts = {r.verdict for r in results}
    if FAIL in verdicts:
        verdict = FAIL
    elif INCONCLUSIVE in verdicts or PASS not in verdicts:
        verdict = INCONCLUSIVE  # nothing judged at all is no pass either
    else:
        verdict = PASS
    return Report(verdict, tuple(results), sample.window, sample.taken_at, stats.count(c.requests),
                  stats.count(p.requests), sample.source)


# ------------------------------------------------------------------------------- the table

def table(report: Report) -> str:
    """What a person reads in five seconds: the verdict first, one line per check, then why."""
    total = report.canary_requests + report.production_requests
    share = f", canary {100 * report.canary_requests / total:.1f}% of them" if total else ""
    head = (f"canary vs production, last {format_duration(report.window)} "
            f"({report.canary_requests} + {report.production_requests} requests{share}): "
            f"{report.verdict.upper()}")
    rows = [("check", "canary", "production", "fails if", "test", "verdict")]
    for r in report.checks:
        shown = r.verdict.upper() if r.verdict == FAIL else r.verdict
        rows.append((r.check, r.canary, r.production, r.limit, _p(r.p_value) or "-", shown))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [head, ""] + ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                          for row in rows]
    lines.append("")
    lines += [f"{'why' if i == 0 else '   '}: {reason}" for i, reason in enumerate(report.reasons())]
    return "\n".join(lines) + "\n"
