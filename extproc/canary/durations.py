"""Durations as people and PromQL write them: `90s`, `5m`, `1h30m`, `2.5` (seconds)."""

from __future__ import annotations

import re
import time

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in `text`; ValueError saying what a good one looks like."""
    raw = text.strip().lower()
    try:
        value = float(raw)
    except ValueError:
        parts = _PART.findall(raw)
        if not parts or "".join(n + u for n, u in parts) != raw:
            raise ValueError(f"{text!r} is not a duration; write e.g. 30s, 5m, 1h30m") from None
        value = sum(float(n) * _UNIT[u] for n, u in parts)
    if value <= 0:
        raise ValueError(f"{text!r}: a duration must be above 0")
    return value


def format_duration(seconds: float) -> str:
    """The shortest exact form: 600 -> 10m, 90 -> 90s, 4.5 -> 4.5s; PromQL reads it too when it
    is a whole number of milliseconds."""
    if seconds >= 60 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{int(round(seconds * 1000))}ms"


def iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
