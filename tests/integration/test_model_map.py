"""MODEL_MAP and MODEL_FALLBACKS through real Envoy, the ext_proc and the emulator (as Z.AI), with
the official SDKs: what model reaches Z.AI on each attempt, what the client gets, and what the
record says (requested and served model) in the "Token usage" line, the access log and the
metrics.

The emulator refuses models by name (`reject_models`, per request in `x-emulator-options`), as
Z.AI does with 1312 (model overloaded) and 1311 (model not in the plan).
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid

import anthropic
import httpx2 as httpx
import openai
import pytest

from harness import StackHandle, stack_env
from redis_server import redis_server  # noqa: F401 - fixture
from stack_logs import access_line, usage_line, wait_for

MODEL_MAP = "claude-sonnet-*=glm-4.7,claude-opus-*=glm-4.7,claude-haiku-*=glm-4.5-air"
MODEL_FALLBACKS = "glm-5.1>glm-4.7>glm-4.5-air"
RULES = dict(MODEL_MAP=MODEL_MAP, MODEL_FALLBACKS=MODEL_FALLBACKS,
             # Generous limits: refusals must not make the limiter the subject of these tests.
             RATE_LIMIT_MIN="4", RATE_LIMIT_INITIAL="8", RATE_LIMIT_MAX="16")
HI = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    handle = StackHandle(tmp_path_factory.mktemp("models"), stack_env(**RULES)).start()
    yield handle
    handle.stop()


def rejecting(spec: str) -> dict[str, str]:
    """The per-request emulator option: refuse these `model:code` pairs, serve other models."""
    return {"x-emulator-options": json.dumps({"reject_models": spec})}


def anthropic_client(stack: StackHandle, request_id: str, headers: dict[str, str] | None = None):
    return anthropic.Anthropic(base_url=f"{stack.url}/api/anthropic", auth_token="proxy-handles-auth",
                               max_retries=0,
                               default_headers={"x-request-id": request_id, **(headers or {})},
                               http_client=httpx.Client(trust_env=False, timeout=60))


def openai_client(stack: StackHandle, request_id: str, headers: dict[str, str] | None = None):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="proxy-handles-auth", max_retries=0,
                         default_headers={"x-request-id": request_id, **(headers or {})},
                         http_client=httpx.Client(trust_env=False, timeout=60))


def upstream(stack: StackHandle, request_id: str) -> list[dict]:
    """What the emulator received for one request, attempt by attempt (oldest first)."""
    return sorted((r for r in stack.upstream_requests() if r["request_id"] == request_id),
                  key=lambda r: r["id"])


def sent_body(record: dict) -> dict:
    return json.loads(base64.b64decode(record["body_b64"]))


def tokens_by_model(stack: StackHandle) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in stack.metrics_text().splitlines():
        if line.startswith("zai_proxy_tokens_total{") and 'direction="output"' in line:
            model = line.split('model="', 1)[1].split('"', 1)[0]
            counts[model] = counts.get(model, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def overloaded_attempts(admin_url: str) -> float:
    text = httpx.get(f"{admin_url}/metrics", timeout=10, trust_env=False).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("zai_proxy_upstream_attempts_total{") and 'signal="overloaded"' in line)


def test_claude_sonnet_reaches_zai_as_glm_4_7_and_only_the_model_changes(stack):
    rid = str(uuid.uuid4())
    stack.settle()
    before = tokens_by_model(stack)
    mapped = metric(stack, "zai_proxy_model_requests_total", requested_model="claude-sonnet-*",
                    model="glm-4.7")
    client = anthropic_client(stack, rid)
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=HI,
                                system="be brief", metadata={"user_id": "u-1"}) as stream:
        final = stream.get_final_message()
    assert final.model == "glm-4.7"  # the emulator names the model it served
    [attempt] = upstream(stack, rid)
    body = sent_body(attempt)
    assert body["model"] == "glm-4.7" and attempt["status"] == 200
    assert {k: v for k, v in body.items() if k != "model"} == {
        "max_tokens": 64, "messages": HI, "system": "be brief", "metadata": {"user_id": "u-1"},
        "stream": True}
    line = usage_line(stack, rid)
    assert (line["requested_model"], line["model"], line["status"]) == ("claude-sonnet-4-5", "glm-4.7", 200)
    access = access_line(stack, rid)["zai_proxy"]
    assert (access["requested_model"], access["model"]) == ("claude-sonnet-4-5", "glm-4.7")
    stack.settle()
    after = tokens_by_model(stack)
    assert after.get("glm-4.7", 0) - before.get("glm-4.7", 0) == final.usage.output_tokens
    assert metric(stack, "zai_proxy_model_requests_total", requested_model="claude-sonnet-*",
                  model="glm-4.7") == mapped + 1


def test_haiku_maps_to_air_and_an_unmapped_model_passes_as_sent(stack):
    rid, other = str(uuid.uuid4()), str(uuid.uuid4())
    anthropic_client(stack, rid).messages.create(model="claude-haiku-4-5", max_tokens=8, messages=HI)
    anthropic_client(stack, other).messages.create(model="glm-4.6", max_tokens=8, messages=HI)
    assert [r["model"] for r in upstream(stack, rid)] == ["glm-4.5-air"]
    assert [r["model"] for r in upstream(stack, other)] == ["glm-4.6"]
    line = usage_line(stack, other)
    assert (line["requested_model"], line["model"]) == ("glm-4.6", "glm-4.6")


def metric(stack: StackHandle, name: str, **labels: str) -> float:
    """The sum of a series' samples whose labels include `labels`."""
    total = 0.0
    for line in stack.metrics_text().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def concurrency_cuts(stack: StackHandle) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in stack.metrics_text().splitlines()
               if line.startswith("zai_proxy_rate_limit_adjustments_total{")
               and 'limit="concurrency"' in line and 'direction="down"' in line)


