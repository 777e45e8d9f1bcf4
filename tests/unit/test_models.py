"""MODEL_MAP and MODEL_FALLBACKS: the settings' formats, the rules (globs, chains, which failures
move a request), the body rewrite (only the top-level `model` value changes), the attempt filter's
decisions, and the Envoy configuration they need (none at all when they are unset)."""

from __future__ import annotations

import asyncio
import json

import orjson
import pytest
from hypothesis import given, settings as hyp_settings, strategies as st

from extproc.config import ConfigError, Settings
from extproc.limiter.signals import Signal
from extproc.proxy.attempt import RETRY_HEADER, AttemptSession, AttemptVerdict
from extproc.proxy.models import ModelRules, rewrite, with_model
from extproc.routing.envoy_config import render

MAP = "claude-sonnet-*=glm-4.7,claude-opus-*=glm-4.7,claude-haiku-*=glm-4.5-air"
CHAINS = "glm-5.1>glm-4.7>glm-4.5-air"


def rules(model_map: str | None = MAP, fallbacks: str | None = CHAINS) -> ModelRules:
    env = {k: v for k, v in (("MODEL_MAP", model_map), ("MODEL_FALLBACKS", fallbacks)) if v}
    return ModelRules.of(Settings.from_env(env))


# -- the settings -----------------------------------------------------------------------------------

def test_settings_parse_the_documented_examples():
    s = Settings.from_env({"MODEL_MAP": MAP, "MODEL_FALLBACKS": f"{CHAINS}, glm-4.6 > glm-4.5"})
    assert s.model_map == (("claude-sonnet-*", "glm-4.7"), ("claude-opus-*", "glm-4.7"),
                           ("claude-haiku-*", "glm-4.5-air"))
    assert s.model_fallbacks == (("glm-5.1", "glm-4.7", "glm-4.5-air"), ("glm-4.6", "glm-4.5"))


def test_unset_or_empty_means_no_rules():
    for env in ({}, {"MODEL_MAP": "", "MODEL_FALLBACKS": "  "}):
        s = Settings.from_env(env)
        assert s.model_map is None and s.model_fallbacks is None
        assert not ModelRules.of(s).active


@pytest.mark.parametrize("name, value, problem", [
    ("MODEL_MAP", "claude-sonnet-4-5", "not `pattern=model`"),
    ("MODEL_MAP", "claude-*=glm-4.7,,x=y", "empty entry"),
    ("MODEL_MAP", "claude-*=", "not `pattern=model`"),
    ("MODEL_MAP", "claude-*=glm 4.7", "no model name"),
    ("MODEL_MAP", "claude-*=glm-*", "no model name"),
    ("MODEL_MAP", "claude sonnet=glm-4.7", "no model name or glob"),
    ("MODEL_MAP", "claude-*=glm-4.7,CLAUDE-*=glm-4.6", "twice"),
    ("MODEL_FALLBACKS", "glm-5.1", "two or more models"),
    ("MODEL_FALLBACKS", "glm-5.1>>glm-4.7", "two or more models"),
    ("MODEL_FALLBACKS", "glm-5.1>glm-4.7,glm-5.1>glm-4.6", "two next models"),
    ("MODEL_FALLBACKS", "glm-5.1>glm-4.7,glm-4.7>glm-5.1", "back to"),
    ("MODEL_FALLBACKS", "glm-5.1>glm-4.7>glm-5.1", "back to"),
    ("MODEL_FALLBACKS", "glm-5.1>glm-4.*", "no model name"),
])
def test_bad_values_stop_start_up_naming_variable_problem_and_example(name, value, problem):
    with pytest.raises(ConfigError) as err:
        Settings.from_env({name: value})
    message = str(err.value)
    assert message.startswith(f"{name}=") and problem in message
    assert f"for example: {name}=" in message
    example = message.split("for example: ", 1)[1]
    Settings.from_env(dict([example.split("=", 1)]))  # the example itself is good


def test_chains_may_share_a_model_with_one_next_model():
    r = rules(None, "glm-5.1>glm-4.7,glm-4.7>glm-4.5-air,glm-4.6>glm-4.5-air")
    assert [r.next_model(m) for m in ("glm-5.1", "glm-4.7", "glm-4.6", "glm-4.5-air")] == [
        "glm-4.7", "glm-4.5-air", "glm-4.5-air", None]


