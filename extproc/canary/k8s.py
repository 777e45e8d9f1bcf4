"""A minimal Kubernetes API client: read and patch one ConfigMap, as a pod's service account.

Plain HTTPS with the standard library (the official `kubernetes` client would add ~20 packages
for two calls): the API server's address from `KUBERNETES_SERVICE_HOST`/`_PORT`, which the
kubelet sets in every pod, the token and CA from the service account's mount
(`/var/run/secrets/kubernetes.io/serviceaccount`, `KUBE_SERVICE_ACCOUNT_DIR`). The token is read
for every request: projected tokens are rotated on disk. Patches are JSON merge patches carrying
the `resourceVersion` they were computed from, so a concurrent edit is refused (409) rather than
overwritten. The transport is injected (unit tests), and the integration test runs this against a
small fake API server over TLS.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.error import HTTPError, URLError
from urllib.parse import quote
from urllib.request import Request, urlopen

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MERGE_PATCH = "application/merge-patch+json"


class KubeError(RuntimeError):
    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class KubeConflict(KubeError):
    """The object changed since it was read (HTTP 409)."""


# (method, url, headers, body, timeout, ssl context) -> (status, body)
Transport = Callable[[str, str, dict[str, str], "bytes | None", float, "ssl.SSLContext | None"],
                     tuple[int, bytes]]


def urllib_transport(method: str, url: str, headers: dict[str, str], body: bytes | None,
                     timeout: float, context: ssl.SSLContext | None) -> tuple[int, bytes]:
    request = Request(url, data=body, headers=headers, method=method)
    try:
        with urlopen(request, timeout=timeout, context=context) as resp:  # noqa: S310
            return resp.status, resp.read()
    except HTTPError as exc:
        return exc.code, exc.read()
    except (URLError, OSError) as exc:
        raise KubeError(f"cannot reach the Kubernetes API at {url.split('/api/')[0]}: "
                        f"{getattr(exc, 'reason', exc)}") from None


@dataclass(frozen=True)
class KubeConfig:
    server: str  # https://host:port
    namespace: str
    token_file: Path | None = None
    ca_file: Path | None = None

    @classmethod
    def in_cluster(cls, env: Mapping[str, str], account_dir: str | Path = SERVICE_ACCOUNT_DIR,
                   namespace: str | None = None) -> "KubeConfig":
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT") or "443"
        if not host:
            raise KubeError("not inside a Kubernetes pod (KUBERNETES_SERVICE_HOST is not set): the "
                            "ConfigMap is written with the pod's service account; from a workstation "
                            "use `weights --offline --routes-dir deploy/shared` and kubectl apply")
        account = Path(account_dir)
        if namespace is None:
            try:
                namespace = (account / "namespace").read_text().strip()
            except OSError:
                raise KubeError(f"no namespace: {account / 'namespace'} cannot be read, and "
                                "ROUTES_CONFIGMAP does not name one (namespace/name)") from None
        token = account / "token"
        ca = account / "ca.crt"
        shown = f"[{host}]" if ":" in host else host
        return cls(f"https://{shown}:{port}", namespace, token if token.exists() else None,
                   ca if ca.exists() else None)


class KubeClient:
    def __init__(self, config: KubeConfig, transport: Transport = urllib_transport,
                 timeout: float = 10.0) -> None:
        self.config = config
        self.transport = transport
        self.timeout = timeout
        self._context: ssl.SSLContext | None = None
        if config.server.startswith("https://"):
            self._context = ssl.create_default_context(
                cafile=str(config.ca_file) if config.ca_file else None)

    def _headers(self) -> dict[str, str]:
        headers = {"accept": "application/json", "user-agent": "zai-proxy"}
        if self.config.token_file is not None:
            try:
                token = self.config.token_file.read_text().strip()
            except OSError as exc:
                raise KubeError(f"cannot read the service account token {self.config.token_file}: "
                                f"{exc.strerror}") from None
            headers["authorization"] = f"Bearer {token}"
        return headers

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> dict[str, Any]:
        headers = self._headers()
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = content_type
        status, raw = self.transport(method, self.config.server + path, headers, data, self.timeout,
                                     self._context)
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = {"message": raw[:300].decode(errors="replace")}
        if status >= 400:
            message = doc.get("message") if isinstance(doc, dict) else None
            text = f"Kubernetes API {method} {path}: HTTP {status}: {message or 'no message'}"
            if status == 403:
                text += (" (the service account needs get and patch on this ConfigMap: "
                         "deploy/canary-controller/rbac.yaml)")
            raise (KubeConflict if status == 409 else KubeError)(text, status)
        return doc

    def _path(self, name: str, namespace: str | None) -> str:
        ns = namespace or self.config.namespace
        return f"/api/v1/namespaces/{quote(ns, safe='')}/configmaps/{quote(name, safe='')}"

    def get_configmap(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        return self.request("GET", self._path(name, namespace))

    def patch_configmap(self, name: str, patch: dict[str, Any],
                        namespace: str | None = None) -> dict[str, Any]:
        return self.request("PATCH", self._path(name, namespace), patch, MERGE_PATCH)
