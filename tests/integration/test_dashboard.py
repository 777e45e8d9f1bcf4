"""The dashboard against the real stack: both variants behind Envoy, the emulator, and
`zai-proxy dashboard` (started by the local stack, as `zai-proxy up` starts it) scraping each
ext_proc. Its numbers must be the ext_procs' own; its history must survive its own restart and an
ext_proc's; `zai-proxy usage` must report what the emulator says it served."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pytest

from harness import StackHandle, free_port, stack_env

ZAI_PROXY = str(Path(sys.executable).with_name("zai-proxy"))
WORKERS = {"alice": "wk-alice-0123456789abcdef", "bob": "wk-bob-0123456789abcdef"}
DIRECTIONS = ("input", "output", "cache_read", "cache_write")
INTERVAL = 1

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dashboard")
    keys = run_dir / "worker-keys"
    keys.write_text("".join(f"{name} {key}\n" for name, key in WORKERS.items()))
    env = stack_env(CANARY_WEIGHT="50", MAX_RETRIES="0", WORKER_KEYS_FILE=str(keys),
                    DASHBOARD_INTERVAL_SECONDS=str(INTERVAL), DASHBOARD_DB=str(run_dir / "dash.db"))
    handle = StackHandle(run_dir, env, variants=("production", "canary"), dashboard=True).start()
    yield handle
    handle.stop()


def get(url: str, **kw) -> httpx.Response:
    return httpx.get(url, trust_env=False, timeout=10, **kw)


def collections(stack: StackHandle) -> int:
    return get(f"{stack.dashboard_url}/health?detail=1").json()["collections"]


def wait_collected(stack: StackHandle, after: int | None = None, count: int = 2) -> None:
    """Until the dashboard has collected `count` times after now (or after `after`)."""
    start = collections(stack) if after is None else after
    deadline = time.monotonic() + 20
    while collections(stack) < start + count:
        assert time.monotonic() < deadline, "the dashboard stopped collecting"
        time.sleep(0.2)


def ask(stack: StackHandle, worker: str, variant: str, i: int) -> dict:
    resp = httpx.post(f"{stack.url}/{variant}/v1/messages", trust_env=False, timeout=30,
                      headers={"x-api-key": WORKERS[worker]},
                      json={"model": "glm-4.7", "max_tokens": 16 + i % 7,
                            "messages": [{"role": "user", "content": f"hi {'there ' * i}"}]})
    assert resp.status_code == 200, resp.text
    return resp.json()["usage"]


def traffic(stack: StackHandle, n: int = 12) -> dict[tuple[str, str], dict[str, int]]:
    """n requests per worker and variant; the usage each worker and variant got."""
    jobs = [(w, v, i) for w in WORKERS for v in ("production", "canary") for i in range(n)]
    with ThreadPoolExecutor(8) as pool:
        usages = list(pool.map(lambda job: ask(stack, *job), jobs))
    got: dict[tuple[str, str], dict[str, int]] = {}
    for (worker, variant, _), usage in zip(jobs, usages):
        row = got.setdefault((worker, variant), {"requests": 0, **{d: 0 for d in DIRECTIONS}})
        row["requests"] += 1
        row["input"] += usage["input_tokens"]
        row["output"] += usage["output_tokens"]
        row["cache_read"] += usage.get("cache_read_input_tokens") or 0
        row["cache_write"] += usage.get("cache_creation_input_tokens") or 0
    stack.settle()
    return got


def extproc_totals(stack: StackHandle) -> dict[tuple[str, str], dict[str, float]]:
    """Per worker and variant, what the ext_procs' own /metrics say."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for variant in ("production", "canary"):
        for url in stack.admin_urls(variant):
            for line in get(f"{url}/metrics").text.splitlines():
                if not line.startswith("zai_proxy_worker_"):
                    continue
                name, value = line.rsplit(" ", 1)
                labels = dict(part.split("=", 1) for part in name[name.index("{") + 1:-1].split(","))
                labels = {k: v.strip('"') for k, v in labels.items()}
                row = out.setdefault((labels["worker"], variant),
                                     {"requests": 0, "cost_usd": 0.0, **{d: 0 for d in DIRECTIONS}})
                if name.startswith("zai_proxy_worker_requests_total"):
                    row["requests"] += float(value)
                elif name.startswith("zai_proxy_worker_tokens_total"):
                    row[labels["direction"]] += float(value)
                elif name.startswith("zai_proxy_worker_estimated_cost_usd_total"):
                    row["cost_usd"] += float(value)
    return out


