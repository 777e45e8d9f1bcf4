from datetime import datetime, timezone

import pytest
from hypothesis import given, strategies as st

from extproc.limiter.budget import BudgetConfig, BudgetFileError, parse_budgets
from extproc.limiter.quota import QuotaGate, format_reset
from extproc.limiter.signals import quota_reset_at

T0 = 1_800_000_000.0


# --- The budgets file, and who it applies to ---------------------------------------------------

FILE = """
# budgets
*      rpm=60 tpm=200000   # everyone else
alice  tpm=1_000_000
ci-bot
"""


def test_own_line_wins_default_applies_and_a_bare_line_exempts():
    from extproc.limiter.account import AccountLimiter, LimiterSettings
    from extproc.limiter.stores.local import LocalStore

    settings = LimiterSettings(initial=3, minimum=1, maximum=5, rate_initial=600, rate_minimum=12,
                               rate_maximum=6000, max_wait=1, max_queue=1, lease_ttl=60,
                               probe_interval=15, state_file=None, budgets=parse_budgets(FILE))
    limiter = AccountLimiter("acct", settings, LocalStore())
    assert limiter.budget_for("alice") == BudgetConfig(rpm=None, tpm=1_000_000)
    assert limiter.budget_for("someone") == BudgetConfig(rpm=60, tpm=200_000)
    assert limiter.budget_for("ci-bot") is None


def test_parse_budgets():
    assert parse_budgets(FILE) == {
        "*": BudgetConfig(60, 200000), "alice": BudgetConfig(None, 1_000_000),
        "ci-bot": BudgetConfig(None, None)}


@pytest.mark.parametrize("text, words", [
    ("alice rpm=0", ["line 1", "rpm must be a positive whole number", "rpm=60"]),
    ("\nalice tpm=lots", ["line 2", "tpm=lots", "tpm=200000"]),
    ("alice rpm=1\nalice tpm=5", ["line 2", "'alice' is listed twice"]),
    ("alice burst=5", ["line 1", "'burst=5' is not a setting"]),
    ("alice rpm=5 rpm=6", ["line 1", "rpm is given twice"]),
    ("rpm=5", ["line 1", "starts with a setting"]),
    ("bob 60", ["line 1", "'60' is not a setting"]),
])
def test_parse_errors_name_the_line(text, words):
    with pytest.raises(BudgetFileError) as info:
        parse_budgets(text)
    for word in words:
        assert word in str(info.value)


# --- QuotaGate -------------------------------------------------------------------------------

MESSAGE = "Usage limit reached for 5 hour. Your limit will reset at 2027-01-15 16:00:00"


def test_gate_closes_until_the_reset_time_and_reopens():
    gate = QuotaGate()
    assert gate.check(T0) is None and gate.reason() is None
    reset = quota_reset_at(MESSAGE, T0)
    assert reset is not None
    until = gate.close(reset, "1308", MESSAGE, now_wall=reset - 3600)
    assert until == reset
    assert gate.check(reset - 3600) == 3600
    assert gate.check(reset - 0.5) == 0.5
    assert gate.check(reset) is None
    assert gate.closure is None


def test_reason_gives_both_time_zones_and_what_to_do():
    gate = QuotaGate()
    reset = datetime(2027, 1, 15, 8, 0, 0, tzinfo=timezone.utc).timestamp()
    gate.close(reset, "1308", MESSAGE, now_wall=reset - 60)
    reason = gate.reason()
    assert "2027-01-15 08:00:00 UTC (2027-01-15 16:00:00 UTC+8)" in reason
    assert "code 1308" in reason and MESSAGE in reason and "Retry after" in reason
    assert format_reset(reset) == "2027-01-15 08:00:00 UTC (2027-01-15 16:00:00 UTC+8)"


def test_without_reset_time_the_gate_closes_for_the_default():
    gate = QuotaGate(default_closure=300)
    assert gate.close(None, "1309", "Your plan has expired", now_wall=T0) == T0 + 300
    reason = gate.reason()
    assert "renew" in reason and "no reset time" in reason


def test_a_past_reset_time_still_closes_briefly():
    gate = QuotaGate(minimum_closure=10)
    assert gate.close(T0 - 100, "1308", MESSAGE, now_wall=T0) == T0 + 10


def test_later_closure_wins_earlier_does_not_shorten():
    gate = QuotaGate()
    gate.close(T0 + 600, "1308", "first", now_wall=T0)
    assert gate.close(T0 + 300, "1304", "second", now_wall=T0 + 1) == T0 + 600
    assert gate.closure.message == "first"
    assert gate.close(T0 + 900, "1310", "third", now_wall=T0 + 2) == T0 + 900
    assert gate.closure.code == "1310"


def test_open_reopens_at_once():
    gate = QuotaGate()
    gate.close(T0 + 600, "1308", MESSAGE, now_wall=T0)
    gate.open()
    assert gate.check(T0) is None


def test_message_is_cleaned_and_bounded():
    gate = QuotaGate()
    gate.close(T0 + 60, "1113", "in\narrears   " + "x" * 1000, now_wall=T0)
    assert gate.closure.message.startswith("in arrears x") and len(gate.closure.message) == 300


def test_gate_snapshot_restore():
    gate = QuotaGate()
    gate.close(T0 + 600, "1308", MESSAGE, now_wall=T0)
    other = QuotaGate()
    assert other.restore(gate.snapshot(), T0 + 10)
    assert other.check(T0 + 10) == 590 and other.reason() == gate.reason()
    assert not QuotaGate().restore(gate.snapshot(), T0 + 600)  # over already
    assert not QuotaGate().restore(None, T0)
    assert not QuotaGate().restore({"until": "x"}, T0)
    assert QuotaGate().snapshot() is None


@given(st.lists(st.tuples(st.one_of(st.none(), st.floats(-1e4, 1e5)), st.floats(0, 1000)),
                max_size=20))
def test_gate_retry_after_is_positive_and_never_shrinks_by_closing(events):
    gate, now = QuotaGate(), T0
    for offset, gap in events:
        now += gap
        before = gate.check(now)
        gate.close(None if offset is None else now + offset, "1308", "m", now_wall=now)
        after = gate.check(now)
        assert after is not None and after > 0
        assert before is None or after >= before
