"""What the dashboard keeps: each series it stores, and how the gateway's metrics become them.

A key is a tuple: its first item names the series, the rest are its labels, e.g.
`("tok", "glm-4.7", "input")`. Counters are reduced per replica (summed over the labels the
dashboard does not keep), so one replica's reading is a handful of counters and gauges; the
history turns consecutive readings into increases. Histograms are kept as their buckets
(`("dur", "2.5")`), cumulative while they are counters, per-bucket once they are increases
(`decumulate`), which is what quantiles over any range need.

Every label value here is bounded by the gateway (status classes, configured models, reasons,
codes, bounded worker labels), so the number of series is bounded too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from extproc.dashboard.exposition import Sample
from extproc.telemetry.metrics import DURATION_BUCKETS, QUEUE_WAIT_BUCKETS, TTFT_BUCKETS

Key = tuple[str, ...]

# Histograms kept as buckets: series name -> the gateway's histogram.
HISTOGRAMS = {
    "dur": "zai_proxy_request_duration_seconds",
    "ttft": "zai_proxy_time_to_first_token_seconds",
    "qwait": "zai_proxy_rate_limit_queue_wait_seconds",
}
# Their bucket bounds (interpolation needs every bound; the history keeps no empty bucket).
BOUNDS = {
    "dur": (*map(float, DURATION_BUCKETS), math.inf),
    "ttft": (*map(float, TTFT_BUCKETS), math.inf),
    "qwait": (*map(float, QUEUE_WAIT_BUCKETS), math.inf),
}
DIRECTIONS = ("input", "output", "cache_read", "cache_write")
REJECTION_REASONS = ("queue_full", "wait_timeout", "quota", "budget", "reserve")
WINDOWS = ("5h", "weekly")
UNKNOWN_MODEL = "unknown"
KNOWN_VARIANTS = ("production", "canary")


def ordered(variants: Iterable[str]) -> list[str]:
    """production, canary, then any other variant by name."""
    found = set(variants)
    return [v for v in KNOWN_VARIANTS if v in found] + sorted(found - set(KNOWN_VARIANTS))


def status_class(status: str) -> str:
    return f"{status[0]}xx" if len(status) == 3 and status.isdigit() else "other"


def _model(labels: Mapping[str, str]) -> str:
    # ext_procs older than the worker series' `model` label: one row per worker, model unknown.
    return labels.get("model") or UNKNOWN_MODEL


# Counter sample name -> key of its labels.
COUNTERS = {
    "zai_proxy_requests_total": lambda l: ("req", status_class(l.get("status", ""))),
    "zai_proxy_tokens_total": lambda l: ("tok", _model(l), l.get("direction", "")),
    "zai_proxy_estimated_cost_usd_total": lambda l: ("cost", _model(l)),
    "zai_proxy_upstream_errors_total": lambda l: ("err", l.get("code", "none")),
    "zai_proxy_rate_limit_rejections_total": lambda l: ("rej", l.get("reason", "")),
    "zai_proxy_worker_tokens_total": lambda l: ("w.tok", l.get("worker", ""), _model(l),
                                                l.get("direction", "")),
    "zai_proxy_worker_requests_total": lambda l: ("w.req", l.get("worker", ""), _model(l),
                                                  status_class(l.get("status", ""))),
    "zai_proxy_worker_estimated_cost_usd_total": lambda l: ("w.cost", l.get("worker", ""), _model(l)),
}
COUNTERS |= {f"{metric}_bucket": (lambda name: lambda l: (name, le_label(l.get("le", ""))))(name)
             for name, metric in HISTOGRAMS.items()}

# Gauge sample name -> key; and how replicas of a variant add up.
GAUGES = {
    "zai_proxy_rate_limit_in_flight": lambda l: ("in_flight",),
    "zai_proxy_rate_limit_queue_depth": lambda l: ("queued",),
    "zai_proxy_rate_limit_concurrency_limit": lambda l: ("limit",),
    "zai_proxy_rate_limit_concurrency_ceiling": lambda l: ("ceiling",),
    "zai_proxy_rate_limit_shared_state": lambda l: ("shared",),
    "zai_proxy_rate_limit_quota_gate_closed": lambda l: ("gate",),
    "zai_proxy_rate_limit_quota_gate_reopens_at_seconds": lambda l: ("gate_until",),
    "zai_proxy_quota_used_ratio": lambda l: ("quota_reported", l.get("window", "")),
    "zai_proxy_quota_used_ratio_estimate": lambda l: ("quota_estimate", l.get("window", "")),
    "zai_proxy_quota_reset_timestamp_seconds": lambda l: ("reset", l.get("window", "")),
    "zai_proxy_quota_exhaustion_timestamp_seconds": lambda l: ("runs_out", l.get("window", "")),
    "zai_proxy_quota_plan_info": lambda l: ("level", l.get("level", "")),
    "zai_proxy_worker_queued": lambda l: ("w.queued", l.get("worker", "")),
}
# Each replica's own: added up over replicas.
SUMMED = frozenset({"in_flight", "queued", "w.queued"})
# The learned limits: one shared value (Redis: every replica reports it) or one per replica.
SHARED_OR_SUMMED = frozenset({"limit", "ceiling"})
# Everything else (the account's quota, the gate, the plan) is the same account seen by each
# replica: the largest value.

# Gauges kept in the history (charted); the others are only shown as they are now.
STORED_GAUGES = ("in_flight", "limit", "queued", "quota", "reset")


@dataclass
class Reading:
    """One replica's scrape, reduced: counters (cumulative) and gauges, by key."""

    counters: dict[Key, float] = field(default_factory=dict)
    gauges: dict[Key, float] = field(default_factory=dict)
    started: float | None = None  # the process's start, when the exposition tells it


