"""The rollout state machine and its loop, on a fake clock with scripted verdicts: promotion step
by step, rollback at once on a failure, waiting on inconclusive up to a limit, a kill at every
point of a weight change resumed without a lost or doubled audit entry, and a split changed by
someone else."""

from __future__ import annotations

import dataclasses
import json

import pytest

from extproc.canary import rollout
from extproc.canary.analysis import FAIL, INCONCLUSIVE, PASS, CheckResult, Report
from extproc.canary.audit import AuditLog
from extproc.canary.controller import Controller, change_now, stop_recorded
from extproc.canary.metrics import CanaryMetrics
from extproc.canary.rollout import Plan, RolloutError
from extproc.canary.sources import SourceError
from extproc.canary.statefile import RolloutLock, StateFile
from extproc.canary.thresholds import Thresholds
from extproc.routing.weights import Split

PLAN = Plan((5, 25, 50, 100), interval=60.0, window=60.0, max_inconclusive=3)


def report(verdict: str, check: str = "errors") -> Report:
    return Report(verdict, (CheckResult(check, verdict, f"{check} {verdict}"),), 60.0, 0.0, 100, 1000)


def test_plan_is_checked():
    for bad in ((), (0, 50), (50, 25), (5, 5, 10), (5, 150)):
        with pytest.raises(RolloutError):
            Plan(bad)
    with pytest.raises(RolloutError):
        Plan(on_stall="retry")


def test_healthy_rollout_steps_through_every_step_and_completes():
    state = rollout.start(PLAN, "r1", 0, 0.0, "me")
    weights, now = [], 0.0
    while not state.finished:
        assert rollout.due(state, now)
        r = report(PASS) if rollout.needs_analysis(state) else None
        decision = rollout.decide(state, r, now)
        state = rollout.apply(state, decision, r, now)
        weights.append(state.weight)
        now = state.next_decision_at
    assert weights == [5, 25, 50, 100]
    assert state.phase == rollout.COMPLETE and state.step == 4 and state.changes == 4


def test_first_step_needs_no_analysis_and_later_ones_do():
    state = rollout.start(PLAN, "r1", 0, 0.0, "me")
    assert not rollout.needs_analysis(state)
    first = rollout.decide(state, None, 0.0)
    assert (first.action, first.to_weight, first.verdict) == ("step", 5, None)
    state = rollout.apply(state, first, None, 0.0)
    assert not rollout.due(state, 59.0) and rollout.due(state, 60.0)
    with pytest.raises(RolloutError):
        rollout.decide(state, None, 60.0)


def test_failure_rolls_back_to_zero_at_once_and_says_why():
    state = rollout.apply(*(lambda s: (s, rollout.decide(s, None, 0.0)))(rollout.start(PLAN, "r1", 0, 0.0, "me")), None, 0.0)
    decision = rollout.decide(state, report(FAIL), 60.0)
    assert (decision.action, decision.from_weight, decision.to_weight) == ("rollback", 5, 0)
    assert "errors: errors fail" in decision.reason and decision.checks == {"errors": "fail"}
    state = rollout.apply(state, decision, report(FAIL), 60.0)
    assert state.phase == rollout.ROLLED_BACK and state.weight == 0 and state.finished


def at(weight: int, **changes) -> rollout.State:
    state = rollout.start(PLAN, "r1", weight, 0.0, "me")
    return dataclasses.replace(state, **changes)


def test_inconclusive_holds_then_stalls_without_promoting():
    state = at(5)
    actions = []
    now = 0.0
    while not state.finished:
        decision = rollout.decide(state, report(INCONCLUSIVE), now)
        state = rollout.apply(state, decision, report(INCONCLUSIVE), now)
        actions.append((decision.action, state.weight))
        now = state.next_decision_at
    assert actions == [("hold", 5), ("hold", 5), ("stall", 5)]
    assert state.phase == rollout.STALLED and state.weight == 5
    # on_stall=rollback gives up to production instead.
    state = at(5, plan=dataclasses.replace(PLAN, on_stall="rollback"), inconclusive=2)
    decision = rollout.decide(state, report(INCONCLUSIVE), 0.0)
    assert (decision.action, decision.to_weight) == ("rollback", 0)


