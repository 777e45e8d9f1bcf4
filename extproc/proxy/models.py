"""The fleet's model rules, in one place: `MODEL_MAP` rewrites the model a request names, and
`MODEL_FALLBACKS` moves a request whose attempt Z.AI refused for its model to the next model of
its chain. Pure: settings and bytes in, decisions and bytes out.

Per upstream attempt (the attempt filter, extproc/proxy/attempt.py): the attempt goes out with
the model the request fell back to, if an earlier attempt fell back, else with `MODEL_MAP`
applied to the model the client asked for. When the attempt fails with a model code (1312 model
overloaded, 1311 model not in the plan) and its model is in a chain, the chain decides: retry on
the next model, or, at the chain's end, no retry (the client gets Z.AI's last error). For other
codes, and models in no chain, the code's own retry rule holds (extproc/limiter/codes.py).

The rewrite changes only the body's top-level `model` value (`with_model`, a regular-expression
scan, checked by the parser where it is ambiguous), so every other byte stays as the client sent
it.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import orjson

from extproc.config import Settings

# Z.AI's codes that say "not this model": another model may serve the request.
MODEL_CODES = frozenset({"1311", "1312"})


@dataclass(frozen=True)
class Fallback:
    """What the chains say about a failed attempt: `decides` False leaves it to the code's own
    retry rule; otherwise `next_model` is the model to retry on, None: the chain is exhausted
    (not retried)."""

    decides: bool
    next_model: str | None = None


NOT_OURS = Fallback(False)


@dataclass(frozen=True)
class ModelRules:
    """`MODEL_MAP` (lower-case pattern, model), first match wins; `MODEL_FALLBACKS` chains."""

    mapping: tuple[tuple[str, str], ...] = ()
    chains: tuple[tuple[str, ...], ...] = ()
    _next: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        after: dict[str, str] = {}
        for chain in self.chains:
            for model, following in zip(chain, chain[1:]):
                after.setdefault(model.lower(), following)
        object.__setattr__(self, "_next", after)

    @classmethod
    def of(cls, settings: Settings) -> "ModelRules":
        return cls(settings.model_map or (), settings.model_fallbacks or ())

    @property
    def active(self) -> bool:
        """Whether attempts need their bodies read at all (else nothing here runs)."""
        return bool(self.mapping or self.chains)

    def mapped(self, model: str) -> str:
        """`model` after MODEL_MAP: the first matching pattern's model, else `model` itself."""
        lowered = model.lower()
        for pattern, target in self.mapping:
            if fnmatchcase(lowered, pattern):
                return target
        return model

    def pattern_of(self, model: str | None) -> str | None:
        """The MODEL_MAP pattern `model` matched (as configured, lower case), else None."""
        if model is None:
            return None
        lowered = model.lower()
        return next((pattern for pattern, _ in self.mapping if fnmatchcase(lowered, pattern)), None)

    def label_models(self) -> tuple[str, ...]:
        """Every model the rules name (MODEL_MAP targets, chain models): configured, so bounded,
        and worth a `model` label of their own."""
        named = [target for _, target in self.mapping] + [m for chain in self.chains for m in chain]
        return tuple(dict.fromkeys(m.lower() for m in named))

    def in_chain(self, model: str) -> bool:
        lowered = model.lower()
        return any(lowered == m.lower() for chain in self.chains for m in chain)

    def next_model(self, model: str) -> str | None:
        """The model after `model` in its chain, or None (its chain ends there, or it has none)."""
        return self._next.get(model.lower())

    def after_failure(self, model: str | None, code: str | None) -> Fallback:
        """A failed attempt sent with `model` and answered with business `code`."""
        if model is None or code not in MODEL_CODES or not self.in_chain(model):
            return NOT_OURS
        return Fallback(True, self.next_model(model))

    def choose(self, requested: str, fallen_back_to: str | None) -> str:
        """The model an attempt goes out with: where an earlier attempt fell back to, else the
        requested model after MODEL_MAP."""
        return fallen_back_to or self.mapped(requested)


