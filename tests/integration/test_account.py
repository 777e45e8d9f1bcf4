"""The Z.AI account through the production topology (both variants, two ext_procs each, Redis):
the quota report polled into metrics, a spent window gating every worker until its reset, the
priority reserve, and bounded per-worker labels."""

from __future__ import annotations

import calendar
import re
import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx2 as httpx
import pytest

from harness import StackHandle, stack_env
from redis_server import redis_server  # noqa: F401 (fixture)

ASK = dict(model="glm-4.7", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
PRIORITY_KEY, PLAIN_KEY = "sk-worker-alice", "sk-worker-bob"
UNNAMED = [f"sk-unnamed-{i:03d}" for i in range(300)]


@pytest.fixture(scope="module")
def account(tmp_path_factory, redis_server):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("account")
    keys = run_dir / "worker-keys"
    keys.write_text(f"alice {PRIORITY_KEY} priority\nbob {PLAIN_KEY}\n" + "\n".join(UNNAMED) + "\n")
    env = stack_env(REDIS_URL=redis_server.url, CANARY_WEIGHT="50", QUOTA_POLL_SECONDS="1",
                    QUOTA_RESERVE_PERCENT="20", WORKER_KEYS_FILE=str(keys),
                    WORKER_LABEL_LIMIT="100", ADMIN_TOKEN="admin-secret-for-tests",
                    RATE_LIMIT_INITIAL="8", RATE_LIMIT_MAX="16")
    handle = StackHandle(run_dir, env, emulator_args=["--events-per-stream", "2"],
                         variants=("production", "canary"), replicas=2).start()
    yield handle
    handle.stop()


@pytest.fixture(autouse=True)
def fresh_quota(account):
    account.emulator("POST", "/_emulator/reset")
    for url in account.admin_urls():
        httpx.post(f"{url}/admin/limiter/reset", trust_env=False, timeout=10,
                   headers={"authorization": "Bearer admin-secret-for-tests"}).raise_for_status()
    # Every replica has taken a report of the fresh windows before the test starts.
    wait_for(lambda: all(sample(t, "zai_proxy_quota_used_ratio", window="5h") == [0.0]
                         for t in all_metrics(account)), what="fresh windows in every replica")
    yield


def ask(stack: StackHandle, key: str) -> tuple[int, dict, dict]:
    """(status, error body or {}, response headers) of one streamed request."""
    client = anthropic.Anthropic(base_url=f"{stack.url}/api/anthropic", api_key=key, max_retries=0,
                                 http_client=httpx.Client(trust_env=False, timeout=60))
    try:
        with client.messages.stream(**ASK) as stream:
            stream.until_done()
        return 200, {}, {}
    except anthropic.APIStatusError as exc:
        return exc.status_code, exc.body or {}, dict(exc.response.headers)


def sample(text: str, name: str, **labels: str) -> list[float]:
    """Every value of the series `name` whose labels include `labels`."""
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            out.append(float(line.rsplit(" ", 1)[1]))
    return out


def all_metrics(stack: StackHandle) -> list[str]:
    return [httpx.get(f"{url}/metrics", trust_env=False, timeout=10).text
            for url in stack.admin_urls()]


def wait_for(condition, timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def emulator_window(stack: StackHandle, name: str = "5h") -> dict:
    return stack.emulator("GET", "/_emulator/quota").json()[name]


def test_quota_metrics_follow_the_report_on_every_replica(account):
    account.emulator("POST", "/_emulator/quota", json={"window": "5h", "used_percent": 37})
    account.emulator("POST", "/_emulator/quota", json={"window": "weekly", "used_percent": 12})
    window = emulator_window(account)

    def every_replica_shows_it() -> bool:
        return all(sample(t, "zai_proxy_quota_used_ratio", window="5h") == [0.37]
                   and sample(t, "zai_proxy_quota_used_ratio", window="weekly") == [0.12]
                   for t in all_metrics(account))

    wait_for(every_replica_shows_it, what="the report in every replica's metrics")
    for text in all_metrics(account):
        assert sample(text, "zai_proxy_quota_reset_timestamp_seconds", window="5h") == [
            pytest.approx(window["next_reset"], abs=0.001)]
        assert sample(text, "zai_proxy_quota_plan_info", level="lite") == [1.0]
        assert sample(text, "zai_proxy_quota_last_success_timestamp_seconds")[0] > time.time() - 30
    health = httpx.get(f"{account.admin_urls()[0]}/health?detail=1", trust_env=False).json()
    assert health["quota"]["windows"]["5h"]["used_ratio"] == 0.37
    # One poller for the account: both variants' four replicas share one poll a second.
    def calls() -> int:
        return sum(account.emulator("GET", "/_emulator/stats").json()["quota_endpoint_calls"].values())

    first, started = calls(), time.monotonic()
    time.sleep(4)
    made, span = calls() - first, time.monotonic() - started
    assert 1 <= made <= span + 2, f"{made} polls in {span:.1f} s by 4 replicas"


def test_a_spent_window_turns_workers_away_at_once_until_its_reset(account):
    assert ask(account, PRIORITY_KEY)[0] == 200
    account.emulator("POST", "/_emulator/quota",
                     json={"window": "5h", "used_percent": 100, "reset_in": 6})
    reset_at = emulator_window(account)["next_reset"]
    # Within one poll every replica's gate is closed: nothing more reaches Z.AI.
    wait_for(lambda: all(sample(t, "zai_proxy_rate_limit_quota_gate_closed") == [1.0]
                         for t in all_metrics(account)), what="the gate closed from the report")
    before = len(account.upstream_requests())
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: ask(account, (PRIORITY_KEY, PLAIN_KEY)[i % 2]), range(16)))
    assert time.monotonic() - started < 5  # immediate, not queued
    for status, body, headers in answers:
        assert status == 429
        message = body["error"]["message"]
        assert "1308" in message and "resets at" in message, message
        assert 1 <= int(headers["retry-after"]) <= 8
        shown = re.search(r"resets at (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", message)
        assert shown is not None
        assert abs(calendar.timegm(time.strptime(shown.group(1), "%Y-%m-%d %H:%M:%S"))
                   - reset_at) <= 2
    assert len(account.upstream_requests()) == before, "a request reached Z.AI while gated"
    # After the reset, service resumes by itself.
    time.sleep(max(0.0, reset_at + 1.5 - time.time()))
    wait_for(lambda: ask(account, PLAIN_KEY)[0] == 200, timeout=10, what="service after the reset")


