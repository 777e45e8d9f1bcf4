"""Tests for the Z.AI emulator (extproc.emulator): pure builders, the HTTP app on a
real loopback socket, official SDK clients, TLS, and the command line."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

import extproc.emulator as emulator_pkg
from extproc.emulator import EmulatorOptions, EmulatorServer, anthropic_sse, openai_sse
from extproc.emulator.cli import build_parser
from extproc.emulator.content import (
    count_output_tokens,
    delivered_text,
    estimate_input_tokens,
)
from extproc.emulator.options import field_types
from extproc.emulator.records import redact_pairs
from extproc.emulator.reply import SseEvent, make_plan, plan_reply

KEY = "zai-test-key-7f3a9c"
ROOT = Path(__file__).resolve().parents[2]
ANTHROPIC_URL = "/api/anthropic/v1/messages"
CODING_URL = "/api/coding/paas/v4/chat/completions"
GENERAL_URL = "/api/paas/v4/chat/completions"
BODY: dict[str, Any] = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 256,
    "system": "You are terse.",
    "messages": [{"role": "user", "content": "Say hello, 世界."}],
}


class FakeClock:
    """A settable clock for the emulator's rate window and quota."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def serve(
    clock: FakeClock | None = None, wall: FakeClock | None = None, **options: Any
) -> AsyncIterator[tuple[EmulatorServer, aiohttp.ClientSession]]:
    clocks: dict[str, Any] = {}
    if clock is not None:
        clocks["clock"] = clock
    if wall is not None:
        clocks["wall_clock"] = wall
    server = EmulatorServer(EmulatorOptions(api_key=KEY, **options), **clocks)
    async with server, aiohttp.ClientSession(base_url=server.url) as session:
        yield server, session


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def parse_sse(raw: bytes) -> list[tuple[str | None, Any]]:
    """(event name, decoded data) for each SSE event in a complete body."""
    events = []
    for block in raw.decode("utf-8").split("\n\n"):
        if not block.strip():
            continue
        name, data = None, None
        for line in block.split("\n"):
            field_name, _, value = line.partition(": ")
            if field_name == "event":
                name = value
            elif field_name == "data":
                data = value if value == "[DONE]" else json.loads(value)
        events.append((name, data))
    return events


def payload(event: SseEvent) -> Any:
    """An event's JSON data (the builders' events other than [DONE] are dicts)."""
    assert not isinstance(event.data, str)
    return event.data


async def stats(session: aiohttp.ClientSession) -> dict[str, Any]:
    async with session.get("/_emulator/stats") as resp:
        return dict(await resp.json())


async def wait_in_flight(session: aiohttp.ClientSession, expected: int) -> None:
    """The server releases a slot just after the client sees the end; poll briefly."""
    for _ in range(100):
        if (await stats(session))["in_flight"] == expected:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"in_flight never became {expected}: {await stats(session)}")


# ------------------------------------------------------------------ pure builders


def test_anthropic_stream_builder_order_and_usage() -> None:
    options = EmulatorOptions(api_key=KEY, events_per_stream=5, cache_read_tokens=7,
                              cache_write_tokens=3)
    reply = plan_reply(BODY, options, "msg_x", 1)
    events = anthropic_sse.stream_events(reply)
    names = [e.name for e in events]
    assert names == ["message_start", "content_block_start", "ping"] + [
        "content_block_delta"
    ] * 5 + ["content_block_stop", "message_delta", "message_stop"]
    start_usage = payload(events[0])["message"]["usage"]
    assert start_usage == {"input_tokens": estimate_input_tokens(BODY),
                           "cache_creation_input_tokens": 3,
                           "cache_read_input_tokens": 7, "output_tokens": 1}
    final_usage = payload(events[-2])["usage"]
    assert final_usage["output_tokens"] == count_output_tokens(options.text)
    assert final_usage["input_tokens"] == start_usage["input_tokens"]
    assert events[-2].encode().startswith(b"event: message_delta\ndata: {")


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=40),
    text=st.text(min_size=1, max_size=200).filter(lambda t: t.strip()),
)
def test_deltas_rebuild_delivered_text_and_count(n: int, text: str) -> None:
    options = EmulatorOptions(api_key=KEY, events_per_stream=n, text=text)
    reply = plan_reply(BODY, options, "id", 1)
    full = delivered_text(text, n)
    anthropic_events = anthropic_sse.stream_events(reply)
    deltas = [payload(e)["delta"]["text"] for e in anthropic_events
              if e.name == "content_block_delta"]
    assert len(deltas) == n and all(d.strip() for d in deltas)
    assert "".join(deltas) == full
    assert payload(anthropic_events[-2])["usage"]["output_tokens"] == count_output_tokens(full)
    chunks = openai_sse.stream_events(reply, include_usage=True)
    content = "".join(payload(c)["choices"][0]["delta"].get("content", "")
                      for c in chunks[:-1] if payload(c)["choices"])
    assert content == full
    assert payload(chunks[-2])["usage"]["completion_tokens"] == count_output_tokens(full)


