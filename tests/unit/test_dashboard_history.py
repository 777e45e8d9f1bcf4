"""The dashboard's pure parts: the exposition read into its series, increases from consecutive
scrapes (ext_proc restarts, vanished replicas), the SQLite history's downsampling, pruning and
size (30 days driven by an injected clock), quantiles from bucket increases, the status
document, the charts and the usage report."""

from __future__ import annotations

import csv
import io
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from extproc.api import Endpoint
from extproc.dashboard import catalogue, panels
from extproc.dashboard.catalogue import Reading
from extproc.dashboard.exposition import parse
from extproc.dashboard.history import (COARSE_KEEP, FINE_KEEP, Deltas, History, Reader,
                                       VariantTick)
from extproc.dashboard.quantiles import quantile
from extproc.dashboard.usage import CSV_HEADER, parse_since, render, report
from extproc.proxy.outcome import Outcome, Tokens
from extproc.telemetry.metrics import (LimiterMetrics, Metrics, QuotaCollector,
                                       WorkerQueueCollector)

T0 = 1_800_000_000  # a multiple of 60


def outcome(worker: str, model: str, status: int = 200, tokens: Tokens | None = None,
            duration: float = 0.3) -> Outcome:
    return Outcome(endpoint=Endpoint.MESSAGES, worker=worker, request_id="r", status=status,
                   duration=duration, completed=True, model=model, tokens=tokens,
                   time_to_first_token=0.2)


def exposition() -> str:
    registry = CollectorRegistry()
    metrics = Metrics("canary", ["glm-4.7"], registry=registry)
    limiter = LimiterMetrics("canary", registry)
    limiter.watch(lambda: {"concurrency_limit": 4, "concurrency_ceiling": None, "in_flight": 2,
                           "queued": 5, "quota_gate": {"until": T0 + 99}}, lambda: True)
    limiter.rejections.labels("canary", "quota").inc(3)
    limiter.queue_wait.observe(0.3)
    registry.register(QuotaCollector("canary", lambda: {
        "level": "pro", "windows": {"5h": {"used_ratio": 0.5, "used_now_estimate": 0.6,
                                           "reset_at": T0 + 3600, "runs_out_at": T0 + 1800}}}))
    registry.register(WorkerQueueCollector("canary", lambda: {"alice": 2, "x": 1},
                                           lambda w: w if w == "alice" else "other"))
    metrics.record(outcome("w", "x"), 0.5, worker="alice")
    metrics.record(outcome("w", "glm-4.7", tokens=Tokens(10, 20, 30, 40)), 0.25, worker="alice")
    metrics.record(outcome("w", "GLM-4.7", status=429), None, worker="bob")
    metrics.record(outcome("w", "glm-4.7", status=503, duration=2.0), None)
    return metrics.exposition().decode()


def test_exposition_reads_into_the_dashboards_series():
    before = time.time()
    scrape = parse(exposition())
    assert scrape.started is not None and before - 5 <= scrape.started <= time.time()
    assert not any(s.name.endswith("_created") for s in scrape.samples)
    reading = catalogue.reduce(scrape.samples, scrape.started)
    c, g = reading.counters, reading.gauges
    assert c[("req", "2xx")] == 2 and c[("req", "4xx")] == 1 and c[("req", "5xx")] == 1
    assert c[("tok", "glm-4.7", "cache_write")] == 40
    assert c[("cost", "glm-4.7")] == 0.25 and c[("cost", "other")] == 0.5
    assert c[("w.tok", "alice", "glm-4.7", "output")] == 20
    assert c[("w.req", "alice", "other", "2xx")] == 1 and c[("w.req", "bob", "glm-4.7", "4xx")] == 1
    assert c[("w.cost", "alice", "glm-4.7")] == 0.25
    assert c[("rej", "quota")] == 3
    assert c[("dur", "0.5")] == 3 and c[("dur", "+Inf")] == 4 and c[("dur", "0.25")] == 0  # cumulative
    assert c[("qwait", "0.5")] == 1
    assert g[("limit",)] == 4 and g[("in_flight",)] == 2 and g[("queued",)] == 5
    assert ("ceiling",) not in g  # NaN: no ceiling learned
    assert g[("gate",)] == 1 and g[("gate_until",)] == T0 + 99
    assert g[("quota_reported", "5h")] == 0.5 and g[("quota_estimate", "5h")] == 0.6
    assert g[("level", "pro")] == 1 and g[("w.queued", "alice")] == 2 and g[("w.queued", "other")] == 1
    assert catalogue.stored_gauges(g)[("quota", "5h")] == 0.6  # the estimate wins


