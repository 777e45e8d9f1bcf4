import asyncio
import base64
import json

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from extproc.api import Api
from extproc.accounting.request_body import (IMAGE_TOKENS, MESSAGE_OVERHEAD_TOKENS, PDF_MIN_TOKENS,
                                  REPLY_PRIMING_TOKENS, RequestPeek, compact_json, parse_request,
                                  mentions_user_id, parse_request_async, pdf_tokens,
                                  peek_request)
from spies import SpyExecutor


def body(**doc):
    return json.dumps(doc).encode()


def anthropic(*content, **extra):
    """One user message with these content blocks."""
    message = {"role": "user", "content": list(content)}
    return parse_request(body(model="glm-4.6", messages=[message], **extra), Api.ANTHROPIC)


def openai(*messages, **extra):
    return parse_request(body(model="glm-4.6", messages=list(messages), **extra), Api.OPENAI)


ONE_MESSAGE = MESSAGE_OVERHEAD_TOKENS + REPLY_PRIMING_TOKENS

# -- fields ---------------------------------------------------------------------------------------


def test_model_and_stream_are_read():
    info = parse_request(body(model="glm-4.6", stream=True, messages=[]), Api.ANTHROPIC)
    assert (info.model, info.stream, info.include_usage, info.malformed) == ("glm-4.6", True, None,
                                                                            None)


@pytest.mark.parametrize("value", ["true", 1, None, False])
def test_stream_is_true_only_for_json_true(value):
    assert parse_request(body(stream=value), Api.ANTHROPIC).stream is False


def test_non_string_model_is_none():
    assert parse_request(body(model=["glm"]), Api.OPENAI).model is None


@pytest.mark.parametrize("options,expected", [
    ({"include_usage": True}, True), ({"include_usage": False}, False), ({}, None),
    ({"include_usage": "yes"}, None), ("include_usage", None)])
def test_openai_include_usage(options, expected):
    assert parse_request(body(stream=True, stream_options=options), Api.OPENAI).include_usage \
        is expected


def test_include_usage_is_none_for_anthropic_even_if_sent():
    info = parse_request(body(stream_options={"include_usage": True}), Api.ANTHROPIC)
    assert info.include_usage is None


# -- malformed bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize("raw,reason", [
    (b"", "empty body"), (b"  \n", "empty body"), (b"{not json", "not JSON"),
    (b'{"a":1} trailing', "not JSON"), (b"\xff\xfe{}", "not JSON"), (b"[" * 5000, "not JSON"),
    (b"[1, 2]", "not a JSON object"), (b'"text"', "not a JSON object"),
    (b"null", "not a JSON object"),
])
@pytest.mark.parametrize("api", list(Api))
def test_malformed_bodies_are_reported_not_raised(raw, reason, api):
    info = parse_request(raw, api)
    assert info.malformed == reason
    assert (info.segments, info.fixed_tokens, info.model, info.stream) == ((), 0, None, False)


@pytest.mark.parametrize("api", list(Api))
@pytest.mark.parametrize("doc", [
    {"messages": "hello there"}, {"messages": [1, "two", None, {"content": 3}]},
    {"messages": [{"role": "user", "content": [7, None, ["x"], {"no": "type"}]}]},
    {"tools": {"name": "x"}}, {"tools": [None, 1, {"function": 2}]}, {"system": 42},
    {"messages": [{"role": "assistant", "tool_calls": "call", "function_call": [1]}]},
    {"messages": [{"role": "user", "content": [{"type": "document", "source": "x"},
                                               {"type": "document", "source": {"type": "base64",
                                                                               "data": 5}},
                                               {"type": "file", "file": "x"}]}]},
])
def test_wrong_typed_fields_never_raise(doc, api):
    info = parse_request(body(**doc), api)
    assert info.malformed is None
    assert all(isinstance(s, str) and s for s in info.segments)


def test_wrong_typed_content_is_counted_as_its_json():
    info = parse_request(body(messages="hello there", system={"weird": 1}), Api.ANTHROPIC)
    assert set(info.segments) == {"hello there", '{"weird":1}'}


def test_deeply_nested_tool_results_do_not_exhaust_the_stack():
    block = {"type": "text", "text": "bottom"}
    for _ in range(400):  # orjson accepts up to 1,024 levels
        block = {"type": "tool_result", "content": [block]}
    info = anthropic(block)
    assert info.malformed is None
    assert any("bottom" in s for s in info.segments)


