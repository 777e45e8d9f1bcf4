from datetime import datetime, timezone

import pytest
from hypothesis import given, strategies as st

from extproc.limiter.budget import (BudgetConfig, BudgetFileError, Budgets, TokenBucket,
                                    WorkerBudget, parse_budgets)
from extproc.limiter.quota import QuotaGate, format_reset
from extproc.limiter.signals import quota_reset_at

T0 = 1_800_000_000.0


# --- TokenBucket ---------------------------------------------------------------------------

def test_bucket_starts_full_and_says_how_long_to_wait():
    bucket = TokenBucket(10, 2)  # 2 units per second
    assert bucket.try_take(10, T0) == 0.0
    assert bucket.try_take(3, T0) == 1.5
    assert bucket.level(T0) == 0.0  # a refusal charges nothing
    assert bucket.try_take(3, T0 + 1.5) == 0.0
    assert bucket.level(T0 + 1.5) == 0.0


def test_bucket_refill_stops_at_capacity():
    bucket = TokenBucket(10, 2)
    bucket.try_take(10, T0)
    assert bucket.level(T0 + 1000) == 10


def test_amount_above_capacity_waits_for_a_full_bucket_then_leaves_debt():
    bucket = TokenBucket(10, 2)
    bucket.try_take(4, T0)
    assert bucket.try_take(25, T0) == 2.0  # 4 missing to full, at 2/s
    assert bucket.try_take(25, T0 + 2) == 0.0
    assert bucket.level(T0 + 2) == -15
    assert bucket.try_take(1, T0 + 2) == 8.0  # the debt is repaid first


def test_adjust_charges_more_or_refunds_up_to_capacity():
    bucket = TokenBucket(100, 1)
    bucket.try_take(50, T0)
    bucket.adjust(80, T0)  # real usage was 80 more than charged
    assert bucket.level(T0) == -30
    bucket.adjust(-500, T0)  # refund
    assert bucket.level(T0) == 100


def test_clock_going_back_does_not_refill_twice():
    bucket = TokenBucket(10, 1)
    bucket.try_take(10, T0 + 5)
    assert bucket.level(T0) == 0
    assert bucket.level(T0 + 6) == 1


@pytest.mark.parametrize("capacity, refill", [(0, 1), (1, 0), (-1, 1), (float("inf"), 1)])
def test_bucket_rejects_bad_parameters(capacity, refill):
    with pytest.raises(ValueError):
        TokenBucket(capacity, refill)


@given(capacity=st.floats(1, 1e6), refill=st.floats(0.01, 1e4),
       takes=st.lists(st.tuples(st.floats(0, 2e6), st.floats(0, 100)), max_size=30))
def test_waiting_the_returned_time_is_always_enough(capacity, refill, takes):
    bucket = TokenBucket(capacity, refill)
    now = T0
    for amount, gap in takes:
        now += gap
        wait = bucket.try_take(amount, now)
        assert wait >= 0
        if wait:
            assert bucket.try_take(amount, now + wait) == 0.0
            now += wait
        assert bucket.level(now) <= capacity


@given(capacity=st.integers(1, 1000), refill=st.floats(0.1, 100),
       amounts=st.lists(st.floats(0, 500), max_size=40))
def test_bucket_never_gives_more_than_capacity_plus_refill(capacity, refill, amounts):
    bucket = TokenBucket(capacity, refill)
    taken, now = 0.0, T0
    for i, amount in enumerate(amounts):
        now = T0 + i * 0.5
        if bucket.try_take(amount, now) == 0.0:
            taken += amount
    # Everything taken came from the first full bucket, refill, or debt bounded by one request.
    most = capacity + (now - T0) * refill + max(amounts, default=0)
    assert taken <= most + 1e-6


# --- WorkerBudget ----------------------------------------------------------------------------

