"""Prometheus metrics. Names and labels are a contract with the runbooks (ARCHITECTURE.md).

Every series carries `deployment_variant`; label values are bounded: endpoint, status, direction
and source come from small fixed sets, a model is a label only if it is in the configured set
(else "other"), and error types and codes likewise. Children are cached, so recording a request
costs dict lookups, not label resolution.
"""

from __future__ import annotations

import platform
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from . import __version__
from .session import Outcome

# LLM requests run from sub-second to many minutes.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300, 450, 600, 900)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120)

OTHER = "other"
# Z.AI business codes (see ARCHITECTURE.md) and Anthropic/OpenAI error types worth a label.
KNOWN_ERROR_CODES = frozenset({"1000", "1001", "1002", "1003", "1113", "1210", "1213", "1214",
                               "1302", "1303", "1304", "1305", "1308", "1309"})
KNOWN_ERROR_TYPES = frozenset({
    "overloaded_error", "api_error", "rate_limit_error", "invalid_request_error",
    "authentication_error", "permission_error", "not_found_error", "request_too_large",
    "timeout_error", "error", *KNOWN_ERROR_CODES})


class Metrics:
    def __init__(self, variant: str, models: Iterable[str],
                 registry: CollectorRegistry | None = None) -> None:
        self.variant = variant
        self.models = frozenset(m.lower() for m in models)
        self.registry = registry or CollectorRegistry()
        r = self.registry
        labels = ("deployment_variant", "endpoint", "status")
        self.requests = Counter("zai_proxy_requests", "Requests handled, by final HTTP status.",
                                labels, registry=r)
        self.duration = Histogram("zai_proxy_request_duration_seconds",
                                  "Time from request headers to the end of the response.",
                                  labels, buckets=DURATION_BUCKETS, registry=r)
        self.tokens = Counter("zai_proxy_tokens", "Tokens by direction; source says whether Z.AI "
                              "reported them or the gateway estimated them (stream cut, no usage).",
                              ("deployment_variant", "direction", "model", "source"), registry=r)
        self.ttft = Histogram("zai_proxy_time_to_first_token_seconds",
                              "Time from request headers to the first generated token.",
                              ("deployment_variant", "model"), buckets=TTFT_BUCKETS, registry=r)
        self.cost = Counter("zai_proxy_estimated_cost_usd", "Estimated cost from the price table.",
                            ("deployment_variant", "model"), registry=r)
        self.upstream_errors = Counter(
            "zai_proxy_upstream_errors", "Errors reported by Z.AI in a body or stream, by type "
            "and Z.AI business code.", ("deployment_variant", "error_type", "code"), registry=r)
        self.in_progress = Gauge("zai_proxy_requests_in_progress", "Requests being processed now.",
                                 ("deployment_variant",), registry=r).labels(variant)
        build = Gauge("zai_proxy_build_info", "Build information (value is always 1).",
                      ("deployment_variant", "version", "python"), registry=r)
        build.labels(variant, __version__, platform.python_version()).set(1)
        self._cache: dict[tuple[object, ...], object] = {}

    def model_label(self, model: str | None) -> str:
        if model is None:
            return "unknown"
        lowered = model.lower()
        return lowered if lowered in self.models else OTHER

    def _child(self, metric: Counter | Histogram, *values: str):  # type: ignore[no-untyped-def]
        key = (id(metric), values)
        child = self._cache.get(key)
        if child is None:
            child = self._cache[key] = metric.labels(self.variant, *values)
        return child

    def record(self, outcome: Outcome, cost: float | None) -> None:
        endpoint, status = outcome.endpoint.value, str(outcome.status)
        self._child(self.requests, endpoint, status).inc()
        self._child(self.duration, endpoint, status).observe(outcome.duration)
        model = self.model_label(outcome.model)
        if outcome.tokens is not None:
            tokens = outcome.tokens
            for direction, count in tokens.by_direction().items():
                estimated = (tokens.input_estimated if direction == "input"
                             else tokens.output_estimated if direction == "output" else False)
                if count:
                    self._child(self.tokens, direction, model,
                                "estimated" if estimated else "reported").inc(count)
        if outcome.time_to_first_token is not None:
            self._child(self.ttft, model).observe(outcome.time_to_first_token)
        if cost:
            self._child(self.cost, model).inc(cost)
        if outcome.error_type is not None or outcome.error_code is not None:
            err_type = outcome.error_type if outcome.error_type in KNOWN_ERROR_TYPES else OTHER
            code = outcome.error_code if outcome.error_code in KNOWN_ERROR_CODES else (
                "none" if outcome.error_code is None else OTHER)
            self._child(self.upstream_errors, err_type, code).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
