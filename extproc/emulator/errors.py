"""Z.AI's error responses: HTTP status, business code, wording, and body shape.

Wording follows Z.AI's published error-code table (docs.z.ai/api-reference/api-code)
and bodies seen from the live service:
- OpenAI-compatible endpoints: `{"error": {"code": "1302", "message": "..."}}`.
- Anthropic endpoint: `{"type": "error", "error": {"type": ..., "code": ..., "message": ...}}`
  where, for 429s, error.type carries the business code (or "rate_limit_error",
  see the `anthropic_429_type` option).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

# Z.AI reports reset times as naive Beijing time.
ZAI_TZ = timezone(timedelta(hours=8))
RESET_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

OVERLOADED_MESSAGE = "The service may be temporarily overloaded, please try again later"


class ApiFormat(enum.Enum):
    ANTHROPIC = "anthropic"
    OPENAI = "openai"


@dataclass(frozen=True)
class ZaiError:
    """One error response. `anthropic_type` is error.type on the Anthropic endpoint
    (None = use the business code or rate_limit_error, per options)."""

    status: int
    code: str
    message: str
    anthropic_type: str | None
    headers: dict[str, str] = field(default_factory=dict)


def auth_missing() -> ZaiError:
    return ZaiError(
        401,
        "1001",
        "Authentication parameter not received in Header, unable to authenticate",
        "authentication_error",
    )


def auth_wrong(fmt: ApiFormat) -> ZaiError:
    # Both codes are seen for a wrong key; the Anthropic endpoint says 1000.
    if fmt is ApiFormat.ANTHROPIC:
        return ZaiError(401, "1000", "Authentication Failed", "authentication_error")
    return ZaiError(
        401,
        "1002",
        "Invalid Authentication Token, please confirm the correct transmission of "
        "the Authentication Token",
        "authentication_error",
    )


def bad_parameters() -> ZaiError:
    return ZaiError(
        400,
        "1210",
        "Incorrect API call parameters, please check the documentation",
        "invalid_request_error",
    )


def missing_field(name: str) -> ZaiError:
    return ZaiError(
        400, "1213", f"{name} parameter not received properly", "invalid_request_error"
    )


def invalid_field(name: str) -> ZaiError:
    return ZaiError(
        400,
        "1214",
        f"Invalid {name} parameter. Please check the documentation",
        "invalid_request_error",
    )


def too_concurrent() -> ZaiError:
    # No retry-after: Z.AI sends none on 1302/1303.
    return ZaiError(
        429,
        "1302",
        "High concurrency usage of this API, please reduce concurrency or contact "
        "customer service to increase limits",
        None,
    )


def too_frequent() -> ZaiError:
    return ZaiError(
        429,
        "1303",
        "High frequency usage of this API, please reduce frequency or contact "
        "customer service to increase limits",
        None,
    )


def quota_exhausted(reset_epoch: float, retry_after: float) -> ZaiError:
    """1308, with the reset time in UTC+8 and a retry-after (seconds, rounded up).

    retry-after is our choice: it tells well-behaved clients the same thing as the
    message, in a form they can act on, and public reports show a retry hint that
    matches the reset time.
    """
    return _window_spent("1308", "Usage limit reached for 5 hour.", reset_epoch, retry_after)


def _window_spent(code: str, what: str, reset_epoch: float, retry_after: float) -> ZaiError:
    """A quota window is spent until `reset_epoch`: said in UTC+8, and as a retry-after."""
    reset = datetime.fromtimestamp(reset_epoch, tz=ZAI_TZ).strftime(RESET_TIME_FORMAT)
    seconds = max(0, math.ceil(retry_after))
    return ZaiError(429, code, f"{what} Your limit will reset at {reset}", None,
                    {"retry-after": str(seconds)})


def overloaded(fmt: ApiFormat) -> ZaiError:
    """Failure of a non-streaming request when error_after_events is set."""
    if fmt is ApiFormat.ANTHROPIC:
        return ZaiError(529, "1305", OVERLOADED_MESSAGE, "overloaded_error")
    return ZaiError(429, "1305", OVERLOADED_MESSAGE, None)


def internal_error() -> ZaiError:
    """HTTP 500, Z.AI's code 500 (server_error_percent)."""
    return ZaiError(500, "500", "Internal Error", "api_error")