def test_values_too_deep_for_orjson_dumps_still_count():
    deep = "leaf"
    for _ in range(400):
        deep = [deep]
    info = anthropic({"type": "mystery", "payload": deep})
    assert any("leaf" in s for s in info.segments)


# -- Anthropic ------------------------------------------------------------------------------------


def test_anthropic_text_and_string_content():
    info = parse_request(body(messages=[{"role": "user", "content": "plain"},
                                        {"role": "assistant", "content": [
                                            {"type": "text", "text": "block"}]}]), Api.ANTHROPIC)
    assert info.segments == ("plain", "block")
    assert info.fixed_tokens == 2 * MESSAGE_OVERHEAD_TOKENS + REPLY_PRIMING_TOKENS


def test_anthropic_system_string_and_blocks():
    assert parse_request(body(system="be brief"), Api.ANTHROPIC).segments == ("be brief",)
    info = parse_request(body(system=[{"type": "text", "text": "a", "cache_control": {}},
                                      {"type": "text", "text": "b"}]), Api.ANTHROPIC)
    assert info.segments == ("a", "b")
    assert info.fixed_tokens == 0  # no messages, no per-message overhead


def test_anthropic_tool_use_is_name_and_compact_input():
    info = anthropic({"type": "tool_use", "id": "toolu_1", "name": "Bash",
                      "input": {"command": "ls -la", "timeout": 5}})
    assert info.segments == ('Bash {"command":"ls -la","timeout":5}',)


def test_anthropic_tool_result_string_and_nested_blocks():
    info = anthropic(
        {"type": "tool_result", "tool_use_id": "t1", "content": "file contents"},
        {"type": "tool_result", "tool_use_id": "t2", "content": [
            {"type": "text", "text": "stdout"},
            {"type": "image", "source": {"type": "base64", "data": "AAAA" * 1000}}]})
    assert info.segments == ("file contents", "stdout")
    assert info.fixed_tokens == ONE_MESSAGE + IMAGE_TOKENS


def test_anthropic_thinking_text_counts_but_not_its_signature():
    info = anthropic({"type": "thinking", "thinking": "let me see", "signature": "sig" * 100})
    assert info.segments == ("let me see",)


def test_anthropic_image_is_flat_and_its_base64_is_not_text():
    info = anthropic({"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                  "data": "iVBOR" * 10_000}},
                     {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}})
    assert info.segments == ()
    assert info.fixed_tokens == ONE_MESSAGE + 2 * IMAGE_TOKENS


def test_anthropic_documents():
    pdf = base64.b64encode(b"%PDF-1.7" + b"\0" * 1_000_000).decode()
    info = anthropic(
        {"type": "document", "title": "Notes",
         "source": {"type": "text", "media_type": "text/plain", "data": "document body"}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                        "data": pdf}},
        {"type": "document", "source": {"type": "url", "url": "https://x/y.pdf"}},
        {"type": "document", "source": {"type": "content", "content": [
            {"type": "text", "text": "chunk one"}]}})
    assert info.segments == ("Notes", "document body", "chunk one")
    assert info.fixed_tokens == ONE_MESSAGE + pdf_tokens(len(pdf)) + PDF_MIN_TOKENS
    assert pdf_tokens(len(pdf)) == 1_000_008 // 25 + 1


def test_pdf_rule_has_a_one_page_floor():
    assert pdf_tokens(0) == pdf_tokens(1000) == PDF_MIN_TOKENS


def test_anthropic_tools_one_segment_each():
    schema = {"type": "object", "properties": {"path": {"type": "string"}}}
    info = parse_request(body(tools=[
        {"name": "Read", "description": "Reads a file", "input_schema": schema},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]), Api.ANTHROPIC)
    assert info.segments == ("Read\nReads a file\n" + compact_json(schema),
                             '{"type":"web_search_20250305","name":"web_search","max_uses":5}')


def test_anthropic_unknown_blocks_count_as_compact_json():
    block = {"type": "search_result", "source": "https://x", "content": [{"type": "text",
                                                                          "text": "found"}]}
    assert anthropic(block).segments == (orjson.dumps(block).decode(),)


def test_empty_texts_make_no_segments():
    assert anthropic({"type": "text", "text": ""}).segments == ()


def test_count_tokens_body_has_the_same_shape():
    info = parse_request(body(model="glm-4.6", system="s", messages=[
        {"role": "user", "content": "hi"}]), Api.ANTHROPIC)
    assert info.segments == ("s", "hi") and info.stream is False