# -- the rules --------------------------------------------------------------------------------------

def test_globs_first_match_wins_ignoring_case_and_exact_names():
    r = rules("claude-sonnet-4-5=glm-4.6,claude-*=glm-4.7,*-air=glm-4.5-air,glm-4.?=glm-4.6", None)
    assert r.mapped("claude-sonnet-4-5") == "glm-4.6"  # the exact entry comes first
    assert r.mapped("Claude-Sonnet-4-5-20250929") == "glm-4.7"
    assert r.mapped("claude-3-5-haiku") == "glm-4.7"
    assert r.mapped("glm-4.5-air") == "glm-4.5-air"
    assert r.mapped("glm-4.5") == "glm-4.6"
    assert r.mapped("glm-4.5-flash") == "glm-4.5-flash"  # no pattern: as named


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-", min_size=1, max_size=20))
def test_a_glob_maps_every_name_it_matches_and_nothing_else(name):
    r = rules("claude-*=glm-4.7", None)
    assert r.mapped(name) == ("glm-4.7" if name.startswith("claude-") else name)


def test_model_refusals_of_chained_models_move_along_the_chain():
    r = rules()
    assert r.after_failure("glm-5.1", "1312").next_model == "glm-4.7"
    assert r.after_failure("GLM-4.7", "1311").next_model == "glm-4.5-air"
    end = r.after_failure("glm-4.5-air", "1312")
    assert end.decides and end.next_model is None  # exhausted: not retried
    for model, code in (("glm-4.6", "1312"), ("glm-4.6", "1311"), ("glm-5.1", "1302"),
                        ("glm-5.1", "1308"), ("glm-5.1", None), (None, "1312")):
        assert not r.after_failure(model, code).decides  # the code's own rule holds


def test_an_attempt_goes_out_with_the_fallback_else_the_mapped_model():
    r = rules()
    assert r.choose("claude-opus-4-1", None) == "glm-4.7"
    assert r.choose("claude-opus-4-1", "glm-4.5-air") == "glm-4.5-air"
    assert r.choose("glm-5.1", None) == "glm-5.1"


@given(st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f"]), min_size=2, max_size=6, unique=True))
def test_a_chain_is_walked_in_order_to_its_end(chain):
    r = rules(None, ">".join(chain))
    walked, model = [chain[0]], chain[0]
    while (step := r.after_failure(model, "1312")).next_model is not None:
        model = step.next_model
        walked.append(model)
    assert walked == chain


# -- the body ---------------------------------------------------------------------------------------

REQUESTED = "claude-sonnet-4-5"
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
                    st.sampled_from([REQUESTED, "model", '"model": "x"', "glm-4.7"]))
keys = st.one_of(st.text(max_size=6), st.sampled_from(["model", "Model", "models", "mod\\el"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)), max_leaves=20)
docs = st.dictionaries(st.text(max_size=8).filter(lambda k: k != "model"), values, max_size=5)
layouts = st.fixed_dictionaries({
    "indent": st.sampled_from([None, 0, 2, "\t"]),
    "separators": st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")]),
    "ensure_ascii": st.booleans()})
PLACEHOLDER = "__the_top_level_model_key__"
# The top-level key as clients may write it: plainly or with \u escapes.
key_spellings = st.sampled_from(['"model"', '"mod\\u0065l"', '"\\u006Dodel"', '"\\u006d\\u006f\\u0064\\u0065\\u006c"'])


def body_of(doc: dict, position: int, layout: dict, key: str) -> tuple[bytes, dict]:
    items = list(doc.items())
    items.insert(position % (len(items) + 1), (PLACEHOLDER, REQUESTED))
    raw = json.dumps(dict(items), **layout).replace(f'"{PLACEHOLDER}"', key, 1)
    return raw.encode(), {k: v for k, v in items if k != PLACEHOLDER}


