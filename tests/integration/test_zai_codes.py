"""Every Z.AI business code through the real stack (Envoy + ext_proc + emulator): whether Envoy
retries it, what the client gets (its API's format, Z.AI's code and words, the gateway's hint) and
what the limiter or the quota gate does about it. The expectations are written out here, not read
from extproc/limiter/codes.py: these tests are the table's specification.

The emulator refuses with a code per request (`x-emulator-options: {"reject_code": ...}`) or for a
body it cannot take (1210, 1213, 1214). The key codes need a gateway whose upstream key is wrong:
a second stack reaches the same emulator through a small relay in this process (plain http on
loopback), which passes requests on as they are (its key is not the emulator's: 1000, 1002) or
without any key (1001). The emulator has no way to give 1211 or 1212 (it serves any model name);
for those two the relay answers itself, in the body shape the emulator gives its own 400s.

MAX_RETRIES=1: a retried code reaches the emulator twice, any other once. Before each test the
emulator's log and the limiter (`POST /admin/limiter/reset`, which also reopens the gate) start
afresh, so the tests do not depend on each other's order.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import typing
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import anthropic
import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.emulator.errors import ApiFormat, ZaiError, error_body
from extproc.limiter.quota import DEFAULT_CLOSURE
from extproc.limiter.signals import next_midnight
from harness import StackHandle, stack_env

pytestmark = pytest.mark.timeout(120)

ADMIN_TOKEN = "codes-admin-token-0123456789"
WRONG_KEY = "zai-wrong-key-3f9c1d7e5a2b4c6d8e0f"
WORKER = "codes-worker"
MODEL = "glm-4.7"
ASK = dict(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}])
API_PATHS = ("/v1/messages", "/chat/completions")

# What Anthropic's SDK knows as error.type (the `type` literals of its ErrorObject union).
ANTHROPIC_ERROR_TYPES = frozenset(
    typing.get_args(member.model_fields["type"].annotation)[0]
    for member in typing.get_args(typing.get_args(anthropic.types.ErrorObject)[0]))

# The SDKs' exception for each status, and the error.type OpenAI clients expect.
ANTHROPIC_EXCEPTIONS = {400: anthropic.BadRequestError, 401: anthropic.AuthenticationError,
                        429: anthropic.RateLimitError, 529: anthropic.OverloadedError}
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error"}


@dataclass(frozen=True)
class Expected:
    signal: str  # the limiter's signal (`zai_proxy_upstream_attempts_total{signal}`)
    retried: bool  # Envoy retries it (MAX_RETRIES=1: two attempts)
    status: int  # what the client gets on the Anthropic route
    anthropic_type: str  # error.type there
    zai_words: str  # a part of Z.AI's message the client must see
    log_level: str | None  # the operator line "Z.AI refused the account" (None: no such line)


EXPECTED: dict[str, Expected] = {
    "1302": Expected("concurrency", True, 429, "rate_limit_error",
                     "High concurrency usage of this API", None),
    "1303": Expected("frequency", True, 429, "rate_limit_error",
                     "High frequency usage of this API", None),
    "1304": Expected("quota", False, 429, "rate_limit_error",
                     "The daily call limit for this API has been reached", "warning"),
    "1305": Expected("overloaded", True, 529, "overloaded_error",
                     "The service may be temporarily overloaded", None),
    "1308": Expected("quota", False, 429, "rate_limit_error",
                     "Usage limit reached for 5 hour. Your limit will reset at ", "warning"),
    "1309": Expected("quota", False, 429, "rate_limit_error",
                     "Your GLM Coding Plan package has expired", "error"),
    "1310": Expected("quota", False, 429, "rate_limit_error",
                     "Weekly/Monthly Limit Exhausted. Your limit will reset at ", "warning"),
    "1311": Expected("model_unavailable", False, 429, "rate_limit_error",
                     f"Your current subscription plan does not yet include access to {MODEL}",
                     "warning"),
    "1312": Expected("overloaded", True, 429, "rate_limit_error",
                     "The current model is experiencing high traffic", None),
    "1313": Expected("quota", False, 429, "rate_limit_error",
                     "does not comply with the Fair Usage Policy", "error"),
    "1113": Expected("quota", False, 429, "rate_limit_error",
                     "Your account is in arrears", "error"),
    "1000": Expected("key_rejected", False, 401, "authentication_error",
                     "Authentication Failed", "error"),
    "1001": Expected("key_rejected", False, 401, "authentication_error",
                     "Authentication parameter not received in Header", "error"),
    "1002": Expected("key_rejected", False, 401, "authentication_error",
                     "Invalid Authentication Token", "error"),
    "1210": Expected("client_error", False, 400, "invalid_request_error",
                     "Incorrect API call parameters", None),
    "1211": Expected("client_error", False, 400, "invalid_request_error",
                     "Unknown Model, please check the model code.", None),
    "1212": Expected("client_error", False, 400, "invalid_request_error",
                     "does not support", None),
    "1213": Expected("client_error", False, 400, "invalid_request_error",
                     "messages parameter not received properly", None),
    "1214": Expected("client_error", False, 400, "invalid_request_error",
                     "Invalid messages parameter", None),
}

# The one line the gateway adds to every refusal it knows: hints as the worker reads them.
HINTS = {
    "1302": "the gateway lowered its concurrency limit and retried",
    "1303": "the gateway lowered its start rate and retried",
    "1304": "the account's daily limit is spent; the gateway sends nothing to Z.AI until 00:00 UTC+8",
    "1305": "Z.AI is overloaded; the gateway retried",
    "1308": "the account's 5-hour window is spent",
    "1309": "the GLM Coding Plan has expired",
    "1310": "the account's weekly window is spent",
    "1311": "the plan does not include this model; not retried on it",
    "1312": "this model is overloaded; the gateway retried",
    "1313": "Z.AI throttles the account under its fair-use policy; the gateway pauses requests. "
            "The operator must ask Z.AI for a review.",
    "1113": "the Z.AI account is in arrears",
    "1000": "Z.AI refused the gateway's upstream key; the operator must check ZAI_API_KEY",
    "1001": "the gateway sent Z.AI no key; the operator must check ZAI_API_KEY",
    "1002": "Z.AI refused the gateway's upstream key as invalid; the operator must check ZAI_API_KEY",
    "1210": "the request's parameters were refused; fix the request. Not retried.",
    "1211": "the model name is unknown to Z.AI",
    "1212": "the request's parameters were refused; fix the request. Not retried.",
    "1213": "the request's parameters were refused; fix the request. Not retried.",
    "1214": "the request's parameters were refused; fix the request. Not retried.",
}


# --------------------------------------------------------------------------- the relay

class Relay:
    """Plain-http stand-in for Z.AI's URL in front of the emulator: passes requests on (`pass`),
    passes them on without their key (`strip`), or answers them itself (`answer`)."""

    def __init__(self, stack: StackHandle) -> None:
        assert stack.stack.emulator is not None
        self.target = stack.stack.emulator.url
        self.ssl = ssl.create_default_context(cafile=str(stack.run_dir / "emulator-ca.pem"))
        self.mode = "pass"
        self.answer: tuple[int, dict[str, Any]] = (500, {})
        self.hits: list[str] = []
        self._lock = threading.Lock()
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._handle(b"")

            def do_POST(self) -> None:
                self._handle(self._body())

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("transfer-encoding", "").lower():
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("content-length") or 0))

            def _handle(self, body: bytes) -> None:
                status, headers, payload = relay.forward(self.command, self.path,
                                                         dict(self.headers.items()), body)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def forward(self, method: str, path: str, headers: dict[str, str],
                body: bytes) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.hits.append(path)
            mode, answer = self.mode, self.answer
        if mode == "answer" and path.endswith(API_PATHS):
            return answer[0], {"content-type": "application/json"}, json.dumps(answer[1]).encode()
        drop = {"host", "content-length", "transfer-encoding", "connection"}
        if mode == "strip":
            drop |= {"x-api-key", "authorization"}
        sent = {k: v for k, v in headers.items() if k.lower() not in drop}
        with httpx.Client(base_url=self.target, verify=self.ssl, timeout=30,
                          trust_env=False) as client:
            resp = client.request(method, path, headers=sent, content=body)
        kept = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "retry-after")}
        return resp.status_code, kept, resp.content

    def api_hits(self) -> int:
        with self._lock:
            return sum(path.endswith(API_PATHS) for path in self.hits)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- the stacks

def codes_env(**overrides: str) -> dict[str, str]:
    # No quota polling: only the answers to these requests may move the limiter or the gate.
    return stack_env(MAX_RETRIES="1", ADMIN_TOKEN=ADMIN_TOKEN, QUOTA_POLL_SECONDS="0", **overrides)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[StackHandle]:
    handle = StackHandle(tmp_path_factory.mktemp("codes"), codes_env()).start()
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def relay(gateway) -> Iterator[Relay]:
    relay = Relay(gateway)
    yield relay
    relay.close()


@pytest.fixture(scope="module")
def wrong_key(tmp_path_factory, relay) -> Iterator[StackHandle]:
    """A gateway whose upstream key is not the one the emulator accepts, reaching it through the
    relay."""
    base = f"http://127.0.0.1:{relay.port}"
    handle = StackHandle(tmp_path_factory.mktemp("wrong-key"), codes_env(
        ZAI_API_KEY=WRONG_KEY, ZAI_TARGET_URL=f"{base}/api/anthropic",
        ZAI_OPENAI_URL=f"{base}/api/coding/paas/v4")).start()
    yield handle
    handle.stop()


def reset_limiter(stack: StackHandle) -> None:
    for url in stack.admin_urls():
        resp = httpx.post(f"{url}/admin/limiter/reset", trust_env=False, timeout=10,
                          headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["limiter"]["quota_gate"] is None


@pytest.fixture(autouse=True)
def fresh(gateway, relay) -> Iterator[None]:
    gateway.emulator("POST", "/_emulator/reset")
    reset_limiter(gateway)
    relay.mode = "pass"
    yield
    reset_limiter(gateway)  # a closed gate must not outlive its test


# --------------------------------------------------------------------------- helpers

def limiter(stack: StackHandle) -> dict[str, Any]:
    [url] = stack.admin_urls()
    return httpx.get(f"{url}/health?detail=1", trust_env=False, timeout=10).json()["limiter"]


class Metrics:
    """The ext_proc's counters at one moment."""

    def __init__(self, stack: StackHandle) -> None:
        [url] = stack.admin_urls()
        text = httpx.get(f"{url}/metrics", trust_env=False, timeout=10).text
        self.samples = [(s.name, s.labels, s.value)
                        for family in text_string_to_metric_families(text)
                        for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        return sum(v for n, l, v in self.samples
                   if n == name and all(l.get(k) == want for k, want in labels.items()))

    def grew(self, before: "Metrics", name: str, **labels: str) -> float:
        return self.value(name, **labels) - before.value(name, **labels)


def emulator_attempts(stack: StackHandle) -> int:
    return sum(r["path"].endswith(API_PATHS) for r in stack.upstream_requests())


def options(code: str) -> dict[str, str]:
    return {"x-emulator-options": json.dumps({"reject_code": code})}


def anthropic_client(stack: StackHandle) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{stack.url}/api/anthropic", api_key=WORKER, max_retries=0,
                               http_client=httpx.Client(trust_env=False, timeout=60))


