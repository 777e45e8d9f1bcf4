"""`zai-proxy weights` and `canary rollback|promote` writing the routes ConfigMap through the
Kubernetes API, as they do in a pod: a small fake API server on loopback over TLS (its CA in a
service-account directory, with a token and a namespace), reached through
KUBERNETES_SERVICE_HOST/PORT. No cluster exists here; the fake checks what a real API server
would: the bearer token, the path (one ConfigMap, as the Role allows), the merge patch and its
resourceVersion."""

from __future__ import annotations

import http.server
import json
import os
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from extproc.config import Settings
from extproc.local.tls import make_local_tls
from extproc.routing import weights
from extproc.routing.envoy_config import render_routes

ZAI_PROXY = str(Path(sys.executable).with_name("zai-proxy"))
TOKEN = "sa-token-0123456789"
CONFIGMAP = "/api/v1/namespaces/gw/configmaps/zai-proxy-routes"


class FakeApiServer:
    def __init__(self, directory: Path) -> None:
        self.version = 100
        self.data = {"routes.yaml": yaml.safe_dump(render_routes(Settings.from_env({}), canary_weight=0),
                                                   sort_keys=False)}
        self.requests: list[tuple[str, str, dict]] = []
        tls = make_local_tls(directory / "tls", "localhost")
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, status: int, doc: dict) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                server.requests.append((method, self.path, dict(self.headers)))
                if self.headers.get("authorization") != f"Bearer {TOKEN}":
                    return self._answer(401, {"kind": "Status", "message": "Unauthorized"})
                if self.path != CONFIGMAP:
                    return self._answer(403, {"kind": "Status", "message": "forbidden"})
                if method == "PATCH":
                    if self.headers.get("content-type") != "application/merge-patch+json":
                        return self._answer(415, {"kind": "Status", "message": "unsupported"})
                    if body["metadata"]["resourceVersion"] != str(server.version):
                        return self._answer(409, {"kind": "Status", "message": "conflict"})
                    server.data.update(body["data"])
                    server.version += 1
                self._answer(200, {"kind": "ConfigMap", "metadata": {
                    "name": "zai-proxy-routes", "namespace": "gw",
                    "resourceVersion": str(server.version)}, "data": server.data})

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_PATCH(self) -> None:  # noqa: N802
                self._handle("PATCH")

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert_file, tls.key_file)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.account = directory / "serviceaccount"
        self.account.mkdir()
        (self.account / "token").write_text(TOKEN)
        (self.account / "namespace").write_text("gw")
        (self.account / "ca.crt").write_bytes(tls.ca_file.read_bytes())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def canary_percent(self) -> float:
        doc = yaml.safe_load(self.data["routes.yaml"])
        weights.validate(doc)
        return weights.split(doc).canary_percent

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api(tmp_path):
    server = FakeApiServer(tmp_path)
    yield server
    server.stop()


def cli(api: FakeApiServer, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBERNETES_SERVICE_HOST": "localhost",
           "KUBERNETES_SERVICE_PORT": str(api.port), "KUBE_SERVICE_ACCOUNT_DIR": str(api.account),
           "ROUTES_CONFIGMAP": "zai-proxy-routes", "CANARY_AUDIT_FILE": str(tmp_path / "audit.jsonl"),
           "CANARY_STATE_FILE": str(tmp_path / "state.json"), "NO_PROXY": "*"}
    env.pop("HTTPS_PROXY", None)
    env.pop("https_proxy", None)
    return subprocess.run([ZAI_PROXY, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(90)
def test_weights_and_canary_commands_patch_the_routes_configmap(api, tmp_path):
    shown = cli(api, tmp_path, "weights", "show")
    assert shown.returncode == 0, shown.stderr
    assert "canary 0%" in shown.stdout and "ConfigMap gw/zai-proxy-routes" in shown.stdout

    moved = cli(api, tmp_path, "weights", "set", "10")
    assert moved.returncode == 0, moved.stderr
    assert api.canary_percent() == 10 and api.version == 101
    assert "resourceVersion 101" in moved.stdout and "within a minute" in moved.stdout

    promoted = cli(api, tmp_path, "canary", "promote", "--force")
    assert promoted.returncode == 0, promoted.stderr
    assert api.canary_percent() == 100
    back = cli(api, tmp_path, "canary", "rollback", "--reason", "smoke test")
    assert back.returncode == 0, back.stderr
    assert api.canary_percent() == 0
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(e["action"], e["from"], e["to"]) for e in entries] == [("promote", 10, 100), ("rollback", 100, 0)]
    assert entries[1]["reason"] == "smoke test" and entries[1]["target"] == "ConfigMap gw/zai-proxy-routes"
    assert "forced by" in entries[0]["reason"]

    patches = [(method, path, headers) for method, path, headers in api.requests if method == "PATCH"]
    assert len(patches) == 3 and all(path == CONFIGMAP for _, path, _ in patches)
    assert all(h["Authorization"] == f"Bearer {TOKEN}" for _, _, h in patches)

    refused = cli(api, tmp_path, "weights", "--configmap", "gw/other-configmap", "set", "5")
    assert refused.returncode == 2 and "needs get and patch on this ConfigMap" in refused.stderr
