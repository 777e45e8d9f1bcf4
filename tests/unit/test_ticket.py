"""The ticket's trip through Envoy's dynamic metadata: what the request filter answers with is what
the observer stream reads back from the forwarded namespace, whatever the values."""

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import given, strategies as st

from extproc.api import Endpoint
from extproc.proxy.answers import HeaderChanges
from extproc.proxy.servicer import ExternalProcessor, admitted_answer, mutation, with_metadata
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


@given(tickets, st.sampled_from(["x-api-key", "authorization"]),
       st.text(alphabet=st.characters(max_codepoint=255), max_size=40))
def test_the_admitted_answer_is_the_key_swap_with_the_ticket(ticket, header, key):
    """The request filter's answer fills the ticket in directly: the same message as the general
    metadata path makes of the key swap, and the observer reads the ticket back from it."""
    changes = HeaderChanges(set=((header, key),), remove=("x-zai-proxy-internal",))
    answer = admitted_answer(changes, ticket)
    general = with_metadata(pb.ProcessingResponse(request_headers=pb.HeadersResponse(
        response=pb.CommonResponse(header_mutation=mutation(changes)))), ticket.to_metadata())
    assert answer == general
    assert [(h.header.key, h.header.raw_value) for h in
            answer.request_headers.response.header_mutation.set_headers] == [(header, key.encode("latin-1"))]
    assert not admitted_answer(changes, None).HasField("dynamic_metadata")
    assert ExternalProcessor._ticket_of(forwarded_struct(answer)) == ticket


def forwarded_struct(answer: pb.ProcessingResponse) -> pb.ProcessingRequest:
    request = pb.ProcessingRequest(response_body=pb.HttpBody(body=b"x"))
    request.metadata_context.filter_metadata[METADATA_NAMESPACE].CopyFrom(
        answer.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value)
    return pb.ProcessingRequest.FromString(request.SerializeToString())


@given(tickets, st.sampled_from(["session", "worker", "endpoint", "request_id", "started"]))
def test_a_ticket_missing_a_field_is_none(ticket, missing):
    fields = ticket.to_metadata()
    del fields[missing]
    assert ExternalProcessor._ticket_of(forwarded(fields)) is None


def test_no_namespace_or_an_unknown_endpoint_is_no_ticket():
    assert ExternalProcessor._ticket_of(pb.ProcessingRequest()) is None
    fields = Ticket("s", "w", Endpoint.MESSAGES, "r", 1.0).to_metadata() | {"endpoint": "nope"}
    assert ExternalProcessor._ticket_of(forwarded(fields)) is None
