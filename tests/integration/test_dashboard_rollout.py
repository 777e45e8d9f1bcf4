"""The dashboard shows the canary rollout (issue 15): `zai-proxy dashboard` against the real stack
(both variants behind Envoy, the emulator) with CANARY_STATE_FILE pointing at a file this test
writes with the rollout's own code (`extproc.canary.rollout` deciding, `statefile.StateFile`
writing, as `zai-proxy canary rollout` does). `/api/status` and the live stream carry it as
`rollout`; the page (Debian's chromium through Playwright) shows the step, the weight, the last
verdict with its reasons and per-check verdicts, the last decision and a live countdown to the
next decision, follows the file live (no reload) to a rollback and to no file at all, and a file
that is no rollout state is no rollout, never a crash.

With DASHBOARD_ROLLOUT_SCREENSHOT=<dir> the panel's screenshots are saved there."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import httpx2 as httpx
import pytest

from extproc.canary import rollout as ro
from extproc.canary.analysis import FAIL, INCONCLUSIVE, PASS, SKIP, CheckResult, Report
from extproc.canary.statefile import StateFile
from extproc.dashboard import rollout as dash_rollout
from harness import StackHandle, stack_env

INTERVAL = 1  # the dashboard's collection interval (seconds): how soon it sees the file change
LIVE_WITHIN = 10.0
STEPS = (5, 25, 50, 100)
PLAN = ro.Plan(steps=STEPS, interval=300.0, window=300.0, max_inconclusive=6)

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------- states, by the rollout's code

def check(name: str, verdict: str, reason: str) -> CheckResult:
    return CheckResult(name, verdict, reason)


def passing(at: float) -> Report:
    return Report(PASS, (
        check("errors", PASS, "0.4% (1 of 240) vs 0.5% (9 of 1800): p=0.71"),
        check("latency_p95", PASS, "1.2 s vs 1.1 s"),
        check("ttft_p95", SKIP, "no streams in either variant"),
        check("rejections", PASS, "0.0% vs 0.1%"),
    ), 300.0, at, 240, 1800)


def inconclusive(at: float) -> Report:
    return Report(INCONCLUSIVE, (
        check("errors", PASS, "0.6% (1 of 180) vs 0.5% (9 of 1700): p=0.58"),
        check("latency_p95", INCONCLUSIVE, "only 41 canary requests above 1 s of 180 observed; "
                                            "100 needed for a verdict"),
        check("ttft_p95", SKIP, "no streams in either variant"),
        check("rejections", INCONCLUSIVE, "the canary's share 7.2% is over production's 0.1% + 5 "
                                          "points, but not significantly yet (p=0.031)"),
    ), 300.0, at, 180, 1700)


def failing(at: float) -> Report:
    return Report(FAIL, (
        check("errors", FAIL, "the canary's 5xx share 14.5% (29 of 200) is above 10.0% and "
                              "production's 0.5% + 2 points: p<0.0001"),
        check("latency_p95", PASS, "1.3 s vs 1.1 s"),
        check("ttft_p95", SKIP, "no streams in either variant"),
        check("rejections", PASS, "0.0% vs 0.1%"),
    ), 300.0, at, 200, 1750)


def decide_and_apply(state: ro.State, report: Report | None, now: float) -> ro.State:
    decision = ro.decide(state, report, now)
    return ro.apply(ro.with_pending(state, decision, now), decision, report, now)


def running_state(now: float) -> ro.State:
    """Started 12 minutes ago: first step to 5%, a pass to 25%, then an inconclusive analysis
    holding at 25% (the next decision 200 s from now)."""
    t0 = now - 700
    state = ro.start(PLAN, "r-20261202T010000Z-3f9a", 0, t0, "alice@build-host", release="v2.4.0")
    state = decide_and_apply(state, None, t0)
    state = decide_and_apply(state, passing(t0 + 300), t0 + 300)
    state = decide_and_apply(state, inconclusive(now - 100), now - 100)
    assert (state.phase, state.weight, state.step, state.next_decision_at) == (ro.RUNNING, 25, 2, now + 200)
    return state


def rolled_back_state(state: ro.State, now: float) -> ro.State:
    state = decide_and_apply(state, failing(now), now)
    assert (state.phase, state.weight) == (ro.ROLLED_BACK, 0)
    return state


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def state_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("canary") / "state.json"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, state_file):
    run_dir = tmp_path_factory.mktemp("dashboard-rollout")
    env = stack_env(CANARY_WEIGHT="25", MAX_RETRIES="0", CANARY_STATE_FILE=str(state_file),
                    DASHBOARD_INTERVAL_SECONDS=str(INTERVAL), DASHBOARD_DB=str(run_dir / "dash.db"))
    handle = StackHandle(run_dir, env, variants=("production", "canary"), dashboard=True).start()
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is installed by scripts/setup --test")
    with sync_api.sync_playwright() as p:
        instance = p.chromium.launch(executable_path=chromium, headless=True)
        yield instance
        instance.close()


def get(url: str, **kw: Any) -> httpx.Response:
    return httpx.get(url, trust_env=False, timeout=10, **kw)


def status(stack: StackHandle) -> dict[str, Any]:
    resp = get(f"{stack.dashboard_url}/api/status")
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_for(check_: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check_()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what} (last: {last!r})")


def first_event(stack: StackHandle) -> tuple[str, dict[str, Any]]:
    """The live stream's first event (the snapshot)."""
    with httpx.stream("GET", f"{stack.dashboard_url}/api/events", trust_env=False, timeout=10) as resp:
        event, data = "", ""
        for line in resp.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif not line and data:
                return event, json.loads(data)
    raise AssertionError("the stream ended without an event")


