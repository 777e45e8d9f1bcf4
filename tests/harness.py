"""Run the real local stack (emulator + ext_proc + Envoy) from synchronous tests.

The stack runs on its own event loop in a background thread, started by the same `LocalStack`
code `zai-proxy up` uses. Every line any process prints is kept in `logs` so tests can search
them (for leaked secrets, access-log fields, ...).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import httpx2 as httpx

from extproc.local.processes import free_port
from extproc.local.stack import LocalStack

# Settings a developer's shell might carry that would change what the tests run against.
_SCRUB = ("ZAI_API_KEY", "ENVOY_ROUTES_DIR", "CANARY_WEIGHT", "ZAI_API_KEY_FILE", "ZAI_TARGET_URL", "ZAI_OPENAI_URL", "WORKER_KEYS_FILE",
          "DEPLOYMENT_VARIANT", "LISTEN_PORT", "LISTEN_ADDRESS", "HTTP_PROXY", "HTTPS_PROXY",
          "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy", "EXTPROC_PROCESSES",
          "EXTPROC_OBSERVER_PORT", "CANARY_EXTPROC_OBSERVER_PORT")


# Files the stacks' processes write outside a test's own directory; removed when the session ends.
_SCRATCH = tempfile.TemporaryDirectory(prefix="zai-proxy-tests-")


def stack_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env |= {
        "LISTEN_PORT": str(free_port()), "ENVOY_ADMIN_PORT": str(free_port()),
        "EXTPROC_GRPC_PORT": str(free_port()), "EXTPROC_ADMIN_PORT": str(free_port()),
        "CANARY_EXTPROC_GRPC_PORT": str(free_port()), "CANARY_EXTPROC_ADMIN_PORT": str(free_port()),
        "PRODUCTION_LISTEN_PORT": str(free_port()), "CANARY_LISTEN_PORT": str(free_port()),
        "LOG_LEVEL": "INFO", "NO_PROXY": "*",
        # `zai-proxy up` starts the dashboard: its own port, and a history outside the user's.
        "DASHBOARD_PORT": str(free_port()),
        "DASHBOARD_DB": os.path.join(_SCRATCH.name, f"dashboard-{uuid.uuid4().hex}.sqlite3"),
    }
    env |= overrides
    return env


class StackHandle:
    def __init__(self, run_dir: Path, env: dict[str, str], emulator_args: Sequence[str] = (),
                 variants: Sequence[str] = ("production",), replicas: int = 1,
                 dashboard: bool = False):
        env = {"ENVOY_ROUTES_DIR": str(run_dir / "routes"), **env}
        self.logs: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.stack = LocalStack(env, run_dir, self._sink, emulator_args, envoy_log_level="info",
                                variants=variants, replicas=replicas, dashboard=dashboard)
        self.run_dir = run_dir
        self.variants = tuple(variants)

    def _sink(self, name: str, line: str) -> None:
        with self._lock:
            self.logs.append((name, line))

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> "StackHandle":
        try:
            self.run(self.stack.start())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            self.run(self.stack.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def stop_extproc(self, variant: str = "production") -> None:
        self.run(self.stack.stop_extproc(variant))

    def start_extproc(self, variant: str = "production") -> None:
        self.run(self.stack.start_extproc(variant=variant))

    def stop_dashboard(self) -> None:
        self.run(self.stack.stop_dashboard())

    def start_dashboard(self) -> None:
        self.run(self.stack.start_dashboard())

    @property
    def dashboard_url(self) -> str:
        return self.stack.dashboard_url

    def log_text(self) -> str:
        with self._lock:
            return "\n".join(f"[{n}] {line}" for n, line in self.logs)

    @property
    def url(self) -> str:
        return self.stack.listener_url

    @property
    def upstream_key(self) -> str:
        assert self.stack.emulator is not None
        return self.stack.emulator.key

    # -- the emulator's control endpoints (direct, not through Envoy) -------------------------

    def emulator_client(self) -> httpx.Client:
        assert self.stack.emulator is not None
        ctx = ssl.create_default_context(cafile=str(self.run_dir / "emulator-ca.pem"))
        return httpx.Client(base_url=self.stack.emulator.url, verify=ctx, timeout=10, trust_env=False)

    def emulator(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self.emulator_client() as client:
            resp = client.request(method, path, **kwargs)
            resp.raise_for_status()
            return resp

    def upstream_requests(self) -> list[dict[str, Any]]:
        return self.emulator("GET", "/_emulator/requests").json()["requests"]

    def metrics_text(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10, trust_env=False).text

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until every variant's ext_proc has recorded the requests it saw: with bodies
        observed (not waited for), the record can trail the client's last byte slightly."""
        deadline = time.monotonic() + timeout
        for url in self.admin_urls():
            while True:
                doc = httpx.get(f"{url}/health?detail=1", timeout=10, trust_env=False).json()
                if doc.get("requests_open") == 0:
                    break
                assert time.monotonic() < deadline, f"{url}: requests still open: {doc}"
                time.sleep(0.02)

    def admin_urls(self, variant: str | None = None) -> list[str]:
        """Every ext_proc process's admin URL (of one variant, or of all)."""
        return [f"http://127.0.0.1:{address.admin_port}"
                for v in self.stack.variants if variant is None or v.value == variant
                for address in self.stack.extprocs(v)]