def test_exposition_refuses_what_is_not_prometheus_text():
    with pytest.raises(Exception):
        parse("<html>not metrics</html>\n{")


def test_replicas_add_up_and_the_account_does_not():
    alone = {("in_flight",): 2.0, ("limit",): 4.0, ("shared",): 1.0, ("quota", "5h"): 0.5}
    other = {("in_flight",): 1.0, ("limit",): 4.0, ("shared",): 1.0, ("quota", "5h"): 0.4}
    both = catalogue.aggregate_gauges([alone, other])
    assert both[("in_flight",)] == 3 and both[("limit",)] == 4 and both[("quota", "5h")] == 0.5
    local = catalogue.aggregate_gauges([{**alone, ("shared",): 0.0}, {**other, ("shared",): 0.0}])
    assert local[("limit",)] == 8  # each replica its own limit


def test_decumulate_gives_each_bucket_its_own_count():
    inc = {("dur", "0.1"): 1.0, ("dur", "0.5"): 3.0, ("dur", "+Inf"): 3.0, ("req", "2xx"): 3.0}
    assert catalogue.decumulate(inc) == {("dur", "0.1"): 1.0, ("dur", "0.5"): 2.0, ("req", "2xx"): 3.0}


# ---------------------------------------------------------------------- increases and resets

def reading(value: float, started: float | None = None, **more: float) -> Reading:
    counters = {("req", "2xx"): value, **{("tok", "m", k): v for k, v in more.items()}}
    return Reading(counters=counters, started=started)


# Steps of a replica's life: tokens it counts in the step, and whether it restarted first.
steps = st.lists(st.tuples(st.integers(0, 50), st.booleans()), min_size=1, max_size=40)


@given(steps, st.booleans())
@settings(max_examples=300, deadline=None)
def test_a_restart_gives_no_negative_increase_and_no_spike(life, tells_start):
    """The increase of every interval is never negative and never more than what was really
    counted in it; with the process start in the exposition (the gateway's `_created`), it is
    exactly what was counted."""
    deltas = Deltas()
    value, started, now = 5.0, 1.0, 100.0
    deltas.update("r", "production", reading(value, started if tells_start else None), now)
    for counted, restarted in life:
        now += 5
        if restarted:
            value, started = 0.0, now - 1
        value += counted
        inc = deltas.update("r", "production", reading(value, started if tells_start else None), now)
        got = inc.values.get(("req", "2xx"), 0.0)
        assert got >= 0
        assert got <= counted
        if tells_start or not restarted:
            assert got == counted
        assert inc.covered == 5


def test_a_vanished_replica_is_no_reset_of_the_sum():
    deltas = Deltas()
    deltas.update("a", "production", reading(10), 0)
    deltas.update("b", "production", reading(100), 0)
    assert deltas.update("a", "production", reading(12), 5).values == {("req", "2xx"): 2}
    # b does not answer at 5 and 10: nothing of b is lost or counted twice when it is back.
    assert deltas.update("a", "production", reading(13), 10).values == {("req", "2xx"): 1}
    back = deltas.update("b", "production", reading(107), 15)
    assert back.values == {("req", "2xx"): 7} and back.covered == 15 and not back.restarted
    # A replica gone for longer than the baseline's age starts afresh: no guess about the gap.
    assert deltas.update("b", "production", reading(500), 15 + 3600).first


def test_a_series_that_vanishes_means_a_restart():
    deltas = Deltas()
    deltas.update("a", "production", reading(10, x=4), 0)
    inc = deltas.update("a", "production", reading(11), 5)  # the tokens series is gone
    assert inc.restarted and inc.values == {("req", "2xx"): 11}


def test_a_replica_that_started_while_watched_counts_from_its_start():
    deltas = Deltas(watching_since=1000)
    inc = deltas.update("a", "production", reading(3, started=1010), 1012)
    assert inc.values == {("req", "2xx"): 3} and inc.covered == 2
    old = Deltas(watching_since=1000).update("a", "production", reading(3, started=900), 1012)
    assert old.first and old.values == {}


# ------------------------------------------------------------------------------- history

class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def tick(h: History, t: int, variant: str = "production", covered: float = 5, **inc: float) -> None:
    increments = {tuple(k.split("__")): v for k, v in inc.items()}
    h.record(t, {variant: VariantTick(increments, {("in_flight",): 2.0, ("quota", "5h"): 0.25},
                                      covered)})


