"""`zai-proxy canary ...`: analyze, rollout, promote, rollback, status, thresholds.

The command line's edge: it reads the settings, builds the edges (Prometheus, the routes file or
ConfigMap, the files), and hands them to the pure parts. Exit codes: analyze 0 pass, 1 fail,
3 inconclusive; rollout 0 complete, 1 rolled back, 3 stalled (inconclusive), 4 aborted (the split
was changed by someone else), 5 interrupted (run again to resume); 2 always means the command
could not do its work (bad arguments, unreachable metrics or API, a refused resume).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from extproc.canary import rollout
from extproc.canary.durations import format_duration, iso, parse_duration

if TYPE_CHECKING:  # the edges import Envoy's API (slow): loaded by the commands that use them
    from extproc.canary.routes import RoutesTarget
    from extproc.canary.sources import PrometheusSource
    from extproc.canary.thresholds import Thresholds
    from extproc.config import Settings

EXIT_BY_PHASE = {rollout.COMPLETE: 0, rollout.ROLLED_BACK: 1, rollout.STALLED: 3, rollout.ABORTED: 4}
EXIT_ERROR, EXIT_INTERRUPTED = 2, 5
# A ConfigMap reaches every pod within the kubelet's sync period (about a minute): a step is
# judged only after this, unless --settle says otherwise.
CONFIGMAP_SETTLE = 90.0


class CommandError(RuntimeError):
    pass


# ------------------------------------------------------------------------------- edges

def settings_for(args: argparse.Namespace) -> "Settings":
    from extproc.config import Settings

    env = dict(os.environ)
    if getattr(args, "routes_dir", None):
        env["ENVOY_ROUTES_DIR"] = args.routes_dir
    return Settings.from_env(env)


def routes_target(settings: "Settings", configmap: str | None = None,
                  offline: bool = False) -> "RoutesTarget":
    """The split this command changes: ConfigMap (`--configmap`, `ROUTES_CONFIGMAP`) through the
    Kubernetes API, else the routes file in ENVOY_ROUTES_DIR (Envoy asked unless offline)."""
    from extproc.canary.k8s import KubeClient, KubeConfig
    from extproc.canary.routes import ConfigMapRoutes, FileRoutes
    from extproc.config import parse_configmap
    from extproc.routing.envoy_config import routes_path

    spec = parse_configmap(configmap) if configmap else settings.routes_configmap
    if spec is not None:
        namespace, name = spec
        config = KubeConfig.in_cluster(os.environ, settings.kube_service_account_dir, namespace)
        return ConfigMapRoutes(KubeClient(config), name, config.namespace)
    return FileRoutes(routes_path(settings), None if offline else settings.envoy_admin_port)


def metrics_source(settings: "Settings", url: str | None) -> "PrometheusSource":
    from extproc.canary.sources import PrometheusSource

    url = url or settings.prometheus_url
    if not url:
        raise CommandError("no metrics to analyse: set PROMETHEUS_URL (e.g. http://prometheus:9090) "
                           "or pass --prometheus URL")
    return PrometheusSource(url)


def thresholds_for(settings: "Settings", path: str | None) -> "Thresholds":
    from extproc.canary.thresholds import Thresholds

    return Thresholds.load(path or settings.canary_thresholds_file)


def json_log(event: str, **fields: Any) -> None:
    """One decision, one JSON line on stdout."""
    now = time.time()
    doc = {"time": iso(now), "component": "canary", "event": event, **fields}
    sys.stdout.write(json.dumps(doc, default=str) + "\n")
    sys.stdout.flush()


def describe_state(doc: dict[str, Any] | None, now: float) -> str:
    """One paragraph on where the rollout stands (canary status, weights show)."""
    if not doc:
        return "canary rollout: none recorded"
    steps = doc.get("steps") or []
    head = (f"canary rollout {doc.get('rollout')}: {doc.get('phase')}, at {doc.get('weight')}% "
            f"(step {doc.get('step')} of {len(steps)}: {', '.join(f'{s}%' for s in steps)})")
    lines = [head]
    ts = (doc.get("ts") or {}).get("next_decision")
    if doc.get("phase") == rollout.RUNNING and ts is not None:
        left = max(0.0, float(ts) - now)
        nxt = doc.get("next_weight")
        lines.append(f"  next decision {doc.get('next_decision_at')} (in {left:.0f} s)"
                     + (f": analyse, then {nxt}% on pass" if nxt else ""))
    verdict = doc.get("last_verdict")
    if verdict:
        lines.append(f"  last verdict: {verdict.get('verdict')} at {verdict.get('at')}")
        lines += [f"    - {r}" for r in verdict.get("reasons") or []]
    if doc.get("reason"):
        lines.append(f"  last decision: {doc['reason']}")
    if doc.get("pending"):
        lines.append(f"  a change was being made: {doc['pending'].get('from')}% -> "
                     f"{doc['pending'].get('to')}% (settled when the rollout runs again)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- commands

def cmd_analyze(args: argparse.Namespace) -> int:
    from extproc.canary.analysis import analyze, table

    settings = settings_for(args)
    report = analyze(metrics_source(settings, args.prometheus).sample(args.window),
                     thresholds_for(settings, args.thresholds))
    if args.json:
        sys.stdout.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(table(report))
    return report.exit_code


def cmd_rollout(args: argparse.Namespace) -> int:
    from extproc.canary.audit import AuditLog, who
    from extproc.canary.controller import Controller
    from extproc.canary.metrics import CanaryMetrics
    from extproc.canary.port import serve as serve_port
    from extproc.canary.routes import ConfigMapRoutes
    from extproc.canary.rollout import Plan
    from extproc.canary.statefile import RolloutLock, StateFile

    settings = settings_for(args)
    target = routes_target(settings, args.configmap)
    settle = args.settle if args.settle is not None else (
        CONFIGMAP_SETTLE if isinstance(target, ConfigMapRoutes) else 0.0)
    plan = Plan(tuple(args.steps), args.interval, args.window or args.interval, args.max_inconclusive,
                args.on_stall, settle)
    source = metrics_source(settings, args.prometheus)
    thresholds = thresholds_for(settings, args.thresholds)
    states = StateFile(settings.canary_state_file)
    metrics = CanaryMetrics()
    port = args.metrics_port if args.metrics_port is not None else settings.canary_metrics_port
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with RolloutLock(states.path):
        if port:  # the series, and the state for a dashboard that cannot read the file
            serve_port(port, "0.0.0.0", metrics.registry, states.path)  # noqa: S104 - a pod's port
        if args.release == "":
            json_log("rollout idle", reason="no release to roll out (--release / CANARY_RELEASE "
                     "is empty); the split is left as it is")
            if args.stay:
                stop.wait()
            return 0
        controller = Controller(plan, target, source, thresholds, AuditLog(settings.canary_audit_file),
                                states, json_log, who(), release=args.release, metrics=metrics,
                                wait=stop.wait)
        state = controller.run(controller.begin(restart=args.restart))
        code = EXIT_INTERRUPTED if controller.stopped else EXIT_BY_PHASE.get(state.phase, 0)
        if args.stay and not controller.stopped:
            json_log("rollout idle", rollout=state.rollout, phase=state.phase,
                     reason="--stay: serving metrics and the state until stopped")
            stop.wait()
    return code


def _blue_green_checks(args: argparse.Namespace, settings: "Settings",
                      action: str) -> tuple[int, str, str | None, dict[str, str]]:
    """(exit code to refuse with or 0, reason, verdict, checks) of `promote`'s analysis."""
    from extproc.canary.analysis import FAIL, PASS, analyze, table
    from extproc.canary.audit import who

    if args.force:
        return 0, f"forced by {who()} (--force, no analysis)", None, {}
    report = analyze(metrics_source(settings, args.prometheus).sample(args.window),
                     thresholds_for(settings, args.thresholds))
    sys.stdout.write(table(report))
    checks = {c.check: c.verdict for c in report.checks}
    why = "; ".join(report.reasons())
    if report.verdict == PASS:
        return 0, f"analysis passed over {format_duration(args.window)}: {why}", PASS, checks
    what = "fails" if report.verdict == FAIL else "is inconclusive"
    sys.stderr.write(f"zai-proxy canary {action}: refused: the analysis {what}; the split is "
                     f"unchanged (use --force to switch anyway)\n")
    return report.exit_code, why, report.verdict, checks