def reduce(samples: Iterable[Sample], started: float | None = None) -> Reading:
    reading = Reading(started=started)
    counters, gauges = reading.counters, reading.gauges
    for sample in samples:
        if math.isnan(sample.value):
            continue
        to_key = COUNTERS.get(sample.name)
        if to_key is not None:
            key = to_key(sample.labels)
            counters[key] = counters.get(key, 0.0) + sample.value
            continue
        to_key = GAUGES.get(sample.name)
        if to_key is not None:
            key = to_key(sample.labels)
            gauges[key] = gauges.get(key, 0.0) + sample.value
    return reading


def aggregate_gauges(readings: Iterable[Mapping[Key, float]]) -> dict[Key, float]:
    """A variant's gauges from its replicas' (see SUMMED, SHARED_OR_SUMMED)."""
    readings = list(readings)
    shared = any(r.get(("shared",), 0.0) >= 1 for r in readings)
    out: dict[Key, float] = {}
    for reading in readings:
        for key, value in reading.items():
            name = key[0]
            if key not in out:
                out[key] = value
            elif name in SUMMED or (name in SHARED_OR_SUMMED and not shared):
                out[key] += value
            else:
                out[key] = max(out[key], value)
    return out


def stored_gauges(gauges: Mapping[Key, float]) -> dict[Key, float]:
    """The gauges the history keeps, from a variant's aggregated gauges: the quota window's use
    is the gateway's estimate since the last report where it has one, else the report."""
    out = {key: value for key, value in gauges.items()
           if key[0] in STORED_GAUGES}
    for window in WINDOWS:
        used = gauges.get(("quota_estimate", window), gauges.get(("quota_reported", window)))
        if used is not None:
            out[("quota", window)] = used
    return out


def decumulate(increments: Mapping[Key, float]) -> dict[Key, float]:
    """Histogram buckets' increases per bucket (`le` = its upper bound) instead of cumulative;
    other keys unchanged, zeros dropped."""
    out: dict[Key, float] = {}
    buckets: dict[str, list[tuple[float, Key, float]]] = {}
    for key, value in increments.items():
        if key[0] in HISTOGRAMS:
            buckets.setdefault(key[0], []).append((le_value(key[1]), key, value))
        elif value:
            out[key] = value
    for rows in buckets.values():
        rows.sort()
        below = 0.0
        for _, key, cumulative in rows:
            own = cumulative - below
            below = max(below, cumulative)
            if own > 0:
                out[key] = own
    return out


def le_label(le: str) -> str:
    """A bucket bound as one spelling ("1", "1.0" and "1e0" are one bucket): Python's float repr."""
    value = le_value(le)
    return "+Inf" if math.isinf(value) else repr(value)


def le_value(le: str) -> float:
    try:
        return float(le)
    except ValueError:
        return math.inf
