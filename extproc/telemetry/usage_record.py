"""What a finished request leaves behind: metrics, one "Token usage" log line, and the same
numbers as Envoy dynamic metadata for the access log. One place builds the numbers, so the three
cannot disagree."""

from __future__ import annotations

import logging
import time
from typing import Callable

from extproc.limiter.pacing import Pacer
from extproc.telemetry.logs import info_line
from extproc.telemetry.metrics import Metrics
from extproc.telemetry.model_metrics import ModelMetrics
from extproc.telemetry.worker_labels import WorkerLabels
from extproc.telemetry.pricing import PriceTable
from extproc.proxy.outcome import Outcome

log = logging.getLogger(__name__)


class Reporter:
    def __init__(self, metrics: Metrics, prices: PriceTable, variant: str,
                 wall_clock: Callable[[], float] = time.time,
                 worker_labels: WorkerLabels | None = None,
                 pacer: Pacer | None = None, models: ModelMetrics | None = None) -> None:
        self.metrics = metrics
        self.prices = prices
        self.variant = variant
        self.wall_clock = wall_clock
        self.worker_labels = worker_labels
        self.pacer = pacer  # counts the tokens spent between quota reports
        self.models = models  # requested vs served model (only with MODEL_MAP / MODEL_FALLBACKS)

    async def record(self, outcome: Outcome) -> dict[str, object]:
        tokens = outcome.tokens
        cost = (self.prices.cost(outcome.model, tokens.by_direction(), self.wall_clock())
                if tokens is not None else None)
        worker = (await self.worker_labels.label(outcome.worker)
                  if self.worker_labels is not None else None)
        self.metrics.record(outcome, cost, worker)
        if self.models is not None:
            self.models.record(outcome)
        if self.pacer is not None and tokens is not None:
            self.pacer.count(tokens.input + tokens.output + tokens.cache_read + tokens.cache_write)
        fields = usage_fields(outcome, self.variant, cost)
        info_line(log, "Token usage", fields)
        return fields


def usage_fields(outcome: Outcome, variant: str, cost: float | None) -> dict[str, object]:
    tokens = outcome.tokens
    fields: dict[str, object] = {
        "request_id": outcome.request_id,
        "worker": outcome.worker,
        "deployment_variant": variant,
        "endpoint": outcome.endpoint.value,
        "model": outcome.model,
        "requested_model": outcome.requested_model,
        # The agent's conversation (Claude Code's session), to group usage by it in a log store.
        "agent_session": outcome.agent_session,
        "status": outcome.status,
        "completed": outcome.completed,
        "input_tokens": tokens.input if tokens else 0,
        "output_tokens": tokens.output if tokens else 0,
        "cache_read_tokens": tokens.cache_read if tokens else 0,
        "cache_write_tokens": tokens.cache_write if tokens else 0,
        "estimated": tokens.estimated if tokens else False,
        "input_estimated": tokens.input_estimated if tokens else False,
        "output_estimated": tokens.output_estimated if tokens else False,
        "time_to_first_token_s": _round(outcome.time_to_first_token),
        "duration_s": _round(outcome.duration),
        "cost_usd": None if cost is None else round(cost, 8),
    }
    if outcome.error_type or outcome.error_code:
        fields["error_type"] = outcome.error_type
        fields["error_code"] = outcome.error_code
    if outcome.malformed_request:
        fields["malformed_request"] = outcome.malformed_request
    return fields


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
