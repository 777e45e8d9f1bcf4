"""Production and canary through real Envoy: weighted sticky split, pinned entrances, live
weights with open streams, and refused route edits."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import httpx2 as httpx
import pytest

from harness import StackHandle, stack_env

ZAI_PROXY = str(Path(sys.executable).with_name("zai-proxy"))
ASK = {"model": "glm-4.7", "messages": [{"role": "user", "content": "hi"}]}
# 99.9% two-sided normal bound for a binomial count.
Z = 3.29


def variant_counts(stack: StackHandle) -> dict[str, float]:
    counts = {}
    for variant in ("production", "canary"):
        text = httpx.get(f"{stack.url}/{variant}/metrics", trust_env=False, timeout=10).text
        counts[variant] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                              if line.startswith("zai_proxy_requests_total{")
                              and f'deployment_variant="{variant}"' in line)
    return counts


def send(stack: StackHandle, workers: list[str], path: str = "/v1/messages/count_tokens") -> None:
    def one(worker: str) -> None:
        resp = httpx.post(f"{stack.url}{path}", json=ASK, trust_env=False, timeout=30,
                          headers={"x-api-key": worker})
        assert resp.status_code == 200, (resp.text, dict(resp.headers), path)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, workers))
    stack.settle()


def delta(before, after):
    return {k: int(after[k] - before[k]) for k in before}


def weights_cli(stack: StackHandle, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **stack.stack.env}
    return subprocess.run([ZAI_PROXY, "weights", *args], env=env, capture_output=True, text=True,
                          timeout=30)


@pytest.fixture(scope="module")
def canary(tmp_path_factory):
    handle = StackHandle(tmp_path_factory.mktemp("canary"), stack_env(CANARY_WEIGHT="10"),
                         emulator_args=["--events-per-stream", "30", "--event-interval", "0.1"],
                         variants=("production", "canary")).start()
    yield handle
    handle.stop()


@pytest.mark.timeout(240)
def test_split_follows_weights_sticks_per_worker_and_pins_never_cross(canary):
    before = variant_counts(canary)
    n = 2000
    send(canary, [f"worker-{i}" for i in range(n)])
    got = delta(before, variant_counts(canary))
    assert sum(got.values()) == n
    mean, sd = n * 0.1, (n * 0.1 * 0.9) ** 0.5
    assert mean - Z * sd <= got["canary"] <= mean + Z * sd, got

    for worker in ("sticky-a", "sticky-b", "sticky-c"):
        before = variant_counts(canary)
        send(canary, [worker] * 100)
        got = delta(before, variant_counts(canary))
        assert sorted(got.values()) == [0, 100], (worker, got)

    for variant in ("production", "canary"):
        before = variant_counts(canary)
        send(canary, [f"pinned-{i}" for i in range(50)], f"/{variant}/v1/messages/count_tokens")
        got = delta(before, variant_counts(canary))
        assert got[variant] == 50 and sum(got.values()) == 50, got


@pytest.mark.timeout(240)
def test_live_weights_move_without_cutting_streams_and_bad_edits_are_refused(canary):
    [envoy] = [c for c in canary.stack.group.children if c.name == "envoy"]
    results: list[str] = []

    def long_stream(i: int) -> None:
        client = anthropic.Anthropic(base_url=f"{canary.url}/api/anthropic", auth_token=f"long-{i}",
                                     max_retries=0, http_client=httpx.Client(trust_env=False, timeout=60))
        try:
            with client.messages.stream(max_tokens=64, **ASK) as stream:
                results.append("ok" if stream.get_final_text() else "empty")
        except Exception as exc:  # noqa: BLE001
            results.append(repr(exc))

    streams = [threading.Thread(target=long_stream, args=(i,)) for i in range(6)]
    for t in streams:
        t.start()
    time.sleep(0.5)  # the streams are open (3 s each)

    moved = weights_cli(canary, "set", "50")
    assert moved.returncode == 0, moved.stderr
    assert "canary 50%" in moved.stdout and "Envoy: serving these routes" in moved.stdout
    before = variant_counts(canary)
    send(canary, [f"half-{i}" for i in range(400)])
    got = delta(before, variant_counts(canary))
    assert 200 - Z * 10 <= got["canary"] <= 200 + Z * 10, got

    back = weights_cli(canary, "fallback")
    assert back.returncode == 0 and "canary 0%" in back.stdout
    before = variant_counts(canary)
    send(canary, [f"after-{i}" for i in range(100)])
    assert delta(before, variant_counts(canary)) == {"production": 100, "canary": 0}

    for t in streams:
        t.join(60)
    assert results == ["ok"] * 6
    assert envoy.process.returncode is None  # the same Envoy, never restarted

    # A hand edit Envoy cannot accept: refused by Envoy, the last good routes stay.
    routes = Path(canary.stack.env["ENVOY_ROUTES_DIR"]) / "routes.yaml"
    good = routes.read_text()
    broken = routes.with_name("broken.tmp")
    broken.write_text(good.replace("weighted_clusters:", "weighted_clustres:", 1)
                      .replace("version_info:", "version_info: broken-", 1))
    os.replace(broken, routes)
    time.sleep(1.0)
    before = variant_counts(canary)
    send(canary, [f"still-{i}" for i in range(50)])
    assert delta(before, variant_counts(canary)) == {"production": 50, "canary": 0}
    shown = weights_cli(canary, "show")
    assert shown.returncode != 0 and "Envoy would reject the routes" in shown.stderr

    routes.write_text(good)
    refused = weights_cli(canary, "set", "150")
    assert refused.returncode == 2 and "0 to 100" in refused.stderr
