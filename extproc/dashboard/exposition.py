"""Prometheus text exposition -> samples (prometheus_client's own parser).

Only the gateway's series (`zai_proxy_*`) are kept. Counters' `_created` series are not samples
of the counter: they tell when each labelled series was created, and the earliest of them is the
process's start (`Scrape.started`), which tells a restarted ext_proc from a living one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "zai_proxy_"


@dataclass(frozen=True, slots=True)
class Sample:
    name: str  # the sample's name, suffix included: zai_proxy_requests_total, ..._bucket
    labels: dict[str, str]
    value: float


@dataclass
class Scrape:
    samples: list[Sample] = field(default_factory=list)
    started: float | None = None  # earliest `_created` timestamp: when the process began counting


def parse(text: str, prefix: str = PREFIX) -> Scrape:
    """The samples of every family named `prefix...`; raises ValueError on text that is not the
    Prometheus text format."""
    out = Scrape()
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(prefix):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                if not math.isnan(sample.value):
                    out.started = sample.value if out.started is None else min(out.started, sample.value)
                continue
            out.samples.append(Sample(sample.name, sample.labels, sample.value))
    return out
