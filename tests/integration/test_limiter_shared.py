"""Several ext_proc replicas on one account through Redis; per-worker budgets; admin reset."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest

from harness import StackHandle, stack_env
from redis_server import redis_server, redis_url  # noqa: F401 - fixtures
from test_limiter_gateway import ASK, fixed_limit, limiter_state, stream_once


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.mark.timeout(240)
def test_two_replicas_share_one_limit_and_survive_redis_outage(tmp_path, redis_server):  # noqa: F811
    shared = dict(REDIS_URL=redis_server.url, **fixed_limit(3))
    first = StackHandle(tmp_path / "a", stack_env(**shared), emulator_args=[
        "--events-per-stream", "8", "--event-interval", "0.05"]).start()
    second = None
    try:
        second = StackHandle(tmp_path / "b", stack_env(
            **shared, ZAI_API_KEY=first.upstream_key,
            ZAI_TARGET_URL=f"{first.stack.emulator.url}/api/anthropic",
            ZAI_OPENAI_URL=f"{first.stack.emulator.url}/api/coding/paas/v4",
            UPSTREAM_CA_FILE=str(first.run_dir / "emulator-ca.pem"))).start()
        replicas = [first, second]
        assert [limiter_state(r)["store"] for r in replicas] == ["redis", "redis"]

        def burst(n: int) -> list[str]:
            with ThreadPoolExecutor(n) as pool:
                return list(pool.map(lambda i: stream_once(replicas[i % 2], f"w{i}"), range(n)))

        assert burst(30) == ["ok"] * 30
        stats = first.emulator("GET", "/_emulator/stats").json()
        assert stats["max_in_flight"] <= 3, stats

        # Redis dies in the middle of a burst: requests keep flowing on local limits.
        results: list[str] = []
        runner = threading.Thread(target=lambda: results.extend(burst(30)))
        runner.start()
        time.sleep(0.3)
        redis_server.stop()
        runner.join(120)
        assert results == ["ok"] * 30
        assert wait_until(lambda: all(limiter_state(r)["store"] == "local" for r in replicas))
        assert stream_once(second, "during-outage") == "ok"

        # Redis comes back: shared state again.
        redis_server.start()
        assert wait_until(lambda: all(limiter_state(r)["store"] == "redis" for r in replicas), 15)
        assert burst(10) == ["ok"] * 10
        metrics = first.metrics_text()
        assert 'zai_proxy_rate_limit_shared_state{deployment_variant="production"} 1.0' in metrics
    finally:
        if second is not None:
            second.stop()
        first.stop()


def test_worker_budgets_answer_429_with_the_bucket_retry_after(tmp_path):
    budgets = tmp_path / "budgets"
    budgets.write_text("alice rpm=2\ncarol tpm=20\n")
    keys = tmp_path / "worker-keys"
    keys.write_text("alice alice\nbob bob\ncarol carol\n")  # budgets are by worker name
    handle = StackHandle(tmp_path, stack_env(WORKER_BUDGETS_FILE=str(budgets),
                                             WORKER_KEYS_FILE=str(keys))).start()
    try:
        def post(worker: str) -> httpx.Response:
            resp = httpx.post(f"{handle.url}/v1/messages", json=ASK, trust_env=False, timeout=30,
                              headers={"x-api-key": worker})
            handle.settle()  # tokens are charged when the request is recorded
            return resp

        assert [post("alice").status_code for _ in range(2)] == [200, 200]
        over = post("alice")
        assert over.status_code == 429
        assert over.json()["error"]["type"] == "rate_limit_error"
        assert "budget" in over.json()["error"]["message"]
        assert 20 <= int(over.headers["retry-after"]) <= 31  # one request refills in 30 s
        assert post("bob").status_code == 200  # no budget for bob

        assert post("carol").status_code == 200  # a full bucket admits, then runs into debt
        assert post("carol").status_code == 429
        rejections = [l for l in handle.metrics_text().splitlines()
                      if l.startswith("zai_proxy_rate_limit_rejections_total") and 'reason="budget"' in l]
        assert rejections and float(rejections[0].rsplit(" ", 1)[1]) == 2
    finally:
        handle.stop()


def test_admin_reset_needs_the_token_and_forgets_learned_limits(tmp_path):
    env = stack_env(ADMIN_TOKEN="admin-secret-123456", RATE_LIMIT_INITIAL="5",
                    RATE_LIMIT_PROBE_SECONDS="60")
    handle = StackHandle(tmp_path, env, emulator_args=[
        "--concurrency-cap", "2", "--events-per-stream", "6", "--event-interval", "0.05"]).start()
    try:
        with ThreadPoolExecutor(12) as pool:
            list(pool.map(lambda i: stream_once(handle, f"w{i}"), range(12)))
        assert limiter_state(handle)["concurrency_ceiling"] is not None
        admin = f"http://127.0.0.1:{env['EXTPROC_ADMIN_PORT']}/admin/limiter/reset"
        assert httpx.post(admin, trust_env=False).status_code == 401
        assert httpx.post(admin, trust_env=False,
                          headers={"authorization": "Bearer wrong"}).status_code == 401
        resp = httpx.post(admin, trust_env=False, headers={"authorization": "Bearer admin-secret-123456"})
        assert resp.status_code == 200
        state = limiter_state(handle)
        assert state["concurrency_ceiling"] is None and state["concurrency_limit"] == 5
        assert "admin-secret-123456" not in handle.log_text()
    finally:
        handle.stop()
