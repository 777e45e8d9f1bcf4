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


def parse_list(raw: str) -> tuple[str, ...]:
    items = tuple(item.strip().lower() for item in raw.split(",") if item.strip())
    if not items:
        raise ValueError("must list at least one name, separated by commas")
    return items


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
    Setting("MAX_RETRIES", "max_retries", parse_non_negative_int, "2", "MAX_RETRIES=2",
            "Envoy retries of requests that never reached Z.AI (connect failures, refused streams)."),
    Setting("LOG_LEVEL", "log_level", parse_log_level, "INFO", "LOG_LEVEL=INFO", "Log verbosity."),
    Setting("TOKEN_COUNTING_ENABLED", "token_counting", parse_bool, "true",
            "TOKEN_COUNTING_ENABLED=false",
            "Estimate tokens with tiktoken (request input, and output of streams cut before their "
            "usage). Usage Z.AI reports is always recorded."),
    Setting("MODEL_LABELS", "model_labels", parse_list, DEFAULT_MODEL_LABELS,
            "MODEL_LABELS=glm-4.7,glm-4.6",
            "Models that get their own `model` label value; any other model is counted as `other`."),
    Setting("PRICES_FILE", "prices_file", parse_text, None, "PRICES_FILE=/etc/zai-proxy/prices.json",
            "JSON price table for the estimated-cost metric (shape: extproc/pricing.py); "
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
    upstream_ca_file: str = "/etc/ssl/certs/ca-certificates.crt"
    max_request_body_bytes: int = 33554432
    stream_idle_timeout: float = 900.0
    extproc_message_timeout_ms: int = 2000
    max_retries: int = 2
    log_level: str = "INFO"
    token_counting: bool = True
    model_labels: tuple[str, ...] = tuple(DEFAULT_MODEL_LABELS.split(","))
    prices_file: str | None = None

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
        return cls(**values)

    @property
    def has_upstream_key(self) -> bool:
        return bool(self.api_key or self.api_key_file)

    def require_upstream_key(self) -> None:
        if not self.has_upstream_key:
            raise ConfigError(
                "no upstream key: set ZAI_API_KEY (for example: ZAI_API_KEY=<your Z.AI key>) or "
                "ZAI_API_KEY_FILE (for example: ZAI_API_KEY_FILE=/var/run/secrets/zai/api-key)"
            )
