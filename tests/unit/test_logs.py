"""The "Token usage" line is written straight to the log's file descriptor, in order with every
other line, with secrets redacted, and through the text stream when there is no descriptor."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Iterator

import pytest

from extproc.telemetry import logs

SECRET = "sk-upstream-0123456789"


@pytest.fixture
def root_handlers() -> Iterator[None]:
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield
    root.handlers[:] = saved
    root.setLevel(level)


def _lines(stream: io.TextIOBase | None, path: Path | None = None) -> list[dict[str, object]]:
    text = path.read_text(encoding="utf-8") if path is not None else stream.getvalue()  # type: ignore[union-attr]
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("backed_by_file", [True, False])
def test_usage_lines_keep_order_and_never_show_a_secret(tmp_path: Path, root_handlers: None,
                                                          backed_by_file: bool) -> None:
    logs.setup("extproc", "INFO", lambda: [SECRET])
    path = tmp_path / "log.jsonl"
    stream = open(path, "w", encoding="utf-8") if backed_by_file else io.StringIO()
    logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]
    log = logging.getLogger("extproc.test")
    log.info("before", extra={"n": 1})
    logs.info_line(log, "Token usage", {"worker": "w", "note": f"carries {SECRET}", "text": "ü é"})
    log.warning("after")
    logs.info_line(log, "Token usage", {"worker": "v"})
    stream.flush()
    docs = _lines(stream, path if backed_by_file else None)
    assert [d["message"] for d in docs] == ["before", "Token usage", "after", "Token usage"]
    assert docs[1]["note"] == "carries [REDACTED]" and docs[1]["text"] == "ü é"
    assert docs[3]["worker"] == "v" and docs[1]["component"] == "extproc"
    raw = path.read_text(encoding="utf-8") if backed_by_file else stream.getvalue()  # type: ignore[union-attr]
    assert SECRET not in raw
    if backed_by_file:
        stream.close()


def test_usage_lines_of_one_loop_turn_go_out_in_one_write(tmp_path: Path, root_handlers: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """On an event loop the usage lines wait for the end of the loop's turn and go out in one
    `write`; any other line writes them first; a loop that stops mid-turn leaves its lines to
    the next loop's turn, or to the next line written off a loop (or to the exit)."""
    import asyncio
    import os

    logs.setup("extproc", "INFO", lambda: [SECRET])
    path = tmp_path / "log.jsonl"
    stream = open(path, "w", encoding="utf-8")
    logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]
    log = logging.getLogger("extproc.test")
    writes: list[bytes] = []
    real_write = os.write

    def counted(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(logs.os, "write", counted)

    async def turns() -> None:
        size = path.stat().st_size
        for n in range(3):
            logs.info_line(log, "Token usage", {"n": n, "key": SECRET})
        assert path.stat().st_size == size  # waiting for the turn to end
        await asyncio.sleep(0)
        assert path.stat().st_size > size  # the turn ended: written
        log.info("between")
        logs.info_line(log, "Token usage", {"n": 3})
        log.warning("last")  # goes out after the line before it
        logs.info_line(log, "Token usage", {"n": 4})

    asyncio.run(turns())
    stranded = asyncio.new_event_loop()  # stops in the turn that wrote a line
    stranded.call_soon(lambda: (logs.info_line(log, "Token usage", {"n": 9}), stranded.stop()))
    stranded.run_forever()
    stranded.close()
    asyncio.run(turns())  # the next loop's first turn writes the stranded line with its own
    logs.info_line(log, "Token usage", {"n": 5})  # off a loop: at once
    stream.flush()
    docs = _lines(None, path)
    assert [d.get("n", d["message"]) for d in docs] == [0, 1, 2, "between", 3, "last", 4, 9,
                                                         0, 1, 2, "between", 3, "last", 4, 5]
    assert [w.count(b"\n") for w in writes] == [3, 1, 1, 4, 1, 1, 1]
    assert SECRET not in path.read_text(encoding="utf-8")
    stream.close()
