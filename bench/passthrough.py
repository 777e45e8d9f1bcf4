"""A minimal pass-through ext_proc: the cost of the approach, without the gateway's logic.

It serves Envoy's `ExternalProcessor` on the port the production ext_proc uses and answers every
phase the production configuration sends (request headers; on inline routes the buffered request
body, response headers and streamed response chunks; the per-attempt observer's response headers)
with an empty response of the matching kind: no header mutation, no body change, no metadata. The
observer's copies of bodies (observability mode) are read and not answered, as Envoy expects. It also serves the gRPC health service, so Envoy's
health check on the `extproc_*` clusters passes exactly as with the real ext_proc. Same runtime
as the real one: grpc.aio on uvloop, same message size limits.

    .venv/bin/python bench/passthrough.py --port 50051 [--observer-port 50053] [--shadow]

Used by `bench/gateway.py` (set-up "passthrough"); it prints one JSON line with the port when ready.

`--shadow` (set-up "passthrough_shadow", a diagnosis): at the end of each request's observer
stream it also runs the gateway's own Python for one synthetic request, in this process's loop
(`bench/synthetic.py`'s driver: the real servicer, limiter, record and metrics, fed by
in-memory streams, no gRPC). The CPU it adds to the pass-through is what the gateway's Python costs
live, beside real gRPC traffic, without anything else of the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

OBSERVER_METADATA = ("x-zai-proxy-phase", "observer")

# One prebuilt answer per phase; `request` oneof name -> the response carrying the same name.
_ANSWERS = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


class Shadow:
    """The gateway's Python for one synthetic request per real one (`--shadow`)."""

    def __init__(self) -> None:
        from synthetic import fixture, request_driver  # bench/, beside this script
        from extproc.proxy.servicer import ExternalProcessor
        from extproc.server import Service

        settings, headers, request_headers, body, events = fixture()
        self.service = Service(settings)
        self._drive = request_driver(ExternalProcessor(self.service.gateway, self.service.on_stream),
                                     headers, request_headers, body)
        self._chunks = [b"".join(events)]  # as sat_short's responses arrive: in one chunk
        self._running: set[asyncio.Future[None]] = set()

    def one(self) -> None:
        task = asyncio.ensure_future(self._drive(self._chunks))
        self._running.add(task)
        task.add_done_callback(self._running.discard)


class PassThrough(pb_grpc.ExternalProcessorServicer):
    def __init__(self, shadow: Shadow | None = None) -> None:
        self.shadow = shadow

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProcessingResponse]:
        answers = _ANSWERS
        if OBSERVER_METADATA in (context.invocation_metadata() or ()):
            # The observer filter (observability mode): Envoy expects no answer.
            # Ends its side at the response's end, as the gateway does (see its servicer).
            async for request in request_iterator:
                phase = request.WhichOneof("request")
                if phase == "response_body" and request.response_body.end_of_stream:
                    if self.shadow is not None:
                        self.shadow.one()
                    return
                if phase == "response_headers" and request.response_headers.end_of_stream:
                    return
            return
        async for request in request_iterator:
            yield answers[request.WhichOneof("request")]


async def serve(host: str, port: int, max_message: int, observer_port: int | None = None,
                shadow: bool = False) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message),
                                      ("grpc.max_send_message_length", max_message)])
    the_shadow = Shadow() if shadow else None
    if the_shadow is not None:
        await the_shadow.service.limiter.start()
    pb_grpc.add_ExternalProcessorServicer_to_server(PassThrough(the_shadow), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if observer_port:  # where the observer's copies go when EXTPROC_OBSERVER_PORT is set
        server.add_insecure_port(f"{host}:{observer_port}")
    await server.start()
    for name in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(json.dumps({"port": bound}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1)
    if the_shadow is not None:
        await the_shadow.service.limiter.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--max-message-bytes", type=int, default=33554432 + 65536)
    parser.add_argument("--observer-port", type=int, default=None,
                        help="also serve the observer's copies here (EXTPROC_OBSERVER_PORT)")
    parser.add_argument("--shadow", action="store_true",
                        help="diagnosis: also run the gateway's Python for a synthetic request per request")
    args = parser.parse_args()
    if args.shadow:  # this checkout's gateway (the driver, beside this script, is on the path)
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if os.environ.get("ZAI_BENCH_LOOP") == "asyncio":  # diagnosis: the stock event loop
        asyncio.run(serve(args.host, args.port, args.max_message_bytes, args.observer_port, args.shadow))
        return 0
    import uvloop  # the production ext_proc runs on uvloop too
    uvloop.run(serve(args.host, args.port, args.max_message_bytes, args.observer_port, args.shadow))
    return 0


if __name__ == "__main__":
    sys.exit(main())