def test_minutes_are_downsampled_and_ranges_sum_both_tables(tmp_path):
    h = History(tmp_path / "h.db", 5, clock=Clock(T0))
    for i in range(12 * 10):  # ten minutes, one request per interval
        tick(h, T0 + 5 * i, req__2xx=1.0)
    now = T0 + 5 * 119
    assert h.watermark == T0 + 9 * 60
    coarse = h.conn.execute("SELECT COUNT(*) FROM coarse").fetchone()[0]
    assert coarse == 9 * 4  # _tick, req and two gauges, per whole minute
    for start in (T0, T0 + 7, T0 + 60, T0 + 301, now - 59):
        expected = len([i for i in range(120) if T0 + 5 * i >= math.ceil(start)])
        got = h.sums(start, ["req"])[("production", ("req", "2xx"))]
        assert got.value == expected, start
        assert got.last == now
    gauges = h.grouped("coarse", ["in_flight"], None, T0, 60, gauge=True)
    assert {value for *_, value in gauges} == {2.0}
    h.close()
    # A reader sees the same from its own connection; the history survives a restart.
    reader = Reader.open(tmp_path / "h.db")
    assert reader.sums(T0, ["req"])[("production", ("req", "2xx"))].value == 120
    reader.close()
    again = History(tmp_path / "h.db", 5, clock=Clock(now + 5))
    assert again.watermark == T0 + 9 * 60
    assert again.sums(T0, ["req"])[("production", ("req", "2xx"))].value == 120
    again.close()


def test_baselines_survive_a_dashboard_restart(tmp_path):
    h = History(tmp_path / "h.db", 5)
    deltas = Deltas()
    deltas.update("http://a", "production", reading(10, started=50.0, x=3), T0)
    h.record(T0, {}, [("http://a", deltas.replicas["http://a"], True)])
    h.close()
    h = History(tmp_path / "h.db", 5)
    restored = Deltas()
    restored.replicas.update(h.baselines(T0 + 60))
    inc = restored.update("http://a", "production", reading(15, started=50.0, x=3), T0 + 60)
    assert inc.values == {("req", "2xx"): 5} and not inc.restarted
    assert h.baselines(T0 + 3600) == {}  # too old to carry on from
    h.close()


def test_a_second_writer_is_refused(tmp_path):
    from extproc.dashboard.history import HistoryLocked

    h = History(tmp_path / "h.db", 5)
    with pytest.raises(HistoryLocked, match="DASHBOARD_DB"):
        History(tmp_path / "h.db", 5)
    h.close()


def test_thirty_days_keep_the_history_bounded(tmp_path):
    """Forty days of an injected clock: a busy minute every hour (5 s intervals, 30 series per
    interval), quiet in between. Fine rows stay within 24 h, minutes within 30 days, and the
    file stops growing once the retention is full."""
    clock = Clock(T0)
    h = History(tmp_path / "h.db", 5, clock=clock, durable=False)
    sizes = {}
    series = {f"w.tok__worker{n}__glm-4.7__input": 100.0 for n in range(25)}
    for day in range(40):
        for hour in range(24):
            base = T0 + day * 86400 + hour * 3600
            for i in range(12):  # a busy minute
                clock.t = base + 5 * i
                tick(h, base + 5 * i, req__2xx=1.0, **series)
            clock.t = base + 1800
            tick(h, base + 1800)  # a quiet interval: the minute before rolls into coarse
        if day in (31, 35, 39):
            h.maintain(clock.t)
            sizes[day] = h.used_bytes()
    now = clock.t
    oldest_fine = h.conn.execute("SELECT MIN(t) FROM fine").fetchone()[0]
    oldest_coarse = h.conn.execute("SELECT MIN(t) FROM coarse").fetchone()[0]
    assert oldest_fine >= now - FINE_KEEP - 60
    assert oldest_coarse >= now - COARSE_KEEP - 3600  # pruned hourly
    assert sizes[39] <= sizes[31] * 1.1, sizes
    # The last 7 days are all there, from the minutes.
    week = h.sums(now - 7 * 86400, ["req"])[("production", ("req", "2xx"))].value
    assert week == pytest.approx(7 * 24 * 12, abs=24)
    h.close()


