"""Estimated cost of a request from a per-model price table, with a peak-hour tier.

Prices are USD per million tokens. The defaults follow Z.AI's public list price for the GLM
family at the time of writing and are estimates for dashboards, not an invoice; a deployment
sets its own with PRICES_FILE (same JSON shape as `DEFAULT_PRICES`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from datetime import timedelta
from typing import Any, Mapping

DEFAULT_PRICES: dict[str, Any] = {
    "models": {
        "glm-4.7": {"input": 0.60, "output": 2.20, "cache_read": 0.11, "cache_write": 0.0},
        "glm-4.6": {"input": 0.60, "output": 2.20, "cache_read": 0.11, "cache_write": 0.0},
        "glm-4.5": {"input": 0.60, "output": 2.20, "cache_read": 0.11, "cache_write": 0.0},
        "glm-4.5-air": {"input": 0.20, "output": 1.10, "cache_read": 0.03, "cache_write": 0.0},
        "glm-5": {"input": 1.00, "output": 3.20, "cache_read": 0.20, "cache_write": 0.0},
    },
    # Peak hours on Z.AI's clock (UTC+8) cost `multiplier` times as much, as the original proxy
    # charged them.
    "peak": {"utc_offset_hours": 8, "start_hour": 14, "end_hour": 18, "multiplier": 2.0},
}

DIRECTIONS = ("input", "output", "cache_read", "cache_write")


@dataclass(frozen=True)
class Peak:
    offset: timedelta
    start_hour: int
    end_hour: int
    multiplier: float

    @cached_property
    def _offset_seconds(self) -> float:
        return self.offset.total_seconds()

    def applies(self, wall: float) -> bool:
        # The hour on a fixed-offset clock, by arithmetic: what `datetime.fromtimestamp(wall,
        # timezone(offset)).hour` says (tested), at a tenth of its cost, once per request.
        hour = int((wall + self._offset_seconds) // 3600 % 24)
        return self.start_hour <= hour < self.end_hour


class PriceTable:
    def __init__(self, doc: Mapping[str, Any] = DEFAULT_PRICES) -> None:
        models = doc.get("models")
        if not isinstance(models, dict) or not models:
            raise ValueError('needs a "models" object of model -> prices')
        self.models: dict[str, dict[str, float]] = {}
        for model, prices in models.items():
            if not isinstance(prices, dict):
                raise ValueError(f"prices of {model!r} must be an object")
            self.models[model.lower()] = {d: _price(prices.get(d, 0.0), f"{model}.{d}")
                                          for d in DIRECTIONS}
        peak = doc.get("peak") or {}
        self.peak = Peak(timedelta(hours=float(peak.get("utc_offset_hours", 8))),
                         int(peak.get("start_hour", 0)), int(peak.get("end_hour", 0)),
                         _price(peak.get("multiplier", 1.0), "peak.multiplier"))

    @classmethod
    def from_file(cls, path: str) -> "PriceTable":
        with open(path, encoding="utf-8") as fh:
            return cls(json.load(fh))

    def cost(self, model: str | None, tokens: Mapping[str, int], wall: float) -> float | None:
        """USD for these token counts, or None for a model without a price."""
        # The table's names are lower case, and so is what a response names, almost always.
        prices = self.models.get(model) or self.models.get(model.lower()) if model else None
        if prices is None:
            return None
        get = tokens.get
        usd = (get("input", 0) * prices["input"] + get("output", 0) * prices["output"]
               + get("cache_read", 0) * prices["cache_read"]
               + get("cache_write", 0) * prices["cache_write"]) / 1_000_000
        return usd * self.peak.multiplier if self.peak.applies(wall) else usd


def _price(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{where} must be a non-negative number")
    return float(value)
