"""Prometheus metrics. Names and labels are a contract with the runbooks (ARCHITECTURE.md).

Every series carries `deployment_variant`; label values are bounded: endpoint, status, direction
and source come from small fixed sets, a model is a label only if it is in the configured set
(else "other"), and error types and codes likewise. Children are cached, so recording a request
costs dict lookups, not label resolution.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.values import MutexValue

from extproc import __version__
from extproc.limiter.admission import AdmissionHooks
from extproc.limiter.codes import CODES
from extproc.limiter.signals import classify
from extproc.proxy.outcome import Outcome

# LLM requests run from sub-second to many minutes.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300, 450, 600, 900)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120)
QUEUE_WAIT_BUCKETS = (0, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)

OTHER = "other"
# Model names seen in responses whose label is remembered (the rest are resolved each time).
MAX_REMEMBERED_MODELS = 1024
# Z.AI business codes (see ARCHITECTURE.md) and Anthropic/OpenAI error types worth a label.
KNOWN_ERROR_CODES = frozenset(CODES)


def code_label(code: str | None) -> str:
    if code is None:
        return "none"
    return code if code in KNOWN_ERROR_CODES else OTHER


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
            "zai_proxy_upstream_errors", "Errors from Z.AI — every failed attempt (Envoy retries "
            "included) and errors inside a 200 stream — by class and Z.AI business code.",
            ("deployment_variant", "error_class", "code"), registry=r)
        # Per worker: `worker` is bounded by WorkerLabels (named workers, then WORKER_LABEL_LIMIT
        # fingerprints, then "other"); `model` as on the series above (configured set, else
        # "other"), so usage per worker and model (the dashboard's usage report) needs no log store.
        self.worker_tokens = Counter(
            "zai_proxy_worker_tokens", "Tokens by worker, model and direction (reported or estimated).",
            ("deployment_variant", "worker", "model", "direction"), registry=r)
        self.worker_requests = Counter(
            "zai_proxy_worker_requests", "Requests by worker, model and final HTTP status.",
            ("deployment_variant", "worker", "model", "status"), registry=r)
        self.worker_cost = Counter(
            "zai_proxy_worker_estimated_cost_usd",
            "Estimated cost by worker and model, from the price table.",
            ("deployment_variant", "worker", "model"), registry=r)
        self.in_progress = Gauge("zai_proxy_requests_in_progress", "Requests being processed now.",
                                 ("deployment_variant",), registry=r).labels(variant)
        self.streams_changed = adder(self.in_progress)  # +1 / -1 per request filter stream
        build = Gauge("zai_proxy_build_info", "Build information (value is always 1).",
                      ("deployment_variant", "version", "python"), registry=r)
        build.labels(variant, __version__, platform.python_version()).set(1)
        self._cache: dict[tuple[object, ...], object] = {}
        # Every label set a request's record touches, resolved once per distinct combination.
        self._series: dict[tuple[object, ...], _RequestSeries] = {}
        self._model_labels: dict[str, str] = {}

    def model_label(self, model: str | None) -> str:
        if model is None:
            return "unknown"
        label = self._model_labels.get(model)
        if label is None:
            lowered = model.lower()
            label = lowered if lowered in self.models else OTHER
            if len(self._model_labels) < MAX_REMEMBERED_MODELS:  # names come from responses
                self._model_labels[model] = label
        return label

    def _child(self, metric: Counter | Histogram, *values: str) -> Any:
        key = (id(metric), values)
        child = self._cache.get(key)
        if child is None:
            child = self._cache[key] = metric.labels(self.variant, *values)
        return child

    def record(self, outcome: Outcome, cost: float | None, worker: str | None = None) -> None:
        """One request's metrics; `worker` is its bounded worker label (None: none)."""
        model = self.model_label(outcome.model)
        key = (outcome.endpoint, outcome.status, model, worker)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _RequestSeries(
                self, outcome.endpoint.value, str(outcome.status), model, worker)
        series.requests(1)
        series.duration(outcome.duration)
        if series.worker_requests is not None:
            series.worker_requests(1)
        tokens = outcome.tokens
        if tokens is not None:
            for direction, count, estimated in (
                    ("input", tokens.input, tokens.input_estimated),
                    ("output", tokens.output, tokens.output_estimated),
                    ("cache_read", tokens.cache_read, False),
                    ("cache_write", tokens.cache_write, False)):
                if count:
                    series.tokens(direction, estimated)(count)
                    if series.worker_requests is not None:
                        series.worker_tokens(direction)(count)
        if outcome.time_to_first_token is not None:
            series.observe_ttft(outcome.time_to_first_token)
        if cost:
            series.add_cost(cost)
        if outcome.status < 400 and (outcome.error_type or outcome.error_code):
            # An error event inside a successful stream; failed attempts are counted per attempt.
            signal = classify(outcome.status, outcome.error_code, outcome.error_type)
            self.upstream_error(signal.value, outcome.error_code)

    def upstream_error(self, error_class: str, code: str | None) -> None:
        self._child(self.upstream_errors, error_class, code_label(code)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _LoopValue:
    """A metric value that only the event loop's thread changes (the request path: token counting
    threads hand back counts, they record nothing), so it takes no lock: prometheus_client's
    MutexValue takes one per change, a dozen per request. A scrape reads a whole float."""

    __slots__ = ("_value", "_exemplar")
    _multiprocess = False

    def __init__(self, value: float) -> None:
        self._value = value
        self._exemplar = None

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def set_exemplar(self, exemplar: Any) -> None:
        self._exemplar = exemplar

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> Any:
        return self._exemplar


def _unlocked(value: Any) -> Any:
    """`value` as a _LoopValue if it is prometheus_client's in-process kind, else itself (the
    multiprocess mode's values are shared files: left alone)."""
    return _LoopValue(value.get()) if type(value) is MutexValue else value


def adder(child: Any) -> Callable[[float], None]:
    """What adds to a resolved counter child: its value's `inc`, unlocked, without the checks
    `Counter.inc` makes on every call (a labelled parent, a negative amount), which cost more
    than the addition; the record adds counts and costs, never negative, to resolved children."""
    value = getattr(child, "_value", None)
    if not callable(getattr(value, "inc", None)):
        return child.inc
    child._value = value = _unlocked(value)
    return value.inc


def _observer(child: Any) -> Callable[[float], None]:
    """What observes into a resolved histogram child: `Histogram.observe` (the bucket is the
    first whose bound is at least the amount) with unlocked values and a binary search."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets, total = getattr(child, "_buckets", None), getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None or getattr(child, "_exemplars", None):
        return child.observe
    child._buckets = buckets = [_unlocked(bucket) for bucket in buckets]
    child._sum = total = _unlocked(total)
    add_sum = total.inc

    def observe(amount: float) -> None:
        add_sum(amount)
        if amount == amount:  # NaN falls in no bucket, as with observe()
            buckets[bisect_left(bounds, amount)].inc(1)
    return observe


class _RequestSeries:
    """The children one kind of request records into (endpoint, status, model, worker label),
    each resolved once, so recording a request costs attribute and dict reads, not label lookups.
    The ones not every request moves are resolved on first use: a series appears in /metrics
    only once it moved."""

    __slots__ = ("_metrics", "_model", "_worker", "requests", "duration", "worker_requests",
                 "_resolved")

    def __init__(self, metrics: Metrics, endpoint: str, status: str, model: str,
                 worker: str | None) -> None:
        self._metrics, self._model, self._worker = metrics, model, worker
        self.requests = adder(metrics._child(metrics.requests, endpoint, status))
        self.duration = _observer(metrics._child(metrics.duration, endpoint, status))
        self.worker_requests = (adder(metrics._child(metrics.worker_requests, worker, model, status))
                                if worker is not None else None)
        self._resolved: dict[object, Any] = {}

    def _lazy(self, key: object, metric: Counter | Histogram, *values: str) -> Any:
        found = self._resolved.get(key)
        if found is None:
            child = self._metrics._child(metric, *values)
            found = self._resolved[key] = _observer(child) if isinstance(metric, Histogram) else adder(child)
        return found

    def observe_ttft(self, seconds: float) -> None:
        self._lazy("ttft", self._metrics.ttft, self._model)(seconds)

    def add_cost(self, cost: float) -> None:
        self._lazy("cost", self._metrics.cost, self._model)(cost)
        if self._worker is not None:
            self._lazy("worker_cost", self._metrics.worker_cost, self._worker, self._model)(cost)

    def tokens(self, direction: str, estimated: bool) -> Callable[[float], None]:
        return self._lazy((direction, estimated), self._metrics.tokens, direction, self._model,
                          "estimated" if estimated else "reported")

    def worker_tokens(self, direction: str) -> Callable[[float], None]:
        assert self._worker is not None
        return self._lazy(("worker", direction), self._metrics.worker_tokens, self._worker, self._model,
                          direction)


class LimiterMetrics:
    """`zai_proxy_rate_limit_*` series. Gauges are read from the limiter at scrape time, so the
    request path only touches counters and the queue-wait histogram."""

    def __init__(self, variant: str, registry: CollectorRegistry) -> None:
        self.variant = variant
        labels = ("deployment_variant",)
        self.queue_wait = Histogram(
            "zai_proxy_rate_limit_queue_wait_seconds", "Time a request waited for admission.",
            labels, registry=registry, buckets=QUEUE_WAIT_BUCKETS).labels(variant)
        self.adjustments = Counter("zai_proxy_rate_limit_adjustments",
                                   "Changes of the learned limits, by limit and direction.",
                                   ("deployment_variant", "limit", "direction"), registry=registry)
        self.rejections = Counter("zai_proxy_rate_limit_rejections",
                                  "Requests refused by the gateway's limiter, by reason.",
                                  ("deployment_variant", "reason"), registry=registry)
        self.reclaimed = Counter("zai_proxy_rate_limit_reclaimed_leases",
                                 "Slot leases reclaimed because they outlived the longest stream.",
                                 labels, registry=registry).labels(variant)
        self.attempts = Counter("zai_proxy_upstream_attempts",
                                "Upstream attempts (Envoy retries included), by what they meant "
                                "for the limiter.", ("deployment_variant", "signal"), registry=registry)
        self._registry = registry

    def hooks(self) -> AdmissionHooks:
        return AdmissionHooks(
            queue_wait=_observer(self.queue_wait),
            rejected=lambda reason: self.rejections.labels(self.variant, reason).inc(),
            adjusted=lambda limit, adj: self.adjustments.labels(
                self.variant, limit, adj.value).inc(),
            reclaimed=self.reclaimed.inc)

    def watch(self, state: "Callable[[], dict[str, object]]", shared: "Callable[[], bool]") -> None:
        """Register the scrape-time gauges reading `state()`."""
        self._registry.register(_LimiterCollector(self.variant, state, shared))


class _LimiterCollector:
    GAUGES = (
        ("concurrency_limit", "zai_proxy_rate_limit_concurrency_limit",
         "Requests allowed in flight upstream now (learned)."),
        ("concurrency_ceiling", "zai_proxy_rate_limit_concurrency_ceiling",
         "Smoothed in-flight count at which Z.AI last refused (1302); NaN before any."),
        ("start_rate_limit", "zai_proxy_rate_limit_start_rate",
         "Requests allowed to start per minute now (learned)."),
        ("start_rate_ceiling", "zai_proxy_rate_limit_start_rate_ceiling",
         "Smoothed start rate (per minute) at which Z.AI last refused (1303); NaN before any."),
        ("in_flight", "zai_proxy_rate_limit_in_flight", "Requests holding an upstream slot (this replica)."),
        ("queued", "zai_proxy_rate_limit_queue_depth", "Requests waiting for admission."),
    )

    def __init__(self, variant: str, state: Callable[[], dict[str, Any]],
                 shared: Callable[[], bool]) -> None:
        self.variant = variant
        self.state = state
        self.shared = shared

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        state = self.state()
        for key, name, doc in self.GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["deployment_variant"])
            value = state.get(key)
            family.add_metric([self.variant], float("nan") if value is None else float(value))
            yield family
        gate = state.get("quota_gate")
        family = GaugeMetricFamily("zai_proxy_rate_limit_quota_gate_closed",
                                   "1 while a quota error (1304/1308/1309/1113) has closed the gate.",
                                   labels=["deployment_variant"])
        family.add_metric([self.variant], 1.0 if gate else 0.0)
        yield family
        family = GaugeMetricFamily("zai_proxy_rate_limit_quota_gate_reopens_at_seconds",
                                   "Unix time the quota gate reopens; 0 when open.",
                                   labels=["deployment_variant"])
        family.add_metric([self.variant], float(gate["until"]) if gate else 0.0)
        yield family
        family = GaugeMetricFamily("zai_proxy_rate_limit_shared_state",
                                   "1 when limits are shared through Redis, 0 on local limits.",
                                   labels=["deployment_variant"])
        family.add_metric([self.variant], 1.0 if self.shared() else 0.0)
        yield family


class QuotaCollector:
    """`zai_proxy_quota_*` series, read from the quota poller's state at scrape time: the account's
    windows as Z.AI last reported them, the pace, the plan tier and the last successful poll."""

    def __init__(self, variant: str, state: "Callable[[], dict[str, Any]]") -> None:
        self.variant = variant
        self.state = state

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        state = self.state()
        labels = ["deployment_variant", "window"]
        used = GaugeMetricFamily("zai_proxy_quota_used_ratio",
                                 "Share of the quota window used, as Z.AI last reported it (0-1).",
                                 labels=labels)
        estimate = GaugeMetricFamily(
            "zai_proxy_quota_used_ratio_estimate",
            "Share of the window used now: the last report plus this replica's tokens since.",
            labels=labels)
        reset = GaugeMetricFamily("zai_proxy_quota_reset_timestamp_seconds",
                                  "Unix time the quota window resets (Z.AI's nextResetTime).",
                                  labels=labels)
        runs_out = GaugeMetricFamily(
            "zai_proxy_quota_exhaustion_timestamp_seconds",
            "Unix time the window runs out at the current burn rate; absent when it will not "
            "before its reset.", labels=labels)
        for name, window in state.get("windows", {}).items():
            used.add_metric([self.variant, name], float(window["used_ratio"]))
            if window.get("used_now_estimate") is not None:
                estimate.add_metric([self.variant, name], float(window["used_now_estimate"]))
            if window.get("reset_at") is not None:
                reset.add_metric([self.variant, name], float(window["reset_at"]))
            if window.get("runs_out_at") is not None:
                runs_out.add_metric([self.variant, name], float(window["runs_out_at"]))
        yield from (used, estimate, reset, runs_out)
        plan = InfoMetricFamily("zai_proxy_quota_plan", "The account's plan tier (data.level).",
                                labels=["deployment_variant"])
        if state.get("level"):
            plan.add_metric([self.variant], {"level": str(state["level"])})
        yield plan
        last = GaugeMetricFamily("zai_proxy_quota_last_success_timestamp_seconds",
                                 "Unix time of the last successful quota report (0: none yet).",
                                 labels=["deployment_variant"])
        last.add_metric([self.variant], float(state.get("last_success") or 0.0))
        yield last
        errors = CounterMetricFamily("zai_proxy_quota_poll_errors",
                                     "Quota polls that failed (the last good report is kept).",
                                     labels=["deployment_variant"])
        errors.add_metric([self.variant], float(state.get("errors", 0)))
        yield errors


class WorkerQueueCollector:
    """`zai_proxy_worker_queued{worker}`: requests waiting for admission now, by worker label."""

    def __init__(self, variant: str, waiting: "Callable[[], dict[str, int]]",
                 label: "Callable[[str], str]") -> None:
        self.variant = variant
        self.waiting = waiting
        self.label = label

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("zai_proxy_worker_queued",
                                   "Requests waiting for admission now, by worker.",
                                   labels=["deployment_variant", "worker"])
        by_label: dict[str, int] = {}
        for worker, count in self.waiting().items():
            name = self.label(worker)
            by_label[name] = by_label.get(name, 0) + count
        for name, count in sorted(by_label.items()):
            family.add_metric([self.variant, name], float(count))
        yield family
