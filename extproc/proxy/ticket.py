"""What travels with a request from the process that admitted it to whichever process gets the
copies of its bodies (Envoy's observer stream may land on another replica of the variant).

The request filter puts it into Envoy's dynamic metadata with its headers answer; Envoy forwards
that namespace to the observer stream (`metadata_options.forwarding_namespaces`), and the same
fields show in the access log. Nothing in it is secret: the worker is a name or a hash.
"""

from __future__ import annotations

from typing import NamedTuple

from extproc.api import Endpoint
from extproc.ids import unique_id

# Envoy's dynamic-metadata namespace of the gateway (also read by the access log).
METADATA_NAMESPACE = "zai_proxy"


def new_session_id() -> str:
    """Globally unique: replicas and restarts never reuse one."""
    return unique_id()


class Ticket(NamedTuple):
    """Immutable; a named tuple, as two are built for every request (a frozen dataclass's
    `__init__` costs ~8x more)."""

    session: str
    worker: str
    endpoint: Endpoint
    request_id: str
    started: float  # wall-clock epoch seconds, comparable across replicas
    agent_session: str | None = None  # the client's session header; the observer cannot see it

    def to_metadata(self) -> dict[str, object]:
        fields: dict[str, object] = {
            "session": self.session, "worker": self.worker, "endpoint": self.endpoint.value,
            "request_id": self.request_id, "started": self.started}
        if self.agent_session is not None:
            fields["agent_session"] = self.agent_session
        return fields

    @classmethod
    def of(cls, session: str, worker: str, endpoint: str, request_id: str, started: float,
           agent_session: str | None) -> "Ticket | None":
        """The ticket of these metadata values, or None when the endpoint is not one of ours."""
        known = _ENDPOINTS.get(endpoint)
        return None if known is None else cls(session, worker, known, request_id, started, agent_session)


_ENDPOINTS = {endpoint.value: endpoint for endpoint in Endpoint}