def only_model_changed(raw: bytes, out: bytes, model: str) -> bool:
    """`out` is `raw` with one JSON string equal to REQUESTED replaced by `model`'s literal."""
    value = orjson.dumps(model)
    prefix = 0
    while prefix < min(len(raw), len(out)) and raw[prefix] == out[prefix]:
        prefix += 1
    for start in range(prefix, -1, -1):
        tail = out[start + len(value):]
        if out[start:start + len(value)] == value and raw[:start] == out[:start] \
                and raw.endswith(tail) and json.loads(raw[start:len(raw) - len(tail)]) == REQUESTED:
            return True
    return False


@given(docs, st.integers(min_value=0, max_value=5), layouts, key_spellings,
       st.sampled_from(["glm-4.7", "glm-4.5-air", "ä-model", 'we"ird\\name']))
@hyp_settings(max_examples=400)
def test_only_the_top_level_model_value_changes(doc, position, layout, key, model):
    raw, rest = body_of(doc, position, layout, key)
    out = with_model(raw, REQUESTED, model)
    assert out is not None
    assert json.loads(out) == {**rest, "model": model}
    assert only_model_changed(raw, out, model)


def test_nested_models_and_look_alikes_stay_as_sent():
    raw = (b'{"messages":[{"content":[{"type":"tool_use","name":"Task","input":{"model":'
           b'"claude-sonnet-4-5"}},{"type":"text","text":"{\\"model\\": \\"claude-sonnet-4-5\\"}"}]}],'
           b'"metadata":{"model":"claude-sonnet-4-5"},"say \\"model": "claude-sonnet-4-5",'
           b' "model" :\t"claude-sonnet-4-5" ,"stream":true}')
    out = with_model(raw, REQUESTED, "glm-4.7")
    assert out == raw.replace(b'"model" :\t"claude-sonnet-4-5"', b'"model" :\t"glm-4.7"')


def test_of_duplicate_top_level_keys_the_last_is_changed_as_parsers_read_it():
    raw = b'{"model":"claude-sonnet-4-5","messages":[],"model":"claude-sonnet-4-5"}'
    out = with_model(raw, REQUESTED, "glm-4.7")
    assert out == b'{"model":"claude-sonnet-4-5","messages":[],"model":"glm-4.7"}'


def test_rewrite_leaves_bodies_it_cannot_read_alone():
    r = rules()
    for body in (b"", b"not json", b"[1,2]", b'{"model": 7}', b'{"messages": []}'):
        assert rewrite(r, body, None).body is None
    same = rewrite(r, b'{"model":"glm-4.6"}', None)
    assert (same.requested, same.model, same.body) == ("glm-4.6", "glm-4.6", None)
    moved = rewrite(r, b'{"model":"glm-5.1","x":1}', "glm-4.7")
    assert (moved.requested, moved.model, moved.body) == ("glm-5.1", "glm-4.7", b'{"model":"glm-4.7","x":1}')


# -- the attempt filter -----------------------------------------------------------------------------

def attempt(models: ModelRules | None = None, fallen_back_to: str | None = None):
    verdicts: list[AttemptVerdict] = []
    session = AttemptSession(verdicts.append, models if models is not None else rules())
    session.on_request_metadata(fallen_back_to)
    return session, verdicts


def send(session: AttemptSession, model: str):
    return asyncio.run(session.on_request_body(orjson.dumps({"model": model, "max_tokens": 8})))


def refuse(session: AttemptSession, code: str, status: int = 429):
    buffer, _ = session.on_response_headers({":status": str(status)}, False)
    assert buffer
    body = orjson.dumps({"type": "error", "error": {"type": code, "message": "no"}})
    changes, _ = session.on_response_body(body)
    return dict(changes)


def test_first_attempt_sends_the_mapped_model_and_says_so():
    session, _ = attempt()
    change, fields = send(session, "claude-sonnet-4-5")
    assert orjson.loads(change.body)["model"] == "glm-4.7"
    assert dict(change.headers.set) == {"content-length": str(len(change.body))}
    assert fields == {"requested_model": "claude-sonnet-4-5", "model": "glm-4.7"}


