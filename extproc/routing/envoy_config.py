"""Render the Envoy bootstrap and the live routes file from `envoy/` and the configuration.

`envoy/envoy.yaml` is the single source of truth, written for one deployment variant. This fills
its ${...} placeholders, adapts the upstream clusters to the URL scheme (TLS or plain http) and
host kind (name or IP), expands `envoy/local_replies.yaml` into local-reply mappers for both API
formats, and expands the variants:

- every ext_proc and Z.AI cluster exists once per variant (`extproc_canary`, `zai_anthropic_canary`,
  ...); each Z.AI cluster carries the per-attempt ext_proc filter of its own variant;
- the template's `route_config` becomes the routes file Envoy watches (RDS from a file), with a
  weighted split between the variants (sticky per worker: hashed on its credential), and
  entrances pinned to one variant under `/production/...` and `/canary/...`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from importlib import resources
import os
from pathlib import Path
from string import Template
from typing import Any, Mapping, Sequence

import yaml

from extproc.api import OPENAI_PATH_REGEX
from extproc.config import Settings, UpstreamUrl, is_loopback
from extproc.proxy import header_names
from extproc.proxy.models import ModelRules
from extproc.proxy.ticket import METADATA_NAMESPACE
from extproc.variants import DEFAULT, Variant

# The templates ship inside the package (also reachable as the repository's top-level envoy/).
TEMPLATES = resources.files("extproc.routing") / "envoy"
QUEUE_TIMEOUT_HEADROOM = 30.0
# On a listener other machines reach, /metrics and /health?detail=1 are for operators: Envoy marks
# what it forwards to the ext_proc's admin port, which then asks for ADMIN_TOKEN (telemetry/admin.py).
PUBLIC_LISTENER_HEADER = {"header": {"key": "x-zai-proxy-listener", "value": "public"},
                          "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
# The request filter's stream on routes whose bodies pass it inline says so (proxy/servicer.py).
INLINE_METADATA = {"key": "x-zai-proxy-bodies", "value": "inline"}
ROUTES_FILE = "routes.yaml"
ROUTE_CONFIG_NAME = "gateway"
PER_VARIANT_CLUSTERS = ("extproc", "extproc_admin", "zai_anthropic", "zai_openai")
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
OBSERVER_FILTER = "zai_proxy.observer"
# Streams per observer connection when observer processes share a port (see _observer_connections).
OBSERVER_STREAMS_PER_CONNECTION = 16
EXT_PROC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
EXT_PROC_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
# Routes whose bodies pass through the ext_proc inline (it may change them): the request body
# buffered whole, every response chunk answered before Envoy forwards it.
INLINE_MODE = {"request_header_mode": "SEND", "response_header_mode": "SEND",
               "request_body_mode": "BUFFERED", "response_body_mode": "STREAMED",
               "request_trailer_mode": "SKIP", "response_trailer_mode": "SEND"}
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ROUTE_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
# Sticky variant: the same credential hashes to the same variant while the weights hold.
STICKY_HASH = [{"header": {"header_name": "authorization"}},
               {"header": {"header_name": "x-api-key"}}]


def _seconds(value: float) -> str:
    return f"{value:.3f}s"


def placeholders(settings: Settings) -> dict[str, str]:
    values: dict[str, Any] = {
        "ENVOY_ADMIN_PORT": settings.envoy_admin_port,
        "LISTEN_ADDRESS": settings.listen_address,
        "LISTEN_PORT": settings.listen_port,
        "STREAM_IDLE_TIMEOUT": _seconds(settings.stream_idle_timeout),
        "MAX_STREAM_DURATION": _seconds(settings.max_stream_seconds),
        "MAX_REQUEST_BODY_BYTES": settings.max_request_body_bytes,
        "MAX_RETRIES": settings.max_retries,
        "EXTPROC_MESSAGE_TIMEOUT": _seconds(settings.extproc_message_timeout_ms / 1000),
        # A queued request's wait (override_message_timeout) must fit under Envoy's maximum.
        "MAX_MESSAGE_TIMEOUT": _seconds(settings.queue_timeout + QUEUE_TIMEOUT_HEADROOM),
        "EXTPROC_HOST": settings.extproc_host,
        "EXTPROC_GRPC_PORT": settings.extproc_grpc_port,
        "EXTPROC_ADMIN_PORT": settings.extproc_admin_port,
        "UPSTREAM_CA_FILE": settings.upstream_ca_file,
    }
    for prefix, url in (("ANTHROPIC", settings.anthropic_url), ("OPENAI", settings.openai_url)):
        values |= {
            f"{prefix}_HOST": url.host,
            f"{prefix}_PORT": url.port,
            f"{prefix}_PATH": url.path,
            f"{prefix}_AUTHORITY": url.authority,
            f"{prefix}_SAN_TYPE": "IP_ADDRESS" if url.host_is_ip else "DNS",
        }
    return {k: str(v) for k, v in values.items()}


def _template(settings: Settings) -> tuple[dict[str, Any], dict[str, str]]:
    values = placeholders(settings)
    text = Template((TEMPLATES / "envoy.yaml").read_text()).substitute(values)
    return yaml.safe_load(text), values


@dataclass(frozen=True)
class ExtprocAddress:
    """Where a variant's ext_proc listens (gRPC for Envoy, admin HTTP for /health and /metrics)."""

    host: str
    grpc_port: int
    admin_port: int
    # Where the observer's copies go (EXTPROC_OBSERVER_PORT), when not to the gRPC port.
    observer_port: int | None = None

    @classmethod
    def of(cls, settings: Settings, variant: Variant) -> "ExtprocAddress":
        if variant is Variant.CANARY:
            return cls(settings.canary_extproc_host, settings.canary_extproc_grpc_port,
                       settings.canary_extproc_admin_port, settings.canary_extproc_observer_port)
        return cls(settings.extproc_host, settings.extproc_grpc_port, settings.extproc_admin_port,
                   settings.extproc_observer_port)

    @property
    def observer(self) -> int:
        return self.observer_port or self.grpc_port


