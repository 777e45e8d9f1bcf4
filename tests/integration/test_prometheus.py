"""The seed's PromQL, verbatim, against a real Prometheus scraping both variants under traffic."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest

from harness import StackHandle, stack_env
from prometheus_server import Prometheus, needs_prometheus

SEED_QUERIES = [
    'sum by (deployment_variant) (rate(zai_proxy_requests_total[5m]))',
    'sum by (deployment_variant) (rate(zai_proxy_tokens_total[5m]))',
    'sum by (deployment_variant) (rate(zai_proxy_requests_total{status=~"5.."}[5m]))',
    'histogram_quantile(0.95, sum by (deployment_variant, le) '
    '(rate(zai_proxy_request_duration_seconds_bucket[5m])))',
]


@needs_prometheus
@pytest.mark.timeout(180)
def test_seed_queries_give_one_series_per_variant(tmp_path):
    env = stack_env(MAX_RETRIES="0", CANARY_WEIGHT="50")
    stack = StackHandle(tmp_path / "stack", env, variants=("production", "canary")).start()
    prometheus = Prometheus(tmp_path, [f"127.0.0.1:{env['EXTPROC_ADMIN_PORT']}",
                                       f"127.0.0.1:{env['CANARY_EXTPROC_ADMIN_PORT']}"])
    try:
        prometheus.start()
        time.sleep(1.5)  # a baseline sample before the traffic

        def call(args: tuple[str, int]) -> int:
            variant, i = args
            return httpx.post(f"{stack.url}/{variant}/v1/messages", trust_env=False, timeout=30,
                              headers={"x-api-key": f"w{i}"},
                              json={"model": "glm-4.7", "max_tokens": 16, "stream": i % 2 == 0,
                                    "messages": [{"role": "user", "content": "hi"}]}).status_code

        # Two rounds with scrapes between: a counter's first sample alone gives no rate.
        for _ in range(2):
            jobs = [(v, i) for v in ("production", "canary") for i in range(10)]
            with ThreadPoolExecutor(8) as pool:
                assert set(pool.map(call, jobs)) == {200}
            stack.emulator("POST", "/_emulator/config", json={"error_after_events": 0})
            with ThreadPoolExecutor(8) as pool:  # Z.AI overloaded: 5xx in both variants
                assert all(code >= 500 for code in pool.map(
                    call, [(v, i) for v in ("production", "canary") for i in range(1, 6, 2)]))
            stack.emulator("POST", "/_emulator/config", json={"error_after_events": -1})
            time.sleep(2.5)

        for query in SEED_QUERIES:
            result = prometheus.query(query)
            assert result["status"] == "success", (query, result)
            series = {s["metric"].get("deployment_variant"): float(s["value"][1])
                      for s in result["data"]["result"]}
            assert set(series) == {"production", "canary"}, (query, series)
            assert all(v > 0 and not math.isnan(v) for v in series.values()), (query, series)
    finally:
        prometheus.stop()
        stack.stop()
