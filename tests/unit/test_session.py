import json

import pytest
from hypothesis import given, strategies as st

from extproc.api import Endpoint, endpoint_for_path
from extproc.emulator import anthropic_sse, openai_sse
from extproc.proxy.keys import UpstreamKey, WorkerKeys
from extproc.accounting.request_body import RequestInfo
from extproc.proxy.session import (CLIENT_CLOSED, BodyChange, Gateway, HeaderChanges, ImmediateReply,
                             RequestSession, client_token, with_usage_requested)
from streams import reply

KEY = "sk-upstream-secret-0123456789"


class Clock:
    def __init__(self):
        self.now = 50.0

    def __call__(self):
        return self.now


class Recorder:
    def __init__(self):
        self.outcomes = []

    async def record(self, outcome):
        self.outcomes.append(outcome)
        return {"status": outcome.status}


class Estimator:
    """Deterministic stand-in for tiktoken: one token per character."""

    async def parse(self, body, api):
        doc = json.loads(body)
        return RequestInfo(model=doc.get("model"), stream=bool(doc.get("stream")),
                           include_usage=(doc.get("stream_options") or {}).get("include_usage"),
                           segments=("x" * 40,), fixed_tokens=2, malformed=None)

    async def count(self, info):
        return sum(len(s) for s in info.segments) + info.fixed_tokens

    async def count_text(self, text):
        return len(text)


def gateway(worker_keys=None, clock=None):
    return Gateway(UpstreamKey(KEY), worker_keys or WorkerKeys(), Recorder(), Estimator(),
                   clock or Clock())


def test_anthropic_request_gets_upstream_key_in_x_api_key():
    result = RequestSession(gateway()).on_request_headers({
        ":path": "/api/anthropic/v1/messages?beta=true", "authorization": "Bearer proxy-handles-auth",
        "x-zai-proxy-variant": "canary", "x-zai-proxy-worker": "admin"})
    assert isinstance(result, HeaderChanges)
    assert dict(result.set) == {"x-api-key": KEY, "accept-encoding": "identity"}
    assert set(result.remove) == {"authorization", "x-zai-proxy-variant", "x-zai-proxy-worker"}


def test_openai_request_gets_bearer_and_loses_x_api_key():
    result = RequestSession(gateway()).on_request_headers({
        ":path": "/v1/chat/completions", "x-api-key": "client-token"})
    assert isinstance(result, HeaderChanges)
    assert dict(result.set)["authorization"] == f"Bearer {KEY}"
    assert result.remove == ("x-api-key",)


async def test_unknown_worker_gets_401_in_each_api_format(tmp_path):
    path = tmp_path / "workers"
    path.write_text("alice k-alice\n")
    gw = gateway(WorkerKeys(str(path)))
    session = RequestSession(gw)
    reply_ = session.on_request_headers({":path": "/v1/messages", "x-api-key": "k-eve"})
    assert isinstance(reply_, ImmediateReply) and reply_.status == 401
    assert reply_.details.startswith("zai_proxy")
    body = json.loads(reply_.body)
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert "worker key" in body["error"]["message"]
    await session.complete(completed=True)
    reply_ = RequestSession(gw).on_request_headers({":path": "/v1/chat/completions"})
    body = json.loads(reply_.body)
    assert reply_.status == 401 and body["error"]["type"] == "invalid_api_key"
    [outcome] = gw.recorder.outcomes
    assert outcome.status == 401 and outcome.tokens is None
    ok = RequestSession(gw)
    assert isinstance(ok.on_request_headers({":path": "/v1/messages", "x-api-key": "k-alice"}),
                      HeaderChanges)
    assert ok.worker == "alice"


async def run_stream(session, clock, body_bytes, chunks, content_type="text/event-stream"):
    session.on_request_headers({":path": "/v1/messages", "x-request-id": "r1"})
    await session.on_request_body(body_bytes, True)
    clock.now += 1.0
    session.on_response_headers({":status": "200", "content-type": content_type}, False)
    for i, chunk in enumerate(chunks):
        clock.now += 0.5
        session.on_response_body(chunk, i == len(chunks) - 1)


