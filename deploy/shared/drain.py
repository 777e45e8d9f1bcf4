"""preStop hook of a zai-proxy pod: let open requests finish before the containers are stopped.

Kubernetes runs this in the ext_proc container (ConfigMap `zai-proxy-drain`, python from the
zai-proxy image, standard library only) when the pod is deleted: rolling update, scale-down,
eviction. Meanwhile the pod has left its Services' endpoints (and the headless canary ext_proc
Service's DNS), so no new work arrives through them. It:

1. asks this pod's Envoy (admin port, loopback) to drain its listeners: responses on open
   connections carry `Connection: close` (HTTP/2: GOAWAY), so clients with keep-alive
   connections reconnect through the Service to another pod;
2. waits until nothing is open any more: Envoy's active downstream requests on all its listeners
   (the split, production-only and canary-only entrances: streams this pod's Envoy carries,
   whichever variant's ext_proc processes them) and this ext_proc's
   `zai_proxy_requests_in_progress` (streams it processes, also for other pods' Envoys: the canary
   ext_proc serves the production pods' canary share) — both zero twice in a row — or until
   `--timeout` (keep it below the pod's terminationGracePeriodSeconds);
3. touches the marker file the Envoy container's preStop hook waits for, so Envoy is stopped only
   after this, then exits: the kubelet then sends SIGTERM to the ext_proc.

Agent streams run for many minutes; without this, a rollout cuts every open stream.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

# The listeners' stat_prefixes: `gateway` (the split, envoy/envoy.yaml), `gateway_production` and
# `gateway_canary` (the pinned entrances the renderer adds).
ENVOY_ACTIVE = r"http\.gateway(?:_[a-z]+)?\.downstream_rq_active"
IN_PROGRESS = "zai_proxy_requests_in_progress"
_STAT = re.compile(r"^" + ENVOY_ACTIVE + r":\s*(\d+)\s*$", re.M)
STATS_QUERY = urllib.parse.urlencode({"filter": "^" + ENVOY_ACTIVE + "$"})
_SAMPLE = re.compile(r"^" + IN_PROGRESS + r"(?:\{[^}]*\})?\s+(\S+)", re.M)


def envoy_active(text: str) -> int:
    """Active downstream requests from Envoy's /stats text, all listeners together."""
    return sum(int(count) for count in _STAT.findall(text))


def extproc_in_progress(text: str) -> int:
    """Requests the ext_proc is processing, from its Prometheus /metrics text."""
    return int(sum(float(value) for value in _SAMPLE.findall(text)))


def _get(url: str, timeout: float, method: str = "GET") -> str | None:
    """The body, or None when nothing answers (that process is gone: nothing open there)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method),  # noqa: S310
                                    timeout=timeout) as resp:
            return resp.read().decode("utf-8", "replace")
    except OSError:
        return None


def log(message: str) -> None:
    sys.stdout.write(f"zai-proxy drain: {message}\n")
    sys.stdout.flush()


def drain(envoy_admin: str, extproc_admin: str, marker: Path, timeout: float, settle: float,
          poll: float) -> bool:
    """True when everything finished in time, False at the deadline."""
    deadline = time.monotonic() + timeout
    if _get(f"{envoy_admin}/drain_listeners?graceful", 5.0, method="POST") is None:
        log("Envoy's admin interface did not answer; waiting for open requests anyway")
    time.sleep(settle)  # endpoint and DNS removal reach the clients, Envoys and kube-proxies
    quiet = 0
    finished = False
    while True:
        stats = _get(f"{envoy_admin}/stats?{STATS_QUERY}", 5.0)
        metrics = _get(f"{extproc_admin}/metrics", 5.0)
        envoy = envoy_active(stats) if stats is not None else 0
        extproc = extproc_in_progress(metrics) if metrics is not None else 0
        quiet = quiet + 1 if envoy == 0 and extproc == 0 else 0
        if quiet >= 2:
            finished = True
            break
        if time.monotonic() >= deadline:
            log(f"deadline of {timeout:g}s reached with {envoy} request(s) open in Envoy and "
                f"{extproc} in the ext_proc; stopping anyway")
            break
        time.sleep(poll)
    if finished:
        log("no open requests; stopping")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return finished


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="longest wait in seconds (default 900, STREAM_IDLE_TIMEOUT_SECONDS)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds to wait after draining Envoy before counting (default 5)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between counts")
    parser.add_argument("--marker", type=Path, default=Path("/run/zai-proxy/drained"),
                        help="file touched when done; the Envoy container's preStop waits for it")
    args = parser.parse_args(argv)
    envoy_admin = f"http://127.0.0.1:{os.environ.get('ENVOY_ADMIN_PORT', '9901')}"
    extproc_admin = f"http://127.0.0.1:{os.environ.get('EXTPROC_ADMIN_PORT', '8081')}"
    drain(envoy_admin, extproc_admin, args.marker, args.timeout, args.settle, args.poll)
    return 0


if __name__ == "__main__":
    sys.exit(main())
