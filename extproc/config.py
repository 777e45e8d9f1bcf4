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


def _state_path(name: str) -> tuple[str, str]:
    """`name` in zai-proxy's state directory: (the path on this machine, the path as documented)."""
    home = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(home, "zai-proxy", name), f"~/.local/state/zai-proxy/{name}"


DEFAULT_STATE_FILE, _STATE_FILE_SHOWN = _state_path("limiter.json")
DEFAULT_ROUTES_DIR, _ROUTES_DIR_SHOWN = _state_path("routes")
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
    canary_extproc_host: str = setting(
        "CANARY_EXTPROC_HOST", parse_host, "127.0.0.1", "CANARY_EXTPROC_HOST=zai-proxy-canary-extproc",
        "Where Envoy finds the canary variant's ext_proc service.")
    canary_extproc_grpc_port: int = setting(
        "CANARY_EXTPROC_GRPC_PORT", parse_port, "50052", "CANARY_EXTPROC_GRPC_PORT=50052",
        "gRPC port of the canary ext_proc.")
    canary_extproc_admin_port: int = setting(
        "CANARY_EXTPROC_ADMIN_PORT", parse_port, "8082", "CANARY_EXTPROC_ADMIN_PORT=8082",
        "HTTP port of the canary ext_proc's `/health` and `/metrics`.")
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
