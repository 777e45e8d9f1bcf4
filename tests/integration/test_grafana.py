"""deploy/grafana/zai-proxy.json: every panel's PromQL, against a real Prometheus scraping both
variants of a real stack under traffic (successes, 5xx, a quota gate closed by Z.AI's 1308).

Grafana itself is not run: its template variables are substituted the way Grafana does
(`$variant` multi-value -> `(production|canary)`, `$__rate_interval` -> a range), and each
target goes to Prometheus' HTTP API, as Grafana would send it."""

from __future__ import annotations

import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pytest

from harness import StackHandle, stack_env
from prometheus_server import Prometheus, needs_prometheus

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "zai-proxy.json"

# Grafana's built-in and the dashboard's own variables, as Grafana substitutes them.
SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$variant": "(production|canary)",
    "$worker": ".+",
}
# Panels whose series exist only in some states of the account; the query must still be valid.
MAY_BE_EMPTY = {
    "Runs out in (at this pace)",       # only while a window burns faster than it resets
    "Limiter adjustments",              # only after the limiter learned something
}


def panels(doc: dict) -> list[dict]:
    out = []
    for panel in doc["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return out


def targets(doc: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels(doc) for t in p.get("targets", [])]


def substitute(expr: str, **overrides: str) -> str:
    values = SUBSTITUTIONS | overrides
    # Longest names first, so `$__range` is not read as a prefix of something longer.
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(name, values[name])
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


def test_dashboard_is_a_grafana_dashboard():
    doc = json.loads(DASHBOARD.read_text())
    assert doc["schemaVersion"] >= 36 and doc["uid"] and doc["title"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    variant = variables["variant"]
    assert "deployment_variant" in variant["definition"]
    assert variant["multi"] and variant["includeAll"]
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels(doc):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"], p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}", p["title"]
    exprs = " ".join(e for _, e in targets(doc))
    for metric in ("zai_proxy_requests_total", "zai_proxy_request_duration_seconds_bucket",
                   "zai_proxy_time_to_first_token_seconds_bucket", "zai_proxy_tokens_total",
                   "zai_proxy_estimated_cost_usd_total", "zai_proxy_rate_limit_in_flight",
                   "zai_proxy_rate_limit_concurrency_limit", "zai_proxy_rate_limit_concurrency_ceiling",
                   "zai_proxy_rate_limit_queue_depth", "zai_proxy_rate_limit_queue_wait_seconds_bucket",
                   "zai_proxy_rate_limit_rejections_total", "zai_proxy_upstream_errors_total",
                   "zai_proxy_quota_used_ratio", "zai_proxy_quota_reset_timestamp_seconds",
                   "zai_proxy_quota_exhaustion_timestamp_seconds", "zai_proxy_worker_requests_total",
                   "zai_proxy_worker_tokens_total", "zai_proxy_worker_estimated_cost_usd_total"):
        assert metric in exprs, f"no panel shows {metric}"
    # Every panel filters by the variant (the two comparison panels name both on purpose).
    for title, expr in targets(doc):
        assert '$variant' in expr or 'deployment_variant="canary"' in expr, title


@needs_prometheus
@pytest.mark.timeout(240)
def test_every_panel_query_runs_against_prometheus(tmp_path):
    doc = json.loads(DASHBOARD.read_text())
    env = stack_env(MAX_RETRIES="0", CANARY_WEIGHT="50", QUOTA_POLL_SECONDS="1")
    stack = StackHandle(tmp_path / "stack", env, variants=("production", "canary")).start()
    prometheus = Prometheus(tmp_path, stack.admin_urls())
    try:
        prometheus.start()
        time.sleep(1.5)  # a baseline sample before the traffic: a counter's first sample has no rate

        def call(args: tuple[str, int], options: dict | None = None) -> int:
            variant, i = args
            headers = {"x-api-key": f"worker-{i}"}
            if options:
                headers["x-emulator-options"] = json.dumps(options)
            return httpx.post(f"{stack.url}/{variant}/v1/messages", trust_env=False, timeout=30,
                              headers=headers,
                              json={"model": "glm-4.7", "max_tokens": 16, "stream": i % 2 == 0,
                                    "messages": [{"role": "user", "content": "hi"}]}).status_code

        for _ in range(2):  # two rounds with scrapes between, so every counter has a rate
            jobs = [(v, i) for v in ("production", "canary") for i in range(8)]
            with ThreadPoolExecutor(8) as pool:
                assert set(pool.map(call, jobs)) == {200}
            with ThreadPoolExecutor(4) as pool:  # Z.AI overloaded: 5xx and upstream errors
                assert all(code >= 500 for code in pool.map(
                    lambda job: call(job, {"error_after_events": 0}),
                    [(v, i) for v in ("production", "canary") for i in (1, 3)]))
            time.sleep(2.5)
        # Z.AI says the 5-hour window is spent: the canary's quota gate closes, the next request
        # is refused by the gateway itself (a rejection with reason quota).
        assert call(("canary", 5), {"reject_code": "1308"}) == 429
        assert call(("canary", 6)) == 429
        time.sleep(2.5)

        values = prometheus.get("label/deployment_variant/values", **{"match[]": "zai_proxy_build_info"})
        assert set(values["data"]) == {"production", "canary"}, values
        workers = prometheus.get("label/worker/values", **{"match[]": "zai_proxy_worker_requests_total"})
        assert len(workers["data"]) >= 8, workers

        empty, failed = [], []
        for title, expr in targets(doc):
            for variant in ("(production|canary)", ".+"):  # two values picked, and "All"
                query = substitute(expr, **{"$variant": variant})
                result = prometheus.query(query)
                if result.get("status") != "success":
                    failed.append((title, query, result.get("error")))
                    continue
                series = result["data"]["result"]
                if not series and title not in MAY_BE_EMPTY:
                    empty.append((title, query))
        assert not failed, "invalid queries:\n" + "\n".join(map(str, failed))
        assert not empty, "queries with no data under traffic:\n" + "\n".join(map(str, empty))

        # The core panels show what was sent, per variant.
        def by_variant(expr: str) -> dict[str, float]:
            res = prometheus.query(substitute(expr))["data"]["result"]
            return {s["metric"].get("deployment_variant"): float(s["value"][1]) for s in res}

        core = {t: e for t, e in targets(doc)}
        for title in ("Requests per second (seed query)", "Tokens per second (seed query)",
                      "5xx per second (seed query)", "p95 request duration (seed query)",
                      "Estimated cost, USD per hour"):
            series = by_variant(core[title])
            assert set(series) == {"production", "canary"}, (title, series)
            assert all(v > 0 and not math.isnan(v) for v in series.values()), (title, series)
        gate = by_variant(next(e for t, e in targets(doc) if t == "Quota gate"))
        assert gate == {"production": 0.0, "canary": 1.0}, gate
        rejections = prometheus.query(substitute(
            next(e for t, e in targets(doc) if t == "Rejections by reason")))["data"]["result"]
        assert {(s["metric"]["deployment_variant"], s["metric"]["reason"]) for s in rejections} == {
            ("canary", "quota")}, rejections
        errors = prometheus.query(substitute(
            next(e for t, e in targets(doc) if t == "Upstream errors by Z.AI code")))["data"]["result"]
        assert {s["metric"]["deployment_variant"] for s in errors} == {"production", "canary"}, errors
        assert {s["metric"]["code"] for s in errors} >= {"1305", "1308"}, errors
        table = [e for t, e in targets(doc) if t == "Workers over the selected range"]
        requests = prometheus.query(substitute(table[0]))["data"]["result"]
        assert sum(float(s["value"][1]) for s in requests) > 0
        used = prometheus.query(substitute(
            next(e for t, e in targets(doc) if t == "Quota used (Z.AI's report)")))["data"]["result"]
        assert {s["metric"]["window"] for s in used} == {"5h", "weekly"}, used
    finally:
        prometheus.stop()
        stack.stop()
