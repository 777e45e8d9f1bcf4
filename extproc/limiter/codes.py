"""Every Z.AI business code the gateway knows, and what it does about each: one table.

Z.AI answers refusals with a business code (`error.code`, or a numeric `error.type` on the
Anthropic endpoint). The code, not the HTTP status, says whether another attempt can help, which
limit to move, whether the whole account must stop until a reset, and what the worker (and the
operator) should do. `classify` (signals.py), the attempt filter's retry marker, the quota gate,
the operator log and the hint appended to the client's error all read this table; the README's
table is generated from it (`python -m extproc.limiter.codes --write-readme`).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass


class Signal(enum.Enum):
    """What one upstream answer means for the limiter."""

    SUCCESS = "success"
    CONCURRENCY = "concurrency"  # too many requests in flight: the concurrency limit shrinks
    FREQUENCY = "frequency"  # too many requests started per unit of time: the start rate shrinks
    OVERLOADED = "overloaded"  # Z.AI (or one model) is busy, not our account: retry, move nothing
    QUOTA = "quota"  # usage quota, plan or account state: no retry helps until a reset (the gate)
    MODEL_UNAVAILABLE = "model_unavailable"  # the plan lacks the model: another model, never a retry
    KEY_REJECTED = "key_rejected"  # the gateway's upstream key: the operator must act
    SERVER_ERROR = "server_error"  # other 5xx and Z.AI's "try again later" codes
    CLIENT_ERROR = "client_error"  # the request's fault; moves no limit
    UNKNOWN = "unknown"


class Reset(enum.Enum):
    """When a gate a code closes opens again."""

    NONE = "none"  # the code closes no gate
    MESSAGE = "message"  # the time in Z.AI's message ("... will reset at <UTC+8 time>")
    MIDNIGHT = "midnight"  # the next 00:00 in Z.AI's time zone (daily limits)
    RETRY = "retry"  # no reset is knowable: close for the default closure, then try again


@dataclass(frozen=True, slots=True)
class Code:
    code: str
    meaning: str
    signal: Signal
    reset: Reset = Reset.NONE
    fallback: bool = False  # MODEL_FALLBACKS may move the request to the chain's next model
    log_level: int = logging.INFO
    hint: str = ""  # the gateway's one line to the worker, appended to Z.AI's message

    @property
    def retried(self) -> bool:
        """Whether Envoy retries this attempt as it is (same model, after a back-off)."""
        return self.signal in RETRYABLE

    @property
    def gates(self) -> bool:
        return self.reset is not Reset.NONE


RETRYABLE = frozenset({Signal.CONCURRENCY, Signal.FREQUENCY, Signal.OVERLOADED,
                       Signal.SERVER_ERROR})

_ERROR = logging.ERROR
_WARNING = logging.WARNING

CODES: dict[str, Code] = {c.code: c for c in (
    Code("1000", "authentication failed", Signal.KEY_REJECTED, log_level=_ERROR,
         hint="Z.AI refused the gateway's upstream key; the operator must check ZAI_API_KEY. "
              "Not retried."),
    Code("1001", "no authentication sent", Signal.KEY_REJECTED, log_level=_ERROR,
         hint="the gateway sent Z.AI no key; the operator must check ZAI_API_KEY. Not retried."),
    Code("1002", "invalid authentication token", Signal.KEY_REJECTED, log_level=_ERROR,
         hint="Z.AI refused the gateway's upstream key as invalid; the operator must check "
              "ZAI_API_KEY. Not retried."),
    Code("1003", "authentication token expired", Signal.KEY_REJECTED, log_level=_ERROR,
         hint="the gateway's upstream key has expired; the operator must renew ZAI_API_KEY. "
              "Not retried."),
    Code("1110", "account inactive", Signal.QUOTA, Reset.RETRY, log_level=_ERROR,
         hint="the Z.AI account is inactive; the gateway pauses requests and tries again later."),
    Code("1112", "account locked", Signal.QUOTA, Reset.RETRY, log_level=_ERROR,
         hint="the Z.AI account is locked; the gateway pauses requests and tries again later."),
    Code("1113", "account in arrears", Signal.QUOTA, Reset.RETRY, log_level=_ERROR,
         hint="the Z.AI account is in arrears; the gateway pauses requests until it is "
              "recharged (it tries again every few minutes)."),
    Code("1121", "account locked for irregular activity", Signal.QUOTA, Reset.RETRY,
         log_level=_ERROR,
         hint="the Z.AI account is locked for irregular activity; contact Z.AI support."),
    Code("1210", "incorrect API call parameters", Signal.CLIENT_ERROR,
         hint="the request's parameters were refused; fix the request. Not retried."),
    Code("1211", "model does not exist", Signal.CLIENT_ERROR,
         hint="the model name is unknown to Z.AI; use a GLM model (or ask the operator for "
              "a MODEL_MAP entry). Not retried."),
    Code("1212", "model not available for this request", Signal.CLIENT_ERROR,
         hint="the request's parameters were refused; fix the request. Not retried."),
    Code("1213", "a required parameter is missing", Signal.CLIENT_ERROR,
         hint="the request's parameters were refused; fix the request. Not retried."),
    Code("1214", "invalid parameter", Signal.CLIENT_ERROR,
         hint="the request's parameters were refused; fix the request. Not retried."),
    Code("1302", "concurrency too high", Signal.CONCURRENCY,
         hint="the account has too many requests in flight; the gateway lowered its "
              "concurrency limit and retried. Retry shortly (see retry-after)."),
    Code("1303", "request frequency too high", Signal.FREQUENCY,
         hint="requests start too fast for the account; the gateway lowered its start rate "
              "and retried. Retry shortly (see retry-after)."),
    Code("1304", "daily call limit reached", Signal.QUOTA, Reset.MIDNIGHT, log_level=_WARNING,
         hint="the account's daily limit is spent; the gateway sends nothing to Z.AI until "
              "00:00 UTC+8."),
    Code("1305", "service overloaded", Signal.OVERLOADED,
         hint="Z.AI is overloaded; the gateway retried. Retry shortly."),
    Code("1308", "usage limit of the 5-hour window reached", Signal.QUOTA, Reset.MESSAGE,
         log_level=_WARNING,
         hint="the account's 5-hour window is spent; the gateway sends nothing to Z.AI until "
              "it resets (see retry-after)."),
    Code("1309", "plan expired", Signal.QUOTA, Reset.RETRY, log_level=_ERROR,
         hint="the GLM Coding Plan has expired; the gateway pauses requests until it is renewed "
              "(it tries again every few minutes)."),
    Code("1310", "weekly/monthly limit reached", Signal.QUOTA, Reset.MESSAGE,
         log_level=_WARNING,
         hint="the account's weekly window is spent; the gateway sends nothing to Z.AI until "
              "it resets (see retry-after)."),
    Code("1311", "model not in the plan", Signal.MODEL_UNAVAILABLE, fallback=True,
         log_level=_WARNING,
         hint="the plan does not include this model; not retried on it."),
    Code("1312", "model overloaded", Signal.OVERLOADED, fallback=True,
         hint="this model is overloaded; the gateway retried (on the next model of "
              "MODEL_FALLBACKS where one is set). Retry shortly or use another model."),
    Code("1313", "fair-use policy: throttled until a review", Signal.QUOTA, Reset.RETRY,
         log_level=_ERROR,
         hint="Z.AI throttles the account under its fair-use policy; the gateway pauses "
              "requests. The operator must ask Z.AI for a review."),
    # Z.AI's own "try again later" codes.
    Code("500", "internal error", Signal.SERVER_ERROR,
         hint="Z.AI failed; the gateway retried. Retry shortly."),
    Code("1120", "service error, try again later", Signal.SERVER_ERROR,
         hint="Z.AI failed; the gateway retried. Retry shortly."),
    Code("1230", "service error, try again later", Signal.SERVER_ERROR,
         hint="Z.AI failed; the gateway retried. Retry shortly."),
    Code("1234", "network error, try again later", Signal.SERVER_ERROR,
         hint="Z.AI failed; the gateway retried. Retry shortly."),
)}


def lookup(code: str | None) -> Code | None:
    return CODES.get(code) if code is not None else None


def readme_table() -> str:
    """The README's table of codes, generated so it cannot drift from `CODES`."""
    rows = ["| code | meaning | retried | limiter / gate | hint to the worker |",
            "|---|---|---|---|---|"]
    for c in sorted(CODES.values(), key=lambda c: int(c.code)):
        if c.gates:
            reaction = {Reset.MESSAGE: "quota gate until the reset Z.AI names",
                        Reset.MIDNIGHT: "quota gate until 00:00 UTC+8",
                        Reset.RETRY: "quota gate; Z.AI is tried again after 5 minutes"}[c.reset]
        else:
            reaction = {Signal.CONCURRENCY: "concurrency limit shrinks",
                        Signal.FREQUENCY: "start rate shrinks",
                        Signal.KEY_REJECTED: "none; operator log line at error level",
                        }.get(c.signal, "none")
        retried = "yes" if c.retried else "no"
        if c.fallback:
            retried += ", next model of MODEL_FALLBACKS"
        rows.append(f"| {c.code} | {c.meaning} | {retried} | {reaction} | {c.hint} |")
    return "\n".join(rows)


README_BEGIN = "<!-- zai-codes:begin -->"
README_END = "<!-- zai-codes:end -->"


def _write_readme(path: str = "README.md") -> None:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    head, _, rest = text.partition(README_BEGIN)
    _, _, tail = rest.partition(README_END)
    if not rest:
        raise SystemExit(f"{path} has no {README_BEGIN} marker")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"{head}{README_BEGIN}\n{readme_table()}\n{README_END}{tail}")


if __name__ == "__main__":
    import sys

    if "--write-readme" in sys.argv:
        _write_readme()
    else:
        print(readme_table())
