"""Dashboard benchmark (issue 14): what `zai-proxy dashboard` costs.

    .venv/bin/python bench/dashboard.py                 # live 120 s + 31 simulated days (~8 min)
    .venv/bin/python bench/dashboard.py --quick         # live 45 s + 3 simulated days (~1 min)
    .venv/bin/python bench/dashboard.py --only live     # or: --only history

1. live: the local stack as `zai-proxy up` starts it (`extproc.local.stack.LocalStack`: emulator,
   both variants with --replicas ext_procs each, Envoy, the dashboard scraping every ext_proc at
   its default 5 s interval), under bench/gateway.py's `ttft64` load (64 open streams, 20 events
   @ 20 ms; its raw asyncio client), through the split listener (50 % canary), from --workers
   distinct worker keys (so the status document carries that many workers), with --viewers live
   viewers on /api/events. Measured: the dashboard's CPU (utime+stime from /proc, as % of one core)
   and RSS (VmRSS sampled every 0.5 s) while it collects; how late each update reaches a viewer
   after its collection time; one ext_proc's /metrics (what each scrape costs it); the API's
   answer times.
2. history: `extproc.dashboard.history.History` driven by an injected clock through --days
   simulated days at 5 s intervals, with a fleet's worth of series (both variants; --workers
   workers finishing a request every 30 s each, 12 busy hours a day); the file's size at the end,
   the cost of writing one interval, and the status document's and charts' query times on the
   full history.

Every process started is stopped at the end. Results: Markdown on stdout, JSON in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gateway import Conn, cpu_seconds, exchange, rss_mb, short_body  # noqa: E402
from extproc.dashboard import panels  # noqa: E402
from extproc.dashboard.history import History, VariantTick  # noqa: E402
from extproc.local.processes import FileSink, free_port  # noqa: E402
from extproc.local.stack import LocalStack  # noqa: E402

PATH = "/api/anthropic/v1/messages?beta=true"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


# ------------------------------------------------------------------------------------ live

async def load(port: int, workers: int, streams: int, seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    done, errors = 0, 0

    async def stream(k: int) -> None:
        nonlocal done, errors
        conn = Conn(port)
        await asyncio.sleep(k * 0.4 / streams)  # 20 events @ 20 ms: spread the starts
        i = k
        while time.monotonic() < deadline:
            body = short_body(i)
            head = (f"POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
                    f"anthropic-version: 2023-06-01\r\nauthorization: Bearer bench-worker-{i % workers:03d}\r\n"
                    f"content-length: {len(body)}\r\n\r\n").encode()
            i += streams
            try:
                res = await asyncio.wait_for(exchange(conn, head + body), 30)
            except Exception:  # noqa: BLE001 - counted
                conn.close()
                errors += 1
                continue
            if res.status == 200:
                done += 1
            else:
                errors += 1
            if not res.keep:
                conn.close()
        conn.close()

    await asyncio.gather(*(stream(k) for k in range(streams)))
    return {"requests": done, "errors": errors, "req_per_s": done / seconds}


async def viewer(url: str, until: float, lags: list[float]) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/api/events", timeout=aiohttp.ClientTimeout(total=None)) as resp:
            event = None
            while time.time() < until:
                try:
                    line = await asyncio.wait_for(resp.content.readline(), max(0.1, until - time.time()))
                except asyncio.TimeoutError:
                    break
                if line.startswith(b"event: "):
                    event = line[7:].strip()
                elif line.startswith(b"data: ") and event == b"update":
                    lags.append(time.time() - json.loads(line[6:])["time"])


async def timed_get(session: aiohttp.ClientSession, url: str, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        async with session.get(url) as resp:
            await resp.read()
            assert resp.status == 200, (url, resp.status)
        times.append((time.perf_counter() - t0) * 1000)
    return pct(times, 0.5)


async def live(args: argparse.Namespace) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix="zai-bench-dashboard-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZAI_", "HTTP", "http", "DASHBOARD_"))}
    env |= {
        "NO_PROXY": "*", "CANARY_WEIGHT": "50", "LOG_LEVEL": "WARNING",
        "ENVOY_ROUTES_DIR": str(run_dir / "routes"), "LIMITER_STATE_FILE": str(run_dir / "limiter.json"),
        "DASHBOARD_DB": str(run_dir / "dashboard.sqlite3"), "DASHBOARD_PORT": str(free_port()),
        "RATE_LIMIT_INITIAL": "5000", "RATE_LIMIT_MAX": "5000", "START_RATE_INITIAL": "10000000",
        "START_RATE_MAX": "10000000", "QUEUE_MAX": "10000", "WORKER_LABEL_LIMIT": str(args.workers + 10),
        **{k: str(free_port()) for k in ("LISTEN_PORT", "ENVOY_ADMIN_PORT", "EXTPROC_GRPC_PORT",
                                          "EXTPROC_ADMIN_PORT", "CANARY_EXTPROC_GRPC_PORT",
                                          "CANARY_EXTPROC_ADMIN_PORT", "PRODUCTION_LISTEN_PORT",
                                          "CANARY_LISTEN_PORT")},
    }
    sink = FileSink(run_dir)
    stack = LocalStack(env, run_dir, sink, emulator_args=["--events-per-stream", "20", "--event-interval",
                                                           "0.02", "--first-event-delay", "0",
                                                           "--log-level", "WARNING"],
                       variants=("production", "canary"), replicas=args.replicas, dashboard=True)
    out: dict[str, Any] = {"replicas_per_variant": args.replicas, "workers": args.workers,
                           "viewers": args.viewers, "seconds": args.live_seconds, "run_dir": str(run_dir)}
    try:
        await stack.start(timeout=60)
        dash = next(c for c in stack.group.children if c.name == "dashboard")
        url = stack.dashboard_url
        # Warm: every worker once, so the document has them all; then an idle baseline.
        await load(stack.settings.listen_port, args.workers, args.workers, 3)
        await asyncio.sleep(6)
        idle_cpu0, t0 = cpu_seconds(dash.pid), time.monotonic()
        await asyncio.sleep(20)
        out["idle_cpu_percent"] = 100 * (cpu_seconds(dash.pid) - idle_cpu0) / (time.monotonic() - t0)
        out["idle_rss_mb"] = rss_mb(dash.pid)

        until = time.time() + args.live_seconds
        lags: list[float] = []
        viewers = [asyncio.create_task(viewer(url, until, lags)) for _ in range(args.viewers)]
        rss: list[float] = []
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                rss.append(rss_mb(dash.pid))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)

        sampler = asyncio.create_task(sample())
        cpu0, t0 = cpu_seconds(dash.pid), time.monotonic()
        traffic = await load(stack.settings.listen_port, args.workers, 64, args.live_seconds)
        wall = time.monotonic() - t0
        cpu = cpu_seconds(dash.pid) - cpu0
        await asyncio.gather(*viewers)
        stop.set()
        await sampler
        out |= {"load": traffic, "cpu_percent": 100 * cpu / wall, "rss_start_mb": rss[0],
                "rss_max_mb": max(rss), "rss_end_mb": rss[-1],
                "update_lag_ms_p50": 1000 * pct(lags, 0.5), "update_lag_ms_max": 1000 * max(lags),
                "updates_per_viewer": len(lags) / max(1, args.viewers)}
        admin = f"http://127.0.0.1:{stack.settings.extproc_admin_port}"
        async with aiohttp.ClientSession() as session:
            out["api_ms"] = {
                "status": await timed_get(session, f"{url}/api/status"),
                "status_7d": await timed_get(session, f"{url}/api/status?range=7d"),
                "series_24h": await timed_get(session, f"{url}/api/series?name=latency.p95&range=24h"),
                "extproc_metrics": await timed_get(session, f"{admin}/metrics"),
            }
            async with session.get(f"{admin}/metrics") as resp:
                out["extproc_metrics_kb"] = len(await resp.read()) / 1024
            async with session.get(f"{url}/api/status") as resp:
                out["status_doc_kb"] = len(await resp.read()) / 1024
    finally:
        await stack.stop()
        sink.close()
    return out


# --------------------------------------------------------------------------------- history

def simulate(days: int, workers: int, path: Path, seed: int = 7) -> dict[str, Any]:
    """`days` of 5 s intervals into a History, as the collector would write them."""
    rng = random.Random(seed)
    interval, t0 = 5, 1_800_000_000
    clock = [float(t0)]
    history = History(path, interval, clock=lambda: clock[0], durable=False)
    models = ("glm-4.7", "glm-4.5-air")
    names = [f"worker-{i:03d}" for i in range(workers)]
    write_times: list[float] = []
    for k in range(days * 86400 // interval):
        t = t0 + k * interval
        clock[0] = t
        busy = (t - t0) % 86400 < 12 * 3600
        ticks = {}
        for variant, share in (("production", 0.9), ("canary", 0.1)):
            inc: dict[tuple[str, ...], float] = {}
            gauges = {("in_flight",): 0.0, ("limit",): 4.0, ("queued",): 0.0,
                      ("quota", "5h"): 0.4, ("quota", "weekly"): 0.2, ("reset", "5h"): t + 3600.0,
                      ("reset", "weekly"): t + 86400.0}
            if busy:
                for name in names:
                    if rng.random() >= share * interval / 30:  # a request every 30 s per worker
                        continue
                    model = models[0] if rng.random() < 0.8 else models[1]
                    tokens = {"input": rng.randint(200, 4000), "output": rng.randint(50, 2000),
                              "cache_read": rng.randint(0, 60000), "cache_write": rng.randint(0, 3000)}
                    for direction, n in tokens.items():
                        inc[("w.tok", name, model, direction)] = inc.get(("w.tok", name, model, direction), 0) + n
                        inc[("tok", model, direction)] = inc.get(("tok", model, direction), 0) + n
                    inc[("w.req", name, model, "2xx")] = inc.get(("w.req", name, model, "2xx"), 0) + 1
                    inc[("req", "2xx")] = inc.get(("req", "2xx"), 0) + 1
                    inc[("w.cost", name, model)] = inc.get(("w.cost", name, model), 0) + 0.01
                    inc[("cost", model)] = inc.get(("cost", model), 0) + 0.01
                    le = rng.choice(("5.0", "10.0", "20.0", "30.0", "60.0"))
                    inc[("dur", le)] = inc.get(("dur", le), 0) + 1
                    inc[("ttft", rng.choice(("0.5", "0.75", "1.0", "1.5")))] = 1
                    inc[("qwait", "0.0")] = inc.get(("qwait", "0.0"), 0) + 1
                gauges[("in_flight",)] = float(rng.randint(0, 4))
            ticks[variant] = VariantTick(inc, gauges, interval)
        started = time.perf_counter()
        history.record(t, ticks)
        write_times.append(time.perf_counter() - started)
    now = clock[0]
    out: dict[str, Any] = {"days": days, "workers": workers, "intervals": len(write_times),
                           "write_ms_p50": 1000 * pct(write_times, 0.5),
                           "write_ms_p99": 1000 * pct(write_times, 0.99),
                           "write_ms_max": 1000 * max(write_times)}
    history.maintain(now)
    history._shrink(force=True)
    out["rows"] = history.row_counts()
    out["file_mb"] = history.file_bytes() / 2**20
    out["used_mb"] = history.used_bytes() / 2**20
    live = panels.Live("extproc", ["production", "canary"])
    for name, seconds in (("24h", 86400), ("7d", 7 * 86400), ("30d", 30 * 86400)):
        started = time.perf_counter()
        panels.status(history, now, live, seconds)
        out[f"status_{name}_ms"] = 1000 * (time.perf_counter() - started)
        started = time.perf_counter()
        panels.series(history, "latency.p95", ["production", "canary"], seconds, now, interval)
        out[f"series_{name}_ms"] = 1000 * (time.perf_counter() - started)
    history.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("live", "history"))
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--viewers", type=int, default=20)
    parser.add_argument("--live-seconds", type=float, default=None)
    parser.add_argument("--days", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "dashboard-last.json"))
    args = parser.parse_args()
    args.live_seconds = args.live_seconds or (45 if args.quick else 120)
    args.days = args.days or (3 if args.quick else 31)
    results: dict[str, Any] = {"machine": {"nproc": os.cpu_count(), "python": platform.python_version()}}
    if args.only in (None, "live"):
        results["live"] = asyncio.run(live(args))
        print(json.dumps(results["live"], indent=1), flush=True)
    if args.only in (None, "history"):
        with tempfile.TemporaryDirectory(prefix="zai-bench-history-") as tmp:
            results["history"] = simulate(args.days, args.workers, Path(tmp) / "history.sqlite3")
        print(json.dumps(results["history"], indent=1), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
