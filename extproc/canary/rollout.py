"""The rollout's state machine, pure: no clock (times are passed in), no I/O, no HTTP.

A rollout moves the canary's share of the split through `steps` (5, 25, 50, 100). Its state is a
`State`; each decision is a `Decision` computed from the state and, where there is canary traffic
to judge, an analysis `Report`:

    weight 0          -> step to steps[0] (nothing to analyse yet)
    report fail       -> rollback: everything to production at once, and stop (rolled_back)
    report inconclusive -> hold and analyse again one interval later; after `max_inconclusive`
                         in a row: stall (hold the split where it is and stop) or, with
                         on_stall=rollback, roll back
    report pass       -> step to the next step; reaching the last one completes the rollout

A weight change is made in three moves so that a kill at any point leaves a state that can be
resumed: `with_pending` records the change before it is made, the edge makes it, `apply` records
it made. `resume` settles a pending change by what the split really is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from extproc.canary.analysis import FAIL, INCONCLUSIVE, PASS, Report
from extproc.canary.durations import format_duration, iso

RUNNING, COMPLETE, ROLLED_BACK, STALLED, ABORTED = "running", "complete", "rolled_back", "stalled", "aborted"
PHASES = (RUNNING, COMPLETE, ROLLED_BACK, STALLED, ABORTED)
FINISHED = frozenset({COMPLETE, ROLLED_BACK, STALLED, ABORTED})
# Decision actions. step and rollback change the split; hold, stall and complete do not.
STEP, ROLLBACK, HOLD, STALL, DONE = "step", "rollback", "hold", "stall", "complete"
ON_STALL = ("hold", "rollback")
SCHEMA = 1


class RolloutError(ValueError):
    """The rollout cannot go on as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Plan:
    steps: tuple[int, ...] = (5, 25, 50, 100)
    interval: float = 300.0  # seconds at each step before it is judged
    window: float = 300.0  # seconds of metrics each analysis looks at
    max_inconclusive: int = 6  # inconclusive analyses in a row before the rollout stalls
    on_stall: str = "hold"  # "hold": stop where it is; "rollback": back to production
    settle: float = 0.0  # seconds after a change before its step's clock starts (propagation)

    def __post_init__(self) -> None:
        if not self.steps:
            raise RolloutError("--steps needs at least one step, e.g. 5,25,50,100")
        if any(not 0 < s <= 100 for s in self.steps):
            raise RolloutError(f"every step is a percent from 1 to 100, not {list(self.steps)}")
        if list(self.steps) != sorted(set(self.steps)):
            raise RolloutError(f"steps must go up, each once: {list(self.steps)}")
        if self.interval <= 0 or self.window <= 0 or self.settle < 0:
            raise RolloutError("the interval and the window must be above 0, the settle time not negative")
        if self.max_inconclusive < 1:
            raise RolloutError("--max-inconclusive must be at least 1")
        if self.on_stall not in ON_STALL:
            raise RolloutError(f"--on-stall is one of {', '.join(ON_STALL)}")

    def as_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "interval_seconds": self.interval,
                "window_seconds": self.window, "max_inconclusive": self.max_inconclusive,
                "on_stall": self.on_stall, "settle_seconds": self.settle}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "Plan":
        return cls(tuple(int(s) for s in doc["steps"]), float(doc["interval_seconds"]),
                   float(doc["window_seconds"]), int(doc["max_inconclusive"]), str(doc["on_stall"]),
                   float(doc.get("settle_seconds", 0.0)))


@dataclass(frozen=True)
class Decision:
    action: str
    from_weight: int
    to_weight: int
    reason: str
    verdict: str | None = None  # of the analysis behind it; None: no analysis
    change: str | None = None  # id of the weight change (audit entries are unique by it)
    checks: dict[str, str] = field(default_factory=dict)  # check -> verdict

    @property
    def changes_weight(self) -> bool:
        return self.from_weight != self.to_weight

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action, "from": self.from_weight, "to": self.to_weight,
                "reason": self.reason, "verdict": self.verdict, "change": self.change,
                "checks": self.checks}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "Decision":
        return cls(doc["action"], int(doc["from"]), int(doc["to"]), doc["reason"], doc.get("verdict"),
                   doc.get("change"), dict(doc.get("checks") or {}))


