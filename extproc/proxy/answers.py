"""What a request's session answers Envoy, in plain terms; the gRPC edge (`servicer.py`) turns each
into its protobuf message."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeaderChanges:
    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImmediateReply:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
    # Envoy's response code details; the `zai_proxy` prefix tells the local-reply mappers in
    # envoy/envoy.yaml to leave this body alone.
    details: str = "zai_proxy"


@dataclass(frozen=True)
class BodyChange:
    """A replaced request body, and the header changes that go with it."""

    body: bytes
    headers: HeaderChanges


@dataclass(frozen=True)
class Hold:
    """Admission will keep the request waiting up to `seconds`: Envoy must be told to wait for the
    answer that long (its message timeout) before the wait begins."""

    seconds: float
