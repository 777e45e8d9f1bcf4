"""Configuration from environment variables.

Every setting is declared once, as a field of `Settings` made by `setting()` (variable name, parser,
default, example, meaning); `SETTINGS`, parsing, start-up errors and the README's configuration
table (`settings_table()`, `python -m extproc.config --table`) all follow from that declaration, so
they cannot drift apart. A bad value stops start-up with a message naming the variable, what is
wrong with the value, and an example of a good one.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A setting has a value the gateway cannot run with."""


@dataclass(frozen=True)
class UpstreamUrl:
    """A Z.AI base URL split into what Envoy needs."""

    scheme: str
    host: str
    port: int
    path: str  # without trailing slash, e.g. "/api/anthropic"

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def authority(self) -> str:
        default = 443 if self.tls else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"

    @property
    def host_is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.path}"

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.authority}"


def parse_url(raw: str) -> UpstreamUrl:
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("http", "https"):
        raise ValueError("must start with https:// (or http:// for a local test server)")
    if not parts.hostname:
        raise ValueError("has no host name")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query string or fragment")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise ValueError(f"has a bad port ({exc})") from None
    return UpstreamUrl(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


def is_loopback(address: str) -> bool:
    """Whether a listen address is reachable from this machine only."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def parse_port(raw: str) -> int:
    port = parse_int(raw)
    if not 0 < port < 65536:
        raise ValueError("must be a TCP port between 1 and 65535")
    return port


def parse_int(raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError("is not a whole number") from None


def parse_positive_int(raw: str) -> int:
    value = parse_int(raw)
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def parse_non_negative_int(raw: str) -> int:
    value = parse_int(raw)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def parse_seconds(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("is not a number of seconds") from None
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("is not a boolean (use true or false)")


_LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def parse_label(raw: str) -> str:
    value = raw.strip()
    if not _LABEL_RE.match(value):
        raise ValueError("must be 1-32 characters of a-z, 0-9, '-' or '_', starting with a letter or digit")
    return value


def parse_log_level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
    return value


def parse_processing(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("observe", "inline"):
        raise ValueError("must be observe or inline")
    return value


def parse_text(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("is empty")
    return value


def parse_host(raw: str) -> str:
    value = raw.strip()
    if not value or any(c in value for c in "/: "):
        raise ValueError("must be a bare host name or IP address")
    return value


def parse_percent(raw: str) -> int:
    value = parse_int(raw)
    if not 0 <= value <= 100:
        raise ValueError("must be a whole percent from 0 to 100")
    return value


def parse_poll_seconds(raw: str) -> float:
    value = parse_int(raw)
    if value < 0:
        raise ValueError("must be 0 (off) or a number of seconds (60 suits Z.AI)")
    return float(value)


def parse_reserve(raw: str) -> float:
    value = parse_percent(raw)
    if value >= 100:
        raise ValueError("must be below 100 (the share of each window kept for priority workers)")
    return float(value)


def parse_list(raw: str) -> tuple[str, ...]:
    items = tuple(item.strip().lower() for item in raw.split(",") if item.strip())
    if not items:
        raise ValueError("must list at least one name, separated by commas")
    return items


# A model name as Z.AI spells them (glm-4.7, glm-4.5-air): no spaces, no glob or list characters.
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
# A MODEL_MAP pattern: a model name that may hold fnmatch wildcards (`*`, `?`, `[...]`).
_MODEL_PATTERN_RE = re.compile(r"^[A-Za-z0-9._:/@+*?\[\]!-]{1,128}$")


def _model_name(value: str, where: str) -> str:
    if not _MODEL_NAME_RE.match(value):
        raise ValueError(f"has {value!r} {where}, which is no model name (letters, digits, "
                         "'.', '-', '_' ...; no spaces or wildcards)")
    return value


def parse_model_map(raw: str) -> tuple[tuple[str, str], ...]:
    """`pattern=model` pairs separated by commas; patterns are fnmatch globs, matched without
    regard to case, first match wins (extproc/proxy/models.py)."""
    pairs: list[tuple[str, str]] = []
    for entry in (item.strip() for item in raw.split(",")):
        if not entry:
            raise ValueError("has an empty entry (two commas, or a comma at an end)")
        pattern, sep, model = (part.strip() for part in entry.partition("="))
        if not sep or not pattern or not model:
            raise ValueError(f"has {entry!r}, which is not `pattern=model`")
        if not _MODEL_PATTERN_RE.match(pattern):
            raise ValueError(f"has the pattern {pattern!r}, which is no model name or glob")
        _model_name(model, f"as the model for {pattern!r}")
        if any(pattern.lower() == known for known, _ in pairs):
            raise ValueError(f"lists the pattern {pattern!r} twice")
        pairs.append((pattern.lower(), model))
    return tuple(pairs)


def parse_model_fallbacks(raw: str) -> tuple[tuple[str, ...], ...]:
    """Chains `a>b>c` separated by commas: a model refused for itself (1311/1312) is retried on
    the next model of its chain. Chains may share models as long as each model has one next
    model and no chain of them leads back to where it started."""
    chains: list[tuple[str, ...]] = []
    after: dict[str, str] = {}
    for entry in (item.strip() for item in raw.split(",")):
        if not entry:
            raise ValueError("has an empty entry (two commas, or a comma at an end)")
        chain = tuple(part.strip() for part in entry.split(">"))
        if len(chain) < 2 or not all(chain):
            raise ValueError(f"has {entry!r}, which is not a chain of two or more models "
                             "separated by '>'")
        for model in chain:
            _model_name(model, f"in the chain {entry!r}")
        for model, following in zip(chain, chain[1:]):
            known = after.setdefault(model.lower(), following.lower())
            if known != following.lower():
                raise ValueError(f"gives {model!r} two next models ({known!r} and "
                                 f"{following!r})")
        chains.append(chain)
    for start in after:
        seen, model = {start}, after[start]
        while model in after:
            if model in seen:
                raise ValueError(f"leads from {start!r} back to {model!r} (a loop would retry "
                                 "forever)")
            seen.add(model)
            model = after[model]
    return tuple(chains)


def parse_base_url(raw: str) -> str:
    """An http(s) base URL (a path prefix allowed), returned without its trailing slash."""
    value = raw.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query string or fragment")
    try:
        parts.port
    except ValueError as exc:
        raise ValueError(f"has a bad port ({exc})") from None
    return value.rstrip("/")


def parse_targets(raw: str) -> tuple[tuple[str, str], ...]:
    """`variant=url` pairs separated by commas: the ext_proc admin endpoints the dashboard
    scrapes (`<url>/metrics`). A variant may be named several times (one entry per replica)."""
    targets: list[tuple[str, str]] = []
    for entry in (item.strip() for item in raw.split(",")):
        if not entry:
            raise ValueError("has an empty entry (two commas, or a comma at an end)")
        variant, sep, url = (part.strip() for part in entry.partition("="))
        if not sep or not variant or not url:
            raise ValueError(f"has {entry!r}, which is not `variant=http://host:port`")
        for what, parse in (("variant", parse_label), ("URL", parse_base_url)):
            try:
                parse(variant if what == "variant" else url)
            except ValueError as exc:
                raise ValueError(f"has {entry!r}, whose {what} {exc}") from None
        variant, url = parse_label(variant), parse_base_url(url)
        url = url[:-len("/metrics")] if url.endswith("/metrics") else url
        if any(url == known for _, known in targets):
            raise ValueError(f"lists {url} twice")
        targets.append((variant, url))
    return tuple(targets)


def parse_interval(raw: str) -> int:
    value = parse_positive_int(raw)
    if 60 % value:
        raise ValueError("must divide a minute evenly (1, 2, 3, 4, 5, 6, 10, 12, 15, 20 or 30)")
    return value


def _state_path(name: str) -> tuple[str, str]:
    """`name` in zai-proxy's state directory: (the path on this machine, the path as documented)."""
    home = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(home, "zai-proxy", name), f"~/.local/state/zai-proxy/{name}"


DEFAULT_STATE_FILE, _STATE_FILE_SHOWN = _state_path("limiter.json")
DEFAULT_ROUTES_DIR, _ROUTES_DIR_SHOWN = _state_path("routes")
DEFAULT_DASHBOARD_DB, _DASHBOARD_DB_SHOWN = _state_path("dashboard.sqlite3")
DEFAULT_CANARY_STATE, _CANARY_STATE_SHOWN = _state_path("canary/state.json")
DEFAULT_CANARY_AUDIT, _CANARY_AUDIT_SHOWN = _state_path("canary/audit.jsonl")
_K8S_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def parse_configmap(raw: str) -> tuple[str | None, str]:
    """`name` or `namespace/name` of a ConfigMap: (namespace or None, name)."""
    namespace, _, name = raw.strip().rpartition("/")
    for part in filter(None, (namespace, name)):
        if not _K8S_NAME_RE.match(part):
            raise ValueError(f"has {part!r}, which is no Kubernetes name (lower-case letters, digits, "
                             "'-', '.')")
    return namespace or None, name


MAX_AUTO_PROCESSES = 4


def parse_processes(raw: str) -> int:
    """`auto` (the host's cores, at most MAX_AUTO_PROCESSES) or a whole number of at least 1."""
    if raw.strip().lower() == "auto":
        return max(1, min(os.cpu_count() or 1, MAX_AUTO_PROCESSES))
    value = parse_int(raw)
    if value < 1:
        raise ValueError("must be `auto` or a whole number of at least 1")
    return value


def parse_optional_port(raw: str) -> int:
    value = parse_int(raw)
    if not 0 <= value < 65536:
        raise ValueError("must be 0 (off) or a TCP port between 1 and 65535")
    return value


DEFAULT_MODEL_LABELS = "glm-4.7,glm-4.6,glm-4.5,glm-4.5-air,glm-4.5-flash,glm-5,glm-4.6v"


@dataclass(frozen=True)
class Setting:
    """One environment variable, as declared on a `Settings` field by `setting()`."""

    env: str  # the variable's name
    attr: str  # the `Settings` field it fills
    parse: Callable[[str], Any]  # raw text -> value; ValueError("<what is wrong>") on a bad value
    default: str | None  # raw text used when the variable is unset or empty; None: the field is None
    example: str  # "NAME=value", shown in errors
    meaning: str  # Markdown, the README's configuration table
    secret: bool = False  # never echoed in errors or repr
    shown_default: str | None = None  # the default as documented, when `default` depends on the machine


_SETTING = "zai_proxy.setting"  # key of a field's `Setting` in its dataclass metadata


def setting(env: str, parse: Callable[[str], Any], default: str | None, example: str, meaning: str, *,
            secret: bool = False, shown_default: str | None = None) -> Any:
    """A `Settings` field read from `env`: its default is `parse(default)`, parsed once here."""
    declared = Setting(env, "", parse, default, example, meaning, secret, shown_default)
    kwargs: dict[str, Any] = {"repr": not secret, "metadata": {_SETTING: declared}}
    if default is None:
        return field(default=None, **kwargs)
    value = parse(default)
    try:
        hash(value)
    except TypeError:  # a mutable value: every Settings gets its own
        return field(default_factory=lambda: parse(default), **kwargs)
    return field(default=value, **kwargs)


@dataclass(frozen=True)
class Settings:
    """The gateway's configuration; each field declares its variable, default, parser and help once."""

    api_key: str | None = setting(
        "ZAI_API_KEY", parse_text, None, "ZAI_API_KEY=<your Z.AI key>",
        "The real upstream key. Without it (and without `ZAI_API_KEY_FILE`) `zai-proxy up` runs the "
        "built-in Z.AI emulator.", secret=True)
    api_key_file: str | None = setting(
        "ZAI_API_KEY_FILE", parse_text, None, "ZAI_API_KEY_FILE=/var/run/secrets/zai/api-key",
        "File holding the upstream key (e.g. a Kubernetes secret mount); re-read when it changes.")
    anthropic_url: UpstreamUrl = setting(  # noqa: RUF009 (UpstreamUrl is frozen: one shared default is safe)
        "ZAI_TARGET_URL", parse_url, "https://api.z.ai/api/anthropic",
        "ZAI_TARGET_URL=https://api.z.ai/api/anthropic", "Z.AI's Anthropic-compatible base URL.")
    openai_url: UpstreamUrl = setting(  # noqa: RUF009 (as above)
        "ZAI_OPENAI_URL", parse_url, "https://api.z.ai/api/coding/paas/v4",
        "ZAI_OPENAI_URL=https://api.z.ai/api/paas/v4",
        "Z.AI's OpenAI-compatible base URL (coding plan by default; the general API is `/api/paas/v4`).")
    deployment_variant: str = setting(
        "DEPLOYMENT_VARIANT", parse_label, "production", "DEPLOYMENT_VARIANT=canary",
        "Value of the `deployment_variant` label on every metric.")
    worker_keys_file: str | None = setting(
        "WORKER_KEYS_FILE", parse_text, None, "WORKER_KEYS_FILE=/etc/zai-proxy/worker-keys",
        "Optional `name key` lines (`name key priority` for workers that may use the quota "
        "reserve); when set, requests must carry one of these keys.")
    listen_address: str = setting(
        "LISTEN_ADDRESS", parse_host, "127.0.0.1", "LISTEN_ADDRESS=0.0.0.0",
        "Address Envoy's listener binds (use `0.0.0.0` to serve other machines, with worker keys; "
        "then `/metrics` and `/health?detail=1` on it need `ADMIN_TOKEN`).")
    listen_port: int = setting(
        "LISTEN_PORT", parse_port, "8080", "LISTEN_PORT=8080",
        "Port of Envoy's listener for the weighted split between production and canary (the "
        "workers' usual entrance).")
    production_listen_port: int = setting(
        "PRODUCTION_LISTEN_PORT", parse_port, "8090", "PRODUCTION_LISTEN_PORT=8090",
        "Port of Envoy's production-only entrance (live traffic and every fallback; ignores the "
        "weights).")
    canary_listen_port: int = setting(
        "CANARY_LISTEN_PORT", parse_port, "8091", "CANARY_LISTEN_PORT=8091",
        "Port of Envoy's canary-only entrance (ignores the weights).")
    envoy_admin_port: int = setting(
        "ENVOY_ADMIN_PORT", parse_port, "9901", "ENVOY_ADMIN_PORT=9901",
        "Port of Envoy's admin interface (loopback only).")
    extproc_host: str = setting(
        "EXTPROC_HOST", parse_host, "127.0.0.1", "EXTPROC_HOST=extproc",
        "Where Envoy finds the ext_proc service.")
    extproc_grpc_port: int = setting(
        "EXTPROC_GRPC_PORT", parse_port, "50051", "EXTPROC_GRPC_PORT=50051",
        "gRPC port of the ext_proc service.")
    extproc_admin_port: int = setting(
        "EXTPROC_ADMIN_PORT", parse_port, "8081", "EXTPROC_ADMIN_PORT=8081",
        "HTTP port of the ext_proc's `/health` and `/metrics`.")
    extproc_observer_port: int | None = setting(
        "EXTPROC_OBSERVER_PORT", parse_port, None, "EXTPROC_OBSERVER_PORT=50053",
        "gRPC port for the observer's copies of bodies, when it is not `EXTPROC_GRPC_PORT` (unset: "
        "the same port). Needed with `EXTPROC_PROCESSES` above 1: the observer processes share it.")
    extproc_processes: int = setting(
        "EXTPROC_PROCESSES", parse_processes, "1", "EXTPROC_PROCESSES=2",
        "Processes of one variant's ext_proc on this host: one admits requests (key swap, limits, "
        "records, `/metrics`), the others (`auto`: up to the host's cores, at most "
        f"{MAX_AUTO_PROCESSES}) take the observer's copies of bodies on `EXTPROC_OBSERVER_PORT` and "
        "hand each request's outcome to it. 1: one process does everything.")
    canary_extproc_host: str = setting(
        "CANARY_EXTPROC_HOST", parse_host, "127.0.0.1", "CANARY_EXTPROC_HOST=zai-proxy-canary-extproc",
        "Where Envoy finds the canary variant's ext_proc service.")
    canary_extproc_grpc_port: int = setting(
        "CANARY_EXTPROC_GRPC_PORT", parse_port, "50052", "CANARY_EXTPROC_GRPC_PORT=50052",
        "gRPC port of the canary ext_proc.")
    canary_extproc_admin_port: int = setting(
        "CANARY_EXTPROC_ADMIN_PORT", parse_port, "8082", "CANARY_EXTPROC_ADMIN_PORT=8082",
        "HTTP port of the canary ext_proc's `/health` and `/metrics`.")
    canary_extproc_observer_port: int | None = setting(
        "CANARY_EXTPROC_OBSERVER_PORT", parse_port, None, "CANARY_EXTPROC_OBSERVER_PORT=50054",
        "The canary ext_proc's observer port (as `EXTPROC_OBSERVER_PORT`; unset: its gRPC port).")
    canary_weight: int = setting(
        "CANARY_WEIGHT", parse_percent, "0", "CANARY_WEIGHT=10",
        "Percent of split traffic sent to the canary when the routes file is first written (then "
        "`zai-proxy weights` or an edit of the routes file changes it live).")
    envoy_routes_dir: str = setting(
        "ENVOY_ROUTES_DIR", parse_text, DEFAULT_ROUTES_DIR, "ENVOY_ROUTES_DIR=/etc/envoy/routes",
        "Directory of Envoy's live routes file (`routes.yaml`, weights included), watched by Envoy.",
        shown_default=_ROUTES_DIR_SHOWN)
    extproc_bind_address: str = setting(
        "EXTPROC_BIND_ADDRESS", parse_host, "127.0.0.1", "EXTPROC_BIND_ADDRESS=0.0.0.0",
        "Address the ext_proc's gRPC and admin servers bind.")
    upstream_ca_file: str = setting(
        "UPSTREAM_CA_FILE", parse_text, "/etc/ssl/certs/ca-certificates.crt",
        "UPSTREAM_CA_FILE=/etc/ssl/certs/ca-certificates.crt",
        "CA bundle Envoy uses to verify Z.AI's certificate.")
    max_request_body_bytes: int = setting(
        "MAX_REQUEST_BODY_BYTES", parse_positive_int, "33554432", "MAX_REQUEST_BODY_BYTES=33554432",
        "Largest request body accepted (agent conversations reach several MB).")
    stream_idle_timeout: float = setting(
        "STREAM_IDLE_TIMEOUT_SECONDS", parse_seconds, "900", "STREAM_IDLE_TIMEOUT_SECONDS=900",
        "A stream with no data for this long is cut; there is no overall stream time limit.")
    extproc_message_timeout_ms: int = setting(
        "EXTPROC_MESSAGE_TIMEOUT_MS", parse_positive_int, "2000", "EXTPROC_MESSAGE_TIMEOUT_MS=2000",
        "How long Envoy waits for the ext_proc's answer to one message before failing the request.")
    max_retries: int = setting(
        "MAX_RETRIES", parse_non_negative_int, "8", "MAX_RETRIES=8",
        "Envoy retries of a failed attempt: connect failures, Z.AI 429s worth retrying (1302, 1303, "
        "1305) and 5xx, with backoff honouring `retry-after`; never quota errors.")
    log_level: str = setting(
        "LOG_LEVEL", parse_log_level, "INFO", "LOG_LEVEL=INFO", "Log verbosity.")
    token_counting: bool = setting(
        "TOKEN_COUNTING_ENABLED", parse_bool, "true", "TOKEN_COUNTING_ENABLED=false",
        "Estimate tokens with tiktoken (request input, and output of streams cut before their usage). "
        "Usage Z.AI reports is always recorded.")
    response_processing: str = setting(
        "RESPONSE_PROCESSING", parse_processing, "observe", "RESPONSE_PROCESSING=inline",
        "How Anthropic-format traffic passes the ext_proc. `observe`: Envoy mirrors request and "
        "response bodies to it without waiting (no added latency per streamed event; token counts go "
        "to the \"Token usage\" log line and metrics, and Envoy's access log carries the `session` "
        "that joins them). `inline`: every chunk waits for the ext_proc, which also puts the final "
        "counts into Envoy's access log. OpenAI-format traffic is always inline (the gateway may "
        "re-frame its stream).")
    model_labels: tuple[str, ...] = setting(
        "MODEL_LABELS", parse_list, DEFAULT_MODEL_LABELS, "MODEL_LABELS=glm-4.7,glm-4.6",
        "Models that get their own `model` label value; any other model is counted as `other`.")
    model_map: tuple[tuple[str, str], ...] | None = setting(
        "MODEL_MAP", parse_model_map, None,
        "MODEL_MAP=claude-sonnet-*=glm-4.7,claude-opus-*=glm-4.7,claude-haiku-*=glm-4.5-air",
        "Rewrites the model requests name, so the fleet's model changes in one place: "
        "`pattern=model` pairs separated by commas; a pattern is an exact name or an fnmatch glob "
        "(`*`, `?`, `[...]`), matched ignoring case, and the first match wins; a model no pattern "
        "matches is sent as named. Only the body's top-level `model` value changes. The usage "
        "record keeps the requested and the served model. With this or `MODEL_FALLBACKS` set, "
        "each upstream attempt waits for the ext_proc to read its body; with neither, bodies are "
        "not read on their way upstream.")
    model_fallbacks: tuple[tuple[str, ...], ...] | None = setting(
        "MODEL_FALLBACKS", parse_model_fallbacks, None,
        "MODEL_FALLBACKS=glm-5.1>glm-4.7>glm-4.5-air",
        "Chains of models separated by `>`, several chains separated by commas (each model has "
        "one next model at most, and no loops): an attempt Z.AI refuses for its model (1312 "
        "model overloaded, 1311 model not in the plan) is retried on the next model of its chain "
        "(the model after `MODEL_MAP`); at the chain's end the client gets Z.AI's last error. "
        "These retries count against `MAX_RETRIES`.")
    rate_limit_initial: int = setting(
        "RATE_LIMIT_INITIAL", parse_positive_int, "3", "RATE_LIMIT_INITIAL=3",
        "Concurrent requests allowed upstream before the limiter has learned anything.")
    rate_limit_min: int = setting(
        "RATE_LIMIT_MIN", parse_positive_int, "1", "RATE_LIMIT_MIN=1",
        "The learned concurrency limit never goes below this.")
    rate_limit_max: int = setting(
        "RATE_LIMIT_MAX", parse_positive_int, "20", "RATE_LIMIT_MAX=20",
        "The learned concurrency limit never goes above this.")
    rate_limit_probe_seconds: float = setting(
        "RATE_LIMIT_PROBE_SECONDS", parse_seconds, "15", "RATE_LIMIT_PROBE_SECONDS=15",
        "How long the limits hold under a learned ceiling before probing one step above it.")
    start_rate_initial: int = setting(
        "START_RATE_INITIAL", parse_positive_int, "600", "START_RATE_INITIAL=600",
        "Requests started per minute before the limiter has learned anything (1303 teaches it).")
    start_rate_min: int = setting(
        "START_RATE_MIN", parse_positive_int, "12", "START_RATE_MIN=12",
        "The learned start rate (requests per minute) never goes below this.")
    start_rate_max: int = setting(
        "START_RATE_MAX", parse_positive_int, "6000", "START_RATE_MAX=6000",
        "The learned start rate (requests per minute) never goes above this.")
    queue_timeout: float = setting(
        "QUEUE_TIMEOUT_SECONDS", parse_seconds, "120", "QUEUE_TIMEOUT_SECONDS=120",
        "Longest a request waits for a free slot before it gets 429 with `retry-after` (Envoy's "
        "`max_message_timeout` is rendered 30 s above it, so any value is honoured).")
    queue_max: int = setting(
        "QUEUE_MAX", parse_positive_int, "1000", "QUEUE_MAX=1000",
        "Most requests waiting at once; past it new requests get 429 at once.")
    max_stream_seconds: float = setting(
        "MAX_STREAM_SECONDS", parse_seconds, "3600", "MAX_STREAM_SECONDS=3600",
        "Longest a request may run; Envoy ends it then, and a slot lease older than this is reclaimed.")
    redis_url: str | None = setting(
        "REDIS_URL", parse_text, None, "REDIS_URL=redis://redis:6379/0",
        "Shared limiter state for several replicas, and where they agree which one records each "
        "request; without it all limits and records are in-process (one process per variant).")
    limiter_state_file: str = setting(
        "LIMITER_STATE_FILE", parse_text, DEFAULT_STATE_FILE,
        "LIMITER_STATE_FILE=/var/lib/zai-proxy/limiter.json",
        "Where a single replica keeps the learned limits across restarts (stale state expires).",
        shown_default=_STATE_FILE_SHOWN)
    worker_budgets_file: str | None = setting(
        "WORKER_BUDGETS_FILE", parse_text, None, "WORKER_BUDGETS_FILE=/etc/zai-proxy/budgets",
        "Optional per-worker budgets, lines `worker rpm=60 tpm=200000` (`*` = every worker).")
    admin_token: str | None = setting(
        "ADMIN_TOKEN", parse_text, None, "ADMIN_TOKEN=<a long random string>",
        "Bearer token for the ext_proc's admin endpoints (`POST /admin/limiter/reset`), and for "
        "`/metrics` and `/health?detail=1` through a listener other machines reach; unset disables "
        "those.", secret=True)
    prices_file: str | None = setting(
        "PRICES_FILE", parse_text, None, "PRICES_FILE=/etc/zai-proxy/prices.json",
        "JSON price table for the estimated-cost metric (shape: `extproc/telemetry/pricing.py`); "
        "built-in GLM list prices otherwise.")
    quota_poll_seconds: float = setting(
        "QUOTA_POLL_SECONDS", parse_poll_seconds, "60", "QUOTA_POLL_SECONDS=60",
        "How often Z.AI's quota report (`/api/monitor/usage/quota/limit` at the origin of "
        "`ZAI_TARGET_URL`) is polled, by one replica per account; `0` turns polling off.")
    quota_reserve_percent: float = setting(
        "QUOTA_RESERVE_PERCENT", parse_reserve, "0", "QUOTA_RESERVE_PERCENT=20",
        "Once a quota window is more than 100 minus this percent used, only `priority` workers "
        "(`WORKER_KEYS_FILE`) are admitted; others get 429 saying what is left and when it resets. "
        "`0` = no reserve.")
    worker_label_limit: int = setting(
        "WORKER_LABEL_LIMIT", parse_positive_int, "100", "WORKER_LABEL_LIMIT=100",
        "Most unnamed workers (key fingerprints) that get their own `worker` label in the "
        "per-worker metrics; later ones count as `other`. Named workers always keep theirs.")
    dashboard_address: str = setting(
        "DASHBOARD_ADDRESS", parse_host, "127.0.0.1", "DASHBOARD_ADDRESS=0.0.0.0",
        "Address `zai-proxy dashboard` binds. Beyond loopback it needs `DASHBOARD_TOKEN` (it "
        "refuses to start without one).")
    dashboard_port: int = setting(
        "DASHBOARD_PORT", parse_port, "8095", "DASHBOARD_PORT=8095",
        "Port of the dashboard (web page, JSON API, live updates); `zai-proxy up` starts it there.")
    dashboard_token: str | None = setting(
        "DASHBOARD_TOKEN", parse_text, None, "DASHBOARD_TOKEN=<a long random string>",
        "Token every dashboard request must carry (`Authorization: Bearer <token>`, or "
        "`?token=<token>` once, which sets a cookie), `/health` excepted. Required when "
        "`DASHBOARD_ADDRESS` is not a loopback address.", secret=True)
    dashboard_db: str = setting(
        "DASHBOARD_DB", parse_text, DEFAULT_DASHBOARD_DB, "DASHBOARD_DB=/var/lib/zai-proxy/dashboard.sqlite3",
        "The dashboard's history (SQLite): 5 s points kept 24 h, 1 min points kept 30 days; "
        "`zai-proxy usage` reads it.", shown_default=_DASHBOARD_DB_SHOWN)
    dashboard_db_max_mb: int = setting(
        "DASHBOARD_DB_MAX_MB", parse_positive_int, "512", "DASHBOARD_DB_MAX_MB=512",
        "Size the dashboard's history may reach; past it the oldest minutes go first.")
    dashboard_interval: int = setting(
        "DASHBOARD_INTERVAL_SECONDS", parse_interval, "5", "DASHBOARD_INTERVAL_SECONDS=5",
        "How often the dashboard collects, and the resolution of its recent history.")
    dashboard_targets: tuple[tuple[str, str], ...] | None = setting(
        "DASHBOARD_TARGETS", parse_targets, None,
        "DASHBOARD_TARGETS=production=http://10.0.0.5:8081,production=http://10.0.0.6:8081,canary=http://10.0.0.7:8081",
        "The ext_proc admin endpoints the dashboard scrapes, `variant=url` separated by commas "
        "(several per variant: replicas, summed). Unset: `EXTPROC_HOST`:`EXTPROC_ADMIN_PORT` "
        "(production) and `CANARY_EXTPROC_HOST`:`CANARY_EXTPROC_ADMIN_PORT` (canary).")
    prometheus_url: str | None = setting(
        "PROMETHEUS_URL", parse_base_url, None, "PROMETHEUS_URL=http://prometheus:9090",
        "When set, the dashboard reads Prometheus's HTTP API (the README's queries, summed by "
        "`deployment_variant`) instead of scraping the ext_procs itself (e.g. in Kubernetes); "
        "`zai-proxy canary` analyses the canary from it (its only source).")

    canary_thresholds_file: str | None = setting(
        "CANARY_THRESHOLDS_FILE", parse_text, None, "CANARY_THRESHOLDS_FILE=/etc/zai-proxy/canary.yaml",
        "The limits `zai-proxy canary analyze` and `rollout` hold the canary to (YAML; shape: "
        "`zai-proxy canary thresholds`); the runbook's defaults otherwise.")
    canary_state_file: str = setting(
        "CANARY_STATE_FILE", parse_text, DEFAULT_CANARY_STATE,
        "CANARY_STATE_FILE=/var/lib/zai-proxy-canary/state.json",
        "Where `zai-proxy canary rollout` keeps its state (step, last verdict, next decision): "
        "what it resumes from, and what the dashboard shows.", shown_default=_CANARY_STATE_SHOWN)
    canary_state_url: str | None = setting(
        "CANARY_STATE_URL", parse_base_url, None,
        "CANARY_STATE_URL=http://zai-proxy-canary-controller:9109/state",
        "Where the dashboard reads the rollout's state when it cannot read `CANARY_STATE_FILE` "
        "(in Kubernetes the file is on the controller's own volume): the controller's `/state` on "
        "`CANARY_METRICS_PORT`. Set, it replaces the file for the dashboard.")
    canary_audit_file: str = setting(
        "CANARY_AUDIT_FILE", parse_text, DEFAULT_CANARY_AUDIT,
        "CANARY_AUDIT_FILE=/var/lib/zai-proxy-canary/audit.jsonl",
        "Append-only record (JSON lines) of every weight change the `canary` commands make: who, "
        "when, from what to what, why.", shown_default=_CANARY_AUDIT_SHOWN)
    canary_metrics_port: int = setting(
        "CANARY_METRICS_PORT", parse_optional_port, "0", "CANARY_METRICS_PORT=9109",
        "Port where `zai-proxy canary rollout` serves its own `/metrics` (`zai_proxy_canary_*`) and "
        "its state file on `/state` (the dashboard's `CANARY_STATE_URL`); `0` = none.")
    routes_configmap: tuple[str | None, str] | None = setting(
        "ROUTES_CONFIGMAP", parse_configmap, None, "ROUTES_CONFIGMAP=zai-proxy/zai-proxy-routes",
        "In a pod: `zai-proxy weights` and `canary` change the split in this ConfigMap "
        "(`name` or `namespace/name`) through the Kubernetes API, with the pod's service "
        "account, instead of a local routes file.")
    kube_service_account_dir: str = setting(
        "KUBE_SERVICE_ACCOUNT_DIR", parse_text, "/var/run/secrets/kubernetes.io/serviceaccount",
        "KUBE_SERVICE_ACCOUNT_DIR=/var/run/secrets/kubernetes.io/serviceaccount",
        "Service account token, CA and namespace used with `ROUTES_CONFIGMAP`.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for declared in SETTINGS:
            raw = env.get(declared.env)
            if raw is None or raw.strip() == "":
                if declared.default is None:
                    continue
                raw = declared.default
            try:
                values[declared.attr] = declared.parse(raw)
            except ValueError as exc:
                shown = "<hidden>" if declared.secret else repr(raw)
                raise ConfigError(
                    f"{declared.env}={shown} {exc}; for example: {declared.example}"
                ) from None
        return cls(**values).check_ranges()

    @property
    def has_upstream_key(self) -> bool:
        return bool(self.api_key or self.api_key_file)

    def check_ranges(self) -> Settings:
        """Cross-setting checks that no single parser can make."""
        if not self.rate_limit_min <= self.rate_limit_initial <= self.rate_limit_max:
            raise ConfigError(
                f"RATE_LIMIT_MIN={self.rate_limit_min}, RATE_LIMIT_INITIAL={self.rate_limit_initial}, "
                f"RATE_LIMIT_MAX={self.rate_limit_max} must satisfy MIN <= INITIAL <= MAX; for "
                "example: RATE_LIMIT_MIN=1 RATE_LIMIT_INITIAL=3 RATE_LIMIT_MAX=20")
        if not self.start_rate_min <= self.start_rate_initial <= self.start_rate_max:
            raise ConfigError(
                f"START_RATE_MIN={self.start_rate_min}, START_RATE_INITIAL={self.start_rate_initial}, "
                f"START_RATE_MAX={self.start_rate_max} must satisfy MIN <= INITIAL <= MAX; for "
                "example: START_RATE_MIN=12 START_RATE_INITIAL=600 START_RATE_MAX=6000")
        return self

    def require_upstream_key(self) -> None:
        if not self.has_upstream_key:
            raise ConfigError(
                "no upstream key: set ZAI_API_KEY (for example: ZAI_API_KEY=<your Z.AI key>) or "
                "ZAI_API_KEY_FILE (for example: ZAI_API_KEY_FILE=/var/run/secrets/zai/api-key)"
            )


SETTINGS: tuple[Setting, ...] = tuple(
    dataclasses.replace(f.metadata[_SETTING], attr=f.name)
    for f in dataclasses.fields(Settings) if _SETTING in f.metadata
)

_TABLE_HEADER = "| variable | default | meaning |"
_README = Path(__file__).resolve().parents[1] / "README.md"


def settings_table() -> str:
    """The README's configuration table (Markdown), one row per setting in declaration order."""
    rows = [_TABLE_HEADER, "|---|---|---|"]
    for s in SETTINGS:
        default = s.default if s.shown_default is None else s.shown_default
        shown = "—" if default is None else f"`{default}`"
        meaning = s.meaning.replace("|", "\\|")
        rows.append(f"| `{s.env}` | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"


def replace_settings_table(readme: str) -> str:
    """`readme` with its configuration table (the header row and the table rows below it) rewritten."""
    lines = readme.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\n") == _TABLE_HEADER]
    if len(starts) != 1:
        raise ValueError(f"expected one line {_TABLE_HEADER!r} in the README, found {len(starts)}")
    end = starts[0]
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "".join(lines[:starts[0]]) + settings_table() + "".join(lines[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m extproc.config", description="The configuration table, from the settings' declarations.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--table", action="store_true", help="print the README's configuration table")
    what.add_argument("--write-readme", nargs="?", const=str(_README), metavar="README",
                      help=f"rewrite the configuration table in README (default: {_README}) in place")
    args = parser.parse_args(argv)
    if args.table:
        sys.stdout.write(settings_table())
        return 0
    path = Path(args.write_readme)
    text = path.read_text(encoding="utf-8")
    updated = replace_settings_table(text)
    if updated != text:
        path.write_text(updated, encoding="utf-8")
    print(f"{path}: configuration table {'rewritten' if updated != text else 'already up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
