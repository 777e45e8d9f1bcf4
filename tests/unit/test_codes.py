"""The table of Z.AI codes: every code's behaviour, the README's copy, and the client's error."""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest

from extproc.limiter.codes import CODES, README_BEGIN, README_END, Reset, Signal, readme_table
from extproc.limiter.signals import classify, next_midnight, retryable
from extproc.proxy.upstream_errors import HINT_PREFIX, annotate

# The issue's list: code -> (signal, retried as is, gate reset, MODEL_FALLBACKS applies)
EXPECTED = {
    "1302": (Signal.CONCURRENCY, True, Reset.NONE, False),
    "1303": (Signal.FREQUENCY, True, Reset.NONE, False),
    "1304": (Signal.QUOTA, False, Reset.MIDNIGHT, False),
    "1305": (Signal.OVERLOADED, True, Reset.NONE, False),
    "1308": (Signal.QUOTA, False, Reset.MESSAGE, False),
    "1309": (Signal.QUOTA, False, Reset.RETRY, False),
    "1310": (Signal.QUOTA, False, Reset.MESSAGE, False),
    "1311": (Signal.MODEL_UNAVAILABLE, False, Reset.NONE, True),
    "1312": (Signal.OVERLOADED, True, Reset.NONE, True),
    "1313": (Signal.QUOTA, False, Reset.RETRY, False),
    "1113": (Signal.QUOTA, False, Reset.RETRY, False),
    **{c: (Signal.KEY_REJECTED, False, Reset.NONE, False) for c in ("1000", "1001", "1002")},
    **{c: (Signal.CLIENT_ERROR, False, Reset.NONE, False)
       for c in ("1210", "1211", "1212", "1213", "1214")},
}


@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_every_code_of_the_issue_has_its_behaviour(code):
    signal, retried, reset, fallback = EXPECTED[code]
    known = CODES[code]
    assert (known.signal, known.retried, known.reset, known.fallback) == (signal, retried, reset,
                                                                         fallback)
    assert classify(429, code, None) is signal and retryable(signal) is retried
    assert known.hint and known.meaning


def test_operator_codes_log_at_error_level():
    for code in ("1000", "1001", "1002", "1313", "1309", "1113"):
        assert CODES[code].log_level == logging.ERROR


def test_the_readme_table_is_generated_from_the_code():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert f"{README_BEGIN}\n{readme_table()}\n{README_END}" in readme, (
        "regenerate README.md's table with `.venv/bin/python -m extproc.limiter.codes "
        "--write-readme`")


def test_daily_limit_resets_at_midnight_utc8():
    # 2026-11-23 15:30 UTC is 23:30 UTC+8: the reset is 30 minutes later.
    assert next_midnight(1795447800.0) == 1795447800.0 + 1800


def test_anthropic_refusal_gets_its_sdk_type_the_code_and_a_hint():
    body = orjson.dumps({"type": "error", "error": {"type": "1302", "code": "1302",
                                                     "message": "High concurrency usage"}})
    doc = orjson.loads(annotate(body, 429, "1302"))
    assert doc["type"] == "error" and doc["error"]["type"] == "rate_limit_error"
    assert doc["error"]["code"] == "1302"
    assert doc["error"]["message"].startswith("High concurrency usage " + HINT_PREFIX)
    # Once only: a body already annotated passes as it is.
    assert annotate(orjson.dumps(doc), 429, "1302") is None


def test_openai_refusal_keeps_its_shape_and_1311_names_a_model():
    body = orjson.dumps({"error": {"code": "1311", "message": "no access to glm-5.1"}})
    doc = orjson.loads(annotate(body, 429, "1311", suggested_model="glm-4.7"))
    assert doc["error"]["type"] == "rate_limit_error" and doc["error"]["code"] == "1311"
    assert "Use glm-4.7 instead." in doc["error"]["message"]


@pytest.mark.parametrize("body", [b"", b"not json", b"[1]", b'{"error": "flat"}'])
def test_bodies_that_are_not_a_zai_error_pass_untouched(body):
    assert annotate(body, 429, "1302") is None
    assert annotate(b'{"error":{"message":"x"}}', 429, "99999") is None  # unknown code


def test_1311_never_suggests_the_refused_model():
    body = orjson.dumps({"error": {"code": "1311", "message": "no access to glm-4.7"}})
    message = orjson.loads(annotate(body, 429, "1311", refused_model="glm-4.7"))["error"]["message"]
    assert "glm-4.7 instead" not in message and "Use a model the plan includes instead." in message
    message = orjson.loads(annotate(body, 429, "1311", suggested_model="glm-4.5-air",
                                    refused_model="glm-4.7"))["error"]["message"]
    assert message.endswith("Use glm-4.5-air instead.]")
