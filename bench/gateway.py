"""Gateway benchmark (issue 6): the full gateway against Envoy alone and a pass-through ext_proc.

    .venv/bin/python bench/gateway.py --soak 600       # the whole table + 10 min steady load (~35 min)
    .venv/bin/python bench/gateway.py --quick          # every scenario, fewer requests (~8 min)
    .venv/bin/python bench/gateway.py --only ttft64 --setups floor passthrough gateway   # a part

One emulator (plain http on loopback; TLS would add the same cost to every set-up) serves all the
set-ups, which run side by side, each with its own ports:

- floor:       Envoy alone, the production bootstrap with every ext_proc stripped (bench/envoy_floor.py);
- passthrough: the production bootstrap, unchanged, with bench/passthrough.py on the ext_proc port
               (empty answer to every phase it must answer; same processing modes: the request
               filter, the observer's copies, the attempt filter);
- gateway:     the production bootstrap with the real ext_proc (`python -m extproc serve`), as
               `extproc.local.stack.LocalStack` starts it, the limiter's limits opened wide so it never queues;
- passthrough_inline, gateway_inline: the same two with RESPONSE_PROCESSING=inline (every body
               chunk waits for the ext_proc), for comparison with the default (observe).
- gateway_2proc: the gateway with EXTPROC_PROCESSES=2 (issue 16): an admission process and an
               observer process taking the observer's copies on EXTPROC_OBSERVER_PORT; its ext_proc
               CPU and RSS are both processes' (the admission process and its children).
- passthrough_shadow (only by name, a diagnosis): the pass-through running, at the end of each
               request, the gateway's own Python for one synthetic request in its loop
               (bench/passthrough.py --shadow): what that Python costs live, without gRPC of its own.

With `--redis`, a redis-server is started too and every gateway set-up keeps the limiter's state
there (REDIS_URL, a database each), as replicas sharing one account do; its CPU is not counted.

The floor and pass-through clients send `x-api-key: <emulator key>` themselves (nothing swaps it);
gateway clients send `Authorization: Bearer <worker token>` like Claude Code. For every scenario the
emulator is reconfigured (POST /_emulator/config) and the three set-ups get identical load one
after the other. The client is raw asyncio streams on uvloop (HTTP/1.1 keep-alive, one connection
per open stream), measuring time to the first `content_block_delta` event, whole-request latency
and throughput. ext_proc CPU comes from /proc/<pid>/stat (utime+stime) before/after each point,
resident memory from /proc/<pid>/status (VmRSS, sampled every 0.25 s, max kept).

Every process is started as the local stack starts it (`extproc.local`: `zai-proxy up` and the
integration tests use the same code): the emulator by `start_emulator` (plain http), each ext_proc
by `start_extproc`, each Envoy with `envoy_argv` (plus `--concurrency 2`), all in one
`ProcessGroup`. Each child writes its output straight to `<name>.log` in the run dir, so none of it
passes through this process, whose CPU and event loop are part of what is measured.

Every point is bounded in requests and in seconds; every process started is stopped at the end.
Results: a Markdown table on stdout and JSON in --out (default bench/gateway-last.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BEFORE: Path | None = None  # --before
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from envoy_floor import write_floor, write_gateway  # noqa: E402
from extproc.config import Settings  # noqa: E402
from extproc.local.processes import (Child, FileSink, ProcessGroup, envoy_binary, free_port,  # noqa: E402
                                     wait_http_ok)
from extproc.local.redis_server import RedisServer, start_redis  # noqa: E402
from extproc.local.stack import Emulator, envoy_argv, start_emulator, start_extproc  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
MARK = b"event: content_block_delta"
PATH = "/api/anthropic/v1/messages?beta=true"
SETUPS = ("floor", "passthrough", "gateway", "gateway_2proc", "passthrough_inline", "gateway_inline",
          "gateway_before", "passthrough_shadow")
# gateway_before: the ext_proc of another checkout (--before DIR), for before/after in one run;
# passthrough_shadow: a diagnosis (what the gateway's Python costs live), asked for by name.
DEFAULT_SETUPS = tuple(s for s in SETUPS if s not in ("gateway_before", "passthrough_shadow"))
ENVOY_ARGS = ("--concurrency", "2")  # after the local stack's Envoy command line
EMULATOR_ARGS = ("--log-level", "WARNING", "--input-tokens", "1000")


# --------------------------------------------------------------------------------- scenarios

@dataclass
class Scenario:
    name: str
    what: str
    events: int
    interval: float
    concurrency: int
    body: str  # "short" | "large"
    quick: tuple[int, float]  # (max requests, max seconds)
    full: tuple[int, float]


SCENARIOS = [
    Scenario("c1", "short, 20 ev @ 20 ms, 1 open stream", 20, 0.02, 1, "short", (20, 12), (100, 60)),
    Scenario("ttft64", "short, 20 ev @ 20 ms, 64 open streams (TTFT target)", 20, 0.02, 64, "short",
             (640, 20), (3200, 60)),
    Scenario("c256", "short, 20 ev @ 20 ms, 256 open streams", 20, 0.02, 256, "short", (1024, 20), (5120, 60)),
    Scenario("c1000", "short, 20 ev @ 20 ms, 1,000 open streams", 20, 0.02, 1000, "short",
             (2000, 30), (6000, 90)),
    Scenario("sat_short", "short, 20 ev back to back, 64 streams (saturation)", 20, 0.0, 64, "short",
             (100000, 12), (100000, 40)),
    Scenario("long", "long, 500 ev @ 5 ms, 16 open streams", 500, 0.005, 16, "short", (48, 20), (192, 60)),
    Scenario("large", "300 KB conversation, 20 ev back to back, 16 streams", 20, 0.0, 16, "large",
             (160, 20), (800, 60)),
]


# --------------------------------------------------------------------------------- processes

def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def children(pid: int) -> list[int]:
    """An ext_proc's own children (EXTPROC_PROCESSES: its observer processes)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its children (utime+stime of each, alive now)."""
    return cpu_seconds(pid) + sum(cpu_seconds(c) for c in children(pid))


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children."""
    total = 0.0
    for one in [pid, *children(pid)]:
        for line in Path(f"/proc/{one}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total if total else float("nan")


@dataclass
class Setup:
    name: str
    port: int
    headers: str  # the credential header line(s)
    envoy_admin_port: int
    extproc: Child | None = None
    envoy: Child | None = None


def base_env(run_dir: Path, name: str, emulator: Emulator) -> dict[str, str]:
    scrub = ("ZAI_API_KEY_FILE", "WORKER_KEYS_FILE", "CANARY_WEIGHT", "REDIS_URL", "WORKER_BUDGETS_FILE",
             "EXTPROC_PROCESSES", "EXTPROC_OBSERVER_PORT", "CANARY_EXTPROC_OBSERVER_PORT",
             "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")
    env = {k: v for k, v in os.environ.items() if k not in scrub}
    env |= {
        "PYTHONUNBUFFERED": "1", "NO_PROXY": "*",
        "ZAI_API_KEY": emulator.key,
        "ZAI_TARGET_URL": f"{emulator.url}/api/anthropic",
        "ZAI_OPENAI_URL": f"{emulator.url}/api/coding/paas/v4",
        "ENVOY_ROUTES_DIR": str(run_dir / name / "routes"),
        "LIMITER_STATE_FILE": str(run_dir / name / "limiter.json"),
        "LISTEN_PORT": str(free_port()), "ENVOY_ADMIN_PORT": str(free_port()),
        "EXTPROC_GRPC_PORT": str(free_port()), "EXTPROC_ADMIN_PORT": str(free_port()),
        "CANARY_EXTPROC_GRPC_PORT": str(free_port()), "CANARY_EXTPROC_ADMIN_PORT": str(free_port()),
        "PRODUCTION_LISTEN_PORT": str(free_port()), "CANARY_LISTEN_PORT": str(free_port()),
        "LOG_LEVEL": "INFO",
        # The bench measures overhead, not the limiter's queue: limits far above the load.
        "RATE_LIMIT_INITIAL": "5000", "RATE_LIMIT_MAX": "5000", "RATE_LIMIT_MIN": "1",
        "START_RATE_INITIAL": "10000000", "START_RATE_MAX": "10000000", "QUEUE_MAX": "10000",
    }
    return env


async def start_setups(group: ProcessGroup, run_dir: Path, emulator: Emulator,
                       names: list[str], redis: RedisServer | None = None) -> dict[str, Setup]:
    setups: dict[str, Setup] = {}
    for index, name in enumerate(SETUPS):
        if name not in names and name != "floor":  # the floor is every comparison's base
            continue
        env = base_env(run_dir, name, emulator)
        if redis is not None and name.startswith("gateway"):
            # The limiter's state in Redis, as with several replicas; a database per set-up.
            env["REDIS_URL"] = redis.database(index)
        if name.endswith("_inline"):
            env["RESPONSE_PROCESSING"] = "inline"
        if name == "gateway_2proc":
            env |= {"EXTPROC_PROCESSES": "2", "EXTPROC_OBSERVER_PORT": str(free_port())}
        settings = Settings.from_env(env)
        config = run_dir / name / "envoy.yaml"
        if name == "floor":
            write_floor(settings, config)
            headers = f"x-api-key: {emulator.key}\r\n"
        else:
            write_gateway(settings, config)
            headers = f"x-api-key: {emulator.key}\r\n" if name.startswith("passthrough") else \
                "authorization: Bearer bench-worker-token\r\n"
        setup = Setup(name, settings.listen_port, headers, settings.envoy_admin_port)
        if name.startswith("passthrough"):
            setup.extproc = await start_extproc(
                group, name, env, log_file=run_dir / f"{name}.log",
                argv=[sys.executable, str(ROOT / "bench" / "passthrough.py"),
                      "--port", str(settings.extproc_grpc_port),
                      *(["--observer-port", str(settings.extproc_observer_port)]
                        if settings.extproc_observer_port else []),
                      *(["--shadow"] if name == "passthrough_shadow" else [])])
        elif name.startswith("gateway"):
            # gateway_before: the same command, importing `extproc` from the other checkout first.
            argv = None if name != "gateway_before" else [
                sys.executable, "-c", f"import sys; sys.path.insert(0, {str(BEFORE)!r}); "
                "from extproc.cli import main; sys.argv[1:] = ['serve']; raise SystemExit(main())"]
            setup.extproc = await start_extproc(
                group, f"extproc-{name}", env, argv=argv, log_file=run_dir / f"extproc-{name}.log",
                health_url=f"http://127.0.0.1:{settings.extproc_admin_port}/health", timeout=60)
        setup.envoy = await group.start(f"envoy-{name}", envoy_argv(config, "warning", ENVOY_ARGS), env,
                                        log_file=run_dir / f"envoy-{name}.log")
        setups[name] = setup
    for setup in setups.values():
        assert setup.envoy
        await wait_http_ok(f"http://127.0.0.1:{setup.envoy_admin_port}/ready", 60, setup.envoy)
        await wait_serving(setup, 60)
    return setups


async def wait_serving(setup: Setup, timeout: float) -> None:
    """Until a request through the set-up streams events (its Envoy finds the ext_proc healthy)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        for child in (setup.envoy, setup.extproc):
            if child is not None and child.process.returncode is not None:
                raise RuntimeError(f"{child.name} exited with code {child.process.returncode}; "
                                   f"see {child.name}.log in the run dir")
        try:
            res = await one_request(setup, request_bytes(setup, short_body(0)), 10)
            if res.status == 200 and res.events > 0:
                return
            last = f"HTTP {res.status}, {res.events} events"
        except Exception as exc:  # noqa: BLE001 - not up yet: try again
            last = type(exc).__name__
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{setup.name} set-up not serving after {timeout:.0f}s ({last})")


