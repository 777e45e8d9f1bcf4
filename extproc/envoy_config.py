"""Render the Envoy bootstrap in `envoy/` from the configuration.

`envoy/envoy.yaml` is the single source of truth; this fills its ${...} placeholders, adapts the
upstream clusters to the URL scheme (TLS or plain http) and host kind (name or IP), and expands
`envoy/local_replies.yaml` into local-reply mappers for both API formats.
"""

from __future__ import annotations

import os
from pathlib import Path
from string import Template
from typing import Any

import yaml

from .config import Settings, UpstreamUrl

ENVOY_DIR = Path(os.environ.get("ZAI_PROXY_ENVOY_DIR", Path(__file__).resolve().parent.parent / "envoy"))
OPENAI_PATH_PREFIX = "/v1/chat/completions"


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


def render(settings: Settings) -> dict[str, Any]:
    values = placeholders(settings)
    text = Template((ENVOY_DIR / "envoy.yaml").read_text()).substitute(values)
    bootstrap: dict[str, Any] = yaml.safe_load(text)
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    _adapt_upstream(clusters["zai_anthropic"], settings.anthropic_url)
    _adapt_upstream(clusters["zai_openai"], settings.openai_url)
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["local_reply_config"]["mappers"].extend(local_reply_mappers(values))
    return bootstrap


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
    cases = yaml.safe_load((ENVOY_DIR / "local_replies.yaml").read_text())
    openai_path = {"header_filter": {"header": {
        "name": ":path", "string_match": {"prefix": OPENAI_PATH_PREFIX}}}}
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


def write(settings: Settings, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(render(settings), sort_keys=False))
    return path