def test_1312_moves_the_request_to_the_next_model_which_the_next_attempt_sends():
    first, verdicts = attempt()
    send(first, "glm-5.1")
    assert refuse(first, "1312")[RETRY_HEADER] == "true"
    assert first.moved_to == "glm-4.7"
    assert [v.signal for v in verdicts] == [Signal.OVERLOADED]  # reported once, never CONCURRENCY
    second, _ = attempt(fallen_back_to=first.moved_to)
    change, fields = send(second, "glm-5.1")
    assert orjson.loads(change.body)["model"] == "glm-4.7"
    assert fields == {"requested_model": "glm-5.1", "model": "glm-4.7"}


@pytest.mark.parametrize("model, code, retried, moved_to", [
    ("glm-5.1", "1312", True, "glm-4.7"),
    ("glm-5.1", "1311", True, "glm-4.7"),
    ("glm-4.5-air", "1312", False, None),  # the chain's end: the client gets the error
    ("glm-4.5-air", "1311", False, None),
    ("glm-4.6", "1311", False, None),  # in no chain: 1311 is never retried
    ("glm-4.6", "1312", True, None),  # in no chain: 1312 is retried as it is (overloaded)
    ("glm-5.1", "1302", True, None),  # not a model refusal: the same model again
    ("glm-5.1", "1308", False, None),
])
def test_retry_marker_follows_the_chain_for_model_refusals(model, code, retried, moved_to):
    session, _ = attempt()
    send(session, model)
    assert (RETRY_HEADER in refuse(session, code)) is retried
    assert session.moved_to == moved_to


def test_a_concurrency_refusal_after_a_fallback_stays_on_the_fallback_model():
    session, verdicts = attempt(fallen_back_to="glm-4.7")
    change, _ = send(session, "glm-5.1")
    assert orjson.loads(change.body)["model"] == "glm-4.7"
    assert RETRY_HEADER in refuse(session, "1302")
    assert session.moved_to is None  # the next attempt reads glm-4.7 again from the metadata
    assert [v.signal for v in verdicts] == [Signal.CONCURRENCY]


def test_without_rules_the_attempt_reads_no_body_and_retries_as_before():
    session, _ = attempt(ModelRules())
    assert send(session, "claude-sonnet-4-5") == (None, None)
    assert RETRY_HEADER not in refuse(session, "1311")
    session, _ = attempt(ModelRules())
    send(session, "glm-5.1")
    assert RETRY_HEADER in refuse(session, "1312") and session.moved_to is None


# -- Envoy's configuration --------------------------------------------------------------------------

