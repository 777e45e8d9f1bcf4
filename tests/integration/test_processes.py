"""EXTPROC_PROCESSES=2: each variant's ext_proc is an admission process (key swap, limits, claims,
records, /metrics) and an observer process it starts (the observer's copies of bodies, on
EXTPROC_OBSERVER_PORT), which hands each request's claim, 2xx and outcome back to it.

Through real Envoy and the emulator, without Redis: every request is recorded once, by its
admission process, with the tokens the emulator reported; the account's limit of 3 holds exactly
(the emulator's own count); the observer processes really do the copies' work.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx2 as httpx
import pytest

from extproc.api import Endpoint
from extproc.proxy.handoff import HandoffClaims, HandoffRecorder, ObserverGateway, Receiver, Sender
from extproc.proxy.keys import UpstreamKey, WorkerKeys
from extproc.proxy.observation import Observation
from extproc.proxy.outcome import Tokens
from extproc.proxy.session import Gateway
from extproc.proxy.ticket import Ticket
from harness import StackHandle, stack_env

pytestmark = pytest.mark.timeout(300)

LIMIT = 3
ASK = {"model": "glm-4.7", "max_tokens": 32, "stream": True,
       "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    handle = StackHandle(tmp_path_factory.mktemp("processes"), stack_env(
        EXTPROC_PROCESSES="2", RATE_LIMIT_INITIAL=str(LIMIT), RATE_LIMIT_MIN=str(LIMIT),
        RATE_LIMIT_MAX=str(LIMIT), START_RATE_INITIAL="6000", START_RATE_MAX="6000",
        QUEUE_TIMEOUT_SECONDS="120"),
        variants=("production", "canary"),
        emulator_args=["--events-per-stream", "8", "--event-interval", "0.02"]).start()
    yield handle
    handle.stop()


def send(stack: StackHandle, path: str, body: dict) -> tuple[str, int]:
    request_id = uuid.uuid4().hex
    headers = {"x-api-key": "worker", "authorization": "Bearer worker", "x-request-id": request_id}
    with httpx.Client(trust_env=False, timeout=120) as client:
        with client.stream("POST", f"{stack.url}{path}", json=body, headers=headers) as resp:
            for _ in resp.iter_bytes():
                pass
            return request_id, resp.status_code


def usage_records(stack: StackHandle) -> list[dict]:
    with stack._lock:
        lines = [line for name, line in stack.logs
                 if name.startswith("extproc") and '"Token usage"' in line]
    return [json.loads(line) for line in lines]


def requests_total(text: str) -> int:
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("zai_proxy_requests_total{"))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def observer_pids(admission_pid: int) -> list[int]:
    with open(f"/proc/{admission_pid}/task/{admission_pid}/children") as f:
        return [int(pid) for pid in f.read().split()]


def test_records_once_tokens_exact_and_the_limit_holds(two_processes):
    stack = two_processes
    admissions = {child.name: child.pid for child in stack.stack.group.children
                  if child.name.startswith("extproc")}
    assert set(admissions) == {"extproc", "extproc-canary"}
    observers = {name: observer_pids(pid) for name, pid in admissions.items()}
    assert all(len(pids) == 1 for pids in observers.values()), observers
    cpu_before = {pid: cpu_seconds(pid) for pids in observers.values() for pid in pids}

    # A burst on production: 40 streams for a limit of 3.
    with ThreadPoolExecutor(40) as pool:
        burst = list(pool.map(lambda _: send(stack, "/production/v1/messages", ASK), range(40)))
    assert all(status == 200 for _, status in burst), Counter(s for _, s in burst)
    stats = stack.emulator("GET", "/_emulator/stats").json()
    assert 1 < stats["max_in_flight"] <= LIMIT, stats

    # Then both variants, both APIs.
    openai = {"model": "glm-4.7", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    jobs = ([("/canary/v1/messages", ASK)] * 10 + [("/v1/chat/completions", openai)] * 10
            + [("/canary/v1/chat/completions", openai)] * 5)
    with ThreadPoolExecutor(6) as pool:
        mixed = list(pool.map(lambda job: send(stack, *job), jobs))
    assert all(status == 200 for _, status in mixed), Counter(s for _, s in mixed)
    sent = burst + mixed
    stack.settle(timeout=30)

    # One record per request, made by the admission processes (one /metrics per variant).
    records = usage_records(stack)
    by_id = Counter(r["request_id"] for r in records)
    assert sorted(by_id) == sorted(rid for rid, _ in sent), "records and requests differ"
    assert max(by_id.values()) == 1
    texts = {url: httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
             for url in stack.admin_urls()}
    assert sum(requests_total(text) for text in texts.values()) == len(sent)
    assert all(requests_total(text) > 0 for text in texts.values()), texts.keys()

    # With exactly the tokens the emulator reported.
    emulated = {r["request_id"]: r["usage"] for r in stack.upstream_requests()
                if r.get("request_id") and r.get("usage")}
    record_of = {r["request_id"]: r for r in records}
    for request_id, _ in sent:
        record, usage = record_of[request_id], emulated[request_id]
        assert (record["input_tokens"], record["output_tokens"]) == (usage["input"], usage["output"])
        assert record["estimated"] is False and record["completed"] is True

    # The observer processes did the copies' work; every slot is back.
    cpu_after = {pid: cpu_seconds(pid) for pid in cpu_before}
    assert all(cpu_after[pid] > cpu_before[pid] for pid in cpu_before), (cpu_before, cpu_after)
    assert "ext_proc observer serving" in stack.log_text()
    for url in stack.admin_urls():
        doc = httpx.get(f"{url}/health?detail=1", timeout=10, trust_env=False).json()
        assert doc["requests_open"] == 0 and doc["limiter"]["in_flight"] == 0, (url, doc)



def test_a_lost_observer_process_loses_no_record_and_comes_back(two_processes):
    """Envoy's observer filter fails open: while the observer process is gone, requests go on and
    their request filter records them (the grace path); the admission process starts a new one."""
    import signal
    import time

    stack = two_processes
    admission = next(c.pid for c in stack.stack.group.children if c.name == "extproc")
    [observer] = observer_pids(admission)
    before = {r["request_id"] for r in usage_records(stack)}
    os.kill(observer, signal.SIGKILL)
    with ThreadPoolExecutor(4) as pool:
        during = list(pool.map(lambda _: send(stack, "/production/v1/messages", ASK), range(8)))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and observer_pids(admission) in ([], [observer]):
        time.sleep(0.1)
    [replacement] = observer_pids(admission)
    assert replacement != observer
    time.sleep(1)  # Envoy's next connection reaches the new process
    with ThreadPoolExecutor(4) as pool:
        after = list(pool.map(lambda _: send(stack, "/production/v1/messages", ASK), range(8)))
    assert all(status == 200 for _, status in during + after), during + after
    stack.settle(timeout=30)
    records = [r for r in usage_records(stack) if r["request_id"] not in before]
    by_id = Counter(r["request_id"] for r in records)
    assert sorted(by_id) == sorted(rid for rid, _ in during + after)
    assert max(by_id.values()) == 1


# -- the handoff's gRPC call alone (no stack) -------------------------------------------------------

class Recorder:
    def __init__(self):
        self.outcomes = []

    async def record(self, outcome):
        self.outcomes.append(outcome)
        return {}


class NoEstimates:
    async def parse(self, body, api):
        raise AssertionError("no request body in this test")

    async def count(self, info):
        return 0

    async def count_text(self, text):
        return 0


async def test_an_observation_in_an_observer_process_is_recorded_by_its_admission_process():
    """Through the real gRPC call: claim, 2xx and outcome arrive, in order, and are acted on."""
    gateway = Gateway(UpstreamKey("sk-key"), WorkerKeys(), Recorder(), NoEstimates())
    marked = []
    gateway.admitted["s-1"] = lambda: marked.append("s-1")
    receiver = Receiver(gateway)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((receiver.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    sender = Sender(f"127.0.0.1:{port}")
    sender.start()
    try:
        observer = ObserverGateway(UpstreamKey("unused"), WorkerKeys(), HandoffRecorder(sender),
                                   NoEstimates(), claims=HandoffClaims(sender), sender=sender)
        ticket = Ticket("s-1", "alice", Endpoint.MESSAGES, "r-1", 49.0)
        observation = Observation(observer, ticket)
        assert await observation.attach()
        observation.on_response_headers({":status": "200", "content-type": "application/json"}, False)
        observation.on_response_body(b'{"model":"glm-4.7","usage":{"input_tokens":7,"output_tokens":5}}',
                                     True)
        await observation.end()
        for _ in range(200):
            if gateway.recorder.outcomes:
                break
            await asyncio.sleep(0.01)
        [outcome] = gateway.recorder.outcomes
        assert (outcome.session, outcome.request_id, outcome.worker, outcome.status) == \
            ("s-1", "r-1", "alice", 200)
        assert outcome.tokens == Tokens(input=7, output=5)
        assert marked == ["s-1"]
        assert not await gateway.claims.claim("s-1")  # the request filter will not record it
    finally:
        await sender.close(timeout=1)
        await server.stop(None)


