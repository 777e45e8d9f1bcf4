"""The dashboard's web page in a real browser (Debian's chromium, headless, driven by Playwright)
against the real stack: Envoy, two ext_procs per variant, the emulator, and `zai-proxy dashboard`
scraping them. Traffic goes through the gateway with the official `anthropic` SDK; the page
must show it live (no reload), split by variant, with the same numbers as the ext_procs' own
/metrics.

Every number on the page sits in an element with a stable `data-testid` (or, in the workers'
table, `data-worker` / `data-variant` rows and `data-col` cells) and its raw value in `data-value`.
With DASHBOARD_SCREENSHOT=<path> the screenshot under traffic is also saved there
(docs/dashboard.png is made so)."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import anthropic
import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import StackHandle, free_port, stack_env
from redis_server import redis_server  # noqa: F401 (fixture)

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is installed by scripts/setup --test")

TOKEN = "dashboard-token-for-tests"
WORKERS = {"alice": "sk-worker-alice-0001", "bob": "sk-worker-bob-0002",
           "carol": "sk-worker-carol-0003", "dave": "sk-worker-dave-0004"}
LIVE_WITHIN = 10.0  # seconds from the last response to the page showing it
PANELS = ("requests", "latency", "tokens", "cost", "limiter", "quota", "workers")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_server):  # noqa: F811
    """Two ext_procs per variant sharing limits and request records through Redis, as deployed."""
    run_dir = tmp_path_factory.mktemp("dashboard")
    keys = run_dir / "worker-keys"
    keys.write_text("".join(f"{name} {key}\n" for name, key in WORKERS.items()))
    env = stack_env(REDIS_URL=redis_server.url, WORKER_KEYS_FILE=str(keys), CANARY_WEIGHT="50",
                    QUOTA_POLL_SECONDS="2",
                    MAX_RETRIES="0", DASHBOARD_PORT=str(free_port()), DASHBOARD_TOKEN=TOKEN,
                    DASHBOARD_DB=str(run_dir / "dashboard.sqlite3"))
    handle = StackHandle(run_dir / "stack", env, variants=("production", "canary"), replicas=2,
                         dashboard=True).start()
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield instance
        instance.close()


class Page:
    """One browser tab on the dashboard, with what it logged and requested."""

    def __init__(self, browser, stack: StackHandle, query: str = ""):
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.requests: list[Any] = []
        self.page.on("console", lambda m: m.type in ("error", "warning")
                     and self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.on("requestfailed", lambda r: self.console.append(f"failed: {r.url} {r.failure}"))
        self.page.on("request", lambda r: self.requests.append(r))
        self.base = stack.dashboard_url
        self.page.goto(f"{self.base}/?token={TOKEN}{'&' + query if query else ''}")
        self.page.wait_for_selector("body[data-ready]", timeout=15000)
        self.page.wait_for_selector('[data-testid="live"][data-state="live"]', timeout=15000)

    def close(self) -> None:
        self.context.close()

    def value(self, testid: str) -> float | None:
        raw = self.page.get_attribute(f'[data-testid="{testid}"]', "data-value", timeout=2000)
        return float(raw) if raw not in (None, "") else None

    def has(self, testid: str) -> bool:
        return self.page.locator(f'[data-testid="{testid}"]').count() > 0

    def workers(self) -> dict[tuple[str, str], dict[str, float | None]]:
        rows = self.page.evaluate("""() => [...document.querySelectorAll('[data-testid="worker-row"]')]
            .map(r => [r.dataset.worker, r.dataset.variant, Object.fromEntries(
                [...r.querySelectorAll('td[data-col]')].map(td => [td.dataset.col, td.dataset.value]))])""")
        return {(w, v): {k: (float(x) if x not in (None, "") else None) for k, x in cols.items()}
                for w, v, cols in rows}

    def show(self, variant: str) -> None:
        self.page.click(f'[data-testid="variant-{variant}"]')
        self.page.wait_for_selector(f'[data-testid="variant-{variant}"][aria-pressed="true"]')


@pytest.fixture
def page(browser, stack):
    opened: list[Page] = []

    def open_page(query: str = "") -> Page:
        opened.append(Page(browser, stack, query))
        return opened[-1]

    yield open_page
    for p in opened:
        p.close()


def client(stack: StackHandle, worker: str, prefix: str = "") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{stack.url}{prefix}/api/anthropic", api_key=WORKERS[worker],
                               max_retries=0, http_client=httpx.Client(trust_env=False, timeout=60))


def ask(stack: StackHandle, worker: str, prefix: str = "", stream: bool = True,
        options: dict | None = None) -> None:
    headers = {"x-emulator-options": json.dumps(options)} if options else None
    c = client(stack, worker, prefix)
    request = {"model": "glm-4.7", "max_tokens": 64, "extra_headers": headers,
               "messages": [{"role": "user", "content": f"hello from {worker}"}]}
    if stream:
        with c.messages.stream(**request) as s:
            s.until_done()
    else:
        c.messages.create(**request)


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout} s: {what} (last: {last!r})")


def scrape(stack: StackHandle) -> dict[str, Any]:
    """Every ext_proc's /metrics, added up the way the page must show them."""
    workers: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    requests: dict[str, float] = defaultdict(float)
    limits: dict[str, list[float]] = defaultdict(list)
    shared: dict[str, bool] = {}
    in_flight: dict[str, float] = defaultdict(float)
    quota: dict[str, float] = {}
    for url in stack.admin_urls():
        text = httpx.get(f"{url}/metrics", trust_env=False, timeout=10).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                variant = s.labels.get("deployment_variant")
                if s.name == "zai_proxy_worker_requests_total":
                    workers[s.labels["worker"], variant]["requests"] += s.value
                elif s.name == "zai_proxy_worker_tokens_total":
                    workers[s.labels["worker"], variant][s.labels["direction"]] += s.value
                elif s.name == "zai_proxy_worker_estimated_cost_usd_total":
                    workers[s.labels["worker"], variant]["cost_usd"] += s.value
                elif s.name == "zai_proxy_requests_total":
                    requests[variant] += s.value
                elif s.name == "zai_proxy_rate_limit_concurrency_limit":
                    limits[variant].append(s.value)
                elif s.name == "zai_proxy_rate_limit_shared_state":
                    shared[variant] = shared.get(variant, True) and s.value == 1
                elif s.name == "zai_proxy_rate_limit_in_flight":
                    in_flight[variant] += s.value
                elif s.name == "zai_proxy_quota_used_ratio_estimate" and s.labels["window"] in ("5h", "weekly"):
                    quota[s.labels["window"]] = max(quota.get(s.labels["window"], 0.0), s.value)
    # One learned limit shared through Redis (every replica reports it), else one per replica.
    return {"workers": {k: dict(v) for k, v in workers.items()}, "requests": dict(requests),
            "limits": {v: max(ls) if shared.get(v) else sum(ls) for v, ls in limits.items()},
            "shared": shared, "in_flight": dict(in_flight), "quota": quota}


