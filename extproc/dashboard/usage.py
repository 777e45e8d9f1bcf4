"""`zai-proxy usage`: tokens, requests and cost by worker, model and variant over a window, from
the dashboard's history (DASHBOARD_DB, or --db), as a table, CSV or JSON.

`--since` takes a duration (`90m`, `5h`, `7d`; up to the history's 30 days) or `block`: the
current 5-hour block of Z.AI's quota window, from the reset time in the quota report when the
history has one, else the last 5 hours.
"""

from __future__ import annotations

import csv
import io
import re
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import orjson

from extproc.dashboard.catalogue import DIRECTIONS
from extproc.dashboard.history import COARSE_KEEP, Reader
from extproc.dashboard.panels import block_start

CSV_HEADER = ("worker", "model", "variant", "requests", "input_tokens", "output_tokens",
              "cache_read_tokens", "cache_write_tokens", "cost_usd")
_DURATION = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(raw: str) -> int | None:
    """Seconds, or None for `block`; ValueError with the reason otherwise."""
    value = raw.strip().lower()
    if value == "block":
        return None
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"--since {raw!r}: give a duration like 1h, 5h, 7d, or `block`")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if not 0 < seconds <= COARSE_KEEP:
        raise ValueError(f"--since {raw!r}: must be more than 0 and at most 30d (the history's reach)")
    return seconds


@dataclass
class Row:
    worker: str
    model: str
    variant: str
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0


@dataclass
class Report:
    since: float
    until: float
    window: str
    block_from_quota: bool | None  # for `block`: whether Z.AI's reset time placed it
    rows: list[Row]

    def total(self) -> Row:
        out = Row("TOTAL", "", "")
        for row in self.rows:
            for f in fields(Row)[3:]:
                setattr(out, f.name, getattr(out, f.name) + getattr(row, f.name))
        return out


def report(reader: Reader, since: str, now: float | None = None) -> Report:
    now = time.time() if now is None else now
    seconds = parse_since(since)
    from_quota = None
    if seconds is None:
        resets = reader.latest("reset", "5h")
        reset_at = max((value for _, value in resets.values()), default=None)
        start, from_quota = block_start(now, reset_at)
    else:
        start = now - seconds
    totals = reader.sums(start, ("w.tok", "w.req", "w.cost"))
    rows: dict[tuple[str, str, str], Row] = {}
    for (variant, key), total in totals.items():
        worker, model = key[1], key[2]
        row = rows.setdefault((worker, model, variant), Row(worker, model, variant))
        if key[0] == "w.req":
            row.requests += int(round(total.value))
        elif key[0] == "w.tok" and key[3] in DIRECTIONS:
            name = f"{key[3]}_tokens"
            setattr(row, name, getattr(row, name) + int(round(total.value)))
        elif key[0] == "w.cost":
            row.cost_usd += total.value
    for row in rows.values():
        row.cost_usd = round(row.cost_usd, 6)
    ordered = sorted(rows.values(), key=lambda r: (r.worker, r.model, r.variant))
    return Report(start, now, since, from_quota, ordered)


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def render(rep: Report, fmt: str) -> str:
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        for row in rep.rows:
            writer.writerow([getattr(row, name) for name in CSV_HEADER])
        return out.getvalue()
    if fmt == "json":
        doc: dict[str, Any] = {"since": round(rep.since, 3), "until": round(rep.until, 3),
                               "window": rep.window, "block_from_quota": rep.block_from_quota,
                               "rows": [asdict(r) for r in rep.rows], "total": asdict(rep.total())}
        del doc["total"]["worker"], doc["total"]["model"], doc["total"]["variant"]
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n"
    header = ("worker", "model", "variant", "requests", "input", "output", "cache_read",
              "cache_write", "cost_usd")
    lines = [[row.worker, row.model, row.variant, f"{row.requests:,}", f"{row.input_tokens:,}",
              f"{row.output_tokens:,}", f"{row.cache_read_tokens:,}", f"{row.cache_write_tokens:,}",
              f"{row.cost_usd:.4f}"] for row in [*rep.rows, rep.total()]]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt_line(cells: list[str] | tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    where = f"usage {_stamp(rep.since)} → {_stamp(rep.until)}"
    if rep.block_from_quota is not None:
        where += (" (the current 5-hour block, from Z.AI's quota report)" if rep.block_from_quota
                  else " (the last 5 hours: no quota report with the block's reset time)")
    rule = "-" * len(fmt_line(list(header)))
    body = [fmt_line(line) for line in lines[:-1]] or ["(no requests in this window)"]
    return "\n".join([where, fmt_line(list(header)), rule, *body, rule, fmt_line(lines[-1])]) + "\n"