def test_glm_5_1_overloaded_is_served_by_glm_4_7_and_the_record_shows_both(stack):
    rid = str(uuid.uuid4())
    cuts = concurrency_cuts(stack)
    moved = metric(stack, "zai_proxy_model_fallbacks_total", model="glm-5.1", next_model="glm-4.7",
                   code="1312")
    client = anthropic_client(stack, rid, rejecting("glm-5.1:1312"))
    with client.messages.stream(model="glm-5.1", max_tokens=64, messages=HI) as stream:
        final = stream.get_final_message()
    assert final.model == "glm-4.7" and final.content[0].text
    attempts = upstream(stack, rid)
    assert [(r["model"], r["status"], r["code"]) for r in attempts] == [
        ("glm-5.1", 429, "1312"), ("glm-4.7", 200, None)]
    first, second = (sent_body(r) for r in attempts)
    assert {k: v for k, v in first.items() if k != "model"} == \
        {k: v for k, v in second.items() if k != "model"}
    line = usage_line(stack, rid)
    assert (line["requested_model"], line["model"], line["status"]) == ("glm-5.1", "glm-4.7", 200)
    assert line["output_tokens"] == final.usage.output_tokens
    access = access_line(stack, rid)["zai_proxy"]
    assert (access["requested_model"], access["model"], access["fallback_model"]) == (
        "glm-5.1", "glm-4.7", "glm-4.7")
    assert concurrency_cuts(stack) == cuts  # a model's overload is not the account's concurrency
    assert metric(stack, "zai_proxy_model_fallbacks_total", model="glm-5.1", next_model="glm-4.7",
                  code="1312") == moved + 1
    stack.settle()
    # glm-5.1 is a model the rules name: its own label value, not `other`.
    assert metric(stack, "zai_proxy_model_requests_total", requested_model="glm-5.1", model="glm-4.7") >= 1


def test_mapped_model_falls_back_too(stack):
    """MODEL_MAP first, then the chain: claude-opus -> glm-4.7 (refused) -> glm-4.5-air."""
    rid = str(uuid.uuid4())
    reply = anthropic_client(stack, rid, rejecting("glm-4.7:1312")).messages.create(
        model="claude-opus-4-1", max_tokens=8, messages=HI)
    assert reply.model == "glm-4.5-air"
    assert [r["model"] for r in upstream(stack, rid)] == ["glm-4.7", "glm-4.5-air"]
    line = usage_line(stack, rid)
    assert (line["requested_model"], line["model"]) == ("claude-opus-4-1", "glm-4.5-air")


