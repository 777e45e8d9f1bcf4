"""What the page shows, from the history: the status document (`status`) and one chart's points
(`series`). Rates are increases over the seconds the history covers (a gap is not a zero);
quantiles come from histogram buckets' increases over the range (as Prometheus's
`histogram_quantile` of a rate would)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc.dashboard import catalogue
from extproc.dashboard.catalogue import DIRECTIONS, REJECTION_REASONS, Key
from extproc.dashboard.history import COARSE_STEP, FINE_KEEP, TICK, Reader, Total, floor_to
from extproc.dashboard.quantiles import quantile

RANGES = {"15m": 900, "1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
DEFAULT_RANGE = "24h"
MAX_POINTS = 720
RATE_WINDOW = 60  # the status document's rates: the last minute
BLOCK = 5 * 3600  # Z.AI's 5-hour quota window


class BadRequest(ValueError):
    """A query the API refuses (unknown series or range): a 400 with this message."""


def parse_range(raw: str | None, default: str = DEFAULT_RANGE) -> tuple[str, int]:
    name = raw or default
    if name not in RANGES:
        raise BadRequest(f"unknown range {name!r}; one of {', '.join(RANGES)}")
    return name, RANGES[name]


def _r(value: float | None, digits: int = 6) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(round(value, digits))


def block_start(now: float, reset_at: float | None) -> tuple[float, bool]:
    """Start of Z.AI's current 5-hour block: its reset time less 5 hours when known (and ahead),
    else the last 5 hours. The flag says whether the quota report gave it."""
    if reset_at is not None and now < reset_at <= now + BLOCK:
        return reset_at - BLOCK, True
    return now - BLOCK, False


def midnight(now: float) -> float:
    """Today's start in the dashboard's local time zone."""
    local = time.localtime(now)
    return time.mktime((local.tm_year, local.tm_mon, local.tm_mday, 0, 0, 0, 0, 0, -1))


@dataclass
class Live:
    """What the collector knows now, beside the history."""

    source: str
    variants: list[str]
    gauges: dict[str, dict[Key, float]] = field(default_factory=dict)
    weights: dict[str, float] | None = None
    errors: dict[str, str] = field(default_factory=dict)
    rollout: dict[str, Any] | None = None  # the canary rollout's state (dashboard.rollout), or None


def _by_variant(totals: Mapping[tuple[str, Key], Total]) -> dict[str, dict[Key, Total]]:
    out: dict[str, dict[Key, Total]] = {}
    for (variant, key), total in totals.items():
        out.setdefault(variant, {})[key] = total
    return out


def _latest_gauge(gauges: Mapping[str, Mapping[Key, float]], key: Key) -> float | None:
    values = [g[key] for g in gauges.values() if key in g and math.isfinite(g[key])]
    return max(values) if values else None


def status(reader: Reader, now: float, live: Live, range_s: int = RANGES[DEFAULT_RANGE]) -> dict[str, Any]:
    """The status document (see the README's Dashboard section)."""
    minute = _by_variant(reader.sums(now - RATE_WINDOW + 1, (
        "req", "tok", "err", "rej", "dur", "ttft", "qwait", TICK[0])))
    hour = _by_variant(reader.sums(now - 3600 + 1, ("cost",)))
    reset_5h = _latest_gauge(live.gauges, ("reset", "5h"))
    block = _by_variant(reader.sums(block_start(now, reset_5h)[0], ("cost",)))
    today = _by_variant(reader.sums(midnight(now), ("cost",)))
    variants = catalogue_variants(live.variants, minute, live.gauges)
    doc: dict[str, Any] = {
        "time": int(now),
        "source": live.source,
        "variants": variants,
        "weights": live.weights,
        "rollout": live.rollout,
        "variants_data": {},
        "account": account(live.gauges, now),
        "workers": workers(reader, now, range_s, live.gauges),
        "range": _range_name(range_s),
        "errors": dict(live.errors),
    }
    for variant in variants:
        doc["variants_data"][variant] = variant_panel(
            minute.get(variant, {}), live.gauges.get(variant, {}),
            {"hour": hour.get(variant, {}), "block_5h": block.get(variant, {}),
             "today": today.get(variant, {})})
    return doc


def _range_name(range_s: int) -> str:
    return next((name for name, seconds in RANGES.items() if seconds == range_s), f"{range_s}s")


def catalogue_variants(configured: Iterable[str], *seen: Mapping[str, Any]) -> list[str]:
    found = set(configured)
    for mapping in seen:
        found |= set(mapping)
    return catalogue.ordered(found)


def _sum(totals: Mapping[Key, Total], name: str, where: Callable[[Key], bool] = lambda k: True) -> float:
    return sum(t.value for k, t in totals.items() if k[0] == name and where(k))


def _quantiles(totals: Mapping[Key, Total], name: str, qs: Iterable[float]) -> list[float | None]:
    counts: dict[float, float] = {}
    for key, total in totals.items():
        if key[0] == name:
            le = catalogue.le_value(key[1])
            counts[le] = counts.get(le, 0.0) + total.value
    return [_r(quantile(q, counts, catalogue.BOUNDS[name])) for q in qs]


def variant_panel(minute: Mapping[Key, Total], gauges: Mapping[Key, float],
                  costs: Mapping[str, Mapping[Key, Total]]) -> dict[str, Any]:
    covered = minute[TICK].value if TICK in minute else 0.0

    def rate(value: float) -> float:
        return _r(value / covered) if covered > 0 else 0.0  # type: ignore[return-value]

    p50, p95, p99 = _quantiles(minute, "dur", (0.5, 0.95, 0.99))
    t50, t95 = _quantiles(minute, "ttft", (0.5, 0.95))
    (wait95,) = _quantiles(minute, "qwait", (0.95,))
    models: dict[str, float] = {}
    for key, total in minute.items():
        if key[0] == "tok":
            models[key[1]] = models.get(key[1], 0.0) + total.value
    rejections = {reason: 0.0 for reason in REJECTION_REASONS}
    errors: dict[str, float] = {}
    for key, total in minute.items():
        if key[0] == "rej":
            rejections[key[1]] = rejections.get(key[1], 0.0) + total.value
        elif key[0] == "err":
            errors[key[1]] = errors.get(key[1], 0.0) + total.value
    gate_until = gauges.get(("gate_until",))
    ceiling = gauges.get(("ceiling",))
    return {
        # Each predicate is used up by _sum before the loop moves on: no late binding to fear.
        "rps": {cls: rate(_sum(minute, "req", lambda k: k[1] == cls)) for cls in ("2xx", "4xx", "5xx")},
        "latency": {"p50": p50, "p95": p95, "p99": p99},
        "ttft": {"p50": t50, "p95": t95},
        "tokens_per_s": {d: rate(_sum(minute, "tok", lambda k: k[2] == d)) for d in DIRECTIONS},
        "tokens_by_model": {m: rate(v) for m, v in sorted(models.items(), key=lambda kv: -kv[1])},
        "cost_usd": {name: _r(_sum(totals, "cost")) for name, totals in costs.items()},
        "limiter": {
            "in_flight": _int(gauges.get(("in_flight",))),
            "limit": _int(gauges.get(("limit",))),
            "ceiling": _r(ceiling, 3) if ceiling is not None and math.isfinite(ceiling) else None,
            "queued": _int(gauges.get(("queued",))),
            "queue_wait_p95": wait95,
            "rejections_per_s": {k: rate(v) for k, v in rejections.items()},
            "gate_closed": bool(gauges.get(("gate",), 0.0) >= 1),
            "gate_reopens_at": _r(gate_until, 3) if gate_until else None,
        },
        "upstream_errors_per_s": {k: rate(v) for k, v in sorted(errors.items()) if v > 0},
    }


def _int(value: float | None) -> int | None:
    return None if value is None or not math.isfinite(value) else int(round(value))


def account(gauges: Mapping[str, Mapping[Key, float]], now: float) -> dict[str, Any]:
    level = None
    windows: dict[str, dict[str, Any]] = {}
    names = set(catalogue.WINDOWS)
    for g in gauges.values():
        for key, value in g.items():
            if key[0] == "level" and value >= 1 and level is None:
                level = key[1]
            if key[0] in ("quota_reported", "quota_estimate", "reset", "runs_out"):
                names.add(key[1])
    for window in [w for w in catalogue.WINDOWS] + sorted(names - set(catalogue.WINDOWS)):
        used = _latest_gauge(gauges, ("quota_estimate", window))
        if used is None:
            used = _latest_gauge(gauges, ("quota_reported", window))
        reset = _latest_gauge(gauges, ("reset", window))
        runs_out = _latest_gauge(gauges, ("runs_out", window))
        windows[window] = {"used_ratio": _r(used), "reset_at": _r(reset, 3),
                           "runs_out_at": _r(runs_out, 3)}
    return {"level": level, "windows": windows}


def workers(reader: Reader, now: float, range_s: int,
            gauges: Mapping[str, Mapping[Key, float]]) -> list[dict[str, Any]]:
    totals = reader.sums(now - range_s + 1, ("w.tok", "w.req", "w.cost"))
    rows: dict[tuple[str, str], dict[str, Any]] = {}

    def row(variant: str, worker: str) -> dict[str, Any]:
        found = rows.get((variant, worker))
        if found is None:
            found = rows[(variant, worker)] = {
                "worker": worker, "variant": variant, "requests": 0,
                "tokens": {d: 0 for d in DIRECTIONS}, "cost_usd": 0.0, "cache_hit_ratio": None,
                "queued_now": 0, "last_seen": None}
        return found

    for (variant, key), total in totals.items():
        entry = row(variant, key[1])
        if key[0] == "w.req":
            entry["requests"] += total.value
            if total.last is not None and (entry["last_seen"] is None or total.last > entry["last_seen"]):
                entry["last_seen"] = total.last
        elif key[0] == "w.tok" and key[3] in entry["tokens"]:
            entry["tokens"][key[3]] += total.value
        elif key[0] == "w.cost":
            entry["cost_usd"] += total.value
    for variant, g in gauges.items():
        for key, value in g.items():
            if key[0] == "w.queued" and value > 0:
                row(variant, key[1])["queued_now"] = int(value)
    out = []
    for entry in rows.values():
        tokens = entry["tokens"]
        entry["requests"] = int(round(entry["requests"]))
        for d in DIRECTIONS:
            tokens[d] = int(round(tokens[d]))
        read = tokens["cache_read"]
        prompt = tokens["input"] + read + tokens["cache_write"]
        entry["cache_hit_ratio"] = _r(read / prompt, 4) if prompt else None
        entry["cost_usd"] = _r(entry["cost_usd"])
        out.append(entry)
    out.sort(key=lambda e: (-sum(e["tokens"].values()), e["worker"], e["variant"]))
    return out


# ------------------------------------------------------------------------------- charts

@dataclass(frozen=True)
class Chart:
    family: str
    kind: str  # "rate", "gauge", "quantile"
    where: tuple[tuple[str, str], ...] = ()  # label column -> value (a, b or c)
    per: float = 1.0  # rate per `per` seconds
    q: float = 0.0
    unit: str = "per_s"


SERIES: dict[str, Chart] = {
    **{f"rps.{c}": Chart("req", "rate", (("a", c),), unit="requests/s") for c in ("2xx", "4xx", "5xx")},
    **{f"latency.p{int(q * 100)}": Chart("dur", "quantile", q=q, unit="s") for q in (0.5, 0.95, 0.99)},
    **{f"ttft.p{int(q * 100)}": Chart("ttft", "quantile", q=q, unit="s") for q in (0.5, 0.95)},
    **{f"tokens.{d}": Chart("tok", "rate", (("b", d),), unit="tokens/s") for d in DIRECTIONS},
    "cost": Chart("cost", "rate", per=3600, unit="usd/h"),
    "in_flight": Chart("in_flight", "gauge", unit="requests"),
    "limit": Chart("limit", "gauge", unit="requests"),
    "queued": Chart("queued", "gauge", unit="requests"),
    "rejections": Chart("rej", "rate", unit="requests/s"),
    "errors": Chart("err", "rate", unit="errors/s"),
    "quota.5h": Chart("quota", "gauge", (("a", "5h"),), unit="ratio"),
    "quota.weekly": Chart("quota", "gauge", (("a", "weekly"),), unit="ratio"),
}


def resolution(range_s: int, interval: int) -> tuple[str, int, int]:
    """(table, its resolution, step) for a range: the fine table up to 24 h, else the minutes;
    the step keeps a chart at most MAX_POINTS points."""
    table, res = ("fine", interval) if range_s <= FINE_KEEP else ("coarse", COARSE_STEP)
    step = max(res, math.ceil(range_s / MAX_POINTS / res) * res)
    return table, res, step


def series(reader: Reader, name: str, variants: list[str], range_s: int, now: float,
           interval: int) -> dict[str, Any]:
    chart = SERIES.get(name)
    if chart is None:
        raise BadRequest(f"unknown series {name!r}; one of {', '.join(SERIES)}")
    table, res, step = resolution(range_s, interval)
    first = floor_to(now - range_s + res, step)
    last = floor_to(now, step)
    buckets = list(range(first, last + 1, step))
    where = dict(chart.where)
    covered: dict[tuple[str, int], float] = {}
    for variant, _, bucket, value in reader.grouped(table, [TICK[0]], variants, first, step):
        covered[(variant, bucket)] = covered.get((variant, bucket), 0.0) + value
    rows = reader.grouped(table, [chart.family], variants, first, step,
                          gauge=chart.kind == "gauge", where=where)
    points: dict[str, list[list[Any]]] = {}
    for variant in variants:
        values: dict[int, Any] = {}
        if chart.kind == "rate":
            sums: dict[int, float] = {}
            for v, _, bucket, value in rows:
                if v == variant:
                    sums[bucket] = sums.get(bucket, 0.0) + value
            for bucket in buckets:
                seconds = covered.get((variant, bucket), 0.0)
                values[bucket] = _r(sums.get(bucket, 0.0) / seconds * chart.per) if seconds > 0 else None
        elif chart.kind == "gauge":
            for v, _, bucket, value in rows:
                if v == variant:
                    values[bucket] = _r(value) if bucket not in values else max(values[bucket], _r(value))
        else:
            counts: dict[int, dict[float, float]] = {}
            for v, key, bucket, value in rows:
                if v == variant:
                    per = counts.setdefault(bucket, {})
                    le = catalogue.le_value(key[1])
                    per[le] = per.get(le, 0.0) + value
            for bucket, per in counts.items():
                values[bucket] = _r(quantile(chart.q, per, catalogue.BOUNDS[chart.family]))
        points[variant] = [[bucket, values.get(bucket)] for bucket in buckets]
    return {"name": name, "step": step, "unit": chart.unit, "range": _range_name(range_s),
            "points": points}
