"""What MODEL_MAP and MODEL_FALLBACKS did, for Prometheus: which model served the requests that
asked for which, and every decision a fallback chain took. Registered only when the rules are set
(nothing changes in /metrics otherwise). Labels are bounded by the configuration: a requested
model is named by the MODEL_MAP pattern it matched, else like every `model` label (MODEL_LABELS
and the models the rules name, else `other`); chain decisions name chain models only.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter

from extproc.proxy.models import ModelRules
from extproc.proxy.outcome import Outcome

NO_NEXT_MODEL = "none"


class ModelMetrics:
    def __init__(self, variant: str, rules: ModelRules, model_label: Callable[[str | None], str],
                 registry: CollectorRegistry) -> None:
        self.variant = variant
        self.rules = rules
        self.model_label = model_label
        self.requests = Counter(
            "zai_proxy_model_requests", "Requests by the model asked for (its MODEL_MAP pattern, "
            "else its model label) and the model that served them (as the answer named it, else "
            "as the last attempt was sent).",
            ("deployment_variant", "requested_model", "model"), registry=registry)
        self.fallbacks = Counter(
            "zai_proxy_model_fallbacks", "Attempts Z.AI refused for their model (1311, 1312) whose "
            "MODEL_FALLBACKS chain decided: retried on next_model, or `none` (the chain ended; the "
            "client got the error).",
            ("deployment_variant", "model", "next_model", "code"), registry=registry)

    def record(self, outcome: Outcome) -> None:
        requested = self.rules.pattern_of(outcome.requested_model) or self.model_label(
            outcome.requested_model)
        self.requests.labels(self.variant, requested, self.model_label(outcome.model)).inc()

    def on_chain(self, model: str, next_model: str | None, code: str) -> None:
        self.fallbacks.labels(self.variant, model.lower(),
                              next_model.lower() if next_model else NO_NEXT_MODEL, code).inc()
