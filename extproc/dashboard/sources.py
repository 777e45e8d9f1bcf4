"""Where the dashboard's numbers come from: one collection per interval, as each variant's
increases, gauges and the replicas' baselines.

- `ExtprocSource`: each variant's ext_proc admin endpoints (`<url>/metrics`), discovered from the
  configuration (EXTPROC_HOST/EXTPROC_ADMIN_PORT, CANARY_EXTPROC_HOST/CANARY_EXTPROC_ADMIN_PORT) or
  listed in DASHBOARD_TARGETS (several replicas per variant, summed). Increases come from
  consecutive scrapes of each replica (`history.Deltas`: resets and vanished replicas handled).
- `PrometheusSource` (PROMETHEUS_URL; the Kubernetes case): Prometheus's HTTP API with the
  README's queries, summed by `deployment_variant` (`sum by (deployment_variant, ...)
  (rate(...[1m]))`), so resets and pods come and gone are Prometheus's business; an interval's
  increase is the rate times the interval. Prometheus must scrape the ext_procs at least every
  30 s (the ServiceMonitor's 15 s does).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from extproc.config import Settings
from extproc.dashboard import catalogue
from extproc.dashboard.catalogue import KNOWN_VARIANTS, Key, Reading, ordered
from extproc.dashboard.exposition import parse
from extproc.dashboard.history import Deltas, ReplicaState, VariantTick

log = logging.getLogger(__name__)

MAX_EXPOSITION_BYTES = 32 << 20


@dataclass(frozen=True)
class Target:
    variant: str
    url: str  # the ext_proc's admin base URL; its metrics are at <url>/metrics


def discover(settings: Settings) -> list[Target]:
    """DASHBOARD_TARGETS, else each variant's ext_proc admin address from the settings."""
    if settings.dashboard_targets:
        return [Target(variant, url) for variant, url in settings.dashboard_targets]
    return [Target("production", f"http://{_host(settings.extproc_host)}:{settings.extproc_admin_port}"),
            Target("canary", f"http://{_host(settings.canary_extproc_host)}:"
                             f"{settings.canary_extproc_admin_port}")]


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass
class Collection:
    """One interval's collection."""

    ticks: dict[str, VariantTick] = field(default_factory=dict)  # what the history stores
    gauges: dict[str, dict[Key, float]] = field(default_factory=dict)  # every gauge now, by variant
    baselines: list[tuple[str, ReplicaState, bool]] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # target -> why it gave nothing
    replicas: dict[str, int] = field(default_factory=dict)  # variant -> replicas that answered


class _HttpClient:
    """One aiohttp session per source, made on first use with the source's timeout and
    connection limit, closed with the source."""

    def __init__(self, timeout: float, connections: int) -> None:
        self._timeout = timeout
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                connector=aiohttp.TCPConnector(limit=self._connections, keepalive_timeout=60))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class ExtprocSource:
    kind = "extproc"

    def __init__(self, targets: Iterable[Target], interval: float) -> None:
        self.targets = list(targets)
        self.interval = interval
        self.deltas = Deltas()
        self._http = _HttpClient(max(1.0, min(4.0, interval * 0.8)), connections=32)

    @property
    def variants(self) -> list[str]:
        return ordered(t.variant for t in self.targets)

    def restore(self, states: Mapping[str, ReplicaState]) -> None:
        """Carry on from baselines a previous dashboard saved (only for targets still listed)."""
        known = {t.url: t.variant for t in self.targets}
        for replica, state in states.items():
            if known.get(replica) == state.variant:
                self.deltas.replicas[replica] = state

    async def close(self) -> None:
        await self._http.close()

    async def _scrape(self, target: Target) -> str:
        async with self._http.session().get(f"{target.url}/metrics") as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
            body = await resp.content.read(MAX_EXPOSITION_BYTES + 1)
            if len(body) > MAX_EXPOSITION_BYTES:
                raise RuntimeError("exposition too large")
            return body.decode("utf-8", "replace")

    @staticmethod
    def _read(texts: list[str | BaseException]) -> list[Reading | BaseException]:
        out: list[Reading | BaseException] = []
        for text in texts:
            if isinstance(text, BaseException):
                out.append(text)
                continue
            try:
                scrape = parse(text)
            except Exception as exc:  # noqa: BLE001 - the parser raises several kinds
                out.append(ValueError(f"not Prometheus text: {exc}"))
                continue
            out.append(catalogue.reduce(scrape.samples, scrape.started))
        return out

    async def collect(self, now: float) -> Collection:
        texts = await asyncio.gather(*(self._scrape(t) for t in self.targets), return_exceptions=True)
        # Parsing is CPU work: off the event loop, so live updates keep flowing meanwhile.
        readings = await asyncio.to_thread(self._read, list(texts))
        out = Collection()
        increases: dict[str, dict[Key, float]] = {}
        covered: dict[str, float] = {}
        gauges: dict[str, list[dict[Key, float]]] = {}
        for target, reading in zip(self.targets, readings):
            if isinstance(reading, BaseException):
                out.errors[target.url] = f"{type(reading).__name__}: {reading}".strip(": ")
                continue
            increase = self.deltas.update(target.url, target.variant, reading, now)
            state = self.deltas.replicas[target.url]
            out.baselines.append((target.url, state, increase.first or increase.restarted))
            if increase.restarted:
                log.info("ext_proc started since the last collection; counting from its start"
                         if increase.first else "ext_proc restarted; counting from its new start",
                         extra={"target": target.url, "variant": target.variant})
            total = increases.setdefault(target.variant, {})
            for key, value in increase.values.items():
                total[key] = total.get(key, 0.0) + value
            covered[target.variant] = max(covered.get(target.variant, 0.0), increase.covered)
            gauges.setdefault(target.variant, []).append(reading.gauges)
            out.replicas[target.variant] = out.replicas.get(target.variant, 0) + 1
        for variant, readings_ in gauges.items():
            now_gauges = catalogue.aggregate_gauges(readings_)
            out.gauges[variant] = now_gauges
            out.ticks[variant] = VariantTick(catalogue.decumulate(increases.get(variant, {})),
                                             catalogue.stored_gauges(now_gauges), covered[variant])
        return out


