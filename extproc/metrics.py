"""Prometheus metrics. Names and labels are a contract with the runbooks (ARCHITECTURE.md).

Every series carries `deployment_variant`; label values are bounded (endpoint and status come from
small fixed sets). Children are cached so a request pays one dict lookup, not a label resolution.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from . import __version__
from .session import Outcome

# LLM requests run from sub-second to many minutes.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300, 450, 600, 900)


class Metrics:
    def __init__(self, variant: str, registry: CollectorRegistry | None = None) -> None:
        self.variant = variant
        self.registry = registry or CollectorRegistry()
        labels = ("deployment_variant", "endpoint", "status")
        self.requests = Counter("zai_proxy_requests", "Requests handled, by final HTTP status.",
                                labels, registry=self.registry)
        self.duration = Histogram("zai_proxy_request_duration_seconds",
                                  "Time from request headers to the end of the response.",
                                  labels, buckets=DURATION_BUCKETS, registry=self.registry)
        self.in_progress = Gauge("zai_proxy_requests_in_progress", "Requests being processed now.",
                                 ("deployment_variant",), registry=self.registry).labels(variant)
        build = Gauge("zai_proxy_build_info", "Build information (value is always 1).",
                      ("deployment_variant", "version", "python"), registry=self.registry)
        build.labels(variant, __version__, platform.python_version()).set(1)
        self._children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

    def record(self, outcome: Outcome) -> None:
        key = (outcome.endpoint.value, outcome.status)
        children = self._children.get(key)
        if children is None:
            values = (self.variant, outcome.endpoint.value, str(outcome.status))
            children = (self.requests.labels(*values), self.duration.labels(*values))
            self._children[key] = children
        children[0].inc()
        children[1].observe(outcome.duration)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