async def test_reported_usage_is_final_and_times_are_measured():
    clock = Clock()
    gw = gateway(clock=clock)
    r = reply(["Hello ", "there"])
    chunks = [e.encode() for e in anthropic_sse.stream_events(r)]
    session = RequestSession(gw)
    await run_stream(session, clock, b'{"model":"claude-x","stream":true}', chunks)
    assert await session.complete(completed=True) == {"status": 200}
    assert await session.complete(completed=False) is None  # exactly once
    [o] = gw.recorder.outcomes
    assert (o.status, o.completed, o.request_id, o.model, o.requested_model) == (200, True, "r1", "glm-4.7", "claude-x")
    t = o.tokens
    assert (t.input, t.output, t.cache_read, t.cache_write, t.estimated) == (
        r.input_tokens, r.output_tokens, r.cache_read_tokens, r.cache_write_tokens, False)
    first_delta = next(i for i, c in enumerate(chunks) if c.startswith(b"event: content_block_delta"))
    assert o.time_to_first_token == pytest.approx(1.0 + 0.5 * (first_delta + 1))
    assert o.duration == pytest.approx(1.0 + 0.5 * len(chunks))


async def test_cut_stream_estimates_output_from_delivered_text():
    clock = Clock()
    gw = gateway(clock=clock)
    events = anthropic_sse.stream_events(reply(["alpha ", "beta ", "gamma"]))
    delivered = events[:5]  # message_start, block start, ping, two deltas
    session = RequestSession(gw)
    await run_stream(session, clock, b'{"model":"glm-4.7"}', [e.encode() for e in delivered])
    await session.complete(completed=False)
    [o] = gw.recorder.outcomes
    text = "".join(e.text or "" for e in delivered)
    assert o.tokens.output == len(text) and o.tokens.output_estimated
    assert not o.tokens.input_estimated  # message_start reported it


async def test_no_usage_at_all_estimates_both_sides():
    clock = Clock()
    gw = gateway(clock=clock)
    session = RequestSession(gw)
    await run_stream(session, clock, b'{"model":"glm-4.7"}', [b"event: ping\ndata: {}\n\n"])
    await session.complete(completed=False)
    t = gw.recorder.outcomes[0].tokens
    assert (t.input, t.input_estimated, t.output, t.output_estimated) == (42, True, 0, True)


async def test_rejected_upstream_costs_no_tokens():
    clock = Clock()
    gw = gateway(clock=clock)
    session = RequestSession(gw)
    await run_stream(session, clock, b'{"model":"glm-4.7"}',
                     [b'{"type":"error","error":{"type":"1302","message":"busy"}}'], "application/json")
    session.status = 429
    await session.complete(completed=True)
    o = gw.recorder.outcomes[0]
    assert o.tokens is None and o.error_code == "1302"


async def test_client_gone_before_response_is_499():
    gw = gateway()
    session = RequestSession(gw)
    session.on_request_headers({":path": "/v1/messages/count_tokens"})
    await session.complete(completed=False)
    [o] = gw.recorder.outcomes
    assert o.status == CLIENT_CLOSED and not o.completed and o.endpoint is Endpoint.COUNT_TOKENS


async def test_openai_stream_without_include_usage_is_asked_and_chunk_removed():
    clock = Clock()
    gw = gateway(clock=clock)
    session = RequestSession(gw)
    session.on_request_headers({":path": "/v1/chat/completions"})
    body = b'{"model":"glm-4.7","stream":true,"messages":[]}'
    change = await session.on_request_body(body, True)
    assert isinstance(change, BodyChange)
    assert json.loads(change.body) == {**json.loads(body), "stream_options": {"include_usage": True}}
    assert dict(change.headers.set)["content-length"] == str(len(change.body))
    r = reply(["a", "b"], cache_write=0)
    with_usage = b"".join(e.encode() for e in openai_sse.stream_events(r, True))
    without = b"".join(e.encode() for e in openai_sse.stream_events(r, False))
    session.on_response_headers({":status": "200", "content-type": "text/event-stream"}, False)
    out = session.on_response_body(with_usage, True)
    assert out == without
    await session.complete(completed=True)
    t = gw.recorder.outcomes[0].tokens
    assert (t.output, t.estimated) == (r.output_tokens, False)