def _change(args: argparse.Namespace, percent: int, action: str, reason: str,
            verdict: str | None = None, checks: dict[str, str] | None = None) -> int:
    from extproc.canary.audit import AuditLog, who
    from extproc.canary.controller import change_now, stop_recorded
    from extproc.canary.statefile import StateFile

    settings = settings_for(args)
    target = routes_target(settings, args.configmap)
    now = time.time()
    before, split, said = change_now(target, AuditLog(settings.canary_audit_file), percent,
                                     action=action, reason=reason, who=who(),
                                     command=f"canary {action}", now=now, verdict=verdict,
                                     checks=checks)
    stop_recorded(StateFile(settings.canary_state_file), f"canary {action} by {who()}: {reason}", now)
    json_log("weights changed", command=f"canary {action}", **{"from": before}, to=percent,
             reason=reason, version=split.version, envoy=said)
    sys.stdout.write(f"split: production {100 - percent}% / canary {percent}% ({target.describe()})\n"
                     f"{said}\n")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    refused, reason, verdict, checks = _blue_green_checks(args, settings, "promote")
    if refused:
        return refused
    return _change(args, 100, "promote", f"blue-green switchover to the canary: {reason}", verdict, checks)


def cmd_rollback(args: argparse.Namespace) -> int:
    return _change(args, 0, "rollback", args.reason)