def test_a_pass_resets_the_inconclusive_count():
    state = at(5, inconclusive=2)
    state = rollout.apply(state, rollout.decide(state, report(PASS), 0.0), report(PASS), 0.0)
    assert state.weight == 25 and state.inconclusive == 0


def test_start_between_or_past_steps():
    state = rollout.start(PLAN, "r1", 10, 0.0, "me")
    assert state.step == 1 and rollout.next_step(state) == 25 and rollout.needs_analysis(state)
    done = rollout.start(PLAN, "r1", 100, 0.0, "me")
    assert done.phase == rollout.COMPLETE and "nothing to do" in done.reason


def test_settle_time_delays_the_steps_clock():
    plan = dataclasses.replace(PLAN, settle=90.0)
    state = rollout.start(plan, "r1", 0, 0.0, "me")
    state = rollout.apply(state, rollout.decide(state, None, 0.0), None, 0.0)
    assert state.step_started_at == 90.0 and state.next_decision_at == 150.0


def test_state_round_trips_through_json():
    state = at(25, last_verdict={"verdict": "pass"}, pending={"action": "step"}, release="v2")
    doc = json.loads(json.dumps(state.to_json()))
    assert rollout.State.from_json(doc) == state
    assert doc["next_weight"] == 50 and doc["steps"] == [5, 25, 50, 100]


def test_resume_settles_a_pending_change_by_the_split_as_it_is():
    state = at(5)
    decision = rollout.decide(state, report(PASS), 60.0)
    pending = rollout.with_pending(state, decision, 60.0)
    made, recorded = rollout.resume(pending, 25, 70.0)  # the change was made, then the kill
    assert made.weight == 25 and made.pending is None and recorded == decision
    not_made, recorded = rollout.resume(pending, 5, 70.0)  # killed before the change
    assert not_made.weight == 5 and not_made.pending is None and recorded is None
    with pytest.raises(RolloutError, match="someone changed it"):
        rollout.resume(pending, 50, 70.0)
    with pytest.raises(RolloutError, match="someone changed it"):
        rollout.resume(state, 0, 70.0)


# ---------------------------------------------------------------------------- the loop

class FakeTarget:
    def __init__(self, percent: int = 0) -> None:
        self.percent = percent
        self.versions = 0
        self.fail_after_set = False

    def describe(self) -> str:
        return "fake routes"

    def current(self) -> Split:
        return Split(float(self.percent), 3, f"v{self.versions}")

    def set(self, percent: int, note: str) -> Split:
        self.percent = percent
        self.versions += 1
        self.note = note
        if self.fail_after_set:
            raise KeyboardInterrupt("killed after the change")  # as a SIGKILL would leave it
        return self.current()

    def confirm(self, split: Split) -> tuple[bool | None, str]:
        return True, "Envoy: serving these routes"


class ScriptedSource:
    def __init__(self, verdicts: list[str]) -> None:
        self.verdicts = list(verdicts)

    def describe(self) -> str:
        return "script"

    def sample(self, window: float):  # analyze() gets what it needs from this sample
        verdict = self.verdicts.pop(0)
        if verdict == "down":
            raise SourceError("Prometheus is down")
        from extproc.canary.analysis import Sample, VariantSample

        production = VariantSample(requests=1000, ok=1000, tokens=100_000)
        canary = {PASS: VariantSample(requests=200, ok=200, tokens=20_000),
                  FAIL: VariantSample(requests=200, ok=140, errors=60, tokens=14_000),
                  INCONCLUSIVE: VariantSample(requests=3, ok=3, tokens=300)}[verdict]
        return Sample(window, 0.0, production, canary, "script")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.now += seconds
        return False


def controller(tmp_path, target, verdicts, plan=PLAN, **kwargs) -> Controller:
    clock = Clock()
    lines: list[dict] = []
    return Controller(plan, target, ScriptedSource(verdicts), Thresholds(min_requests=50),
                      AuditLog(tmp_path / "audit.jsonl"), StateFile(tmp_path / "state.json"),
                      lambda event, **fields: lines.append({"event": event, **fields}), "tester",
                      clock=clock, wait=clock.wait, new_id=lambda now: "r-test", **kwargs)


