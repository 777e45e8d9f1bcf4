"""Bodies pass as sent: what Z.AI receives is, byte for byte, what the client sent, apart from the
one field the gateway must add (OpenAI streams that did not ask for usage get
`stream_options.include_usage`, spliced in without re-serialising anything else)."""

from __future__ import annotations

import base64
import json
import uuid

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

pytestmark = pytest.mark.timeout(300)

INSERTED = b'"stream_options":{"include_usage":true}'

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**40), max_value=10**40),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=25)
layouts = st.fixed_dictionaries({
    "indent": st.sampled_from([None, 1, "\t"]),
    "separators": st.sampled_from([(",", ":"), (", ", ": "), (" ,", " :  ")]),
    "ensure_ascii": st.booleans()})


def received(stack, request_id: str) -> bytes:
    for request in reversed(stack.upstream_requests()):
        if request.get("request_id") == request_id:
            assert request["body_b64"] is not None
            return base64.b64decode(request["body_b64"])
    raise AssertionError(f"the emulator never saw {request_id}")


def send(stack, path: str, raw: bytes, headers: dict[str, str]) -> str:
    rid = str(uuid.uuid4())
    with httpx.Client(trust_env=False, timeout=30) as client:
        with client.stream("POST", stack.url + path, content=raw,
                           headers=headers | {"x-request-id": rid, "content-type": "application/json"}) as resp:
            resp.read()
    return rid


def without_inserted(body: bytes) -> bytes:
    start = body.index(b"{") + 1
    assert body[start:].startswith(INSERTED), body[:120]
    rest = body[start + len(INSERTED):]
    return body[:start] + (rest[1:] if rest.startswith(b",") else rest)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.dictionaries(st.sampled_from(["metadata", "user", "x_extra", "n", "tags"]), values,
                             max_size=3),
       layout=layouts, stream=st.booleans(), content=st.text(min_size=1, max_size=30))
def test_openai_body_reaches_zai_byte_exact_but_the_usage_request(stack, extra, layout, stream, content):
    doc = {"model": "glm-4.7", "messages": [{"role": "user", "content": content}], "stream": stream,
           **extra}
    raw = json.dumps(doc, **layout).encode()
    rid = send(stack, "/v1/chat/completions", raw, {"authorization": "Bearer w"})
    got = received(stack, rid)
    assert (without_inserted(got) if stream else got) == raw


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.dictionaries(st.sampled_from(["metadata", "x_extra", "n", "tool_choice"]), values,
                             max_size=3),
       layout=layouts, stream=st.booleans(), content=st.text(min_size=1, max_size=30))
def test_anthropic_body_reaches_zai_byte_exact(stack, extra, layout, stream, content):
    doc = {"model": "glm-4.7", "max_tokens": 16, "messages": [{"role": "user", "content": content}],
           "stream": stream, **extra}
    raw = json.dumps(doc, **layout).encode()
    rid = send(stack, "/api/anthropic/v1/messages?beta=true", raw, {"x-api-key": "w"})
    assert received(stack, rid) == raw


@pytest.mark.parametrize("path,headers", [("/v1/chat/completions", {"authorization": "Bearer w"}),
                                          ("/v1/messages", {"x-api-key": "w"})])
def test_deep_nesting_and_huge_integers_pass_untouched(stack, path, headers):
    deep = "[" * 3000 + "]" * 3000
    raw = ('{"model":"glm-4.7","max_tokens":16,"n":123456789012345678901234567890123,'
           '"messages":[{"role":"user","content":"hi \\u00e9\\ud83d\\ude00"}],"stream":true,'
           '"metadata":{"deep":%s}}' % deep).encode()
    rid = send(stack, path, raw, headers)
    got = received(stack, rid)
    # Nesting deeper than the gateway's JSON reader takes: forwarded exactly as sent.
    assert got == raw


def test_concurrent_multi_megabyte_bodies_keep_envoy_up(stack):
    """Envoy 1.40 crashed (SIGSEGV) when the observer's copies of several MB-sized bodies filled
    the HTTP/2 connection its other ext_proc filters shared: each filter now has its own."""
    import concurrent.futures as cf
    import json as _json

    import httpx2 as _httpx

    def one(i: int) -> object:
        size = (1, 4, 8)[i % 3] * 1024 * 1024
        body = _json.dumps({"model": "glm-4.7", "max_tokens": 8, "stream": i % 2 == 0,
                            "messages": [{"role": "user", "content": "y" * size}]}).encode()
        try:
            return _httpx.post(f"{stack.url}/v1/messages", content=body, timeout=120,
                               trust_env=False, headers={"content-type": "application/json",
                                                         "x-api-key": "t"}).status_code
        except _httpx.HTTPError as exc:
            return type(exc).__name__

    with cf.ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(one, range(36)))
    assert codes == [200] * 36, codes
    assert not any("Segmentation" in line for _, line in stack.logs)
