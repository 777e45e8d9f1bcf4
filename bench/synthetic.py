"""One synthetic request through the gateway's servicer, as Envoy's streams would send it, without
gRPC: the fixture (settings, the request's headers and body, the response's events) and the driver
that feeds the request filter's and the observer's streams from memory.

Used by `bench/request_python.py` (the Python per request, in a quiet process) and by
`bench/passthrough.py --shadow` (the same Python beside real gRPC traffic).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import shutil
import tempfile
from typing import Any, AsyncIterator, Awaitable, Callable

from observer_stream import events as sse_events  # bench/: the script's folder

MODEL = "glm-4.7"


class Context:
    """What the servicer reads of grpc.aio's context: the stream's initial metadata."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


class Traffic:
    """What happens between two messages of one stream: other streams' turns (`interleave`) and
    other work through the caches (`cold` bytes written over)."""

    def __init__(self, interleave: bool = False, cold: int = 0) -> None:
        self.interleave = interleave
        self._memory = bytearray(cold)
        self._fill = b"x" * len(range(0, cold, 64))  # a byte per 64-byte cache line

    async def between(self) -> None:
        if self._fill:
            self._memory[::64] = self._fill
        if self.interleave:
            await asyncio.sleep(0)


async def stream(messages: list[Any], hold: asyncio.Event | None = None,
                  traffic: Traffic | None = None) -> AsyncIterator[Any]:
    for message in messages:
        if traffic is not None:
            await traffic.between()
        yield message
    if hold is not None:  # the request filter's stream stays open until the request ends
        await hold.wait()


def fixture() -> tuple[Any, Any, Any, bytes, list[bytes]]:
    """(settings, headers(dict) -> HttpHeaders, the request headers message, the request body,
    the response's events), with the usage log line going to /dev/null."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc.config import Settings
    from extproc.telemetry import logs

    state = tempfile.mkdtemp(prefix="zai-bench-python-")
    atexit.register(shutil.rmtree, state, ignore_errors=True)
    settings = Settings.from_env({
        "ZAI_API_KEY": "bench-upstream-key-0123456789", "LIMITER_STATE_FILE": f"{state}/limiter.json",
        "ENVOY_ROUTES_DIR": f"{state}/routes", "LOG_LEVEL": "INFO",
        # As bench/gateway.py: limits far above the load, so no request waits.
        "RATE_LIMIT_INITIAL": "5000", "RATE_LIMIT_MAX": "5000", "START_RATE_INITIAL": "10000000",
        "START_RATE_MAX": "10000000", "QUEUE_MAX": "10000",
        # --redis: the limiter's state and the records' claims in Redis, as with several replicas.
        **({"REDIS_URL": os.environ["ZAI_BENCH_REDIS_URL"]} if os.environ.get("ZAI_BENCH_REDIS_URL") else {})})
    logs.setup("extproc", "INFO")
    logging.getLogger().handlers[0].setStream(open(os.devnull, "w"))  # type: ignore[attr-defined]

    def headers(values: dict[str, str]) -> Any:
        return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]))

    # The headers Envoy forwards to each stream (extproc/proxy/header_names.py) of what
    # bench/gateway.py sends.
    request_headers = pb.ProcessingRequest(request_headers=headers({
        ":path": "/api/anthropic/v1/messages?beta=true", "authorization": "Bearer bench-worker-token",
        "x-request-id": "0f3c9a52-5d1e-4b7a-9c2e-6a8b1d4e7f90"}))
    body = json.dumps({"model": MODEL, "max_tokens": 1024, "stream": True,
                       "messages": [{"role": "user", "content": "hello " * 40}]}).encode()
    return settings, headers, request_headers, body, sse_events(16)


def request_driver(servicer: Any, headers: Any, request_headers: Any, body: bytes,
                   traffic: Traffic | None = None) -> Callable[[list[bytes]], Awaitable[None]]:
    """What drives `servicer` through one admitted request whose response comes in `chunks`, as
    Envoy's streams do: the request filter's stream (held open until the request ends), then the
    observer's, with the ticket forwarded in every observer message."""
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc.proxy.servicer import OBSERVER_METADATA
    from extproc.proxy.ticket import METADATA_NAMESPACE

    async def one(chunks: list[bytes]) -> None:
        ended, answers = asyncio.Event(), []

        async def request_filter() -> None:
            async for answer in servicer.Process(stream([request_headers], ended, traffic),
                                                 Context(())):
                answers.append(answer)

        task = asyncio.ensure_future(request_filter())
        while not answers:
            await asyncio.sleep(0)
        ticket = answers[0].dynamic_metadata.fields.get(METADATA_NAMESPACE)
        observed = [pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
                    pb.ProcessingRequest(response_headers=headers(
                        {":status": "200", "content-type": "text/event-stream"}))]
        observed += [pb.ProcessingRequest(response_body=pb.HttpBody(
            body=chunk, end_of_stream=i == len(chunks) - 1)) for i, chunk in enumerate(chunks)]
        for message in observed:  # Envoy forwards the ticket with every observer message
            if ticket is not None:
                message.metadata_context.filter_metadata[METADATA_NAMESPACE].CopyFrom(ticket.struct_value)
        async for _ in servicer.Process(stream(observed, None, traffic), Context((OBSERVER_METADATA,))):
            pass
        ended.set()
        await task
    return one
