"""`zai-proxy dashboard`: the collector, the history and the HTTP server in one process."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Callable

import orjson
from aiohttp import web

from extproc.config import ConfigError, Settings, is_loopback
from extproc.lifecycle import cancel_and_wait
from extproc.dashboard.collector import Collector
from extproc.dashboard.events import Hub
from extproc.dashboard.history import DbThread, History, Reader, connect
from extproc.dashboard.rollout import reader as rollout_reader, url_reader
from extproc.dashboard.server import build_app
from extproc.dashboard.sources import ExtprocSource, PrometheusSource, discover

log = logging.getLogger(__name__)


def check(settings: Settings) -> None:
    if not settings.dashboard_token and not is_loopback(settings.dashboard_address):
        raise ConfigError(
            f"DASHBOARD_ADDRESS={settings.dashboard_address} serves the dashboard beyond this "
            "machine, so it needs a token: set DASHBOARD_TOKEN (for example: DASHBOARD_TOKEN=<a "
            "long random string>, e.g. from `openssl rand -hex 32`), or bind it to 127.0.0.1")


def routes_weights(settings: Settings) -> Callable[[], dict[str, float] | None]:
    """The live split from Envoy's routes file, re-read when it changes; None when there is no
    readable routes file (e.g. a dashboard away from Envoy's files)."""
    from extproc.routing.envoy_config import routes_path

    path = Path(routes_path(settings))
    cache: dict[str, object] = {"stamp": None, "value": None}

    def read() -> dict[str, float] | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if cache["stamp"] != stamp:
            cache["stamp"] = stamp
            cache["value"] = None
            try:
                import math

                import yaml

                from extproc.routing import weights

                split = weights.split(yaml.safe_load(path.read_text()))
                if not math.isnan(split.canary_percent):
                    canary = round(split.canary_percent, 2)
                    cache["value"] = {"production": round(100 - canary, 2), "canary": canary}
            except Exception:  # noqa: BLE001 - a file being rewritten, or not a routes file
                cache["value"] = None
        return cache["value"]  # type: ignore[return-value]

    return read


async def serve(settings: Settings, ready: Callable[[str], None] | None = None) -> None:
    check(settings)
    interval = settings.dashboard_interval
    history = History(settings.dashboard_db, interval, max_bytes=settings.dashboard_db_max_mb << 20)
    writer = DbThread("dashboard-db")
    reader_db = DbThread("dashboard-read")
    reader = Reader(connect(settings.dashboard_db, readonly=True))
    if settings.prometheus_url:
        source: ExtprocSource | PrometheusSource = PrometheusSource(settings.prometheus_url, interval)
    else:
        source = ExtprocSource(discover(settings), interval)
    hub = Hub()
    # The rollout from the controller's /state where it is set (Kubernetes), else from the file.
    state_url = settings.canary_state_url
    rollout = url_reader(state_url) if state_url else rollout_reader(settings.canary_state_file)
    collector = Collector(source, history, writer, hub, interval, weights=routes_weights(settings),
                          rollout=rollout, rollout_name=state_url or settings.canary_state_file)
    await collector.start()
    app = build_app(collector, reader, reader_db, hub, settings.dashboard_token, interval)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, settings.dashboard_address, settings.dashboard_port,
                       reuse_address=True, shutdown_timeout=1.0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    task: asyncio.Task[None] | None = None
    try:
        await site.start()
        host = settings.dashboard_address
        url = f"http://{'[' + host + ']' if ':' in host else host}:{settings.dashboard_port}/"
        targets = (settings.prometheus_url if settings.prometheus_url
                   else ", ".join(f"{t.variant}={t.url}" for t in source.targets))  # type: ignore[union-attr]
        sys.stdout.write(orjson.dumps({"dashboard": url, "source": source.kind, "from": targets,
                                       "db": settings.dashboard_db}).decode() + "\n")
        sys.stdout.flush()
        if ready is not None:
            ready(url)
        hub.start()
        task = asyncio.create_task(collector.run())
        await stop.wait()
    finally:
        await cancel_and_wait(task)
        hub.close()
        await runner.cleanup()
        await source.close()
        writer.call(history.close)
        reader_db.call(reader.close)
        writer.shutdown()
        reader_db.shutdown()


def main(settings: Settings) -> int:
    from extproc.telemetry import logs

    token = settings.dashboard_token
    logs.setup("dashboard", settings.log_level, lambda: [token] if token else [])
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        import uvloop

        uvloop.run(serve(settings))
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        asyncio.run(serve(settings))
    return 0