def test_budget_charges_both_or_neither():
    budget = WorkerBudget(rpm=2, tpm=1000)
    assert budget.admit(600, T0) == 0.0
    # Tokens refuse (400 left, need 600 at 1000/60 per s): the request bucket is not charged.
    assert budget.admit(600, T0) == pytest.approx(200 / (1000 / 60))
    assert budget.requests.level(T0) == 1
    assert budget.tokens.level(T0) == 400
    # Requests refuse next: neither charged either.
    assert budget.admit(100, T0) == 0.0
    assert budget.admit(1, T0) == pytest.approx(30.0)
    assert budget.tokens.level(T0) == 300


def test_budget_wait_is_the_longer_of_the_two():
    budget = WorkerBudget(rpm=1, tpm=60)
    assert budget.admit(60, T0) == 0.0
    assert budget.admit(30, T0) == 60.0  # request bucket: 1 per minute; tokens: 30 s


def test_settle_replaces_the_estimate_by_the_real_usage():
    budget = WorkerBudget(rpm=None, tpm=600)  # 10 tokens per second
    budget.admit(100, T0)
    budget.settle(100, 700, T0)
    assert budget.tokens.level(T0) == -100  # 600 - 100 charged - 600 more used
    assert budget.admit(1, T0) == pytest.approx(10.1)


def test_rpm_only_budget_ignores_tokens():
    budget = WorkerBudget(rpm=60, tpm=None)
    assert budget.admit(10**9, T0) == 0.0
    budget.settle(0, 10**9, T0)


# --- Budgets and the file format -------------------------------------------------------------

FILE = """
# budgets
*      rpm=60 tpm=200000   # everyone else
alice  tpm=1_000_000
ci-bot
"""


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


def test_budgets_default_own_line_and_exemption():
    budgets = Budgets(parse_budgets(FILE))
    assert budgets.get("ci-bot") is None
    assert budgets.get("key-3f9c1a2b4d5e").config == BudgetConfig(60, 200000)
    assert budgets.get("alice").config == BudgetConfig(None, 1_000_000)
    assert Budgets().get("anyone") is None
    assert Budgets().admit("anyone", 10**9, T0) == 0.0


def test_budgets_are_per_worker():
    budgets = Budgets({"*": BudgetConfig(rpm=1)})
    assert budgets.admit("a", 0, T0) == 0.0
    assert budgets.admit("a", 0, T0) == 60.0
    assert budgets.admit("b", 0, T0) == 0.0


def test_update_restarts_only_changed_budgets():
    budgets = Budgets({"a": BudgetConfig(rpm=1), "b": BudgetConfig(rpm=1)})
    budgets.admit("a", 0, T0)
    budgets.admit("b", 0, T0)
    budgets.update({"a": BudgetConfig(rpm=1), "b": BudgetConfig(rpm=2)})
    assert budgets.admit("a", 0, T0) == 60.0
    assert budgets.admit("b", 0, T0) == 0.0


def test_prune_drops_full_budgets_only():
    budgets = Budgets({"*": BudgetConfig(rpm=60)})
    budgets.admit("a", 0, T0)
    budgets.admit("b", 0, T0 + 0.5)
    assert budgets.prune(T0 + 1) == 1 and len(budgets) == 1
    assert budgets.prune(T0 + 1.5) == 1 and len(budgets) == 0


def test_settle_after_prune_still_charges():
    budgets = Budgets({"*": BudgetConfig(tpm=60)})
    budgets.admit("a", 10, T0)
    budgets.prune(T0 + 3600)
    budgets.settle("a", 10, 70, T0 + 3600)
    assert budgets.get("a").tokens.level(T0 + 3600) == 0


def test_budgets_snapshot_restore():
    configs = {"*": BudgetConfig(rpm=10, tpm=1000)}
    budgets = Budgets(configs)
    budgets.admit("a", 400, T0)
    other = Budgets(configs)
    other.restore(budgets.snapshot())
    assert other.get("a").tokens.level(T0) == 600
    assert other.get("a").requests.level(T0) == 9
    changed = Budgets({"*": BudgetConfig(rpm=10, tpm=2000)})
    changed.restore(budgets.snapshot())  # limits differ: starts full
    assert changed.get("a").tokens.level(T0) == 2000
    Budgets(configs).restore({"a": "junk", "b": {"rpm": 10, "tpm": 1000, "tokens": {"x": 1}}})


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