def test_failure_plans_error_wins_when_earlier_and_cut_wins_ties() -> None:
    def plan(error: int, cut: int) -> Any:
        options = EmulatorOptions(api_key=KEY, events_per_stream=4,
                                  error_after_events=error, disconnect_after_events=cut)
        reply = plan_reply(BODY, options, "id", 1)
        return anthropic_sse.stream_plan(reply, options)

    errored = plan(1, 3)
    assert errored.cut_at is None
    assert [e.name for e in errored.events][-2:] == ["content_block_delta", "error"]
    tie = plan(2, 2)
    assert tie.cut_at is not None
    assert sum(e.text is not None for e in tie.sent_events) == 2
    assert not any(e.error for e in tie.sent_events)
    beyond = plan(-1, 99)  # clamps to after the last delta
    assert [e.name for e in beyond.events][beyond.cut_at] == "content_block_stop"
    at_zero = make_plan([SseEvent("a", {}), SseEvent("b", {}, text="x")],
                        SseEvent("error", {}, error=True),
                        EmulatorOptions(api_key=KEY, error_after_events=0))
    assert [e.name for e in at_zero.events] == ["a", "error"]


def test_options_validation_is_clear_and_atomic() -> None:
    options = EmulatorOptions(api_key=KEY)
    with pytest.raises(ValueError, match="unknown emulator option 'bogus'"):
        options.update({"bogus": 1})
    with pytest.raises(ValueError, match="'concurrency_cap' must be int, got bool"):
        options.update({"concurrency_cap": True})
    with pytest.raises(ValueError, match="'event_interval' must be >= 0"):
        options.update({"concurrency_cap": 3, "event_interval": -1})
    assert options.concurrency_cap == 0  # nothing applied from the failed update
    with pytest.raises(ValueError, match="'api_key' must be str, got int <redacted>"):
        options.update({"api_key": 5})
    options.update({"first_event_delay": 1, "text": "hi there"})
    assert options.first_event_delay == 1.0 and isinstance(options.first_event_delay, float)
    assert options.public_dict()["api_key"] == "<redacted>"
    with pytest.raises(ValueError, match="text"):
        EmulatorOptions(api_key=KEY, text="   ")


def test_every_option_is_documented_and_has_a_cli_flag() -> None:
    doc = emulator_pkg.__doc__ or ""
    flags = {a.dest for a in build_parser()._actions}
    for name in field_types():
        assert f"``{name}``" in doc, name
        assert name == "api_key" or name in flags, name


def test_redaction_rules() -> None:
    pairs = [("Authorization", f"Bearer {KEY}"), ("X-Api-Key", KEY),
             ("x-goog-user-token", "t"), ("x-note", f"prefix {KEY}"), ("Accept", "*/*")]
    redacted = dict(redact_pairs(pairs, KEY))
    assert redacted["Authorization"] == "sha256:" + hashlib.sha256(
        f"Bearer {KEY}".encode()).hexdigest()
    assert redacted["x-goog-user-token"].startswith("sha256:")
    assert redacted["x-note"].startswith("sha256:")
    assert redacted["Accept"] == "*/*"


# ------------------------------------------------------------------ HTTP: success


