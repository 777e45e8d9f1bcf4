"""What an upstream answer means for the limiter.

Z.AI puts a business code in its error bodies (`error.code`, or `error.type` on the Anthropic
endpoint, e.g. "1302"); the HTTP status alone cannot tell "too many at once" from "quota gone".
`classify` turns (status, code, error type) into a `Signal`; the limiter moves its concurrency
limit on CONCURRENCY, its start-rate limit on FREQUENCY, and closes the quota gate on QUOTA.
Reset times in quota messages are naive UTC+8 (Beijing) wall-clock times.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

from extproc.limiter.codes import RETRYABLE, Signal, lookup

__all__ = ["Signal", "ZAI_TZ", "business_code", "classify", "quota_reset_at", "retryable",
           "reset_from_retry_after", "next_midnight"]

ZAI_TZ = timezone(timedelta(hours=8))


_ERROR_TYPES: dict[str, Signal] = {
    "overloaded_error": Signal.OVERLOADED,
    "rate_limit_error": Signal.CONCURRENCY,
    "api_error": Signal.SERVER_ERROR,
}


def business_code(code: str | None, error_type: str | None) -> str | None:
    """The Z.AI code from `error.code`, else from a numeric `error.type` (Anthropic endpoint)."""
    for candidate in (code, error_type):
        if candidate is not None and candidate.strip().isdigit():
            return candidate.strip()
    return None


def classify(status: int, code: str | None, error_type: str | None) -> Signal:
    """What one upstream answer (or a stream's error event after a 200) means for the limiter.

    A known business code wins over the status: the same code arrives as a 429 body or inside a
    200 stream. A 429 without a recognisable code counts as CONCURRENCY, the usual cause on a
    shared account (and the one a smaller limit can fix).
    """
    known = lookup(business_code(code, error_type))
    if known is not None:
        return known.signal
    if error_type == "overloaded_error" or status in (503, 529):
        return Signal.OVERLOADED
    if status == 429:
        return Signal.CONCURRENCY
    if status in (401, 403) and code is None and error_type == "authentication_error":
        return Signal.KEY_REJECTED
    if 200 <= status < 300:
        if error_type is None and code is None:
            return Signal.SUCCESS
        # An error event after a 200 is Z.AI failing mid-answer, not the request's fault.
        return _ERROR_TYPES.get(error_type or "", Signal.SERVER_ERROR)
    if 500 <= status < 600:
        return Signal.SERVER_ERROR
    if 400 <= status < 500:
        return Signal.CLIENT_ERROR
    return Signal.UNKNOWN


def retryable(signal: Signal) -> bool:
    """Whether another attempt (after a wait) can succeed where this one failed."""
    return signal in RETRYABLE


_RESET = re.compile(
    r"reset\s+at\s*:?\s*"
    r"(?:(?P<y>\d{4})[-/.](?P<mo>\d{1,2})[-/.](?P<d>\d{1,2})(?:\s*T\s*|\s+))?"
    r"(?P<h>\d{1,2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?:\.\d+)?)?"
    r"\s*(?P<tz>Z\b|UTC|GMT|[+-]\d{2}:?\d{2})?",
    re.IGNORECASE,
)
_OFFSET = re.compile(r"([+-])(\d{2}):?(\d{2})")


def _zone(text: str | None) -> timezone:
    """An explicit zone after the time if Z.AI ever adds one; naive times are UTC+8."""
    if text is None:
        return ZAI_TZ
    match = _OFFSET.fullmatch(text)
    if match is None:
        return timezone.utc  # Z, UTC, GMT
    sign = 1 if match.group(1) == "+" else -1
    return timezone(sign * timedelta(hours=int(match.group(2)), minutes=int(match.group(3))))


def quota_reset_at(message: str, now_wall: float) -> float | None:
    """Epoch seconds of "... your limit will reset at 2026-11-23 21:04:05" (UTC+8), or None.

    Lenient: "T" or spaces between date and time, optional seconds, any case. A time without
    a date means its next occurrence at or after `now_wall`. A time already past is returned
    as is: the caller decides what a stale reset time means.
    """
    match = _RESET.search(message)
    if match is None:
        return None
    zone = _zone(match.group("tz"))
    hour, minute, second = int(match["h"]), int(match["mi"]), int(match["s"] or 0)
    try:
        if match["y"] is None:
            today = datetime.fromtimestamp(now_wall, tz=zone)
            at = today.replace(hour=hour, minute=minute, second=second, microsecond=0)
            if at.timestamp() < math.floor(now_wall):
                at += timedelta(days=1)
        else:
            at = datetime(int(match["y"]), int(match["mo"]), int(match["d"]), hour, minute,
                          second, tzinfo=zone)
    except ValueError:  # 2026-13-40, 25:61
        return None
    return at.timestamp()


def reset_from_retry_after(value: str | None, now_wall: float) -> float | None:
    """Epoch seconds a `retry-after` header points to: delay-seconds or an HTTP-date."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # HTTP-dates are GMT by definition
            when = when.replace(tzinfo=timezone.utc)
        return when.timestamp()
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return now_wall + seconds


def next_midnight(now_wall: float) -> float:
    """The next 00:00 in Z.AI's time zone: when a daily limit (1304) resets."""
    today = datetime.fromtimestamp(now_wall, tz=ZAI_TZ).replace(hour=0, minute=0, second=0,
                                                                 microsecond=0)
    return (today + timedelta(days=1)).timestamp()