@dataclass(frozen=True)
class State:
    rollout: str  # id
    plan: Plan
    phase: str
    weight: int  # the canary's percent of the split, as this rollout last set (or found) it
    step: int  # steps reached: 1 = steps[0]; 0 = none yet
    started_at: float
    started_by: str
    updated_at: float
    step_started_at: float
    next_decision_at: float
    release: str | None = None
    inconclusive: int = 0  # inconclusive analyses in a row at this step
    changes: int = 0  # weight changes made so far
    last_verdict: dict[str, Any] | None = None  # Report.summary() of the last analysis
    last_decision: dict[str, Any] | None = None  # Decision.as_dict() (+ "at")
    pending: dict[str, Any] | None = None  # a weight change being made: Decision.as_dict() (+ "at")
    reason: str = ""  # why the rollout is where it is (the last decision's reason)

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    def to_json(self) -> dict[str, Any]:
        """The state file: what the dashboard shows and what `resume` reads back."""
        return {
            "schema": SCHEMA,
            "rollout": self.rollout, "release": self.release, "phase": self.phase,
            "weight": self.weight, "step": self.step, "steps": list(self.plan.steps),
            "next_weight": next_step(self),
            "plan": self.plan.as_dict(),
            "started_at": iso(self.started_at), "started_by": self.started_by,
            "updated_at": iso(self.updated_at),
            "step_started_at": iso(self.step_started_at),
            "next_decision_at": None if self.finished else iso(self.next_decision_at),
            "next_decision_ts": None if self.finished else self.next_decision_at,
            "inconclusive_in_a_row": self.inconclusive, "changes": self.changes,
            "last_verdict": self.last_verdict, "last_decision": self.last_decision,
            "pending": self.pending, "reason": self.reason,
            "ts": {"started": self.started_at, "updated": self.updated_at,
                   "step_started": self.step_started_at, "next_decision": self.next_decision_at},
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "State":
        if doc.get("schema") != SCHEMA:
            raise RolloutError(f"the state file has schema {doc.get('schema')!r}, not {SCHEMA}")
        ts = doc["ts"]
        return cls(doc["rollout"], Plan.from_dict(doc["plan"]), doc["phase"], int(doc["weight"]),
                   int(doc["step"]), float(ts["started"]), doc["started_by"], float(ts["updated"]),
                   float(ts["step_started"]), float(ts["next_decision"]), doc.get("release"),
                   int(doc.get("inconclusive_in_a_row", 0)), int(doc.get("changes", 0)),
                   doc.get("last_verdict"), doc.get("last_decision"), doc.get("pending"),
                   doc.get("reason", ""))


def next_step(state: State) -> int | None:
    """The next weight of the plan above the current one (None: at or past the last step)."""
    return next((s for s in state.plan.steps if s > state.weight), None)


def reached(plan: Plan, weight: int) -> int:
    return sum(1 for s in plan.steps if s <= weight)


def start(plan: Plan, rollout_id: str, live_weight: int, now: float, who: str,
          release: str | None = None) -> State:
    """A new rollout from the split as it is now. Already at or past the last step: nothing to
    do (complete at once)."""
    state = State(rollout_id, plan, RUNNING, live_weight, reached(plan, live_weight), now, who, now,
                  now, now, release)
    if next_step(state) is None:
        return dataclasses.replace(state, phase=COMPLETE,
                                   reason=f"the split is already at {live_weight}%, the last step "
                                          f"is {plan.steps[-1]}%: nothing to do")
    return state


def needs_analysis(state: State) -> bool:
    """Only a canary with a share of the split has traffic of the split to judge."""
    return state.weight > 0


def due(state: State, now: float) -> bool:
    return not state.finished and now >= state.next_decision_at


def decide(state: State, report: Report | None, now: float) -> Decision:
    if state.finished:
        raise RolloutError(f"rollout {state.rollout} is {state.phase}: nothing to decide")
    w, target, plan = state.weight, next_step(state), state.plan
    change = f"{state.rollout}-{state.changes + 1}"
    if not needs_analysis(state):
        assert target is not None
        return Decision(STEP, w, target, f"first step: the canary gets {target}% of the split "
                        "(no canary traffic on the split to judge before it)", None, change)
    if report is None:
        raise RolloutError("the canary has a share of the split: an analysis must come first")
    checks = {c.check: c.verdict for c in report.checks}
    why = "; ".join(report.reasons())
    if report.verdict == FAIL:
        return Decision(ROLLBACK, w, 0, f"analysis failed at {w}%: {why}", FAIL, change, checks)
    if report.verdict == INCONCLUSIVE:
        count = state.inconclusive + 1
        if count < plan.max_inconclusive:
            return Decision(HOLD, w, w, f"inconclusive ({count} of {plan.max_inconclusive} allowed "
                            f"in a row), holding at {w}% and analysing again in "
                            f"{format_duration(plan.interval)}: {why}", INCONCLUSIVE, None, checks)
        if plan.on_stall == "rollback":
            return Decision(ROLLBACK, w, 0, f"still inconclusive after {count} analyses at {w}%, "
                            f"rolling back (on_stall=rollback): {why}", INCONCLUSIVE, change, checks)
        return Decision(STALL, w, w, f"still inconclusive after {count} analyses: the split stays at "
                        f"{w}% and the rollout stops; run it again to keep trying: {why}",
                        INCONCLUSIVE, None, checks)
    assert report.verdict == PASS
    if target is None:
        return Decision(DONE, w, w, f"all checks pass at {w}%, the last step", PASS, None, checks)
    last = " (the last step)" if target == plan.steps[-1] else ""
    return Decision(STEP, w, target, f"all checks pass at {w}%: promoted to {target}%{last}", PASS,
                    change, checks)


def with_pending(state: State, decision: Decision, now: float) -> State:
    """Record a weight change about to be made (before it is)."""
    return dataclasses.replace(state, pending={**decision.as_dict(), "at": now}, updated_at=now)


def apply(state: State, decision: Decision, report: Report | None, now: float) -> State:
    """The state after `decision` was carried out (its weight change made, if any)."""
    plan = state.plan
    verdict = report.summary() if report is not None else state.last_verdict
    common: dict[str, Any] = dict(updated_at=now, last_verdict=verdict, pending=None,
                                  reason=decision.reason,
                                  last_decision={**decision.as_dict(), "at": iso(now)})
    if decision.action == STEP:
        started = now + plan.settle
        last = decision.to_weight >= plan.steps[-1]
        return dataclasses.replace(
            state, **common, weight=decision.to_weight, step=reached(plan, decision.to_weight),
            inconclusive=0, changes=state.changes + 1, step_started_at=started,
            next_decision_at=started + plan.interval, phase=COMPLETE if last else RUNNING)
    if decision.action == ROLLBACK:
        return dataclasses.replace(state, **common, weight=0, step=0, changes=state.changes + 1,
                                   phase=ROLLED_BACK, next_decision_at=now)
    if decision.action == HOLD:
        return dataclasses.replace(state, **common, inconclusive=state.inconclusive + 1,
                                   next_decision_at=now + plan.interval)
    if decision.action == STALL:
        return dataclasses.replace(state, **common, inconclusive=state.inconclusive + 1, phase=STALLED)
    if decision.action == DONE:
        return dataclasses.replace(state, **common, phase=COMPLETE)
    raise RolloutError(f"unknown action {decision.action!r}")


def abort(state: State, reason: str, now: float) -> State:
    return dataclasses.replace(state, phase=ABORTED, reason=reason, updated_at=now, pending=None)


def resume(state: State, live_weight: int, now: float) -> tuple[State, Decision | None]:
    """Carry on with a recorded rollout, given the split as it is now. Returns the state and,
    when a change recorded as pending turns out to have been made, that change (the edge writes
    its audit entry if the audit lacks it). A split changed by someone else is refused."""
    if state.finished:
        raise RolloutError(f"rollout {state.rollout} is {state.phase}; nothing to resume")
    if state.pending is not None:
        pending = Decision.from_dict(state.pending)
        if live_weight == pending.to_weight:
            return apply(state, pending, None, now), pending
        if live_weight == pending.from_weight:
            state = dataclasses.replace(state, pending=None, updated_at=now)
        else:
            raise RolloutError(moved_message(state, live_weight))
    if live_weight != state.weight:
        raise RolloutError(moved_message(state, live_weight))
    return dataclasses.replace(state, updated_at=now), None


def moved_message(state: State, live_weight: int) -> str:
    return (f"the split sends {live_weight}% to the canary, but rollout {state.rollout} left it at "
            f"{state.weight}%: someone changed it (weights set/fallback, canary rollback). Start a "
            "new rollout from the split as it is with --restart")