@pytest.mark.asyncio
async def test_anthropic_stream_over_http() -> None:
    async with serve(events_per_stream=6) as (server, session):
        body = {**BODY, "stream": True}
        async with session.post(ANTHROPIC_URL + "?beta=true", json=body,
                                headers=bearer()) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert resp.headers["Cache-Control"] == "no-cache"
            events = parse_sse(await resp.read())
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == server.options.text
    start, final = events[0][1]["message"], events[-2][1]
    assert start["id"].startswith("msg_") and start["model"] == "glm-4.7"
    assert start["usage"]["input_tokens"] == estimate_input_tokens(body)
    assert final["usage"]["output_tokens"] == count_output_tokens(text)
    assert final["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}


@pytest.mark.asyncio
@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("path", [CODING_URL, GENERAL_URL])
async def test_openai_stream_with_and_without_usage(include_usage: bool, path: str) -> None:
    async with serve(events_per_stream=4, cache_read_tokens=5) as (server, session):
        body = {**BODY, "model": "glm-4.6", "stream": True,
                "stream_options": {"include_usage": include_usage}}
        async with session.post(path, json=body, headers=bearer()) as resp:
            assert resp.status == 200
            events = parse_sse(await resp.read())
    assert all(name is None for name, _ in events)
    assert events[-1][1] == "[DONE]"
    chunks = [data for _, data in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "glm-4.6"
               for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == server.options.text
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes == [None] * 4 + ["stop"]
    usage_chunks = [c for c in chunks if "usage" in c]
    if not include_usage:
        assert usage_chunks == []
        return
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert usage_chunks[0]["choices"] == []
    prompt = estimate_input_tokens(body) + 5
    completion = count_output_tokens(text)
    assert usage_chunks[0]["usage"] == {
        "prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": 5}}


@pytest.mark.asyncio
async def test_non_streaming_both_formats_and_count_tokens() -> None:
    async with serve(input_tokens=1234, cache_write_tokens=9) as (server, session):
        async with session.post(ANTHROPIC_URL, json=BODY, headers={"x-api-key": KEY}) as resp:
            message = await resp.json()
        async with session.post(CODING_URL, json=BODY, headers=bearer()) as resp:
            completion = await resp.json()
        async with session.post(ANTHROPIC_URL + "/count_tokens", json=BODY,
                                headers={"x-api-key": KEY}) as resp:
            counted = await resp.json()
        server.options.update({"input_tokens": -1})
        async with session.post(ANTHROPIC_URL + "/count_tokens", json=BODY,
                                headers=bearer()) as resp:
            derived = await resp.json()
        assert (await stats(session))["accepted"] == 2  # count_tokens is not throttled
    text = server.options.text
    assert message["type"] == "message" and message["content"] == [{"type": "text", "text": text}]
    assert message["usage"] == {"input_tokens": 1234, "cache_creation_input_tokens": 9,
                                "cache_read_input_tokens": 0,
                                "output_tokens": count_output_tokens(text)}
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert completion["usage"]["prompt_tokens"] == 1234
    assert counted == {"input_tokens": 1234}
    assert derived == {"input_tokens": estimate_input_tokens(BODY)}


# ------------------------------------------------------------------ HTTP: refusals


@pytest.mark.asyncio
async def test_auth_errors_in_each_format() -> None:
    async with serve() as (_, session):
        cases = [
            (ANTHROPIC_URL, {}, "1001"),
            (ANTHROPIC_URL, {"x-api-key": "wrong"}, "1000"),
            (ANTHROPIC_URL, {"x-api-key": "wrong", **bearer()}, "1000"),  # x-api-key wins
            (CODING_URL, {}, "1001"),
            (CODING_URL, {"x-api-key": KEY}, "1001"),  # OpenAI reads only Authorization
            (CODING_URL, bearer("wrong"), "1002"),
        ]
        for path, headers, code in cases:
            async with session.post(path, json=BODY, headers=headers) as resp:
                assert resp.status == 401, (path, headers)
                body = await resp.json()
            if path == ANTHROPIC_URL:
                assert body["type"] == "error"
                assert body["error"]["type"] == "authentication_error"
            assert body["error"]["code"] == code, (path, headers)
            assert KEY not in json.dumps(body)
        async with session.post(ANTHROPIC_URL, json=BODY, headers=bearer()) as resp:
            assert resp.status == 200  # Claude Code's ANTHROPIC_AUTH_TOKEN style


@pytest.mark.asyncio
async def test_bad_bodies_get_400_in_each_format() -> None:
    async with serve() as (_, session):
        async with session.post(CODING_URL, data=b"{not json", headers=bearer()) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "1210"
        async with session.post(ANTHROPIC_URL, data=b"[1]", headers=bearer()) as resp:
            body = await resp.json()
            assert resp.status == 400 and body["error"]["type"] == "invalid_request_error"
        async with session.post(ANTHROPIC_URL, json={"messages": []}, headers=bearer()) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == {
                "type": "invalid_request_error", "code": "1213",
                "message": "model parameter not received properly"}
        async with session.post(CODING_URL, json={"model": "glm-4.7"}, headers=bearer()) as resp:
            assert (await resp.json())["error"]["code"] == "1213"


@pytest.mark.asyncio
async def test_concurrency_cap_gives_1302_until_a_slot_frees() -> None:
    # Delays long enough that both slots are still held on a loaded machine.
    async with serve(concurrency_cap=2, first_event_delay=1.5) as (server, session):
        body = {**BODY, "stream": True}
        first = await session.post(CODING_URL, json=body, headers=bearer())
        server.options.update({"first_event_delay": 3.0})  # outlives the first
        second = await session.post(ANTHROPIC_URL, json=body, headers=bearer())
        assert first.status == second.status == 200  # headers flushed before the delay
        async with session.post(CODING_URL, json=body, headers=bearer()) as resp:
            assert resp.status == 429 and "retry-after" not in resp.headers
            assert (await resp.json())["error"] == {
                "code": "1302",
                "message": "High concurrency usage of this API, please reduce concurrency "
                           "or contact customer service to increase limits"}
        async with session.post(ANTHROPIC_URL, json=body, headers=bearer()) as resp:
            error = (await resp.json())["error"]
            assert resp.status == 429 and error["type"] == "1302" and error["code"] == "1302"
        await first.read()
        first.release()
        await wait_in_flight(session, 1)
        server.options.update({"first_event_delay": 0})
        async with session.post(CODING_URL, json=body, headers=bearer()) as resp:
            assert resp.status == 200
            await resp.read()
        assert (await stats(session))["in_flight"] <= 1  # the second is still running
        await second.read()
        second.release()
        await wait_in_flight(session, 0)
        counts = await stats(session)
    assert counts["max_in_flight"] == 2 and counts["accepted"] == 3
    assert counts["rejected"] == {"1302": 2}


@pytest.mark.asyncio
async def test_rate_cap_gives_1303_within_the_sliding_window() -> None:
    clock = FakeClock(1000.0)
    async with serve(clock=clock, rate_cap=2, rate_window=10.0) as (server, session):
        async def status() -> tuple[int, str | None]:
            async with session.post(CODING_URL, json=BODY, headers=bearer()) as resp:
                body = await resp.json()
                return resp.status, body.get("error", {}).get("code")

        assert await status() == (200, None)
        clock.now += 6
        assert await status() == (200, None)
        clock.now += 3.9  # first start is 9.9 s old: still inside the window
        assert await status() == (429, "1303")
        clock.now += 0.2  # first start has left the window
        assert await status() == (200, None)
        assert await status() == (429, "1303")
        server.options.update({"anthropic_429_type": "rate_limit_error"})
        async with session.post(ANTHROPIC_URL, json=BODY, headers=bearer()) as resp:
            error = (await resp.json())["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "1303"
            assert "retry-after" not in resp.headers


@pytest.mark.asyncio
async def test_quota_gives_1308_with_utc8_reset_time_then_resets() -> None:
    clock = FakeClock(50.0)
    wall = FakeClock(datetime(2026, 11, 23, 8, 4, 5, tzinfo=UTC).timestamp())
    async with serve(clock=clock, wall=wall, quota_requests=2,
                     quota_reset_after=5 * 3600) as (_, session):
        for _ in range(2):
            async with session.post(CODING_URL, json=BODY, headers=bearer()) as resp:
                assert resp.status == 200
        clock.now += 600
        wall.now += 600
        async with session.post(CODING_URL, json=BODY, headers=bearer()) as resp:
            assert resp.status == 429
            assert resp.headers["retry-after"] == str(5 * 3600 - 600)
            assert (await resp.json())["error"] == {
                "code": "1308",
                "message": "Usage limit reached for 5 hour. "
                           "Your limit will reset at 2026-11-23 21:04:05"}
        async with session.post(ANTHROPIC_URL, json=BODY, headers=bearer()) as resp:
            assert (await resp.json())["error"]["type"] == "1308"
        clock.now += 5 * 3600 - 600
        async with session.post(CODING_URL, json=BODY, headers=bearer()) as resp:
            assert resp.status == 200
        assert (await stats(session))["rejected"] == {"1308": 2}


# ------------------------------------------------------------------ HTTP: failures


@pytest.mark.asyncio
async def test_error_after_events_sends_error_inside_a_200_stream() -> None:
    async with serve(events_per_stream=5, error_after_events=2) as (_, session):
        body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
        async with session.post(ANTHROPIC_URL, json=body, headers=bearer()) as resp:
            assert resp.status == 200
            events = parse_sse(await resp.read())  # ends cleanly
        assert [n for n, _ in events] == ["message_start", "content_block_start", "ping",
                                          "content_block_delta", "content_block_delta", "error"]
        assert events[-1][1]["type"] == "error"
        assert events[-1][1]["error"]["type"] == "overloaded_error"
        async with session.post(CODING_URL, json=body, headers=bearer()) as resp:
            assert resp.status == 200
            chunks = [d for _, d in parse_sse(await resp.read())]
        assert len(chunks) == 3 and chunks[-1]["error"]["code"] == "1305"
        async with session.post(ANTHROPIC_URL, json=BODY, headers=bearer()) as resp:
            assert resp.status == 529
            assert (await resp.json())["error"]["type"] == "overloaded_error"
        assert (await stats(session))["outcomes"] == {"error_event": 2, "error_response": 1}


@pytest.mark.asyncio
@pytest.mark.parametrize("path", [ANTHROPIC_URL, CODING_URL])
async def test_disconnect_after_events_cuts_the_stream_and_frees_the_slot(path: str) -> None:
    async with serve(events_per_stream=6, disconnect_after_events=3,
                     concurrency_cap=1) as (server, session):
        async with session.post(path, json={**BODY, "stream": True}, headers=bearer()) as resp:
            assert resp.status == 200
            received = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in resp.content.iter_any():
                    received += chunk
        events = parse_sse(received.rsplit(b"\n\n", 1)[0] + b"\n\n")
        deltas = [d for n, d in events if n == "content_block_delta" or
                  (n is None and d["choices"] and d["choices"][0]["delta"].get("content"))]
        assert len(deltas) == 3
        assert not any(n == "message_stop" or d == "[DONE]" for n, d in events)
        await wait_in_flight(session, 0)
        server.options.update({"disconnect_after_events": -1})
        async with session.post(path, json=BODY, headers=bearer()) as resp:
            assert resp.status == 200  # the cut stream's slot was released
        records = (await (await session.get("/_emulator/requests")).json())["requests"]
        assert [r["outcome"] for r in records] == ["disconnected", "completed"]


@pytest.mark.asyncio
async def test_non_streaming_disconnect_drops_the_connection() -> None:
    async with serve(disconnect_after_events=0) as (_, session):
        with pytest.raises(aiohttp.ClientConnectionError):  # reset or disconnected
            async with session.post(CODING_URL, json=BODY, headers=bearer()) as resp:
                await resp.read()


@pytest.mark.asyncio
async def test_client_leaving_during_a_stall_frees_the_slot() -> None:
    async with serve(concurrency_cap=1, first_event_delay=30) as (server, session):
        async with aiohttp.ClientSession(base_url=server.url) as other:
            resp = await other.post(CODING_URL, json={**BODY, "stream": True}, headers=bearer())
            assert resp.status == 200
            await wait_in_flight(session, 1)
        resp.close()  # the client gives up and closes its connection
        await wait_in_flight(session, 0)
        records = (await (await session.get("/_emulator/requests")).json())["requests"]
        assert records[0]["outcome"] == "client_gone"


# ------------------------------------------------------------------ secrets & control


@pytest.mark.asyncio
async def test_recorded_requests_and_logs_never_show_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="extproc.emulator")
    async with serve() as (_, session):
        headers = {"x-api-key": KEY, "Authorization": f"Bearer {KEY}",
                   "X-Forwarded-Secretish": f"v={KEY}", "X-Session-Token": "abc"}
        async with session.post(ANTHROPIC_URL + f"?beta=true&api_key={KEY}",
                                json={**BODY, "stream": True}, headers=headers) as resp:
            assert resp.status == 200
            await resp.read()
        async with session.post(CODING_URL, json=BODY, headers=bearer("wrong")) as resp:
            assert resp.status == 401
        texts = []
        for path in ("/_emulator/requests", "/_emulator/config", "/_emulator/stats"):
            async with session.get(path) as resp:
                texts.append(await resp.text())
        records = json.loads(texts[0])["requests"]
    for text in texts + [caplog.text]:
        assert KEY not in text
    first = records[0]["headers"]
    assert first["x-api-key"] == "sha256:" + hashlib.sha256(KEY.encode()).hexdigest()
    assert first["authorization"] == "sha256:" + hashlib.sha256(
        f"Bearer {KEY}".encode()).hexdigest()
    assert first["x-forwarded-secretish"].startswith("sha256:")
    assert first["x-session-token"].startswith("sha256:")
    assert first["content-type"] == "application/json"
    raw = json.dumps({**BODY, "stream": True}).encode()
    assert records[0]["body_size"] == len(raw)
    assert records[0]["body_sha256"] == hashlib.sha256(raw).hexdigest()
    assert records[0]["model"] == BODY["model"] and records[0]["stream"] is True
    assert records[0]["query"].startswith("beta=true&api_key=sha256")
    assert (records[1]["status"], records[1]["code"]) == (401, "1002")
    assert "POST /api/anthropic/v1/messages 200" in caplog.text


@pytest.mark.asyncio
async def test_control_endpoints_config_and_reset() -> None:
    async with serve() as (server, session):
        async with session.post("/_emulator/config", json={"nope": 1}) as resp:
            assert resp.status == 400
            assert "unknown emulator option 'nope'" in (await resp.json())["error"]
        async with session.post("/_emulator/config", json={"events_per_stream": 0}) as resp:
            assert resp.status == 400
        async with session.post("/_emulator/config", json={"events_per_stream": 3,
                                                           "rate_cap": 1}) as resp:
            config = await resp.json()
        assert config["events_per_stream"] == 3 and config["api_key"] == "<redacted>"
        assert server.options.rate_cap == 1
        async with session.get("/_emulator/config") as resp:
            assert (await resp.json()) == config
        for expected in (200, 429):
            async with session.post(CODING_URL, json=BODY, headers=bearer()) as resp:
                assert resp.status == expected
        async with session.post("/_emulator/reset") as resp:
            assert resp.status == 200
        assert (await stats(session))["accepted"] == 0
        async with session.get("/_emulator/requests") as resp:
            assert (await resp.json())["requests"] == []
        async with session.post(CODING_URL, json=BODY, headers=bearer()) as resp:
            assert resp.status == 200  # rate window forgotten too


# ------------------------------------------------------------------ per-request options


async def records(session: aiohttp.ClientSession) -> list[dict[str, Any]]:
    async with session.get("/_emulator/requests") as resp:
        return list((await resp.json())["requests"])


def with_options(headers: dict[str, str], **changes: Any) -> dict[str, str]:
    return {**headers, "x-emulator-options": json.dumps(changes)}


ONCE = "a reply for this request only"  # six words: enough for five deltas


@pytest.mark.asyncio
async def test_options_header_changes_one_request_only() -> None:
    async with serve(events_per_stream=5) as (server, session):
        before = server.options.public_dict()
        body = {**BODY, "stream": True}
        async with session.post(ANTHROPIC_URL, json=body,
                                headers=with_options(bearer(), error_after_events=1)) as resp:
            assert resp.status == 200
            names = [n for n, _ in parse_sse(await resp.read())]
        assert names == ["message_start", "content_block_start", "ping",
                         "content_block_delta", "error"]
        async with session.post(ANTHROPIC_URL, json=body, headers=bearer()) as resp:
            names = [n for n, _ in parse_sse(await resp.read())]
        assert names.count("content_block_delta") == 5 and names[-1] == "message_stop"

        cut = with_options(bearer(), disconnect_after_events=2, events_per_stream=4)
        async with session.post(CODING_URL, json=body, headers=cut) as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        async with session.post(CODING_URL, json=body, headers=bearer()) as resp:
            events = parse_sse(await resp.read())
        assert events[-1][1] == "[DONE]"
        assert sum(1 for _, d in events[:-1] if d["choices"] and
                   d["choices"][0]["delta"].get("content")) == 5

        # Non-streaming, and a non-fault option (the reply text) for one request.
        async with session.post(CODING_URL, json=BODY,
                                headers=with_options(bearer(), text=ONCE)) as resp:
            assert (await resp.json())["choices"][0]["message"]["content"] == ONCE
        async with session.post(CODING_URL, json=BODY, headers=bearer()) as resp:
            assert (await resp.json())["choices"][0]["message"]["content"] == server.options.text
        assert server.options.public_dict() == before  # the live options never changed
        async with session.get("/_emulator/config") as resp:
            assert await resp.json() == before
        outcomes = [r["outcome"] for r in await records(session)]
    assert outcomes == ["error_event", "completed", "disconnected", "completed",
                        "completed", "completed"]


@pytest.mark.asyncio
async def test_options_header_is_per_request_under_concurrency() -> None:
    async with serve(events_per_stream=4, event_interval=0.02) as (_, session):
        body = {**BODY, "stream": True}

        async def call(i: int) -> list[str | None]:
            headers = {**bearer(), "x-request-id": f"req-{i}"}
            if i % 2:
                headers = with_options(headers, error_after_events=1)
            async with session.post(ANTHROPIC_URL, json=body, headers=headers) as resp:
                assert resp.status == 200
                return [n for n, _ in parse_sse(await resp.read())]

        results = await asyncio.gather(*(call(i) for i in range(12)))
        assert (await stats(session))["max_in_flight"] > 1  # they really overlapped
        by_id = {r["request_id"]: r for r in await records(session)}
    for i, names in enumerate(results):
        record = by_id[f"req-{i}"]
        if i % 2:
            assert names[-1] == "error" and names.count("content_block_delta") == 1
            assert record["outcome"] == "error_event" and record["usage"] is None
        else:
            assert names[-1] == "message_stop" and names.count("content_block_delta") == 4
            assert record["outcome"] == "completed" and record["usage"] is not None


BAD_OPTION_HEADERS = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"bogus": 1}', "unknown emulator option 'bogus'"),
    ('{"events_per_stream": true}', "'events_per_stream' must be int, got bool"),
    ('{"events_per_stream": 0}', "'events_per_stream' must be >= 1"),
    ('{"reject_code": "1999"}', "'reject_code' must be '' (off) or one of"),
    (json.dumps({"api_key": KEY}), "'api_key' cannot be set per request"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("value", "problem"), BAD_OPTION_HEADERS)
