"""The upstream key never shows in any log line, metric or response, whatever happens."""

from __future__ import annotations

import time

import anthropic
import httpx2 as httpx
import openai

from harness import StackHandle, stack_env

ASK = dict(model="glm-4.7", max_tokens=16, messages=[{"role": "user", "content": "hello"}])


def test_upstream_key_appears_nowhere(tmp_path):
    keys = tmp_path / "worker-keys"
    keys.write_text("alice wk-alice-0001\n")
    handle = StackHandle(tmp_path, stack_env(WORKER_KEYS_FILE=str(keys), LOG_LEVEL="DEBUG")).start()
    seen: list[str] = []

    def keep(resp: httpx.Response) -> None:
        seen.append(f"{resp.status_code} {dict(resp.headers)} {resp.text}")

    plain = httpx.Client(trust_env=False, timeout=30, event_hooks={"response": [lambda r: r.read()]})
    try:
        key = handle.upstream_key
        ant = anthropic.Anthropic(base_url=f"{handle.url}/api/anthropic", api_key="wk-alice-0001",
                                  max_retries=0, http_client=httpx.Client(
                                      trust_env=False, event_hooks={"response": [lambda r: r.read(), keep]}))
        oai = openai.OpenAI(base_url=f"{handle.url}/v1", api_key="wk-alice-0001", max_retries=0,
                            http_client=httpx.Client(
                                trust_env=False, event_hooks={"response": [lambda r: r.read(), keep]}))
        # Successes, streamed and not, in both formats.
        ant.messages.create(**ASK)
        with ant.messages.stream(**ASK) as stream:
            stream.until_done()
        list(oai.chat.completions.create(model="glm-4.7", stream=True,
                                         messages=[{"role": "user", "content": "x"}]))
        # Gateway-made and upstream-made errors.
        for path, headers in (("/v1/messages", {"x-api-key": "wrong"}),
                              ("/v1/chat/completions", {}),
                              ("/v1/messages", {"x-api-key": "wk-alice-0001"})):
            keep(plain.post(f"{handle.url}{path}", headers=headers, content=b"{not json"))
        handle.emulator("POST", "/_emulator/config", json={"api_key": "some-other-key-000"})
        keep(plain.post(f"{handle.url}/v1/messages", headers={"x-api-key": "wk-alice-0001"}, json=ASK))
        handle.emulator("POST", "/_emulator/config", json={"api_key": key, "concurrency_cap": 0,
                                                           "quota_requests": 1})
        for _ in range(2):
            keep(plain.post(f"{handle.url}/v1/chat/completions", json=ASK,
                            headers={"authorization": "Bearer wk-alice-0001"}))
        # ext_proc gone.
        handle.stop_extproc()
        keep(plain.post(f"{handle.url}/v1/messages", headers={"x-api-key": "wk-alice-0001"}, json=ASK))
        handle.start_extproc()
        for path in ("/metrics", "/health", "/nope"):
            keep(plain.get(f"{handle.url}{path}"))
        time.sleep(1.5)  # let Envoy flush its access log
        assert len(seen) >= 12
        assert any('"log":"access"' in line or '"log": "access"' in line for _, line in handle.logs)
        assert any("zai_proxy_requests_total" in s for s in seen)
        for text in seen + [handle.log_text(), handle.metrics_text()]:
            assert key not in text
    finally:
        plain.close()
        handle.stop()