# -- the body ------------------------------------------------------------------------------------

def _letter(c: str) -> bytes:
    """One letter of a JSON key: as itself, or as a \\u escape (hex digits in either case)."""
    hexes = "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in f"{ord(c):04x}")
    return b"(?:" + re.escape(c.encode()) + rb"|\\u" + hexes.encode() + b")"


# A key that decodes to "model" (plain or escaped), and the string value after it.
_MODEL_MEMBER = re.compile(
    b'"' + b"".join(_letter(c) for c in "model") + rb'"[ \t\r\n]*:[ \t\r\n]*'
    rb'("[^"\\]*(?:\\.[^"\\]*)*")')


def requested_model(body: bytes) -> str | None:
    """The body's top-level `model`, when the body is a JSON object and that is a string."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    model = doc.get("model") if isinstance(doc, dict) else None
    return model if isinstance(model, str) else None


def with_model(body: bytes, requested: str, model: str) -> bytes | None:
    """`body` (a JSON object whose top-level `model` is the string `requested`) with that value
    set to `model`, every other byte as sent; None if it cannot be found for certain.

    Every member named "model" (at any depth, its key written plainly or with \\u escapes) whose
    value is a string is a candidate (in valid JSON, a quote not after a backslash that is
    followed by such a key and a colon opens a key). The top-level one is among them, with the
    value `requested`: when exactly one candidate has that value, it is the top-level one.
    Otherwise each candidate with that value is tried, last first (parsers keep the last of
    duplicate keys), and kept if the parser then finds `model` at the top level. The scan is a
    regular expression over the bytes, so a big body costs about one parse.
    """
    value = orjson.dumps(model)
    # A quote after a backslash is inside a string (an escaped quote), never a key's.
    candidates = [m.span(1) for m in _MODEL_MEMBER.finditer(body)
                  if body[m.start() - 1:m.start()] != b"\\"
                  and _decoded(body[m.start(1):m.end(1)]) == requested]
    if len(candidates) == 1:
        start, end = candidates[0]
        return body[:start] + value + body[end:]
    for start, end in reversed(candidates):
        spliced = body[:start] + value + body[end:]
        try:
            doc = orjson.loads(spliced)
        except orjson.JSONDecodeError:
            continue
        if isinstance(doc, dict) and doc.get("model") == model:
            return spliced
    return None


def _decoded(raw: bytes) -> str | None:
    try:
        text = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return text if isinstance(text, str) else None


@dataclass(frozen=True)
class Rewrite:
    """One attempt's body decision: the model asked for, the model sent, and the new body (None:
    the body goes as it is)."""

    requested: str | None
    model: str | None
    body: bytes | None = None


def rewrite(rules: ModelRules, body: bytes, fallen_back_to: str | None) -> Rewrite:
    """The body an attempt sends: the top-level `model` set to `rules.choose(...)`. A body that
    is not a JSON object with a string `model` goes as it is (Z.AI answers it)."""
    requested = requested_model(body)
    if requested is None:
        return Rewrite(None, None)
    model = rules.choose(requested, fallen_back_to)
    if model == requested:
        return Rewrite(requested, model)
    new_body = with_model(body, requested, model)
    if new_body is None:
        return Rewrite(requested, requested)
    return Rewrite(requested, model, new_body)


async def rewrite_async(rules: ModelRules, body: bytes, fallen_back_to: str | None,
                        inline_limit_bytes: int = 256 * 1024) -> Rewrite:
    """`rewrite`, in the loop's default executor for bodies of the limit or more (the parse holds
    the GIL, but the loop is spared the walk over the document and the freeing of it)."""
    if len(body) < inline_limit_bytes:
        return rewrite(rules, body, fallen_back_to)
    return await asyncio.get_running_loop().run_in_executor(None, rewrite, rules, body,
                                                            fallen_back_to)