async def test_invalid_options_header_gets_400_in_each_format(value: str, problem: str) -> None:
    async with serve() as (_, session):
        headers = {**bearer(), "x-emulator-options": value}
        async with session.post(ANTHROPIC_URL, json=BODY, headers=headers) as resp:
            assert resp.status == 400
            anthropic_body = await resp.json()
        async with session.post(CODING_URL, json={**BODY, "stream": True},
                                headers=headers) as resp:
            assert resp.status == 400
            assert resp.content_type == "application/json"
            openai_body = await resp.json()
        async with session.post(CODING_URL, json=BODY, headers=bearer()) as resp:
            assert resp.status == 200  # the next request without the header is normal
        recorded = await records(session)
        counts = await stats(session)
    assert anthropic_body["type"] == "error"
    assert anthropic_body["error"]["type"] == "invalid_request_error"
    assert anthropic_body["error"]["code"] == "1210"
    assert set(openai_body) == {"error"} and set(openai_body["error"]) == {"code", "message"}
    assert openai_body["error"]["code"] == "1210"
    for message in (anthropic_body["error"]["message"], openai_body["error"]["message"]):
        assert message.startswith("Invalid x-emulator-options header: ")
        assert problem in message
        assert KEY not in message
    assert [(r["status"], r["code"], r["outcome"]) for r in recorded] == [
        (400, "1210", "rejected"), (400, "1210", "rejected"), (200, None, "completed")]
    assert counts["rejected"] == {"1210": 2} and counts["accepted"] == 1
    assert KEY not in json.dumps(recorded)