# --------------------------------------------------------------------------------- client

@dataclass
class Result:
    status: int = 0
    ttft: float | None = None
    total: float = 0.0
    events: int = 0
    error: str | None = None
    keep: bool = True
    start: float = 0.0
    end: float = 0.0


def short_body(i: int) -> bytes:
    return json.dumps({
        "model": "glm-4.7", "max_tokens": 1024, "stream": True,
        "system": "You are a coding agent. Answer briefly.",
        "messages": [{"role": "user", "content": f"Request {i}: say hello and explain the next step."}],
    }, separators=(",", ":")).encode()


_LARGE_BASE: bytes | None = None


def large_body(i: int) -> bytes:
    """A ~300 KB Claude-Code-like conversation (bench/token_estimate.py's generator) plus a new
    user turn per request, as an agent resends its conversation each turn."""
    global _LARGE_BASE
    if _LARGE_BASE is None:
        from token_estimate import conversation
        _LARGE_BASE = conversation(300_000)[1]
        assert _LARGE_BASE.endswith(b"]}")
    turn = json.dumps({"role": "user", "content": f"Request {i}: run the tests again and fix what fails."})
    return _LARGE_BASE[:-2] + b"," + turn.encode() + b"]}"


def request_bytes(setup: Setup, body: bytes) -> bytes:
    head = (f"POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1:{setup.port}\r\ncontent-type: application/json\r\n"
            f"anthropic-version: 2023-06-01\r\nuser-agent: zai-proxy-bench\r\n{setup.headers}"
            f"content-length: {len(body)}\r\n\r\n")
    return head.encode() + body


