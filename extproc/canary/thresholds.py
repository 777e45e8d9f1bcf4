"""The limits a canary is held to, all in one file (`CANARY_THRESHOLDS_FILE`, YAML or JSON).

Every key is optional; what a file leaves out keeps the default below (the runbook's numbers).
`zai-proxy canary thresholds` prints the defaults in this format:

```yaml
alpha: 0.01          # significance of every test (one-sided: "is the canary worse?")
min_requests: 100    # fewest canary requests behind a verdict; fewer: inconclusive
checks:
  errors:             {max_ratio: 0.10, max_increase: 0.02}
  latency_p95:        {max_factor: 2.0, min_seconds: 1.0}
  ttft_p95:           {max_factor: 2.0, min_seconds: 0.5}
  rejections:         {max_ratio: 0.10, max_increase: 0.05}
  estimated_share:    {max_increase: 0.10}
  tokens_per_request: {max_factor: 2.0}
```

Each check also takes `enabled: false`, and its own `min_requests` (for the latency checks, the
observations of that histogram).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml


class ThresholdsError(ValueError):
    """The thresholds file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class CheckLimits:
    enabled: bool = True
    min_requests: int | None = None  # None: the file's min_requests
    max_ratio: float | None = None  # a share of requests (0..1) the canary must not exceed
    max_increase: float | None = None  # ... nor exceed production's by more than this (0..1)
    max_factor: float | None = None  # a value the canary must not exceed this many times production's
    min_seconds: float | None = None  # latencies under this never fail


DEFAULT_CHECKS: dict[str, CheckLimits] = {
    # 5xx (upstream's and the gateway's own): above 10%, or 2 points above production (the alert's
    # margin), and significantly above production's share.
    "errors": CheckLimits(max_ratio=0.10, max_increase=0.02),
    # p95 more than double production's (and above a floor: 40 ms vs 20 ms is no regression).
    "latency_p95": CheckLimits(max_factor=2.0, min_seconds=1.0),
    "ttft_p95": CheckLimits(max_factor=2.0, min_seconds=0.5),
    # The gateway's own 429s (queue full, wait timeout, budgets...): both variants share one account,
    # so the canary's share should be production's.
    "rejections": CheckLimits(max_ratio=0.10, max_increase=0.05),
    # Accounting sanity: tokens the gateway had to estimate (Z.AI's usage missing) ...
    "estimated_share": CheckLimits(max_increase=0.10),
    # ... and tokens per request, within a factor of production's.
    "tokens_per_request": CheckLimits(max_factor=2.0),
}
FIELDS = {f.name for f in dataclasses.fields(CheckLimits)}


@dataclass(frozen=True)
class Thresholds:
    alpha: float = 0.01
    min_requests: int = 100
    checks: Mapping[str, CheckLimits] = field(default_factory=lambda: dict(DEFAULT_CHECKS))

    def limits(self, check: str) -> CheckLimits:
        return self.checks[check]

    def min_for(self, check: str) -> int:
        own = self.checks[check].min_requests
        return self.min_requests if own is None else own

    def as_dict(self) -> dict[str, Any]:
        checks = {}
        for name, limits in self.checks.items():
            checks[name] = {k: v for k, v in dataclasses.asdict(limits).items()
                            if v is not None and not (k == "enabled" and v)}
        return {"alpha": self.alpha, "min_requests": self.min_requests, "checks": checks}

    @classmethod
    def from_mapping(cls, doc: Any, where: str = "thresholds") -> "Thresholds":
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise ThresholdsError(f"{where}: must be a mapping with alpha, min_requests, checks")
        unknown = set(doc) - {"alpha", "min_requests", "checks"}
        if unknown:
            raise ThresholdsError(f"{where}: unknown keys {sorted(unknown)}; known: alpha, "
                                  "min_requests, checks")
        alpha = _number(doc.get("alpha", cls.alpha), f"{where}: alpha", 0.0, 0.5, open_low=True)
        minimum = _whole(doc.get("min_requests", cls.min_requests), f"{where}: min_requests")
        checks = dict(DEFAULT_CHECKS)
        given = doc.get("checks") or {}
        if not isinstance(given, dict):
            raise ThresholdsError(f"{where}: checks must be a mapping of check name to its limits")
        for name, limits in given.items():
            if name not in DEFAULT_CHECKS:
                raise ThresholdsError(f"{where}: unknown check {name!r}; known: "
                                      f"{', '.join(DEFAULT_CHECKS)}")
            checks[name] = _check(DEFAULT_CHECKS[name], limits or {}, f"{where}: checks.{name}")
        return cls(alpha, minimum, checks)

    @classmethod
    def load(cls, path: str | Path | None) -> "Thresholds":
        if path is None:
            return cls()
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ThresholdsError(f"{path}: cannot read the thresholds file ({exc.strerror})") from None
        try:
            doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise ThresholdsError(f"{path}: not valid YAML/JSON: {exc}") from None
        return cls.from_mapping(doc, str(path))


def _check(default: CheckLimits, given: Any, where: str) -> CheckLimits:
    if not isinstance(given, dict):
        raise ThresholdsError(f"{where}: must be a mapping, e.g. {{max_ratio: 0.1}}")
    unknown = set(given) - FIELDS
    if unknown:
        raise ThresholdsError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(FIELDS)}")
    values: dict[str, Any] = {}
    for key, value in given.items():
        if key == "enabled":
            if not isinstance(value, bool):
                raise ThresholdsError(f"{where}.enabled: must be true or false")
            values[key] = value
        elif key == "min_requests":
            values[key] = _whole(value, f"{where}.{key}")
        elif key in ("max_ratio", "max_increase"):
            values[key] = _number(value, f"{where}.{key}", 0.0, 1.0)
        else:
            values[key] = _number(value, f"{where}.{key}", 0.0, float("inf"),
                                  open_low=key == "max_factor")
    for key in ("max_ratio", "max_increase", "max_factor", "min_seconds"):
        if getattr(default, key) is None and key in values:
            raise ThresholdsError(f"{where}: this check has no {key}")
    return dataclasses.replace(default, **values)


def _number(value: Any, where: str, low: float, high: float, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ThresholdsError(f"{where}: must be a number, not {value!r}")
    if value < low or value > high or (open_low and value == low):
        bounds = f"{'above' if open_low else 'at least'} {low:g}" + (
            f" and at most {high:g}" if high != float("inf") else "")
        raise ThresholdsError(f"{where}: must be {bounds}, not {value!r}")
    return float(value)


def _whole(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ThresholdsError(f"{where}: must be a whole number of at least 1, not {value!r}")
    return value


def defaults_yaml() -> str:
    return yaml.safe_dump(Thresholds().as_dict(), sort_keys=False)
