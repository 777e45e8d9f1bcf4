"""Envoy configurations for the benchmark's three set-ups, all rendered by `extproc.routing.envoy_config`.

- `write_gateway`: the production bootstrap and routes, unchanged (used by the pass-through and
  the full gateway set-ups: Envoy does the same work in both, only the ext_proc differs);
- `write_floor`: the same, with every ext_proc removed — the request-level
  `envoy.filters.http.ext_proc` and `zai_proxy.observer` HTTP filters, the per-attempt observer in each Z.AI cluster's
  `HttpProtocolOptions.http_filters`, every `ExtProcPerRoute` in the routes, and the gRPC health
  checks of the (now unused) ext_proc clusters. Everything else (listener, access log, local
  replies, retries, clusters, RDS from a file) stays as production has it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from extproc.routing import envoy_config
from extproc.config import Settings

EXT_PROC_TYPE = envoy_config.EXT_PROC_TYPE


def write_gateway(settings: Settings, path: Path) -> Path:
    return envoy_config.write(settings, path, routes="replace")


def strip_bootstrap(bootstrap: dict[str, Any]) -> dict[str, Any]:
    # Every listener: the split's and the pinned entrances' (production-only, canary-only).
    for listener in bootstrap["static_resources"]["listeners"]:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"] = [f for f in hcm["http_filters"]
                               if f.get("typed_config", {}).get("@type") != EXT_PROC_TYPE]
        assert [f["name"] for f in hcm["http_filters"]] == ["envoy.filters.http.router"], hcm["http_filters"]
        _strip_per_route(hcm)  # the pinned entrances' routes are inline
    for cluster in bootstrap["static_resources"]["clusters"]:
        options = cluster.get("typed_extension_protocol_options", {}).get(envoy_config.HTTP_OPTIONS)
        if options is not None:
            options.pop("http_filters", None)  # the per-attempt ext_proc observer
        if cluster["name"].startswith("extproc"):
            cluster.pop("health_checks", None)  # nothing listens there in the floor set-up
    return bootstrap


def _strip_per_route(node: Any) -> None:
    if isinstance(node, dict):
        per_filter = node.get("typed_per_filter_config")
        if per_filter is not None:
            for name in [n for n, c in per_filter.items() if c.get("@type") == envoy_config.EXT_PROC_PER_ROUTE]:
                del per_filter[name]
            if not per_filter:
                del node["typed_per_filter_config"]
        for value in node.values():
            _strip_per_route(value)
    elif isinstance(node, list):
        for value in node:
            _strip_per_route(value)


def strip_routes(doc: dict[str, Any]) -> dict[str, Any]:
    _strip_per_route(doc)
    assert "ExtProcPerRoute" not in yaml.safe_dump(doc)
    return doc


def write_floor(settings: Settings, path: Path) -> Path:
    """Envoy alone: the production config without any ext_proc, in `path` and the routes dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    bootstrap = strip_bootstrap(envoy_config.render(settings))
    text = yaml.safe_dump(bootstrap, sort_keys=False)
    assert "ext_proc.v3" not in text, "an ext_proc filter survived the stripping"
    path.write_text(text)
    envoy_config.write_routes(envoy_config.routes_path(settings),
                              strip_routes(envoy_config.render_routes(settings)))
    return path
