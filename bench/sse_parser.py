"""Benchmark: the SSE parser on one large event arriving in small chunks (issue 11: it must be linear).

    .venv/bin/python bench/sse_parser.py                      # the parser in this checkout
    .venv/bin/python bench/sse_parser.py --rev f3be2d7        # the parser at a git revision, side by side

An 8 MiB `data:` line (a huge tool result, say) in 16 KiB chunks, then the same bytes in one chunk
for reference; the best of --repeat runs each.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extproc.accounting import sse as current  # noqa: E402


def parser_at(rev: str) -> types.ModuleType:
    for path in ("extproc/accounting/sse.py", "extproc/sse.py"):
        found = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True)
        if found.returncode == 0:
            module = types.ModuleType(f"sse_{rev}")
            sys.modules[module.__name__] = module  # dataclasses look their module up
            exec(compile(found.stdout, f"{rev}:{path}", "exec"), module.__dict__)
            return module
    raise SystemExit(f"no SSE parser at {rev}")


def run(module: types.ModuleType, body: bytes, chunk: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        parser = module.SseParser()
        start = time.perf_counter()
        events = 0
        for i in range(0, len(body), chunk):
            events += len(parser.feed(body[i:i + chunk]))
        best = min(best, time.perf_counter() - start)
        assert events == 1, events
    return best


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--rev", help="also time the parser at this git revision")
    args.add_argument("--size-mib", type=int, default=8)
    args.add_argument("--chunk-kib", type=int, default=16)
    args.add_argument("--repeat", type=int, default=3)
    opts = args.parse_args()
    body = b"event: content_block_delta\ndata: " + b"a" * (opts.size_mib << 20) + b"\n\n"
    setups = [("this checkout", current)] + ([(opts.rev, parser_at(opts.rev))] if opts.rev else [])
    print(f"| parser | {opts.size_mib} MiB in {opts.chunk_kib} KiB chunks | in one chunk |")
    print("|---|---|---|")
    for name, module in setups:
        chunked = run(module, body, opts.chunk_kib << 10, opts.repeat)
        whole = run(module, body, len(body), opts.repeat)
        print(f"| {name} | {chunked * 1000:.1f} ms | {whole * 1000:.1f} ms |")


if __name__ == "__main__":
    main()