def dashboard_workers(stack: StackHandle, range_: str = "24h") -> dict[tuple[str, str], dict]:
    doc = get(f"{stack.dashboard_url}/api/status", params={"range": range_}).json()
    return {(w["worker"], w["variant"]): {"requests": w["requests"], "cost_usd": w["cost_usd"],
                                          **w["tokens"]} for w in doc["workers"]}


def assert_same(dashboard: dict, expected: dict) -> None:
    assert set(dashboard) == set(expected), (dashboard, expected)
    for key, row in expected.items():
        for field, value in row.items():
            assert dashboard[key][field] == pytest.approx(value, abs=1e-6), (key, field)


def test_status_numbers_are_the_ext_procs_own(stack):
    wait_collected(stack)
    sent = traffic(stack)
    wait_collected(stack)
    own = extproc_totals(stack)
    dashboard = dashboard_workers(stack)
    assert_same(dashboard, own)
    for key, row in sent.items():  # ... and what the clients were told
        for field in ("requests", *DIRECTIONS):
            assert dashboard[key][field] == row[field], (key, field)
    doc = get(f"{stack.dashboard_url}/api/status").json()
    assert doc["source"] == "extproc" and doc["variants"] == ["production", "canary"]
    assert doc["weights"] == {"production": 50.0, "canary": 50.0}
    for variant in ("production", "canary"):
        panel = doc["variants_data"][variant]
        assert panel["rps"]["2xx"] > 0 and panel["rps"]["5xx"] == 0
        assert panel["tokens_per_s"]["output"] > 0 and set(panel["tokens_by_model"]) == {"glm-4.7"}
        assert panel["latency"]["p50"] is not None and panel["cost_usd"]["today"] > 0
        assert panel["limiter"]["limit"] >= 1 and panel["limiter"]["gate_closed"] is False
    assert doc["account"]["windows"]["5h"]["reset_at"] is not None  # the emulator's quota report
    # Charts: every series, both variants.
    for name in ("rps.2xx", "tokens.output", "latency.p95", "in_flight", "quota.5h", "cost"):
        chart = get(f"{stack.dashboard_url}/api/series",
                    params={"name": name, "variant": "both", "range": "15m"}).json()
        assert chart["step"] == 2 and set(chart["points"]) == {"production", "canary"}  # 900 s / 720
    rps = get(f"{stack.dashboard_url}/api/series", params={"name": "rps.2xx", "range": "15m"}).json()
    total = sum(v * rps["step"] for v in (p[1] for p in rps["points"]["canary"]) if v)
    assert total == pytest.approx(sum(r["requests"] for (w, v), r in sent.items() if v == "canary"))
    bad = get(f"{stack.dashboard_url}/api/series", params={"name": "nope"})
    assert bad.status_code == 400 and "unknown series" in bad.json()["error"]
    assert get(f"{stack.dashboard_url}/api/series",
               params={"name": "rps.2xx", "range": "2h"}).status_code == 400