@given(st.dictionaries(st.sampled_from(["model", "stream", "messages", "n"]),
                       st.one_of(st.integers(), st.text(max_size=5), st.booleans()), max_size=4),
       st.sampled_from([None, {}, {"include_usage": False}, {"other": 1}]))
def test_usage_request_keeps_every_other_field(doc, options):
    if options is not None:
        doc = {**doc, "stream_options": options}
    raw = json.dumps(doc).encode()
    out = json.loads(with_usage_requested(raw))
    assert out.pop("stream_options") == {**(options or {}), "include_usage": True}
    doc.pop("stream_options", None)
    assert out == doc


@given(st.sampled_from(["/v1/messages", "/api/anthropic/v1/messages", "/v1/messages/count_tokens",
                        "/v1/chat/completions"]),
       st.text(alphabet="abc=&", max_size=10))
def test_endpoint_ignores_query_string(path, query):
    assert endpoint_for_path(f"{path}?{query}") is endpoint_for_path(path)


def test_client_token_sources():
    assert client_token({"x-api-key": " k1 "}) == "k1"
    assert client_token({"authorization": "Bearer k2"}) == "k2"
    assert client_token({"authorization": "Basic abc"}) is None
    assert client_token({}) is None


async def test_inline_stream_reset_right_after_its_headers_is_envoys_502_but_a_later_leave_is_200():
    clock = Clock()
    gw = gateway(clock=clock)
    reset = RequestSession(gw)
    reset.on_request_headers({":path": "/v1/chat/completions", "x-request-id": "reset"})
    reset.on_response_headers({":status": "200", "content-type": "text/event-stream"}, False)
    clock.now += 0.001  # the upstream reset before this stream's answer was applied
    await reset.complete(completed=False)
    left = RequestSession(gw)
    left.on_request_headers({":path": "/v1/chat/completions", "x-request-id": "left"})
    left.on_response_headers({":status": "200", "content-type": "text/event-stream"}, False)
    clock.now += 2.0  # the client gave up waiting for the first token
    await left.complete(completed=False)
    statuses = {o.request_id: (o.status, o.completed) for o in gw.recorder.outcomes}
    assert statuses == {"reset": (502, False), "left": (200, False)}


async def test_a_request_without_room_is_held_then_admitted_when_a_slot_frees():
    """The request-headers phase answers at once when the account has room; otherwise it says
    `Hold` (Envoy must wait longer) and `admit_held` gives the answer once a slot is back."""
    import asyncio

    from extproc.limiter.account import AccountLimiter, LimiterSettings
    from extproc.limiter.stores.local import LocalStore
    from extproc.proxy.answers import Hold

    settings = LimiterSettings(initial=1, minimum=1, maximum=1, rate_initial=6000, rate_minimum=12,
                               rate_maximum=6000, max_wait=5, max_queue=4, lease_ttl=60,
                               probe_interval=15, state_file=None, budgets={})
    gw = gateway()
    gw.limiter = AccountLimiter("acct", settings, LocalStore())
    gw.observer_grace = 0.0  # no observer stream here: each request records itself at once
    headers = {":path": "/v1/messages", "x-api-key": "w", "x-request-id": "r"}
    first, second = RequestSession(gw, inline=False), RequestSession(gw, inline=False)

    assert isinstance(await first.request_headers(headers), HeaderChanges)
    assert first.ticket is not None and first.permit is not None
    held = await second.request_headers(headers)
    assert held == Hold(5)
    assert second.ticket is None and second.permit is None  # not admitted: no ticket yet

    waiting = asyncio.ensure_future(second.admit_held())
    await asyncio.sleep(0.01)
    assert not waiting.done()  # still queued behind the one slot
    await first.complete(completed=False)  # the first request ends: its slot comes back
    answer = await asyncio.wait_for(waiting, 5)
    assert isinstance(answer, HeaderChanges) and answer.set[0] == ("x-api-key", KEY)
    assert second.ticket is not None and second.permit is not None
    assert gw.admitted.keys() == {second.session_id}
    await second.complete(completed=False)
    assert gw.limiter.admission.in_flight == 0
