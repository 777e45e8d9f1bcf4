"""Command line: `python -m extproc.emulator [flags]`.

    ZAI_EMULATOR_KEY=test-key python -m extproc.emulator --port 0 --concurrency-cap 3

The accepted upstream key is read from the environment variable named by
`--api-key-env` (default ZAI_EMULATOR_KEY), never from argv, which `ps` shows to
everyone. Every emulator option has a flag (`--events-per-stream 8`, ...; see
`--help`). Once bound, one JSON line goes to stdout, flushed, so a parent process
can find the port:

    {"event":"listening","host":"127.0.0.1","port":40123,"scheme":"http"}

Request log lines go to stderr. SIGTERM or SIGINT stops the server (in-flight
streams are cut after a short grace period) and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from .options import EmulatorOptions, field_docs, field_types
from .server import EmulatorServer, server_ssl_context

DEFAULT_KEY_ENV = "ZAI_EMULATOR_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m extproc.emulator",
        description="Z.AI API emulator (Anthropic and OpenAI formats) for tests and demos.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 = any free port")
    parser.add_argument(
        "--api-key-env",
        default=DEFAULT_KEY_ENV,
        metavar="NAME",
        help="environment variable holding the upstream key to accept",
    )
    parser.add_argument("--tls-cert", metavar="PATH", help="PEM certificate chain; serve HTTPS")
    parser.add_argument("--tls-key", metavar="PATH", help="PEM private key for --tls-cert")
    parser.add_argument("--log-level", default="INFO", help="stderr log level")
    defaults = EmulatorOptions(api_key="unused").public_dict()
    docs = field_docs()
    for name, kind in field_types().items():
        if name == "api_key":
            continue
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            default=None,
            # argparse %-formats help strings
            help=f"{docs[name]} (default: {defaults[name]!r})".replace("%", "%%"),
        )
    return parser


def options_from_args(args: argparse.Namespace, environ: dict[str, str]) -> EmulatorOptions:
    """Options from parsed flags and the key variable; ValueError says what is wrong."""
    key = environ.get(args.api_key_env, "").strip()
    if not key:
        raise ValueError(
            f"environment variable {args.api_key_env} is unset or empty; set it to the "
            f"upstream key the emulator should accept, e.g. {args.api_key_env}=test-key"
        )
    chosen: dict[str, Any] = {
        name: getattr(args, name)
        for name in field_types()
        if name != "api_key" and getattr(args, name) is not None
    }
    options = EmulatorOptions(api_key=key)
    options.update(chosen)
    return options


def tls_from_args(args: argparse.Namespace) -> ssl.SSLContext | None:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key must be given together")
    if not args.tls_cert:
        return None
    return server_ssl_context(args.tls_cert, args.tls_key)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = options_from_args(args, dict(os.environ))
        ssl_context = tls_from_args(args)
    except (ValueError, OSError, ssl.SSLError) as exc:
        print(f"zai-emulator: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    _run(_serve(options, args.host, args.port, ssl_context))
    return 0


async def _serve(
    options: EmulatorOptions, host: str, port: int, ssl_context: ssl.SSLContext | None
) -> None:
    server = EmulatorServer(options, host=host, port=port, ssl_context=ssl_context)
    await server.start()
    try:
        line = {"event": "listening", "host": server.host, "port": server.port,
                "scheme": server.scheme}
        print(json.dumps(line, separators=(",", ":")), flush=True)
        await _wait_for_stop_signal()
    finally:
        await server.stop()


async def _wait_for_stop_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed, else on the default loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)
