"""Observer processes -> their admission process (EXTPROC_PROCESSES above 1).

One process of a variant admits requests (key swap, limits, claims, records, metrics); the others
take the observer's copies of bodies (SSE parsing, usage, token estimates) so that a burst of
copies never delays an admission answer. What an observer process learns goes to its admission
process as small messages over one long-lived client-streaming gRPC call on the admission's gRPC
port (`HANDOFF_METHOD`; each gRPC message a JSON array of the messages queued at the time):

- `claim`: the observer stream of a request started here: the admission process claims the
  request in its store now (as an in-process observer would), so its request filter does not;
- `answered`: Z.AI took the request (a 2xx started): the limiter's load;
- `outcome`: the request is over: recorded by the admission process if the claim was its.

The limiter, the claims and the records thus live in the admission process only: the account's
limits hold exactly, and a request is recorded once, with one `/metrics` per variant.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import grpc
import orjson

from extproc.api import Endpoint
from extproc.lifecycle import cancel_and_wait, run_detached
from extproc.proxy.gateway import Claims, Gateway
from extproc.proxy.outcome import Outcome, Tokens
from extproc.proxy.request_record import account_for

log = logging.getLogger(__name__)

HANDOFF_SERVICE = "zai_proxy.Handoff"
HANDOFF_METHOD = f"/{HANDOFF_SERVICE}/Send"
CLAIM, ANSWERED, OUTCOME = "claim", "answered", "outcome"
# Messages waiting to go to the admission process; beyond this they are dropped, logged: a request
# whose claim is dropped is recorded by its request filter (the grace path) or by the outcome's own
# claim; one whose outcome is dropped after its claim went through is not recorded.
QUEUE_LIMIT = 50_000
# Claims of requests whose outcome has not come yet (an observer process that died leaves some).
PENDING_CLAIMS_LIMIT = 100_000
RECONNECT_SECONDS = 0.5
# Messages per gRPC message at most (what is queued when the call can take more goes together).
BATCH_LIMIT = 256


# -- messages (pure) -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Message:
    kind: str
    session: str
    outcome: Outcome | None = None


def encode(message: Message) -> bytes:
    fields: dict[str, Any] = {"k": message.kind, "s": message.session}
    if message.outcome is not None:
        # Field by field: `dataclasses.asdict` deep-copies, at a cost per request.
        outcome = dict(message.outcome.__dict__)
        outcome["endpoint"] = message.outcome.endpoint.value
        if message.outcome.tokens is not None:
            outcome["tokens"] = message.outcome.tokens._asdict()
        fields["o"] = outcome
    return orjson.dumps(fields)


def encode_batch(encoded: list[bytes]) -> bytes:
    """Messages (each from `encode`) as one gRPC message."""
    return b"[" + b",".join(encoded) + b"]"


def decode_batch(data: bytes) -> list[Message]:
    """The messages of one gRPC message; ValueError when it is not a batch of them."""
    try:
        items = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not a handoff batch: {exc}") from None
    if not isinstance(items, list):
        raise ValueError("not a handoff batch: not a list")
    return [_message(item) for item in items]


def decode(data: bytes) -> Message:
    """The message in `data`; ValueError when it is not one."""
    try:
        return _message(orjson.loads(data))
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not a handoff message: {exc}") from None


def _message(fields: Any) -> Message:
    try:
        kind, session = str(fields["k"]), str(fields["s"])
        outcome = None
        if "o" in fields:
            values = dict(fields["o"])
            values["endpoint"] = Endpoint(values["endpoint"])
            if values.get("tokens") is not None:
                values["tokens"] = Tokens(**values["tokens"])
            outcome = Outcome(**values)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a handoff message: {exc}") from None
    if kind not in (CLAIM, ANSWERED, OUTCOME) or (kind == OUTCOME) != (outcome is not None):
        raise ValueError(f"not a handoff message: kind {kind!r}")
    return Message(kind, session, outcome)


# -- the admission side ----------------------------------------------------------------------------

class Receiver:
    """What the admission process does with its observer processes' messages. A claimed request
    stays in `gateway.open` (/health?detail=1) until its outcome is recorded, or until the
    observer process that claimed it is gone."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._claims: OrderedDict[str, asyncio.Future[bool]] = OrderedDict()
        self._tasks: set[asyncio.Future[object]] = set()
        self.received = 0

    def on_message(self, message: Message) -> None:
        self.received += 1
        if message.kind == CLAIM:
            claim = self._claim(message.session)
            self._claims[message.session] = claim
            self.gateway.open.add(claim)
            while len(self._claims) > PENDING_CLAIMS_LIMIT:
                self.gateway.open.discard(self._claims.popitem(last=False)[1])
        elif message.kind == ANSWERED:
            self.gateway.upstream_answered(message.session)
        elif message.outcome is not None:
            run_detached(self.record(message.session, message.outcome), self._tasks)

    def _claim(self, session: str) -> asyncio.Future[bool]:
        """The claim, made now: a done future when the store answers at once (in-process)."""
        result: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        run_detached(self._settle_claim(session, result), self._tasks)
        return result

    async def _settle_claim(self, session: str, result: asyncio.Future[bool]) -> None:
        try:
            result.set_result(await self.gateway.claims.claim(session))
        except Exception as exc:
            result.set_exception(exc)

    async def record(self, session: str, outcome: Outcome) -> bool:
        """Record `outcome` if this request's claim is the observer's; whether it was."""
        pending = self._claims.pop(session, None)
        try:
            won = await pending if pending is not None else await self.gateway.claims.claim(session)
            if not won:
                return False
            await account_for(self.gateway, outcome)
            await self.gateway.recorder.record(outcome)
            return True
        except Exception:
            log.exception("handed-over outcome not recorded", extra={"request_id": outcome.request_id})
            return False
        finally:
            if pending is not None:
                self.gateway.open.discard(pending)

    def forget(self, sessions: set[str]) -> None:
        """The observer process that claimed `sessions` is gone: no outcome will come for them."""
        for session in sessions:
            pending = self._claims.pop(session, None)
            if pending is not None:
                self.gateway.open.discard(pending)
                log.warning("observer process lost before a claimed request's outcome: not "
                            "recorded", extra={"session": session})

    async def serve_stream(self, request_iterator: Any, context: Any) -> bytes:
        claimed: set[str] = set()
        try:
            async for data in request_iterator:
                try:
                    messages = decode_batch(data)
                except ValueError as exc:
                    log.warning("handoff messages dropped", extra={"reason": str(exc)})
                    continue
                for message in messages:
                    if message.kind == CLAIM:
                        claimed.add(message.session)
                    elif message.kind == OUTCOME:
                        claimed.discard(message.session)
                    self.on_message(message)
        finally:
            self.forget(claimed)
        return b""

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(HANDOFF_SERVICE, {
            "Send": grpc.stream_unary_rpc_method_handler(self.serve_stream)})


