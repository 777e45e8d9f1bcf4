"""Incremental Server-Sent Events parser, correct across any chunk boundaries.

Works on bytes: events are split on CR, LF or CRLF only (ASCII), so a chunk boundary inside a
multi-byte UTF-8 character never matters, and nothing is decoded here. Each event keeps `raw`,
the exact bytes it spanned (including comments and blank lines before it), so that the
concatenation of every event's `raw` plus `SseParser.tail()` is exactly the input: a caller
that drops an event can still forward every other byte unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(slots=True, frozen=True)
class SseEvent:
    event: bytes  # the `event:` field, b"" when absent
    data: bytes  # `data:` lines joined with b"\n"
    raw: bytes  # every input byte since the previous event, up to its terminating blank line


def block_fields(block: bytes) -> tuple[bytes, list[bytes]]:
    """The `event` name and `data` lines of one event's lines (LF-separated, its blank line
    off). No `data`: the block dispatches nothing."""
    if block.startswith(b"event: "):  # Z.AI's shape, `event: name` and one `data: ...` line:
        line_end = block.find(b"\n")  # read by two searches, not the walk over the lines
        if (line_end != -1 and block.startswith(b"data: ", line_end + 1)
                and block.find(b"\n", line_end + 1) == -1):
            return block[7:line_end], [block[line_end + 7:]]
    event = b""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line[0] == 0x3A:  # a leading blank line (nothing pending), a comment
            continue
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value
    return event, data


class SseParser:
    __slots__ = ("_buf", "_scan", "_search", "_event", "_data")

    def __init__(self) -> None:
        self._buf: bytes | bytearray = b""  # bytes not yet part of a dispatched event
        self._scan = 0  # where in `_buf` the unparsed part (the current line) starts
        self._search = 0  # where in `_buf` to resume looking for that line's end
        self._event = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes, final: bool = False) -> list[SseEvent]:
        """Events completed by `chunk`, in order; `final` marks the end of the stream."""
        if not self._buf and b"\r" not in chunk:
            return self._feed_lf(chunk)
        return self._feed_any(chunk, final)

    def _feed_lf(self, chunk: bytes) -> list[SseEvent]:
        """The common case, at an event boundary with LF line ends only (what Z.AI sends): split
        on blank lines with bytes.split instead of scanning line by line. Same events, same raw
        bytes, same state left behind as `_feed_any`."""
        blocks = chunk.split(b"\n\n")
        blocks.pop()  # after the last blank line: the start of an unfinished event, or b""
        events: list[SseEvent] = []
        start = pos = 0
        for block in blocks:
            pos += len(block) + 2
            event, data = block_fields(block)
            if data:
                events.append(SseEvent(event, b"\n".join(data), chunk[start:pos]))
                start = pos
        # Undispatched bytes are parsed again with the next chunk (fields included).
        self._buf = chunk[start:]
        self._scan = self._search = 0
        self._event = b""
        self._data = []
        return events

    def _feed_any(self, chunk: bytes, final: bool) -> list[SseEvent]:
        # The undispatched bytes grow in place (amortised O(1) per byte) and are scanned from
        # where the last call stopped, so an event of n bytes in small chunks costs O(n).
        buf = self._buf if isinstance(self._buf, bytearray) else bytearray(self._buf)
        buf += chunk
        events: list[SseEvent] = []
        event_start = 0
        pos = self._scan
        search = max(pos, self._search)  # a long line is searched once, not once per chunk
        end = len(buf)
        while pos < end:
            match = _LINE_END.search(buf, search)
            if match is None:
                search = end
                break
            if match.end() == end and not final and match.group() == b"\r":
                search = match.start()
                break  # a CR at the end may be the first half of a CRLF: wait for more
            line = buf[pos:match.start()]
            pos = search = match.end()
            if line:
                self._field(line)
            elif self._data:
                events.append(SseEvent(self._event, b"\n".join(self._data), bytes(buf[event_start:pos])))
                event_start = pos
                self._event = b""
                self._data = []
            else:
                self._event = b""  # a blank line with no data dispatches nothing
        # Keep the undispatched bytes: the partial line, and the lines of the unfinished event
        # (their fields are already parsed, so only `raw` needs them).
        if event_start:
            del buf[:event_start]
        self._buf = buf
        self._scan = pos - event_start
        self._search = search - event_start
        return events

    def _field(self, line: bytes | bytearray) -> None:
        if line[0] == 0x3A:  # ":" starts a comment
            return
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(bytes(value))
        elif name == b"event":
            self._event = bytes(value)
        # id and retry do not matter to a proxy; unknown fields are ignored per the spec.

    def tail(self) -> bytes:
        """Bytes after the last complete event (an unfinished event at end of stream)."""
        return bytes(self._buf)

    def pending(self) -> int:
        return len(self._buf)
