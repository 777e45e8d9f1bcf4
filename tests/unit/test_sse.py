from hypothesis import given, settings, strategies as st

from extproc.accounting.sse import SseParser
from streams import anthropic_stream, openai_stream, splits


def parse_all(chunks):
    parser = SseParser()
    events = []
    for i, chunk in enumerate(chunks):
        events.extend(parser.feed(chunk, final=i == len(chunks) - 1))
    return events, parser.tail()


def test_basic_fields_comments_and_multiline_data():
    body = b": hello\nevent: a\ndata: 1\ndata:2\nid: 7\nretry: 5\n\ndata: x\r\n\r\nevent: b\rdata: y\r\r"
    events, tail = parse_all([body])
    assert [(e.event, e.data) for e in events] == [(b"a", b"1\n2"), (b"", b"x"), (b"b", b"y")]
    assert b"".join(e.raw for e in events) + tail == body


def test_blank_lines_without_data_dispatch_nothing():
    events, tail = parse_all([b"event: ping\n\n\n\ndata: z\n\n"])
    assert [(e.event, e.data) for e in events] == [(b"", b"z")]


def test_cr_at_chunk_end_waits_for_possible_lf():
    parser = SseParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []
    [event] = parser.feed(b"\r\n")
    assert event.data == b"a" and event.raw == b"data: a\r\n\r\n"


def test_unfinished_event_stays_in_tail():
    events, tail = parse_all([b"data: 1\n\ndata: 2\n"])
    assert [e.data for e in events] == [b"1"] and tail == b"data: 2\n"


@settings(max_examples=300)
@given(st.data())
def test_any_chunking_gives_the_same_events_and_bytes(data):
    _, body = data.draw(st.one_of(anthropic_stream(), openai_stream()))
    whole, whole_tail = parse_all([body])
    chunks = data.draw(splits(body))
    events, tail = parse_all(chunks)
    assert [(e.event, e.data, e.raw) for e in events] == [(e.event, e.data, e.raw) for e in whole]
    assert b"".join(e.raw for e in events) + tail == body
    assert tail == whole_tail == b""


@given(st.binary(max_size=300), st.data())
def test_arbitrary_bytes_never_lose_or_invent_bytes(body, data):
    chunks = data.draw(splits(body)) if body else [b""]
    events, tail = parse_all(chunks)
    assert b"".join(e.raw for e in events) + tail == body


class LineByLineParser(SseParser):
    """The general line-by-line path only: the reference for the LF fast path."""

    def feed(self, chunk: bytes, final: bool = False):
        return self._feed_any(chunk, final)


_SSE_PIECES = st.sampled_from([b"data: x", b"data:y", b"event: e", b": c", b"id: 1", b"data: {\"a\":1}",
                               b"", b"\n", b"\r", b"\r\n", b"\n\n", b"data", b":"])


@settings(max_examples=400)
@given(st.lists(_SSE_PIECES, max_size=40), st.data())
def test_lf_fast_path_matches_the_line_by_line_parser(pieces, data):
    body = b"".join(pieces)
    chunks = data.draw(splits(body)) if body else [b""]
    fast, slow = SseParser(), LineByLineParser()
    for i, chunk in enumerate(chunks):
        final = i == len(chunks) - 1
        got = [(e.event, e.data, e.raw) for e in fast.feed(chunk, final)]
        assert got == [(e.event, e.data, e.raw) for e in slow.feed(chunk, final)]
    assert fast.tail() == slow.tail()