def audit_pairs(tmp_path) -> list[tuple[int, int]]:
    return [(e["from"], e["to"]) for e in AuditLog(tmp_path / "audit.jsonl").entries()]


def test_controller_promotes_and_records_every_change(tmp_path):
    target = FakeTarget()
    metrics = CanaryMetrics()
    c = controller(tmp_path, target, [PASS, PASS, PASS], metrics=metrics)
    state = c.run(c.begin())
    assert state.phase == rollout.COMPLETE and target.percent == 100
    entries = list(AuditLog(tmp_path / "audit.jsonl").entries())
    assert [(e["from"], e["to"], e["verdict"]) for e in entries] == \
        [(0, 5, None), (5, 25, "pass"), (25, 50, "pass"), (50, 100, "pass")]
    assert all(e["who"] == "tester" and e["reason"] and e["rollout"] == "r-test" for e in entries)
    assert entries[1]["ts"] - entries[0]["ts"] == pytest.approx(60.0)
    assert "canary rollout r-test step 4/4" in target.note
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["phase"] == "complete" and saved["weight"] == 100 and saved["next_decision_at"] is None
    assert metrics.step._value.get() == 4 and metrics.weight._value.get() == 100
    assert metrics.verdicts.labels("overall", "pass")._value.get() == 3


def test_controller_rolls_back_on_failure_and_counts_it(tmp_path):
    target = FakeTarget()
    metrics = CanaryMetrics()
    c = controller(tmp_path, target, [PASS, FAIL], metrics=metrics)
    state = c.run(c.begin())
    assert state.phase == rollout.ROLLED_BACK and target.percent == 0
    assert audit_pairs(tmp_path) == [(0, 5), (5, 25), (25, 0)]
    assert metrics.rollbacks.labels("errors")._value.get() == 1


def test_unavailable_metrics_are_inconclusive_never_a_pass(tmp_path):
    target = FakeTarget()
    c = controller(tmp_path, target, ["down", "down", "down"])
    state = c.run(c.begin())
    assert state.phase == rollout.STALLED and target.percent == 5
    assert "metrics unavailable: Prometheus is down" in state.reason


@pytest.mark.parametrize("kill", ["before the change", "after the change"])
def test_killed_during_a_change_resumes_without_losing_or_doubling_it(tmp_path, kill):
    target = FakeTarget()
    c = controller(tmp_path, target, [PASS])
    state = c.step(c.begin())  # 0 -> 5
    c.clock.now = state.next_decision_at
    if kill == "after the change":
        target.fail_after_set = True
        with pytest.raises(KeyboardInterrupt):
            c.step(state)  # 5 -> 25 made, the process dies before recording it
        assert target.percent == 25
    else:
        c.states.save(rollout.with_pending(state, rollout.decide(state, rollout_report(), c.clock()), c.clock()))
    target.fail_after_set = False
    again = controller(tmp_path, target, [PASS, PASS, PASS])
    resumed = again.begin()
    assert resumed.rollout == "r-test" and resumed.pending is None
    state = again.run(resumed)
    assert state.phase == rollout.COMPLETE
    assert audit_pairs(tmp_path) == [(0, 5), (5, 25), (25, 50), (50, 100)]


def rollout_report() -> Report:
    return report(PASS)


def test_killed_between_steps_resumes_at_the_recorded_step_and_time(tmp_path):
    target = FakeTarget()
    c = controller(tmp_path, target, [PASS])
    state = c.step(c.begin())
    c.clock.now = state.next_decision_at
    state = c.step(state)  # at 25, next decision in 60 s
    assert state.weight == 25
    again = controller(tmp_path, target, [PASS, PASS])
    again.clock.now = c.clock.now + 10  # restarted 10 s later
    resumed = again.begin()
    assert resumed.weight == 25 and resumed.next_decision_at == state.next_decision_at
    assert again.run(resumed).phase == rollout.COMPLETE


