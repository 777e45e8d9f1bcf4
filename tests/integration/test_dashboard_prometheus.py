"""The dashboard's Prometheus source (PROMETHEUS_URL, the Kubernetes case): a real Prometheus
scrapes both variants' ext_procs; a dashboard reading Prometheus's API shows the same panels as
one scraping the ext_procs itself, and the same per-worker totals once Prometheus's rate window
(1 minute) has passed over the traffic."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from harness import StackHandle, free_port, stack_env
from prometheus_server import Prometheus, needs_prometheus
from test_dashboard import DIRECTIONS, WORKERS, dashboard_workers, traffic

ZAI_PROXY = str(Path(sys.executable).with_name("zai-proxy"))


def keys(doc: object) -> object:
    """The shape of a document: its keys, nested (lists by their first item)."""
    if isinstance(doc, dict):
        return {k: keys(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [keys(doc[0])] if doc else []
    return None


def wait_ok(url: str, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, trust_env=False, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, f"{what} exited"
        assert time.monotonic() < deadline, f"{what} not ready"
        time.sleep(0.3)


@needs_prometheus
@pytest.mark.timeout(180)
def test_prometheus_source_gives_the_same_panels(tmp_path):
    keys_file = tmp_path / "worker-keys"
    keys_file.write_text("".join(f"{name} {key}\n" for name, key in WORKERS.items()))
    env = stack_env(CANARY_WEIGHT="50", MAX_RETRIES="0", WORKER_KEYS_FILE=str(keys_file),
                    DASHBOARD_INTERVAL_SECONDS="1", DASHBOARD_DB=str(tmp_path / "scrape.db"))
    stack = StackHandle(tmp_path / "stack", env, variants=("production", "canary"), dashboard=True).start()
    dash_port = free_port()
    prometheus = Prometheus(tmp_path, [f"127.0.0.1:{env['EXTPROC_ADMIN_PORT']}",
                                       f"127.0.0.1:{env['CANARY_EXTPROC_ADMIN_PORT']}"])
    dashboard = None
    try:
        # Every series exists before the measured traffic (Prometheus cannot see the increase
        # that creates a series) and before Prometheus's first scrape: a warm-up increase that
        # Prometheus saw would count, spread over its rate window, in the dashboard's totals.
        traffic(stack, n=2)
        prometheus.start()
        time.sleep(3)  # scraped a few times
        dashboard = subprocess.Popen(
            [ZAI_PROXY, "dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**stack.stack.env, "PROMETHEUS_URL": prometheus.url,
                 "DASHBOARD_PORT": str(dash_port), "DASHBOARD_DB": str(tmp_path / "prom.db"),
                 "DASHBOARD_INTERVAL_SECONDS": "1", "ENVOY_ROUTES_DIR": str(tmp_path / "stack" / "routes")})
        prom_url = f"http://127.0.0.1:{dash_port}"
        wait_ok(f"{prom_url}/health", dashboard, "the Prometheus-sourced dashboard")
        time.sleep(2)
        sent = traffic(stack, n=10)

        class Via:  # dashboard_workers() takes something with a dashboard_url
            dashboard_url = prom_url

        # Mid-traffic: the same panels.
        time.sleep(3)
        a = httpx.get(f"{stack.dashboard_url}/api/status", trust_env=False, timeout=10).json()
        b = httpx.get(f"{prom_url}/api/status", trust_env=False, timeout=10).json()
        assert b["source"] == "prometheus" and a["source"] == "extproc"
        assert keys(a["variants_data"]) == keys(b["variants_data"])
        assert keys(a["account"]) == keys(b["account"]) and keys(a["workers"]) == keys(b["workers"])
        assert a["variants"] == b["variants"] == ["production", "canary"]
        assert a["weights"] == b["weights"]
        for variant in ("production", "canary"):
            pa, pb = a["variants_data"][variant], b["variants_data"][variant]
            assert pb["rps"]["2xx"] > 0 and pb["tokens_per_s"]["output"] > 0
            assert pb["latency"]["p50"] is not None
            assert pa["limiter"]["limit"] == pb["limiter"]["limit"]
        assert a["account"]["windows"]["5h"]["reset_at"] == b["account"]["windows"]["5h"]["reset_at"]
        for name in ("rps.2xx", "tokens.input", "latency.p95", "limit"):
            chart = httpx.get(f"{prom_url}/api/series", params={"name": name, "range": "15m"},
                              trust_env=False, timeout=10).json()
            assert any(v for _, v in chart["points"]["production"]), name

        # Once the rate window has passed over the traffic: the totals of what was sent.
        deadline = time.monotonic() + 100
        while True:
            got = dashboard_workers(Via)  # type: ignore[arg-type]
            ok = all(got.get(k, {}).get(f, 0) == pytest.approx(row[f], rel=0.08)
                     for k, row in sent.items() for f in ("requests", *DIRECTIONS) if row[f])
            if ok:
                break
            assert time.monotonic() < deadline, (got, sent)
            time.sleep(2)
    finally:
        if dashboard is not None:
            dashboard.terminate()
            try:
                dashboard.wait(10)
            except subprocess.TimeoutExpired:
                dashboard.kill()
        prometheus.stop()
        stack.stop()
