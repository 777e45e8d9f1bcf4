"""A request as the observer stream sees it: Envoy's copies of its request body, response headers
and response body, sent without waiting (observability mode), perhaps to another replica than the
one that admitted it. What it needs of the request arrives in the forwarded ticket; it claims the
request in the state store and, if the claim is its, records the request when its stream ends.
"""

from __future__ import annotations

from typing import Mapping

from extproc.proxy.request_record import RequestRecord
from extproc.proxy.gateway import Gateway
from extproc.proxy.ticket import Ticket


class Observation:
    __slots__ = ("gateway", "ticket", "record", "owned")

    def __init__(self, gateway: Gateway, ticket: Ticket) -> None:
        self.gateway = gateway
        self.ticket = ticket
        self.record = RequestRecord(gateway, ticket.endpoint, ticket.worker, ticket.request_id,
                                    ticket.started, agent_session=ticket.agent_session,
                                    session=ticket.session)
        self.owned = False

    async def attach(self) -> bool:
        """Claim the request; False if its request filter recorded it already (this stream
        came too late), and then the copies are only drained."""
        self.gateway.open.add(self)
        self.owned = await self.gateway.claims.claim(self.ticket.session)
        if not self.owned:
            self.gateway.open.discard(self)
        return self.owned

    def on_request_chunk(self, chunk: bytes, end_of_stream: bool) -> None:
        self.record.on_request_chunk(chunk, end_of_stream)

    def on_response_headers(self, headers: Mapping[str, str], end_of_stream: bool) -> None:
        self.record.on_response_headers(headers, end_of_stream)
        if 200 <= (self.record.status or 0) < 300:
            self.gateway.upstream_answered(self.ticket.session)

    def on_response_body(self, chunk: bytes, end_of_stream: bool) -> None:
        self.record.on_response_body(chunk, end_of_stream)

    async def end(self) -> None:
        """The stream is over (the response's end, the client gone, or Envoy closed it)."""
        try:
            if self.owned:
                await self.record.record(completed=False)
        finally:
            self.gateway.open.discard(self)