# -- the observer side -----------------------------------------------------------------------------

class Sender:
    """Messages to the admission process at `target`, over one call, reconnecting on failure."""

    def __init__(self, target: str, limit: int = QUEUE_LIMIT) -> None:
        self.target = target
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(limit)
        self.dropped = 0
        self._task: asyncio.Task[None] | None = None

    def send(self, message: Message) -> None:
        try:
            self.queue.put_nowait(encode(message))
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("handoff queue full: messages dropped", extra={"dropped": self.dropped})

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (up to `timeout`), then stop."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.queue.empty() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            async with grpc.aio.insecure_channel(self.target) as channel:
                call = channel.stream_unary(HANDOFF_METHOD)
                try:
                    await call(self._messages(), wait_for_ready=True)
                except grpc.aio.AioRpcError as exc:
                    log.warning("handoff to the admission process interrupted; reconnecting",
                                extra={"target": self.target, "code": exc.code().name})
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _messages(self) -> Any:
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty() and len(batch) < BATCH_LIMIT:
                batch.append(self.queue.get_nowait())
            yield encode_batch(batch)


class HandoffClaims(Claims):
    """An observer process's claims: made by the admission process (told here), so every stream
    of the observer's is followed, and the admission side drops the outcomes it did not win."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender

    def expect(self, session: str) -> None:
        pass  # an observer process admits nothing

    async def claim(self, session: str) -> bool:
        self.sender.send(Message(CLAIM, session))
        return True

    async def settle(self, session: str) -> bool:
        return False


class HandoffRecorder:
    """An observer process's recorder: the outcome goes to the admission process."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender

    async def record(self, outcome: Outcome) -> dict[str, object]:
        if outcome.session is None:
            log.warning("outcome without a session not handed over",
                        extra={"request_id": outcome.request_id})
            return {}
        self.sender.send(Message(OUTCOME, outcome.session, outcome))
        return {}


@dataclass
class ObserverGateway(Gateway):
    """The gateway of an observer process: no limiter; answers go to the admission process."""

    sender: Sender | None = None

    def upstream_answered(self, session: str) -> None:
        assert self.sender is not None
        self.sender.send(Message(ANSWERED, session))
