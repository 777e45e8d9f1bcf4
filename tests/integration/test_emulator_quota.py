"""The emulator's Coding Plan quota: the window bookkeeping (extproc.emulator.quota, pure,
with an injected wall clock), the quota endpoint Z.AI serves at
/api/monitor/usage/quota/limit, refusals when a window is spent (1308 / 1310), the
/_emulator/quota control route, per-model refusals (reject_models) and the model named
in served responses."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiohttp
import pytest

from extproc.emulator import EmulatorOptions
from extproc.emulator.cli import build_parser, options_from_args
from extproc.emulator.options import parse_reject_models
from extproc.emulator.quota import FIVE_HOUR, WEEKLY, QuotaWindows
from test_emulator import ANTHROPIC_URL, CODING_URL, KEY, FakeClock, bearer, serve

QUOTA_URL = "/api/monitor/usage/quota/limit"
BODY: dict[str, Any] = {
    "model": "glm-4.7",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hi"}],
}
START = datetime(2026, 11, 23, 8, 4, 5, tzinfo=UTC).timestamp()
FIVE_HOURS = 5 * 3600.0
WEEK = 7 * 86400.0
UTC8 = timezone(timedelta(hours=8))


async def quota(session: aiohttp.ClientSession, **headers: str) -> tuple[int, dict[str, Any]]:
    async with session.get(QUOTA_URL, headers={"Authorization": KEY, **headers}) as resp:
        return resp.status, await resp.json()


async def limits(session: aiohttp.ClientSession) -> list[dict[str, Any]]:
    status, body = await quota(session)
    assert status == 200 and body["success"] is True, body
    return list(body["data"]["limits"])


async def control(session: aiohttp.ClientSession, **changes: Any) -> dict[str, Any]:
    async with session.post("/_emulator/quota", json=changes) as resp:
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


async def state(session: aiohttp.ClientSession) -> dict[str, Any]:
    async with session.get("/_emulator/quota") as resp:
        return dict(await resp.json())


async def ask(session: aiohttp.ClientSession, path: str = CODING_URL,
              **extra: Any) -> tuple[int, Any, Any]:
    headers = extra.pop("headers", bearer())
    async with session.post(path, json={**BODY, **extra}, headers=headers) as resp:
        raw = await resp.read()
        body = raw if extra.get("stream") else json.loads(raw)
        return resp.status, resp.headers.copy(), body


def utc8(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC8).strftime("%Y-%m-%d %H:%M:%S")


def options(**changes: Any) -> EmulatorOptions:
    return EmulatorOptions(api_key=KEY, **changes)


# ------------------------------------------------------------------ pure window arithmetic


def test_windows_anchor_when_first_seen_and_percentage_rounds_down() -> None:
    windows, opts = QuotaWindows(), options(quota_window_tokens=1000, quota_weekly_tokens=10_000)
    view = windows.view(FIVE_HOUR, opts, START)
    assert (view.used, view.allowance, view.next_reset) == (0, 1000, START + FIVE_HOURS)
    assert windows.view(WEEKLY, opts, START + 10).next_reset == START + 10 + WEEK
    windows.spend(299, opts, START + 60)
    five, weekly = windows.view(FIVE_HOUR, opts, START + 60), windows.view(WEEKLY, opts, START + 60)
    assert (five.used, five.percentage, five.remaining) == (299, 29, 701)
    assert (weekly.used, weekly.percentage) == (299, 2)
    windows.spend(5000, opts, START + 61)
    five = windows.view(FIVE_HOUR, opts, START + 61)
    assert (five.used, five.percentage, five.remaining, five.spent) == (5299, 100, 0, True)


def test_windows_reset_at_next_reset_and_skip_whole_windows() -> None:
    windows, opts = QuotaWindows(), options(quota_window_tokens=1000)
    windows.spend(999, opts, START)
    assert windows.view(FIVE_HOUR, opts, START + FIVE_HOURS - 0.001).used == 999
    at_reset = windows.view(FIVE_HOUR, opts, START + FIVE_HOURS)  # reset at, not after
    assert (at_reset.used, at_reset.next_reset) == (0, START + 2 * FIVE_HOURS)
    windows.spend(10, opts, START + 2 * FIVE_HOURS)
    later = windows.view(FIVE_HOUR, opts, START + 4.5 * FIVE_HOURS)  # 2.5 windows on
    assert (later.used, later.next_reset) == (0, START + 5 * FIVE_HOURS)
    # The weekly window kept everything spent meanwhile.
    assert windows.view(WEEKLY, opts, START + 4.5 * FIVE_HOURS).used == 1009


def test_control_sets_use_and_reset_time_exactly() -> None:
    windows, opts = QuotaWindows(), options(quota_window_tokens=40_000_000)
    view = windows.control({"window": "5h", "used_percent": 29}, opts, START)
    assert (view.used, view.percentage) == (11_600_000, 29)  # no float rounding below 29
    view = windows.control({"window": "5h", "used_percent": 33.3}, opts, START)
    assert (view.used, view.percentage) == (13_320_000, 33)
    view = windows.control({"window": "weekly", "used_percent": 100, "reset_in": 90}, opts,
                           START)
    assert (view.used, view.spent, view.next_reset) == (opts.quota_weekly_tokens, True,
                                                        START + 90)
    view = windows.control({"window": "5h", "reset_in": 0}, opts, START)
    assert view.used == 0 and view.next_reset == START + FIVE_HOURS  # reset at once
    for bad, problem in [
        ([1], "must be a JSON object"),
        ({"window": "month", "used_percent": 1}, "'window' must be one of 5h, weekly"),
        ({"window": "5h"}, "give 'used_percent', 'reset_in' or both"),
        ({"window": "5h", "used_percent": -1}, "'used_percent' must be a finite number >= 0"),
        ({"window": "5h", "used_percent": True}, "'used_percent' must be a finite number"),
        ({"window": "5h", "reset_in": float("inf")}, "'reset_in' must be a finite number"),
        ({"window": "5h", "used": 3}, "unknown field(s) used"),
    ]:
        with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
            windows.control(bad, opts, START)


def test_blocking_window_is_the_one_that_resets_last() -> None:
    windows, opts = QuotaWindows(), options()

    def blocking() -> str | None:
        view = windows.blocking(opts, START)
        return None if view is None else view.name

    assert blocking() is None
    windows.control({"window": "5h", "used_percent": 100}, opts, START)
    assert blocking() == FIVE_HOUR
    windows.control({"window": "weekly", "used_percent": 100}, opts, START)
    assert blocking() == WEEKLY
    windows.control({"window": "weekly", "reset_in": 60}, opts, START)
    assert blocking() == FIVE_HOUR
    windows.reset()
    assert blocking() is None


def test_reject_models_parsing_and_validation() -> None:
    assert parse_reject_models("") == {}
    assert parse_reject_models(" glm-5.1:1312 , glm-4.6:1311") == {"glm-5.1": "1312",
                                                                   "glm-4.6": "1311"}
    for spec, problem in [("glm-5.1", "comma-separated model:code pairs"),
                          (":1312", "bad entry ':1312'"),
                          ("glm-5.1:1999", "code must be one of 1113"),
                          ("glm-5.1:1312,", "bad entry ''"),
                          ("a:1312,a:1311", "listed twice")]:
        with pytest.raises(ValueError, match=f"option 'reject_models' .*{problem}"):
            options(reject_models=spec)


def test_quota_options_validation() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"quota_shape": "bytes"}, "'quota_shape' must be one of tokens"),
        ({"quota_error": "12a"}, "'quota_error' must be '' \\(off\\)"),
        ({"quota_window_tokens": 0}, "'quota_window_tokens' must be >= 1"),
        ({"quota_weekly_seconds": 0}, "'quota_weekly_seconds' must be > 0"),
        ({"quota_level": " "}, "'quota_level' must not be empty"),
    ]
    for change, problem in cases:
        with pytest.raises(ValueError, match=problem):
            options(**change)


# ------------------------------------------------------------------ the quota endpoint


@pytest.mark.asyncio
async def test_quota_endpoint_tokens_shape_exactly() -> None:
    wall = FakeClock(START)
    async with serve(wall=wall) as (_, session):
        status, body = await quota(session)
        stats = await (await session.get("/_emulator/stats")).json()
    five_ms, week_ms = int((START + FIVE_HOURS) * 1000), int((START + WEEK) * 1000)
    assert status == 200
    assert body == {
        "code": 200, "msg": "Operation successful", "success": True,
        "data": {"level": "lite", "limits": [
            {"type": "TOKENS_LIMIT", "unit": 3, "number": 5, "percentage": 0,
             "nextResetTime": five_ms},
            {"type": "TOKENS_LIMIT", "unit": 6, "number": 1, "percentage": 0,
             "nextResetTime": week_ms},
            {"type": "TIME_LIMIT", "unit": 5, "number": 1, "usage": 100, "currentValue": 0,
             "remaining": 100, "percentage": 0,
             "nextResetTime": int((START + 30 * 86400) * 1000),
             "usageDetails": [{"modelCode": "search-prime", "usage": 0},
                              {"modelCode": "web-reader", "usage": 0},
                              {"modelCode": "zread", "usage": 0}]},
            {"type": "FOO_LIMIT", "unit": 3, "number": 5, "percentage": 100,
             "nextResetTime": five_ms},
        ]},
    }
    assert stats["quota_endpoint_calls"] == {"200": 1}


@pytest.mark.asyncio
async def test_quota_endpoint_credits_shape_by_config_and_by_header() -> None:
    wall = FakeClock(START)
    async with serve(wall=wall, quota_window_tokens=1000, quota_weekly_tokens=8000,
                     quota_level="pro") as (_, session):
        await control(session, window="5h", used_percent=85)
        await control(session, window="weekly", used_percent=12.5)
        header = {"x-emulator-options": json.dumps({"quota_shape": "credits"})}
        status, body = await quota(session, **header)
        assert status == 200
        windows = body["data"]["limits"][:2]
        assert windows == [
            {"type": "CREDIT_LIMIT", "unit": 3, "number": 5, "usage": 1000, "currentValue": 850,
             "remaining": 150, "percentage": 85, "nextResetTime": int((START + FIVE_HOURS) * 1000)},
            {"type": "CREDIT_LIMIT", "unit": 6, "number": 1, "usage": 8000, "currentValue": 1000,
             "remaining": 7000, "percentage": 12, "nextResetTime": int((START + WEEK) * 1000)},
        ]
        assert body["data"]["level"] == "pro"
        assert body["data"]["limits"][2]["usage"] == 1000  # pro's tool allowance
        assert [e["type"] for e in await limits(session)][:2] == ["TOKENS_LIMIT"] * 2
        async with session.post("/_emulator/config", json={"quota_shape": "credits"}) as resp:
            assert resp.status == 200
        assert [e["type"] for e in await limits(session)] == [
            "CREDIT_LIMIT", "CREDIT_LIMIT", "TIME_LIMIT", "FOO_LIMIT"]


@pytest.mark.asyncio
async def test_quota_endpoint_authentication() -> None:
    async with serve(wall=FakeClock(START)) as (_, session):
        for headers, code in [({}, 1001), ({"Authorization": "  "}, 1001),
                              ({"Authorization": "wrong"}, 1000),
                              ({"Authorization": f"Bearer {KEY}"}, 1000),  # raw key only
                              ({"x-api-key": KEY}, 1001)]:
            async with session.get(QUOTA_URL, headers=headers) as resp:
                body = await resp.json()
                assert resp.status == 401, headers
            assert set(body) == {"code", "msg", "success"}
            assert (body["code"], body["success"]) == (code, False), headers
            assert body["msg"] and KEY not in json.dumps(body)
        async with session.get(QUOTA_URL, headers={"Authorization": KEY,
                                                   "x-emulator-options": "{bad"}) as resp:
            assert resp.status == 400
            body = await resp.json()
        assert (body["code"], body["success"]) == (1210, False)
        assert body["msg"].startswith("Invalid x-emulator-options header: not valid JSON")
        stats = await (await session.get("/_emulator/stats")).json()
    assert stats["quota_endpoint_calls"] == {"1001": 3, "1000": 2, "1210": 1}


@pytest.mark.asyncio
async def test_quota_error_answers_200_with_success_false() -> None:
    async with serve(wall=FakeClock(START), quota_error="1113") as (server, session):
        status, body = await quota(session)
        assert (status, body) == (200, {
            "code": 1113, "msg": "Your account is in arrears, please recharge and try again",
            "success": False})
        status, body = await quota(session, **{"x-emulator-options": '{"quota_error": "500"}'})
        assert (status, body["code"], body["success"]) == (200, 500, False)
        assert body["msg"] == "Request failed (business code 500)"
        server.options.update({"quota_error": ""})
        status, body = await quota(session)
        assert (status, body["success"]) == (200, True)
        async with session.post("/_emulator/config", json={"quota_error": "x1"}) as resp:
            assert resp.status == 400
            assert "'quota_error' must be '' (off) or a business code" in (
                await resp.json())["error"]


# ------------------------------------------------------------------ windows moving with use


@pytest.mark.asyncio
async def test_served_tokens_move_the_percentage() -> None:
    wall = FakeClock(START)
    async with serve(wall=wall, quota_window_tokens=100_000, quota_weekly_tokens=1_000_000,
                     input_tokens=20_000, cache_read_tokens=3_000,
                     cache_write_tokens=1_000) as (_, session):
        assert (await ask(session))[0] == 200  # OpenAI, not streamed
        assert (await ask(session, ANTHROPIC_URL, stream=True))[0] == 200
        assert (await ask(session, stream=True))[0] == 200  # no include_usage: still spent
        # Neither count_tokens nor refusals nor injected failures spend anything.
        async with session.post(ANTHROPIC_URL + "/count_tokens", json=BODY,
                                headers=bearer()) as resp:
            assert resp.status == 200
        refused = {**bearer(), "x-emulator-options": '{"reject_code": "1302"}'}
        assert (await ask(session, headers=refused))[0] == 429
        failed = {**bearer(), "x-emulator-options": '{"error_after_events": 1}'}
        assert (await ask(session, ANTHROPIC_URL, stream=True, headers=failed))[0] == 200
        records = (await (await session.get("/_emulator/requests")).json())["requests"]
        windows = await state(session)
        entries = await limits(session)
    output = records[0]["usage"]["output"]
    per_request = 20_000 + 3_000 + 1_000 + output
    assert records[1]["usage"] == {"input": 20_000, "output": output, "cache_read": 3_000,
                                   "cache_write": 1_000}
    assert windows["5h"]["used"] == windows["weekly"]["used"] == 3 * per_request
    assert windows["5h"] == {"used": 3 * per_request, "allowance": 100_000,
                             "percentage": 3 * per_request * 100 // 100_000,
                             "next_reset": START + FIVE_HOURS, "window_seconds": FIVE_HOURS}
    assert entries[0]["percentage"] == 3 * per_request * 100 // 100_000 == 72
    assert entries[1]["percentage"] == 3 * per_request * 100 // 1_000_000 == 7


@pytest.mark.asyncio
async def test_spent_5h_window_gives_1308_until_its_reset_then_serves() -> None:
    wall = FakeClock(START)
    async with serve(wall=wall, quota_window_tokens=1000, input_tokens=600) as (_, session):
        assert (await ask(session))[0] == 200  # anchors the windows at START
        wall.now += 600
        assert (await ask(session))[0] == 200  # 1200+ of 1000 tokens: spent
        entries = await limits(session)
        assert entries[0]["percentage"] == 100
        reset_at = START + FIVE_HOURS
        assert entries[0]["nextResetTime"] == int(reset_at * 1000)
        wall.now += 0.5
        expected = f"Usage limit reached for 5 hour. Your limit will reset at {utc8(reset_at)}"
        status, headers, body = await ask(session)
        assert (status, body) == (429, {"error": {"code": "1308", "message": expected}})
        assert headers["retry-after"] == str(int(FIVE_HOURS) - 600)  # 17399.5 rounded up
        status, headers, body = await ask(session, ANTHROPIC_URL, headers={"x-api-key": KEY})
        assert status == 429 and body["error"] == {"type": "1308", "code": "1308",
                                                   "message": expected}
        async with session.post(ANTHROPIC_URL + "/count_tokens", json=BODY,
                                headers=bearer()) as resp:
            assert resp.status == 200  # exempt
        wall.now = reset_at - 0.001
        assert (await ask(session))[0] == 429
        wall.now = reset_at  # the instant retry-after pointed at
        assert (await ask(session))[0] == 200
        windows = await state(session)
        entries = await limits(session)
        stats = await (await session.get("/_emulator/stats")).json()
    assert windows["5h"]["next_reset"] == START + 2 * FIVE_HOURS
    # One request since the reset; the weekly window holds all three served.
    assert 600 < windows["5h"]["used"] < 1000
    assert windows["weekly"]["used"] == 3 * windows["5h"]["used"]
    assert entries[0]["nextResetTime"] == int((START + 2 * FIVE_HOURS) * 1000)
    assert stats["rejected"] == {"1308": 3}


@pytest.mark.asyncio
async def test_told_to_exhaust_a_window_then_it_resets_by_itself() -> None:
    wall = FakeClock(START)
    async with serve(wall=wall) as (_, session):
        told = await control(session, window="5h", used_percent=85)
        assert told["5h"]["percentage"] == 85 and told["5h"]["used"] == told["5h"]["allowance"] * 85 // 100
        assert (await limits(session))[0]["percentage"] == 85
        assert (await ask(session))[0] == 200
        told = await control(session, window="5h", used_percent=100, reset_in=1800)
        assert told["5h"]["next_reset"] == START + 1800
        entries = await limits(session)
        assert (entries[0]["percentage"], entries[0]["nextResetTime"]) == (
            100, int((START + 1800) * 1000))
        wall.now += 1
        status, headers, body = await ask(session, stream=True)
        assert status == 429 and headers["retry-after"] == "1799"
        assert json.loads(body)["error"]["message"].endswith(utc8(START + 1800))
        wall.now = START + 1800
        assert (await ask(session))[0] == 200
        after = await state(session)
    assert after["5h"]["next_reset"] == START + 1800 + FIVE_HOURS
    assert after["5h"]["percentage"] == 0


@pytest.mark.asyncio
async def test_spent_weekly_window_gives_1310_and_wins_when_it_resets_later() -> None:
    wall = FakeClock(START)
    async with serve(wall=wall) as (_, session):
        await control(session, window="weekly", used_percent=100, reset_in=2 * 86400)
        reset_at = START + 2 * 86400
        status, headers, body = await ask(session)
        assert status == 429 and headers["retry-after"] == str(2 * 86400)
        assert body["error"] == {
            "code": "1310",
            "message": f"Weekly/Monthly Limit Exhausted. Your limit will reset at {utc8(reset_at)}"}
        await control(session, window="5h", used_percent=100)  # resets sooner: weekly wins
        assert (await ask(session))[2]["error"]["code"] == "1310"
        entries = await limits(session)
        assert [(e["percentage"], e["nextResetTime"]) for e in entries[:2]] == [
            (100, int((START + FIVE_HOURS) * 1000)), (100, int(reset_at * 1000))]
        wall.now = reset_at
        assert (await ask(session))[0] == 200  # both windows have reset by now
        async with session.post("/_emulator/quota", json={"window": "day"}) as resp:
            assert resp.status == 400
            assert "'window' must be one of 5h, weekly" in (await resp.json())["error"]


@pytest.mark.asyncio
async def test_reset_forgets_the_windows() -> None:
    wall = FakeClock(START)
    async with serve(wall=wall) as (_, session):
        await control(session, window="5h", used_percent=100)
        assert (await ask(session))[0] == 429
        wall.now += 100
        async with session.post("/_emulator/reset") as resp:
            assert resp.status == 200
        assert (await ask(session))[0] == 200
        windows = await state(session)
    assert windows["5h"]["next_reset"] == START + 100 + FIVE_HOURS  # anchored anew
    assert windows["5h"]["used"] == windows["weekly"]["used"] > 0


# ------------------------------------------------------------------ reject_models


@pytest.mark.asyncio
async def test_reject_models_refuses_listed_models_only() -> None:
    wall = FakeClock(START)
    async with serve(wall=wall, reject_models="glm-5.1:1312,glm-4.6:1311") as (server, session):
        status, _, body = await ask(session, model="glm-5.1")
        assert (status, body["error"]["code"]) == (429, "1312")
        assert body["error"]["message"].startswith("The current model is experiencing high")
        status, _, body = await ask(session, ANTHROPIC_URL, model="glm-4.6", stream=True)
        error = json.loads(body)["error"]
        assert (status, error["type"], error["code"]) == (429, "1311", "1311")
        assert error["message"] == ("Your current subscription plan does not yet include "
                                    "access to glm-4.6")
        assert (await ask(session, model="glm-4.7"))[0] == 200
        assert (await ask(session, ANTHROPIC_URL, model="glm-4.7"))[0] == 200
        # Per request, on top of the live options.
        header = {**bearer(), "x-emulator-options": '{"reject_models": "glm-4.7:1305"}'}
        status, _, body = await ask(session, ANTHROPIC_URL, headers=header)
        assert (status, body["error"]["type"]) == (529, "overloaded_error")
        bad = {**bearer(), "x-emulator-options": '{"reject_models": "glm-4.7:42"}'}
        status, _, body = await ask(session, headers=bad)
        assert status == 400 and "'reject_models'" in body["error"]["message"]
        # Live, by the control API.
        async with session.post("/_emulator/config",
                                json={"reject_models": "glm-4.7:1113"}) as resp:
            assert resp.status == 200
        assert (await ask(session))[2]["error"]["code"] == "1113"
        assert (await ask(session, model="glm-5.1"))[0] == 200
        async with session.post("/_emulator/config", json={"reject_models": "glm"}) as resp:
            assert resp.status == 400
            assert "option 'reject_models' must be '' (off) or comma-separated" in (
                await resp.json())["error"]
        assert server.options.reject_models == "glm-4.7:1113"
        stats = await (await session.get("/_emulator/stats")).json()
    assert stats["rejected"] == {"1312": 1, "1311": 1, "1305": 1, "1210": 1, "1113": 1}


def test_reject_models_cli_flag() -> None:
    args = build_parser().parse_args(["--reject-models", "glm-5.1:1312",
                                      "--quota-shape", "credits", "--quota-window-tokens", "5"])
    chosen = options_from_args(args, {"ZAI_EMULATOR_KEY": KEY})
    assert (chosen.reject_models, chosen.quota_shape, chosen.quota_window_tokens) == (
        "glm-5.1:1312", "credits", 5)
    with pytest.raises(ValueError, match="'reject_models'"):
        options_from_args(build_parser().parse_args(["--reject-models", "glm-5.1:9"]),
                          {"ZAI_EMULATOR_KEY": KEY})


# ------------------------------------------------------------------ the model answered


@pytest.mark.asyncio
async def test_served_responses_name_the_requested_model() -> None:
    async with serve(wall=FakeClock(START), model_default="glm-4.7") as (_, session):
        _, _, message = await ask(session, ANTHROPIC_URL, model="glm-5.1")
        assert message["model"] == "glm-5.1"
        _, _, raw = await ask(session, ANTHROPIC_URL, model="glm-5.1", stream=True)
        start = json.loads(raw.split(b"\n\n")[0].split(b"data: ", 1)[1])
        assert start["type"] == "message_start" and start["message"]["model"] == "glm-5.1"
        _, _, completion = await ask(session, model="glm-4.5-air")
        assert completion["model"] == "glm-4.5-air"
        _, _, raw = await ask(session, model="glm-4.5-air", stream=True,
                              stream_options={"include_usage": True})
        chunks = [json.loads(block.removeprefix(b"data: "))
                  for block in raw.split(b"\n\n") if block and block != b"data: [DONE]"]
        assert chunks and {c["model"] for c in chunks} == {"glm-4.5-air"}
        # Z.AI answers Anthropic model names with its default GLM model.
        _, _, message = await ask(session, ANTHROPIC_URL, model="claude-sonnet-4-5")
        assert message["model"] == "glm-4.7"
