"""Quantiles from histogram buckets, as Prometheus's `histogram_quantile` computes them: linear
interpolation inside the bucket where the rank falls (from the previous bucket's bound; the first
bucket starts at 0), and a rank in the +Inf bucket answered with the largest finite bound."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping


def quantile(q: float, counts: Mapping[float, float], bounds: Iterable[float] = ()) -> float | None:
    """`q` (0-1) of the observations counted per bucket: `counts` maps a bucket's upper bound to
    the observations in that bucket alone. `bounds` are the histogram's bucket bounds (the
    history keeps no empty buckets; interpolation needs to know where each bucket starts). None
    when nothing was observed."""
    total = sum(c for c in counts.values() if c > 0)
    if total <= 0:
        return None
    edges = sorted(set(bounds) | set(counts))
    finite = [le for le in edges if not math.isinf(le)]
    rank = q * total
    below, lower = 0.0, 0.0
    for le in edges:
        count = max(counts.get(le, 0.0), 0.0)
        if count > 0 and below + count >= rank:
            if math.isinf(le):
                return finite[-1] if finite else None
            start = lower if lower < le else 0.0
            if start < 0 < le:
                start = 0.0
            return start + (le - start) * ((rank - below) / count)
        below += count
        lower = le
    return finite[-1] if finite else None
