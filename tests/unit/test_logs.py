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
