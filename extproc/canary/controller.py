"""The rollout loop: drives the state machine (`rollout`) with the edges — the split (`routes`),
the metrics (`sources` + `analysis`), the audit and state files, the controller's metrics — and
a clock and a sleep that are injected (tests run it on a fake clock).

Order of a weight change, so that a kill anywhere leaves a resumable rollout: the state file
records the change as pending; the split is changed; the audit gets its entry (unique by change
id); the state file records it made. Every decision is also one JSON log line.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

from extproc.canary import rollout
from extproc.canary.analysis import INCONCLUSIVE, CheckResult, MetricsSource, Report, analyze
from extproc.canary.audit import AuditLog
from extproc.canary.durations import iso
from extproc.canary.metrics import CanaryMetrics
from extproc.canary.routes import RoutesTarget, percent_of
from extproc.canary.rollout import Plan, RolloutError, State
from extproc.canary.sources import SourceError
from extproc.canary.statefile import StateFile
from extproc.canary.thresholds import Thresholds

Log = Callable[..., None]  # log(event, **fields): one JSON line


def new_rollout_id(now: float) -> str:
    return "r-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + secrets.token_hex(2)


def unavailable(reason: str, window: float, now: float) -> Report:
    """An analysis that could not be made is no pass: inconclusive, saying why."""
    check = CheckResult("metrics", INCONCLUSIVE, f"metrics unavailable: {reason}")
    return Report(INCONCLUSIVE, (check,), window, now, 0, 0)


def _sleep(seconds: float) -> bool:
    """The default wait: sleeps, and never asks the rollout to stop."""
    time.sleep(seconds)
    return False


@dataclass
class Controller:
    plan: Plan
    target: RoutesTarget
    source: MetricsSource
    thresholds: Thresholds
    audit: AuditLog
    states: StateFile
    log: Log
    who: str
    command: str = "canary rollout"
    release: str | None = None
    metrics: CanaryMetrics | None = None
    clock: Callable[[], float] = time.time
    # wait(seconds) -> True when the rollout must stop (SIGTERM); the default never stops.
    wait: Callable[[float], bool] = _sleep
    new_id: Callable[[float], str] = new_rollout_id
    stopped: bool = False

    # ---------------------------------------------------------------- start or resume

    def begin(self, restart: bool = False) -> State:
        now = self.clock()
        live = percent_of(self.target.current())
        recorded = self.states.load()
        new_release = (self.release is not None and not restart
                       and (recorded is None or recorded.release != self.release))
        if new_release:
            # A canary release never judged starts from production, whatever the split says: a
            # rollout of an earlier release that was still running is over, and a share left to
            # the canary (by that rollout, or by hand) goes back to production first.
            reason = f"release {self.release}: a new canary starts from 0%"
            if recorded is not None and not recorded.finished:
                reason = (f"release {self.release} replaces {recorded.release} during rollout "
                          f"{recorded.rollout}: the split starts again from 0%")
                self._save(rollout.abort(recorded, reason, now))
                self.log("rollout superseded", rollout=recorded.rollout, release=self.release,
                         reason=reason)
                recorded = None
            if live:
                change_now(self.target, self.audit, 0, action="rollback", reason=reason, who=self.who,
                           command=self.command, now=now)
                live = 0
        if recorded is not None and not recorded.finished and not restart:
            state, made = rollout.resume(recorded, live, now)
            if made is not None:  # killed between changing the split and recording it
                self._audit(made, state, now, note="recorded on resume")
            self.log("rollout resumed", rollout=state.rollout, weight=state.weight, step=state.step,
                     next_decision_at=iso(state.next_decision_at))
        elif (recorded is not None and self.release is not None and recorded.release == self.release
              and not restart):
            self.log("rollout already finished", rollout=recorded.rollout, release=self.release,
                     phase=recorded.phase, reason=recorded.reason)
            self._publish(recorded)
            return recorded
        else:
            state = rollout.start(self.plan, self.new_id(now), live, now, self.who, self.release)
            self.log("rollout started", rollout=state.rollout, release=self.release, weight=live,
                     target=self.target.describe(), **self.plan.as_dict())
        self._save(state)
        return state

    # ------------------------------------------------------------------------ the loop

    def run(self, state: State) -> State:
        while not state.finished:
            now = self.clock()
            if not rollout.due(state, now):
                if self.wait(min(state.next_decision_at - now, 5.0)):
                    self.stopped = True
                    self.log("rollout interrupted", rollout=state.rollout, weight=state.weight,
                             reason=f"stopped by a signal; the split stays at {state.weight}% (the "
                                    "last safe step); run again to resume")
                    return state
                continue
            state = self.step(state)
        return state

    def step(self, state: State) -> State:
        """One decision, due now."""
        now = self.clock()
        live = percent_of(self.target.current())
        if live != state.weight:
            state = rollout.abort(state, rollout.moved_message(state, live), now)
            self.log("rollout aborted", rollout=state.rollout, weight=live, reason=state.reason)
            self._save(state)
            return state
        report = None
        if rollout.needs_analysis(state):
            try:
                report = analyze(self.source.sample(self.plan.window), self.thresholds)
            except SourceError as exc:
                report = unavailable(str(exc), self.plan.window, now)
            if self.metrics is not None:
                self.metrics.report(report)
        decision = rollout.decide(state, report, now)
        self.log("canary decision", rollout=state.rollout, **decision.as_dict(),
                 step=state.step, steps=list(self.plan.steps),
                 analysis=None if report is None else report.summary())
        if self.metrics is not None:
            self.metrics.decision(decision)
        if decision.changes_weight:
            self._save(rollout.with_pending(state, decision, now))
            note = (f"canary rollout {state.rollout} "
                    + (f"step {rollout.reached(self.plan, decision.to_weight)}/{len(self.plan.steps)}"
                       if decision.action == rollout.STEP else "rollback")
                    + (f": {decision.verdict}" if decision.verdict else ""))
            split = self.target.set(decision.to_weight, note)
            confirmed, said = self.target.confirm(split)
            state = rollout.apply(state, decision, report, self.clock())
            self._audit(decision, state, self.clock(), envoy=said, version=split.version)
            self.log("weights changed", rollout=state.rollout, **{"from": decision.from_weight},
                     to=decision.to_weight, version=split.version, envoy=said, confirmed=confirmed)
        else:
            state = rollout.apply(state, decision, report, now)
        if state.finished:
            self.log("rollout finished", rollout=state.rollout, phase=state.phase,
                     weight=state.weight, reason=state.reason)
        self._save(state)
        return state

    # ------------------------------------------------------------------------- records

    def _audit(self, decision: rollout.Decision, state: State, now: float, **extra: Any) -> None:
        self.audit.append_once({
            "who": self.who, "command": self.command, "rollout": state.rollout,
            "release": state.release, "change": decision.change, "action": decision.action,
            "from": decision.from_weight, "to": decision.to_weight, "reason": decision.reason,
            "verdict": decision.verdict, "checks": decision.checks,
            "target": self.target.describe(), **extra}, now)

    def _save(self, state: State) -> None:
        self.states.save(state)
        self._publish(state)

    def _publish(self, state: State) -> None:
        if self.metrics is not None:
            self.metrics.state(state)


def change_now(target: RoutesTarget, audit: AuditLog, percent: int, *, action: str, reason: str,
               who: str, command: str, now: float, verdict: str | None = None,
               checks: dict[str, str] | None = None) -> tuple[int, Any, str]:
    """One manual change of the split (canary promote / rollback), audited. Returns (the previous
    percent, the new split, what is known about Envoy serving it)."""
    before = percent_of(target.current())
    change = f"{action}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}-{secrets.token_hex(2)}"
    split = target.set(percent, f"{command}: {reason}"[:200])
    _, said = target.confirm(split)
    audit.append({"who": who, "command": command, "rollout": None, "change": change,
                  "action": action, "from": before, "to": percent, "reason": reason,
                  "verdict": verdict, "checks": checks or {}, "target": target.describe(),
                  "envoy": said, "version": split.version}, now)
    return before, split, said


def stop_recorded(states: StateFile, reason: str, now: float) -> State | None:
    """A manual change of the split ends a rollout that was running: recorded as aborted, so the
    dashboard says so (a running controller notices the split moved and stops too)."""
    try:
        state = states.load()
    except RolloutError:
        return None
    if state is None or state.finished:
        return state
    state = rollout.abort(state, reason, now)
    states.save(state)
    return state