def test_a_split_changed_by_hand_stops_the_rollout(tmp_path):
    target = FakeTarget()
    c = controller(tmp_path, target, [PASS, PASS, PASS])
    state = c.step(c.begin())
    target.percent = 0  # `weights fallback` meanwhile
    c.clock.now = state.next_decision_at
    state = c.step(state)
    assert state.phase == rollout.ABORTED and "someone changed it" in state.reason
    assert audit_pairs(tmp_path) == [(0, 5)]
    with pytest.raises(RolloutError, match="nothing to resume"):
        rollout.resume(state, 0, 0.0)


def test_a_finished_release_is_not_rolled_out_again_but_a_new_one_is(tmp_path):
    target = FakeTarget()
    first = controller(tmp_path, target, [FAIL], release="v2")
    assert first.run(first.begin()).phase == rollout.ROLLED_BACK
    again = controller(tmp_path, target, [], release="v2")
    assert again.begin().phase == rollout.ROLLED_BACK  # nothing happens
    assert audit_pairs(tmp_path) == [(0, 5), (5, 0)]
    fixed = controller(tmp_path, target, [PASS, PASS, PASS], release="v3")
    assert fixed.run(fixed.begin()).phase == rollout.COMPLETE


def test_manual_promote_and_rollback_are_audited_and_end_a_running_rollout(tmp_path):
    target = FakeTarget()
    c = controller(tmp_path, target, [PASS])
    c.step(c.begin())
    audit = AuditLog(tmp_path / "audit.jsonl")
    before, split, said = change_now(target, audit, 0, action="rollback", reason="pager says so",
                                     who="alice", command="canary rollback", now=2000.0)
    assert before == 5 and target.percent == 0
    stopped = stop_recorded(StateFile(tmp_path / "state.json"), "canary rollback by alice", 2000.0)
    assert stopped.phase == rollout.ABORTED
    last = list(audit.entries())[-1]
    assert (last["who"], last["from"], last["to"], last["reason"]) == ("alice", 5, 0, "pager says so")


def test_audit_lines_are_appended_never_rewritten(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.append({"change": "a", "from": 0, "to": 5}, 1.0)
    with open(tmp_path / "audit.jsonl", "a") as f:
        f.write('{"cut in the mid')  # a crash while writing
    assert audit.append_once({"change": "a", "from": 0, "to": 5}, 2.0) is False
    assert audit.append_once({"change": "b", "from": 5, "to": 25}, 3.0) is True
    assert [e["change"] for e in audit.entries()] == ["a", "b"]


def test_one_rollout_at_a_time(tmp_path):
    with RolloutLock(tmp_path / "state.json"):
        with pytest.raises(RolloutError, match="another canary rollout is running"):
            RolloutLock(tmp_path / "state.json").acquire()
    with RolloutLock(tmp_path / "state.json"):
        pass


def test_a_new_release_mid_rollout_starts_over_from_production(tmp_path):
    target = FakeTarget()
    first = controller(tmp_path, target, [PASS], release="v2")
    state = first.step(first.begin())
    first.clock.now = state.next_decision_at
    assert first.step(state).weight == 25
    replaced = controller(tmp_path, target, [PASS, PASS, PASS], release="v3")
    state = replaced.begin()
    assert state.rollout == "r-test" and state.release == "v3" and state.weight == 0
    assert target.percent == 0
    entries = list(AuditLog(tmp_path / "audit.jsonl").entries())
    assert [(e["from"], e["to"], e["action"]) for e in entries] == [(0, 5, "step"), (5, 25, "step"),
                                                                     (25, 0, "rollback")]
    assert "release v3 replaces v2" in entries[-1]["reason"]
    assert replaced.run(state).phase == rollout.COMPLETE


def test_a_new_release_starts_from_production_even_after_a_completed_one(tmp_path):
    target = FakeTarget()
    done = controller(tmp_path, target, [PASS, PASS, PASS], release="v2")
    assert done.run(done.begin()).phase == rollout.COMPLETE and target.percent == 100
    following = controller(tmp_path, target, [PASS, PASS, PASS], release="v3")
    state = following.begin()
    assert state.weight == 0 and state.phase == rollout.RUNNING and target.percent == 0
    assert audit_pairs(tmp_path)[-1] == (100, 0)
    # Without a release (by hand), a rollout starts from the split as it is.
    target.percent = 25
    by_hand = controller(tmp_path / "by-hand", target, [PASS, PASS])
    assert by_hand.begin().weight == 25
