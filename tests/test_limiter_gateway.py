"""The rate limiter through real Envoy and the emulator: learning the account's capacity,
fairness, the quota gate, and slots that always come back."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx2 as httpx
import pytest

from harness import StackHandle, stack_env

ASK = dict(model="glm-4.7", max_tokens=32, messages=[{"role": "user", "content": "hi"}])


def limiter_state(stack: StackHandle) -> dict:
    return httpx.get(f"{stack.url}/health?detail=1", trust_env=False, timeout=10).json()["limiter"]


def stream_once(stack: StackHandle, worker: str) -> str:
    client = anthropic.Anthropic(base_url=f"{stack.url}/api/anthropic", auth_token=worker,
                                 max_retries=0, http_client=httpx.Client(trust_env=False, timeout=120))
    try:
        with client.messages.stream(**ASK) as stream:
            stream.until_done()
        return "ok"
    except anthropic.APIStatusError as exc:
        return f"{exc.status_code} {exc.body}"
    except Exception as exc:  # noqa: BLE001 - report anything else as a failure
        return repr(exc)


def run_workers(stack: StackHandle, workers: int, rounds: int = 1) -> list[str]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda i: stream_once(stack, f"worker-{i % workers}"),
                             range(workers * rounds)))


@pytest.fixture(scope="module")
def learning(tmp_path_factory):
    handle = StackHandle(tmp_path_factory.mktemp("learning"), stack_env(
        RATE_LIMIT_INITIAL="4", RATE_LIMIT_MAX="8", RATE_LIMIT_PROBE_SECONDS="1",
        QUEUE_TIMEOUT_SECONDS="120"),
        emulator_args=["--concurrency-cap", "3", "--events-per-stream", "6",
                       "--event-interval", "0.05"]).start()
    yield handle
    handle.stop()


def test_limit_learns_the_cap_and_no_429_reaches_workers(learning):
    results = run_workers(learning, 40)
    assert results == ["ok"] * 40, [r for r in results if r != "ok"][:3]
    stats = learning.emulator("GET", "/_emulator/stats").json()
    assert stats["max_in_flight"] <= 3
    state = limiter_state(learning)
    assert 2 <= state["concurrency_limit"] <= 3, state
    assert state["in_flight"] == 0 and state["queued"] == 0


def test_limit_follows_the_cap_up_and_down(learning):
    learning.emulator("POST", "/_emulator/config", json={"concurrency_cap": 5})
    deadline = time.monotonic() + 60
    while limiter_state(learning)["concurrency_limit"] < 4 and time.monotonic() < deadline:
        run_workers(learning, 12)
    assert limiter_state(learning)["concurrency_limit"] in (4, 5)

    learning.emulator("POST", "/_emulator/config", json={"concurrency_cap": 2})
    deadline = time.monotonic() + 60
    while limiter_state(learning)["concurrency_limit"] > 2 and time.monotonic() < deadline:
        run_workers(learning, 12)
    assert limiter_state(learning)["concurrency_limit"] <= 2
    results = run_workers(learning, 20)
    assert results.count("ok") == 20
