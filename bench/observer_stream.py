"""Benchmark: the observer's Python for one response, without gRPC (`ResponseBody.feed`).

    .venv/bin/python bench/observer_stream.py                     # this checkout
    .venv/bin/python bench/observer_stream.py --before /tmp/before  # and another checkout, side by side

Two shapes of the same Anthropic stream as Envoy hands them to the observer: 20 events in one
chunk (a short answer read at once: `sat_short` in bench/gateway.py) and 500 events one per chunk
(a long answer streamed: `long`). Prints µs per stream, best of --repeat rounds of --number
streams each, for each checkout (each timed in a process of its own).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def events(deltas: int) -> list[bytes]:
    """The emulator's event sequence for a text answer of `deltas` content deltas."""
    out = [b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":'
           b'"message","role":"assistant","model":"glm-4.7","content":[],"usage":{"input_tokens":'
           b'1000,"output_tokens":1}}}\n\n',
           b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
           b'"content_block":{"type":"text","text":""}}\n\n']
    out += [b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":'
            b'{"type":"text_delta","text":"word %d "}}\n\n' % i for i in range(deltas)]
    out += [b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
            b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
            b'"usage":{"output_tokens":%d}}\n\n' % deltas,
            b'event: message_stop\ndata: {"type":"message_stop"}\n\n']
    return out


def measure(number: int, repeat: int) -> dict[str, float]:
    """µs per stream for each shape, with the `extproc` first on sys.path."""
    from extproc.accounting.response_body import ResponseBody
    from extproc.api import Api

    import inspect

    # The third argument is the clock itself since 2026-12-07, a time before (--before checkouts).
    stamp: object = (lambda: 1.0) if "clock" in inspect.signature(ResponseBody.feed).parameters else 1.0
    shapes = {"20 events, 1 chunk": [b"".join(events(16))], "500 events, 1 per chunk": events(495)}
    result: dict[str, float] = {}
    for name, chunks in shapes.items():
        last = len(chunks) - 1

        def one() -> None:
            body = ResponseBody(Api.ANTHROPIC, True, False)
            for i, chunk in enumerate(chunks):
                body.feed(chunk, i == last, stamp)
            assert body.facts.usage.output is not None  # the usage was read: same work both sides

        result[name] = min(timeit.repeat(one, number=number, repeat=repeat)) / number * 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", metavar="DIR", help="another checkout, timed side by side")
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, args.child)
        print(json.dumps(measure(args.number, args.repeat)))
        return
    checkouts = {"this checkout": ROOT} | ({"before": Path(args.before).resolve()} if args.before else {})
    results = {label: child([__file__, "--child", str(path)], args.number, args.repeat)
               for label, path in checkouts.items()}
    print_table("stream", "µs", results)


def child(argv: list[str], number: int, repeat: int) -> dict[str, float]:
    """One side of a side-by-side run: `argv` in a process of its own, its last line JSON."""
    out = subprocess.run([sys.executable, *argv, "--number", str(number), "--repeat", str(repeat)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(row: str, unit: str, results: dict[str, dict[str, float]]) -> None:
    """A markdown table: a row per shape, a column per side."""
    print(f"| {row} | " + " | ".join(f"{label}, {unit}" for label in results) + " |")
    print("|---|" + "---|" * len(results))
    for shape in next(iter(results.values())):
        print(f"| {shape} | " + " | ".join(f"{results[label][shape]:,.1f}" for label in results) + " |")


if __name__ == "__main__":
    main()
