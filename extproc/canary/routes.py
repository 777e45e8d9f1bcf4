"""Where the split lives, behind one interface: the routes file Envoy watches (local, compose), or
ConfigMap `zai-proxy-routes` through the Kubernetes API (every pod's Envoy watches its mount).

Both change the weights the way `zai-proxy weights set` does (`weights.with_canary`: every
weighted route, validated, a version naming the change) and `confirm` says what is known about
Envoy serving it: locally Envoy's admin `/config_dump` names the routes version it serves; in
Kubernetes each kubelet delivers the ConfigMap to its pod on its own schedule (usually within a
minute), so the caller allows for that (`Plan.settle`) before it judges the new step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Protocol

import yaml

from extproc.canary.k8s import KubeClient, KubeConflict, KubeError
from extproc.routing import weights
from extproc.routing.envoy_config import ROUTES_FILE


class RoutesTarget(Protocol):
    def describe(self) -> str: ...

    def current(self) -> weights.Split: ...

    def set(self, percent: int, note: str) -> weights.Split: ...

    def confirm(self, split: weights.Split) -> tuple[bool | None, str]: ...


def percent_of(split: weights.Split) -> int:
    """The canary's share as a whole percent; a split whose routes disagree cannot be driven."""
    if split.canary_percent != split.canary_percent:  # NaN
        raise weights.RoutesError("the weighted routes do not all have the same split; set one with "
                                  "`zai-proxy weights set <percent>` first")
    return int(round(split.canary_percent))


class FileRoutes:
    """The live routes file; `admin_port` None: do not ask Envoy (a file in git)."""

    def __init__(self, path: Path, admin_port: int | None, confirm_timeout: float = 3.0,
                 sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.admin_port = admin_port
        self.confirm_timeout = confirm_timeout
        self.sleep = sleep
        self.monotonic = monotonic

    def describe(self) -> str:
        return f"routes file {self.path}"

    def current(self) -> weights.Split:
        return weights.split(weights.load(self.path))

    def set(self, percent: int, note: str) -> weights.Split:
        return weights.apply(self.path, percent, note)

    def confirm(self, split: weights.Split) -> tuple[bool | None, str]:
        if self.admin_port is None:
            return None, "offline: Envoy not asked"
        deadline = self.monotonic() + self.confirm_timeout
        serving = weights.envoy_version(self.admin_port)
        while serving is not None and serving != split.version and self.monotonic() < deadline:
            self.sleep(0.1)
            serving = weights.envoy_version(self.admin_port)
        if serving is None:
            return None, "Envoy: not reachable on its admin port; cannot confirm what it serves"
        if serving == split.version:
            return True, "Envoy: serving these routes"
        return False, (f"Envoy: still serving {serving!r} — it refused the file (see its log); the "
                       "last good routes stay in force")


class ConfigMapRoutes:
    """ConfigMap `name` (key `routes.yaml`) through the Kubernetes API."""

    def __init__(self, client: KubeClient, name: str, namespace: str | None = None,
                 key: str = ROUTES_FILE, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.name = name
        self.namespace = namespace or client.config.namespace
        self.key = key
        self.clock = clock
        self.resource_version = ""

    def describe(self) -> str:
        return f"ConfigMap {self.namespace}/{self.name}"

    def _read(self) -> tuple[dict[str, Any], str]:
        config_map = self.client.get_configmap(self.name, self.namespace)
        text = (config_map.get("data") or {}).get(self.key)
        if text is None:
            raise weights.RoutesError(f"{self.describe()} has no key {self.key!r}")
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise weights.RoutesError(f"{self.describe()}: {self.key} is not valid YAML: {exc}") from None
        weights.validate(doc)
        return doc, str((config_map.get("metadata") or {}).get("resourceVersion", ""))

    def current(self) -> weights.Split:
        doc, self.resource_version = self._read()
        return weights.split(doc)

    def set(self, percent: int, note: str) -> weights.Split:
        for attempt in range(3):
            doc, version = self._read()
            if weights.unchanged(doc, percent):
                self.resource_version = version
                return weights.split(doc)  # nothing to deliver: the pods keep what they serve
            doc = weights.with_canary(doc, percent, note, self.clock())
            patch = {"metadata": {"resourceVersion": version},
                     "data": {self.key: yaml.safe_dump(doc, sort_keys=False)}}
            try:
                answer = self.client.patch_configmap(self.name, patch, self.namespace)
            except KubeConflict:
                if attempt == 2:
                    raise
                continue  # edited meanwhile: read it again and re-apply the change on top
            self.resource_version = str((answer.get("metadata") or {}).get("resourceVersion", ""))
            return weights.split(doc)
        raise KubeError("unreachable")  # pragma: no cover

    def confirm(self, split: weights.Split) -> tuple[bool | None, str]:
        return None, (f"{self.describe()} updated (resourceVersion {self.resource_version}); each "
                      "pod's Envoy switches when its kubelet delivers the change, usually within a "
                      "minute: check with the `weights show` loop (docs/RUNBOOK.md)")
