import json

from hypothesis import given, settings, strategies as st

from extproc.api import Api
from extproc.emulator import anthropic_sse, openai_sse
from extproc.accounting.response_body import ResponseBody
from extproc.accounting.sse import SseParser
from extproc.accounting.usage import Usage
from streams import anthropic_stream, openai_stream, reply, splits


def run(api, chunks, streaming=True, drop=False):
    body = ResponseBody(api, streaming, drop)
    delivered = []
    for i, chunk in enumerate(chunks):
        out = body.feed(chunk, i == len(chunks) - 1, lambda i=i: float(i))
        delivered.append(chunk if out is None else out)
    return body, b"".join(delivered)


def usage_tuple(u: Usage):
    return (u.input, u.output, u.cache_read, u.cache_write)


@settings(max_examples=200)
@given(st.data())
def test_anthropic_usage_and_bytes_independent_of_chunking(data):
    r, body = data.draw(anthropic_stream())
    chunks = data.draw(splits(body))
    result, delivered = run(Api.ANTHROPIC, chunks)
    assert delivered == body
    facts = result.facts
    assert usage_tuple(facts.usage) == (r.input_tokens, r.output_tokens, r.cache_read_tokens,
                                        r.cache_write_tokens)
    assert facts.complete and facts.model == "glm-4.7" and facts.error_type is None
    assert result.delivered_text() == r.text


@settings(max_examples=200)
@given(st.data())
def test_openai_usage_and_bytes_independent_of_chunking(data):
    r, body = data.draw(openai_stream())
    chunks = data.draw(splits(body))
    result, delivered = run(Api.OPENAI, chunks)
    assert delivered == body
    assert usage_tuple(result.facts.usage) == (r.input_tokens, r.output_tokens, r.cache_read_tokens, None)
    assert result.facts.complete
    assert result.delivered_text() == r.text


@settings(max_examples=200)
@given(st.data())
def test_requested_usage_chunk_is_removed_and_nothing_else_changes(data):
    r, body = data.draw(openai_stream(include_usage=True))
    chunks = data.draw(splits(body))
    result, delivered = run(Api.OPENAI, chunks, drop=True)
    parser = SseParser()
    # The usage-only chunk (no choices) goes; a content delta that says "usage" stays.
    kept = [e.raw for e in parser.feed(body, final=True) if b'"choices":[]' not in e.data]
    assert delivered == b"".join(kept)
    assert usage_tuple(result.facts.usage)[:3] == (r.input_tokens, r.output_tokens, r.cache_read_tokens)


def test_first_token_time_is_the_first_content_delta():
    events = anthropic_sse.stream_events(reply(["a", "b"]))
    chunks = [e.encode() for e in events]
    result, _ = run(Api.ANTHROPIC, chunks)
    first_delta = next(i for i, e in enumerate(events) if e.name == "content_block_delta")
    assert result.facts.first_token_at == float(first_delta)


def test_error_event_after_200_is_recorded_with_its_type():
    events = anthropic_sse.stream_events(reply(["a", "b"]))[:4]
    body = b"".join(e.encode() for e in events) + (
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"x"}}\n\n')
    result, _ = run(Api.ANTHROPIC, [body])
    assert result.facts.error_type == "overloaded_error" and not result.facts.complete


def test_cut_stream_has_partial_usage_and_the_delivered_text():
    events = anthropic_sse.stream_events(reply(["one ", "two ", "three"]))
    cut = [e for e in events if e.name != "message_delta"][:5]
    body = b"".join(e.encode() for e in cut)
    result, _ = run(Api.ANTHROPIC, [body[:-7]])  # cut inside the last event
    assert result.facts.usage.output == 1  # message_start's placeholder, not a final count
    assert not result.facts.complete
    delivered = "".join(e.text or "" for e in cut[:-1])
    assert result.delivered_text() == delivered


def test_whole_json_bodies_of_both_formats():
    r = reply(["hello ", "world"])
    body = json.dumps(anthropic_sse.message(r)).encode()
    result, _ = run(Api.ANTHROPIC, [body[:10], body[10:]], streaming=False)
    assert usage_tuple(result.facts.usage) == (r.input_tokens, r.output_tokens, 56, 7)
    assert result.delivered_text() == "hello world"
    body = json.dumps(openai_sse.completion(r)).encode()
    result, _ = run(Api.OPENAI, [body], streaming=False)
    assert usage_tuple(result.facts.usage)[:3] == (r.input_tokens, r.output_tokens, 56)


def test_zai_error_bodies_give_type_and_code():
    result, _ = run(Api.ANTHROPIC, [b'{"type":"error","error":{"type":"1302","message":"busy"}}'],
                    streaming=False)
    assert (result.facts.error_type, result.facts.error_code) == ("1302", "1302")
    result, _ = run(Api.OPENAI, [b'{"error":{"code":"1308","message":"reset at ..."}}'], streaming=False)
    assert result.facts.error_code == "1308"