def cmd_status(args: argparse.Namespace) -> int:
    from extproc.canary.statefile import StateFile

    settings = settings_for(args)
    doc = StateFile(settings.canary_state_file).read_json()
    if args.json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        sys.stdout.write(describe_state(doc, time.time()) + "\n")
    return 0


def cmd_thresholds(args: argparse.Namespace) -> int:
    from extproc.canary.thresholds import Thresholds, defaults_yaml

    settings = settings_for(args)
    path = args.thresholds or settings.canary_thresholds_file
    if path:
        import yaml

        sys.stdout.write(f"# in force, from {path}\n"
                         + yaml.safe_dump(Thresholds.load(path).as_dict(), sort_keys=False))
    else:
        sys.stdout.write("# the defaults (no CANARY_THRESHOLDS_FILE)\n" + defaults_yaml())
    return 0


def run(args: argparse.Namespace) -> int:
    from extproc.canary.k8s import KubeError
    from extproc.canary.rollout import RolloutError
    from extproc.canary.sources import SourceError
    from extproc.canary.thresholds import ThresholdsError
    from extproc.config import ConfigError
    from extproc.routing import weights

    try:
        return int(args.canary_func(args))
    except (CommandError, SourceError, ThresholdsError, RolloutError, weights.RoutesError,
            KubeError, ConfigError) as exc:
        sys.stderr.write(f"zai-proxy canary {args.canary_action}: {exc}\n")
        return EXIT_ERROR


# ------------------------------------------------------------------------------- parser

def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _steps(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: steps are percents separated by commas, "
                                         "e.g. 5,25,50,100") from None


