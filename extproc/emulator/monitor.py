"""Z.AI's quota endpoint, `GET /api/monitor/usage/quota/limit`: its key check and
bodies (pure, no I/O).

Shapes follow bodies seen from the live service. Every answer is an envelope
`{"code", "msg", "success"[, "data"]}`; `code` is an int (200 on success). Errors
other than authentication come back with HTTP 200 and `success: false`, so a
client must read `success`/`code`, not only the HTTP status.
"""

from __future__ import annotations

import hmac
from typing import Any

from .errors import auth_missing, business_message
from .options import EmulatorOptions
from .quota import FIVE_HOUR, WEEKLY, WindowView

PATH = "/api/monitor/usage/quota/limit"
SUCCESS_MESSAGE = "Operation successful"
# Z.AI's `unit` enum: 3 = hours (number 5 -> the 5-hour window), 6 = weeks,
# 5 = months (the tool allowance).
UNITS = {FIVE_HOUR: (3, 5), WEEKLY: (6, 1)}
TOOL_UNIT = (5, 1)
TOOL_CODES = ("search-prime", "web-reader", "zread")
# A limit type no client knows, so tests can check that clients skip unknown types.
# It claims 100% of a 5-hour window: a client that does not skip it would think
# the account spent.
UNKNOWN_TYPE = "FOO_LIMIT"


def check_key(authorization: str | None, api_key: str) -> tuple[int, dict[str, Any]] | None:
    """None when the whole Authorization value is the key (no `Bearer` here, unlike
    the model endpoints); else (401, body): 1001 when missing, 1000 when wrong."""
    if not authorization or not authorization.strip():
        return 401, envelope(int(auth_missing().code), auth_missing().message)
    if hmac.compare_digest(authorization.strip().encode("utf-8"), api_key.encode("utf-8")):
        return None
    return 401, envelope(1000, business_message("1000"))


def envelope(code: int, message: str) -> dict[str, Any]:
    """An error answer (success false)."""
    return {"code": code, "msg": message, "success": False}


def error_body(code: str) -> dict[str, Any]:
    """What the `quota_error` option asks for (sent with HTTP 200)."""
    return envelope(int(code), business_message(code))


def limits_body(
    windows: dict[str, WindowView], tools: WindowView, options: EmulatorOptions
) -> dict[str, Any]:
    """The success answer: plan tier and the limits, in a fixed order (5-hour window,
    weekly window, tool allowance, unknown type)."""
    limits = [_window_limit(windows[name], options.quota_shape) for name in (FIVE_HOUR, WEEKLY)]
    limits += [_tool_limit(tools), _unknown_limit(windows[FIVE_HOUR])]
    return {
        "code": 200,
        "msg": SUCCESS_MESSAGE,
        "success": True,
        "data": {"level": options.quota_level, "limits": limits},
    }


def _window_limit(view: WindowView, shape: str) -> dict[str, Any]:
    unit, number = UNITS[view.name]
    if shape == "credits":
        return {
            "type": "CREDIT_LIMIT",
            "unit": unit,
            "number": number,
            "usage": view.allowance,
            "currentValue": view.used,
            "remaining": view.remaining,
            "percentage": view.percentage,
            "nextResetTime": view.next_reset_ms,
        }
    return {
        "type": "TOKENS_LIMIT",
        "unit": unit,
        "number": number,
        "percentage": view.percentage,
        "nextResetTime": view.next_reset_ms,
    }


def _tool_limit(tools: WindowView) -> dict[str, Any]:
    unit, number = TOOL_UNIT
    return {
        "type": "TIME_LIMIT",
        "unit": unit,
        "number": number,
        "usage": tools.allowance,
        "currentValue": tools.used,
        "remaining": tools.remaining,
        "percentage": tools.percentage,
        "nextResetTime": tools.next_reset_ms,
        "usageDetails": [{"modelCode": code, "usage": 0} for code in TOOL_CODES],
    }


def _unknown_limit(five_hour: WindowView) -> dict[str, Any]:
    unit, number = UNITS[FIVE_HOUR]
    return {
        "type": UNKNOWN_TYPE,
        "unit": unit,
        "number": number,
        "percentage": 100,
        "nextResetTime": five_hour.next_reset_ms,
    }