def openai_client(stack: StackHandle) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=WORKER, max_retries=0,
                         http_client=httpx.Client(trust_env=False, timeout=60))


def refused(call) -> anthropic.APIStatusError | openai.APIStatusError:  # type: ignore[no-untyped-def]
    with pytest.raises((anthropic.APIStatusError, openai.APIStatusError)) as caught:
        call()
    return caught.value


def ask_anthropic(stack: StackHandle, code: str | None = None,
                  body: Any = None) -> anthropic.APIStatusError:
    """One request on /api/anthropic, refused; `code` asks the emulator for it, `body` replaces
    the request (sent as it is)."""
    client = anthropic_client(stack)
    headers = options(code) if code else {}
    if body is not None:
        return refused(lambda: client.post("/v1/messages", cast_to=object, body=body,
                                           options={"headers": headers}))
    return refused(lambda: client.messages.create(**ASK, extra_headers=headers))


def ask_openai(stack: StackHandle, code: str | None = None, **changes: Any) -> openai.APIStatusError:
    client = openai_client(stack)
    headers = options(code) if code else {}
    request = {"model": MODEL, "max_tokens": 16,
               "messages": [{"role": "user", "content": "hi"}]} | changes
    return refused(lambda: client.chat.completions.create(**request, extra_headers=headers))


