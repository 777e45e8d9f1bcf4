"""The handoff between observer processes and their admission process (EXTPROC_PROCESSES > 1)."""

import asyncio

import pytest

from extproc.api import Endpoint
from extproc.proxy.handoff import (ANSWERED, CLAIM, OUTCOME, Message, Receiver, decode,
                                   decode_batch, encode, encode_batch)
from extproc.proxy.keys import UpstreamKey, WorkerKeys
from extproc.proxy.outcome import Outcome, Tokens
from extproc.proxy.session import Gateway
from test_session import Clock, Estimator, Recorder

OUTCOME_FULL = Outcome(
    endpoint=Endpoint.CHAT_COMPLETIONS, worker="alice", request_id="r-1", status=200, duration=1.25,
    completed=True, requested_model="glm-4.7", model="glm-4.7-x",
    tokens=Tokens(input=10, output=3, cache_read=2, cache_write=1, output_estimated=True),
    time_to_first_token=0.2, error_type=None, error_code=None, malformed_request=None,
    agent_session="conv-9", session="s-1")


@pytest.mark.parametrize("message", [
    Message(CLAIM, "s-1"), Message(ANSWERED, "s-2"), Message(OUTCOME, "s-1", OUTCOME_FULL),
    Message(OUTCOME, "s-3", Outcome(Endpoint.MESSAGES, "bob", "r-2", 499, 0.5, False, session="s-3")),
])
def test_messages_round_trip(message):
    assert decode(encode(message)) == message


def test_a_batch_round_trips():
    messages = [Message(CLAIM, "s-1"), Message(ANSWERED, "s-1"), Message(OUTCOME, "s-1", OUTCOME_FULL)]
    assert decode_batch(encode_batch([encode(m) for m in messages])) == messages
    assert decode_batch(encode_batch([])) == []
    with pytest.raises(ValueError):
        decode_batch(b'{"k":"claim","s":"x"}')


@pytest.mark.parametrize("data", [b"", b"[]", b'{"k":"claim"}', b'{"k":"what","s":"x"}',
                                  b'{"k":"outcome","s":"x"}', b'{"k":"claim","s":"x","o":{"status":1}}'])
def test_what_is_not_a_message_is_refused(data):
    with pytest.raises(ValueError):
        decode(data)


def admission():
    return Gateway(UpstreamKey("sk-key"), WorkerKeys(), Recorder(), Estimator(), Clock())


async def test_observer_claim_first_records_once_and_the_request_filter_does_not():
    gateway = admission()
    receiver = Receiver(gateway)
    receiver.on_message(Message(CLAIM, "s-1"))
    await asyncio.sleep(0)
    assert not await gateway.claims.claim("s-1")  # the request filter after its grace
    assert await gateway.claims.settle("s-1")  # what the request filter asks at its end
    receiver.on_message(Message(OUTCOME, "s-1", OUTCOME_FULL))
    receiver.on_message(Message(OUTCOME, "s-1", OUTCOME_FULL))  # a duplicate changes nothing
    await asyncio.sleep(0.01)
    assert gateway.recorder.outcomes == [OUTCOME_FULL]
    assert not gateway.open


async def test_request_filter_claim_first_drops_the_observers_outcome():
    gateway = admission()
    receiver = Receiver(gateway)
    assert await gateway.claims.claim("s-1")  # the request filter recorded it (no copies came)
    receiver.on_message(Message(CLAIM, "s-1"))
    assert not await receiver.record("s-1", OUTCOME_FULL)
    assert gateway.recorder.outcomes == [] and not gateway.open


async def test_answered_marks_the_admitted_request():
    gateway = admission()
    marked = []
    gateway.admitted["s-1"] = lambda: marked.append("s-1")
    Receiver(gateway).on_message(Message(ANSWERED, "s-1"))
    assert marked == ["s-1"]


async def test_claims_of_a_lost_observer_process_leave_the_open_requests():
    gateway = admission()
    receiver = Receiver(gateway)

    async def stream():
        yield encode_batch([encode(Message(CLAIM, "s-1")), encode(Message(CLAIM, "s-2"))])
        yield encode_batch([encode(Message(OUTCOME, "s-2", OUTCOME_FULL))])

    await receiver.serve_stream(stream(), None)
    await asyncio.sleep(0.01)
    assert not gateway.open
    assert [o.request_id for o in gateway.recorder.outcomes] == ["r-1"]
