import json

from hypothesis import given, strategies as st

from extproc.api import Endpoint, endpoint_for_path
from extproc.keys import UpstreamKey, WorkerKeys
from extproc.session import (CLIENT_CLOSED, Gateway, HeaderChanges, ImmediateReply,
                             RequestSession, client_token)

KEY = "sk-upstream-secret-0123456789"


class Clock:
    def __init__(self):
        self.now = 50.0

    def __call__(self):
        return self.now


class Recorder:
    def __init__(self):
        self.outcomes = []

    def record(self, outcome):
        self.outcomes.append(outcome)


def gateway(worker_keys=None, clock=None):
    return Gateway(UpstreamKey(KEY), worker_keys or WorkerKeys(), Recorder(), clock or Clock())


def test_anthropic_request_gets_upstream_key_in_x_api_key():
    gw = gateway()
    result = RequestSession(gw).on_request_headers({
        ":path": "/api/anthropic/v1/messages?beta=true", "authorization": "Bearer proxy-handles-auth",
        "x-zai-proxy-variant": "canary", "x-zai-proxy-worker": "admin"})
    assert isinstance(result, HeaderChanges)
    assert result.set == (("x-api-key", KEY),)
    assert set(result.remove) == {"authorization", "x-zai-proxy-variant", "x-zai-proxy-worker"}


def test_openai_request_gets_bearer_and_loses_x_api_key():
    result = RequestSession(gateway()).on_request_headers({
        ":path": "/v1/chat/completions", "x-api-key": "client-token"})
    assert isinstance(result, HeaderChanges)
    assert result.set == (("authorization", f"Bearer {KEY}"),)
    assert result.remove == ("x-api-key",)


def test_unknown_worker_gets_401_in_each_api_format(tmp_path):
    path = tmp_path / "workers"
    path.write_text("alice k-alice\n")
    gw = gateway(WorkerKeys(str(path)))
    reply = RequestSession(gw).on_request_headers({":path": "/v1/messages", "x-api-key": "k-eve"})
    assert isinstance(reply, ImmediateReply) and reply.status == 401
    body = json.loads(reply.body)
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert "worker key" in body["error"]["message"]
    reply = RequestSession(gw).on_request_headers({":path": "/v1/chat/completions"})
    body = json.loads(reply.body)
    assert reply.status == 401 and body["error"]["type"] == "invalid_api_key"
    assert [o.status for o in gw.recorder.outcomes] == [401, 401]
    ok = RequestSession(gw)
    assert isinstance(ok.on_request_headers({":path": "/v1/messages", "x-api-key": "k-alice"}),
                      HeaderChanges)
    assert ok.worker == "alice"


def test_outcome_recorded_once_with_status_and_duration():
    clock = Clock()
    gw = gateway(clock=clock)
    s = RequestSession(gw)
    s.on_request_headers({":path": "/v1/messages", "x-request-id": "r1"})
    clock.now += 2.5
    s.on_response_headers({":status": "200"}, end_of_stream=False)
    s.on_response_body(b"data: x\n\n", end_of_stream=False)
    clock.now += 1.0
    s.on_response_body(b"", end_of_stream=True)
    s.finish()
    [outcome] = gw.recorder.outcomes
    assert (outcome.status, outcome.duration, outcome.completed, outcome.request_id) == (200, 3.5, True, "r1")


def test_stream_closed_before_response_counts_as_client_closed():
    gw = gateway()
    s = RequestSession(gw)
    s.on_request_headers({":path": "/v1/messages/count_tokens"})
    s.finish()
    s.finish()
    [outcome] = gw.recorder.outcomes
    assert outcome.status == CLIENT_CLOSED and not outcome.completed
    assert outcome.endpoint is Endpoint.COUNT_TOKENS


@given(st.sampled_from(["/v1/messages", "/api/anthropic/v1/messages", "/v1/messages/count_tokens",
                        "/v1/chat/completions"]),
       st.text(alphabet="abc=&", max_size=10))
def test_endpoint_ignores_query_string(path, query):
    expected = endpoint_for_path(path)
    assert endpoint_for_path(f"{path}?{query}") is expected


def test_client_token_sources():
    assert client_token({"x-api-key": " k1 "}) == "k1"
    assert client_token({"authorization": "Bearer k2"}) == "k2"
    assert client_token({"authorization": "Basic abc"}) is None
    assert client_token({}) is None