def test_exhausted_chain_returns_the_last_error(stack):
    rid = str(uuid.uuid4())
    client = anthropic_client(stack, rid, rejecting("glm-5.1:1312,glm-4.7:1312,glm-4.5-air:1312"))
    with pytest.raises(anthropic.RateLimitError) as refused:
        client.messages.create(model="glm-5.1", max_tokens=8, messages=HI)
    assert refused.value.status_code == 429
    assert refused.value.body["error"]["code"] == "1312"
    assert [(r["model"], r["code"]) for r in upstream(stack, rid)] == [
        ("glm-5.1", "1312"), ("glm-4.7", "1312"), ("glm-4.5-air", "1312")]
    assert metric(stack, "zai_proxy_model_fallbacks_total", model="glm-4.5-air", next_model="none",
                  code="1312") >= 1
    line = usage_line(stack, rid)
    assert (line["requested_model"], line["model"], line["status"]) == ("glm-5.1", "glm-4.5-air", 429)


def test_1311_moves_to_the_next_model_and_is_not_retried_without_one(stack):
    moved, chain_end, no_chain = (str(uuid.uuid4()) for _ in range(3))
    reply = anthropic_client(stack, moved, rejecting("glm-5.1:1311")).messages.create(
        model="glm-5.1", max_tokens=8, messages=HI)
    assert reply.model == "glm-4.7"
    assert [r["model"] for r in upstream(stack, moved)] == ["glm-5.1", "glm-4.7"]
    for rid, model in ((chain_end, "glm-4.5-air"), (no_chain, "glm-4.6")):
        with pytest.raises(anthropic.RateLimitError) as refused:
            anthropic_client(stack, rid, rejecting(f"{model}:1311")).messages.create(
                model=model, max_tokens=8, messages=HI)
        assert refused.value.body["error"]["code"] == "1311"
        assert [(r["model"], r["code"]) for r in upstream(stack, rid)] == [(model, "1311")]


def test_1312_of_a_model_in_no_chain_is_retried_as_before(stack):
    """Outside the chains 1312 keeps its own rule (retried on the same model, with back-off)."""
    rid = str(uuid.uuid4())
    with pytest.raises(anthropic.RateLimitError):
        anthropic_client(stack, rid, rejecting("glm-4.6:1312")).messages.create(
            model="glm-4.6", max_tokens=8, messages=HI, timeout=120)
    models = [r["model"] for r in upstream(stack, rid)]
    assert len(models) > 1 and set(models) == {"glm-4.6"}


def test_openai_route_falls_back_and_keeps_its_usage_splice(stack):
    rid = str(uuid.uuid4())
    client = openai_client(stack, rid, rejecting("glm-5.1:1312"))
    chunks = list(client.chat.completions.create(model="glm-5.1", stream=True, messages=HI))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.usage is None for c in chunks)  # the usage chunk the gateway asked for is removed
    attempts = upstream(stack, rid)
    assert [(r["model"], r["status"]) for r in attempts] == [("glm-5.1", 429), ("glm-4.7", 200)]
    for record in attempts:
        assert sent_body(record)["stream_options"] == {"include_usage": True}
    line = usage_line(stack, rid)
    assert (line["requested_model"], line["model"], line["status"]) == ("glm-5.1", "glm-4.7", 200)
    assert line["output_tokens"] > 0 and not line["output_estimated"]