@pytest.mark.asyncio
async def test_options_header_given_twice_or_without_auth() -> None:
    async with serve() as (_, session):
        headers = [("Authorization", f"Bearer {KEY}"), ("x-emulator-options", "{}"),
                   ("x-emulator-options", "{}")]
        async with session.post(CODING_URL, json=BODY, headers=headers) as resp:
            assert resp.status == 400
            assert "given 2 times" in (await resp.json())["error"]["message"]
        async with session.post(CODING_URL, json=BODY,
                                headers={"x-emulator-options": "{nope"}) as resp:
            assert resp.status == 401  # authentication is checked first
        async with session.post(CODING_URL, json=BODY,
                                headers=with_options(bearer())) as resp:
            assert resp.status == 200  # an empty object changes nothing


# ------------------------------------------------------------------ reject_code


async def refusal(session: aiohttp.ClientSession, path: str,
                  headers: dict[str, str]) -> tuple[int, Any, Any]:
    async with session.post(path, json={**BODY, "stream": True}, headers=headers) as resp:
        return resp.status, resp.headers.copy(), await resp.json()


@pytest.mark.asyncio
@pytest.mark.parametrize(("code", "message"), [
    ("1302", ("High concurrency usage of this API, please reduce concurrency or contact "
              "customer service to increase limits")),
    ("1303", ("High frequency usage of this API, please reduce frequency or contact "
              "customer service to increase limits")),
])
async def test_reject_code_throttles_in_both_formats(code: str, message: str) -> None:
    async with serve(reject_code=code) as (server, session):
        status, headers, body = await refusal(session, CODING_URL, bearer())
        assert (status, body) == (429, {"error": {"code": code, "message": message}})
        assert "retry-after" not in headers
        status, _, body = await refusal(session, ANTHROPIC_URL, bearer())
        assert status == 429
        assert body == {"type": "error",
                        "error": {"type": code, "code": code, "message": message}}
        server.options.update({"anthropic_429_type": "rate_limit_error"})
        _, _, body = await refusal(session, ANTHROPIC_URL, bearer())
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == code
        async with session.post(ANTHROPIC_URL + "/count_tokens", json=BODY,
                                headers=bearer()) as resp:
            assert resp.status == 200  # count_tokens is exempt, as from every limit
        counts = await stats(session)
        recorded = await records(session)
    assert counts["rejected"] == {code: 3} and counts["accepted"] == 0
    assert counts["outcomes"] == {"rejected": 3, "completed": 1}
    assert [(r["status"], r["code"], r["usage"]) for r in recorded[:3]] == [
        (429, code, None)] * 3


