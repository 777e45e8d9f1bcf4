"""What a request's session answers Envoy, in plain terms; the gRPC edge (`servicer.py`) turns each
into its protobuf message. Named tuples: immutable values, and one is built for every request
(a frozen dataclass's `__init__` costs ~8x more)."""

from __future__ import annotations

from typing import NamedTuple


class HeaderChanges(NamedTuple):
    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


class ImmediateReply(NamedTuple):
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
    # Envoy's response code details; the `zai_proxy` prefix tells the local-reply mappers in
    # envoy/envoy.yaml to leave this body alone.
    details: str = "zai_proxy"


class BodyChange(NamedTuple):
    """A replaced request body, and the header changes that go with it."""

    body: bytes
    headers: HeaderChanges


class Hold(NamedTuple):
    """Admission will keep the request waiting up to `seconds`: Envoy must be told to wait for the
    answer that long (its message timeout) before the wait begins."""

    seconds: float
