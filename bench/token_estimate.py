"""Benchmark: the request-side input-token estimate (extproc.accounting.request_body + extproc.accounting.tokens).

Run from the repository root:

    .venv/bin/python bench/token_estimate.py [--repeat 7] [--size-kb 1024]

Measures, in one run, on a deterministic Claude-Code-like conversation (seeded random: a ~50 KB
system prompt, 20 tool definitions, then user/assistant turns with text, tool_use and tool_result
blocks until the body reaches the size asked):

(a) cold: parse + count of the whole body with an empty cache;
(b) warm: parse + count of the same body after the previous request (its first ~95%) was
    counted, the case of every later turn of an agent; and the warm/cold ratio;
(c) event-loop blocking: a ticker task sleeps 1 ms in a loop and records how late it wakes while
    `await parse_request_async(...)` and `await counter.count(...)` run, cold and warm, with
    CPython's default GIL switch interval (5 ms) and with `tune_gil_switching()` (0.5 ms);
(d) the same ticker around `parse_request_async` alone for 1, 4 and 16 MB bodies, with a thread
    and with a process pool (an option for the server, not what it does today);
and the cache's memory per entry.

Prints medians with min and max over the repetitions, as Markdown for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extproc.api import Api  # noqa: E402
from extproc.accounting.request_body import RequestInfo, parse_request, parse_request_async  # noqa: E402
from extproc.accounting.tokens import GIL_SWITCH_INTERVAL, TokenCounter, tune_gil_switching  # noqa: E402

WORDS = ("the a to of and in is it that for on with as this be by file function value return "
         "error test request response token stream model user agent cache limit update check "
         "config server client path line change should would could please then when if not "
         "can will run fix add remove build output input data list item name type class module "
         "import async await def self None True False").split()
CODE_LINES = (
    "def {n}(self, {a}: int) -> str:", "    return self.{a}.get({n!r}, None)",
    "if {a} is None:", "    raise ValueError(f\"bad {a}: {{{a}}}\")", "for {a} in {n}s:",
    "    {n}[{a}] = {a} + 1", "import {n}", "from .{n} import {a}", "class {N}:",
    "    async def {n}(self) -> None:", "        await asyncio.sleep(0)", "# {w} {w} {w}",
)


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def code(rng: random.Random, lines: int) -> str:
    out = []
    for _ in range(lines):
        n, a = rng.choice(WORDS) + "_" + rng.choice(WORDS), rng.choice(WORDS)
        out.append(rng.choice(CODE_LINES).format(n=n, a=a, N=n.title().replace("_", ""),
                                                 w=rng.choice(WORDS)))
    return "\n".join(out)


def tool(rng: random.Random, index: int) -> dict[str, object]:
    props = {f"{rng.choice(WORDS)}_{i}": {"type": rng.choice(["string", "integer", "boolean"]),
                                          "description": words(rng, 20)} for i in range(6)}
    return {"name": f"Tool{index}", "description": words(rng, 250),
            "input_schema": {"type": "object", "properties": props, "required": list(props)[:2]}}


def turn(rng: random.Random, index: int) -> list[dict[str, object]]:
    """One agent step: the user's message (and the last tool's result), the assistant's reply."""
    call_id = f"toolu_{index:06d}"
    user: list[dict[str, object]] = [{"type": "text", "text": words(rng, rng.randint(10, 80))}]
    if index:
        user.insert(0, {"type": "tool_result", "tool_use_id": f"toolu_{index - 1:06d}",
                        "content": [{"type": "text", "text": code(rng, rng.randint(20, 200))}]})
    assistant = [{"type": "text", "text": words(rng, rng.randint(20, 120))},
                 {"type": "tool_use", "id": call_id, "name": f"Tool{rng.randrange(20)}",
                  "input": {"path": f"src/{rng.choice(WORDS)}.py", "command": words(rng, 12)}}]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def conversation(size: int, seed: int = 7) -> tuple[bytes, bytes]:
    """(previous request, next request): the previous one is the next one's first ~95%."""
    rng = random.Random(seed)
    system = "\n\n".join(words(rng, 120) + "\n" + code(rng, 8) for _ in range(57))
    doc: dict[str, object] = {"model": "glm-4.6", "max_tokens": 32000, "stream": True,
                              "system": [{"type": "text", "text": system}],
                              "tools": [tool(rng, i) for i in range(20)], "messages": []}
    messages: list[dict[str, object]] = []
    sizes = [len(orjson.dumps(doc))]  # sizes[i]: the body with i turns (give or take a comma)
    while sizes[-1] < size:
        step = turn(rng, len(messages) // 2)
        messages.extend(step)
        sizes.append(sizes[-1] + sum(len(orjson.dumps(m)) + 1 for m in step))
    cut = next(i for i, s in enumerate(sizes) if s >= 0.95 * sizes[-1])
    previous = dict(doc, messages=messages[:2 * cut])
    return orjson.dumps(previous), orjson.dumps(dict(doc, messages=messages))


@dataclass
class Series:
    values: list[float]

    def cell(self, unit: float = 1e3, digits: int = 1) -> str:
        v = [x * unit for x in self.values]
        return f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f})"


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def sync_round(previous: bytes, body: bytes) -> dict[str, float]:
    """Parse and count times, cold and warm (sync, no event loop)."""
    parse = timed(lambda: parse_request(body, Api.ANTHROPIC))
    info = parse_request(body, Api.ANTHROPIC)
    cold_counter, warm_counter = TokenCounter(), TokenCounter()
    cold = timed(lambda: cold_counter.count_segments(info.segments))
    warm_counter.count_segments(parse_request(previous, Api.ANTHROPIC).segments)
    warm = timed(lambda: warm_counter.count_segments(info.segments))
    cold_counter.close()
    warm_counter.close()
    return {"parse": parse, "cold": cold, "warm": warm, "cold_total": parse + cold,
            "warm_total": parse + warm}