def _diff(a: object, b: object, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in sorted(set(a) | set(b), key=str)
                for p in (_diff(a.get(k), b.get(k), f"{path}/{k}") if k in a and k in b else [f"{path}/{k}"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def _attempt_filters(bootstrap: dict) -> list[dict]:
    return [c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            ["http_filters"][0]["typed_config"]["extension_config"]["typed_config"]
            for c in bootstrap["static_resources"]["clusters"] if c["name"].startswith("zai_")]


def test_without_rules_envoy_config_is_as_before():
    base = {"ZAI_API_KEY": "k" * 16}
    plain = render(Settings.from_env(base))
    for attempt_filter in _attempt_filters(plain):
        assert attempt_filter["processing_mode"]["request_header_mode"] == "SKIP"
        assert attempt_filter["processing_mode"]["request_body_mode"] == "NONE"
        assert attempt_filter["message_timeout"] == "1s"
        assert "metadata_options" not in attempt_filter
    for listener in plain["static_resources"]["listeners"]:
        request_filter = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]
        assert "forwarding_namespaces" not in request_filter["typed_config"]["metadata_options"]
    assert render(Settings.from_env({**base, "MODEL_MAP": "", "MODEL_FALLBACKS": ""})) == plain


@pytest.mark.parametrize("env", [{"MODEL_MAP": MAP}, {"MODEL_FALLBACKS": CHAINS}])
def test_with_rules_only_the_attempt_filter_and_metadata_forwarding_change(env):
    base = {"ZAI_API_KEY": "k" * 16}
    plain, ruled = render(Settings.from_env(base)), render(Settings.from_env({**base, **env}))
    # The attempt filters' own connections to the ext_proc: a copy of the variant's cluster
    # (rendered with or without rules).
    own = {c["name"]: c for c in ruled["static_resources"]["clusters"]
           if c["name"].startswith("extproc_attempts_")}
    assert set(own) == {"extproc_attempts_production", "extproc_attempts_canary"}
    for doc in (plain, ruled):
        doc["static_resources"]["clusters"] = [c for c in doc["static_resources"]["clusters"]
                                               if c["name"] not in own]
    for variant, cluster in ((n.rsplit("_", 1)[1], c) for n, c in own.items()):
        shared = next(c for c in plain["static_resources"]["clusters"] if c["name"] == f"extproc_{variant}")
        assert cluster["load_assignment"]["endpoints"] == shared["load_assignment"]["endpoints"]
        assert cluster["per_connection_buffer_limit_bytes"] >= 2 * 33554432
    attempt_paths, request_paths = set(), set()
    for path in _diff(plain, ruled):
        if path.startswith("/static_resources/clusters["):  # the attempt filter of a Z.AI cluster
            attempt_paths.add(path.split("/extension_config/typed_config/", 1)[1])
        else:  # the request filter of each listener
            assert path.startswith("/static_resources/listeners["), path
            request_paths.add(path.split("/http_filters[0]/typed_config/", 1)[1])
    assert attempt_paths == {"processing_mode/request_header_mode",
                             "processing_mode/request_body_mode", "message_timeout",
                             "metadata_options"}
    assert request_paths == {"metadata_options/forwarding_namespaces"}
    for attempt_filter in _attempt_filters(ruled):
        assert attempt_filter["grpc_service"]["envoy_grpc"]["cluster_name"] in own
        assert attempt_filter["processing_mode"]["request_header_mode"] == "SEND"
        assert attempt_filter["processing_mode"]["request_body_mode"] == "BUFFERED"
        assert attempt_filter["metadata_options"] == {
            "forwarding_namespaces": {"untyped": ["zai_proxy"]},
            "receiving_namespaces": {"untyped": ["zai_proxy"]}}


# -- metrics ----------------------------------------------------------------------------------------

def test_metrics_name_requested_models_by_pattern_and_served_models_by_label():
    from prometheus_client import CollectorRegistry

    from extproc.api import Endpoint
    from extproc.proxy.outcome import Outcome
    from extproc.telemetry.metrics import Metrics
    from extproc.telemetry.model_metrics import ModelMetrics

    r = rules()
    assert r.label_models() == ("glm-4.7", "glm-4.5-air", "glm-5.1")
    assert r.pattern_of("Claude-Sonnet-4-5") == "claude-sonnet-*" and r.pattern_of("glm-5.1") is None
    registry = CollectorRegistry()
    metrics = Metrics("production", ("glm-4.7",) + r.label_models(), registry)
    models = ModelMetrics("production", r, metrics.model_label, registry)
    for requested, served in (("claude-sonnet-4-5", "glm-4.7"), ("glm-5.1", "glm-4.7"),
                              ("my-own-model", "my-own-model"), (None, None)):
        models.record(Outcome(Endpoint.MESSAGES, "w", "r", 200, 0.1, True,
                              requested_model=requested, model=served))
    models.on_chain("GLM-5.1", "glm-4.7", "1312")
    models.on_chain("glm-4.5-air", None, "1311")

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"deployment_variant": "production", **labels})

    assert value("zai_proxy_model_requests_total", requested_model="claude-sonnet-*", model="glm-4.7") == 1
    assert value("zai_proxy_model_requests_total", requested_model="glm-5.1", model="glm-4.7") == 1
    assert value("zai_proxy_model_requests_total", requested_model="other", model="other") == 1
    assert value("zai_proxy_model_requests_total", requested_model="unknown", model="unknown") == 1
    assert value("zai_proxy_model_fallbacks_total", model="glm-5.1", next_model="glm-4.7", code="1312") == 1
    assert value("zai_proxy_model_fallbacks_total", model="glm-4.5-air", next_model="none", code="1311") == 1


def test_the_codes_table_and_the_chains_agree_on_which_codes_are_model_refusals():
    from extproc.limiter.codes import CODES
    from extproc.proxy.models import MODEL_CODES

    assert {c.code for c in CODES.values() if c.fallback} == MODEL_CODES