# ------------------------------------------------------------------------------------------

def test_page_loads_clean_from_the_dashboard_alone(page, stack):
    """No console errors, every panel there, live, and nothing fetched from anywhere else; the
    token from the address bar goes to every API call and to the event stream."""
    p = page()
    for name in PANELS:
        assert p.page.locator(f'[data-panel="{name}"]').is_visible(), name
    assert p.page.locator(".chart canvas").count() == 6
    for variant in ("production", "canary", "both"):
        assert p.has(f"variant-{variant}"), variant
    assert p.page.get_attribute('[data-testid="variant-both"]', "aria-pressed") == "true"
    # The split as Envoy's routes file has it (read at the dashboard's next collection).
    wait_for(lambda: p.has("weight-canary"), LIVE_WITHIN, "the weights")
    assert p.value("weight-canary") == 50 and p.value("weight-production") == 50
    assert p.page.get_attribute('[data-testid="source"]', "data-value") == "extproc"
    # The quota report arrives through the ext_procs' poll of the emulator.
    wait_for(lambda: p.value("quota-5h-used") is not None, 15, "the 5-hour window's use")
    assert p.page.get_attribute('[data-testid="quota-level"]', "data-value") == "lite"
    reset = p.value("quota-5h-reset")
    assert reset is not None and reset > time.time()
    assert p.page.text_content('[data-testid="quota-5h-reset"]') not in ("", "–")
    p.page.wait_for_timeout(1000)
    assert p.console == [], p.console
    assert all(r.url.startswith(p.base) for r in p.requests), [r.url for r in p.requests]
    api = [r for r in p.requests if "/api/" in r.url]
    assert {r.url.split("?")[0].rsplit("/", 1)[1] for r in api} >= {"status", "series", "events"}
    for r in api:
        if "/api/events" in r.url:
            assert f"token={TOKEN}" in r.url, r.url
        else:
            assert r.headers.get("authorization") == f"Bearer {TOKEN}", r.url