class Conn:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def ensure(self) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def exchange(conn: Conn, payload: bytes) -> Result:
    await conn.ensure()
    reader, writer = conn.reader, conn.writer
    assert reader and writer
    res = Result(start=time.perf_counter())
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    res.status = int(lines[0].split()[1])
    chunked, length = False, 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"content-length":
            length = int(value)
        elif name == b"connection" and b"close" in value.lower():
            res.keep = False
    tail = b""
    keep = len(MARK) - 1
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            data = tail + (await reader.readexactly(size + 2))[:-2]
            found = data.count(MARK)
            if found:
                if res.ttft is None:
                    res.ttft = time.perf_counter() - res.start
                res.events += found
            tail = data[-keep:]
    elif length:
        data = await reader.readexactly(length)
        res.events = data.count(MARK)
    res.end = time.perf_counter()
    res.total = res.end - res.start
    if res.status != 200:
        res.error = f"HTTP {res.status}"
    return res


async def one_request(setup: Setup, payload: bytes, timeout: float) -> Result:
    conn = Conn(setup.port)
    try:
        return await asyncio.wait_for(exchange(conn, payload), timeout)
    finally:
        conn.close()


@dataclass
class Point:
    results: list[Result] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0
    extproc_cpu: float | None = None
    admission_cpu: float | None = None  # the ext_proc's own process, without its children
    envoy_cpu: float = 0.0
    emulator_cpu: float = 0.0
    client_cpu: float = 0.0
    extproc_rss_max: float | None = None
    extproc_rss_end: float | None = None


