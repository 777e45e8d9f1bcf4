"""A real Prometheus for tests, scraping the given targets (the ext_procs' admin ports) every second.

    with Prometheus(tmp_path, stack.admin_urls()) as prometheus:   # ready, every target up
        prometheus.query("sum(rate(zai_proxy_requests_total[1m]))")

Loopback only, a free port, its own directory (config, TSDB, log) under the one given. `start()`
returns once Prometheus is ready and has scraped every target successfully; a failed start stops
the process and raises with the tail of its log. `stop()` is safe to repeat and the process goes
down with pytest if pytest itself is killed, so a test never leaks one. Tests that need it are
marked `@needs_prometheus` (Prometheus is installed by scripts/setup --test).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from extproc.lifecycle import die_with_parent
from extproc.local.processes import free_port

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None,
                                      reason="prometheus is installed by scripts/setup --test")


class Prometheus:
    def __init__(self, workdir: Path, targets: list[str], timeout: float = 30.0) -> None:
        self.workdir = workdir / "prometheus"
        # "host:port", or an admin URL as StackHandle.admin_urls() gives it.
        self.targets = [t.removeprefix("http://").rstrip("/") for t in targets]
        self.timeout = timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.url}/api/v1"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, attempts: int = 3) -> "Prometheus":
        """Start; returns once Prometheus is ready and every target is up. Another port is
        tried if the free one was taken meanwhile (Prometheus exits at once then)."""
        assert PROMETHEUS is not None, "prometheus is installed by scripts/setup --test"
        assert not self.running, "already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "zai-proxy", "static_configs": [{"targets": self.targets}]}],
        }, indent=1) + "\n")
        for attempt in range(attempts):
            self.port = free_port()
            with open(self.workdir / "prometheus.log", "ab") as log:
                self._proc = subprocess.Popen(
                    [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{self.port}"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    preexec_fn=lambda: die_with_parent(signal.SIGKILL))
            try:
                self._wait_scraping()
                return self
            except BaseException:
                exited = self._proc.poll() is not None
                self.stop()
                if not exited or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _wait_scraping(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"Prometheus exited ({self._proc.returncode}):\n{self.log_tail()}")
            if self._ready() and self._targets_up():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Prometheus not scraping {self.targets} after {self.timeout:g} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.3)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", trust_env=False, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _targets_up(self) -> bool:
        try:
            active = self.get("targets", timeout=2)["data"]["activeTargets"]
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        return len(active) == len(self.targets) and all(t["health"] == "up" for t in active)

    def get(self, path: str, timeout: float = 10, **params: object) -> dict:
        """GET /api/v1/<path>: the JSON answer, an error's too (a bad query is a 400 with a
        JSON body). The plain-text 503 Prometheus gives while starting (e.g. replaying its
        write-ahead log) is retried for up to `timeout` seconds, then raised."""
        deadline = time.monotonic() + timeout
        while True:
            resp = httpx.get(f"{self.api}/{path}", params=params, trust_env=False, timeout=timeout)
            if resp.status_code != 503:
                return resp.json()
            if time.monotonic() > deadline:
                resp.raise_for_status()
            time.sleep(0.3)

    def query(self, expr: str) -> dict:
        """An instant query through the HTTP API: the whole answer (`status`, `data`, `error`)."""
        return self.get("query", query=expr)

    def stop(self) -> None:
        """Terminate (kill after 10 s) and wait until it is gone. Safe to repeat."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def log_tail(self, lines: int = 20) -> str:
        path = self.workdir / "prometheus.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