@given(st.binary(max_size=400), st.booleans(), st.sampled_from([Api.ANTHROPIC, Api.OPENAI]))
def test_garbage_never_raises(body, streaming, api):
    result, delivered = run(api, [body], streaming)
    assert delivered == body
    result.delivered_text()


# Content that names the markers the observer's fast path looks for, as a model's text might.
MARKER_TEXTS = st.lists(st.sampled_from(['error', '"error"', 'event: error', 'message_delta',
                                         'ok ', '\n\n', 'data: x']), min_size=1, max_size=8)


SHAPES = [
    lambda raw: raw,
    lambda raw: raw.replace(b"event: ", b"event:", 1),  # no space after the colon
    lambda raw: raw.replace(b"data: ", b"data:", 1),
    lambda raw: b": ping\n" + raw,  # a comment line first
    lambda raw: raw.replace(b"\ndata: ", b"\nid: 7\ndata: ", 1),  # a field the tracker ignores
]


@settings(max_examples=300)
@given(st.data())
def test_chunks_of_whole_events_skipped_unparsed_give_the_same_facts(data):
    """Envoy hands the observer one chunk per upstream read, usually whole events: such chunks
    go by unparsed once the first token is seen. Whatever the grouping, the text (markers
    included), cut or complete, an error event or not: the facts and the delivered text are
    those of the same bytes parsed event by event."""
    deltas = data.draw(st.one_of(MARKER_TEXTS, st.lists(st.text(min_size=1, max_size=12),
                                                         min_size=1, max_size=8)))
    events = anthropic_sse.stream_events(reply(deltas))
    if data.draw(st.booleans()):  # cut before message_delta, or ended by an error event
        events = [e for e in events if e.name not in ("message_delta", "message_stop")]
    # Z.AI's shape (`event: name` then one `data: ...` line) and the other spellings SSE allows.
    shapes = data.draw(st.lists(st.sampled_from(SHAPES), min_size=len(events), max_size=len(events)))
    encoded = [shape(e.encode()) for shape, e in zip(shapes, events)]
    if data.draw(st.booleans()):
        encoded.append(b'event: error\ndata: {"type":"error","error":{"type":"1302","message":"x"}}\n\n')
    groups = data.draw(st.lists(st.integers(1, 3), min_size=len(encoded), max_size=len(encoded)))
    chunks, i = [], 0
    for size in groups:
        if i < len(encoded):
            chunks.append(b"".join(encoded[i:i + size]))
            i += size
    fast, _ = run(Api.ANTHROPIC, chunks)
    slow = ResponseBody(Api.ANTHROPIC, True)
    for index, chunk in enumerate(chunks):  # the parser alone, no skipping
        for event in slow._parser.feed(chunk, index == len(chunks) - 1):
            slow._stream.on_event(event, float(index))
    assert fast.facts == slow.facts
    assert fast.delivered_text() == slow.delivered_text() == "".join(
        e.text or "" for e in events if e.name == "content_block_delta")


@settings(max_examples=300)
@given(st.data())
def test_chunks_after_the_first_token_are_gathered_and_give_the_same_facts(data):
    """Past the first token the chunks are only gathered, and accounted together at the end,
    when the facts are read (a cut stream), or past `gather_bytes`. Whatever the split, the
    threshold and the moment of reading: the facts are those of the same bytes fed event by
    event, and the clock is read only up to the chunk that held the first token."""
    api = data.draw(st.sampled_from([Api.ANTHROPIC, Api.OPENAI]))
    r, body = data.draw(anthropic_stream() if api is Api.ANTHROPIC else openai_stream())
    chunks = data.draw(splits(body))
    cut = data.draw(st.integers(1, len(chunks)))  # chunks seen before the facts are read
    gathered = ResponseBody(api, True, gather_bytes=data.draw(st.integers(1, 400)))
    reads: list[int] = []
    for i, chunk in enumerate(chunks[:cut]):
        def clock(i: int = i) -> float:
            reads.append(i)
            return float(i)
        assert gathered.feed(chunk, i == len(chunks) - 1, clock) is None
    slow = ResponseBody(api, True)
    for i, chunk in enumerate(chunks[:cut]):  # the parser alone, event by event
        for event in slow._parser.feed(chunk, i == len(chunks) - 1):
            slow._stream.on_event(event, float(i))
    facts = gathered.facts
    assert facts == slow.facts
    assert gathered.delivered_text() == slow.delivered_text()
    first = facts.first_token_at
    assert reads == list(range(cut if first is None else int(first) + 1))