def _hcm(bootstrap: dict[str, Any]) -> dict[str, Any]:
    return bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def routes_path(settings: Settings) -> Path:
    return Path(settings.envoy_routes_dir) / ROUTES_FILE


Replicas = Mapping[Variant, Sequence[ExtprocAddress]]


def render(settings: Settings, replicas: Replicas | None = None) -> dict[str, Any]:
    """The bootstrap: listeners and clusters; routes come from the watched routes file.
    `replicas`: every ext_proc process of a variant, when it runs more than the one its settings
    name (Envoy balances that variant's streams over them, as over a Kubernetes Service)."""
    bootstrap, values = _template(settings)
    hcm = _hcm(bootstrap)
    hcm["local_reply_config"]["mappers"].extend(local_reply_mappers(values))
    router = hcm["http_filters"][-1]["typed_config"]
    attempt_filters = router.pop("upstream_http_filters")
    attempt_filters[0]["typed_config"]["extension_config"]["typed_config"]["forward_rules"] = \
        forward_rules(header_names.ATTEMPT)
    if ModelRules.of(settings).active:
        _read_attempt_bodies(hcm, attempt_filters, values)
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    _adapt_upstream(clusters["zai_anthropic"], settings.anthropic_url)
    _adapt_upstream(clusters["zai_openai"], settings.openai_url)
    bootstrap["static_resources"]["clusters"] = _variant_clusters(clusters, attempt_filters, settings,
                                                                  replicas or {})
    _attempt_connections(bootstrap["static_resources"]["clusters"])
    _observer_connections(bootstrap["static_resources"]["clusters"], settings, replicas or {})
    for http_filter in hcm["http_filters"]:
        if http_filter["typed_config"]["@type"] == EXT_PROC_TYPE:
            observer = http_filter["name"] == OBSERVER_FILTER
            own = "extproc_observer" if observer else "extproc"
            http_filter["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = \
                DEFAULT.suffixed(own)
            http_filter["typed_config"]["forward_rules"] = (
                forward_rules(header_names.OBSERVER) if observer else
                forward_rules(header_names.REQUEST_FILTER, header_names.REQUEST_FILTER_PREFIXES))
    template_routes = hcm.pop("route_config")
    listener = bootstrap["static_resources"]["listeners"][0]
    bootstrap["static_resources"]["listeners"].extend(
        _pinned_listener(listener, template_routes, variant, settings) for variant in Variant)
    directory = str(Path(settings.envoy_routes_dir).resolve())
    hcm["rds"] = {"route_config_name": ROUTE_CONFIG_NAME, "config_source": {
        "resource_api_version": "V3",
        "path_config_source": {"path": f"{directory}/{ROUTES_FILE}",
                               "watched_directory": {"path": directory}}}}
    return bootstrap


def forward_rules(names: Sequence[str], prefixes: Sequence[str] = ()) -> dict[str, Any]:
    """An ext_proc filter's `forward_rules`: only the headers its stream reads reach the
    ext_proc (extproc/proxy/header_names.py). Pseudo-headers are matched by name, like others."""
    patterns = [{"exact": name} for name in names] + [{"prefix": prefix} for prefix in prefixes]
    return {"allowed_headers": {"patterns": patterns}}


def _read_attempt_bodies(hcm: dict[str, Any], attempt_filters: list[dict[str, Any]],
                         values: dict[str, str]) -> None:
    """With MODEL_MAP or MODEL_FALLBACKS: every upstream attempt's request waits for the attempt
    filter, which sets the attempt's model in the body (extproc/proxy/models.py). The filter
    keeps where the request stands in the `zai_proxy` dynamic metadata (an upstream filter's
    metadata is the request's: the next attempt, the observer and the access log read it), and
    the request filter reads it too (inline routes record the served model). Without them nothing
    here is rendered: attempts are not held, and bodies reach only the request-level filters."""
    attempt = attempt_filters[0]["typed_config"]["extension_config"]["typed_config"]
    # Headers SEND: with them skipped, Envoy 1.40's upstream ext_proc does not hold a BUFFERED body.
    attempt["processing_mode"] |= {"request_header_mode": "SEND", "request_body_mode": "BUFFERED"}
    attempt["metadata_options"] = {"forwarding_namespaces": {"untyped": [METADATA_NAMESPACE]},
                                   "receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}}
    # It holds the request now, so it gets the time any ext_proc answer gets.
    attempt["message_timeout"] = values["EXTPROC_MESSAGE_TIMEOUT"]
    request_filter = hcm["http_filters"][0]["typed_config"]
    request_filter["metadata_options"]["forwarding_namespaces"] = {"untyped": [METADATA_NAMESPACE]}


# The attempt filter's own connections to the ext_proc when it holds request bodies: buffers no
# single body, nor many at once, can fill (see _attempt_connections).
ATTEMPT_CONNECTION_BUFFER = 1 << 30
ATTEMPT_WINDOW = (1 << 31) - 1


def _attempt_connections(clusters: list[dict[str, Any]]) -> None:
    """The attempt filters talk to their variant's ext_proc over connections of their own, with
    buffers and HTTP/2 windows no request body fills. Measured on Envoy 1.40: while an attempt
    filter holds a request (its body on the way to the ext_proc), a full HTTP/2 connection to the
    ext_proc (the observer sending its copy of a body of 1 MB or more is enough) raises a
    flow-control callback on every stream over it, and in the upstream filter that crashes Envoy
    (a null dereference) every time; over its own connection it does not."""
    by_name = {c["name"]: c for c in clusters}
    for variant in Variant:
        own = copy.deepcopy(by_name[variant.suffixed("extproc")])
        own["name"] = own["load_assignment"]["cluster_name"] = variant.suffixed("extproc_attempts")
        own["per_connection_buffer_limit_bytes"] = ATTEMPT_CONNECTION_BUFFER
        own["typed_extension_protocol_options"][HTTP_OPTIONS]["explicit_http_config"] = {
            "http2_protocol_options": {"initial_stream_window_size": ATTEMPT_WINDOW,
                                       "initial_connection_window_size": ATTEMPT_WINDOW}}
        clusters.append(own)
        for name in ("zai_anthropic", "zai_openai"):
            options = by_name[variant.suffixed(name)]["typed_extension_protocol_options"]
            attempt = options[HTTP_OPTIONS]["http_filters"][0]["typed_config"]["extension_config"]["typed_config"]
            attempt["grpc_service"]["envoy_grpc"]["cluster_name"] = own["name"]


def _observer_connections(clusters: list[dict[str, Any]], settings: Settings,
                          replicas: Replicas) -> None:
    """The observer's copies of bodies go over connections of their own: a body of megabytes
    fills an HTTP/2 connection's window, and Envoy 1.40 then raises flow-control callbacks on
    every stream of that connection, which crashes it in the other ext_proc filters (measured:
    concurrent 1-8 MB bodies). Its connections get windows no body fills (the ext_proc reads
    them as fast as it can; the copies are bounded by MAX_REQUEST_BODY_BYTES per request)."""
    by_name = {c["name"]: c for c in clusters}
    for variant in Variant:
        own = copy.deepcopy(by_name[variant.suffixed("extproc")])
        own["name"] = own["load_assignment"]["cluster_name"] = variant.suffixed("extproc_observer")
        own["per_connection_buffer_limit_bytes"] = ATTEMPT_CONNECTION_BUFFER
        http2: dict[str, Any] = {"initial_stream_window_size": ATTEMPT_WINDOW,
                                 "initial_connection_window_size": ATTEMPT_WINDOW}
        own["typed_extension_protocol_options"][HTTP_OPTIONS]["explicit_http_config"] = {
            "http2_protocol_options": http2}
        # The observer port (EXTPROC_OBSERVER_PORT), where one is set: there, several observer
        # processes share it (SO_REUSEPORT), and the kernel spreads connections, not streams, over
        # them: a bounded number of streams per connection makes Envoy open several.
        extprocs = replicas.get(variant) or [ExtprocAddress.of(settings, variant)]
        if any(extproc.observer_port for extproc in extprocs):
            http2["max_concurrent_streams"] = OBSERVER_STREAMS_PER_CONNECTION
            endpoints = own["load_assignment"]["endpoints"][0]["lb_endpoints"]
            for endpoint, extproc in zip(endpoints, extprocs):
                endpoint["endpoint"]["address"]["socket_address"]["port_value"] = extproc.observer
        clusters.append(own)


def _variant_clusters(clusters: dict[str, Any], attempt_filters: list[dict[str, Any]],
                      settings: Settings, replicas: Replicas) -> list[dict[str, Any]]:
    out = [c for name, c in clusters.items() if name not in PER_VARIANT_CLUSTERS]
    for variant in Variant:
        extprocs = replicas.get(variant) or [ExtprocAddress.of(settings, variant)]
        for name in PER_VARIANT_CLUSTERS:
            cluster = copy.deepcopy(clusters[name])
            cluster["name"] = cluster["load_assignment"]["cluster_name"] = variant.suffixed(name)
            if name in ("extproc", "extproc_admin"):
                endpoints = cluster["load_assignment"]["endpoints"][0]
                template = endpoints["lb_endpoints"][0]
                endpoints["lb_endpoints"] = []
                for extproc in extprocs:
                    endpoint = copy.deepcopy(template)
                    port = extproc.grpc_port if name == "extproc" else extproc.admin_port
                    endpoint["endpoint"]["address"]["socket_address"] = {
                        "address": extproc.host, "port_value": port}
                    endpoints["lb_endpoints"].append(endpoint)
            if name.startswith("zai_"):
                filters = copy.deepcopy(attempt_filters)
                attempt = filters[0]["typed_config"]["extension_config"]["typed_config"]
                attempt["grpc_service"]["envoy_grpc"]["cluster_name"] = variant.suffixed("extproc")
                cluster["typed_extension_protocol_options"][HTTP_OPTIONS]["http_filters"] = filters
            out.append(cluster)
    return out


def _extproc_override(variant: Variant, inline: bool) -> dict[str, Any]:
    """Both request-level ext_proc filters of a Z.AI route: sent to the variant's ext_proc, and
    either the request filter takes the bodies inline (the observer is off) or the observer
    gets copies of them."""
    service = {"envoy_grpc": {"cluster_name": variant.suffixed("extproc")}}
    main: dict[str, Any] = {"grpc_service": service}
    if inline:
        main["processing_mode"] = INLINE_MODE
        main["grpc_service"] = {**service, "initial_metadata": [INLINE_METADATA]}
        observer: dict[str, Any] = {"@type": EXT_PROC_PER_ROUTE, "disabled": True}
    else:
        # An overriding grpc_service replaces the filter's whole one, its metadata included.
        observed = {"envoy_grpc": {"cluster_name": variant.suffixed("extproc_observer")},
                    "initial_metadata": [{"key": "x-zai-proxy-phase", "value": "observer"}]}
        observer = {"@type": EXT_PROC_PER_ROUTE, "overrides": {"grpc_service": observed}}
    return {EXT_PROC_FILTER: {"@type": EXT_PROC_PER_ROUTE, "overrides": main},
            OBSERVER_FILTER: observer}


def inline_route(cluster: str, settings: Settings) -> bool:
    """OpenAI streams may be re-framed (usage chunk requested on the client's behalf), so their
    bodies are always inline; Anthropic ones as RESPONSE_PROCESSING says."""
    return cluster == "zai_openai" or settings.response_processing == "inline"


def listen_port(settings: Settings, variant: Variant | None) -> int:
    """The port of an entrance: the split (None), or one variant only."""
    if variant is None:
        return settings.listen_port
    return settings.production_listen_port if variant is Variant.PRODUCTION else settings.canary_listen_port


def _pinned_listener(split: dict[str, Any], template_routes: dict[str, Any], variant: Variant,
                     settings: Settings) -> dict[str, Any]:
    """An entrance that serves one variant only, whatever the weights say: the split listener with
    its own port and its routes inline (they never change at run time)."""
    listener = copy.deepcopy(split)
    listener["name"] = variant.suffixed("gateway")
    listener["address"]["socket_address"]["port_value"] = listen_port(settings, variant)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stat_prefix"] = variant.suffixed("gateway")
    hcm.pop("rds", None)
    routes = copy.deepcopy(template_routes)
    entries: list[dict[str, Any]] = []
    for route in routes["virtual_hosts"][0]["routes"]:
        if route["name"] == "not_found":
            entries.append(_openai_not_found(route))
        entries.append(_variant_entry(route, variant, settings) if "route" in route else copy.deepcopy(route))
    routes["virtual_hosts"][0]["routes"] = _mark_admin_routes(entries, settings)
    routes["name"] = variant.suffixed(ROUTE_CONFIG_NAME)
    hcm["route_config"] = routes
    return listener


def _variant_entry(route: dict[str, Any], variant: Variant, settings: Settings,
                   prefixed: bool = False) -> dict[str, Any]:
    """A route sent to one variant's clusters; `prefixed`: under `/<variant>/` (on the split)."""
    entry = copy.deepcopy(route)
    cluster = entry["route"].pop("cluster")
    entry["route"]["cluster"] = variant.suffixed(cluster)
    if prefixed:
        match = entry["match"]
        key = next(iter(match))
        entry["name"] = variant.suffixed(route["name"])
        entry["match"] = {key: f"/{variant.value}{match[key]}"}
        if key == "path" and "prefix_rewrite" not in entry["route"]:
            entry["route"]["prefix_rewrite"] = match[key]
    if cluster.startswith("zai_"):
        entry["typed_per_filter_config"] = _extproc_override(variant, inline_route(cluster, settings))
    return entry


def _mark_admin_routes(routes: list[dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    if not is_loopback(settings.listen_address):
        for route in routes:
            if route.get("route", {}).get("cluster", "").startswith("extproc_admin"):
                route["request_headers_to_add"] = [copy.deepcopy(PUBLIC_LISTENER_HEADER)]
    return routes


def render_routes(settings: Settings, canary_weight: int | None = None,
                  version: str = "initial") -> dict[str, Any]:
    """The routes file: a DiscoveryResponse holding the RouteConfiguration Envoy watches."""
    bootstrap, _ = _template(settings)
    template = _hcm(bootstrap)["route_config"]
    weight = settings.canary_weight if canary_weight is None else canary_weight
    routes: list[dict[str, Any]] = []
    for route in template["virtual_hosts"][0]["routes"]:
        if route["name"] == "not_found":
            routes.append(_openai_not_found(route))
        routes.extend(_expand_route(route, weight, settings))
    template["virtual_hosts"][0]["routes"] = _mark_admin_routes(routes, settings)
    template["name"] = ROUTE_CONFIG_NAME
    return {"version_info": version, "resources": [{"@type": ROUTE_CONFIG_TYPE, **template}]}


def _openai_not_found(route: dict[str, Any]) -> dict[str, Any]:
    """The 404 of a path that implies the OpenAI API, in its format (the template's is Anthropic's)."""
    openai = copy.deepcopy(route)
    openai["name"] = "not_found_openai"
    openai["match"] = {"safe_regex": {"regex": OPENAI_PATH_REGEX}}
    message = json.loads(route["direct_response"]["body"]["inline_string"])["error"]["message"]
    openai["direct_response"]["body"]["inline_string"] = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "code": "unknown_url"}},
        separators=(",", ":"))
    return openai


def _expand_route(route: dict[str, Any], canary_weight: int, settings: Settings) -> list[dict[str, Any]]:
    route = copy.deepcopy(route)  # YAML aliases share one dict between routes
    action = route.get("route")
    if action is None:  # a direct response
        return [route]
    pinned = [_variant_entry(route, variant, settings, prefixed=True) for variant in Variant]
    cluster = action.pop("cluster")
    split = copy.deepcopy(route)
    if cluster.startswith("zai_"):
        split["route"]["weighted_clusters"] = {"use_hash_policy": True, "clusters": [
            {"name": variant.suffixed(cluster), "weight": variant.share(canary_weight),
             "typed_per_filter_config": _extproc_override(variant, inline_route(cluster, settings))}
            for variant in Variant]}
        split["route"]["hash_policy"] = copy.deepcopy(STICKY_HASH)
    else:  # /health and /metrics without a prefix: the default variant's ext_proc
        split["route"]["cluster"] = DEFAULT.suffixed(cluster)
    return pinned + [split]


def _adapt_upstream(cluster: dict[str, Any], url: UpstreamUrl) -> None:
    if not url.tls:
        del cluster["transport_socket"]
        options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        del options["auto_config"]
        options["explicit_http_config"] = {"http_protocol_options": {}}
    elif url.host_is_ip:
        # SNI carries host names only; the certificate is still checked against the IP SAN.
        del cluster["transport_socket"]["typed_config"]["sni"]


def local_reply_mappers(values: dict[str, str]) -> list[dict[str, Any]]:
    cases = yaml.safe_load((TEMPLATES / "local_replies.yaml").read_text())
    openai_path = {"header_filter": {"header": {
        "name": ":path", "string_match": {"safe_regex": {"regex": OPENAI_PATH_REGEX}}}}}
    mappers: list[dict[str, Any]] = []
    for case in cases:
        message = " ".join(Template(case["message"]).safe_substitute(values).split())
        cel = {"extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": case["when"]}}}
        openai_body = {"error": {"message": message, "type": case["openai_type"],
                                 "code": case["name"]}}
        anthropic_body = {"type": "error", "error": {"type": case["anthropic_type"], "message": message}}
        for filt, body in (({"and_filter": {"filters": [openai_path, cel]}}, openai_body),
                           (cel, anthropic_body)):
            mapper: dict[str, Any] = {
                "filter": filt,
                "body_format_override": {"json_format": body, "content_type": "application/json"},
            }
            if case.get("status"):
                mapper["status_code"] = case["status"]
            if case.get("retry_after"):
                mapper["headers_to_add"] = [{
                    "header": {"key": "retry-after", "value": str(case["retry_after"])},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
            mappers.append(mapper)
    return mappers


def write(settings: Settings, path: Path, routes: str = "keep", replicas: Replicas | None = None) -> Path:
    """Write the bootstrap to `path`, and the routes file: `routes="keep"` leaves an existing
    one alone (its weights are live state), `"replace"` writes it from CANARY_WEIGHT."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(render(settings, replicas), sort_keys=False))
    target = routes_path(settings)
    if routes == "replace" or not target.exists():
        write_routes(target, render_routes(settings))
    return path


def write_routes(target: Path, doc: dict[str, Any]) -> None:
    """Atomically: Envoy reloads on the rename into the watched directory, never half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, target)
