from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, strategies as st

from extproc.api import Endpoint
from extproc.telemetry.metrics import Metrics
from extproc.telemetry.pricing import DEFAULT_PRICES, Peak, PriceTable
from extproc.telemetry.usage_record import Reporter
from extproc.proxy.outcome import Outcome, Tokens

# 2026-11-23 03:00 UTC = 11:00 UTC+8 (off-peak); 07:00 UTC = 15:00 UTC+8 (peak).
OFF_PEAK = datetime(2026, 11, 23, 3, 0, tzinfo=timezone.utc).timestamp()
PEAK = datetime(2026, 11, 23, 7, 0, tzinfo=timezone.utc).timestamp()


def test_cost_per_direction_and_peak_tier():
    table = PriceTable()
    tokens = {"input": 1_000_000, "output": 500_000, "cache_read": 2_000_000, "cache_write": 0}
    off = table.cost("GLM-4.7", tokens, OFF_PEAK)
    assert off == pytest.approx(0.60 + 1.10 + 0.22)
    assert table.cost("glm-4.7", tokens, PEAK) == pytest.approx(off * DEFAULT_PRICES["peak"]["multiplier"])
    assert table.cost("mystery-model", tokens, OFF_PEAK) is None


# Whole microseconds: datetime rounds a timestamp to them, which the hour of a request never needs.
@given(wall=st.integers(min_value=0, max_value=4_000_000_000_000_000).map(lambda us: us / 1e6),
       offset_minutes=st.integers(min_value=-14 * 60, max_value=14 * 60),
       start=st.integers(0, 24), end=st.integers(0, 24))
def test_peak_hours_match_the_calendar_on_any_fixed_offset_clock(wall, offset_minutes, start, end):
    offset = timedelta(minutes=offset_minutes)
    hour = datetime.fromtimestamp(wall, timezone(offset)).hour
    assert Peak(offset, start, end, 2.0).applies(wall) == (start <= hour < end)


@pytest.mark.parametrize("doc,problem", [
    ({}, "models"),
    ({"models": {"m": {"input": -1}}}, "m.input"),
    ({"models": {"m": {"input": "cheap"}}}, "m.input"),
    ({"models": {"m": {}}, "peak": {"multiplier": True}}, "peak.multiplier"),
])
def test_bad_price_tables_are_refused(doc, problem):
    with pytest.raises(ValueError, match=problem.replace(".", r"\.")):
        PriceTable(doc)


def sample(value_name: str, text: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(value_name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def outcome(model: str, tokens: Tokens | None, status: int = 200, **kw) -> Outcome:
    return Outcome(endpoint=Endpoint.MESSAGES, worker="w", request_id="r", status=status,
                   duration=1.5, completed=True, model=model, tokens=tokens, **kw)


async def test_metrics_bound_models_and_split_estimated_tokens():
    metrics = Metrics("canary", ["glm-4.7"])
    reporter = Reporter(metrics, PriceTable(), "canary", wall_clock=lambda: OFF_PEAK)
    fields = await reporter.record(outcome("GLM-4.7", Tokens(10, 20, 3, 4, output_estimated=True),
                                     time_to_first_token=0.4))
    await reporter.record(outcome("client-invented-model-123", Tokens(5, 6)))
    text = metrics.exposition().decode()
    assert sample("zai_proxy_tokens_total", text, model="glm-4.7", direction="input", source="reported") == 10
    assert sample("zai_proxy_tokens_total", text, model="glm-4.7", direction="output", source="estimated") == 20
    assert sample("zai_proxy_tokens_total", text, model="other", direction="output", source="reported") == 6
    assert "client-invented-model-123" not in text
    assert sample("zai_proxy_requests_total", text, deployment_variant="canary", status="200") == 2
    assert sample("zai_proxy_time_to_first_token_seconds_count", text, model="glm-4.7") == 1
    assert sample("zai_proxy_estimated_cost_usd_total", text, model="glm-4.7") == pytest.approx(fields["cost_usd"])
    assert fields["output_estimated"] is True and fields["estimated"] is True


async def test_upstream_error_labels_are_bounded():
    metrics = Metrics("production", [])
    reporter = Reporter(metrics, PriceTable(), "production")
    # A failed attempt is counted by the attempt observer, not again for the relayed answer.
    await reporter.record(outcome("x", None, status=429, error_type="1302", error_code="1302"))
    metrics.upstream_error("concurrency", "1302")
    # An error event after a 200, with a code nobody knows.
    await reporter.record(outcome("x", Tokens(), status=200, error_type="weird<script>", error_code="99999"))
    text = metrics.exposition().decode()
    assert sample("zai_proxy_upstream_errors_total", text, error_class="concurrency", code="1302") == 1
    assert sample("zai_proxy_upstream_errors_total", text, error_class="server_error", code="other") == 1
    assert "weird" not in text and "99999" not in text


def _plain_children(monkeypatch: pytest.MonkeyPatch) -> None:
    """prometheus_client's own (locked) counters and histograms, as the reference."""
    import extproc.telemetry.metrics as module

    monkeypatch.setattr(module, "adder", lambda child: child.inc)
    monkeypatch.setattr(module, "_observer", lambda child: child.observe)


def _samples(metrics: Metrics) -> list[str]:
    return sorted(line for line in metrics.exposition().decode().splitlines()
                  if line and "_created" not in line)  # creation times differ between registries


durations = st.one_of(st.floats(0, 1000, allow_nan=False), st.sampled_from([0.0, 0.05, 0.1, 600.0, 900.0]))
outcomes = st.builds(
    lambda status, duration, ttft, tokens, model, worker: Outcome(
        endpoint=Endpoint.MESSAGES, worker=worker, request_id="r", status=status, duration=duration,
        completed=True, model=model, tokens=tokens, time_to_first_token=ttft),
    st.sampled_from([200, 429, 500]), durations, st.none() | durations,
    st.none() | st.builds(Tokens, st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**4),
                          st.integers(0, 10**4), st.booleans(), st.booleans()),
    st.sampled_from(["glm-4.7", "other-model", None]), st.sampled_from(["a", "b"]))


@given(st.lists(outcomes, max_size=30), st.lists(st.sampled_from([1, -1]), max_size=10))
def test_unlocked_series_expose_what_prometheus_client_would(recorded, streams):
    """The request path adds to its series without prometheus_client's lock per change and finds
    a histogram's bucket by binary search: the exposition is the library's own, sample for sample."""
    fast, plain = Metrics("production", ["glm-4.7"]), None
    with pytest.MonkeyPatch.context() as patch:
        _plain_children(patch)
        plain = Metrics("production", ["glm-4.7"])
        for outcome_ in recorded:
            plain.record(outcome_, 0.001 if outcome_.tokens else None, outcome_.worker)
        for delta in streams:
            plain.streams_changed(delta)
    for outcome_ in recorded:
        fast.record(outcome_, 0.001 if outcome_.tokens else None, outcome_.worker)
    for delta in streams:
        fast.streams_changed(delta)
    assert _samples(fast) == _samples(plain)