def check_anthropic_answer(exc: anthropic.APIStatusError, code: str) -> dict[str, Any]:
    """Anthropic's error format, with Z.AI's code and words and the gateway's hint."""
    want = EXPECTED[code]
    assert exc.status_code == want.status, exc.body
    assert isinstance(exc, ANTHROPIC_EXCEPTIONS[want.status]), type(exc)
    body = exc.body
    assert isinstance(body, dict) and body["type"] == "error", body
    error = body["error"]
    assert error["type"] == want.anthropic_type and error["type"] in ANTHROPIC_ERROR_TYPES, body
    assert error["code"] == code, body
    message = error["message"]
    assert want.zai_words in message, message
    assert "[zai-proxy: " in message and HINTS[code] in message.split("[zai-proxy: ", 1)[1], message
    assert message.endswith("]") and message.count("[zai-proxy: ") == 1, message
    return body


def check_openai_answer(exc: openai.APIStatusError, code: str, status: int) -> None:
    """OpenAI's error format: error.code Z.AI's code, error.type what OpenAI clients expect."""
    assert exc.status_code == status, exc.body
    error = exc.response.json()["error"]
    assert exc.code == error["code"] == code, error
    assert exc.type == error["type"] == OPENAI_TYPES[status], error
    assert EXPECTED[code].zai_words in error["message"], error
    assert "[zai-proxy: " in error["message"] and HINTS[code] in error["message"], error


