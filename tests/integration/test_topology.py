"""A request is one record, wherever its streams land.

The production topology: one Envoy, two ext_proc processes per variant behind each variant's
cluster (Envoy balances every gRPC stream over them, so a request's header stream, its observer
stream and its attempt streams land on any of them), both variants on one account in one Redis.
500 requests across every entrance (Anthropic and OpenAI, streamed and not, split and pinned),
with client disconnects (queued, before headers, mid-stream) and emulator faults (1302/1303 429s,
an error event mid-stream, a TCP reset). Then every request is recorded exactly once, with the
status its client saw; the metrics of the four processes add up to the same; completed streams
carry exactly the tokens the emulator reported; and every slot and lease is back.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field

import httpx2 as httpx
import pytest
import redis

from harness import StackHandle, stack_env
from redis_server import redis_server  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(900)

REQUESTS = 500
CONCURRENCY = 12
SEED = 20261201

ANTHROPIC_ENTRANCES = ("/api/anthropic/v1/messages?beta=true", "/v1/messages",
                       "/production/api/anthropic/v1/messages", "/canary/v1/messages")
OPENAI_ENTRANCES = ("/v1/chat/completions", "/production/v1/chat/completions",
                    "/canary/v1/chat/completions")

# What can happen to one request, and how often (weights).
SCENARIOS = {
    "normal": 10,
    "reject_1302": 1,
    "reject_1303": 1,
    "error_event": 1,  # streamed only: `event: error` (or OpenAI's error chunk) after a 200
    "reset": 1,  # the emulator resets the TCP connection mid-answer
    "leave_mid_stream": 1,  # streamed only: the client closes after the first events
    "leave_before_headers": 1,  # the client gives up before any response header
}


@dataclass
class Sent:
    request_id: str
    path: str
    api: str
    stream: bool
    scenario: str
    status: int = 0  # what the client saw; 499 when it left before any header
    completed: bool = False  # the client read the whole answer
    errors: list[str] = field(default_factory=list)


@pytest.fixture(scope="module", params=["1", "2"], ids=["one-process", "two-processes"])
def topology(request, tmp_path_factory, redis_server):  # noqa: F811
    """EXTPROC_PROCESSES=2: each of the four ext_procs is an admission process and an observer
    process (the copies on a port of their own, handed back to it)."""
    env = stack_env(
        EXTPROC_PROCESSES=request.param,
        REDIS_URL=redis_server.url, CANARY_WEIGHT="50", MAX_RETRIES="1",
        # Faults teach the limiter; keep what it can learn above what this test needs to finish.
        RATE_LIMIT_MIN="4", RATE_LIMIT_INITIAL="8", RATE_LIMIT_MAX="16",
        START_RATE_MIN="6000", START_RATE_INITIAL="6000", START_RATE_MAX="60000",
        QUEUE_TIMEOUT_SECONDS="20", LIMITER_STATE_FILE=str(tmp_path_factory.mktemp("state") / "l.json"))
    handle = StackHandle(tmp_path_factory.mktemp("topology"), env,
                         variants=("production", "canary"), replicas=2).start()
    yield handle
    handle.stop()


def plan(rng: random.Random, count: int) -> list[Sent]:
    names, weights = zip(*SCENARIOS.items())
    out = []
    for _ in range(count):
        api = rng.choice(("anthropic", "openai"))
        path = rng.choice(ANTHROPIC_ENTRANCES if api == "anthropic" else OPENAI_ENTRANCES)
        scenario = rng.choices(names, weights)[0]
        stream = True if scenario in ("error_event", "leave_mid_stream") else rng.random() < 0.7
        out.append(Sent(str(uuid.uuid4()), path, api, stream, scenario))
    return out


def body(sent: Sent) -> dict:
    doc: dict = {"model": "glm-4.7", "messages": [{"role": "user", "content": f"req {sent.request_id}"}],
                 "stream": sent.stream}
    if sent.api == "anthropic":
        doc["max_tokens"] = 64
    return doc


def emulator_options(sent: Sent) -> dict:
    return {
        "normal": {},
        "reject_1302": {"reject_code": "1302"},
        "reject_1303": {"reject_code": "1303"},
        "error_event": {"error_after_events": 2},
        "reset": {"disconnect_after_events": 2},
        "leave_mid_stream": {"event_interval": 0.2},
        "leave_before_headers": {"first_event_delay": 3.0},
    }[sent.scenario]


async def send(client: httpx.AsyncClient, base: str, sent: Sent) -> None:
    headers = {"x-request-id": sent.request_id, "content-type": "application/json",
               "x-emulator-options": json.dumps(emulator_options(sent))}
    headers |= ({"x-api-key": "proxy-handles-auth"} if sent.api == "anthropic"
                else {"authorization": "Bearer proxy-handles-auth"})
    if sent.scenario == "leave_before_headers":
        # Non-streamed answers come whole after the delay; streamed ones send headers first.
        sent.stream = False
    timeout = httpx.Timeout(60.0, read=0.5 if sent.scenario == "leave_before_headers" else 60.0)
    try:
        async with client.stream("POST", base + sent.path, content=json.dumps(body(sent)),
                                 headers=headers, timeout=timeout) as resp:
            sent.status = resp.status_code
            lines = 0
            async for _ in resp.aiter_lines():
                lines += 1
                if sent.scenario == "leave_mid_stream" and lines >= 6:
                    return  # closing the stream here is the client going away
            sent.completed = True
    except httpx.TimeoutException as exc:
        if sent.status == 0:
            sent.status = 499
        sent.errors.append(repr(exc))
    except httpx.HTTPError as exc:  # the reset reaches the client as a broken stream
        sent.errors.append(repr(exc))
        if sent.status == 0:
            sent.status = 499


async def run_all(base: str, sent: list[Sent]) -> None:
    queue: asyncio.Queue[Sent] = asyncio.Queue()
    for s in sent:
        queue.put_nowait(s)
    async with httpx.AsyncClient(trust_env=False, limits=httpx.Limits(max_connections=64)) as client:
        async def worker() -> None:
            while not queue.empty():
                await send(client, base, queue.get_nowait())
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def leave_while_queued(base: str, blockers: int, leavers: int) -> list[Sent]:
    """Hold every slot with slow streams, then send requests that must queue and give up."""
    slow = [Sent(str(uuid.uuid4()), "/v1/messages", "anthropic", True, "normal") for _ in range(blockers)]
    gone = [Sent(str(uuid.uuid4()), "/v1/messages", "anthropic", False, "normal") for _ in range(leavers)]
    async with httpx.AsyncClient(trust_env=False, limits=httpx.Limits(max_connections=128)) as client:
        async def slow_one(s: Sent) -> None:
            headers = {"x-request-id": s.request_id, "x-api-key": "proxy-handles-auth",
                       "x-emulator-options": json.dumps({"event_interval": 0.3})}
            async with client.stream("POST", base + s.path, json=body(s), headers=headers,
                                     timeout=60) as resp:
                s.status = resp.status_code
                async for _ in resp.aiter_lines():
                    pass
                s.completed = True

        async def leaver(s: Sent) -> None:
            await asyncio.sleep(0.5)  # the blockers hold the slots by now
            try:
                await client.post(base + s.path, json=body(s), timeout=httpx.Timeout(60, read=0.4),
                                  headers={"x-request-id": s.request_id, "x-api-key": "proxy-handles-auth"})
            except httpx.TimeoutException:
                s.status = 499
            else:
                pytest.fail("a request that should have queued was answered at once")

        await asyncio.gather(*(slow_one(s) for s in slow), *(leaver(s) for s in gone))
    return slow + gone


def usage_records(stack: StackHandle) -> list[dict]:
    with stack._lock:
        lines = [line for name, line in stack.logs if name.startswith("extproc") and '"Token usage"' in line]
    return [json.loads(line) for line in lines]


def metric_sum(texts: list[str], name: str) -> Counter:
    """`name` summed over processes, by its `status` label."""
    out: Counter = Counter()
    for text in texts:
        for line in text.splitlines():
            if line.startswith(name + "{"):
                labels, value = line.rsplit(" ", 1)
                status = labels.split('status="', 1)[1].split('"', 1)[0]
                out[int(status)] += int(float(value))
    return out


def test_every_request_is_one_record_with_the_status_its_client_saw(topology, redis_server):  # noqa: F811
    stack = topology
    rng = random.Random(SEED)
    sent = plan(rng, REQUESTS - 40)
    asyncio.run(run_all(stack.url, sent))
    sent += asyncio.run(leave_while_queued(stack.url, blockers=24, leavers=16))
    assert len(sent) == REQUESTS
    assert {s.scenario for s in sent} == set(SCENARIOS)
    assert {s.path for s in sent} >= set(ANTHROPIC_ENTRANCES + OPENAI_ENTRANCES)
    assert any(s.status == 499 for s in sent if s.path == "/v1/messages" and not s.stream)
    stack.settle(timeout=30)

    # One "Token usage" record per request, each request id exactly once.
    records = usage_records(stack)
    by_id = Counter(r["request_id"] for r in records)
    assert sorted(by_id) == sorted(s.request_id for s in sent), "records and requests differ"
    assert max(by_id.values()) == 1, [rid for rid, n in by_id.items() if n > 1][:5]
    assert len(records) == REQUESTS

    # With the status each client saw.
    record_of = {r["request_id"]: r for r in records}
    wrong = [(s.scenario, s.path, s.stream, s.status, record_of[s.request_id]["status"])
             for s in sent if record_of[s.request_id]["status"] != s.status]
    assert not wrong, wrong[:10]
    seen = Counter(s.status for s in sent)
    assert {200, 429, 499}.issubset(seen) and any(500 <= code < 600 for code in seen), seen

    # The four processes' metrics add up to the same, status by status.
    texts = [httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text for url in stack.admin_urls()]
    assert len(texts) == 4
    assert metric_sum(texts, "zai_proxy_requests_total") == seen
    # Both variants and both replicas of each took records.
    per_process = [sum(metric_sum([t], "zai_proxy_requests_total").values()) for t in texts]
    assert all(n > 0 for n in per_process), per_process

    # Completed streams carry exactly what the emulator reported for them.
    emulated = {}
    for request in stack.upstream_requests():
        if request.get("request_id") and request.get("usage"):
            emulated[request["request_id"]] = request["usage"]
    checked = 0
    for s in sent:
        record = record_of[s.request_id]
        if record["completed"] and record["status"] == 200 and s.request_id in emulated:
            usage = emulated[s.request_id]
            assert (record["input_tokens"], record["output_tokens"], record["cache_read_tokens"],
                    record["cache_write_tokens"]) == (usage["input"], usage["output"],
                                                      usage["cache_read"], usage["cache_write"]), s
            assert record["estimated"] is False
            checked += 1
        if s.scenario == "error_event":
            assert record["completed"] is False, record
    assert checked > REQUESTS // 3

    # Every slot and lease is back.
    for url in stack.admin_urls():
        doc = httpx.get(f"{url}/health?detail=1", timeout=10, trust_env=False).json()
        assert doc["requests_open"] == 0 and doc["limiter"]["in_flight"] == 0, (url, doc)
        assert doc["limiter"]["store"] == "redis"
    client = redis.Redis.from_url(redis_server.url)
    try:
        leases = {key: client.zcard(key) for key in client.scan_iter("zai-proxy:slots:*")}
    finally:
        client.close()
    assert all(count == 0 for count in leases.values()), leases
