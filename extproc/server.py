"""`zai-proxy serve`: the ext_proc gRPC server, its gRPC health service and the admin HTTP server."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.telemetry.admin import build_admin_app
from extproc.config import ConfigError, Settings
from extproc.variants import DEFAULT
from extproc.lifecycle import die_with_parent, wait_for_stop_signal
from extproc.proxy.attempt import AttemptVerdict
from extproc.proxy.keys import KeyUnavailable, UpstreamKey, WorkerKeys, fingerprint
from extproc.limiter.account import AccountLimiter, LimiterSettings, load_budgets
from extproc.limiter.stores.failover import FailoverStore
from extproc.limiter.stores.redis import RedisStore
from extproc.limiter.signals import Signal
from extproc.limiter.stores.base import LimiterStore
from extproc.limiter.stores.local import LocalStore
from extproc.limiter.pacing import Pacer
from extproc.limiter.quota_poller import QUOTA_PATH, QuotaPoller, http_fetch
from extproc.telemetry.metrics import (LimiterMetrics, Metrics, QuotaCollector, adder,
                                       WorkerQueueCollector)
from extproc.telemetry.worker_labels import WorkerLabels
from extproc.telemetry.pricing import PriceTable
from extproc.telemetry.usage_record import Reporter
from extproc.accounting.estimator import TiktokenEstimator
from extproc.proxy.servicer import ExternalProcessor
from extproc.proxy.gateway import Claims, Gateway
from extproc.proxy.handoff import (HandoffClaims, HandoffRecorder, ObserverGateway, Receiver,
                                   Sender)
from extproc.proxy.models import ModelRules
from extproc.telemetry.model_metrics import ModelMetrics
from extproc.accounting.tokens import TokenCounter

log = logging.getLogger(__name__)

EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# A quota poll is off the request path, but a hung one must not hold back the next.
QUOTA_POLL_TIMEOUT = 5.0
# Headroom above the body limit for the rest of the ProcessingRequest.
GRPC_MESSAGE_OVERHEAD = 1 << 20


def load_prices(path: str | None) -> PriceTable:
    if path is None:
        return PriceTable()
    try:
        return PriceTable.from_file(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"PRICES_FILE={path!r} cannot be used: {exc}; for example: "
                          f'{{"models": {{"glm-4.7": {{"input": 0.6, "output": 2.2}}}}}}') from None


def build_limiter(settings: Settings, account: str, metrics: LimiterMetrics) -> AccountLimiter:
    try:
        budgets = load_budgets(settings.worker_budgets_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"WORKER_BUDGETS_FILE={settings.worker_budgets_file!r} cannot be used: "
                          f"{exc}; for example a line: `alice rpm=60 tpm=200000`") from None
    store: LimiterStore = LocalStore()
    if settings.redis_url:
        store = FailoverStore(RedisStore(settings.redis_url), LocalStore(), time.time)
    return AccountLimiter(account, LimiterSettings(
        initial=settings.rate_limit_initial, minimum=settings.rate_limit_min,
        maximum=settings.rate_limit_max, rate_initial=settings.start_rate_initial,
        rate_minimum=settings.start_rate_min, rate_maximum=settings.start_rate_max,
        max_wait=settings.queue_timeout, max_queue=settings.queue_max,
        # A lease outliving the longest stream Envoy allows belongs to a lost release.
        lease_ttl=settings.max_stream_seconds + 60,
        probe_interval=settings.rate_limit_probe_seconds,
        state_file=None if settings.redis_url else _per_variant(settings.limiter_state_file,
                                                                settings.deployment_variant),
        budgets=budgets), store, metrics.hooks())


def build_quota_poller(settings: Settings, account: str, key: UpstreamKey,
                       limiter: AccountLimiter) -> QuotaPoller | None:
    """The poller of Z.AI's quota report, at the origin of ZAI_TARGET_URL (None: polling off)."""
    if not settings.quota_poll_seconds:
        return None
    assert limiter.pacer is not None
    url = settings.anthropic_url.origin + QUOTA_PATH
    ca_file = settings.upstream_ca_file if os.path.exists(settings.upstream_ca_file) else None
    fetch = http_fetch(url, key.current, timeout=QUOTA_POLL_TIMEOUT, ca_file=ca_file)
    return QuotaPoller(account, fetch, limiter.store, limiter.pacer,
                       lambda until, code, message: limiter.close_gate(until, code, message),
                       settings.quota_poll_seconds)


def _per_variant(path: str, variant: str) -> str:
    """Variants run as separate processes: each keeps its own state file (the default variant's
    is the file named)."""
    if variant == DEFAULT.value:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}-{variant}{ext}"