def test_usage_report_is_what_the_emulator_served(stack):
    env = {**os.environ, "NO_PROXY": "*"}
    out = subprocess.run([ZAI_PROXY, "usage", "--since", "1h", "--format", "csv",
                          "--db", str(stack.run_dir / "dash.db")],
                         capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert list(rows[0]) == ["worker", "model", "variant", "requests", "input_tokens", "output_tokens",
                             "cache_read_tokens", "cache_write_tokens", "cost_usd"]
    served = [r["usage"] for r in stack.upstream_requests() if r.get("usage")]
    for direction in DIRECTIONS:
        assert sum(int(r[f"{direction}_tokens"]) for r in rows) == sum(u[direction] for u in served)
    assert sum(int(r["requests"]) for r in rows) == len(served)
    assert {(r["worker"], r["model"], r["variant"]) for r in rows} == {
        (w, "glm-4.7", v) for w in WORKERS for v in ("production", "canary")}
    table = subprocess.run([ZAI_PROXY, "usage", "--since", "block", "--db", str(stack.run_dir / "dash.db")],
                           capture_output=True, text=True, timeout=30, env=env)
    assert table.returncode == 0 and "TOTAL" in table.stdout
    assert "from Z.AI's quota report" in table.stdout  # the emulator reports the 5-hour reset


def test_dashboard_restart_keeps_its_history(stack):
    before = dashboard_workers(stack)
    chart_before = get(f"{stack.dashboard_url}/api/series", params={"name": "rps.2xx", "range": "15m"}).json()
    stack.stop_dashboard()
    sent = traffic(stack, n=3)  # while it is away
    stack.start_dashboard()
    wait_collected(stack, after=0, count=2)
    after = dashboard_workers(stack)
    for key, row in before.items():
        for field in ("requests", *DIRECTIONS):
            assert after[key][field] == row[field] + sent[key][field], (key, field)
    assert_same(after, extproc_totals(stack))
    chart = get(f"{stack.dashboard_url}/api/series", params={"name": "rps.2xx", "range": "15m"}).json()
    old = {t for t, v in chart_before["points"]["production"] if v}
    assert old and old <= {t for t, v in chart["points"]["production"] if v}


def test_an_ext_proc_restart_gives_no_negative_rate_and_no_spike(stack):
    before = dashboard_workers(stack)
    stack.stop_extproc("canary")
    wait_collected(stack, count=2)  # the dashboard sees it gone
    stack.start_extproc("canary")
    sent = traffic(stack, n=4)
    wait_collected(stack, count=2)
    after = dashboard_workers(stack)
    for key, row in before.items():
        for field in ("requests", *DIRECTIONS):
            assert after[key][field] == row[field] + sent[key][field], (key, field)
    # The restarted ext_proc counts from zero: the dashboard adds, never subtracts or recounts.
    own = extproc_totals(stack)
    for (worker, variant), row in own.items():
        if variant == "canary":
            assert row["requests"] == sent[(worker, variant)]["requests"]
    # No point of the charts is negative, and none is a spike: the most any interval can have
    # is everything sent since the restart (recounting the old process's totals would be more).
    since = time.time() - 10
    for name, field in (("rps.2xx", "requests"), ("tokens.input", "input"), ("tokens.output", "output")):
        chart = get(f"{stack.dashboard_url}/api/series",
                    params={"name": name, "variant": "canary", "range": "15m"}).json()
        values = [v for _, v in chart["points"]["canary"] if v is not None]
        assert values and min(values) >= 0, name
        recent = [v for t, v in chart["points"]["canary"] if v is not None and t >= since]
        new = sum(r[field] for (w, v), r in sent.items() if v == "canary")
        assert 0 < max(recent) <= new / INTERVAL, (name, recent, new)


def test_token_is_required_beyond_loopback_and_nothing_changes_anything(stack, tmp_path):
    base = {**stack.stack.env, "DASHBOARD_DB": str(tmp_path / "other.db"),
            "DASHBOARD_TARGETS": stack.stack.dashboard_targets()}
    base.pop("DASHBOARD_TOKEN", None)
    refused = subprocess.run([ZAI_PROXY, "dashboard"], env={**base, "DASHBOARD_ADDRESS": "0.0.0.0"},
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "DASHBOARD_TOKEN" in refused.stderr
    port = free_port()
    token = "t-" + "x" * 30
    proc = subprocess.Popen([ZAI_PROXY, "dashboard"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**base, "DASHBOARD_ADDRESS": "0.0.0.0",
                                            "DASHBOARD_PORT": str(port), "DASHBOARD_TOKEN": token})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert get(f"{url}/health").json() == {"status": "ok"}
        for path in ("/api/status", "/api/series?name=rps.2xx", "/", "/health?detail=1"):
            assert get(f"{url}{path}").status_code == 401, path
            joiner = "&" if "?" in path else "?"
            assert get(f"{url}{path}{joiner}token=wrong").status_code == 401, path
        assert get(f"{url}/api/status", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        with httpx.Client(base_url=url, trust_env=False, timeout=10) as browser:
            first = browser.get("/", params={"token": token})
            assert first.status_code == 200 and first.headers["referrer-policy"] == "no-referrer"
            cookie = first.headers["set-cookie"].lower()
            assert "httponly" in cookie and "samesite=strict" in cookie and token not in cookie
            assert browser.get("/api/status").status_code == 200  # the cookie carries it
        for method in ("POST", "PUT", "DELETE"):
            resp = httpx.request(method, f"{url}/api/status", trust_env=False, timeout=10,
                                 headers={"Authorization": f"Bearer {token}"})
            assert resp.status_code == 405, method
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=10)
    assert token not in output  # nor in its logs