async def run_point(setup: Setup, sc: Scenario, max_requests: int, max_seconds: float,
                    emulator: Child, request_timeout: float) -> Point:
    body_fn = large_body if sc.body == "large" else short_body
    point = Point()
    issued = 0
    deadline = time.monotonic() + max_seconds
    ext = setup.extproc
    rss_max = [rss_mb(ext.pid) if ext else 0.0]
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        while not stop_sampling.is_set():
            if ext:
                rss_max[0] = max(rss_max[0], rss_mb(ext.pid))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop_sampling.wait(), 0.25)

    async def worker(k: int) -> None:
        nonlocal issued
        conn = Conn(setup.port)
        try:
            # Open streams in steady state, not in lockstep: closed-loop workers that all start
            # together stay in phase (equal stream lengths), so every ext_proc message of a round
            # would arrive in one burst. Real workers' streams start independently; spread the
            # first starts over one stream's length.
            await asyncio.sleep(k * sc.events * sc.interval / sc.concurrency)
            while time.monotonic() < deadline and issued < max_requests:
                i = issued
                issued += 1
                payload = request_bytes(setup, body_fn(i))
                try:
                    res = await asyncio.wait_for(exchange(conn, payload), request_timeout)
                except Exception as exc:  # noqa: BLE001 - every failure is counted, the loop goes on
                    conn.close()
                    key = type(exc).__name__
                    point.errors[key] = point.errors.get(key, 0) + 1
                    continue
                point.results.append(res)
                if res.error:
                    point.errors[res.error] = point.errors.get(res.error, 0) + 1
                if not res.keep:
                    conn.close()
        finally:
            conn.close()

    cpu0 = tree_cpu_seconds(ext.pid) if ext else None
    own0 = cpu_seconds(ext.pid) if ext else None
    assert setup.envoy
    env0, emu0, cli0 = cpu_seconds(setup.envoy.pid), cpu_seconds(emulator.pid), time.process_time()
    sampler = asyncio.create_task(sample())
    t0 = time.perf_counter()
    workers = [asyncio.create_task(worker(k)) for k in range(sc.concurrency)]
    done, pending = await asyncio.wait(workers, timeout=max_seconds + request_timeout + 5)
    for task in pending:  # a hard stop: nothing outlives the point
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
        point.errors["cancelled at hard stop"] = len(pending)
    point.wall = time.perf_counter() - t0
    stop_sampling.set()
    await sampler
    if ext:
        point.extproc_cpu = tree_cpu_seconds(ext.pid) - cpu0  # type: ignore[operator]
        point.admission_cpu = cpu_seconds(ext.pid) - own0  # type: ignore[operator]
        point.extproc_rss_max = rss_max[0]
        point.extproc_rss_end = rss_mb(ext.pid)
    point.envoy_cpu = cpu_seconds(setup.envoy.pid) - env0
    point.emulator_cpu = cpu_seconds(emulator.pid) - emu0
    point.client_cpu = time.process_time() - cli0
    return point