def test_canary_only_traffic_shows_under_canary(page, stack):
    """Only `/canary/...` paths: the canary view has the requests, the production view none."""
    p = page("range=15m")
    p.show("canary")
    assert not p.has("rps-total-production")
    ask(stack, "carol", "/canary")
    ask(stack, "carol", "/canary", stream=False)
    ask(stack, "carol", "/canary")
    sent = time.monotonic()
    rows = wait_for(lambda: (r := p.workers()).get(("carol", "canary"), {}).get("requests") == 3 and r,
                    LIVE_WITHIN, "carol's three canary requests in the workers' table")
    assert time.monotonic() - sent <= LIVE_WITHIN
    assert set(rows) == {("carol", "canary")}, rows
    assert rows["carol", "canary"]["output"] > 0 and rows["carol", "canary"]["input"] > 0
    wait_for(lambda: (p.value("rps-total-canary") or 0) > 0, LIVE_WITHIN, "canary requests per second")
    assert p.value("tokens-output-canary") > 0
    p.show("production")
    assert p.workers() == {}, "the production view lists canary traffic"
    assert p.value("rps-total-production") == 0
    assert p.value("tokens-output-production") == 0
    assert not p.has("rps-total-canary")
    p.show("both")
    assert set(p.workers()) == {("carol", "canary")}
    assert p.value("rps-total-production") == 0 and p.value("rps-total-canary") > 0
    assert p.page.get_attribute('[data-testid="canary-verdict"]', "data-state") in ("ok", "worse")
    assert p.console == [], p.console


def test_traffic_shows_live_without_reload(page, stack):
    p = page("range=15m")
    p.page.evaluate("window.__sameDocument = true")
    before = p.workers()
    for i in range(3):
        ask(stack, "alice", stream=i % 2 == 0)
    for i in range(2):
        ask(stack, "bob", stream=True)
    sent = time.monotonic()

    def shown() -> bool:
        rows = p.workers()
        per = defaultdict(float)
        for (worker, _), cols in rows.items():
            per[worker] += cols["requests"] - before.get((worker, _), {}).get("requests", 0)
        return per["alice"] == 3 and per["bob"] == 2

    wait_for(shown, LIVE_WITHIN, "alice's and bob's requests in the workers' table")
    wait_for(lambda: sum(p.value(f"rps-total-{v}") or 0 for v in ("production", "canary")) > 0,
             LIVE_WITHIN - (time.monotonic() - sent), "requests per second")
    assert sum(p.value(f"tokens-output-{v}") or 0 for v in ("production", "canary")) > 0
    assert sum(p.value(f"tokens-input-{v}") or 0 for v in ("production", "canary")) > 0
    assert p.page.locator('[data-testid="model-row"][data-model="glm-4.7"]').count() >= 1
    assert p.page.evaluate("window.__sameDocument") is True, "the page was reloaded"
    # The charts got points for the traffic (the series API, refetched as updates arrive).
    wait_for(lambda: int(p.page.get_attribute('[data-chart="requests"]', "data-points") or 0) > 0,
             LIVE_WITHIN, "points in the requests chart")
    assert p.console == [], p.console