class Service:
    """The wired-up ext_proc: gateway state, metrics, and readiness."""

    def __init__(self, settings: Settings) -> None:
        settings.require_upstream_key()
        self.settings = settings
        self.upstream_key = UpstreamKey(settings.api_key, settings.api_key_file)
        rules = ModelRules.of(settings)
        # The models MODEL_MAP and MODEL_FALLBACKS name are configured too: labels of their own.
        self.metrics = Metrics(settings.deployment_variant,
                               settings.model_labels + rules.label_models())
        self.model_metrics = (ModelMetrics(settings.deployment_variant, rules,
                                           self.metrics.model_label, self.metrics.registry)
                              if rules.active else None)
        prices = load_prices(settings.prices_file)
        self.limiter_metrics = LimiterMetrics(settings.deployment_variant, self.metrics.registry)
        self._attempt_counters: dict[Signal, Any] = {}
        account = fingerprint(self.upstream_key.current())
        self.limiter = build_limiter(settings, account, self.limiter_metrics)
        self.limiter_metrics.watch(self.limiter.state, lambda: self.limiter.store.name == "redis")
        self.pacer = self.limiter.pacer = Pacer(settings.quota_reserve_percent)
        self.quota = build_quota_poller(settings, account, self.upstream_key, self.limiter)
        if self.quota is not None:
            self.metrics.registry.register(QuotaCollector(settings.deployment_variant,
                                                          self.quota.state))
        worker_keys = WorkerKeys(settings.worker_keys_file)
        worker_labels = WorkerLabels(self.limiter.store, account, settings.worker_label_limit,
                                     worker_keys.is_named)
        self.reporter = Reporter(self.metrics, prices, settings.deployment_variant,
                                 worker_labels=worker_labels, pacer=self.pacer,
                                 models=self.model_metrics)
        self.metrics.registry.register(WorkerQueueCollector(
            settings.deployment_variant, self.limiter.admission.queue.waiting, worker_labels.known))
        self.gateway = Gateway(self.upstream_key, worker_keys,
                               self.reporter, TiktokenEstimator(TokenCounter()),
                               count_tokens=settings.token_counting, limiter=self.limiter,
                               max_request_body_bytes=settings.max_request_body_bytes,
                               on_attempt=self.on_attempt,
                               # One record per request across replicas: claims live where the
                               # limiter's shared state does (Redis with REDIS_URL).
                               claims=Claims(self.limiter.store),
                               models=rules)
        if self.model_metrics is not None:
            self.gateway.on_chain = self.model_metrics.on_chain
        # What the observer processes (EXTPROC_PROCESSES above 1) hand over.
        self.handoff = Receiver(self.gateway)
        self.observer_processes = settings.extproc_processes - 1
        if self.observer_processes and observer_port(settings) is None:
            raise ConfigError(
                f"EXTPROC_PROCESSES={settings.extproc_processes} needs EXTPROC_OBSERVER_PORT, a port "
                "of its own (not EXTPROC_GRPC_PORT) that Envoy's observer cluster targets; for "
                "example: EXTPROC_OBSERVER_PORT=50053")
        self.serving = False

    def on_attempt(self, verdict: AttemptVerdict) -> None:
        counter = self._attempt_counters.get(verdict.signal)
        if counter is None:  # one child per signal (a handful), resolved once
            counter = self._attempt_counters[verdict.signal] = adder(self.limiter_metrics.attempts.labels(
                self.settings.deployment_variant, verdict.signal.value))
        counter(1)
        if verdict.signal is not Signal.SUCCESS:
            self.metrics.upstream_error(verdict.signal.value, verdict.code)
        self.limiter.on_attempt(verdict.signal, verdict.code, verdict.message, verdict.retry_after)

    def secrets(self) -> list[str]:
        """Values the log formatter must never print."""
        try:
            return [self.upstream_key.current()]
        except KeyUnavailable:
            return []

    def readiness(self) -> str | None:
        if not self.serving:
            return "starting or stopping"
        try:
            self.upstream_key.current()
        except KeyUnavailable as exc:
            return f"upstream key unavailable: {exc}"
        return None

    def on_stream(self, delta: int) -> None:
        self.metrics.streams_changed(delta)


