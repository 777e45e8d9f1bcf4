"""A wait is a wait: whatever the binding limit (slots held by another replica in the shared store,
the start rate), a queued request waits and succeeds, or gets the fair queue's 429 in its API's
format after QUEUE_TIMEOUT_SECONDS; never Envoy's 503 for an ext_proc that did not answer in time.

Envoy's message timeout is set far below the queue timeout here, so a request held without first
extending it would fail with that 503.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx2 as httpx
import pytest

from harness import StackHandle, stack_env
from redis_server import redis_server  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(300)

QUEUE_TIMEOUT = 3.0


def start(tmp_path, redis_url: str, **limits: str) -> StackHandle:
    env = stack_env(REDIS_URL=redis_url, EXTPROC_MESSAGE_TIMEOUT_MS="400",
                    QUEUE_TIMEOUT_SECONDS=str(QUEUE_TIMEOUT), MAX_RETRIES="0",
                    LIMITER_STATE_FILE=str(tmp_path / "limiter.json"), **limits)
    return StackHandle(tmp_path / "stack", env, replicas=2).start()


async def burst(url: str, count: int, api: str, options: dict) -> list[httpx.Response]:
    async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
        async def one(i: int) -> httpx.Response:
            headers = {"x-request-id": str(uuid.uuid4()), "x-emulator-options": json.dumps(options)}
            if api == "anthropic":
                return await client.post(f"{url}/v1/messages", headers=headers | {"x-api-key": "w"},
                                         json={"model": "glm-4.7", "max_tokens": 16, "stream": True,
                                               "messages": [{"role": "user", "content": f"{i}"}]})
            return await client.post(f"{url}/v1/chat/completions",
                                     headers=headers | {"authorization": "Bearer w"},
                                     json={"model": "glm-4.7", "stream": True,
                                           "messages": [{"role": "user", "content": f"{i}"}]})
        return list(await asyncio.gather(*(one(i) for i in range(count))))


def check(responses: list[httpx.Response], api: str) -> tuple[int, int]:
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            doc = r.json()
            if api == "anthropic":
                assert doc["type"] == "error" and doc["error"]["type"] == "rate_limit_error"
            else:
                assert doc["error"]["type"] == "rate_limit_exceeded"
            assert "waited" in (doc["error"]["message"])
    return statuses.count(200), statuses.count(429)


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_shared_slots_binding_queue_then_succeed_or_429(tmp_path, redis_server, api):  # noqa: F811
    # Two slots for the account, held across two replicas through Redis: most requests queue on
    # a replica whose own in-flight count says nothing of the slots the other one holds.
    stack = start(tmp_path, redis_server.url, RATE_LIMIT_MIN="2", RATE_LIMIT_INITIAL="2",
                  RATE_LIMIT_MAX="2")
    try:
        # Each answer takes ~1.2 s: two at a time, about four fit in the 3 s queue timeout.
        responses = asyncio.run(burst(stack.url, 10, api, {"event_interval": 0.15}))
        ok, refused = check(responses, api)
        assert ok >= 4 and refused >= 1, (ok, refused)
        stack.settle()
    finally:
        stack.stop()


def test_start_rate_binding_queue_then_succeed_or_429(tmp_path, redis_server):  # noqa: F811
    # 60 starts a minute with a burst of 5: five go at once, then one a second.
    stack = start(tmp_path, redis_server.url, START_RATE_MIN="60", START_RATE_INITIAL="60",
                  START_RATE_MAX="60")
    try:
        responses = asyncio.run(burst(stack.url, 14, "anthropic", {}))
        ok, refused = check(responses, "anthropic")
        assert ok >= 6 and refused >= 1, (ok, refused)
        stack.settle()
    finally:
        stack.stop()