def add_parser(sub: Any) -> None:
    canary = sub.add_parser("canary", help="analyse the canary against production; roll it out "
                            "step by step, promote it, roll it back")
    actions = canary.add_subparsers(dest="canary_action", required=True)

    def common(parser: argparse.ArgumentParser, split: bool = True, metrics: bool = True) -> None:
        parser.add_argument("--routes-dir", help="ENVOY_ROUTES_DIR of the running gateway")
        if split:
            parser.add_argument("--configmap", metavar="[NAMESPACE/]NAME",
                                help="change the split in this ConfigMap through the Kubernetes API "
                                     "(in a pod; default ROUTES_CONFIGMAP)")
        if metrics:
            parser.add_argument("--prometheus", metavar="URL", help="Prometheus (default PROMETHEUS_URL)")
            parser.add_argument("--thresholds", metavar="FILE",
                                help="thresholds file (default CANARY_THRESHOLDS_FILE, else built in)")

    analyze_ = actions.add_parser("analyze", help="compare the canary with production now: 0 pass, "
                                  "1 fail, 3 inconclusive")
    analyze_.add_argument("--window", type=_duration, default=600.0, help="metrics of the last ... "
                          "(default 10m)")
    analyze_.add_argument("--json", action="store_true", help="the report as JSON")
    common(analyze_, split=False)
    analyze_.set_defaults(canary_func=cmd_analyze)

    roll = actions.add_parser("rollout", help="move the split step by step, analysing before each "
                              "step; roll back at once on a failure")
    roll.add_argument("--steps", type=_steps, default=[5, 25, 50, 100],
                      help="canary percents, in order (default 5,25,50,100)")
    roll.add_argument("--interval", type=_duration, default=300.0,
                      help="time at each step before it is judged (default 5m)")
    roll.add_argument("--window", type=_duration, default=None,
                      help="metrics each analysis looks at (default: the interval)")
    roll.add_argument("--max-inconclusive", type=int, default=6,
                      help="inconclusive analyses in a row before the rollout stalls (default 6)")
    roll.add_argument("--on-stall", choices=rollout.ON_STALL, default="hold",
                      help="when it stalls: hold the split where it is (default) or roll back")
    roll.add_argument("--settle", type=_duration, default=None,
                      help="wait after each change before the step's time starts (default 0 for "
                           "a routes file, 90s for a ConfigMap: the kubelet's delivery)")
    roll.add_argument("--release", help="name of the canary release: a finished rollout of the same "
                      "release is not started again, a new one replaces an unfinished one (from "
                      "0%%); empty: nothing to roll out (the controller Deployment sets it)")
    roll.add_argument("--restart", action="store_true",
                      help="start a new rollout from the split as it is, ignoring a recorded one")
    roll.add_argument("--stay", action="store_true",
                      help="once finished, keep serving metrics until stopped (a Deployment)")
    roll.add_argument("--metrics-port", type=int, default=None,
                      help="serve /metrics here (default CANARY_METRICS_PORT; 0 = none)")
    common(roll)
    roll.set_defaults(canary_func=cmd_rollout)

    promote = actions.add_parser("promote", help="blue-green: all of the split to the canary, "
                                 "after a passing analysis")
    promote.add_argument("--force", action="store_true", help="without the analysis")
    promote.add_argument("--window", type=_duration, default=600.0, help="analysis window (default 10m)")
    common(promote)
    promote.set_defaults(canary_func=cmd_promote)

    back = actions.add_parser("rollback", help="all of the split to production at once")
    back.add_argument("--reason", default="manual rollback", help="why (kept in the audit file)")
    common(back, metrics=False)
    back.set_defaults(canary_func=cmd_rollback)

    status = actions.add_parser("status", help="where the rollout stands (the state file)")
    status.add_argument("--json", action="store_true", help="the state file as it is")
    common(status, split=False, metrics=False)
    status.set_defaults(canary_func=cmd_status)

    limits = actions.add_parser("thresholds", help="the thresholds in force (the file format)")
    limits.add_argument("--thresholds", metavar="FILE", help="a thresholds file to check and show")
    limits.add_argument("--routes-dir", help=argparse.SUPPRESS)
    limits.set_defaults(canary_func=cmd_thresholds)

    canary.set_defaults(func=run)


def state_line(settings: "Settings") -> str | None:
    """For `weights show`: the recorded rollout, if any."""
    from extproc.canary.rollout import RolloutError
    from extproc.canary.statefile import StateFile

    try:
        doc = StateFile(settings.canary_state_file).read_json()
    except RolloutError:
        return None
    return describe_state(doc, time.time()) + "\n" if doc else None


def weights_through_api(args: argparse.Namespace, settings: "Settings") -> int:
    """`zai-proxy weights show|set|fallback` on the routes ConfigMap (Kubernetes API)."""
    from extproc.canary.k8s import KubeError
    from extproc.canary.routes import percent_of
    from extproc.routing import weights

    try:
        target = routes_target(settings, args.configmap)
        if args.action == "show":
            current = target.current()
        else:
            percent = 0 if args.action == "fallback" else args.percent
            note = "fallback to production" if args.action == "fallback" else "zai-proxy weights set"
            current = target.set(percent, note)
        percent_of(current)
    except (weights.RoutesError, KubeError) as exc:
        sys.stderr.write(f"zai-proxy weights: refused: {exc}\n(the routes in force are unchanged)\n")
        return 2
    sys.stdout.write(f"split: production {100 - current.canary_percent:g}% / canary "
                     f"{current.canary_percent:g}% on {current.routes} routes\n"
                     f"routes: {target.describe()}\nlast change: {current.version}\n")
    if args.action == "show":
        sys.stdout.write(state_line(settings) or "")
    else:
        sys.stdout.write(target.confirm(current)[1] + "\n")
    return 0