def test_the_reserve_serves_priority_workers_only(account):
    account.emulator("POST", "/_emulator/quota", json={"window": "5h", "used_percent": 85})
    wait_for(lambda: all(sample(t, "zai_proxy_quota_used_ratio", window="5h") == [0.85]
                         for t in all_metrics(account)), what="85 % in every replica")
    for _ in range(4):  # whichever variant and replica the request lands on
        assert ask(account, PRIORITY_KEY)[0] == 200
        status, body, headers = ask(account, PLAIN_KEY)
        assert status == 429 and int(headers["retry-after"]) >= 1
        message = body["error"]["message"]
        assert "85% used (15% left)" in message and "reserved for priority workers" in message
        assert "'bob'" in message and "resets at" in message
    assert sum(sum(sample(t, "zai_proxy_rate_limit_rejections_total", reason="reserve"))
               for t in all_metrics(account)) >= 4


def test_worker_labels_stay_bounded_and_named_workers_keep_theirs(account):
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda key: ask(account, key)[0], UNNAMED + [PLAIN_KEY]))
    assert statuses == [200] * 301
    account.settle()
    labels: set[str] = set()
    for text in all_metrics(account):
        labels |= set(re.findall(r'zai_proxy_worker_requests_total\{[^}]*worker="([^"]+)"', text))
    assert "bob" in labels and "other" in labels
    assert len(labels - {"alice", "bob"}) <= 101, len(labels)
    requests = sum(sum(sample(t, "zai_proxy_worker_requests_total", status="200"))
                   for t in all_metrics(account))
    assert requests >= 301
