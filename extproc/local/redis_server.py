"""A real `redis-server` on loopback, for the tests and the benchmarks: a free port, a working
directory, no persistence, and it dies with the process that started it.

It can be stopped (killed, like a crash) and started again on the same port, or paused (a hang),
for the failover tests (`tests/redis_server.py` holds their fixtures).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from extproc.lifecycle import die_with_parent
from extproc.local.processes import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.database(0)

    def database(self, number: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{number}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 5.0) -> "RedisServer":
        """Start (or restart) the server on this object's port; returns once it answers PING."""
        assert not self.running, "already running"
        log = open(self.workdir / "redis.log", "ab")
        self._proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", ""],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # If the test run or benchmark is killed, the server goes down with it.
            preexec_fn=lambda: die_with_parent(signal.SIGKILL))
        log.close()
        deadline = time.monotonic() + timeout
        while not _answers(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{self.log_text()}")
            time.sleep(0.01)
        return self

    def stop(self, graceful: bool = False) -> None:
        """Kill the server (a crash, by default) and wait until it is gone. Safe to repeat."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections are accepted but never answered, like a hang."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_redis(workdir: Path, attempts: int = 3) -> RedisServer:
    """A started server; another port is tried if the free one was taken meanwhile."""
    for attempt in range(attempts):
        try:
            return RedisServer(workdir).start()
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