@pytest.mark.asyncio
async def test_reject_code_1308_gives_the_reset_time_in_both_formats() -> None:
    wall = FakeClock(datetime(2026, 11, 23, 8, 4, 5, tzinfo=UTC).timestamp())
    async with serve(wall=wall, quota_reset_after=2 * 3600 + 0.5) as (_, session):
        refused = with_options(bearer(), reject_code="1308")
        status, headers, body = await refusal(session, CODING_URL, refused)
        assert status == 429 and headers["retry-after"] == str(2 * 3600 + 1)
        expected = ("Usage limit reached for 5 hour. "
                    "Your limit will reset at 2026-11-23 18:04:05")
        assert body == {"error": {"code": "1308", "message": expected}}
        status, headers, body = await refusal(session, ANTHROPIC_URL, refused)
        assert status == 429 and headers["retry-after"] == str(2 * 3600 + 1)
        assert body["error"] == {"type": "1308", "code": "1308", "message": expected}
        async with session.post(CODING_URL, json=BODY, headers=bearer()) as resp:
            assert resp.status == 200  # only the requests with the header were refused
        assert (await stats(session))["rejected"] == {"1308": 2}


@pytest.mark.asyncio
async def test_reject_code_other_codes() -> None:
    wall = FakeClock(datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC).timestamp())
    async with serve(wall=wall, quota_reset_after=60) as (server, session):
        async def both(code: str) -> tuple[tuple[int, Any], tuple[int, Any]]:
            headers = with_options(bearer(), reject_code=code)
            status_o, _, openai_body = await refusal(session, CODING_URL, headers)
            status_a, _, anthropic_body = await refusal(session, ANTHROPIC_URL, headers)
            return (status_o, openai_body["error"]), (status_a, anthropic_body["error"])

        (status_o, err_o), (status_a, err_a) = await both("1305")
        assert (status_o, err_o["code"]) == (429, "1305")
        assert (status_a, err_a["type"], err_a["code"]) == (529, "overloaded_error", "1305")
        (_, err_o), _ = await both("1310")
        assert err_o["message"] == ("Weekly/Monthly Limit Exhausted. "
                                    "Your limit will reset at 2026-01-01 08:01:00")
        (_, err_o), _ = await both("1311")
        assert err_o["message"].endswith("does not yet include access to glm-4.7")
        for code in ("1113", "1304", "1309", "1312", "1313"):
            (status_o, err_o), (status_a, err_a) = await both(code)
            assert (status_o, err_o["code"], status_a, err_a["code"]) == (429, code, 429, code)
            assert err_o["message"] == err_a["message"] and err_o["message"]
        async with session.post("/_emulator/config", json={"reject_code": "1234"}) as resp:
            assert resp.status == 400
            assert "'reject_code' must be '' (off) or one of 1113" in (await resp.json())["error"]
        async with session.post("/_emulator/config", json={"reject_code": 1302}) as resp:
            assert resp.status == 400  # a string, like every str option
        assert server.options.reject_code == ""