def screenshot(page: Any, name: str) -> None:
    where = os.environ.get("DASHBOARD_ROLLOUT_SCREENSHOT")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        page.locator('[data-testid="rollout"]').screenshot(path=str(Path(where) / f"{name}.png"))
        page.screenshot(path=str(Path(where) / f"{name}-page.png"))
        page.click('[data-testid="theme-toggle"]')
        page.locator('[data-testid="rollout"]').screenshot(path=str(Path(where) / f"{name}-light.png"))
        page.click('[data-testid="theme-toggle"]')


# --------------------------------------------------------------------------------------- tests

def test_the_api_and_the_page_follow_the_rollout_live(stack, browser, state_file):
    files = StateFile(state_file)
    now = time.time()
    state = running_state(now)
    files.save(state)
    doc = json.loads(state_file.read_text())
    next_at = doc["next_decision_ts"]

    # /api/status: the state file, as the dashboard's `rollout`
    rollout = wait_for(lambda: status(stack)["rollout"], LIVE_WITHIN, "/api/status carries the rollout")
    last_verdict, last_decision = doc["last_verdict"], doc["last_decision"]
    assert rollout == {
        "id": "r-20261202T010000Z-3f9a", "release": "v2.4.0", "phase": "running",
        "weight": 25, "step": 2, "steps": list(STEPS), "next_weight": 50,
        "next_decision_at": pytest.approx(next_at), "interval_seconds": 300.0,
        "max_inconclusive": 6, "inconclusive_in_a_row": 1,
        "started_at": pytest.approx(now - 700), "started_by": "alice@build-host",
        "updated_at": pytest.approx(now - 100),
        "last_verdict": {"verdict": "inconclusive", "at": float(int(now - 100)), "window_seconds": 300.0,
                         "reasons": last_verdict["reasons"], "checks": last_verdict["checks"]},
        "last_decision": {"action": "hold", "from": 25, "to": 25, "reason": last_decision["reason"],
                          "verdict": "inconclusive", "change": None, "at": float(int(now - 100))},
        "pending": None, "reason": doc["reason"],
    }
    assert [r.split(":")[0] for r in rollout["last_verdict"]["reasons"]] == ["latency_p95", "rejections"]
    assert rollout["last_verdict"]["checks"] == {"errors": "pass", "latency_p95": "inconclusive",
                                                 "ttft_p95": "skip", "rejections": "inconclusive"}
    # ... and the live stream's snapshot carries the same
    event, snapshot = first_event(stack)
    assert event == "snapshot" and snapshot["rollout"]["phase"] == "running"
    assert snapshot["rollout"]["last_verdict"] == rollout["last_verdict"]

    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    console: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: m.type in ("error", "warning") and console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    try:
        page.goto(f"{stack.dashboard_url}/")
        page.wait_for_selector("body[data-ready]", timeout=15000)
        panel = page.locator('[data-testid="rollout"]')
        page.wait_for_selector('[data-testid="rollout"][data-phase="running"]', timeout=15000)
        assert panel.is_visible()
        # near the variants and weights: right under the header, above the panels
        header_box = page.locator("header.top").bounding_box()
        panel_box = panel.bounding_box()
        assert panel_box["y"] >= header_box["y"] + header_box["height"] - 1
        assert panel_box["y"] < page.locator("main.grid").bounding_box()["y"]

        def attr(testid: str, name: str = "data-value") -> str | None:
            return page.get_attribute(f'[data-testid="{testid}"]', name, timeout=2000)

        def text(testid: str) -> str:
            return " ".join(page.inner_text(f'[data-testid="{testid}"]', timeout=2000).split())

        assert attr("rollout-phase") == "running" and text("rollout-phase").lower() == "running"
        assert text("rollout-step") == "step 2 of 4"
        assert (attr("rollout-step"), attr("rollout-step", "data-steps")) == ("2", "4")
        assert attr("rollout-weight") == "25" and text("rollout-weight") == "25%"
        assert attr("rollout-next-weight") == "50"
        track = page.eval_on_selector_all('[data-testid="rollout-steps"] .ro-step',
                                          "els => els.map(e => [e.dataset.weight, e.dataset.state])")
        assert track == [["5", "done"], ["25", "current"], ["50", "next"], ["100", "next"]]
        # a live countdown to the next decision
        assert float(attr("rollout-next-decision")) == pytest.approx(next_at)
        first = text("rollout-next-decision")
        assert re.fullmatch(r"in [23]m \d\ds", first), first
        wait_for(lambda: text("rollout-next-decision") != first, 3, "the countdown ticks")
        # the last verdict, its per-check verdicts, and its reasons (inconclusive: prominent)
        assert attr("rollout-verdict") == "inconclusive"
        checks = page.eval_on_selector_all('[data-testid="rollout-check"]',
                                           "els => els.map(e => [e.dataset.check, e.dataset.value])")
        assert checks == [["errors", "pass"], ["latency_p95", "inconclusive"], ["ttft_p95", "skip"],
                          ["rejections", "inconclusive"]]
        reasons = page.locator('[data-testid="rollout-reason"]')
        assert reasons.all_inner_texts() == last_verdict["reasons"]
        assert page.locator(".ro-reasons.bad").count() == 1
        assert reasons.first.evaluate("e => getComputedStyle(e).fontWeight") in ("600", "700")
        # the last decision
        assert attr("rollout-decision") == "hold" and text("rollout-decision") == "hold at 25%"
        # its reason, less the analysis' reasons listed just above (whole in data-value)
        assert attr("rollout-decision-reason") == last_decision["reason"]
        assert text("rollout-decision-reason") == ("inconclusive (1 of 6 allowed in a row), holding at "
                                                   "25% and analysing again in 5m (reasons above)")
        assert text("rollout-id") == "r-20261202T010000Z-3f9a · release v2.4.0"
        assert "by alice@build-host" in attr("rollout-id", "title")
        screenshot(page, "rollout-running")

        # The rollout rolls back: the page follows without a reload.
        page.evaluate("window.__sameLoad = 1")
        state = rolled_back_state(state, time.time())
        files.save(state)
        page.wait_for_selector('[data-testid="rollout"][data-phase="rolled_back"]', timeout=LIVE_WITHIN * 1000)
        assert page.evaluate("window.__sameLoad") == 1
        assert text("rollout-phase").lower() == "rolled back"
        assert text("rollout-step") == "step 0 of 4" and text("rollout-weight") == "0%"
        assert page.locator('[data-testid="rollout-next-decision"]').count() == 0
        assert page.locator('[data-testid="rollout-finished"]').count() == 1
        assert attr("rollout-verdict") == "fail"
        failed = page.locator('[data-testid="rollout-reason"]')
        assert failed.count() == 1 and failed.first.get_attribute("data-verdict") == "fail"
        assert failed.first.inner_text().startswith("errors: the canary's 5xx share 14.5%")
        assert page.get_attribute('[data-testid="rollout-check"][data-check="errors"]', "data-value") == "fail"
        assert attr("rollout-decision") == "rollback" and text("rollout-decision") == "rollback 25% → 0%"
        assert text("rollout-decision-reason") == "analysis failed at 25% (reasons above)"
        assert attr("rollout-decision-reason").startswith("analysis failed at 25%: errors: the canary's")
        api = status(stack)["rollout"]
        assert (api["phase"], api["weight"], api["step"], api["next_decision_at"]) == ("rolled_back", 0, 0, None)
        screenshot(page, "rollout-rolled-back")

        # No file: no rollout.
        state_file.unlink()
        page.wait_for_selector('[data-testid="rollout"][data-phase="none"]', timeout=LIVE_WITHIN * 1000)
        assert page.evaluate("window.__sameLoad") == 1
        assert text("rollout-none").startswith("no rollout")
        screenshot(page, "rollout-none")
        assert status(stack)["rollout"] is None

        # A file that is no rollout state: no rollout, said in `errors`; the dashboard carries on.
        state_file.write_text('{"schema": 1, "phase": "running", "weight": ')
        doc = wait_for(lambda: (d := status(stack))["errors"].get(str(state_file)) and d, LIVE_WITHIN,
                       "the bad state file is reported")
        assert doc["rollout"] is None and "not valid JSON" in doc["errors"][str(state_file)]
        state_file.write_text(json.dumps([1, 2, 3]))
        wait_for(lambda: "not a rollout state" in status(stack)["errors"].get(str(state_file), ""),
                 LIVE_WITHIN, "a JSON file that is no rollout state is reported")
        time.sleep(2 * INTERVAL)
        assert page.get_attribute('[data-testid="rollout"]', "data-phase") == "none"
        assert get(f"{stack.dashboard_url}/health").json() == {"status": "ok"}
        # and a good file again shows again
        files.save(running_state(time.time()))
        page.wait_for_selector('[data-testid="rollout"][data-phase="running"]', timeout=LIVE_WITHIN * 1000)
        assert str(state_file) not in status(stack)["errors"]
        assert console == [], console
        base = stack.dashboard_url
        assert all(u.startswith(base) or u.startswith("data:") for u in requests), requests
    finally:
        context.close()
        state_file.unlink(missing_ok=True)


