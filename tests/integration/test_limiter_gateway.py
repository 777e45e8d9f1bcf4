"""The rate limiter through real Envoy and the emulator: learning the account's capacity,
fairness, the quota gate, and slots that always come back."""

from __future__ import annotations

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
    held = state["concurrency_limit"] - (1 if state["concurrency_probing"] else 0)
    assert 2 <= held <= 3, state  # a probe (every ~1 s here) may be testing one step above
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


def fixed_limit(n: int) -> dict[str, str]:
    """A concurrency limit that cannot move, and a start rate that never binds."""
    return {"RATE_LIMIT_INITIAL": str(n), "RATE_LIMIT_MIN": str(n), "RATE_LIMIT_MAX": str(n),
            "START_RATE_INITIAL": "6000", "START_RATE_MAX": "6000"}


def test_single_call_workers_are_not_starved_by_a_busy_one(tmp_path):
    handle = StackHandle(tmp_path, stack_env(**fixed_limit(3)),
                         emulator_args=["--events-per-stream", "10", "--event-interval", "0.1"]).start()
    try:
        def call(worker: str, mark: str) -> str:
            client = anthropic.Anthropic(base_url=f"{handle.url}/api/anthropic", auth_token=worker,
                                         max_retries=0, http_client=httpx.Client(trust_env=False, timeout=120))
            with client.messages.stream(**{**ASK, "model": f"glm-mark-{mark}"}) as stream:
                stream.until_done()
            return mark

        with ThreadPoolExecutor(25) as pool:
            heavy = [pool.submit(call, "heavy", f"h{i}") for i in range(20)]
            time.sleep(0.5)  # three heavy calls stream, seventeen wait
            light = [pool.submit(call, f"light-{i}", f"l{i}") for i in range(5)]
            assert sorted(f.result() for f in light + heavy)
        order = [r["model"].removeprefix("glm-mark-") for r in handle.upstream_requests()]
        assert len(order) == 25
        # After the three heavy calls already streaming, the five light calls take the next
        # slots; at the second turnover one heavy call starts with the last two light ones.
        after_arrival = order[3:9]
        assert all(f"l{i}" in after_arrival for i in range(5)), order
        assert sum(mark.startswith("h") for mark in after_arrival) <= 1, order
    finally:
        handle.stop()


def test_quota_error_closes_the_gate_until_the_reset(tmp_path):
    handle = StackHandle(tmp_path, stack_env(),
                         emulator_args=["--quota-requests", "2", "--quota-reset-after", "6"]).start()
    try:
        def post() -> httpx.Response:
            return httpx.post(f"{handle.url}/v1/messages", json=ASK, trust_env=False, timeout=30,
                              headers={"x-api-key": "w"})

        assert [post().status_code for _ in range(2)] == [200, 200]
        relayed = post()  # Z.AI's own 1308, relayed at once (never retried)
        assert relayed.status_code == 429 and "1308" in relayed.text
        assert len(handle.upstream_requests()) == 3
        reset_in = float(relayed.headers.get("retry-after", "6"))

        started = time.monotonic()
        gated = post()
        assert gated.status_code == 429 and time.monotonic() - started < 1
        body = gated.json()
        assert body["error"]["type"] == "rate_limit_error"
        assert "1308" in body["error"]["message"] and "reset" in body["error"]["message"].lower()
        assert abs(float(gated.headers["retry-after"]) - reset_in) <= 2
        assert len(handle.upstream_requests()) == 3  # the emulator saw nothing more
        assert limiter_state(handle)["quota_gate"] is not None

        time.sleep(float(gated.headers["retry-after"]) + 0.5)
        assert post().status_code == 200
    finally:
        handle.stop()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("processes", ["1", "2"])
def test_every_slot_comes_back_whatever_happens(tmp_path, processes):
    """1,000 requests: client disconnects while queued and mid-stream, and upstream cuts; with the
    variant's ext_proc as one process, and as an admission process and an observer process."""
    handle = StackHandle(tmp_path, stack_env(**fixed_limit(8), EXTPROC_PROCESSES=processes),
                         emulator_args=["--events-per-stream", "6", "--event-interval", "0.02"]).start()
    rng = random.Random(7)
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        kind = rng.choice(["whole", "leave-early", "leave-queued", "whole"])
        timeout = 0.05 if kind == "leave-queued" else 30
        try:
            with httpx.Client(trust_env=False, timeout=timeout) as client:
                with client.stream("POST", f"{handle.url}/v1/messages", json={**ASK, "stream": True},
                                   headers={"x-api-key": f"w{i % 17}"}) as resp:
                    for n, _ in enumerate(resp.iter_bytes()):
                        if kind == "leave-early" and n >= 1:
                            break
            result = kind
        except httpx.HTTPError:
            result = kind + "-error"
        with lock:
            outcomes[result] = outcomes.get(result, 0) + 1

    try:
        for phase in range(4):
            # Half the phases cut every stream upstream after two events.
            handle.emulator("POST", "/_emulator/config",
                            json={"disconnect_after_events": 2 if phase % 2 else -1})
            with ThreadPoolExecutor(40) as pool:
                list(pool.map(one, range(phase * 250, (phase + 1) * 250)))
        assert sum(outcomes.values()) == 1000
        assert outcomes.get("leave-queued-error", 0) > 0 and outcomes.get("leave-early", 0) > 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            state = limiter_state(handle)
            if state["in_flight"] == 0 and state["queued"] == 0:
                break
            time.sleep(0.2)
        assert (state["in_flight"], state["queued"]) == (0, 0), state
        assert handle.emulator("GET", "/_emulator/stats").json()["in_flight"] == 0
        # And the gateway still serves.
        handle.emulator("POST", "/_emulator/config", json={"disconnect_after_events": -1})
        assert stream_once(handle, "after") == "ok"
    finally:
        handle.stop()


def test_restart_keeps_the_learned_ceiling(tmp_path):
    handle = StackHandle(tmp_path, stack_env(RATE_LIMIT_INITIAL="5", RATE_LIMIT_PROBE_SECONDS="60",
                                             LIMITER_STATE_FILE=str(tmp_path / "limiter.json")),
                         emulator_args=["--concurrency-cap", "2", "--events-per-stream", "6",
                                        "--event-interval", "0.05"]).start()
    try:
        assert run_workers(handle, 12).count("ok") == 12
        learned = limiter_state(handle)
        assert learned["concurrency_ceiling"] is not None and learned["concurrency_limit"] <= 2
        time.sleep(1.5)  # saved by the housekeeping loop
        handle.stop_extproc()
        handle.start_extproc()
        restored = limiter_state(handle)
        assert restored["concurrency_ceiling"] == learned["concurrency_ceiling"]
        assert restored["concurrency_limit"] == learned["concurrency_limit"]
    finally:
        handle.stop()