# ------------------------------------------------------------------ request records


@pytest.mark.asyncio
async def test_records_carry_body_usage_and_request_id() -> None:
    async with serve(events_per_stream=3, cache_read_tokens=5,
                     cache_write_tokens=2) as (server, session):
        text_tokens = count_output_tokens(server.options.text)
        raw = json.dumps(BODY, ensure_ascii=False).encode("utf-8")
        json_headers = {"Content-Type": "application/json"}
        # 1: Anthropic, non-streamed, with a request id.
        async with session.post(ANTHROPIC_URL, data=raw, headers={
                **bearer(), **json_headers, "x-request-id": "req-one"}) as resp:
            reported = (await resp.json())["usage"]
        # 2: OpenAI stream with the usage chunk.
        streamed = json.dumps({**BODY, "stream": True,
                               "stream_options": {"include_usage": True}}).encode()
        async with session.post(CODING_URL, data=streamed,
                                headers={**bearer(), **json_headers}) as resp:
            openai_usage = parse_sse(await resp.read())[-2][1]["usage"]
        # 3: OpenAI stream without it: nothing reported.
        async with session.post(CODING_URL, json={**BODY, "stream": True},
                                headers=bearer()) as resp:
            await resp.read()
        # 4: Anthropic stream ending in an error event: no usage.
        async with session.post(ANTHROPIC_URL, json={**BODY, "stream": True},
                                headers=with_options(bearer(), error_after_events=1)) as resp:
            assert parse_sse(await resp.read())[-1][0] == "error"
        # 5: Anthropic stream, complete.
        async with session.post(ANTHROPIC_URL, json={**BODY, "stream": True},
                                headers=bearer()) as resp:
            final = next(d for n, d in parse_sse(await resp.read()) if n == "message_delta")
        # 6: refused; 7: cut.
        async with session.post(CODING_URL, json=BODY,
                                headers=with_options(bearer(), reject_code="1302")) as resp:
            assert resp.status == 429
        async with session.post(ANTHROPIC_URL, json={**BODY, "stream": True},
                                headers=with_options(bearer(),
                                                     disconnect_after_events=1)) as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        # 8: a body over 64 KiB, 9: a body holding the key.
        big = json.dumps({**BODY, "metadata": {"pad": "x" * (64 * 1024)}}).encode()
        async with session.post(CODING_URL, data=big,
                                headers={**bearer(), **json_headers}) as resp:
            assert resp.status == 200
        leaky = json.dumps({**BODY, "metadata": {"user_id": KEY}}).encode()
        async with session.post(CODING_URL, data=leaky,
                                headers={**bearer(), **json_headers,
                                         "x-request-id": f"id-{KEY}"}) as resp:
            assert resp.status == 200
        async with session.get("/_emulator/requests") as resp:
            listing = await resp.text()
        recorded = json.loads(listing)["requests"]

    assert KEY not in listing
    first = recorded[0]
    assert first["request_id"] == "req-one"
    assert first["body_sha256"] == hashlib.sha256(raw).hexdigest()
    assert base64.b64decode(first["body_b64"]) == raw
    input_tokens = estimate_input_tokens(BODY)
    anthropic_usage = {"input": input_tokens, "output": text_tokens,
                       "cache_read": 5, "cache_write": 2}
    assert first["usage"] == anthropic_usage
    assert reported["input_tokens"] == input_tokens and reported["output_tokens"] == text_tokens

    second = recorded[1]
    assert second["request_id"] is None
    assert base64.b64decode(second["body_b64"]) == streamed
    assert openai_usage["prompt_tokens"] == input_tokens + 5
    assert second["usage"] == {"input": input_tokens, "output": text_tokens,
                               "cache_read": 5, "cache_write": 0}
    assert recorded[2]["usage"] is None and recorded[2]["outcome"] == "completed"
    assert recorded[3]["usage"] is None and recorded[3]["outcome"] == "error_event"
    assert recorded[4]["usage"] == anthropic_usage
    assert final["usage"]["output_tokens"] == text_tokens
    assert (recorded[5]["outcome"], recorded[5]["usage"]) == ("rejected", None)
    assert (recorded[6]["outcome"], recorded[6]["usage"]) == ("disconnected", None)
    assert recorded[7]["body_b64"] is None and recorded[7]["body_size"] == len(big)
    assert recorded[7]["body_sha256"] == hashlib.sha256(big).hexdigest()
    assert recorded[7]["usage"] is not None
    assert recorded[8]["body_b64"] is None  # holds the key: hashed only
    assert recorded[8]["body_sha256"] == hashlib.sha256(leaky).hexdigest()
    assert recorded[8]["request_id"] == "sha256:" + hashlib.sha256(
        f"id-{KEY}".encode()).hexdigest()
    assert all(set(r) >= {"body_sha256", "body_b64", "usage", "request_id"} for r in recorded)



