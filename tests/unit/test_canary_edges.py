"""The canary's edges with their transports replaced: the Prometheus source (canned answers), the
Kubernetes client and the ConfigMap target (an in-memory API), the thresholds file, and the
runbook carrying the analysis's PromQL verbatim. (The same client against a fake API server over
TLS, through the command line: tests/integration/test_canary_k8s.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from extproc.canary.analysis import PASS, analyze
from extproc.canary.k8s import MERGE_PATCH, KubeClient, KubeConfig, KubeError
from extproc.canary.routes import ConfigMapRoutes, percent_of
from extproc.canary.sources import QUERIES, PrometheusSource, SourceError, queries
from extproc.canary.thresholds import DEFAULT_CHECKS, Thresholds, ThresholdsError, defaults_yaml
from extproc.config import ConfigError, Settings
from extproc.routing import weights
from extproc.routing.envoy_config import render_routes

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ Prometheus

def vector(*series: tuple[dict, float]) -> bytes:
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": labels, "value": [1700000000.0, str(value)]} for labels, value in series]}}).encode()


def canned(window: str) -> dict[str, bytes]:
    p, c = {"deployment_variant": "production"}, {"deployment_variant": "canary"}
    buckets = lambda v, n: [({**v, "le": le}, n * share) for le, share in  # noqa: E731
                            (("0.1", 0.5), ("0.5", 0.9), ("1", 0.99), ("+Inf", 1.0))]
    by_name = {
        "requests": vector((p, 1000.4), (c, 100), ({"deployment_variant": "other"}, 5)),
        "ok": vector((p, 990), (c, 99)),
        "errors": vector((p, 10), (c, 1)),
        "rejections": vector(),
        "tokens": vector(({**p, "source": "reported"}, 90_000), ({**p, "source": "estimated"}, 10_000),
                         ({**c, "source": "reported"}, 9_900)),
        "duration": vector(*buckets(p, 1000), *buckets(c, 100)),
        "ttft": vector(),
    }
    return {text: by_name[name] for name, text in queries(600).items()}


def test_prometheus_source_reads_both_variants_at_one_instant():
    answers = canned("10m")
    asked = []

    def fetch(url: str, timeout: float) -> bytes:
        params = parse_qs(urlsplit(url).query)
        asked.append((params["query"][0], params["time"][0]))
        return answers[params["query"][0]]

    source = PrometheusSource("http://prom:9090/", fetch, clock=lambda: 1700000000.0)
    sample = source.sample(600)
    assert {time for _, time in asked} == {"1700000000.000"} and len(asked) == len(QUERIES)
    assert all("[10m]" in query for query, _ in asked)
    assert sample.production.requests == pytest.approx(1000.4) and sample.canary.requests == 100
    assert sample.production.tokens == 100_000 and sample.production.tokens_estimated == 10_000
    assert sample.canary.tokens_estimated == 0
    assert sample.canary.duration[-1] == (math.inf, 100.0) and sample.canary.ttft == ()
    report = analyze(sample, Thresholds(min_requests=50))
    assert report.verdict == PASS and report.source == "Prometheus http://prom:9090"


def test_prometheus_errors_say_where_and_why():
    refuse = lambda url, timeout: json.dumps({"status": "error", "errorType": "bad_data",  # noqa: E731
                                              "error": "parse error"}).encode()
    with pytest.raises(SourceError, match="bad_data: parse error"):
        PrometheusSource("http://prom:9090", refuse).sample(60)
    with pytest.raises(SourceError, match="not JSON"):
        PrometheusSource("http://prom:9090", lambda url, timeout: b"<html>").sample(60)


def test_the_runbook_carries_the_analysis_queries_verbatim():
    runbook = (ROOT / "docs" / "RUNBOOK.md").read_text()
    for name, text in queries(600).items():
        assert text in runbook, f"docs/RUNBOOK.md lacks the {name} query: {text}"


# --------------------------------------------------------------------------- thresholds

def test_thresholds_file_overrides_defaults_and_round_trips(tmp_path):
    path = tmp_path / "canary.yaml"
    path.write_text("alpha: 0.05\nmin_requests: 30\nchecks:\n  errors: {max_ratio: 0.2}\n"
                    "  ttft_p95: {enabled: false}\n")
    t = Thresholds.load(path)
    assert t.alpha == 0.05 and t.min_for("errors") == 30
    assert t.limits("errors").max_ratio == 0.2 and t.limits("errors").max_increase == 0.02
    assert not t.limits("ttft_p95").enabled
    assert Thresholds.from_mapping(yaml.safe_load(defaults_yaml())) == Thresholds()
    assert set(Thresholds().checks) == set(DEFAULT_CHECKS)


@pytest.mark.parametrize("text, message", [
    ("alpha: 2", "alpha: must be above 0 and at most 0.5"),
    ("checks: {errors: {max_factor: 2}}", "this check has no max_factor"),
    ("checks: {latency: {}}", "unknown check 'latency'"),
    ("min_requests: 0", "min_requests: must be a whole number"),
    ("checks: {errors: {max_ratio: high}}", "must be a number"),
    ("[1, 2", "not valid YAML"),
])
def test_bad_thresholds_are_refused_in_words(tmp_path, text, message):
    path = tmp_path / "canary.yaml"
    path.write_text(text)
    with pytest.raises(ThresholdsError, match=message.replace("(", r"\(")):
        Thresholds.load(path)


# --------------------------------------------------------------------------- Kubernetes

class FakeApi:
    """The Kubernetes API as far as one ConfigMap goes, with resourceVersion checks."""

    def __init__(self, data: dict[str, str], token_file: Path) -> None:
        self.data, self.version, self.token_file = dict(data), 7, token_file
        self.calls: list[tuple[str, str, dict, dict | None]] = []
        self.conflicts = 0

    def __call__(self, method, url, headers, body, timeout, context):
        doc = json.loads(body) if body else None
        self.calls.append((method, urlsplit(url).path, headers, doc))
        if headers.get("authorization") != f"Bearer {self.token_file.read_text().strip()}":
            return 401, b'{"kind":"Status","message":"Unauthorized"}'
        if not urlsplit(url).path.endswith("/namespaces/gw/configmaps/zai-proxy-routes"):
            return 403, b'{"kind":"Status","message":"configmaps \\"x\\" is forbidden"}'
        if method == "PATCH":
            assert headers["content-type"] == MERGE_PATCH
            if self.conflicts:
                self.conflicts -= 1
                self.version += 1
                return 409, b'{"kind":"Status","message":"the object has been modified"}'
            if doc["metadata"]["resourceVersion"] != str(self.version):
                return 409, b'{"kind":"Status","message":"the object has been modified"}'
            self.data.update(doc["data"])
            self.version += 1
        return 200, json.dumps({"kind": "ConfigMap", "metadata": {
            "name": "zai-proxy-routes", "resourceVersion": str(self.version)}, "data": self.data}).encode()


@pytest.fixture
def account(tmp_path):
    directory = tmp_path / "serviceaccount"
    directory.mkdir()
    (directory / "token").write_text("token-1\n")
    (directory / "namespace").write_text("gw\n")
    return directory


@pytest.fixture
def api(account):
    routes = yaml.safe_dump(render_routes(Settings.from_env({}), canary_weight=0), sort_keys=False)
    return FakeApi({"routes.yaml": routes}, account / "token")


def target(account, api, name="zai-proxy-routes") -> ConfigMapRoutes:
    config = KubeConfig.in_cluster({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, account)
    assert config.server == "https://10.0.0.1:443" and config.namespace == "gw"
    return ConfigMapRoutes(KubeClient(config, api), name, clock=lambda: 1700000000.0)


def test_configmap_target_patches_the_routes_with_its_resource_version(account, api):
    routes = target(account, api)
    assert percent_of(routes.current()) == 0
    split = routes.set(25, "canary rollout r-1 step 2/4: pass")
    assert split.canary_percent == 25 and "canary=25% (canary rollout r-1 step 2/4: pass)" in split.version
    method, path, headers, body = api.calls[-1]
    assert (method, path) == ("PATCH", "/api/v1/namespaces/gw/configmaps/zai-proxy-routes")
    assert body["metadata"] == {"resourceVersion": "7"} and set(body["data"]) == {"routes.yaml"}
    stored = yaml.safe_load(api.data["routes.yaml"])
    weights.validate(stored)
    assert weights.split(stored).canary_percent == 25
    assert "resourceVersion 8" in routes.confirm(split)[1]
    # The same split again changes nothing (Envoy would keep serving the old version).
    calls = len(api.calls)
    routes.set(25, "again")
    assert [c[0] for c in api.calls[calls:]] == ["GET"]


def test_configmap_target_reapplies_on_a_concurrent_edit_and_rereads_the_token(account, api):
    routes = target(account, api)
    api.conflicts = 1
    (account / "token").write_text("token-2 (rotated)\n")
    assert routes.set(50, "x").canary_percent == 50
    assert [c[0] for c in api.calls] == ["GET", "PATCH", "GET", "PATCH"]
    assert api.calls[-1][2]["authorization"] == "Bearer token-2 (rotated)"


def test_kubernetes_errors_name_the_missing_permission(account, api):
    with pytest.raises(KubeError, match="needs get and patch on this ConfigMap"):
        target(account, api, name="other").current()
    with pytest.raises(KubeError, match="not inside a Kubernetes pod"):
        KubeConfig.in_cluster({}, account)


def test_routes_configmap_setting_parses_names():
    assert Settings.from_env({"ROUTES_CONFIGMAP": "zai-proxy-routes"}).routes_configmap == \
        (None, "zai-proxy-routes")
    assert Settings.from_env({"ROUTES_CONFIGMAP": "gw/zai-proxy-routes"}).routes_configmap == \
        ("gw", "zai-proxy-routes")
    with pytest.raises(ConfigError, match="ROUTES_CONFIGMAP"):
        Settings.from_env({"ROUTES_CONFIGMAP": "Bad_Name"})
