"""Run the emulator on a socket: used by the CLI and by tests that want a real server.

    async with EmulatorServer(EmulatorOptions(api_key=key)) as server:
        ...  # server.url, server.port, server.options
"""

from __future__ import annotations

import ssl
import time
from types import TracebackType
from typing import Self

from aiohttp import web

from .app import STATE, Clock, build_app
from .options import EmulatorOptions

# In-flight streams are cut this long after a stop request; tests and SIGTERM
# should not wait for a slow stream to finish.
SHUTDOWN_TIMEOUT = 1.0


class EmulatorServer:
    """The emulator app bound to host:port (port 0 = any free port)."""

    def __init__(
        self,
        options: EmulatorOptions,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        self.app = build_app(options, clock=clock, wall_clock=wall_clock)
        self._host, self._port, self._ssl = host, port, ssl_context
        self._runner: web.AppRunner | None = None
        self.host, self.port = host, port

    @property
    def options(self) -> EmulatorOptions:
        return self.app[STATE].options

    @property
    def scheme(self) -> str:
        return "https" if self._ssl else "http"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def start(self) -> None:
        # handler_cancellation: a client that hangs up stops its handler at once.
        runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            access_log=None,  # we log one line per request ourselves, without secrets
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, ssl_context=self._ssl)
        await site.start()
        self._runner = runner
        self.host, self.port = runner.addresses[0][:2]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def server_ssl_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """Server-side TLS context from a PEM certificate chain and private key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context
