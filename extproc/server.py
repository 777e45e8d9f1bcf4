"""`zai-proxy serve`: the ext_proc gRPC server, its gRPC health service and the admin HTTP server."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.telemetry.admin import build_admin_app
from extproc.config import ConfigError, Settings
from extproc.variants import DEFAULT
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
from extproc.telemetry.metrics import (LimiterMetrics, Metrics, QuotaCollector,
                                       WorkerQueueCollector)
from extproc.telemetry.worker_labels import WorkerLabels
from extproc.telemetry.pricing import PriceTable
from extproc.telemetry.usage_record import Reporter
from extproc.accounting.estimator import TiktokenEstimator
from extproc.proxy.servicer import ExternalProcessor
from extproc.proxy.gateway import Claims, Gateway
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
        self.serving = False

    def on_attempt(self, verdict: AttemptVerdict) -> None:
        self.limiter_metrics.attempts.labels(self.settings.deployment_variant,
                                             verdict.signal.value).inc()
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
        self.metrics.in_progress.inc(delta)


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
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    grpc_address = f"{settings.extproc_bind_address}:{settings.extproc_grpc_port}"
    server.add_insecure_port(grpc_address)
    await server.start()

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
        "deployment_variant": settings.deployment_variant,
        "worker_keys": "enforced" if service.gateway.worker_keys.enforced else "any token"})

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    await stop.wait()

    log.info("ext_proc stopping")
    service.serving = False
    for name in ("", EXTPROC_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace=5)
    if service.quota is not None:
        await service.quota.stop()
        await service.quota.fetch.close()  # type: ignore[attr-defined]
    await service.limiter.stop()
    await service.limiter.store.close()
    await runner.cleanup()
