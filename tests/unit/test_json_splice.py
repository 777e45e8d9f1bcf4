"""Splicing one member into a client's JSON leaves every other byte as sent."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from extproc.accounting.json_splice import set_member

# JSON as clients send it: big integers, unicode and escapes, floats, deep nesting.
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=20)
docs = st.dictionaries(st.text(max_size=8).filter(lambda k: k != "stream_options"), values, max_size=5)
layouts = st.fixed_dictionaries({
    "indent": st.sampled_from([None, 0, 2, "\t"]),
    "separators": st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")]),
    "ensure_ascii": st.booleans()})
options = st.sampled_from([None, {}, {"include_usage": False}, {"other": [1, {"x": 2}]}, "null", 7])

MEMBER = b'"stream_options":{"include_usage":true}'


def encode(doc: object, layout: dict) -> bytes:
    return json.dumps(doc, **layout).encode()


@given(docs, layouts, options)
@settings(max_examples=300)
def test_include_usage_spliced_without_touching_the_rest(doc, layout, stream_options):
    if stream_options is not None:
        doc = {**doc, "stream_options": None if stream_options == "null" else stream_options}
    raw = encode(doc, layout)
    out = set_member(raw, ("stream_options", "include_usage"), b"true")
    parsed = json.loads(out)
    before = doc.get("stream_options")
    expected = {**(before if isinstance(before, dict) else {}), "include_usage": True}
    assert parsed.pop("stream_options") == expected
    assert parsed == {k: v for k, v in doc.items() if k != "stream_options"}
    if "stream_options" not in doc:
        # Inserted as the first member: removing it gives back the bytes sent.
        start = raw.index(b"{") + 1
        assert out[:start] == raw[:start]
        assert out[start:].startswith(MEMBER)
        tail = out[start + len(MEMBER):]
        assert (tail[1:] if tail.startswith(b",") else tail) == raw[start:]
    else:
        # stream_options is the last member: everything before its key is unchanged, and the
        # object closes as it did.
        key = raw.rindex(b'"stream_options"')
        assert out[:key] == raw[:key]
        closing = len(raw) - len(raw.rstrip(b"}\n\t "))
        assert out[-closing:] == raw[-closing:]


def test_deep_nesting_and_big_numbers_stay_byte_exact():
    deep = "[" * 5000 + "]" * 5000
    raw = ('{"n": 123456789012345678901234567890, "f": 1.000000000000000000001, "d": %s, '
           '"s": "\\u00e9\\"}{[", "stream": true}' % deep).encode()
    out = set_member(raw, ("stream_options", "include_usage"), b"true")
    assert out == b'{' + MEMBER + b"," + raw[1:]


def test_last_duplicate_key_is_the_one_changed():
    raw = b'{"stream_options": {"include_usage": true}, "stream_options": {"include_usage": false}}'
    out = set_member(raw, ("stream_options", "include_usage"), b"true")
    assert out == b'{"stream_options": {"include_usage": true}, "stream_options": {"include_usage": true}}'


def test_large_body_is_linear_enough():
    raw = json.dumps({"messages": [{"content": "x" * 1000, "i": i} for i in range(8000)]}).encode()
    out = set_member(raw, ("stream_options", "include_usage"), b"true")
    assert out.endswith(raw[1:])


@pytest.mark.parametrize("raw", [b"[]", b"  7", b'"x"'])
def test_not_an_object_is_refused(raw):
    with pytest.raises(ValueError):
        set_member(raw, ("stream_options", "include_usage"), b"true")