def test_numbers_equal_the_ext_procs_metrics(page, stack):
    for worker, prefix in (("alice", ""), ("dave", "/production"), ("dave", "/canary")):
        ask(stack, worker, prefix)
    stack.settle()
    truth = scrape(stack)
    assert truth["requests"].get("production", 0) > 0 and truth["requests"].get("canary", 0) > 0
    assert truth["shared"] == {"production": True, "canary": True}, truth["shared"]
    p = page("range=1h")

    def same() -> bool:
        rows = p.workers()
        assert set(rows) == set(truth["workers"]), (set(rows), set(truth["workers"]))
        for key, metrics in truth["workers"].items():
            cols = rows[key]
            for name in ("requests", "input", "output", "cache_read", "cache_write"):
                assert cols[name] == metrics.get(name, 0), (key, name, cols[name], metrics.get(name))
            assert math.isclose(cols["cost_usd"], metrics.get("cost_usd", 0), rel_tol=1e-4,
                                abs_tol=1e-6), (key, cols["cost_usd"], metrics.get("cost_usd"))
        return True

    wait_for(same, LIVE_WITHIN, "the workers' table equal to the ext_procs' worker series")
    rows = p.workers()
    # Every request has a named worker here, so the workers' rows add up to each variant's total.
    for variant, total in truth["requests"].items():
        assert sum(c["requests"] for (_, v), c in rows.items() if v == variant) == total, variant
    footer = p.page.locator('[data-testid="workers-total"] td[data-col="requests"]')
    assert float(footer.get_attribute("data-value")) == sum(truth["requests"].values())
    for variant in ("production", "canary"):
        assert p.value(f"limit-{variant}") == truth["limits"][variant], variant
        assert p.value(f"in-flight-{variant}") == truth["in_flight"][variant] == 0, variant
    for window in ("5h", "weekly"):
        assert math.isclose(p.value(f"quota-{window}-used"), truth["quota"][window], abs_tol=1e-6)
    # Sorting by a column orders the rows by it.
    p.page.click('table.workers th[data-key="output"]')
    outputs = p.page.eval_on_selector_all('[data-testid="worker-row"] td[data-col="output"]',
                                          "tds => tds.map(td => Number(td.dataset.value))")
    assert outputs == sorted(outputs, reverse=True), outputs
    p.page.click('table.workers th[data-key="output"]')
    outputs = p.page.eval_on_selector_all('[data-testid="worker-row"] td[data-col="output"]',
                                          "tds => tds.map(td => Number(td.dataset.value))")
    assert outputs == sorted(outputs), outputs
    assert p.console == [], p.console


def test_screenshot_under_traffic_is_readable(page, stack, tmp_path):
    """Steady traffic on both variants (the canary slower and failing now and then), the page at
    a laptop's size: no number cut off, no panel over another; the screenshot is kept."""
    stop = threading.Event()
    # Agent-like requests: a large cached prompt, paced like a real model.
    paced = {"first_event_delay": 0.4, "event_interval": 0.05, "input_tokens": 1200,
             "cache_read_tokens": 30000, "cache_write_tokens": 800}
    stack.emulator("POST", "/_emulator/quota", json={"window": "5h", "used_percent": 35})
    stack.emulator("POST", "/_emulator/quota", json={"window": "weekly", "used_percent": 12})

    def run(worker: str, prefix: str, options: dict, every: float) -> None:
        while not stop.is_set():
            try:
                ask(stack, worker, prefix, options=options)
            except anthropic.APIError:
                pass  # the canary's failures are part of the picture
            stop.wait(every)

    loads = [("alice", "/production", paced, 0.2), ("bob", "/production", paced, 0.5),
             ("dave", "/production", paced, 0.8),
             ("carol", "/canary", {**paced, "first_event_delay": 0.9}, 0.6),
             ("bob", "/canary", {**paced, "error_after_events": 1}, 2.5)]
    threads = [threading.Thread(target=run, args=load, daemon=True) for load in loads]
    for t in threads:
        t.start()
    try:
        time.sleep(20)
        p = page("range=15m")
        p.page.wait_for_timeout(6000)  # an update or two, with the traffic still on
        shot = tmp_path / "dashboard.png"
        p.page.screenshot(path=str(shot), full_page=True)
        clipped = p.page.evaluate("""() => [...document.querySelectorAll('.stat .num, .lbar-text, .window-head .pct')]
            .filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.dataset.testid || e.textContent)""")
        assert clipped == [], f"numbers cut off: {clipped}"
        boxes = p.page.evaluate("""() => [...document.querySelectorAll('.card')].map(c => {
            const r = c.getBoundingClientRect(); return [c.dataset.panel, r.left, r.top, r.right, r.bottom]; })""")
        for i, (a, *ra) in enumerate(boxes):
            for b, *rb in boxes[i + 1:]:
                overlap = min(ra[2], rb[2]) - max(ra[0], rb[0]) > 1 and min(ra[3], rb[3]) - max(ra[1], rb[1]) > 1
                assert not overlap, f"panels {a} and {b} overlap"
        assert (p.value("rps-total-production") or 0) > 0 and (p.value("rps-total-canary") or 0) > 0
        assert shot.stat().st_size > 50_000
        if os.environ.get("DASHBOARD_SCREENSHOT"):
            shutil.copyfile(shot, Path(os.environ["DASHBOARD_SCREENSHOT"]))
        assert p.console == [], p.console
    finally:
        stop.set()
        for t in threads:
            t.join(30)