# Codes `reject_code` can answer with (see `rejection`), in Z.AI's table order.
REJECT_CODES = (
    "1113", "1302", "1303", "1304", "1305", "1308", "1309", "1310", "1311", "1312", "1313",
)

_REJECT_MESSAGES = {
    "1113": "Your account is in arrears, please recharge and try again",
    "1304": "The daily call limit for this API has been reached, please contact customer "
    "service to purchase more",
    "1309": "Your GLM Coding Plan package has expired and is temporarily unavailable. You "
    "can resume using it after renewing the subscription.",
    "1312": "The current model is experiencing high traffic, please try again later or "
    "switch to another model",
    "1313": "Your account's current usage pattern does not comply with the Fair Usage "
    "Policy, and your request frequency has been limited. For details, please refer to "
    "the Subscription Service Agreement. To restore access, please submit a request.",
}


def weekly_limit_exhausted(reset_epoch: float, retry_after: float) -> ZaiError:
    """1310: the weekly/monthly Coding Plan window is spent (reset time as for 1308)."""
    return _window_spent("1310", "Weekly/Monthly Limit Exhausted.", reset_epoch, retry_after)


def model_not_in_plan(model: str) -> ZaiError:
    """1311: the subscription does not include the model (Z.AI answers 429)."""
    return ZaiError(
        429,
        "1311",
        f"Your current subscription plan does not yet include access to {model}",
        None,
    )


def rejection(
    code: str, fmt: ApiFormat, *, model: str, reset_epoch: float, retry_after: float
) -> ZaiError:
    """The refusal `reject_code` asks for. `model` names the model in 1311;
    `reset_epoch`/`retry_after` date the reset of 1308 and 1310."""
    if code == "1302":
        return too_concurrent()
    if code == "1303":
        return too_frequent()
    if code == "1305":
        return overloaded(fmt)
    if code == "1308":
        return quota_exhausted(reset_epoch, retry_after)
    if code == "1310":
        return weekly_limit_exhausted(reset_epoch, retry_after)
    if code == "1311":
        return model_not_in_plan(model)
    if code in _REJECT_MESSAGES:
        return ZaiError(429, code, _REJECT_MESSAGES[code], None)
    raise ValueError(f"no Z.AI rejection for code {code!r}")


def business_message(code: str) -> str:
    """Z.AI's wording for a business code, for bodies that carry only a code and a
    message (the quota endpoint). Codes whose wording needs a time or a model get
    it without; unknown codes get a generic line naming the code."""
    fixed = {
        "1000": auth_wrong(ApiFormat.ANTHROPIC).message,
        "1001": auth_missing().message,
        "1002": auth_wrong(ApiFormat.OPENAI).message,
        "1210": bad_parameters().message,
        "1302": too_concurrent().message,
        "1303": too_frequent().message,
        "1305": OVERLOADED_MESSAGE,
        "1308": "Usage limit reached for 5 hour.",
        "1310": "Weekly/Monthly Limit Exhausted.",
        **_REJECT_MESSAGES,
    }
    return fixed.get(code, f"Request failed (business code {code})")


def bad_options_header(header: str, problem: str) -> ZaiError:
    """400 for an unusable per-request options header (an emulator feature, so the
    code is Z.AI's generic 'incorrect parameters')."""
    return ZaiError(
        400, "1210", f"Invalid {header} header: {problem}", "invalid_request_error"
    )


def error_body(fmt: ApiFormat, err: ZaiError, anthropic_429_type: str) -> dict[str, Any]:
    if fmt is ApiFormat.OPENAI:
        return {"error": {"code": err.code, "message": err.message}}
    kind = err.anthropic_type
    if kind is None:
        kind = err.code if anthropic_429_type == "code" else "rate_limit_error"
    return {
        "type": "error",
        "error": {"type": kind, "code": err.code, "message": err.message},
    }


def stream_error_data(fmt: ApiFormat) -> dict[str, Any]:
    """Payload of the error sent inside a 200 stream (error_after_events)."""
    if fmt is ApiFormat.ANTHROPIC:
        return {
            "type": "error",
            "error": {"type": "overloaded_error", "message": OVERLOADED_MESSAGE},
        }
    return {"error": {"code": "1305", "message": OVERLOADED_MESSAGE}}
