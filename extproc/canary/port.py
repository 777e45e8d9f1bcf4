"""The rollout controller's HTTP port (`CANARY_METRICS_PORT`): its series on `/metrics`, and its
state file as it stands on `/state`.

`/state` is how the dashboard sees a rollout it cannot read from disk: in Kubernetes the state file
lives on the controller's own volume (ReadWriteOnce), so the dashboard reads `CANARY_STATE_URL`
instead of `CANARY_STATE_FILE`. The body is the file's bytes, unparsed (the dashboard judges them
exactly as it judges the file); no file yet is a 404. Nothing in the state is secret.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from extproc.canary.statefile import MAX_STATE_BYTES

STATE_PATH = "/state"

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def state_app(state_file: Path, fallback: WsgiApp) -> WsgiApp:
    """`/state` from `state_file`; every other path to `fallback` (the metrics)."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != STATE_PATH:
            return fallback(environ, start_response)
        if environ.get("REQUEST_METHOD") != "GET":
            return _answer(start_response, "405 Method Not Allowed", _error("GET only"))
        try:
            with state_file.open("rb") as f:
                body = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return _answer(start_response, "404 Not Found", _error("no rollout state yet"))
        except OSError as exc:
            return _answer(start_response, "503 Service Unavailable",
                           _error(f"the state file cannot be read: {exc.strerror or exc}"))
        return _answer(start_response, "200 OK", body)

    return app


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode() + b"\n"


def _answer(start_response: StartResponse, status: str, body: bytes) -> list[bytes]:
    start_response(status, [("Content-Type", "application/json"), ("Cache-Control", "no-store"),
                            ("Content-Length", str(len(body)))])
    return [body]


class _Quiet(WSGIRequestHandler):
    """No line on stderr per request (Prometheus scrapes every 15 s, the dashboard every 30 s)."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass


def serve(port: int, address: str, registry: CollectorRegistry,
          state_file: Path | None) -> ThreadingWSGIServer:
    """Serve the port from a daemon thread; the returned server's `shutdown()` stops it."""
    app: WsgiApp = make_wsgi_app(registry)
    if state_file is not None:
        app = state_app(state_file, app)

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in address else socket.AF_INET

    server = make_server(address, port, app, Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True, name="canary-port").start()
    return server
