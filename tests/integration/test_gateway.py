"""The data path through real Envoy: worker -> Envoy -> ext_proc -> emulator (as Z.AI)."""

from __future__ import annotations

import hashlib
import json
import signal
import ssl
import time

import anthropic
import httpx2 as httpx
import openai
import pytest

from harness import StackHandle, stack_env

CLIENT_TOKEN = "proxy-handles-auth"


def sha(value: str) -> str:
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()


def headers_of(record) -> dict[str, str]:
    return record["headers"]  # the emulator lowercases names and hashes secret values


def anthropic_client(url: str, token: str = CLIENT_TOKEN, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{url}/api/anthropic", auth_token=token, max_retries=0,
                               http_client=httpx.Client(trust_env=False), **kw)


def event_view(event) -> dict:
    """An SDK event without the per-response random ids."""
    data = event.model_dump()
    if isinstance(data.get("message"), dict):
        data["message"].pop("id", None)
    return data


def test_health_through_envoy(stack):
    resp = httpx.get(f"{stack.url}/health", trust_env=False)
    assert resp.status_code == 200
    assert resp.text == '{"status":"ok"}'


def test_anthropic_stream_arrives_whole_in_order_and_unbuffered(stack, emulator_options):
    emulator_options(events_per_stream=6, event_interval=0.25)
    params = dict(model="glm-4.7", max_tokens=64, messages=[{"role": "user", "content": "hi"}])

    arrivals, through_gateway = [], []
    started = time.monotonic()
    with anthropic_client(stack.url).messages.stream(**params) as stream:
        for event in stream:
            arrivals.append(time.monotonic() - started)
            through_gateway.append(event_view(event))

    ctx = ssl.create_default_context(cafile=str(stack.run_dir / "emulator-ca.pem"))
    direct = anthropic.Anthropic(base_url=f"{stack.stack.emulator.url}/api/anthropic",
                                 api_key=stack.upstream_key, max_retries=0,
                                 http_client=httpx.Client(verify=ctx, trust_env=False))
    with direct.messages.stream(**params) as stream:
        from_emulator = [event_view(e) for e in stream]

    assert [e["type"] for e in through_gateway][:2] == ["message_start", "content_block_start"]
    assert through_gateway == from_emulator
    # Six deltas 0.25 s apart: unbuffered, the first event lands long before the last.
    assert arrivals[-1] - arrivals[0] > 1.0


def test_upstream_gets_real_key_never_client_token(stack):
    stack.emulator("POST", "/_emulator/reset")
    client = anthropic_client(stack.url, token="worker-secret-token-abc")
    client.messages.create(model="glm-4.7", max_tokens=16, messages=[{"role": "user", "content": "x"}])
    x_client = anthropic.Anthropic(base_url=f"{stack.url}/api/anthropic", api_key="worker-x-api-key-1",
                                   max_retries=0, http_client=httpx.Client(trust_env=False))
    x_client.messages.create(model="glm-4.7", max_tokens=16, messages=[{"role": "user", "content": "x"}])
    records = stack.upstream_requests()
    assert len(records) == 2
    for record in records:
        headers = headers_of(record)
        assert headers["x-api-key"] == sha(stack.upstream_key)
        assert "authorization" not in headers
        assert record["path"] == "/api/anthropic/v1/messages"
        assert record["status"] == 200
    values = json.dumps(records)
    for token in ("worker-secret-token-abc", "worker-x-api-key-1"):
        assert sha(token) not in values and sha(f"Bearer {token}") not in values