# -- OpenAI ---------------------------------------------------------------------------------------


def test_openai_string_content_and_parts():
    info = openai({"role": "system", "content": "be brief"},
                  {"role": "user", "content": [
                      {"type": "text", "text": "look"},
                      {"type": "image_url",
                       "image_url": {"url": "data:image/png;base64," + "A" * 9999}},
                      {"type": "refusal", "refusal": "no"}]})
    assert info.segments == ("be brief", "look", "no")
    assert info.fixed_tokens == 2 * MESSAGE_OVERHEAD_TOKENS + REPLY_PRIMING_TOKENS + IMAGE_TOKENS


def test_openai_tool_calls_and_legacy_function_call():
    info = openai({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get", "arguments": '{"a": 1}'}}]},
        {"role": "assistant", "function_call": {"name": "old", "arguments": "{}"}},
        {"role": "tool", "tool_call_id": "c1", "name": "get", "content": "result"})
    assert info.segments == ('get {"a": 1}', "old {}", "get", "result")


def test_openai_tools_and_legacy_functions():
    params = {"type": "object", "properties": {"q": {"type": "string"}}}
    info = parse_request(body(
        tools=[{"type": "function", "function": {"name": "search", "description": "Find",
                                                 "parameters": params}},
               {"type": "web_search"}],
        functions=[{"name": "legacy", "parameters": params}]), Api.OPENAI)
    assert info.segments == ("search\nFind\n" + compact_json(params), '{"type":"web_search"}',
                             "legacy\n\n" + compact_json(params))


def test_openai_file_part_uses_the_pdf_rule():
    data = "data:application/pdf;base64," + "A" * 400_000
    info = openai({"role": "user", "content": [{"type": "file", "file": {"file_data": data}},
                                               {"type": "file", "file": {"file_id": "f1"}}]})
    assert info.fixed_tokens == ONE_MESSAGE + pdf_tokens(len(data)) + PDF_MIN_TOKENS


def test_openai_unknown_part_counts_as_json():
    part = {"type": "input_audio", "input_audio": {"data": "QUJD", "format": "wav"}}
    assert openai({"role": "user", "content": [part]}).segments == (compact_json(part),)


# -- async ----------------------------------------------------------------------------------------




async def test_parse_request_async_uses_the_executor_only_for_big_bodies():
    executor = SpyExecutor()
    small = body(model="m", messages=[{"role": "user", "content": "hi"}])
    big = body(model="m", messages=[{"role": "user", "content": "x" * 300_000}])
    try:
        assert await parse_request_async(small, Api.ANTHROPIC, executor) == \
            parse_request(small, Api.ANTHROPIC)
        assert executor.submitted == 0
        assert await parse_request_async(big, Api.ANTHROPIC, executor) == \
            parse_request(big, Api.ANTHROPIC)
        assert executor.submitted == 1
        assert (await parse_request_async(b"{", Api.OPENAI, executor,
                                          inline_limit_bytes=0)).malformed == "not JSON"
    finally:
        executor.shutdown()


# -- properties -----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False,
                                                                           allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "text", "content", "messages", "system", "tools", "source", "data",
                         "input", "name", "function", "tool_calls", "model", "stream", "x"]),
        children, max_size=5),
    max_leaves=30)
block_types = st.sampled_from(["text", "thinking", "tool_use", "tool_result", "image", "document",
                               "image_url", "file", "refusal", "server_tool_use", "mystery"])
blocks = st.fixed_dictionaries({"type": block_types}, optional={
    "text": json_values, "content": json_values, "source": json_values, "input": json_values,
    "thinking": json_values, "file": json_values, "name": json_values})
roles = st.sampled_from(["user", "assistant", "tool"])
messages = st.fixed_dictionaries({"role": roles}, optional={
    "content": st.one_of(json_values, st.lists(blocks, max_size=4)), "tool_calls": json_values,
    "function_call": json_values, "name": json_values})
requests = st.fixed_dictionaries({}, optional={
    "model": json_values, "stream": json_values, "system": json_values, "tools": json_values,
    "stream_options": json_values, "functions": json_values,
    "messages": st.one_of(json_values, st.lists(messages, max_size=4))})


