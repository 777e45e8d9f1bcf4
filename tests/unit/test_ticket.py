"""The ticket's trip through Envoy's dynamic metadata: what the request filter answers with is what
the observer stream reads back from the forwarded namespace, whatever the values."""

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import given, strategies as st

from extproc.api import Endpoint
from extproc.proxy.servicer import ExternalProcessor, with_metadata
from extproc.proxy.ticket import METADATA_NAMESPACE, Ticket

texts = st.text(max_size=40)
tickets = st.builds(Ticket, texts, texts, st.sampled_from(list(Endpoint)), texts,
                    st.floats(min_value=0, max_value=4e9, allow_nan=False),
                    st.none() | texts)


def forwarded(fields: dict[str, object]) -> pb.ProcessingRequest:
    """An observer message carrying `fields` the way Envoy forwards the request filter's answer."""
    answer = with_metadata(pb.ProcessingResponse(), fields)
    request = pb.ProcessingRequest(response_body=pb.HttpBody(body=b"x"))
    request.metadata_context.filter_metadata[METADATA_NAMESPACE].CopyFrom(
        answer.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value)
    return pb.ProcessingRequest.FromString(request.SerializeToString())


@given(tickets)
def test_the_observer_reads_back_the_ticket_the_request_filter_sent(ticket):
    assert ExternalProcessor._ticket_of(forwarded(ticket.to_metadata())) == ticket


@given(tickets, st.sampled_from(["session", "worker", "endpoint", "request_id", "started"]))
def test_a_ticket_missing_a_field_is_none(ticket, missing):
    fields = ticket.to_metadata()
    del fields[missing]
    assert ExternalProcessor._ticket_of(forwarded(fields)) is None


def test_no_namespace_or_an_unknown_endpoint_is_no_ticket():
    assert ExternalProcessor._ticket_of(pb.ProcessingRequest()) is None
    fields = Ticket("s", "w", Endpoint.MESSAGES, "r", 1.0).to_metadata() | {"endpoint": "nope"}
    assert ExternalProcessor._ticket_of(forwarded(fields)) is None