def test_openai_sdk_streams_with_bearer_upstream(stack):
    stack.emulator("POST", "/_emulator/reset")
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=CLIENT_TOKEN, max_retries=0,
                           http_client=httpx.Client(trust_env=False))
    chunks = list(client.chat.completions.create(
        model="glm-4.7", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "hello"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    [record] = stack.upstream_requests()
    headers = headers_of(record)
    assert headers["authorization"] == sha(f"Bearer {stack.upstream_key}")
    assert "x-api-key" not in headers
    assert record["path"] == "/api/coding/paas/v4/chat/completions"


def test_ten_megabyte_body_reaches_upstream_intact(stack):
    stack.emulator("POST", "/_emulator/reset")
    filler = hashlib.sha256(b"seed").hexdigest() * (10 * 1024 * 1024 // 64)
    body = json.dumps({"model": "glm-4.7", "max_tokens": 8, "stream": False,
                       "messages": [{"role": "user", "content": filler}]}).encode()
    assert len(body) > 10 * 1024 * 1024
    resp = httpx.post(f"{stack.url}/v1/messages", content=body, timeout=60, trust_env=False,
                      headers={"content-type": "application/json", "x-api-key": CLIENT_TOKEN})
    assert resp.status_code == 200, resp.text[:500]
    [record] = stack.upstream_requests()
    assert record["body_size"] == len(body)
    assert record["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_count_tokens_and_query_string_pass_through(stack):
    stack.emulator("POST", "/_emulator/reset")
    resp = httpx.post(f"{stack.url}/api/anthropic/v1/messages/count_tokens?beta=true", trust_env=False,
                      headers={"authorization": f"Bearer {CLIENT_TOKEN}"},
                      json={"model": "glm-4.7", "messages": [{"role": "user", "content": "count me"}]})
    assert resp.status_code == 200 and resp.json()["input_tokens"] > 0
    [record] = stack.upstream_requests()
    assert record["path"] == "/api/anthropic/v1/messages/count_tokens"
    assert record["query"] == "beta=true"


def test_internal_headers_from_clients_are_stripped(stack):
    stack.emulator("POST", "/_emulator/reset")
    httpx.post(f"{stack.url}/v1/messages", trust_env=False, headers={
        "x-api-key": CLIENT_TOKEN, "x-zai-proxy-variant": "canary", "x-zai-proxy-worker": "root"},
        json={"model": "glm-4.7", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]})
    [record] = stack.upstream_requests()
    assert not [h for h in headers_of(record) if h.startswith("x-zai-proxy-")]


def test_unknown_path_gets_anthropic_style_404(stack):
    resp = httpx.post(f"{stack.url}/v2/whatever", trust_env=False)
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "not_found_error"
    assert "/api/anthropic/v1/messages" in resp.json()["error"]["message"]


def test_metrics_count_requests_by_variant_and_status(stack):
    def count(status: str) -> float:
        total = 0.0
        for line in stack.metrics_text().splitlines():
            if line.startswith("zai_proxy_requests_total{") and f'status="{status}"' in line \
                    and 'deployment_variant="production"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    stack.settle()  # requests of earlier tests recorded
    before = count("200")
    anthropic_client(stack.url).messages.create(
        model="glm-4.7", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    deadline = time.monotonic() + 5
    while count("200") < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count("200") == before + 1
    text = stack.metrics_text()
    assert "zai_proxy_request_duration_seconds_bucket{" in text
    assert 'le="600.0"' in text
    assert 'zai_proxy_build_info{deployment_variant="production"' in text


def test_extproc_down_fails_fast_in_api_format_then_recovers(tmp_path):
    handle = StackHandle(tmp_path, stack_env()).start()
    try:
        handle.stop_extproc()
        started = time.monotonic()
        resp = httpx.post(f"{handle.url}/v1/messages", trust_env=False, timeout=10,
                          headers={"x-api-key": CLIENT_TOKEN},
                          json={"model": "glm-4.7", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]})
        assert time.monotonic() - started < 5
        assert resp.status_code == 503 and resp.headers["retry-after"]
        body = resp.json()
        assert body["type"] == "error" and "ext_proc" in body["error"]["message"]

        resp = httpx.post(f"{handle.url}/v1/chat/completions", trust_env=False, timeout=10,
                          json={"model": "glm-4.7", "messages": [{"role": "user", "content": "x"}]})
        assert resp.status_code == 503 and "ext_proc" in resp.json()["error"]["message"]
        assert httpx.get(f"{handle.url}/health", trust_env=False).status_code != 200

        handle.start_extproc()
        client = anthropic_client(handle.url)
        reply = client.messages.create(model="glm-4.7", max_tokens=8,
                                       messages=[{"role": "user", "content": "back?"}])
        assert reply.content[0].text
    finally:
        handle.stop()


def test_worker_keys_enforced(tmp_path):
    keys = tmp_path / "worker-keys"
    keys.write_text("alice wk-alice-0001\n")
    handle = StackHandle(tmp_path, stack_env(WORKER_KEYS_FILE=str(keys))).start()
    try:
        with pytest.raises(anthropic.AuthenticationError) as err:
            anthropic_client(handle.url, token="wk-mallory").messages.create(
                model="glm-4.7", max_tokens=8, messages=[{"role": "user", "content": "x"}])
        assert err.value.status_code == 401
        assert err.value.body["error"]["type"] == "authentication_error"
        assert handle.upstream_requests() == []
        reply = anthropic_client(handle.url, token="wk-alice-0001").messages.create(
            model="glm-4.7", max_tokens=8, messages=[{"role": "user", "content": "x"}])
        assert reply.content
    finally:
        handle.stop()


def test_key_file_change_takes_effect_without_restart(tmp_path):
    # Start once to learn the emulator key, then serve it from a file the test rewrites.
    key_file = tmp_path / "zai-key"
    handle = StackHandle(tmp_path, stack_env()).start()
    try:
        first = handle.upstream_key
        key_file.write_text(first + "\n")
        handle.stop_extproc()
        handle.stack.env.pop("ZAI_API_KEY")
        handle.stack.env["ZAI_API_KEY_FILE"] = str(key_file)
        handle.start_extproc()

        client = anthropic_client(handle.url)
        ask = dict(model="glm-4.7", max_tokens=8, messages=[{"role": "user", "content": "x"}])
        client.messages.create(**ask)

        second = "rotated-" + first[::-1]
        handle.emulator("POST", "/_emulator/config", json={"api_key": second})
        key_file.write_text(second + "\n")
        handle.emulator("POST", "/_emulator/reset")
        deadline = time.monotonic() + 10
        while True:
            try:
                client.messages.create(**ask)
                break
            except anthropic.AuthenticationError:
                assert time.monotonic() < deadline, "the new key was never picked up"
                time.sleep(0.3)
        last = handle.upstream_requests()[-1]
        assert headers_of(last)["x-api-key"] == sha(second)
    finally:
        handle.stop()


def test_hung_extproc_fails_within_message_timeout(tmp_path):
    handle = StackHandle(tmp_path, stack_env(EXTPROC_MESSAGE_TIMEOUT_MS="1000")).start()
    [extproc] = [c for c in handle.stack.group.children if c.name == "extproc"]
    try:
        extproc.process.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        resp = httpx.post(f"{handle.url}/v1/chat/completions", trust_env=False, timeout=20,
                          json={"model": "glm-4.7", "messages": [{"role": "user", "content": "x"}]})
        elapsed = time.monotonic() - started
        assert resp.status_code == 503, resp.text
        assert "did not answer in time" in resp.json()["error"]["message"]
        assert elapsed < 5
    finally:
        extproc.process.send_signal(signal.SIGCONT)
        handle.stop()