async def max_block(work: Callable[[], Awaitable[object]]) -> float:
    """The longest lateness of a 1 ms ticker while `work` runs."""
    worst = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst
        while not done:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - start - 0.001)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.005)  # ticker running
    worst = 0.0
    await work()
    done = True
    await task
    return worst


async def loop_round(previous: bytes, body: bytes) -> dict[str, float]:
    """Event-loop blocking while idle, parsing, and counting cold and warm."""
    cold_counter, warm_counter = TokenCounter(), TokenCounter()
    info: RequestInfo = parse_request(body, Api.ANTHROPIC)
    await warm_counter.count(parse_request(previous, Api.ANTHROPIC))
    out = {
        "idle": await max_block(lambda: asyncio.sleep(0.2)),
        "parse": await max_block(lambda: parse_request_async(body, Api.ANTHROPIC,
                                                             cold_counter.executor)),
        "cold": await max_block(lambda: cold_counter.count(info)),
        "warm": await max_block(lambda: warm_counter.count(info)),
    }
    cold_counter.close()
    warm_counter.close()
    return out


def collect(rounds: list[dict[str, float]]) -> dict[str, Series]:
    return {key: Series([r[key] for r in rounds]) for key in rounds[0]}


def cache_entry_bytes(entries: int = 50_000) -> float:
    """Memory the cache keeps per entry: what counting distinct segments leaves allocated."""
    counter = TokenCounter(max_entries=entries)
    segments = [f"segment {i} " + "x" * 64 for i in range(entries)]
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    counter.count_segments(segments)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert counter.stats.entries == entries
    counter.close()
    return sum(s.size_diff for s in after.compare_to(before, "filename")) / entries


async def block_and_wall(work: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    start = time.perf_counter()
    block = await max_block(work)
    return block, time.perf_counter() - start


def parse_row(body: bytes, processes: concurrent.futures.Executor, repeat: int = 3) -> str:
    """Parse time; loop block with a thread; loop block and wall time with a process pool."""
    parse = Series([timed(lambda: parse_request(body, Api.ANTHROPIC)) for _ in range(repeat)])
    thread = Series([asyncio.run(max_block(lambda: parse_request_async(body, Api.ANTHROPIC)))
                     for _ in range(repeat)])
    runs = [asyncio.run(block_and_wall(lambda: parse_request_async(body, Api.ANTHROPIC, processes,
                                                                   inline_limit_bytes=0)))
            for _ in range(repeat)]
    process_block, process_wall = Series([r[0] for r in runs]), Series([r[1] for r in runs])
    return (f"| {len(body) >> 20} MB | {parse.cell()} | {thread.cell(digits=2)} | "
            f"{process_block.cell(digits=2)} | {process_wall.cell()} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--size-kb", type=int, default=1024)
    args = parser.parse_args()

    previous, body = conversation(args.size_kb * 1024)
    info = parse_request(body, Api.ANTHROPIC)
    counter = TokenCounter()
    tokens = asyncio.run(counter.count(info))
    print(f"# token estimate benchmark\n\nmachine: nproc={os.cpu_count()}, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"encoding {counter.encoding_name}, repetitions {args.repeat}")
    print(f"body: {len(body) / 1024:.0f} KB, {len(info.segments)} segments, estimate {tokens} "
          f"tokens; previous request {len(previous) / 1024:.0f} KB "
          f"({100 * len(previous) / len(body):.1f}% of it)\n")
    counter.close()

    costs = collect([sync_round(previous, body) for _ in range(args.repeat)])
    ratio = Series([w / c for w, c in zip(costs["warm_total"].values,
                                          costs["cold_total"].values, strict=True)])
    print("| step | ms, median (min-max) |\n|---|---|")
    for label, key in (("parse (orjson + walk)", "parse"), ("count, cold cache", "cold"),
                       ("count, warm cache (95% seen)", "warm"), ("**cold: parse + count**",
                                                                   "cold_total"),
                       ("**warm: parse + count**", "warm_total")):
        print(f"| {label} | {costs[key].cell()} |")
    print(f"| **warm / cold** | {ratio.cell(unit=100)} % |\n")

    print("Event loop: longest lateness of a 1 ms ticker, ms, median (min-max)\n")
    print("| GIL switch interval | idle | parse_request_async | count, cold | count, warm |")
    print("|---|---|---|---|---|")
    tuned = f"{GIL_SWITCH_INTERVAL * 1000:g} ms"
    for label, tune in (("5 ms (CPython default)", False), (f"{tuned} (tune_gil_switching)", True)):
        if tune:
            tune_gil_switching()
        blocks = collect([asyncio.run(loop_round(previous, body)) for _ in range(args.repeat)])
        print(f"| {label} | " + " | ".join(blocks[k].cell(digits=2)
                                          for k in ("idle", "parse", "cold", "warm")) + " |")
    print("\nparse_request_async alone, by body size (orjson holds the GIL while it parses); "
          f"ms, median (min-max), {tuned} switch interval:\n")
    print("| body | parse | loop block, parse in a thread | loop block, parse in a process "
          "pool | wall time, process pool |\n|---|---|---|---|---|")
    context = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as processes:
        processes.submit(int).result()  # started
        for mb in (1, 4, 16):
            print(parse_row(conversation(mb << 20)[1], processes))
    print(f"\ncache memory: {cache_entry_bytes():.0f} bytes per entry "
          "(tracemalloc, 50,000 entries)")


if __name__ == "__main__":
    main()