# --------------------------------------------------------------------------------- emulator

async def emulator_config(port: int, **options: Any) -> None:
    body = json.dumps(options).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST /_emulator/config HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        status = await asyncio.wait_for(reader.readline(), 5)
        if b" 200 " not in status:
            raise RuntimeError(f"emulator config {options}: {status!r} {await reader.read()!r}")
    finally:
        writer.close()


# --------------------------------------------------------------------------------- figures

def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(point: Point) -> dict[str, Any]:
    ok = [r for r in point.results if r.status == 200]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    total = [r.total for r in ok]
    events = sum(r.events for r in ok)
    span = (max(r.end for r in ok) - min(r.start for r in ok)) if ok else float("nan")
    out: dict[str, Any] = {
        "requests": len(ok), "errors": point.errors, "events": events, "wall_s": round(point.wall, 2),
        "ttft_p50_ms": pct(ttft, 0.5) * 1e3, "ttft_p99_ms": pct(ttft, 0.99) * 1e3,
        "total_p50_ms": pct(total, 0.5) * 1e3, "total_p99_ms": pct(total, 0.99) * 1e3,
        "req_per_s": len(ok) / span if ok else 0.0, "events_per_s": events / span if ok else 0.0,
        "envoy_cpu_s": round(point.envoy_cpu, 2), "emulator_cpu_s": round(point.emulator_cpu, 2),
        "client_cpu_s": round(point.client_cpu, 2),
    }
    if point.extproc_cpu is not None and ok:
        out |= {"extproc_cpu_s": round(point.extproc_cpu, 3),
                "extproc_own_process_cpu_s": round(point.admission_cpu or 0.0, 3),
                "extproc_cpu_ms_per_1k_req": point.extproc_cpu / len(ok) * 1e6,
                "extproc_cpu_us_per_event": point.extproc_cpu / max(events, 1) * 1e6,
                "extproc_rss_max_mb": round(point.extproc_rss_max or 0, 1),
                "extproc_rss_end_mb": round(point.extproc_rss_end or 0, 1)}
    return out


def median_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric field's median over the rounds of one point (the rounds themselves kept)."""
    if len(rounds) == 1:
        return rounds[0]
    out: dict[str, Any] = {}
    for key, value in rounds[0].items():
        values = [r[key] for r in rounds if key in r]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            middle = statistics.median(values)
            # A count stays whole when its median is; the rest keeps three decimals.
            out[key] = int(middle) if all(isinstance(v, int) for v in values) and middle == int(middle) \
                else round(middle, 3)
        else:
            out[key] = value
    kinds = {kind for r in rounds for kind in r["errors"]}
    out["errors"] = {kind: statistics.median(r["errors"].get(kind, 0) for r in rounds) for kind in kinds}
    out["rounds"] = rounds
    return out


def f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    rows = ["| scenario | set-up | ok req | errors | TTFT p50 / p99 ms | TTFT added p50 / p99 ms | "
            "whole req p50 / p99 ms | req/s | events/s | ext_proc CPU ms / 1k req | "
            "ext_proc CPU µs / event | ext_proc RSS max MB | Envoy CPU s | emulator CPU s | client CPU s |",
            "|" + "---|" * 15]
    for sc_name, per_setup in results.items():
        floor = per_setup.get("floor", {})
        for name, s in per_setup.items():
            added = ("–" if name == "floor" or not floor else
                     f"{s['ttft_p50_ms'] - floor['ttft_p50_ms']:+.2f} / {s['ttft_p99_ms'] - floor['ttft_p99_ms']:+.2f}")
            errors = sum(s["errors"].values())
            rows.append(
                f"| {sc_name} | {name} | {s['requests']:,} | {errors} | {f(s['ttft_p50_ms'], 2)} / "
                f"{f(s['ttft_p99_ms'], 2)} | {added} | {f(s['total_p50_ms'])} / {f(s['total_p99_ms'])} | "
                f"{f(s['req_per_s'])} | {f(s['events_per_s'], 0)} | {f(s.get('extproc_cpu_ms_per_1k_req'), 0)} | "
                f"{f(s.get('extproc_cpu_us_per_event'), 1)} | {f(s.get('extproc_rss_max_mb'))} | "
                f"{s['envoy_cpu_s']} | {s['emulator_cpu_s']} | {s['client_cpu_s']} |")
    return "\n".join(rows)


