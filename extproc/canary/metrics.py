"""The rollout controller's own series, on its port (`CANARY_METRICS_PORT`, `/metrics`: port.py).

Every series exists from the start (counters at 0), so `increase()` sees the first rollback.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from extproc.canary.analysis import VERDICTS, Report
from extproc.canary.rollout import PHASES, ROLLBACK, Decision, State
from extproc.canary.thresholds import DEFAULT_CHECKS

OVERALL = "overall"
# Rollbacks by the first failing check; `inconclusive` when on_stall=rollback gave up waiting.
ROLLBACK_CAUSES = (*DEFAULT_CHECKS, "inconclusive")


class CanaryMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.step = Gauge("zai_proxy_canary_step", "Steps of the rollout reached (1 = the first of "
                          "--steps; 0 = none, e.g. after a rollback).", registry=r)
        self.weight = Gauge("zai_proxy_canary_weight_percent",
                            "The canary's share of the split, as the rollout last set it (percent).",
                            registry=r)
        self.phase = Gauge("zai_proxy_canary_rollout_phase",
                           "1 for the rollout's phase (running, complete, rolled_back, stalled, "
                           "aborted), 0 for the others.", ("phase",), registry=r)
        self.next_decision = Gauge("zai_proxy_canary_next_decision_timestamp_seconds",
                                   "When the rollout decides next (0 once it has finished).", registry=r)
        self.verdicts = Counter("zai_proxy_canary_verdicts", "Analyses by check and verdict "
                                "(check=\"overall\": the analysis as a whole).", ("check", "verdict"),
                                registry=r)
        self.rollbacks = Counter("zai_proxy_canary_rollbacks", "Automatic rollbacks to production, "
                                 "by the first failing check.", ("check",), registry=r)
        for check in (*DEFAULT_CHECKS, OVERALL):
            for verdict in VERDICTS:
                self.verdicts.labels(check, verdict)
        for cause in ROLLBACK_CAUSES:
            self.rollbacks.labels(cause)
        for phase in PHASES:
            self.phase.labels(phase)

    def report(self, report: Report) -> None:
        self.verdicts.labels(OVERALL, report.verdict).inc()
        for check in report.checks:
            if check.check in DEFAULT_CHECKS:
                self.verdicts.labels(check.check, check.verdict).inc()

    def decision(self, decision: Decision) -> None:
        if decision.action != ROLLBACK:
            return
        failing = [c for c, v in decision.checks.items() if v == "fail"]
        self.rollbacks.labels(failing[0] if failing else "inconclusive").inc()

    def state(self, state: State) -> None:
        self.step.set(state.step)
        self.weight.set(state.weight)
        for phase in PHASES:
            self.phase.labels(phase).set(1 if state.phase == phase else 0)
        self.next_decision.set(0 if state.finished else state.next_decision_at)
