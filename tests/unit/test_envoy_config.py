"""The rendered bootstrap keeps long streams and large bodies alive, splits and pins variants, and
answers Envoy's own errors in both API formats (Envoy itself validates it: integration/test_envoy_validates.py)."""

from __future__ import annotations

import pytest
import yaml

from extproc.config import Settings
from extproc.routing.envoy_config import render, render_routes, write
from extproc.routing.weights import validate


def settings(**env: str) -> Settings:
    return Settings.from_env({"ZAI_API_KEY": "k" * 16, **env})


def routes(s: Settings):
    hcm = render(s)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    config = render_routes(s)["resources"][0]
    return hcm, {r["name"]: r for r in config["virtual_hosts"][0]["routes"]}


def test_real_zai_uses_tls_with_sni_and_certificate_check():
    clusters = {c["name"]: c for c in render(settings())["static_resources"]["clusters"]}
    tls = clusters["zai_anthropic_production"]["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.z.ai"
    validation = tls["common_tls_context"]["validation_context"]
    assert validation["match_typed_subject_alt_names"][0]["matcher"]["exact"] == "api.z.ai"
    assert validation["trusted_ca"]["filename"] == "/etc/ssl/certs/ca-certificates.crt"


def test_plain_http_upstream_has_no_tls():
    clusters = {c["name"]: c for c in render(settings(
        ZAI_TARGET_URL="http://10.1.2.3:8000/x"))["static_resources"]["clusters"]}
    assert "transport_socket" not in clusters["zai_anthropic_canary"]


def test_no_timeout_cuts_a_ten_minute_stream_and_big_bodies_fit():
    hcm, by_name = routes(settings())
    assert hcm["request_timeout"] == "0s"
    assert float(hcm["stream_idle_timeout"].rstrip("s")) >= 600
    for name in ("anthropic_prefixed", "anthropic", "openai"):
        route = by_name[name]
        assert route["route"]["timeout"] == "0s"
        assert float(route["route"]["idle_timeout"].rstrip("s")) >= 600
        assert route["request_body_buffer_limit"] >= 10 * 1024 * 1024 + 1


def test_rewrites_keep_upstream_base_paths():
    _, by_name = routes(settings(ZAI_OPENAI_URL="https://api.z.ai/api/paas/v4"))
    assert by_name["anthropic"]["route"]["prefix_rewrite"] == "/api/anthropic/v1/messages"
    assert by_name["openai"]["route"]["prefix_rewrite"] == "/api/paas/v4/chat/completions"


def test_every_local_reply_case_has_both_formats():
    hcm, _ = routes(settings())
    mappers = hcm["local_reply_config"]["mappers"]
    bodies = [m["body_format_override"]["json_format"] for m in mappers[1:]]
    openai_bodies = [b for b in bodies if "type" not in b]
    anthropic_bodies = [b for b in bodies if b.get("type") == "error"]
    assert len(openai_bodies) == len(anthropic_bodies) == len(bodies) // 2
    assert all(b["error"]["message"].startswith("zai-proxy:") for b in bodies)
    assert "${" not in yaml.safe_dump(mappers)  # every placeholder filled


def test_variants_split_sticky_and_pinned():
    _, by_name = routes(settings(CANARY_WEIGHT="10", CANARY_EXTPROC_HOST="canary-host"))
    split = by_name["anthropic"]["route"]
    assert split["weighted_clusters"]["use_hash_policy"] is True
    weights = {c["name"]: c["weight"] for c in split["weighted_clusters"]["clusters"]}
    assert weights == {"zai_anthropic_production": 90, "zai_anthropic_canary": 10}
    assert {h["header"]["header_name"] for h in split["hash_policy"]} == {"authorization", "x-api-key"}
    pinned = by_name["anthropic_canary"]
    assert pinned["match"] == {"path_separated_prefix": "/canary/v1/messages"}
    assert pinned["route"]["cluster"] == "zai_anthropic_canary"
    per_filter = pinned["typed_per_filter_config"]
    override = per_filter["envoy.filters.http.ext_proc"]["overrides"]
    assert override["grpc_service"]["envoy_grpc"]["cluster_name"] == "extproc_canary"
    observer = per_filter["zai_proxy.observer"]["overrides"]["grpc_service"]
    # The observer's copies travel over connections of their own (see _observer_connections).
    assert observer["envoy_grpc"]["cluster_name"] == "extproc_observer_canary"
    assert observer["initial_metadata"] == [{"key": "x-zai-proxy-phase", "value": "observer"}]
    clusters = {c["name"]: c for c in render(settings(CANARY_EXTPROC_HOST="canary-host"))
                ["static_resources"]["clusters"]}
    address = clusters["extproc_canary"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert address["endpoint"]["address"]["socket_address"]["address"] == "canary-host"
    attempt = clusters["zai_openai_canary"]["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"][0]
    matcher = attempt["typed_config"]["xds_matcher"]["matcher_list"]["matchers"][0]
    assert matcher["predicate"]["single_predicate"]["value_match"] == {"prefix": "2"}  # 2xx skip it
    attempt_filter = attempt["typed_config"]["extension_config"]["typed_config"]
    assert attempt_filter["grpc_service"]["envoy_grpc"]["cluster_name"] == "extproc_attempts_canary"
    # Every ext_proc filter has connections of its own, to the same ext_proc processes, with
    # windows no multi-MB body fills (Envoy 1.40 crashed when a shared connection's filled).
    for own in ("extproc_observer_canary", "extproc_attempts_canary"):
        assert clusters[own]["load_assignment"] == {**clusters["extproc_canary"]["load_assignment"],
                                                    "cluster_name": own}
        assert clusters[own]["per_connection_buffer_limit_bytes"] >= 2 * 33554432


@pytest.mark.parametrize("mode", ["observe", "inline"])
def test_bodies_inline_where_the_gateway_may_change_them(mode):
    """OpenAI streams may be re-framed, so their bodies pass inline; Anthropic ones as
    RESPONSE_PROCESSING says (observed copies by default)."""
    _, by_name = routes(settings(RESPONSE_PROCESSING=mode))
    for name, inline in (("openai", True), ("anthropic", mode == "inline"),
                         ("anthropic_prefixed_production", mode == "inline")):
        route = by_name[name]
        configs = ([route["typed_per_filter_config"]] if "typed_per_filter_config" in route else
                   [c["typed_per_filter_config"] for c in route["route"]["weighted_clusters"]["clusters"]])
        for per_filter in configs:
            main = per_filter["envoy.filters.http.ext_proc"]["overrides"]
            observer = per_filter["zai_proxy.observer"]
            if inline:
                assert main["processing_mode"]["response_body_mode"] == "STREAMED"
                assert main["processing_mode"]["request_body_mode"] == "BUFFERED"
                assert observer.get("disabled") is True
            else:
                assert "processing_mode" not in main and "disabled" not in observer


def _observer_cluster(bootstrap: dict, variant: str) -> dict:
    return next(c for c in bootstrap["static_resources"]["clusters"]
                if c["name"] == f"extproc_observer_{variant}")


def _ports(cluster: dict) -> list[int]:
    return [e["endpoint"]["address"]["socket_address"]["port_value"]
            for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]


def test_observer_copies_go_to_the_observer_port_when_one_is_set():
    plain = render(settings())
    for variant, port in (("production", 50051), ("canary", 50052)):
        cluster = _observer_cluster(plain, variant)
        assert _ports(cluster) == [port]  # unset: the gRPC port, as always
        http2 = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]["http2_protocol_options"]
        assert "max_concurrent_streams" not in http2
    split = render(settings(EXTPROC_OBSERVER_PORT="50053", CANARY_EXTPROC_OBSERVER_PORT="50054"))
    for variant, port in (("production", 50053), ("canary", 50054)):
        cluster = _observer_cluster(split, variant)
        assert _ports(cluster) == [port]
        http2 = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]["http2_protocol_options"]
        assert http2["max_concurrent_streams"] > 1  # several connections: several processes
    # The request filter's and the attempt filter's clusters keep the gRPC port.
    by_name = {c["name"]: c for c in split["static_resources"]["clusters"]}
    assert _ports(by_name["extproc_production"]) == [50051]


@pytest.mark.parametrize("raw, ok", [("1", True), ("3", True), ("auto", True), ("AUTO", True),
                                     ("0", False), ("-1", False), ("two", False)])
def test_extproc_processes_setting(raw, ok):
    from extproc.config import ConfigError
    if ok:
        assert settings(EXTPROC_PROCESSES=raw).extproc_processes >= 1
    else:
        with pytest.raises(ConfigError, match="EXTPROC_PROCESSES"):
            settings(EXTPROC_PROCESSES=raw)
