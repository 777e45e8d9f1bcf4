"""Z.AI's quota report, the pacer and the poller: parsing, pace, gate, reserve, one poller."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings, strategies as st

from extproc.limiter.pacing import Pacer
from extproc.limiter.quota_poller import QuotaPoller
from extproc.limiter.quota_report import (QuotaReport, QuotaReportError, Window, parse_report)
from extproc.limiter.stores.local import LocalStore

NOW = 1_790_000_000.0
RESET_5H = NOW + 3600
RESET_WEEK = NOW + 5 * 86400


def report_doc(five_h: float = 40, weekly: float = 10, shape: str = "tokens",
               level: str = "pro") -> dict:
    def window(unit: int, number: int, pct: float, reset: float) -> dict:
        if shape == "tokens":
            return {"type": "TOKENS_LIMIT", "unit": unit, "number": number, "percentage": pct,
                    "nextResetTime": int(reset * 1000)}
        allowance = 1_000_000
        used = allowance * pct / 100
        return {"type": "CREDIT_LIMIT", "unit": unit, "number": number, "usage": allowance,
                "currentValue": used, "remaining": allowance - used, "percentage": int(pct),
                "nextResetTime": int(reset * 1000)}

    return {"code": 200, "msg": "Operation successful", "success": True, "data": {
        "level": level,
        "limits": [
            window(3, 5, five_h, RESET_5H),
            {"type": "FOO_LIMIT", "unit": 3, "percentage": 99},  # unknown type: skipped
            {"type": "TOKENS_LIMIT", "unit": 9, "percentage": 99},  # unknown unit: skipped
            window(6, 1, weekly, RESET_WEEK),
            {"type": "TIME_LIMIT", "unit": 5, "number": 1, "usage": 100, "currentValue": 7,
             "remaining": 93, "percentage": 7, "nextResetTime": int(RESET_WEEK * 1000)},
        ]}}


@pytest.mark.parametrize("shape", ["tokens", "credits"])
def test_both_shapes_give_the_same_windows_and_unknown_entries_are_skipped(shape):
    report = parse_report(report_doc(40, 10, shape), NOW)
    assert report.level == "pro"
    assert set(report.windows) == {"5h", "weekly", "tools"}
    assert report.windows["5h"].used_ratio == pytest.approx(0.40)
    assert report.windows["weekly"].used_ratio == pytest.approx(0.10)
    assert report.windows["5h"].reset_at == pytest.approx(RESET_5H)
    assert report.windows["tools"].used_ratio == pytest.approx(0.07)
    assert (report.windows["5h"].allowance is None) == (shape == "tokens")


@pytest.mark.parametrize("doc, says", [
    ({"code": 1001, "msg": "Authentication parameter not received", "success": False}, "1001"),
    ({"code": 500, "msg": "busy", "success": False}, "500"),
    ([], "not a JSON object"),
    ({"code": 200, "success": True}, "no `data`"),
])
def test_errors_are_reported_not_parsed(doc, says):
    with pytest.raises(QuotaReportError, match=says):
        parse_report(doc, NOW)


def test_missing_fields_leave_a_window_out_rather_than_guess():
    doc = {"code": 200, "success": True, "data": {"limits": [
        {"type": "TOKENS_LIMIT", "unit": 3},  # no percentage: nothing known
        {"type": "TOKENS_LIMIT", "unit": 6, "percentage": "12"},  # no reset time
    ]}}
    report = parse_report(doc, NOW)
    assert set(report.windows) == {"weekly"}
    assert report.windows["weekly"].reset_at is None and report.level is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "unit", "percentage", "usage", "currentValue", "remaining",
                         "nextResetTime", "level", "limits", "data", "code", "x"]),
        children, max_size=6),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["code", "success", "data", "msg"]), json_values))
def test_any_json_is_a_report_or_a_clear_error(doc):
    try:
        report = parse_report(doc, NOW)
    except QuotaReportError as exc:
        assert str(exc)
        return
    for window in report.windows.values():
        assert window.used_ratio >= 0 and window.used_ratio == window.used_ratio  # not NaN


def test_report_round_trips_through_the_shared_store_format():
    report = parse_report(report_doc(shape="credits"), NOW)
    assert QuotaReport.from_dict(report.to_dict()) == report
    assert QuotaReport.from_dict({"windows": "nope"}) is None


# -- pacing ------------------------------------------------------------------------------------


def window(ratio: float, reset: float = RESET_5H, allowance: float | None = None) -> QuotaReport:
    return QuotaReport("lite", {"5h": Window("5h", ratio, reset, allowance)}, NOW)


def test_burn_rate_projects_when_the_window_runs_out():
    pacer = Pacer()
    pacer.observe(window(0.10), NOW)
    pacer.observe(window(0.20), NOW + 600)  # 1 % a minute: 80 minutes left, the reset is in 50
    assert pacer.runs_out_at("5h", NOW + 600) is None
    late = Pacer()
    late.observe(window(0.10, reset=NOW + 7200), NOW)
    late.observe(window(0.40, reset=NOW + 7200), NOW + 600)  # 3 % a minute: 20 minutes left
    assert late.runs_out_at("5h", NOW + 600) == pytest.approx(NOW + 600 + 1200)
    late.observe(window(1.0, reset=NOW + 7200), NOW + 900)
    assert late.runs_out_at("5h", NOW + 900) == NOW + 900  # spent: runs out now


def test_tokens_since_the_last_report_move_the_estimate_on():
    pacer = Pacer()
    pacer.observe(window(0.50, allowance=1_000_000), NOW)
    pacer.count(100_000)
    assert pacer.used_now("5h") == pytest.approx(0.60)
    # A percentage-only report says nothing exact about a token: the report stands as it is.
    bare = Pacer()
    bare.observe(window(0.10), NOW)
    bare.count(50_000)
    bare.observe(window(0.20), NOW + 60)
    bare.count(50_000)
    assert bare.used_now("5h") == pytest.approx(0.20)


def test_a_window_reset_starts_the_pace_afresh():
    pacer = Pacer()
    pacer.observe(window(0.90), NOW)
    pacer.observe(window(0.05, reset=RESET_5H + 5 * 3600), NOW + 60)
    assert pacer.windows["5h"].burn_rate() is None


def test_reserve_holds_back_non_priority_workers_past_its_threshold():
    pacer = Pacer(reserve_percent=20)
    pacer.observe(window(0.79), NOW)
    assert pacer.reserve_breach(NOW) is None
    pacer.observe(window(0.85), NOW + 60)
    breach = pacer.reserve_breach(NOW + 60)
    assert breach is not None and breach.window == "5h" and breach.used == pytest.approx(0.85)
    assert breach.reset_at == RESET_5H
    assert pacer.reserve_breach(RESET_5H + 1) is None  # the window reset meanwhile
    assert Pacer().reserve_breach(NOW) is None  # no reserve set
    with pytest.raises(ValueError):
        Pacer(reserve_percent=100)


# -- the poller --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def poller(store: LocalStore, docs: list, clock: Clock, closed: list) -> QuotaPoller:
    calls = {"n": 0}

    async def fetch():
        calls["n"] += 1
        doc = docs[0] if len(docs) == 1 else docs.pop(0)
        if isinstance(doc, Exception):
            raise doc
        return doc

    p = QuotaPoller("acct", fetch, store, Pacer(), lambda until, code, msg: closed.append(
        (until, code, msg)), interval=60, wall=clock)
    p.calls = calls  # type: ignore[attr-defined]
    return p


async def test_one_replica_polls_per_interval_and_the_others_take_its_report():
    store, clock, closed = LocalStore(), Clock(), []
    first = poller(store, [report_doc(40)], clock, closed)
    second = poller(store, [report_doc(40)], clock, closed)
    await first.round()
    await second.round()
    assert first.calls["n"] + second.calls["n"] == 1
    assert second.report is not None and second.report.windows["5h"].used_ratio == pytest.approx(0.4)
    clock.now += 60  # the next interval: one of them polls again
    await second.round()
    await first.round()
    assert first.calls["n"] + second.calls["n"] == 2


async def test_a_spent_window_closes_the_gate_until_its_reset_and_errors_keep_the_last_report():
    store, clock, closed = LocalStore(), Clock(), []
    p = poller(store, [report_doc(100, 10), {"code": 1001, "msg": "no", "success": False},
                       asyncio.TimeoutError()], clock, closed)
    await p.poll()
    assert closed == [(RESET_5H + 1.0, "1308", closed[0][2])]
    assert "5h window used up" in closed[0][2]
    good = p.report
    await p.poll()
    await p.poll()
    assert p.report is good and p.status.errors == 2 and p.status.last_error == "TimeoutError"
    state = p.state()
    assert state["level"] == "pro" and state["windows"]["5h"]["used_ratio"] == 1.0


async def test_a_weekly_window_spent_closes_with_1310():
    closed: list = []
    p = poller(LocalStore(), [report_doc(30, 100)], Clock(), closed)
    await p.poll()
    assert [(until, code) for until, code, _ in closed] == [(RESET_WEEK + 1.0, "1310")]