def paired(per_setup: dict[str, dict[str, Any]], a: str, b: str, key: str, diff: bool = False) -> float:
    """a's `key` over b's (or minus, with `diff`): with --rounds, the median of each round's
    pair (measured back to back, so a drift of the shared machine's load cancels), else the one."""
    ra, rb = per_setup[a].get("rounds", [per_setup[a]]), per_setup[b].get("rounds", [per_setup[b]])
    pairs = [(x[key], y[key]) for x, y in zip(ra, rb) if key in x and key in y]
    return statistics.median((x - y) if diff else (x / y) for x, y in pairs)


def targets(results: dict[str, dict[str, dict[str, Any]]], soak: dict[str, Any] | None) -> list[str]:
    """Issue 16's targets, gateway against the minimal pass-through of the same run."""
    lines = []

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"
    for gw, pt in (("gateway", "passthrough"), ("gateway_inline", "passthrough_inline")):
        tag = "" if gw == "gateway" else " [RESPONSE_PROCESSING=inline]"
        t = results.get("ttft64")
        if t and {"floor", gw} <= t.keys():
            p50 = paired(t, gw, "floor", "ttft_p50_ms", diff=True)
            p99 = paired(t, gw, "floor", "ttft_p99_ms", diff=True)
            lines.append(f"- TTFT added over Envoy alone at 64 streams, 20 ms events{tag}: p50 {p50:+.2f} ms "
                         f"(≤ 2) {verdict(p50 <= 2)}, p99 {p99:+.2f} ms (≤ 10) {verdict(p99 <= 10)}")
        if t and {pt, gw} <= t.keys():
            p50 = paired(t, gw, pt, "ttft_p50_ms", diff=True)
            p99 = paired(t, gw, pt, "ttft_p99_ms", diff=True)
            lines.append(f"- TTFT at 64 streams, gateway minus pass-through{tag}: p50 {p50:+.2f} ms (≤ +1) "
                         f"{verdict(p50 <= 1)}, p99 {p99:+.2f} ms (≤ +5) {verdict(p99 <= 5)}")
        s = results.get("sat_short")
        if s and {pt, gw} <= s.keys():
            ratio = paired(s, gw, pt, "req_per_s")
            lines.append(f"- Short-stream throughput, gateway / pass-through{tag}: {s[gw]['req_per_s']:.1f} / "
                         f"{s[pt]['req_per_s']:.1f} req/s, {ratio:.0%} (≥ 90%) {verdict(ratio >= 0.9)}")
        for name, s in results.items():
            if {pt, gw} <= s.keys() and "extproc_cpu_ms_per_1k_req" in s[gw]:
                ratio = paired(s, gw, pt, "extproc_cpu_ms_per_1k_req")
                lines.append(f"- ext_proc CPU per request ({name}), gateway / pass-through{tag}: "
                             f"{s[gw]['extproc_cpu_ms_per_1k_req'] / 1e3:.2f} / "
                             f"{s[pt]['extproc_cpu_ms_per_1k_req'] / 1e3:.2f} ms, {ratio:.2f}x (≤ 1.3x) "
                             f"{verdict(ratio <= 1.3)}")
        if gw == "gateway":
            for name, s in results.items():
                if {"gateway_before", gw} <= s.keys() and "extproc_cpu_ms_per_1k_req" in s[gw]:
                    lines.append(f"- ext_proc CPU per request ({name}), gateway / gateway_before: "
                                 f"{paired(s, gw, 'gateway_before', 'extproc_cpu_ms_per_1k_req'):.2f}x; "
                                 f"req/s {paired(s, gw, 'gateway_before', 'req_per_s'):.2f}x")
                if {"passthrough_shadow", pt, gw} <= s.keys() and "extproc_cpu_ms_per_1k_req" in s[gw]:
                    shadow = paired(s, "passthrough_shadow", pt, "extproc_cpu_ms_per_1k_req", diff=True)
                    whole = paired(s, gw, pt, "extproc_cpu_ms_per_1k_req", diff=True)
                    lines.append(f"- ext_proc CPU per request ({name}), the gateway's Python alone, live "
                                 f"(passthrough_shadow minus pass-through): {shadow / 1e3:+.2f} ms; the "
                                 f"gateway minus pass-through: {whole / 1e3:+.2f} ms")
        c = results.get("c1000", {}).get(gw)
        if c:
            lines.append(f"- ext_proc RSS at 1,000 open streams{tag}: {c['extproc_rss_max_mb']:.1f} MB (≤ 200) "
                         f"{verdict(c['extproc_rss_max_mb'] <= 200)}")
    if soak:
        lines.append(f"- ext_proc RSS growth over a {soak['seconds']:.0f} s soak: {soak['first_mb']:.1f} → "
                     f"{soak['last_mb']:.1f} MB = {soak['growth']:+.1%} (< 5%) {verdict(soak['growth'] < 0.05)}"
                     + ("" if soak["seconds"] >= 600 else " (shorter than the 10 minutes the target asks)"))
    return lines