# ------------------------------------------------------------------------------- Prometheus

RATE_WINDOW = "1m"
LongKey = Callable[[Mapping[str, str]], Key]

# (PromQL, key of a result's labels): per-second rates, summed by deployment_variant.
COUNTER_QUERIES: list[tuple[str, LongKey]] = [
    (f"sum by (deployment_variant, status) (rate(zai_proxy_requests_total[{RATE_WINDOW}]))",
     lambda l: ("req", catalogue.status_class(l.get("status", "")))),
    (f"sum by (deployment_variant, model, direction) (rate(zai_proxy_tokens_total[{RATE_WINDOW}]))",
     lambda l: ("tok", l.get("model") or catalogue.UNKNOWN_MODEL, l.get("direction", ""))),
    (f"sum by (deployment_variant, model) (rate(zai_proxy_estimated_cost_usd_total[{RATE_WINDOW}]))",
     lambda l: ("cost", l.get("model") or catalogue.UNKNOWN_MODEL)),
    (f"sum by (deployment_variant, code) (rate(zai_proxy_upstream_errors_total[{RATE_WINDOW}]))",
     lambda l: ("err", l.get("code", "none"))),
    (f"sum by (deployment_variant, reason) (rate(zai_proxy_rate_limit_rejections_total[{RATE_WINDOW}]))",
     lambda l: ("rej", l.get("reason", ""))),
    (f"sum by (deployment_variant, worker, model, direction) "
     f"(rate(zai_proxy_worker_tokens_total[{RATE_WINDOW}]))",
     lambda l: ("w.tok", l.get("worker", ""), l.get("model") or catalogue.UNKNOWN_MODEL,
                l.get("direction", ""))),
    (f"sum by (deployment_variant, worker, model, status) "
     f"(rate(zai_proxy_worker_requests_total[{RATE_WINDOW}]))",
     lambda l: ("w.req", l.get("worker", ""), l.get("model") or catalogue.UNKNOWN_MODEL,
                catalogue.status_class(l.get("status", "")))),
    (f"sum by (deployment_variant, worker, model) "
     f"(rate(zai_proxy_worker_estimated_cost_usd_total[{RATE_WINDOW}]))",
     lambda l: ("w.cost", l.get("worker", ""), l.get("model") or catalogue.UNKNOWN_MODEL)),
] + [
    (f"sum by (deployment_variant, le) (rate({metric}_bucket[{RATE_WINDOW}]))",
     (lambda name: lambda l: (name, catalogue.le_label(l.get("le", ""))))(name))
    for name, metric in catalogue.HISTOGRAMS.items()
]


def _gauge(aggregation: str, metric: str, key: Callable[[Mapping[str, str]], Key],
           *labels: str) -> tuple[str, LongKey]:
    by = ", ".join(("deployment_variant", *labels))
    return f"{aggregation} by ({by}) ({metric})", key