@settings(max_examples=300)
@given(raw=st.binary(max_size=200), api=st.sampled_from(list(Api)))
def test_arbitrary_bytes_never_raise(raw, api):
    try:
        is_object = isinstance(orjson.loads(raw), dict)
    except orjson.JSONDecodeError:
        is_object = False
    assert (parse_request(raw, api).malformed is None) == is_object


@settings(max_examples=300)
@given(value=json_values, api=st.sampled_from(list(Api)))
def test_arbitrary_json_values_never_raise(value, api):
    info = parse_request(orjson.dumps(value), api)
    assert (info.malformed is None) == isinstance(value, dict)


@settings(max_examples=500)
@given(doc=requests, api=st.sampled_from(list(Api)))
def test_request_shaped_json_never_raises_and_yields_text_segments(doc, api):
    info = parse_request(orjson.dumps(doc), api)
    assert info.malformed is None
    assert all(isinstance(s, str) and s for s in info.segments)
    assert info.fixed_tokens >= 0


@given(texts=st.lists(st.text(min_size=1), max_size=6), api=st.sampled_from(list(Api)))
def test_every_text_block_lands_in_segments_in_order(texts, api):
    content = [{"type": "text", "text": t} for t in texts]
    info = parse_request(orjson.dumps({"messages": [{"role": "user", "content": content}]}), api)
    assert info.segments == tuple(texts)


def test_parse_runs_in_the_loop_default_executor_when_none_given():
    raw = body(messages=[{"role": "user", "content": "x" * 10}])
    info = asyncio.run(parse_request_async(raw, Api.ANTHROPIC, None, inline_limit_bytes=1))
    assert info.segments == ("x" * 10,)


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                     st.text(max_size=8))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["model", "a", "user_id", "x"]), inner, max_size=3)),
    max_leaves=8)


@settings(max_examples=300)
@given(st.data())
def test_peek_reads_the_model_and_session_parse_reads(data):
    """Whatever the members' order, nesting (a nested "model" or "user_id" first), escapes and
    spacing: the peek's model and agent session are exactly the full parse's."""
    members = data.draw(st.dictionaries(st.sampled_from(["stream", "max_tokens", "messages", "a", "b"]),
                                        _VALUES, max_size=4))
    if data.draw(st.booleans()):
        members["model"] = data.draw(st.one_of(st.text(max_size=12), st.integers(), st.none()))
    if data.draw(st.booleans()):
        members["metadata"] = {"user_id": data.draw(st.sampled_from(
            ["user_1_account_2_session_abcdef12-0000", "nobody", 7]))}
    order = data.draw(st.permutations(list(members)))
    body = json.dumps({k: members[k] for k in order},
                      separators=data.draw(st.sampled_from([(",", ":"), (", ", ": ")])),
                      ensure_ascii=data.draw(st.booleans())).encode()
    if data.draw(st.booleans()):
        body = b"  \n" + body
    peek = peek_request(body)
    info = parse_request(body, Api.ANTHROPIC)
    assert (peek.model, peek.agent_session) == (info.model, info.agent_session)
    # With the session known from the header, the model is still the parse's.
    assert peek_request(body, session_known=True).model == info.model


@settings(max_examples=500)
@given(st.binary(max_size=300), st.binary(max_size=300), st.integers(min_value=0, max_value=3))
def test_the_user_id_search_finds_what_bytes_find_does(head, tail, copies):
    """The SIMD search agrees with `bytes.find` wherever the key sits (start, end, straddling
    nothing, repeated, cut short) and on any bytes around it."""
    for body in (head + b'"user_id"' * copies + tail, head + b'"user_id'[:copies + 4] + tail,
                 b'"user_id"'[copies:] + head):
        assert mentions_user_id(body) is (b'"user_id"' in body)


def test_the_user_id_search_over_a_long_conversation():
    text = json.dumps({"model": "m", "messages": [{"role": "user", "content": 'say "user_id" ' * 20_000}]})
    body = text.encode()  # quoted inside a string: escaped, so not the key
    assert not mentions_user_id(body)
    assert mentions_user_id(body[:-1] + b',"metadata":{"user_id":"u"}}')


def test_peek_of_a_body_that_is_not_an_object():
    assert peek_request(b"") == peek_request(b"[1]") == peek_request(b'{"a": [') == RequestPeek(None, None)
    # A body cut short (past MAX_REQUEST_BODY_BYTES) still names the model it started with.
    assert peek_request(b'{"model": "glm-4.7", "messages": [') == RequestPeek("glm-4.7", None)