def wait_for_record(stack: StackHandle, since: int, code: str, timeout: float = 10.0) -> list[dict]:
    """The ext_proc's JSON log lines since `since`, once the request refused with `code` is
    recorded (its usage line comes after everything the attempt logged)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = []
        for name, line in list(stack.logs[since:]):
            if name.startswith("extproc") and line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
        if any(doc.get("message") == "Token usage" and doc.get("error_code") == code for doc in lines):
            return lines
        assert time.monotonic() < deadline, f"no usage record with error_code {code}"
        time.sleep(0.05)


def check_operator_log(stack: StackHandle, since: int, code: str) -> list[dict]:
    lines = wait_for_record(stack, since, code)
    said = [doc for doc in lines if doc.get("message", "").startswith("Z.AI refused the account")
            and doc.get("code") == code]
    level = EXPECTED[code].log_level
    if level is None:
        assert said == [], said
    else:
        assert said and {doc["level"] for doc in said} == {level}, said
        assert all(doc["hint"] for doc in said), said
    return said


def check_attempts(before: Metrics, after: Metrics, code: str, attempts: int) -> None:
    """Every attempt counted with its signal, and as an upstream error with its code."""
    want = EXPECTED[code]
    assert attempts == (2 if want.retried else 1), f"{code}: {attempts} attempts"
    assert after.grew(before, "zai_proxy_upstream_attempts_total", signal=want.signal) == attempts
    assert after.grew(before, "zai_proxy_upstream_errors_total", error_class=want.signal,
                      code=code) == attempts


def limits_unmoved(state: dict[str, Any], fresh_state: dict[str, Any]) -> None:
    for key in ("concurrency_limit", "concurrency_ceiling", "start_rate_limit", "start_rate_ceiling"):
        assert state[key] == fresh_state[key], (key, state, fresh_state)
    assert state["quota_gate"] is None, state


# --------------------------------------------------------------------------- throttling

@pytest.mark.parametrize("code", ["1302", "1303"])
def test_throttling_codes_are_retried_and_lower_their_limit(gateway, code):
    """1302 lowers the concurrency limit, 1303 the start rate; Envoy retries both."""
    initial = limiter(gateway)
    before, mark = Metrics(gateway), len(gateway.logs)
    exc = ask_anthropic(gateway, code)
    check_anthropic_answer(exc, code)
    after = Metrics(gateway)
    check_attempts(before, after, code, emulator_attempts(gateway))
    state = limiter(gateway)
    if code == "1302":
        assert state["concurrency_limit"] < initial["concurrency_limit"], (initial, state)
        assert state["concurrency_ceiling"] is not None
        assert state["start_rate_limit"] == initial["start_rate_limit"]
        moved, kept = "concurrency", "rate"
    else:
        assert state["start_rate_limit"] < initial["start_rate_limit"], (initial, state)
        assert state["start_rate_ceiling"] is not None
        assert state["concurrency_limit"] == initial["concurrency_limit"]
        moved, kept = "rate", "concurrency"
    assert after.grew(before, "zai_proxy_rate_limit_adjustments_total", limit=moved,
                      direction="down") >= 1
    assert after.grew(before, "zai_proxy_rate_limit_adjustments_total", limit=kept,
                      direction="down") == 0
    assert state["quota_gate"] is None
    check_operator_log(gateway, mark, code)


# --------------------------------------------------------------------------- overload

@pytest.mark.parametrize("code", ["1305", "1312"])
def test_overload_codes_are_retried_and_move_no_limit(gateway, code):
    """Z.AI (or one model) is busy, not the account: retried, counted, no limit moves."""
    initial = limiter(gateway)
    before, mark = Metrics(gateway), len(gateway.logs)
    check_anthropic_answer(ask_anthropic(gateway, code), code)
    after = Metrics(gateway)
    check_attempts(before, after, code, emulator_attempts(gateway))
    assert after.grew(before, "zai_proxy_upstream_errors_total", error_class="overloaded",
                      code=code) == 2
    assert after.grew(before, "zai_proxy_rate_limit_adjustments_total", direction="down") == 0
    limits_unmoved(limiter(gateway), initial)
    check_operator_log(gateway, mark, code)


# --------------------------------------------------------------------------- the quota gate

def gate_seconds(code: str, quota_reset_after: float) -> float:
    """How long each quota code closes the gate: until the time Z.AI names (1308, 1310: the
    emulator names quota_reset_after from now), the next midnight UTC+8 (1304), or the default
    closure when Z.AI names none."""
    now = time.time()
    return {"1304": next_midnight(now) - now, "1308": quota_reset_after,
            "1310": quota_reset_after}.get(code, DEFAULT_CLOSURE)


@pytest.mark.parametrize("code", ["1304", "1308", "1309", "1310", "1313", "1113"])
def test_quota_codes_close_the_gate(gateway, code):
    """Not retried; the gate closes with the code until the reset, and the next request gets the
    gateway's own 429 at once, with retry-after, without reaching Z.AI."""
    initial = limiter(gateway)
    reset_after = gateway.emulator("GET", "/_emulator/config").json()["quota_reset_after"]
    before, mark = Metrics(gateway), len(gateway.logs)
    exc = ask_anthropic(gateway, code)
    check_anthropic_answer(exc, code)
    if code in ("1308", "1310"):  # Z.AI's own retry-after, passed on
        assert abs(float(exc.response.headers["retry-after"]) - reset_after) <= 2
    after = Metrics(gateway)
    attempts = emulator_attempts(gateway)
    check_attempts(before, after, code, attempts)

    state = limiter(gateway)
    gate = state["quota_gate"]
    assert gate is not None and gate["code"] == code, state
    expected = gate_seconds(code, reset_after)
    assert abs(gate["until"] - time.time() - expected) <= 5, (gate, expected)
    assert f"code {code}" in gate["message"]
    for key in ("concurrency_limit", "start_rate_limit"):
        assert state[key] == initial[key], (key, state)
    said = check_operator_log(gateway, mark, code)
    assert EXPECTED[code].zai_words in said[0]["zai_message"], said

    # The next request: the gateway's own 429, at once, nothing sent to Z.AI.
    started = time.monotonic()
    gated = ask_anthropic(gateway, code)
    assert time.monotonic() - started < 2
    assert isinstance(gated, anthropic.RateLimitError) and gated.status_code == 429
    body = gated.body
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error", body
    assert body["error"]["message"].startswith("zai-proxy: ") and f"code {code}" in body["error"]["message"]
    retry_after = float(gated.response.headers["retry-after"])
    assert retry_after >= 1 and abs(retry_after - expected) <= 5, (retry_after, expected)
    assert emulator_attempts(gateway) == attempts
    gated_metrics = Metrics(gateway)
    assert gated_metrics.grew(after, "zai_proxy_rate_limit_rejections_total", reason="quota") == 1
    assert gated_metrics.grew(after, "zai_proxy_upstream_attempts_total") == 0

    # The admin reset reopens it (the fixture does so after every test; shown here once).
    reset_limiter(gateway)
    assert limiter(gateway)["quota_gate"] is None