# --------------------------------------------------------------------------------- main

async def soak_run(setup: Setup, emulator: Child, emu_port: int, seconds: float) -> dict[str, Any]:
    """Steady load (64 streams, 20 events @ 20 ms) on the full gateway; RSS every 10 s."""
    await emulator_config(emu_port, events_per_stream=20, event_interval=0.02, first_event_delay=0.0)
    assert setup.extproc
    sc = Scenario("soak", "", 20, 0.02, 64, "short", (0, 0), (0, 0))
    samples: list[tuple[float, float]] = []
    # Warm up (caches, pools, allocator arenas), then measure growth from the first sample.
    await run_point(setup, sc, 10**9, min(30.0, seconds / 5), emulator, 60)
    task = asyncio.create_task(run_point(setup, sc, 10**9, seconds, emulator, 60))
    t0 = time.monotonic()
    while not task.done():
        samples.append((time.monotonic() - t0, rss_mb(setup.extproc.pid)))
        await asyncio.wait([task], timeout=10)
    point = await task
    samples.append((time.monotonic() - t0, rss_mb(setup.extproc.pid)))
    first, last = samples[0][1], samples[-1][1]
    return {"seconds": seconds, "first_mb": first, "last_mb": last, "max_mb": max(m for _, m in samples),
            "growth": (last - first) / first, "samples": samples, "summary": summarize(point)}


def machine() -> dict[str, str]:
    env_ver = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    import grpc
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "python": platform.python_version(),
            "grpcio": grpc.__version__, "envoy": env_ver.split("version:")[-1].strip()}


