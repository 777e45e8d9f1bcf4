"""The canary split in Envoy's live routes file: read it, change it, check it.

Envoy watches the routes file (RDS from a file) and swaps routes in place when a new file is moved
into its directory: open streams keep going, new requests follow the new weights. A file Envoy
cannot accept is refused by Envoy, which keeps the last good routes; `validate` catches such a
file before it is written, with a message that says what is wrong.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.request import urlopen

import yaml
from envoy.config.route.v3 import route_pb2  # noqa: F401 - registers the Any types used
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2  # noqa: F401
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

from extproc.routing.envoy_config import ROUTE_CONFIG_TYPE, write_routes
from extproc.variants import Variant

UPSTREAM_CLUSTERS = ("zai_anthropic", "zai_openai")


class RoutesError(ValueError):
    """The routes file cannot be used; the message says why."""


@dataclass(frozen=True)
class Split:
    canary_percent: float
    routes: int  # weighted routes found
    version: str


def load(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RoutesError(f"{path} does not exist: is the gateway running with this "
                          "ENVOY_ROUTES_DIR?") from None
    except yaml.YAMLError as exc:
        raise RoutesError(f"{path} is not valid YAML: {exc}") from None
    validate(doc)
    return doc


def validate(doc: Any) -> None:
    """Refuse what Envoy would refuse, and splits that make no sense, in words."""
    if not isinstance(doc, dict) or not isinstance(doc.get("resources"), list) or not doc["resources"]:
        raise RoutesError('the routes file must be a mapping with a non-empty "resources" list '
                          "holding one RouteConfiguration")
    resource = doc["resources"][0]
    if not isinstance(resource, dict) or resource.get("@type") != ROUTE_CONFIG_TYPE:
        raise RoutesError(f'resources[0] must have "@type": {ROUTE_CONFIG_TYPE}')
    try:
        json_format.ParseDict(json.loads(json.dumps(doc)), discovery_pb2.DiscoveryResponse())
    except json_format.ParseError as exc:
        raise RoutesError(f"Envoy would reject the routes: {exc}") from None
    known = {v.suffixed(c) for c in UPSTREAM_CLUSTERS for v in Variant}
    for route, weighted in _weighted(doc):
        clusters = weighted.get("clusters") or []
        names = [c.get("name") for c in clusters]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise RoutesError(f"route {route!r} names unknown clusters {unknown}; known: {sorted(known)}")
        if sum(int(c.get("weight", 0)) for c in clusters) <= 0:
            raise RoutesError(f"route {route!r}: the weights add up to 0, so it would send nothing")


def _weighted(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for vhost in doc["resources"][0].get("virtual_hosts") or []:
        for route in vhost.get("routes") or []:
            weighted = (route.get("route") or {}).get("weighted_clusters")
            if isinstance(weighted, dict):
                found.append((route.get("name", "?"), weighted))
    return found


def split(doc: dict[str, Any]) -> Split:
    shares = []
    for _, weighted in _weighted(doc):
        weights = {Variant.of_suffixed(c["name"]): int(c.get("weight", 0)) for c in weighted["clusters"]}
        total = sum(weights.values())
        shares.append(100.0 * weights.get(Variant.CANARY, 0) / total)
    percent = shares[0] if shares and all(s == shares[0] for s in shares) else float("nan")
    return Split(percent, len(shares), str(doc.get("version_info", "")))


def with_canary(doc: dict[str, Any], percent: int, note: str, now: float) -> dict[str, Any]:
    if not 0 <= percent <= 100:
        raise RoutesError(f"the canary share must be a percent from 0 to 100, not {percent}")
    weighted = _weighted(doc)
    if not weighted:
        raise RoutesError("the routes file has no weighted split to change")
    for _, clusters in weighted:
        for cluster in clusters["clusters"]:
            variant = Variant.of_suffixed(cluster["name"])
            if variant is None:
                raise RoutesError(f"the split names a cluster of no known variant: {cluster['name']!r}")
            cluster["weight"] = variant.share(percent)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    doc["version_info"] = f"{stamp} canary={percent}% ({note})"
    validate(doc)
    return doc


def unchanged(doc: dict[str, Any], percent: int) -> bool:
    """Every weighted route already gives the canary exactly `percent` (as `with_canary` would)."""
    weighted = _weighted(doc)
    return bool(weighted) and all(
        int(c.get("weight", 0)) == (Variant.of_suffixed(c["name"]) or Variant.PRODUCTION).share(percent)
        for _, w in weighted for c in w.get("clusters") or [])


def apply(path: Path, percent: int, note: str, now: float | None = None) -> Split:
    doc = load(path)
    if unchanged(doc, percent):
        # Envoy skips routes whose content did not change (and keeps the old version): the file
        # stays as it is, so what it says and what Envoy serves still agree.
        return split(doc)
    doc = with_canary(doc, percent, note, time.time() if now is None else now)
    write_routes(path, doc)
    return split(doc)


def envoy_version(admin_port: int, timeout: float = 2.0) -> str | None:
    """The version of the routes Envoy is serving now (None if Envoy cannot be asked)."""
    url = f"http://127.0.0.1:{admin_port}/config_dump?resource=dynamic_route_configs"
    try:
        with urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback admin
            dump = json.load(resp)
    except (URLError, OSError, ValueError):
        return None
    for config in dump.get("configs", []):
        if config.get("route_config", {}).get("name"):
            return str(config.get("version_info", ""))
    return None
