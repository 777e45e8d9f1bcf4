"""The local stack — emulator (when there is no real key), ext_proc, Envoy — wired together.

`zai-proxy up` runs it for users; the integration tests run it too, so both exercise the same
start-up path, configuration and Envoy bootstrap. The benchmark (bench/gateway.py) starts its
set-ups' processes with the functions below (`envoy_argv`, `start_emulator`, `start_extproc`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import urlsplit

from extproc.config import Settings
from extproc.routing.envoy_config import ExtprocAddress
from extproc.routing.envoy_config import write as write_envoy_config
from extproc.variants import Variant
from extproc.local.processes import (Child, LineSink, ProcessGroup, child_env, envoy_binary, free_port,
                                     listening_port, print_sink, python_argv, wait_http_ok)
from extproc.local.tls import make_local_tls

EMULATOR_HOST = "localhost"  # the name in the emulator's certificate, checked by Envoy


@dataclass
class Emulator:
    url: str  # scheme://host:port, without a base path
    key: str = field(repr=False)
    child: Child

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None
        return port


def envoy_argv(config: Path, log_level: str = "warning", extra_args: Sequence[str] = ()) -> list[str]:
    """Envoy's command line in the local stack, with `extra_args` after it (the benchmark adds
    `--concurrency 2`)."""
    return [envoy_binary(), "-c", str(config), "--log-level", log_level,
            "--disable-hot-restart", "--file-flush-interval-msec", "500",
            "--component-log-level", "upstream:error", *extra_args]


async def start_emulator(group: ProcessGroup, env: Mapping[str, str], args: Sequence[str] = (),
                         tls_dir: Path | None = None) -> Emulator:
    """The emulator on a loopback port it picks and announces, accepting a fresh key: HTTPS for
    `EMULATOR_HOST` with a local CA written to `tls_dir`, or plain http on 127.0.0.1 without it."""
    key = "emu-" + secrets.token_urlsafe(24)
    scheme, host = "http", "127.0.0.1"
    tls_args: list[str] = []
    if tls_dir is not None:
        tls = make_local_tls(tls_dir, EMULATOR_HOST)
        scheme, host = "https", EMULATOR_HOST
        tls_args = ["--tls-cert", str(tls.cert_file), "--tls-key", str(tls.key_file)]
    child = await group.start("emulator", python_argv(
        "extproc.emulator", "--host", "127.0.0.1", "--port", "0",
        "--api-key-env", "ZAI_EMULATOR_KEY", *tls_args, *args),
        child_env(env, ZAI_EMULATOR_KEY=key), capture_first_stdout_line=True)
    port = await listening_port(child)
    return Emulator(f"{scheme}://{host}:{port}", key, child)


async def start_extproc(group: ProcessGroup, name: str, env: Mapping[str, str],
                        argv: Sequence[str] | None = None, health_url: str | None = None,
                        timeout: float = 30.0, log_file: Path | None = None) -> Child:
    """An ext_proc: `python -m extproc serve` configured by `env`, or the program `argv` (the
    benchmark's pass-through); with `health_url`, returns once that answers 200."""
    child = await group.start(name, list(argv) if argv else python_argv("extproc", "serve"), env,
                              log_file=log_file)
    if health_url is not None:
        await wait_http_ok(health_url, timeout, child)
    return child


class LocalStack:
    """Envoy, each variant's ext_proc (`replicas` processes of each, balanced by Envoy as a
    Kubernetes Service would), the emulator when there is no real key, and with `dashboard` the
    dashboard (`zai-proxy dashboard` on DASHBOARD_PORT, scraping every ext_proc of the stack)."""

    def __init__(self, env: Mapping[str, str], run_dir: Path, sink: LineSink = print_sink,
                 emulator_args: Sequence[str] = (), envoy_log_level: str = "warning",
                 variants: Sequence[Variant | str] = (Variant.PRODUCTION,), replicas: int = 1,
                 dashboard: bool = False) -> None:
        self.dashboard = dashboard
        self.base_env = dict(env)
        self.variants = tuple(Variant(v) for v in variants)
        self.replicas = replicas
        self.run_dir = run_dir
        self.group = ProcessGroup(sink)
        self.emulator_args = list(emulator_args)
        self.envoy_log_level = envoy_log_level
        self.emulator: Emulator | None = None
        self.env: dict[str, str] = {}
        self.settings = Settings.from_env(self.base_env)  # validates before anything starts
        self.uses_emulator = not self.settings.has_upstream_key
        self._extra: dict[tuple[Variant, int], ExtprocAddress] = {}

    @property
    def listener_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.listen_port}"

    async def start(self, timeout: float = 30.0) -> None:
        self.env = child_env(self.base_env)
        if self.uses_emulator:
            self.emulator = await self.start_emulator()
            self.env |= {
                "ZAI_API_KEY": self.emulator.key,
                "ZAI_TARGET_URL": f"{self.emulator.url}/api/anthropic",
                "ZAI_OPENAI_URL": f"{self.emulator.url}/api/coding/paas/v4",
                "UPSTREAM_CA_FILE": str(self.run_dir / "emulator-ca.pem"),
            }
        self.settings = Settings.from_env(self.env)
        for variant in self.variants:
            for index in range(self.replicas):
                await self.start_extproc(timeout, variant, index)
        # The routes file is written afresh from CANARY_WEIGHT; `zai-proxy weights` edits it live.
        config = write_envoy_config(self.settings, self.run_dir / "envoy.yaml", routes="replace",
                                    replicas={v: self.extprocs(v) for v in self.variants})
        envoy = await self.group.start("envoy", envoy_argv(config, self.envoy_log_level), self.env)
        # Envoy's /health asks an ext_proc: any child's death fails the start at once.
        await wait_http_ok(f"{self.listener_url}/health", timeout, *self.group.children)
        if self.dashboard:
            await self.start_dashboard(timeout)

    @property
    def dashboard_url(self) -> str:
        address = self.settings.dashboard_address
        host = "127.0.0.1" if address in ("0.0.0.0", "::") else address
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.settings.dashboard_port}"

    def dashboard_targets(self) -> str:
        """Every ext_proc of the stack, as DASHBOARD_TARGETS."""
        return ",".join(f"{variant.value}=http://127.0.0.1:{address.admin_port}"
                        for variant in self.variants for address in self.extprocs(variant))

    async def start_dashboard(self, timeout: float = 30.0) -> Child:
        env = dict(self.env)
        if not (env.get("DASHBOARD_TARGETS") or env.get("PROMETHEUS_URL")):
            env["DASHBOARD_TARGETS"] = self.dashboard_targets()
        child = await self.group.start("dashboard", python_argv("extproc", "dashboard"), env)
        await wait_http_ok(f"{self.dashboard_url}/health", timeout, *self.group.children)
        return child

    async def stop_dashboard(self) -> None:
        await self.group.stop("dashboard")

    async def start_emulator(self) -> Emulator:
        return await start_emulator(self.group, self.base_env, self.emulator_args, tls_dir=self.run_dir)

    def extproc_address(self, variant: Variant, index: int = 0) -> ExtprocAddress:
        """Where replica `index` of a variant listens: the settings' ports for the first, free
        loopback ports for the others."""
        if (variant, index) not in self._extra:
            address = (ExtprocAddress.of(self.settings, variant) if index == 0
                       else ExtprocAddress("127.0.0.1", free_port(), free_port()))
            if self.settings.extproc_processes > 1 and (index or address.observer_port is None):
                # Observer processes share a port of their own (EXTPROC_PROCESSES).
                address = replace(address, observer_port=free_port())
            self._extra[variant, index] = address
        return self._extra[variant, index]

    def extprocs(self, variant: Variant) -> list[ExtprocAddress]:
        return [self.extproc_address(variant, i) for i in range(self.replicas)]

    @staticmethod
    def extproc_name(variant: Variant, index: int = 0) -> str:
        name = "extproc" if variant is Variant.PRODUCTION else f"extproc-{variant}"
        return name if index == 0 else f"{name}-{index + 1}"

    async def start_extproc(self, timeout: float = 30.0, variant: Variant | str = Variant.PRODUCTION,
                            index: int = 0) -> Child:
        variant = Variant(variant)
        address = self.extproc_address(variant, index)
        env = self.env | {"EXTPROC_GRPC_PORT": str(address.grpc_port),
                          "EXTPROC_ADMIN_PORT": str(address.admin_port),
                          "EXTPROC_OBSERVER_PORT": str(address.observer_port or "")}
        if variant is not Variant.PRODUCTION:
            env["DEPLOYMENT_VARIANT"] = variant.value
        return await start_extproc(self.group, self.extproc_name(variant, index), env,
                                   health_url=f"http://127.0.0.1:{address.admin_port}/health",
                                   timeout=timeout)

    async def stop_extproc(self, variant: Variant | str = Variant.PRODUCTION, index: int = 0) -> None:
        await self.group.stop(self.extproc_name(Variant(variant), index))

    async def stop(self) -> None:
        await self.group.stop_all()
