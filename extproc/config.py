"""Configuration from environment variables.

Every setting is declared once in `SETTINGS` (name, parser, default, example, meaning) so that
parsing, start-up errors and the README table cannot drift apart. A bad value stops start-up with
a message naming the variable, what is wrong with the value, and an example of a good one.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
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


def parse_list(raw: str) -> tuple[str, ...]:
    items = tuple(item.strip().lower() for item in raw.split(",") if item.strip())
    if not items:
        raise ValueError("must list at least one name, separated by commas")
    return items


DEFAULT_STATE_FILE = os.path.join(
    os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "zai-proxy", "limiter.json")
DEFAULT_ROUTES_DIR = os.path.join(
    os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "zai-proxy", "routes")
DEFAULT_MODEL_LABELS = "glm-4.7,glm-4.6,glm-4.5,glm-4.5-air,glm-4.5-flash,glm-5,glm-4.6v"


@dataclass(frozen=True)
class Setting:
    env: str
    attr: str
    parse: Callable[[str], Any]
    default: str | None
    example: str
    meaning: str
    secret: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("ZAI_API_KEY", "api_key", parse_text, None, "ZAI_API_KEY=<your Z.AI key>",
            "The real upstream key. Without it (and without ZAI_API_KEY_FILE) `zai-proxy up` runs "
            "the built-in Z.AI emulator.", secret=True),
    Setting("ZAI_API_KEY_FILE", "api_key_file", parse_text, None,
            "ZAI_API_KEY_FILE=/var/run/secrets/zai/api-key",
            "File holding the upstream key (e.g. a Kubernetes secret mount); re-read when it changes."),
    Setting("ZAI_TARGET_URL", "anthropic_url", parse_url, "https://api.z.ai/api/anthropic",
            "ZAI_TARGET_URL=https://api.z.ai/api/anthropic", "Z.AI's Anthropic-compatible base URL."),
    Setting("ZAI_OPENAI_URL", "openai_url", parse_url, "https://api.z.ai/api/coding/paas/v4",
            "ZAI_OPENAI_URL=https://api.z.ai/api/paas/v4",
            "Z.AI's OpenAI-compatible base URL (coding plan by default; the general API is /api/paas/v4)."),
    Setting("DEPLOYMENT_VARIANT", "deployment_variant", parse_label, "production",
            "DEPLOYMENT_VARIANT=canary", "Value of the deployment_variant label on every metric."),
    Setting("WORKER_KEYS_FILE", "worker_keys_file", parse_text, None,
            "WORKER_KEYS_FILE=/etc/zai-proxy/worker-keys",
            "Optional `name key` lines; when set, requests must carry one of these keys."),
    Setting("LISTEN_ADDRESS", "listen_address", parse_host, "127.0.0.1", "LISTEN_ADDRESS=0.0.0.0",
            "Address Envoy's listener binds (use 0.0.0.0 to serve other machines, with worker keys)."),
    Setting("LISTEN_PORT", "listen_port", parse_port, "8080", "LISTEN_PORT=8080",
            "Port of Envoy's listener (the workers' entrance)."),
    Setting("ENVOY_ADMIN_PORT", "envoy_admin_port", parse_port, "9901", "ENVOY_ADMIN_PORT=9901",
            "Port of Envoy's admin interface (loopback only)."),
    Setting("EXTPROC_HOST", "extproc_host", parse_host, "127.0.0.1", "EXTPROC_HOST=extproc",
            "Where Envoy finds the ext_proc service."),
    Setting("EXTPROC_GRPC_PORT", "extproc_grpc_port", parse_port, "50051", "EXTPROC_GRPC_PORT=50051",
            "gRPC port of the ext_proc service."),
    Setting("EXTPROC_ADMIN_PORT", "extproc_admin_port", parse_port, "8081", "EXTPROC_ADMIN_PORT=8081",
            "HTTP port of the ext_proc's /health and /metrics."),
    Setting("CANARY_EXTPROC_HOST", "canary_extproc_host", parse_host, "127.0.0.1",
            "CANARY_EXTPROC_HOST=zai-proxy-canary-extproc",
            "Where Envoy finds the canary variant's ext_proc service."),
    Setting("CANARY_EXTPROC_GRPC_PORT", "canary_extproc_grpc_port", parse_port, "50052",
            "CANARY_EXTPROC_GRPC_PORT=50052", "gRPC port of the canary ext_proc."),
    Setting("CANARY_EXTPROC_ADMIN_PORT", "canary_extproc_admin_port", parse_port, "8082",
            "CANARY_EXTPROC_ADMIN_PORT=8082", "HTTP port of the canary ext_proc's /health and /metrics."),
    Setting("CANARY_WEIGHT", "canary_weight", parse_percent, "0", "CANARY_WEIGHT=10",
            "Percent of split traffic sent to the canary when the routes file is first written "
            "(then `zai-proxy weights` or an edit of the routes file changes it live)."),
    Setting("ENVOY_ROUTES_DIR", "envoy_routes_dir", parse_text, DEFAULT_ROUTES_DIR,
            "ENVOY_ROUTES_DIR=/etc/envoy/routes",
            "Directory of Envoy's live routes file (routes.yaml, weights included), watched by Envoy."),
    Setting("EXTPROC_BIND_ADDRESS", "extproc_bind_address", parse_host, "127.0.0.1",
            "EXTPROC_BIND_ADDRESS=0.0.0.0", "Address the ext_proc's gRPC and admin servers bind."),
    Setting("UPSTREAM_CA_FILE", "upstream_ca_file", parse_text, "/etc/ssl/certs/ca-certificates.crt",
            "UPSTREAM_CA_FILE=/etc/ssl/certs/ca-certificates.crt",
            "CA bundle Envoy uses to verify Z.AI's certificate."),
    Setting("MAX_REQUEST_BODY_BYTES", "max_request_body_bytes", parse_positive_int, "33554432",
            "MAX_REQUEST_BODY_BYTES=33554432",
            "Largest request body accepted (agent conversations reach several MB)."),
    Setting("STREAM_IDLE_TIMEOUT_SECONDS", "stream_idle_timeout", parse_seconds, "900",
            "STREAM_IDLE_TIMEOUT_SECONDS=900",
            "A stream with no data for this long is cut; there is no overall stream time limit."),
    Setting("EXTPROC_MESSAGE_TIMEOUT_MS", "extproc_message_timeout_ms", parse_positive_int, "2000",
            "EXTPROC_MESSAGE_TIMEOUT_MS=2000",
            "How long Envoy waits for the ext_proc's answer to one message before failing the request."),
    Setting("MAX_RETRIES", "max_retries", parse_non_negative_int, "8", "MAX_RETRIES=8",
            "Envoy retries of a failed attempt: connect failures, Z.AI 429s worth retrying "
            "(1302, 1303, 1305) and 5xx, with backoff honouring retry-after; never quota errors."),
    Setting("LOG_LEVEL", "log_level", parse_log_level, "INFO", "LOG_LEVEL=INFO", "Log verbosity."),
    Setting("TOKEN_COUNTING_ENABLED", "token_counting", parse_bool, "true",
            "TOKEN_COUNTING_ENABLED=false",
            "Estimate tokens with tiktoken (request input, and output of streams cut before their "
            "usage). Usage Z.AI reports is always recorded."),
    Setting("RESPONSE_PROCESSING", "response_processing", parse_processing, "observe",
            "RESPONSE_PROCESSING=inline",
            "How Anthropic-format traffic passes the ext_proc. `observe`: Envoy mirrors request and "
            "response bodies to it without waiting (no added latency per streamed event; token "
            "counts go to the \"Token usage\" log line and metrics). `inline`: every chunk waits "
            "for the ext_proc, which also puts the final counts into Envoy's access log. OpenAI-"
            "format traffic is always inline (the gateway may re-frame its stream)."),
    Setting("MODEL_LABELS", "model_labels", parse_list, DEFAULT_MODEL_LABELS,
            "MODEL_LABELS=glm-4.7,glm-4.6",
            "Models that get their own `model` label value; any other model is counted as `other`."),
    Setting("RATE_LIMIT_INITIAL", "rate_limit_initial", parse_positive_int, "3", "RATE_LIMIT_INITIAL=3",
            "Concurrent requests allowed upstream before the limiter has learned anything."),
    Setting("RATE_LIMIT_MIN", "rate_limit_min", parse_positive_int, "1", "RATE_LIMIT_MIN=1",
            "The learned concurrency limit never goes below this."),
    Setting("RATE_LIMIT_MAX", "rate_limit_max", parse_positive_int, "20", "RATE_LIMIT_MAX=20",
            "The learned concurrency limit never goes above this."),
    Setting("RATE_LIMIT_PROBE_SECONDS", "rate_limit_probe_seconds", parse_seconds, "15",
            "RATE_LIMIT_PROBE_SECONDS=15",
            "How long the limits hold under a learned ceiling before probing one step above it."),
    Setting("START_RATE_INITIAL", "start_rate_initial", parse_positive_int, "600",
            "START_RATE_INITIAL=600",
            "Requests started per minute before the limiter has learned anything (1303 teaches it)."),
    Setting("START_RATE_MIN", "start_rate_min", parse_positive_int, "12", "START_RATE_MIN=12",
            "The learned start rate (requests per minute) never goes below this."),
    Setting("START_RATE_MAX", "start_rate_max", parse_positive_int, "6000", "START_RATE_MAX=6000",
            "The learned start rate (requests per minute) never goes above this."),
    Setting("QUEUE_TIMEOUT_SECONDS", "queue_timeout", parse_seconds, "120", "QUEUE_TIMEOUT_SECONDS=120",
            "Longest a request waits for a free slot before it gets 429 with retry-after."),
    Setting("QUEUE_MAX", "queue_max", parse_positive_int, "1000", "QUEUE_MAX=1000",
            "Most requests waiting at once; past it new requests get 429 at once."),
    Setting("MAX_STREAM_SECONDS", "max_stream_seconds", parse_seconds, "3600", "MAX_STREAM_SECONDS=3600",
            "Longest a request may run; Envoy ends it then, and a slot lease older than this is reclaimed."),
    Setting("REDIS_URL", "redis_url", parse_text, None, "REDIS_URL=redis://redis:6379/0",
            "Shared limiter state for several replicas; without it all limits are in-process."),
    Setting("LIMITER_STATE_FILE", "limiter_state_file", parse_text, DEFAULT_STATE_FILE,
            "LIMITER_STATE_FILE=/var/lib/zai-proxy/limiter.json",
            "Where a single replica keeps the learned limits across restarts (stale state expires)."),
    Setting("WORKER_BUDGETS_FILE", "worker_budgets_file", parse_text, None,
            "WORKER_BUDGETS_FILE=/etc/zai-proxy/budgets",
            "Optional per-worker budgets, lines `worker rpm=60 tpm=200000` (`*` = every worker)."),
    Setting("ADMIN_TOKEN", "admin_token", parse_text, None, "ADMIN_TOKEN=<a long random string>",
            "Bearer token for the ext_proc's admin endpoints (POST /admin/limiter/reset); unset "
            "disables them.", secret=True),
    Setting("PRICES_FILE", "prices_file", parse_text, None, "PRICES_FILE=/etc/zai-proxy/prices.json",
            "JSON price table for the estimated-cost metric (shape: extproc/telemetry/pricing.py); "
            "built-in GLM list prices otherwise."),
)


@dataclass(frozen=True)
class Settings:
    api_key: str | None = field(default=None, repr=False)
    api_key_file: str | None = None
    anthropic_url: UpstreamUrl = field(default_factory=lambda: parse_url("https://api.z.ai/api/anthropic"))
    openai_url: UpstreamUrl = field(default_factory=lambda: parse_url("https://api.z.ai/api/coding/paas/v4"))
    deployment_variant: str = "production"
    worker_keys_file: str | None = None
    listen_address: str = "127.0.0.1"
    listen_port: int = 8080
    envoy_admin_port: int = 9901
    extproc_host: str = "127.0.0.1"
    extproc_grpc_port: int = 50051
    extproc_admin_port: int = 8081
    extproc_bind_address: str = "127.0.0.1"
    canary_extproc_host: str = "127.0.0.1"
    canary_extproc_grpc_port: int = 50052
    canary_extproc_admin_port: int = 8082
    canary_weight: int = 0
    envoy_routes_dir: str = DEFAULT_ROUTES_DIR
    upstream_ca_file: str = "/etc/ssl/certs/ca-certificates.crt"
    max_request_body_bytes: int = 33554432
    stream_idle_timeout: float = 900.0
    extproc_message_timeout_ms: int = 2000
    max_retries: int = 8
    log_level: str = "INFO"
    token_counting: bool = True
    response_processing: str = "observe"
    model_labels: tuple[str, ...] = tuple(DEFAULT_MODEL_LABELS.split(","))
    prices_file: str | None = None
    rate_limit_initial: int = 3
    rate_limit_min: int = 1
    rate_limit_max: int = 20
    rate_limit_probe_seconds: float = 15.0
    start_rate_initial: int = 600
    start_rate_min: int = 12
    start_rate_max: int = 6000
    queue_timeout: float = 120.0
    queue_max: int = 1000
    max_stream_seconds: float = 3600.0
    redis_url: str | None = None
    limiter_state_file: str = DEFAULT_STATE_FILE
    worker_budgets_file: str | None = None
    admin_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = env.get(setting.env)
            if raw is None or raw.strip() == "":
                if setting.default is None:
                    continue
                raw = setting.default
            try:
                values[setting.attr] = setting.parse(raw)
            except ValueError as exc:
                shown = "<hidden>" if setting.secret else repr(raw)
                raise ConfigError(
                    f"{setting.env}={shown} {exc}; for example: {setting.example}"
                ) from None
        return cls(**values).check_ranges()

    @property
    def has_upstream_key(self) -> bool:
        return bool(self.api_key or self.api_key_file)

    def check_ranges(self) -> "Settings":
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