GAUGE_QUERIES: list[tuple[str, LongKey]] = [
    _gauge("sum", "zai_proxy_rate_limit_in_flight", lambda l: ("in_flight",)),
    _gauge("sum", "zai_proxy_rate_limit_queue_depth", lambda l: ("queued",)),
    _gauge("sum", "zai_proxy_worker_queued", lambda l: ("w.queued", l.get("worker", "")), "worker"),
    _gauge("max", "zai_proxy_rate_limit_shared_state", lambda l: ("shared",)),
    _gauge("sum", "zai_proxy_rate_limit_concurrency_limit", lambda l: ("limit",)),
    _gauge("max", "zai_proxy_rate_limit_concurrency_limit", lambda l: ("limit_max",)),
    _gauge("sum", "zai_proxy_rate_limit_concurrency_ceiling", lambda l: ("ceiling",)),
    _gauge("max", "zai_proxy_rate_limit_concurrency_ceiling", lambda l: ("ceiling_max",)),
    _gauge("max", "zai_proxy_rate_limit_quota_gate_closed", lambda l: ("gate",)),
    _gauge("max", "zai_proxy_rate_limit_quota_gate_reopens_at_seconds", lambda l: ("gate_until",)),
    _gauge("max", "zai_proxy_quota_used_ratio", lambda l: ("quota_reported", l.get("window", "")), "window"),
    _gauge("max", "zai_proxy_quota_used_ratio_estimate",
           lambda l: ("quota_estimate", l.get("window", "")), "window"),
    _gauge("max", "zai_proxy_quota_reset_timestamp_seconds", lambda l: ("reset", l.get("window", "")), "window"),
    _gauge("max", "zai_proxy_quota_exhaustion_timestamp_seconds",
           lambda l: ("runs_out", l.get("window", "")), "window"),
    _gauge("max", "zai_proxy_quota_plan_info", lambda l: ("level", l.get("level", "")), "level"),
]


class PrometheusError(RuntimeError):
    pass


class PrometheusSource:
    kind = "prometheus"

    def __init__(self, url: str, interval: float) -> None:
        self.url = url.rstrip("/")
        self.interval = interval
        self._last: float | None = None
        self._seen: set[str] = set()
        self._http = _HttpClient(max(1.0, min(8.0, interval * 1.5)), connections=8)

    @property
    def variants(self) -> list[str]:
        return ordered(set(KNOWN_VARIANTS) | self._seen)

    def restore(self, states: Mapping[str, ReplicaState]) -> None:
        """Nothing to carry on from: Prometheus keeps the counters."""

    async def close(self) -> None:
        await self._http.close()

    async def query(self, promql: str, at: float) -> list[dict[str, Any]]:
        async with self._http.session().get(f"{self.url}/api/v1/query",
                                      params={"query": promql, "time": f"{at:.3f}"}) as resp:
            try:
                doc = await resp.json(content_type=None)
            except (ValueError, aiohttp.ContentTypeError):
                raise PrometheusError(f"HTTP {resp.status}, not JSON") from None
        if doc.get("status") != "success":
            raise PrometheusError(f"{doc.get('errorType', 'error')}: {doc.get('error', '')} ({promql})")
        return doc["data"]["result"]

    async def collect(self, now: float) -> Collection:
        out = Collection()
        queries = COUNTER_QUERIES + GAUGE_QUERIES
        results = await asyncio.gather(*(self.query(q, now) for q, _ in queries), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            out.errors[self.url] = f"{type(failed[0]).__name__}: {failed[0]}"
            return out
        dt = self.interval if self._last is None else max(0.0, min(60.0, now - self._last))
        self._last = now
        increments: dict[str, dict[Key, float]] = {}
        gauges: dict[str, dict[Key, float]] = {}
        for index, ((_, to_key), result) in enumerate(zip(queries, results)):
            counter = index < len(COUNTER_QUERIES)
            for series in result:  # type: ignore[union-attr]
                labels = series.get("metric", {})
                variant = labels.get("deployment_variant")
                if not variant:
                    continue
                try:
                    value = float(series["value"][1])
                except (KeyError, IndexError, TypeError, ValueError):
                    continue
                if value != value:  # NaN
                    continue
                key = to_key(labels)
                target = (increments if counter else gauges).setdefault(variant, {})
                target[key] = target.get(key, 0.0) + (value * dt if counter else value)
        for variant in set(increments) | set(gauges):
            self._seen.add(variant)
            now_gauges = gauges.get(variant, {})
            # The learned limits: shared (Redis) -> one value seen by every pod; else one per pod.
            shared = now_gauges.get(("shared",), 0.0) >= 1
            for name in ("limit", "ceiling"):
                largest = now_gauges.pop((f"{name}_max",), None)
                if shared and largest is not None:
                    now_gauges[(name,)] = largest
            out.gauges[variant] = now_gauges
            out.ticks[variant] = VariantTick(catalogue.decumulate(increments.get(variant, {})),
                                             catalogue.stored_gauges(now_gauges), dt)
            out.replicas[variant] = 1
        return out
