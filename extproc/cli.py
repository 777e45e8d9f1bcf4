"""`zai-proxy` command line: up | serve | emulator | render-envoy | weights | canary."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Coroutine

from extproc.config import ConfigError, Settings
from extproc.variants import Variant

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a declared dependency
    uvloop = None  # type: ignore[assignment]


def _run(coro: Coroutine[Any, Any, object]) -> None:
    if uvloop is not None:
        uvloop.run(coro)
    else:
        asyncio.run(coro)


def cmd_serve(args: argparse.Namespace) -> int:
    from extproc.telemetry import logs
    from extproc.server import Service, serve, serve_observer
    from extproc.accounting.tokens import tune_gil_switching

    settings = Settings.from_env()
    tune_gil_switching()  # the loop and gRPC's poller get the GIL within ~0.5 ms
    if args.role == "observer":
        if not args.handoff:
            raise ConfigError("serve --role observer needs --handoff HOST:PORT (its admission "
                              "process's gRPC port); for example: --handoff 127.0.0.1:50051")
        logs.setup("extproc-observer", settings.log_level)
        _long_lived_heap()
        _run(serve_observer(settings, args.handoff))
        return 0
    service = Service(settings)
    logs.setup("extproc", settings.log_level, service.secrets)
    _long_lived_heap()
    _run(serve(service))
    return 0


def _long_lived_heap() -> None:
    """What is allocated by now lives as long as the process: out of the collector's sight, so
    that its full collections stop walking the modules, the protobuf descriptors and the price
    table each time. (A young generation of 10,000 instead of 700 was tried: no CPU gain beyond
    the noise, and more garbage held between collections.)"""
    import gc

    gc.collect()
    gc.freeze()


def cmd_render(args: argparse.Namespace) -> int:
    import yaml

    from extproc.routing.envoy_config import render, render_routes, write, write_routes

    settings = Settings.from_env()
    if args.routes:
        doc = render_routes(settings)
        if args.output == "-":
            sys.stdout.write(yaml.safe_dump(doc, sort_keys=False))
        else:
            write_routes(Path(args.output), doc)
    elif args.output == "-":
        sys.stdout.write(yaml.safe_dump(render(settings), sort_keys=False))
    else:
        write(settings, Path(args.output))  # also the routes file, unless one exists
    return 0


def cmd_up(_: argparse.Namespace) -> int:
    from extproc.local.stack import LocalStack

    run_dir = Path(tempfile.mkdtemp(prefix="zai-proxy-"))
    try:
        # Paced like a real model, so a person trying it sees tokens stream in.
        stack = LocalStack(os.environ, run_dir, variants=tuple(Variant), dashboard=True,
                           emulator_args=["--first-event-delay", "0.3", "--event-interval", "0.05"])
        return asyncio.run(_up(stack)) if uvloop is None else uvloop.run(_up(stack))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _banner(text: str) -> None:
    line = "=" * 78
    sys.stdout.write(f"{line}\n{text}\n{line}\n")
    sys.stdout.flush()


async def _up(stack: "LocalStack") -> int:  # type: ignore[name-defined]  # noqa: F821
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if stack.uses_emulator:
        _banner("No ZAI_API_KEY set: requests go to the BUILT-IN Z.AI EMULATOR (canned replies).\n"
                "Set ZAI_API_KEY (or ZAI_API_KEY_FILE) to use the real Z.AI.")
    try:
        await stack.start()
    except Exception as exc:  # a child died or never became ready
        sys.stderr.write(f"zai-proxy up: start-up failed: {exc}\n")
        await stack.stop()
        return 1
    settings = stack.settings
    port = settings.listen_port
    target = "the built-in emulator" if stack.uses_emulator else str(settings.anthropic_url)
    split = f"production {100 - settings.canary_weight}% / canary {settings.canary_weight}%"
    _banner(
        f"zai-proxy is up (upstream: {target}). Three entrances:\n"
        f"  split ({split}, by `zai-proxy weights`):\n"
        f"    export ANTHROPIC_BASE_URL=http://localhost:{port}/api/anthropic\n"
        f"  production only (live traffic; where every fallback points):\n"
        f"    export ANTHROPIC_BASE_URL=http://localhost:{settings.production_listen_port}/api/anthropic\n"
        f"  canary only (the version under test):\n"
        f"    export ANTHROPIC_BASE_URL=http://localhost:{settings.canary_listen_port}/api/anthropic\n"
        f"  export ANTHROPIC_AUTH_TOKEN=proxy-handles-auth   # or your worker key\n"
        f"OpenAI-style clients: base_url=http://localhost:{port}/v1 (or either port above)\n"
        f"Health: curl -s localhost:{port}/health    Metrics: curl -s localhost:{port}/metrics\n"
        f"Dashboard: {stack.dashboard_url}/"
        + ("?token=<DASHBOARD_TOKEN>" if settings.dashboard_token else "")
        + "    Usage per worker: zai-proxy usage --since 5h\n"
        f"Ctrl-C stops everything.")
    waiter = asyncio.create_task(stack.group.wait_any_exit())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if waiter in done:
        child = waiter.result()
        sys.stderr.write(f"zai-proxy up: {child.name} exited with code "
                         f"{child.process.returncode}; stopping the rest\n")
        code = 1
    else:
        waiter.cancel()
        sys.stdout.write("zai-proxy up: stopping\n")
    stopper.cancel()
    await stack.stop()
    return code


def cmd_dashboard(_: argparse.Namespace) -> int:
    from extproc.dashboard.history import HistoryLocked
    from extproc.dashboard.service import check, main

    settings = Settings.from_env()
    check(settings)  # before anything starts: a clear message, exit 2
    try:
        return main(settings)
    except HistoryLocked as exc:
        sys.stderr.write(f"zai-proxy dashboard: {exc}\n")
        return 1
    except OSError as exc:  # e.g. the port is taken
        sys.stderr.write(f"zai-proxy dashboard: cannot serve on {settings.dashboard_address}:"
                         f"{settings.dashboard_port} (DASHBOARD_ADDRESS, DASHBOARD_PORT): {exc}\n")
        return 1


def cmd_usage(args: argparse.Namespace) -> int:
    import sqlite3

    from extproc.dashboard.history import Reader
    from extproc.dashboard.usage import parse_since, render, report

    try:
        parse_since(args.since)
    except ValueError as exc:
        sys.stderr.write(f"zai-proxy usage: {exc}\n")
        return 2
    path = args.db or Settings.from_env().dashboard_db
    try:
        reader = Reader.open(path)
    except FileNotFoundError:
        sys.stderr.write(f"zai-proxy usage: no dashboard history at {path}: the dashboard "
                         "(`zai-proxy dashboard`, or `zai-proxy up`) writes it; point --db or "
                         "DASHBOARD_DB at its file\n")
        return 1
    try:
        sys.stdout.write(render(report(reader, args.since), args.format))
    except sqlite3.DatabaseError as exc:
        sys.stderr.write(f"zai-proxy usage: {path} is not a dashboard history ({exc})\n")
        return 1
    finally:
        reader.close()
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from extproc.canary.commands import state_line, weights_through_api
    from extproc.canary.routes import FileRoutes
    from extproc.routing import weights
    from extproc.routing.envoy_config import routes_path

    settings = Settings.from_env()
    if args.routes_dir:
        settings = Settings.from_env({**os.environ, "ENVOY_ROUTES_DIR": args.routes_dir})
    if getattr(args, "configmap", None) or (settings.routes_configmap and not args.offline):
        return weights_through_api(args, settings)
    # `show` asks Envoy once; a change waits up to 3 s for Envoy to take the file.
    target = FileRoutes(routes_path(settings), None if args.offline else settings.envoy_admin_port,
                        confirm_timeout=0.0 if args.action == "show" else 3.0)
    try:
        if args.action == "show":
            current = target.current()
        else:
            percent = 0 if args.action == "fallback" else args.percent
            note = "fallback to production" if args.action == "fallback" else "zai-proxy weights set"
            current = target.set(percent, note)
    except weights.RoutesError as exc:
        sys.stderr.write(f"zai-proxy weights: refused: {exc}\n(the routes in force are unchanged)\n")
        return 2
    sys.stdout.write(f"split: production {100 - current.canary_percent:g}% / canary "
                     f"{current.canary_percent:g}% on {current.routes} routes\n"
                     f"routes file: {target.path}\nlast change: {current.version}\n")
    if args.action == "show":
        sys.stdout.write(state_line(settings) or "")
    if args.offline:
        return 0
    served, line = target.confirm(current)
    sys.stdout.write(line + "\n")
    return 1 if served is False else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zai-proxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run Envoy + ext_proc (+ the emulator without ZAI_API_KEY)") \
        .set_defaults(func=cmd_up)
    serve = sub.add_parser("serve", help="run the ext_proc service alone")
    serve.add_argument("--role", choices=("admission", "observer"), default="admission",
                       help="admission (default: admits, records, serves /metrics; starts "
                            "EXTPROC_PROCESSES-1 observer processes) or observer (started by it)")
    serve.add_argument("--handoff", default=None,
                       help="observer role: the admission process's gRPC address (host:port)")
    serve.set_defaults(func=cmd_serve)
    render = sub.add_parser("render-envoy", help="write the Envoy bootstrap for this configuration")
    render.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    render.add_argument("--routes", action="store_true",
                        help="write the routes file (weights from CANARY_WEIGHT) instead")
    render.set_defaults(func=cmd_render)
    # The flags go before or after the action (`weights --offline set 10`, `weights set 10
    # --offline`): each action's parser knows them too, without overriding what came before.
    def weights_flags(parser: argparse.ArgumentParser, default: object) -> None:
        parser.add_argument("--routes-dir", default=default,
                            help="ENVOY_ROUTES_DIR of the running gateway")
        parser.add_argument("--offline", action="store_true", default=default,
                            help="edit a routes file only (e.g. deploy/shared in git); do not ask Envoy")
        parser.add_argument("--configmap", metavar="[NAMESPACE/]NAME", default=default,
                            help="in a pod: change this ConfigMap through the Kubernetes API "
                                 "(default ROUTES_CONFIGMAP)")

    weights = sub.add_parser("weights", help="show or change the production/canary split live")
    weights_flags(weights, None)
    actions = weights.add_subparsers(dest="action", required=True)
    for name, text in (("show", "the current split, the last change, and what Envoy serves"),
                       ("set", "send PERCENT of split traffic to the canary"),
                       ("fallback", "send everything to production at once")):
        action = actions.add_parser(name, help=text)
        weights_flags(action, argparse.SUPPRESS)
        if name == "set":
            action.add_argument("percent", type=int)
    weights.set_defaults(func=cmd_weights)
    from extproc.canary.commands import add_parser as add_canary_parser

    add_canary_parser(sub)
    sub.add_parser("dashboard", help="run the dashboard: history, JSON API, live updates, web page "
                   "(DASHBOARD_* settings)").set_defaults(func=cmd_dashboard)
    usage = sub.add_parser("usage", help="tokens, requests and cost by worker, model and variant, "
                           "from the dashboard's history")
    usage.add_argument("--since", default="5h",
                       help="window: a duration (1h, 5h, 7d, ...) or `block` (Z.AI's current 5-hour "
                            "block); default 5h")
    usage.add_argument("--format", choices=("table", "csv", "json"), default="table")
    usage.add_argument("--db", help="the dashboard's history file (default: DASHBOARD_DB)")
    usage.set_defaults(func=cmd_usage)
    # Listed for --help only: main() hands `emulator ...` to the emulator's own parser.
    sub.add_parser("emulator", help="run the Z.AI emulator (see --help after it)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["emulator"]:
        # The emulator has its own parser; argparse would take its --flags for ours.
        from extproc.emulator.cli import main as emulator_main

        return emulator_main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        sys.stderr.write(f"zai-proxy: configuration error: {exc}\n")
        return 2
