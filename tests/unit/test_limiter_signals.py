from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, strategies as st

from extproc.emulator.errors import ApiFormat, error_body, quota_exhausted, too_concurrent, \
    too_frequent, overloaded, stream_error_data
from extproc.limiter.signals import (Signal, business_code, classify, quota_reset_at,
                                     reset_from_retry_after, retryable)
from extproc.accounting.usage import error_fields

UTC8 = timezone(timedelta(hours=8))
NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("status, code, error_type, signal", [
    (429, "1302", None, Signal.CONCURRENCY),
    (429, None, "1302", Signal.CONCURRENCY),  # Anthropic endpoint: the code in error.type
    (429, "1303", "rate_limit_error", Signal.FREQUENCY),
    (429, "1305", None, Signal.OVERLOADED),
    (529, None, "overloaded_error", Signal.OVERLOADED),
    (503, None, None, Signal.OVERLOADED),
    (200, None, "overloaded_error", Signal.OVERLOADED),  # error event after a 200
    (200, "1305", "error", Signal.OVERLOADED),  # OpenAI stream error chunk
    (429, "1304", None, Signal.QUOTA),
    (429, "1308", "1308", Signal.QUOTA),
    (429, "1309", None, Signal.QUOTA),
    (429, "1310", None, Signal.QUOTA),
    (429, "1113", None, Signal.QUOTA),
    (429, None, "rate_limit_error", Signal.CONCURRENCY),  # 429 without a code: the usual cause
    (429, None, None, Signal.CONCURRENCY),
    (429, " 1302 ", None, Signal.CONCURRENCY),
    (500, None, "api_error", Signal.SERVER_ERROR),
    (502, None, None, Signal.SERVER_ERROR),
    (500, "1234", None, Signal.SERVER_ERROR),
    (200, None, "api_error", Signal.SERVER_ERROR),
    (200, None, "error", Signal.SERVER_ERROR),
    (400, "1210", "invalid_request_error", Signal.CLIENT_ERROR),
    (401, "1000", "authentication_error", Signal.KEY_REJECTED),
    (413, None, None, Signal.CLIENT_ERROR),
    (200, None, None, Signal.SUCCESS),
    (204, None, None, Signal.SUCCESS),
    (0, None, None, Signal.UNKNOWN),
    (302, None, None, Signal.UNKNOWN),
])
def test_classify(status, code, error_type, signal):
    assert classify(status, code, error_type) is signal


def _emulated(err, fmt, anthropic_429_type="code"):
    """(code, type) as the token-accounting code reads them from an emulator error body."""
    err_type, code = error_fields(error_body(fmt, err, anthropic_429_type))
    return code, err_type


@pytest.mark.parametrize("fmt", list(ApiFormat))
@pytest.mark.parametrize("anthropic_429_type", ["code", "rate_limit_error"])
def test_emulator_error_bodies_classify_as_their_code(fmt, anthropic_429_type):
    cases = [(too_concurrent(), Signal.CONCURRENCY), (too_frequent(), Signal.FREQUENCY),
             (quota_exhausted(NOW + 60, 60), Signal.QUOTA), (overloaded(fmt), Signal.OVERLOADED)]
    for err, signal in cases:
        code, err_type = _emulated(err, fmt, anthropic_429_type)
        assert classify(err.status, code, err_type) is signal, err
    code_type = error_fields(stream_error_data(fmt))
    assert classify(200, code_type[1], code_type[0]) is Signal.OVERLOADED


def test_business_code_prefers_error_code_and_ignores_non_numeric():
    assert business_code("1303", "1302") == "1303"
    assert business_code(None, "1302") == "1302"
    assert business_code("abc", "rate_limit_error") is None
    assert business_code(None, None) is None


def test_retryable():
    assert {s for s in Signal if retryable(s)} == {
        Signal.CONCURRENCY, Signal.FREQUENCY, Signal.OVERLOADED, Signal.SERVER_ERROR}


def test_reset_time_is_read_as_utc_plus_8():
    expected = datetime(2026, 11, 23, 21, 4, 5, tzinfo=UTC8).timestamp()
    message = "Usage limit reached for 5 hour. Your limit will reset at 2026-11-23 21:04:05"
    assert quota_reset_at(message, NOW) == expected


def test_reset_time_matches_what_the_emulator_says():
    reset = NOW + 3600
    message = quota_exhausted(reset, 3600).message
    assert quota_reset_at(message, NOW) == float(int(reset))


@pytest.mark.parametrize("text, expected", [
    ("your limit will RESET AT 2026-11-23T21:04:05", (2026, 11, 23, 21, 4, 5)),
    ("reset at 2026-11-23 21:04", (2026, 11, 23, 21, 4, 0)),
    ("Reset at: 2026-1-3 01:04:05.123", (2026, 1, 3, 1, 4, 5)),
    ("reset at 2026/11/23 21:04:05.", (2026, 11, 23, 21, 4, 5)),
])
def test_reset_time_is_read_leniently(text, expected):
    assert quota_reset_at(text, NOW) == datetime(*expected, tzinfo=UTC8).timestamp()


def test_reset_time_with_an_explicit_zone_uses_it():
    utc = datetime(2026, 11, 23, 21, 4, 5, tzinfo=timezone.utc).timestamp()
    assert quota_reset_at("reset at 2026-11-23 21:04:05 UTC", NOW) == utc
    assert quota_reset_at("reset at 2026-11-23T21:04:05Z", NOW) == utc
    assert quota_reset_at("reset at 2026-11-23 23:04:05+02:00", NOW) == utc


def test_reset_time_without_date_is_its_next_occurrence():
    # NOW is 20:00 in UTC+8: 21:04 is later today, 19:00 tomorrow.
    assert quota_reset_at("reset at 21:04:05", NOW) == datetime(
        2026, 11, 23, 21, 4, 5, tzinfo=UTC8).timestamp()
    assert quota_reset_at("reset at 19:00", NOW) == datetime(
        2026, 11, 24, 19, 0, tzinfo=UTC8).timestamp()


def test_reset_time_in_the_past_is_returned_as_is():
    past = quota_reset_at("reset at 2020-01-01 00:00:00", NOW)
    assert past == datetime(2020, 1, 1, tzinfo=UTC8).timestamp() < NOW


@pytest.mark.parametrize("text", ["", "High concurrency usage of this API",
                                  "reset at 2026-13-01 10:00:00", "reset at 2026-11-23 25:00",
                                  "reset at soon"])
def test_no_reset_time(text):
    assert quota_reset_at(text, NOW) is None


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31)))
def test_reset_time_round_trips_any_time(moment):
    moment = moment.replace(microsecond=0, tzinfo=UTC8)
    text = f"Your limit will reset at {moment:%Y-%m-%d %H:%M:%S}"
    assert quota_reset_at(text, NOW) == moment.timestamp()


@pytest.mark.parametrize("value, expected", [
    ("120", NOW + 120), (" 0 ", NOW), ("1.5", NOW + 1.5),
    ("Mon, 23 Nov 2026 13:00:00 GMT", datetime(2026, 11, 23, 13, tzinfo=timezone.utc).timestamp()),
    (None, None), ("", None), ("-5", None), ("soon", None), ("inf", None), ("nan", None),
])
def test_reset_from_retry_after(value, expected):
    assert reset_from_retry_after(value, NOW) == expected