def test_past_its_size_limit_the_oldest_minutes_go_first(tmp_path):
    clock = Clock(T0)
    h = History(tmp_path / "h.db", 60, max_bytes=2 << 20, clock=clock, durable=False)
    series = {f"w.tok__worker{n}__m__input": 1.0 for n in range(60)}
    for minute in range(3 * 1440):  # three days of minutes with 60 series each
        clock.t = T0 + 60 * minute
        tick(h, T0 + 60 * minute, covered=60, **series)
    h.maintain(clock.t)
    assert h.used_bytes() <= 2 << 20
    newest = h.sums(clock.t - 86400, ["w.tok"])
    assert sum(t.value for t in newest.values()) == pytest.approx(1440 * 60, rel=0.01)
    oldest_coarse = h.conn.execute("SELECT MIN(t) FROM coarse").fetchone()[0]
    assert oldest_coarse > T0  # the first days went
    h.close()


# ----------------------------------------------------------------------------- quantiles

def test_quantiles_interpolate_like_histogram_quantile():
    bounds = catalogue.BOUNDS["dur"]
    assert quantile(0.5, {0.25: 1.0}, bounds) == pytest.approx(0.175)  # within (0.1, 0.25]
    assert quantile(0.5, {0.05: 2.0}, bounds) == pytest.approx(0.025)  # first bucket from 0
    assert quantile(0.99, {math.inf: 1.0, 1.0: 99.0}, bounds) == pytest.approx(1.0)
    assert quantile(0.999, {math.inf: 5.0, 1.0: 5.0}, bounds) == 900.0  # the largest finite bound
    assert quantile(0.5, {}, bounds) is None


@given(st.dictionaries(st.sampled_from(catalogue.BOUNDS["dur"]), st.integers(0, 100), min_size=1),
       st.floats(0.01, 0.99), st.floats(0.01, 0.99))
def test_quantiles_are_monotonic_and_within_the_buckets(counts, q1, q2):
    counts = {k: float(v) for k, v in counts.items()}
    lo, hi = sorted((q1, q2))
    a, b = (quantile(q, counts, catalogue.BOUNDS["dur"]) for q in (lo, hi))
    if sum(counts.values()) == 0:
        assert a is None and b is None
        return
    assert 0 <= a <= b <= 900


def test_quantiles_over_a_range_come_from_bucket_increases(tmp_path):
    h = History(tmp_path / "h.db", 5)
    # Minute 1: 100 fast requests; minute 2: 100 slow ones. Over both, the median is the boundary.
    for i in range(12):
        tick(h, T0 + 5 * i, **{"dur__0.1": 100 / 12})
        tick(h, T0 + 60 + 5 * i, **{"dur__10.0": 100 / 12})
    live = panels.Live("extproc", ["production"])
    minute = panels.status(h, T0 + 115, live)["variants_data"]["production"]["latency"]
    assert 5 < minute["p50"] <= 10  # the last minute: slow only
    chart = panels.series(h, "latency.p50", ["production"], 900, T0 + 115, 5)
    values = [v for _, v in chart["points"]["production"] if v is not None]
    assert values[0] < 0.1 and values[-1] > 5
    h.close()


# -------------------------------------------------------------------- status, charts, usage

def busy_history(tmp_path) -> History:
    h = History(tmp_path / "h.db", 5)
    for i in range(24):
        t = T0 + 5 * i
        inc = {"req__2xx": 2.0, "req__5xx": 1.0, "tok__glm-4.7__input": 100.0,
               "tok__glm-4.7__output": 50.0, "cost__glm-4.7": 0.01, "rej__quota": 1.0,
               "err__1302": 0.5, "w.tok__alice__glm-4.7__input": 60.0,
               "w.tok__alice__glm-4.7__cache_read": 40.0, "w.tok__bob__glm-4.7__input": 40.0,
               "w.req__alice__glm-4.7__2xx": 1.0, "w.req__bob__glm-4.7__2xx": 1.0,
               "w.cost__alice__glm-4.7": 0.006, "w.cost__bob__glm-4.7": 0.004,
               "ttft__0.5": 2.0, "dur__1.0": 3.0}
        tick(h, t, **inc)
        tick(h, t, variant="canary", **{"req__2xx": 1.0, "w.tok__carol__glm-4.5__output": 7.0,
                                        "w.req__carol__glm-4.5__2xx": 1.0})
    h.record(T0 + 115, {"production": VariantTick({}, {("reset", "5h"): T0 + 3600.0}, 0)})
    return h


