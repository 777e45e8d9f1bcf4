"""Where the analysis gets its numbers: Prometheus' HTTP API (`PROMETHEUS_URL`).

The queries are the runbook's (docs/RUNBOOK.md, "Canary analysis and rollout"), with `increase()`
over the window instead of `rate()` (counts, not rates: the tests need counts), all evaluated at
one instant so they describe the same window. The HTTP transport is injected: the unit tests feed
canned answers, the integration tests a real Prometheus.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode
from urllib.request import Request, urlopen

from extproc.canary.analysis import Sample, VariantSample
from extproc.canary.durations import format_duration
from extproc.variants import Variant

# {w}: the window as PromQL writes it (10m). The same text is in docs/RUNBOOK.md.
QUERIES: dict[str, str] = {
    "requests": 'sum by (deployment_variant) (increase(zai_proxy_requests_total[{w}]))',
    "ok": 'sum by (deployment_variant) (increase(zai_proxy_requests_total{{status=~"2.."}}[{w}]))',
    "errors": 'sum by (deployment_variant) (increase(zai_proxy_requests_total{{status=~"5.."}}[{w}]))',
    "rejections": 'sum by (deployment_variant) (increase(zai_proxy_rate_limit_rejections_total[{w}]))',
    "tokens": 'sum by (deployment_variant, source) (increase(zai_proxy_tokens_total[{w}]))',
    "duration": 'sum by (deployment_variant, le) '
                '(increase(zai_proxy_request_duration_seconds_bucket[{w}]))',
    "ttft": 'sum by (deployment_variant, le) '
            '(increase(zai_proxy_time_to_first_token_seconds_bucket[{w}]))',
}

Fetch = Callable[[str, float], bytes]  # (url, timeout) -> body; raises SourceError


class SourceError(RuntimeError):
    """The metrics could not be read; the message says from where and why."""


def http_get(url: str, timeout: float) -> bytes:
    try:
        with urlopen(Request(url, headers={"accept": "application/json"}), timeout=timeout) as resp:  # noqa: S310
            return resp.read()
    except HTTPError as exc:
        body = exc.read()[:500].decode(errors="replace")
        raise SourceError(f"HTTP {exc.code} from {url.split('?')[0]}: {body}") from None
    except (URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SourceError(f"cannot reach {url.split('?')[0]}: {reason}") from None


def queries(window: float) -> dict[str, str]:
    w = format_duration(window)
    return {name: text.format(w=w) for name, text in QUERIES.items()}


class PrometheusSource:
    def __init__(self, url: str, fetch: Fetch = http_get, clock: Callable[[], float] = time.time,
                 timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.fetch = fetch
        self.clock = clock
        self.timeout = timeout

    def describe(self) -> str:
        return f"Prometheus {self.url}"

    def query(self, promql: str, at: float) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urlencode({"query": promql, "time": f"{at:.3f}"})
        raw = self.fetch(url, self.timeout)
        try:
            doc = json.loads(raw)
        except ValueError:
            raise SourceError(f"{self.url} answered something that is not JSON: {raw[:200]!r}") from None
        if doc.get("status") != "success":
            raise SourceError(f"{self.url} refused {promql!r}: {doc.get('errorType')}: {doc.get('error')}")
        data = doc.get("data") or {}
        if data.get("resultType") != "vector":
            raise SourceError(f"{self.url}: {promql!r} gave a {data.get('resultType')}, not a vector")
        return data.get("result") or []

    def sample(self, window: float) -> Sample:
        at = self.clock()
        found = {name: self.query(text, at) for name, text in queries(window).items()}
        per: dict[str, dict[str, Any]] = {v.value: {"duration": [], "ttft": []} for v in Variant}
        for name, series in found.items():
            for item in series:
                labels = item.get("metric") or {}
                variant = labels.get("deployment_variant")
                if variant not in per:
                    continue
                value = _value(item)
                if name in ("duration", "ttft"):
                    per[variant][name].append((_le(labels.get("le")), value))
                elif name == "tokens":
                    per[variant]["tokens"] = per[variant].get("tokens", 0.0) + value
                    if labels.get("source") == "estimated":
                        per[variant]["tokens_estimated"] = per[variant].get("tokens_estimated", 0.0) + value
                else:
                    per[variant][name] = per[variant].get(name, 0.0) + value

        def variant_sample(values: dict[str, Any]) -> VariantSample:
            values = dict(values)
            values["duration"] = tuple(sorted(values["duration"]))
            values["ttft"] = tuple(sorted(values["ttft"]))
            return VariantSample(**values)

        return Sample(window, at, variant_sample(per[Variant.PRODUCTION.value]),
                      variant_sample(per[Variant.CANARY.value]), self.describe())


def _value(item: dict[str, Any]) -> float:
    try:
        value = float(item["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return 0.0
    return 0.0 if math.isnan(value) else value


def _le(raw: Any) -> float:
    try:
        return float(raw)  # "+Inf" included
    except (TypeError, ValueError):
        return math.inf