def test_without_rules_nothing_changes(tmp_path):
    handle = StackHandle(tmp_path, stack_env()).start()
    try:
        rid = str(uuid.uuid4())
        with pytest.raises(anthropic.RateLimitError):
            anthropic_client(handle, rid, rejecting("glm-5.1:1311")).messages.create(
                model="glm-5.1", max_tokens=8, messages=HI)
        rid2 = str(uuid.uuid4())
        reply = anthropic_client(handle, rid2).messages.create(model="claude-sonnet-4-5",
                                                               max_tokens=8, messages=HI)
        assert [r["model"] for r in upstream(handle, rid)] == ["glm-5.1"]
        assert [r["model"] for r in upstream(handle, rid2)] == ["claude-sonnet-4-5"]
        line = usage_line(handle, rid2)
        # Z.AI (and the emulator) serve a Claude name with a GLM model of their choosing and say
        # which: the served model is the one the response names.
        assert (line["requested_model"], line["model"]) == ("claude-sonnet-4-5", reply.model)
        assert "model" not in access_line(handle, rid2)["zai_proxy"]  # the attempt filter saw nothing
    finally:
        handle.stop()


def test_two_extprocs_behind_one_envoy_with_redis_fall_back_correctly(tmp_path, redis_server):  # noqa: F811
    """Attempts of one request land on either process: where the request stands travels in
    Envoy's dynamic metadata, not in a process."""
    handle = StackHandle(tmp_path, stack_env(REDIS_URL=redis_server.url, **RULES),
                         replicas=2).start()
    try:
        rids = [str(uuid.uuid4()) for _ in range(8)]
        for rid in rids:
            reply = anthropic_client(handle, rid, rejecting("glm-5.1:1312,glm-4.7:1312")).messages.create(
                model="glm-5.1", max_tokens=8, messages=HI)
            assert reply.model == "glm-4.5-air"
        for rid in rids:
            assert [r["model"] for r in upstream(handle, rid)] == ["glm-5.1", "glm-4.7", "glm-4.5-air"]
            line = usage_line(handle, rid)
            assert (line["requested_model"], line["model"], line["status"]) == (
                "glm-5.1", "glm-4.5-air", 200)
        # Both processes classified refused attempts: a request's attempts crossed processes.
        refused = [overloaded_attempts(url) for url in handle.admin_urls()]
        assert sum(refused) == 2 * len(rids) and all(refused), refused
    finally:
        handle.stop()


def test_openai_exhausted_chain_records_the_last_model_tried(stack):
    """Inline routes record through the request filter, which reads the attempt's model from the
    forwarded metadata (the error names no model)."""
    rid = str(uuid.uuid4())
    client = openai_client(stack, rid, rejecting("glm-5.1:1312,glm-4.7:1312,glm-4.5-air:1312"))
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="glm-5.1", messages=HI)
    assert refused.value.body["code"] == "1312"
    assert [r["model"] for r in upstream(stack, rid)] == ["glm-5.1", "glm-4.7", "glm-4.5-air"]
    line = usage_line(stack, rid)
    assert (line["requested_model"], line["model"], line["status"]) == ("glm-5.1", "glm-4.5-air", 429)
    access = access_line(stack, rid)["zai_proxy"]  # inline: the record's own fields
    assert (access["requested_model"], access["model"]) == ("glm-5.1", "glm-4.5-air")


def test_ten_megabyte_body_is_rewritten_byte_for_byte(stack):
    """Agent conversations reach several MB: the attempt filter buffers and rewrites them whole."""
    rid = str(uuid.uuid4())
    filler = hashlib.sha256(b"seed").hexdigest() * (10 * 1024 * 1024 // 64)
    body = json.dumps({"max_tokens": 8, "stream": False, "messages": [
        {"role": "user", "content": filler},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Task",
                                           "input": {"model": "claude-sonnet-4-5"}}]},
        {"role": "user", "content": "go on"}], "model": "claude-sonnet-4-5"}).encode()
    assert len(body) > 10 * 1024 * 1024
    resp = httpx.post(f"{stack.url}/v1/messages", content=body, timeout=60, trust_env=False,
                      headers={"content-type": "application/json", "x-api-key": "proxy-handles-auth",
                               "x-request-id": rid})
    assert resp.status_code == 200, resp.text[:500]
    expected = body[:body.rindex(b'"claude-sonnet-4-5"')] + b'"glm-4.7"}'
    [record] = upstream(stack, rid)
    assert record["model"] == "glm-4.7"
    assert record["body_size"] == len(expected)
    assert record["body_sha256"] == hashlib.sha256(expected).hexdigest()