# ------------------------------------------------------------------ official SDKs


@pytest.mark.asyncio
async def test_official_sdks_stream_from_the_emulator() -> None:
    async with serve(events_per_stream=5, cache_read_tokens=4) as (server, _):
        text = server.options.text
        claude = anthropic.AsyncAnthropic(base_url=server.url + "/api/anthropic",
                                          api_key=KEY, max_retries=0)
        async with claude.messages.stream(model="glm-4.7", max_tokens=64,
                                          messages=[{"role": "user", "content": "hi"}]) as s:
            pieces = [piece async for piece in s.text_stream]
            final = await s.get_final_message()
        assert "".join(pieces) == text and len(pieces) == 5
        assert final.usage.output_tokens == count_output_tokens(text)
        assert final.usage.cache_read_input_tokens == 4
        assert final.stop_reason == "end_turn" and final.model == "glm-4.7"

        gpt = openai.AsyncOpenAI(base_url=server.url + "/api/coding/paas/v4", api_key=KEY,
                                 max_retries=0)
        stream = await gpt.chat.completions.create(
            model="glm-4.7", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})
        content, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                content += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        assert content == text
        assert usage is not None and usage.completion_tokens == count_output_tokens(text)
        assert usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens == 4

        server.options.update({"concurrency_cap": 1, "first_event_delay": 0.5})
        held = await gpt.chat.completions.create(
            model="glm-4.7", messages=[{"role": "user", "content": "hi"}], stream=True)
        with pytest.raises(openai.RateLimitError) as refused:
            await gpt.chat.completions.create(model="glm-4.7", messages=[{"role": "user",
                                              "content": "hi"}])
        assert refused.value.code == "1302"
        with pytest.raises(anthropic.RateLimitError) as refused_too:
            await claude.messages.create(model="glm-4.7", max_tokens=8,
                                         messages=[{"role": "user", "content": "hi"}])
        assert "1302" in str(refused_too.value)
        await held.close()
        await gpt.close()
        await claude.close()


# ------------------------------------------------------------------ TLS and CLI


@pytest.mark.asyncio
async def test_tls_serving(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with EmulatorServer(EmulatorOptions(api_key=KEY), ssl_context=server_ctx) as server:
        assert server.url.startswith("https://127.0.0.1:")
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + CODING_URL, json={**BODY, "stream": True},
                                    headers=bearer(), ssl=client_ctx) as resp:
                assert resp.status == 200
                assert parse_sse(await resp.read())[-1][1] == "[DONE]"
            server.options.update({"disconnect_after_events": 1})
            async with session.post(server.url + ANTHROPIC_URL, json={**BODY, "stream": True},
                                    headers=bearer(), ssl=client_ctx) as resp:
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()


def test_cli_announces_port_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "EMU_KEY": KEY, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc.emulator", "--port", "0", "--api-key-env", "EMU_KEY",
         "--events-per-stream", "3", "--concurrency-cap", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path, text=True)
    try:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())
        assert set(line) == {"event", "host", "port", "scheme"}
        assert line["event"] == "listening" and line["scheme"] == "http" and line["port"] > 0
        url = f"http://{line['host']}:{line['port']}"

        async def call() -> tuple[list[Any], dict[str, Any]]:
            async with aiohttp.ClientSession(base_url=url) as session:
                async with session.post(ANTHROPIC_URL, json={**BODY, "stream": True},
                                        headers={"x-api-key": KEY}) as resp:
                    events = parse_sse(await resp.read())
                async with session.get("/_emulator/config") as resp:
                    return events, await resp.json()

        events, config = asyncio.run(call())
        assert sum(n == "content_block_delta" for n, _ in events) == 3
        assert config["concurrency_cap"] == 4
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=5)
        assert proc.returncode == 0
        assert "POST /api/anthropic/v1/messages 200" in stderr
        assert KEY not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cli_refuses_to_start_without_the_key_variable() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ZAI_EMULATOR_KEY"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-m", "extproc.emulator"], env=env, check=False,
                          capture_output=True, text=True, timeout=10)
    assert done.returncode == 2
    assert "ZAI_EMULATOR_KEY is unset or empty" in done.stderr
    assert done.stdout == ""


def test_options_are_plain_dataclass_fields() -> None:
    # The control API and CLI rely on every field being str, int or float.
    assert set(field_types().values()) <= {str, int, float}
    assert {f.name for f in dataclasses.fields(EmulatorOptions)} == set(field_types())