def test_status_document_has_the_contracts_shape(tmp_path):
    h = busy_history(tmp_path)
    now = T0 + 115
    live = panels.Live("extproc", ["production", "canary"], weights={"production": 90, "canary": 10},
                       gauges={"production": {("in_flight",): 3.0, ("limit",): 4.0, ("queued",): 1.0,
                                              ("gate",): 0.0, ("gate_until",): 0.0,
                                              ("reset", "5h"): T0 + 3600.0, ("level", "pro"): 1.0,
                                              ("quota_reported", "5h"): 0.4, ("w.queued", "bob"): 2.0}})
    doc = panels.status(h, now, live)
    assert set(doc) >= {"time", "source", "variants", "weights", "variants_data", "account", "workers"}
    assert doc["variants"] == ["production", "canary"] and doc["weights"]["canary"] == 10
    v = doc["variants_data"]["production"]
    assert v["rps"] == {"2xx": pytest.approx(0.4), "4xx": 0.0, "5xx": pytest.approx(0.2)}
    assert v["tokens_per_s"]["input"] == pytest.approx(20) and v["tokens_by_model"] == {"glm-4.7": pytest.approx(30)}
    assert v["cost_usd"]["hour"] == pytest.approx(0.24) == v["cost_usd"]["block_5h"]
    assert set(v["latency"]) == {"p50", "p95", "p99"} and 0.5 < v["latency"]["p50"] <= 1.0
    assert set(v["ttft"]) == {"p50", "p95"}
    lim = v["limiter"]
    assert (lim["in_flight"], lim["limit"], lim["queued"], lim["gate_closed"]) == (3, 4, 1, False)
    assert lim["rejections_per_s"]["quota"] == pytest.approx(0.2) and lim["gate_reopens_at"] is None
    assert v["upstream_errors_per_s"] == {"1302": pytest.approx(0.1)}
    assert doc["account"]["level"] == "pro"
    assert doc["account"]["windows"]["5h"] == {"used_ratio": 0.4, "reset_at": T0 + 3600, "runs_out_at": None}
    assert doc["account"]["windows"]["weekly"]["used_ratio"] is None
    workers = {(w["worker"], w["variant"]): w for w in doc["workers"]}
    alice = workers[("alice", "production")]
    assert alice["requests"] == 24 and alice["tokens"]["input"] == 24 * 60
    assert alice["cache_hit_ratio"] == pytest.approx(0.4) and alice["last_seen"] == T0 + 115
    assert alice["cost_usd"] == pytest.approx(0.144)
    assert workers[("bob", "production")]["queued_now"] == 2
    assert workers[("carol", "canary")]["tokens"]["output"] == 24 * 7
    h.close()


def test_charts_keep_to_720_points_and_refuse_unknown_names(tmp_path):
    h = busy_history(tmp_path)
    now = T0 + 115
    for name in panels.SERIES:
        for range_name, seconds in panels.RANGES.items():
            chart = panels.series(h, name, ["production", "canary"], seconds, now, 5)
            assert chart["name"] == name and set(chart["points"]) == {"production", "canary"}
            assert len(chart["points"]["production"]) <= 721, (name, range_name)
    rps = panels.series(h, "rps.2xx", ["production"], 900, now, 5)
    assert rps["step"] == 5
    values = [v for _, v in rps["points"]["production"] if v is not None]
    assert values and all(v == pytest.approx(0.4) for v in values)
    assert panels.series(h, "cost", ["production"], 3600, now, 5)["unit"] == "usd/h"
    assert panels.resolution(86400, 5) == ("fine", 5, 120)
    assert panels.resolution(7 * 86400, 5) == ("coarse", 60, 840)
    with pytest.raises(panels.BadRequest):
        panels.series(h, "rps.3xx", ["production"], 900, now, 5)
    with pytest.raises(panels.BadRequest):
        panels.parse_range("2h")
    h.close()


def test_usage_report_by_worker_model_and_variant(tmp_path):
    h = busy_history(tmp_path)
    now = T0 + 115
    rep = report(h, "1h", now=now)
    rows = list(csv.reader(io.StringIO(render(rep, "csv"))))
    assert tuple(rows[0]) == CSV_HEADER
    by = {(r[0], r[1], r[2]): r for r in rows[1:]}
    assert by[("alice", "glm-4.7", "production")][3:8] == ["24", str(24 * 60), "0", str(24 * 40), "0"]
    assert by[("carol", "glm-4.5", "canary")][5] == str(24 * 7)
    block = report(h, "block", now=now)
    assert block.block_from_quota and block.since == T0 + 3600 - 5 * 3600
    assert "TOTAL" in render(rep, "table") and '"rows"' in render(rep, "json")
    with pytest.raises(ValueError):
        parse_since("yesterday")
    h.close()
