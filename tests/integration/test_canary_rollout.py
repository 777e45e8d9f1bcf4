"""`zai-proxy canary` end to end: real Envoy, both ext_procs, the emulator, a real Prometheus
scraping both variants every second, and the rollout on a compressed schedule (seconds).

- a healthy canary goes 5 -> 25 -> 50 -> 100 by itself; killed (SIGKILL) between steps and started
  again, it continues from the recorded step; the audit holds one entry per weight change;
- a canary whose upstream answers 20% 5xx (the emulator's `server_error_percent`, sent only on the
  canary's routes by a `request_headers_to_add` in the routes file) is rolled back to 0 within one
  interval of its first step, and no request is dropped while the weights change;
- with no traffic the canary stays inconclusive and is not promoted.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx2 as httpx
import pytest
import yaml

from harness import StackHandle, free_port, stack_env
from prometheus_server import Prometheus, needs_prometheus

ZAI_PROXY = str(Path(sys.executable).with_name("zai-proxy"))
INTERVAL = 4.0  # seconds at each step (the compressed schedule)
THRESHOLDS = {"min_requests": 15, "checks": {"ttft_p95": {"min_requests": 8}}}
ASK = {"model": "glm-4.7", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
FAULTY = {"key": "x-emulator-options", "value": json.dumps({"server_error_percent": 20})}

pytestmark = needs_prometheus


class Traffic:
    """Workers on the split: every request a new credential (so the sticky split is the weight),
    half of them streamed. Records every answer; a request that gets none is a dropped request."""

    def __init__(self, url: str, threads: int = 6) -> None:
        self.url = url
        self.statuses: Counter[int] = Counter()
        self.dropped: list[str] = []
        self.bodies_5xx: list[str] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(threads)]

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _worker(self) -> None:
        with httpx.Client(trust_env=False, timeout=30) as client:
            while not self._stop.is_set():
                i = next(self._ids)
                body = {**ASK, "stream": i % 2 == 0}
                try:
                    with client.stream("POST", f"{self.url}/v1/messages", json=body,
                                       headers={"x-api-key": f"worker-{i}",
                                                "anthropic-version": "2023-06-01"}) as resp:
                        text = resp.read().decode()
                        status = resp.status_code
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.dropped.append(repr(exc))
                    continue
                with self._lock:
                    self.statuses[status] += 1
                    if status >= 500:
                        self.bodies_5xx.append(text)

    def total(self) -> int:
        with self._lock:
            return sum(self.statuses.values()) + len(self.dropped)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    root = tmp_path_factory.mktemp("canary-rollout")
    env = stack_env(MAX_RETRIES="0", CANARY_WEIGHT="0", RATE_LIMIT_INITIAL="20",
                    START_RATE_INITIAL="6000", QUOTA_POLL_SECONDS="0", LOG_LEVEL="WARNING")
    stack = StackHandle(root / "stack", env, variants=("production", "canary")).start()
    prometheus = Prometheus(root, [f"127.0.0.1:{env['EXTPROC_ADMIN_PORT']}",
                                   f"127.0.0.1:{env['CANARY_EXTPROC_ADMIN_PORT']}"])
    try:
        prometheus.start()
        thresholds = root / "thresholds.yaml"
        thresholds.write_text(yaml.safe_dump(THRESHOLDS))
        yield {"stack": stack, "prometheus": prometheus, "root": root, "thresholds": thresholds}
    finally:
        prometheus.stop()
        stack.stop()


def run_env(rig, name: str) -> dict[str, str]:
    directory = rig["root"] / name
    directory.mkdir(exist_ok=True)
    return {**os.environ, **rig["stack"].stack.env,
            "PROMETHEUS_URL": rig["prometheus"].url,
            "CANARY_THRESHOLDS_FILE": str(rig["thresholds"]),
            "CANARY_STATE_FILE": str(directory / "state.json"),
            "CANARY_AUDIT_FILE": str(directory / "audit.jsonl")}


def rollout(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([ZAI_PROXY, "canary", "rollout", "--steps", "5,25,50,100",
                             "--interval", f"{INTERVAL:g}s", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 60) -> tuple[int, list[dict], str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"the rollout did not finish in {timeout} s:\n{out}\n{err}")
    return process.returncode, [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


def audit(env: dict[str, str]) -> list[dict]:
    path = Path(env["CANARY_AUDIT_FILE"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def state(env: dict[str, str]) -> dict:
    try:
        return json.loads(Path(env["CANARY_STATE_FILE"]).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def weights_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ZAI_PROXY, "weights", *args], env=env, capture_output=True, text=True,
                          timeout=30)


def canary_split(rig, faulty: bool) -> None:
    """The split's canary entries send the emulator a per-request option (or none)."""
    routes = Path(rig["stack"].stack.env["ENVOY_ROUTES_DIR"]) / "routes.yaml"
    doc = yaml.safe_load(routes.read_text())
    for vhost in doc["resources"][0]["virtual_hosts"]:
        for route in vhost["routes"]:
            for cluster in route.get("route", {}).get("weighted_clusters", {}).get("clusters", []):
                if cluster["name"].endswith("_canary"):
                    cluster.pop("request_headers_to_add", None)
                    if faulty:
                        cluster["request_headers_to_add"] = [
                            {"header": FAULTY, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
    doc["version_info"] = f"{time.time():.3f} test: canary {'faulty' if faulty else 'healthy'}"
    tmp = routes.with_name(".routes.test.tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, routes)


def variant_5xx(rig, variant: str) -> float:
    text = httpx.get(f"{rig['stack'].url}/{variant}/metrics", trust_env=False, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("zai_proxy_requests_total{") and 'status="5' in line)


@pytest.mark.timeout(150)
def test_healthy_canary_is_promoted_step_by_step_and_resumes_after_a_kill(rig):
    env = run_env(rig, "healthy")
    metrics_port = free_port()
    with Traffic(rig["stack"].url) as traffic:
        first = rollout(env, "--metrics-port", str(metrics_port))
        deadline = time.monotonic() + 40
        while not (state(env).get("weight") == 25 and state(env).get("pending") is None):
            assert first.poll() is None, finish(first)
            assert time.monotonic() < deadline, state(env)
            time.sleep(0.1)
        series = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", trust_env=False).text
        assert "zai_proxy_canary_step 2.0" in series
        assert 'zai_proxy_canary_verdicts_total{check="overall",verdict="pass"} 1.0' in series
        first.send_signal(signal.SIGKILL)  # between steps: at 25%, waiting for its next analysis
        first.wait(10)
        assert weights_cli(env, "show").stdout.count("canary 25%") == 1
        killed_at = state(env)

        again = rollout(env)
        code, lines, err = finish(again)
        assert code == 0, (lines, err)
    assert traffic.dropped == [] and set(traffic.statuses) == {200}, (traffic.statuses, traffic.dropped)
    assert traffic.total() > 200

    # Resumed, not restarted: the same rollout, from the recorded step.
    assert lines[0]["event"] == "rollout resumed" and lines[0]["weight"] == 25
    assert lines[0]["rollout"] == killed_at["rollout"]
    decisions = [line for line in lines if line["event"] == "canary decision"]
    assert [(d["from"], d["to"], d["verdict"]) for d in decisions] == [(25, 50, "pass"), (50, 100, "pass")]
    entries = audit(env)
    assert [(e["from"], e["to"]) for e in entries] == [(0, 5), (5, 25), (25, 50), (50, 100)]
    assert len({e["change"] for e in entries}) == 4 and {e["rollout"] for e in entries} == {killed_at["rollout"]}
    assert all(e["reason"] and e["who"] and e["envoy"] == "Envoy: serving these routes" for e in entries)
    assert entries[0]["verdict"] is None and all(e["verdict"] == "pass" for e in entries[1:])
    final = state(env)
    assert final["phase"] == "complete" and final["weight"] == 100 and final["step"] == 4
    shown = weights_cli(env, "show")
    assert "canary 100%" in shown.stdout and "Envoy: serving these routes" in shown.stdout
    assert f"canary rollout {killed_at['rollout']}: complete" in shown.stdout


@pytest.mark.timeout(120)
def test_canary_with_5xx_is_rolled_back_within_one_interval_dropping_nothing(rig):
    env = run_env(rig, "faulty")
    assert weights_cli(env, "fallback").returncode == 0
    canary_split(rig, faulty=True)
    production_5xx = variant_5xx(rig, "production")
    try:
        with Traffic(rig["stack"].url) as traffic:
            code, lines, err = finish(rollout(env))
            # The analysis on its own says the same, with its exit code (a window from the 5% step).
            stepped = audit(env)[0]["ts"]
            window = f"{time.time() - stepped + 1.5:.0f}s"
            analyzed = subprocess.run([ZAI_PROXY, "canary", "analyze", "--window", window, "--json"],
                                      env=env, capture_output=True, text=True, timeout=30)
            time.sleep(1.0)  # requests after the rollback: production only
    finally:
        canary_split(rig, faulty=False)
    assert code == 1, (lines, err)
    entries = audit(env)
    assert [(e["from"], e["to"], e["action"]) for e in entries] == [(0, 5, "step"), (5, 0, "rollback")]
    back = entries[1]
    assert back["verdict"] == "fail" and back["checks"]["errors"] == "fail"
    assert "errors: the canary's 5xx share" in back["reason"]
    assert back["ts"] - entries[0]["ts"] < INTERVAL + 3.0  # within one interval of the step
    final = state(env)
    assert final["phase"] == "rolled_back" and final["weight"] == 0
    assert final["last_verdict"]["verdict"] == "fail"
    # Nothing dropped: every request was answered; the only errors are the canary's 500s.
    assert traffic.dropped == [], traffic.dropped
    assert set(traffic.statuses) == {200, 500} and traffic.statuses[500] >= 3, traffic.statuses
    assert all('"code":"500"' in body.replace(" ", "") for body in traffic.bodies_5xx)
    assert variant_5xx(rig, "production") == production_5xx
    assert "canary 0%" in weights_cli(env, "show").stdout
    assert analyzed.returncode == 1, analyzed.stdout + analyzed.stderr
    assert json.loads(analyzed.stdout)["verdict"] == "fail"


@pytest.mark.timeout(120)
def test_canary_without_traffic_stays_inconclusive_and_is_not_promoted(rig):
    env = run_env(rig, "idle")
    assert weights_cli(env, "fallback").returncode == 0
    time.sleep(INTERVAL)  # nothing left of the other tests' traffic in the window
    code, lines, err = finish(rollout(env, "--max-inconclusive", "2"))
    assert code == 3, (lines, err)
    decisions = [line for line in lines if line["event"] == "canary decision"]
    assert [(d["action"], d["to"], d["verdict"]) for d in decisions] == [
        ("step", 5, None), ("hold", 5, "inconclusive"), ("stall", 5, "inconclusive")]
    assert "only 0 canary requests" in decisions[-1]["reason"]
    assert [(e["from"], e["to"]) for e in audit(env)] == [(0, 5)]  # never promoted past 5%
    final = state(env)
    assert final["phase"] == "stalled" and final["weight"] == 5
    analyzed = subprocess.run([ZAI_PROXY, "canary", "analyze", "--window", "4s"], env=env,
                              capture_output=True, text=True, timeout=30)
    assert analyzed.returncode == 3 and "INCONCLUSIVE" in analyzed.stdout, analyzed.stdout