async def main_async(args: argparse.Namespace) -> int:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    run_dir = Path(tempfile.mkdtemp(prefix="zai-bench-"))
    sink = FileSink(run_dir)  # the emulator's few lines (its port; warnings); the others write their own
    group = ProcessGroup(sink)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    soak = None
    redis: RedisServer | None = None
    scenarios = [s for s in SCENARIOS if not args.only or s.name in args.only]
    try:
        emu = await start_emulator(group, os.environ, EMULATOR_ARGS)
        emulator, emu_port = emu.child, emu.port
        redis = start_redis(run_dir) if args.redis else None
        setups = await start_setups(group, run_dir, emu, args.setups, redis)
        print(f"# run dir {run_dir}; pids: " + ", ".join(f"{c.name}={c.pid}" for c in group.children), flush=True)
        for sc in scenarios:
            max_requests, max_seconds = sc.quick if args.quick else sc.full
            await emulator_config(emu_port, events_per_stream=sc.events, event_interval=sc.interval,
                                  first_event_delay=0.0)
            results[sc.name] = {}
            if args.concurrency:
                sc.concurrency = args.concurrency
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in args.setups}
            for order in range(args.rounds):
                # Odd rounds run the set-ups in reverse: neither one always follows the other.
                for name in (args.setups if order % 2 == 0 else args.setups[::-1]):
                    setup = setups[name]
                    spy = None
                    if args.profile and setup.extproc:
                        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-d",
                                                str(int(args.profile)), "-f", "raw",
                                                # --native (C frames too) must pause the process per sample
                                                *(["-r", "100", "--native"] if os.environ.get("ZAI_BENCH_NATIVE")
                                                  else ["-r", "200", "--nonblocking"]),
                                                "-o", str(run_dir / f"profile-{sc.name}-{name}-{order}.txt"),
                                                "--pid", str(setup.extproc.pid)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    # A short warm-up at the same shape, then the measured point.
                    await run_point(setup, sc, min(sc.concurrency, 64), 5, emulator, 30)
                    point = await run_point(setup, sc, max_requests, max_seconds, emulator,
                                            request_timeout=sc.events * sc.interval + 60)
                    rounds[name].append(summary := summarize(point))
                    results[sc.name][name] = median_summary(rounds[name])
                    if spy is not None:
                        try:
                            spy.wait(args.profile + 30)
                        except subprocess.TimeoutExpired:
                            spy.kill()
                            spy.wait()
                    print(f"{sc.name:>9} {name:>13} {order + 1}/{args.rounds}: " + json.dumps(
                        {k: (round(v, 2) if isinstance(v, float) else v) for k, v in summary.items()}), flush=True)
                    await asyncio.sleep(1)  # let connections close and the ext_proc settle
        if args.soak:
            soak = await soak_run(setups[args.soak_setup], emulator, emu_port, args.soak)
            soak["setup"] = args.soak_setup
            print("soak: " + json.dumps({k: v for k, v in soak.items() if k != "samples"}), flush=True)
    finally:
        await group.stop_all(timeout=8)
        if redis is not None:
            redis.stop()
        sink.close()
    info = machine()
    report = {"machine": info, "mode": "quick" if args.quick else "full", "results": results, "soak": soak,
              "scenarios": {s.name: s.what for s in scenarios}}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print()
    print("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print()
    for s in scenarios:
        print(f"- `{s.name}`: {s.what}; {'quick' if args.quick else 'full'}: "
              f"≤ {(s.quick if args.quick else s.full)[0]:,} requests / ≤ {(s.quick if args.quick else s.full)[1]:.0f} s")
    print()
    print(table(results))
    print()
    print("\n".join(targets(results, soak)))
    if args.redis:  # each time a set-up's limiter lost the shared state (FailoverStore's warning)
        print("- left Redis for local limits: " + ", ".join(
            f"{name} {(run_dir / f'extproc-{name}.log').read_text(errors='replace').count('using local limits')}x"
            for name in args.setups if name.startswith("gateway")))
    print(f"\nlogs: {run_dir}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="Gateway benchmark: floor vs pass-through vs full gateway.")
    parser.add_argument("--quick", action="store_true", help="fewer requests per point (a few minutes)")
    parser.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                        help="after the scenarios, steady load on the full gateway for SECONDS (600 = target)")
    parser.add_argument("--soak-setup", default="gateway", choices=[s for s in SETUPS if s != "floor"],
                        help="the set-up the soak loads (default: gateway)")
    parser.add_argument("--only", nargs="*", default=[], help="scenario names to run (default: all)")
    parser.add_argument("--setups", nargs="*", default=list(DEFAULT_SETUPS), choices=SETUPS,
                        help="set-ups to load (default: all; the *_inline ones "
                             "run with RESPONSE_PROCESSING=inline)")
    parser.add_argument("--concurrency", type=int, default=0, help="override every scenario's concurrency")
    parser.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                        help="py-spy record each set-up's ext_proc for SECONDS at the start of each "
                             "measured gateway point (collapsed stacks in the run dir; needs py-spy)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each point this many times, set-ups interleaved (every other "
                             "round in reverse order); tables show each field's median")
    parser.add_argument("--redis", action="store_true",
                        help="start a redis-server and give every gateway set-up REDIS_URL (the "
                             "limiter's state shared, as with several replicas)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "gateway-last.json"))
    parser.add_argument("--before", metavar="DIR", default=None,
                        help="a checkout of an earlier revision (git worktree add DIR REV): set-up "
                             "gateway_before runs its ext_proc, with this checkout's Envoy config")
    args = parser.parse_args()
    global BEFORE
    if "gateway_before" in args.setups:
        if not args.before or not (Path(args.before) / "extproc" / "cli.py").is_file():
            parser.error("gateway_before needs --before DIR, a checkout with extproc/cli.py")
        BEFORE = Path(args.before).resolve()
    try:
        import uvloop
        return uvloop.run(main_async(args))
    except ImportError:  # pragma: no cover
        return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