async def serve(service: Service, stop: asyncio.Event | None = None) -> None:
    settings = service.settings
    limit = settings.max_request_body_bytes + GRPC_MESSAGE_OVERHEAD
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
    ])
    await service.limiter.start()
    if service.quota is not None:
        service.quota.start()
    pb_grpc.add_ExternalProcessorServicer_to_server(
        ExternalProcessor(service.gateway, service.on_stream), server)
    server.add_generic_rpc_handlers((service.handoff.handler(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    grpc_address = f"{settings.extproc_bind_address}:{settings.extproc_grpc_port}"
    server.add_insecure_port(grpc_address)
    own_observer_port = observer_port(settings)
    observers: ObserverProcesses | None = None
    if service.observer_processes:
        observers = ObserverProcesses(service.observer_processes,
                                      handoff_target(settings.extproc_bind_address,
                                                     settings.extproc_grpc_port))
    elif own_observer_port is not None:  # one process: the observer's copies come here too
        server.add_insecure_port(f"{settings.extproc_bind_address}:{own_observer_port}")
    await server.start()
    if observers is not None:
        await observers.start()
        assert own_observer_port is not None
        await wait_listening(handoff_target(settings.extproc_bind_address, own_observer_port))

    runner = web.AppRunner(build_admin_app(service.readiness, service.metrics.exposition,
                                           service.limiter, settings.admin_token,
                                           lambda: len(service.gateway.open),
                                           quota=service.quota.state if service.quota else None))
    await runner.setup()
    site = web.TCPSite(runner, settings.extproc_bind_address, settings.extproc_admin_port)
    await site.start()

    service.serving = True
    for name in ("", EXTPROC_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("ext_proc serving", extra={
        "grpc": grpc_address, "admin_port": settings.extproc_admin_port,
        "observer_port": own_observer_port or settings.extproc_grpc_port,
        "observer_processes": service.observer_processes,
        "deployment_variant": settings.deployment_variant,
        "worker_keys": "enforced" if service.gateway.worker_keys.enforced else "any token"})

    await wait_for_stop_signal(stop)

    log.info("ext_proc stopping")
    service.serving = False
    for name in ("", EXTPROC_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if observers is not None:
        await observers.stop()
    await server.stop(grace=5)
    if service.quota is not None:
        await service.quota.stop()
        await service.quota.fetch.close()  # type: ignore[attr-defined]
    await service.limiter.stop()
    await service.limiter.store.close()
    await runner.cleanup()


def observer_port(settings: Settings) -> int | None:
    """The port of the observer's copies when it is not the gRPC port, else None."""
    port = settings.extproc_observer_port
    return None if port is None or port == settings.extproc_grpc_port else port


def handoff_target(bind_address: str, port: int) -> str:
    """Where a process on this host reaches a port bound on `bind_address`."""
    host = "127.0.0.1" if bind_address in ("", "0.0.0.0", "::", "[::]") else bind_address
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def wait_listening(target: str, timeout: float = 30.0) -> None:
    """Until something accepts connections at `target` (host:port)."""
    host, _, port = target.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no observer process listens on {target} after {timeout:.0f}s")
            await asyncio.sleep(0.1)


class ObserverProcesses:
    """The admission process's observer processes (`zai-proxy serve --role observer`): started
    with it, restarted if one dies, stopped with it (and killed by the kernel if it dies)."""

    RESTART_SECONDS = 1.0

    def __init__(self, count: int, handoff: str) -> None:
        self.count = count
        self.handoff = handoff
        self.children: list[asyncio.subprocess.Process] = []
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "extproc", "serve", "--role", "observer",
                "--handoff", self.handoff]

    async def _spawn(self) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent)

    async def start(self) -> None:
        self.children = [await self._spawn() for _ in range(self.count)]
        self._watch = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        while True:
            waits = {asyncio.ensure_future(child.wait()): i for i, child in enumerate(self.children)}
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            for task in done:
                index = waits[task]
                log.warning("observer process exited; restarting it", extra={
                    "pid": self.children[index].pid, "code": self.children[index].returncode})
                await asyncio.sleep(self.RESTART_SECONDS)
                self.children[index] = await self._spawn()

    async def stop(self, timeout: float = 5.0) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for child in self.children:
            if child.returncode is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                await asyncio.wait_for(child.wait(), timeout)
            except asyncio.TimeoutError:
                child.kill()
                await child.wait()


async def serve_observer(settings: Settings, handoff: str, stop: asyncio.Event | None = None) -> None:
    """An observer process: the observer's copies of bodies on EXTPROC_OBSERVER_PORT (shared with
    the variant's other observer processes, SO_REUSEPORT), each request's claim, 2xx and outcome
    handed to the admission process at `handoff`."""
    port = observer_port(settings)
    if port is None:
        raise ConfigError("an observer process needs EXTPROC_OBSERVER_PORT (not EXTPROC_GRPC_PORT); "
                          "for example: EXTPROC_OBSERVER_PORT=50053")
    sender = Sender(handoff)
    gateway = ObserverGateway(
        UpstreamKey(settings.api_key, settings.api_key_file) if settings.has_upstream_key
        else UpstreamKey("unused"), WorkerKeys(None), HandoffRecorder(sender),
        TiktokenEstimator(TokenCounter()), count_tokens=settings.token_counting,
        max_request_body_bytes=settings.max_request_body_bytes, claims=HandoffClaims(sender),
        sender=sender)
    limit = settings.max_request_body_bytes + GRPC_MESSAGE_OVERHEAD
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 1),
    ])
    pb_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(gateway), server)
    health_servicer = health.aio.HealthServicer()  # Envoy health-checks the observer cluster too
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{settings.extproc_bind_address}:{port}"
    server.add_insecure_port(address)
    sender.start()
    await server.start()
    for name in ("", EXTPROC_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("ext_proc observer serving", extra={"grpc": address, "handoff": handoff,
                                                 "pid": os.getpid(),
                                                 "deployment_variant": settings.deployment_variant})
    await wait_for_stop_signal(stop)
    for name in ("", EXTPROC_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace=5)
    await sender.close()