# ------------------------------------------------------------- the reader, on files of every kind

@pytest.mark.parametrize("content, error", [
    ("", None),  # being created
    ("{", "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "not valid JSON"),
    ("[]", "holds list, not a rollout state"),
    ('"state"', "holds str"),
    ('{"schema": 2, "phase": "running"}', "schema 2"),
    ('{"schema": 1, "phase": "sleeping"}', "phase 'sleeping'"),
    ('{"schema": 1}', "phase None"),
])
def test_a_file_that_is_no_rollout_state_is_no_rollout(tmp_path, content, error):
    path = tmp_path / "state.json"
    path.write_text(content)
    reading = dash_rollout.read(path)
    assert reading.rollout is None
    if error is None:
        assert reading.error is None
    else:
        assert error in (reading.error or ""), reading.error


def test_missing_directory_and_oversized_files(tmp_path):
    assert dash_rollout.read(tmp_path / "absent.json") == dash_rollout.Reading(None)
    assert "directory" in (dash_rollout.read(tmp_path).error or "")
    big = tmp_path / "big.json"
    big.write_text(" " * (dash_rollout.MAX_BYTES + 10) + "{}")
    assert "over" in (dash_rollout.read(big).error or "")


def test_fields_of_the_wrong_type_are_left_out_never_a_crash(tmp_path):
    doc = {"schema": 1, "phase": "running", "rollout": 7, "weight": "25", "step": True,
           "steps": [5, "x", 50.0, None, 100], "next_weight": [],
           "next_decision_ts": "2026-12-02T10:25:00Z", "plan": "no", "ts": [1],
           "last_verdict": {"verdict": "fail", "at": "yesterday", "reasons": ["a", 3, None, "b"],
                            "checks": {"errors": "fail", "latency_p95": 2}},
           "last_decision": ["step"], "pending": {"from": "5", "to": 25, "at": 1.5e9}, "reason": None}
    path = tmp_path / "state.json"
    path.write_text(json.dumps(doc))
    r = dash_rollout.read(path).rollout
    assert r is not None
    assert (r["id"], r["weight"], r["step"], r["steps"], r["next_weight"]) == (None, None, None, [5, 50, 100], None)
    assert r["next_decision_at"] == 1796207100.0  # the ISO form when there is no number
    assert r["last_verdict"] == {"verdict": "fail", "at": None, "window_seconds": None,
                                 "reasons": ["a", "b"], "checks": {"errors": "fail"}}
    assert r["last_decision"] is None
    assert r["pending"]["from"] is None and r["pending"]["to"] == 25 and r["pending"]["at"] == 1.5e9
    assert r["reason"] == "" and r["interval_seconds"] is None
    path.write_text('{"schema": 1, "phase": "complete", "weight": NaN, "next_decision_ts": 5}')
    r = dash_rollout.read(path).rollout
    assert r["weight"] is None and r["next_decision_at"] is None  # finished: no next decision
