"""The canary rollout as the dashboard shows it: `zai-proxy canary rollout`'s state file
(CANARY_STATE_FILE; its shape is `extproc.canary.rollout.State.to_json()`), re-read at every
collection and turned into the status document's `rollout` (see the README's Dashboard section).
Where the dashboard cannot see that file (Kubernetes: it is on the controller's own volume), the
same bytes come from the controller's `/state` (CANARY_STATE_URL; `extproc.canary.port`).

No file (a 404 from the controller): no rollout (`None`). A controller that cannot be reached,
or a file that is no rollout state (not JSON, another schema, not an object), is no rollout
either, with a one-line reason for the status document's `errors`; a field of the wrong type is
left out (`None`), never a crash: the rollout writes the file atomically, but people edit files
too.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from extproc.canary.rollout import PHASES, SCHEMA
from extproc.canary.statefile import MAX_STATE_BYTES as MAX_BYTES

FETCH_TIMEOUT_SECONDS = 5.0  # the controller's /state: well inside a collection interval
MAX_REASONS = 20
MAX_TEXT = 2000


@dataclass
class Reading:
    rollout: dict[str, Any] | None
    error: str | None = None  # why a file that is there shows no rollout


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    x = _num(value)
    return int(round(x)) if x is not None else None


def _text(value: Any) -> str | None:
    return value[:MAX_TEXT] if isinstance(value, str) else None


def _time(value: Any) -> float | None:
    """Epoch seconds from a number or the state file's ISO form (`2026-12-02T10:20:00Z`)."""
    x = _num(value)
    if x is not None:
        return x
    if isinstance(value, str):
        try:
            return float(calendar.timegm(time.strptime(value.strip(), "%Y-%m-%dT%H:%M:%SZ")))
        except ValueError:
            return None
    return None


def _checks(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k)[:200]: v for k, v in value.items() if isinstance(v, str)}


def _verdict(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    reasons = value.get("reasons")
    return {
        "verdict": _text(value.get("verdict")),
        "at": _time(value.get("at")),
        "window_seconds": _num(value.get("window_seconds")),
        "reasons": [r[:MAX_TEXT] for r in reasons if isinstance(r, str)][:MAX_REASONS]
        if isinstance(reasons, list) else [],
        "checks": _checks(value.get("checks")),
    }


def _decision(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    return {
        "action": _text(value.get("action")),
        "from": _int(value.get("from")),
        "to": _int(value.get("to")),
        "reason": _text(value.get("reason")),
        "verdict": _text(value.get("verdict")),
        "change": _text(value.get("change")),
        "at": _time(value.get("at")),
    }


def summary(doc: Any) -> Reading:
    """The status document's `rollout` from a state file's JSON."""
    if not isinstance(doc, dict):
        return Reading(None, f"holds {type(doc).__name__}, not a rollout state")
    if doc.get("schema") != SCHEMA:
        return Reading(None, f"has schema {doc.get('schema')!r}; this dashboard reads schema {SCHEMA}")
    phase = doc.get("phase")
    if phase not in PHASES:
        return Reading(None, f"has phase {phase!r}, not one of {', '.join(PHASES)}")
    plan: dict[str, Any] = doc["plan"] if isinstance(doc.get("plan"), dict) else {}
    ts: dict[str, Any] = doc["ts"] if isinstance(doc.get("ts"), dict) else {}
    raw_steps = doc.get("steps", plan.get("steps"))
    steps = [s for s in (_int(x) for x in raw_steps) if s is not None] if isinstance(raw_steps, list) else []
    finished = phase != "running"
    next_at = None if finished else _time(doc.get("next_decision_ts", ts.get("next_decision")))
    if next_at is None and not finished:
        next_at = _time(doc.get("next_decision_at"))
    return Reading({
        "id": _text(doc.get("rollout")),
        "release": _text(doc.get("release")),
        "phase": phase,
        "weight": _int(doc.get("weight")),
        "step": _int(doc.get("step")),
        "steps": steps,
        "next_weight": _int(doc.get("next_weight")),
        "next_decision_at": next_at,
        "interval_seconds": _num(plan.get("interval_seconds")),
        "max_inconclusive": _int(plan.get("max_inconclusive")),
        "inconclusive_in_a_row": _int(doc.get("inconclusive_in_a_row")),
        "started_at": _time(ts.get("started", doc.get("started_at"))),
        "started_by": _text(doc.get("started_by")),
        "updated_at": _time(ts.get("updated", doc.get("updated_at"))),
        "last_verdict": _verdict(doc.get("last_verdict")),
        "last_decision": _decision(doc.get("last_decision")),
        "pending": _decision(doc.get("pending")),
        "reason": _text(doc.get("reason")) or "",
    })


def read(path: str | Path) -> Reading:
    """The rollout in the state file at `path`, read now."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return Reading(None)
    except IsADirectoryError:
        return Reading(None, "is a directory, not a rollout state file")
    except OSError as exc:
        return Reading(None, f"cannot be read ({exc.strerror or exc})")
    return judge(raw)


def judge(raw: bytes) -> Reading:
    """The rollout in a state file's bytes, wherever they were read."""
    if len(raw) > MAX_BYTES:
        return Reading(None, f"is over {MAX_BYTES >> 10} kB: not a rollout state")
    if not raw.strip():
        return Reading(None)  # being created
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        return Reading(None, f"is not valid JSON ({exc})")
    except RecursionError:
        return Reading(None, "is not valid JSON (nested too deep)")
    try:
        return summary(doc)
    except Exception as exc:  # noqa: BLE001 - a state file never stops the dashboard
        return Reading(None, f"is not a rollout state ({type(exc).__name__}: {exc})")


async def fetch(url: str, timeout: float = FETCH_TIMEOUT_SECONDS) -> Reading:
    """The rollout the controller serves at `url` (its `/state`), fetched now."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            async with http.get(url, allow_redirects=False) as response:
                if response.status == 404:
                    return Reading(None)  # the controller has no rollout state yet
                if response.status != 200:
                    return Reading(None, f"answered HTTP {response.status}")
                raw = bytearray()
                async for chunk in response.content.iter_any():
                    raw += chunk
                    if len(raw) > MAX_BYTES:  # judged as too big; the rest is not read
                        break
    except asyncio.TimeoutError:
        return Reading(None, f"cannot be fetched (no answer within {timeout:g} s)")
    except aiohttp.ClientError as exc:
        return Reading(None, f"cannot be fetched ({type(exc).__name__}: {exc})")
    return judge(bytes(raw))


def reader(path: str | Path) -> Callable[[], Awaitable[Reading]]:
    """The file at `path`, read afresh at every call (a few kB, on the loop)."""
    async def read_now() -> Reading:
        return read(path)
    return read_now


def url_reader(url: str) -> Callable[[], Awaitable[Reading]]:
    return lambda: fetch(url)
