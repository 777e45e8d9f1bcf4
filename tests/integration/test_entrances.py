"""Every entrance answers errors in its API's format, Envoy's own replies included, and the gateway
records Envoy's 5xx as 5xx.

Z.AI is made unreachable (its URLs point at a closed loopback port, no retries), so every request
that passes the ext_proc gets Envoy's own reply to a connect failure: a 502 in the entrance's
format, from the local-reply mappers. Paths that are no endpoint get a 404, from the ext_proc or from Envoy.
"""

from __future__ import annotations

import json

import httpx2 as httpx
import pytest

from extproc.local.processes import free_port
from harness import StackHandle, stack_env

pytestmark = pytest.mark.timeout(180)

PREFIXES = ("", "/production", "/canary")
ANTHROPIC_PATHS = ("/api/anthropic/v1/messages?beta=true", "/v1/messages", "/v1/messages/",
                   "/v1/messages/count_tokens", "/api/anthropic/v1/messages/count_tokens/")
OPENAI_PATHS = ("/v1/chat/completions", "/v1/chat/completions/", "/v1/chat/completions?x=1")
UNKNOWN = {"/v1/messages/batches": "anthropic", "/v1/models": "anthropic", "/nothing/here": "anthropic",
           "/v1/chat/completions/extra": "openai", "/v1/embeddings": "openai",
           "/production/v1/completions": "openai", "/canary/v1/messages/batches": "anthropic"}


@pytest.fixture(scope="module")
def unreachable(tmp_path_factory):
    closed = free_port()  # nothing listens there
    env = stack_env(ZAI_API_KEY="k" * 24, MAX_RETRIES="0",
                    ZAI_TARGET_URL=f"http://127.0.0.1:{closed}/api/anthropic",
                    ZAI_OPENAI_URL=f"http://127.0.0.1:{closed}/api/coding/paas/v4")
    handle = StackHandle(tmp_path_factory.mktemp("unreachable"), env,
                         variants=("production", "canary")).start()
    yield handle
    handle.stop()


def assert_format(resp: httpx.Response, api: str) -> dict:
    doc = resp.json()
    if api == "anthropic":
        assert doc["type"] == "error" and set(doc["error"]) >= {"type", "message"}, doc
    else:
        assert "type" not in doc and set(doc["error"]) >= {"message", "type", "code"}, doc
    assert doc["error"]["message"].startswith("zai-proxy:"), doc
    return doc


def post(stack: StackHandle, path: str, api: str) -> httpx.Response:
    headers = {"x-api-key": "w"} if api == "anthropic" else {"authorization": "Bearer w"}
    body = {"model": "glm-4.7", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(stack.url + path, content=json.dumps(body), timeout=30, trust_env=False,
                      headers=headers | {"content-type": "application/json"})


def requests_by_status(stack: StackHandle) -> dict[int, int]:
    out: dict[int, int] = {}
    for url in stack.admin_urls():
        for line in httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text.splitlines():
            if line.startswith("zai_proxy_requests_total{"):
                status = int(line.split('status="', 1)[1].split('"', 1)[0])
                out[status] = out.get(status, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out


def test_envoys_own_errors_come_in_each_entrances_format(unreachable):
    stack = unreachable
    before = requests_by_status(stack)
    walked = 0
    for prefix in PREFIXES:
        for api, paths in (("anthropic", ANTHROPIC_PATHS), ("openai", OPENAI_PATHS)):
            for path in paths:
                resp = post(stack, prefix + path, api)
                assert resp.status_code == 502, (prefix + path, resp.status_code, resp.text)
                doc = assert_format(resp, api)
                assert "could not connect to Z.AI" in doc["error"]["message"]
                walked += 1
    stack.settle()
    after = requests_by_status(stack)
    # Envoy's 502s are recorded as 502s (not as clients that left).
    assert after.get(502, 0) - before.get(502, 0) == walked
    assert after.get(499, 0) == before.get(499, 0)


@pytest.mark.parametrize("path,api", sorted(UNKNOWN.items()))
def test_paths_that_are_no_endpoint_get_a_404_in_the_format_they_imply(unreachable, path, api):
    resp = post(unreachable, path, api)
    assert resp.status_code == 404, (path, resp.text)
    assert_format(resp, api)