# --------------------------------------------------------------------------- 1311

def check_passed_through_moving_nothing(gateway: StackHandle, code: str, body: Any = None) -> None:
    """One refused request on /api/anthropic (the emulator asked for `code`, or Z.AI's answer to
    `body` sent as it is): passed through in the client's shape, not retried, the limiter neither
    adjusted nor moved, and the operator log says it."""
    initial = limiter(gateway)
    before, mark = Metrics(gateway), len(gateway.logs)
    exc = ask_anthropic(gateway, body=body) if body is not None else ask_anthropic(gateway, code)
    check_anthropic_answer(exc, code)
    after = Metrics(gateway)
    check_attempts(before, after, code, emulator_attempts(gateway))
    assert after.grew(before, "zai_proxy_rate_limit_adjustments_total") == 0
    limits_unmoved(limiter(gateway), initial)
    check_operator_log(gateway, mark, code)


def test_model_not_in_the_plan_1311_is_not_retried_and_moves_nothing(gateway):
    check_passed_through_moving_nothing(gateway, "1311")


# --------------------------------------------------------------------------- bad parameters

PARAMETER_BODIES = {
    "1210": [ASK],  # a JSON array, not an object
    "1213": {"model": MODEL, "max_tokens": 16},  # no messages
    "1214": {"model": MODEL, "max_tokens": 16, "messages": "hi"},  # messages not a list
}


@pytest.mark.parametrize("code", sorted(PARAMETER_BODIES))
def test_bad_parameters_are_passed_through_and_not_retried(gateway, code):
    check_passed_through_moving_nothing(gateway, code, body=PARAMETER_BODIES[code])


# Z.AI's own 400s for a model it does not know, and one that cannot serve the request; the
# emulator gives neither, so the relay answers in the shape of the emulator's 400s.
RELAY_ANSWERS = {
    "1211": "Unknown Model, please check the model code.",
    "1212": "The current model does not support sync call method.",
}


@pytest.mark.parametrize("code", sorted(RELAY_ANSWERS))
def test_model_parameter_codes_are_passed_through_and_not_retried(wrong_key, relay, code):
    initial = limiter(wrong_key)
    before, mark = Metrics(wrong_key), len(wrong_key.logs)
    error = ZaiError(400, code, RELAY_ANSWERS[code], "invalid_request_error")
    relay.mode, relay.answer = "answer", (400, error_body(ApiFormat.ANTHROPIC, error, "code"))
    hits = relay.api_hits()
    check_anthropic_answer(ask_anthropic(wrong_key), code)
    after = Metrics(wrong_key)
    check_attempts(before, after, code, relay.api_hits() - hits)
    assert after.grew(before, "zai_proxy_rate_limit_adjustments_total") == 0
    limits_unmoved(limiter(wrong_key), initial)
    check_operator_log(wrong_key, mark, code)


# --------------------------------------------------------------------------- the upstream key

@pytest.mark.parametrize("code", ["1000", "1001", "1002"])
def test_key_codes_tell_the_operator_without_the_key(gateway, wrong_key, relay, code):
    """The gateway's upstream key is wrong (1000 on the Anthropic endpoint, 1002 on the OpenAI
    one) or never reaches Z.AI (1001): not retried, no limit moves, an error line for the
    operator that names the code but not the key."""
    initial = limiter(wrong_key)
    before, mark = Metrics(wrong_key), len(wrong_key.logs)
    relay.mode = "strip" if code == "1001" else "pass"
    if code == "1002":
        exc = ask_openai(wrong_key)
        check_openai_answer(exc, code, 401)
        assert isinstance(exc, openai.AuthenticationError)
    else:
        exc = ask_anthropic(wrong_key)
        check_anthropic_answer(exc, code)
        assert isinstance(exc, anthropic.AuthenticationError)
    after = Metrics(wrong_key)
    attempts = emulator_attempts(gateway)
    check_attempts(before, after, code, attempts)
    [seen] = [r for r in gateway.upstream_requests() if r["path"].endswith(API_PATHS)]
    assert (seen["status"], seen["code"]) == (401, code)
    limits_unmoved(limiter(wrong_key), initial)
    said = check_operator_log(wrong_key, mark, code)
    assert all(doc["level"] == "error" and "ZAI_API_KEY" in doc["hint"] for doc in said)
    text = wrong_key.log_text()
    assert WRONG_KEY not in text and WRONG_KEY[4:20] not in text
    assert WRONG_KEY not in json.dumps(exc.response.json())


# --------------------------------------------------------------------------- the OpenAI route

OPENAI_CASES = {"1302": 429, "1305": 429, "1308": 429, "1311": 429, "1214": 400}


@pytest.mark.parametrize("code", sorted(OPENAI_CASES))
def test_openai_route_gets_the_code_in_its_format(gateway, code):
    """The same refusals on /v1/chat/completions (Z.AI's OpenAI endpoint answers 1305 with a 429)."""
    before = Metrics(gateway)
    if code == "1214":
        exc = ask_openai(gateway, messages="hi")
    else:
        exc = ask_openai(gateway, code)
    check_openai_answer(exc, code, OPENAI_CASES[code])
    after = Metrics(gateway)
    check_attempts(before, after, code, emulator_attempts(gateway))
    gate = limiter(gateway)["quota_gate"]
    assert (gate or {}).get("code") == ("1308" if code == "1308" else None), gate
