"""Benchmark: the ext_proc's Python per request, without gRPC or Envoy.

    .venv/bin/python bench/request_python.py                        # this checkout
    .venv/bin/python bench/request_python.py --before /tmp/before   # and another checkout, side by side
    .venv/bin/python bench/request_python.py --phases [--before DIR] # where one request's Python goes
    .venv/bin/python bench/request_python.py --in-flight 1000        # with 1,000 other requests admitted
    .venv/bin/python bench/request_python.py --concurrent 64 --cold 8000000   # as under load
    .venv/bin/python bench/request_python.py --redis --concurrent 64 [--before DIR]  # state in Redis

Drives the servicer's `Process` the way Envoy's streams do for one admitted request: the request
filter's stream (request headers, answered with the key swap and the ticket; held open until the
request ends), then the observer's stream (the request body, the response headers, the response
body) carrying the forwarded ticket, then the request filter's stream ends. The service is the
production one (`Service`, the in-process limiter store, metrics, the usage log line written to
/dev/null). The minimal pass-through (`bench/passthrough.py`) runs the same messages for the
baseline; the difference is the gateway's own Python. Two shapes: the response in one chunk (as
`sat_short` in bench/gateway.py hands it over) and one event per chunk (as `ttft64`). Prints CPU µs
per request, best of --repeat rounds of --number requests, each checkout in a process of its own.

Under load the process handles other requests' messages between two of one request's, and its
caches hold little of that request's code and data by then. `--concurrent N` runs N requests at
once, their messages interleaved one by one; `--cold BYTES` writes over that many bytes of memory
before every message, as the traffic of other requests and processes does (8 MB: past the CPU's
L2 and much of its L3). Both cost the pass-through too; the difference stays the gateway's.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator

from observer_stream import child, print_table  # bench/: the script's folder
from synthetic import Context, Traffic, fixture, request_driver, stream

ROOT = Path(__file__).resolve().parent.parent


async def _drain(answers: AsyncIterator[Any]) -> None:
    async for _ in answers:
        pass


def measure(kind: str, number: int, repeat: int, only: str | None = None,
            in_flight: int = 0, concurrent: int = 1, cold: int = 0) -> dict[str, float]:
    """CPU µs per request for each response shape, with the `extproc` first on sys.path."""
    from extproc.limiter.stores.failover import FailoverStore
    from extproc.proxy.servicer import ExternalProcessor
    from extproc.server import Service

    settings, headers, request_headers, body, events = fixture()
    shapes = {"response in 1 chunk": [b"".join(events)], "1 event per chunk": events}
    if only is not None:  # one shape (for a profiler's view of it)
        shapes = {name: chunks for name, chunks in shapes.items() if name == only}

    traffic = Traffic(concurrent > 1, cold) if concurrent > 1 or cold else None

    async def run() -> dict[str, float]:
        service = Service(settings)
        await service.limiter.start()
        switches: list[bool] = []  # with REDIS_URL: each time the store left Redis or came back
        if isinstance(service.limiter.store, FailoverStore):
            service.limiter.store._on_change = switches.append
        if kind == "passthrough":
            from passthrough import PassThrough  # bench/, beside this script
            servicer: Any = PassThrough()
        else:
            servicer = ExternalProcessor(service.gateway, service.on_stream)

        one = request_driver(servicer, headers, request_headers, body, traffic)

        # Requests admitted and not over while the measured ones pass (as at 1,000 open streams):
        # what costs more per request the more there are in flight shows here.
        held = asyncio.Event()
        others = [asyncio.ensure_future(_drain(servicer.Process(stream([request_headers], held), Context(()))))
                  for _ in range(in_flight)]
        await asyncio.sleep(0)
        result = {}
        waves = max(1, number // concurrent)
        for name, chunks in shapes.items():
            for _ in range(max(1, min(500, number) // concurrent)):  # warm: label children, the key swap
                await asyncio.gather(*(one(chunks) for _ in range(concurrent)))
            best = float("inf")
            for _ in range(repeat):
                start = time.process_time()
                for _ in range(waves):
                    await asyncio.gather(*(one(chunks) for _ in range(concurrent)))
                best = min(best, (time.process_time() - start) / (waves * concurrent) * 1e6)
            result[name] = best
        held.set()
        await asyncio.gather(*others)
        await service.limiter.stop()
        if switches:  # figures of local limits are not Redis's: none rather than wrong ones
            print("the limiter's store left Redis for local limits during the run", file=sys.stderr)
            return {name: math.nan for name in result}
        return result

    import uvloop  # the production ext_proc's loop
    return uvloop.run(run())


PHASES = ("request headers: key swap, admission, answer", "observer: ticket, claim",
          "observer: request body copy", "observer: response headers", "observer: response body",
          "observer: the record", "request filter: the end (slot, settle)")


def measure_phases(number: int, repeat: int) -> dict[str, float]:
    """CPU µs per request of each phase of one admitted request (the response in one chunk),
    calling the session and the observation the way the servicer does, without gRPC."""
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc.proxy.observation import Observation
    from extproc.proxy.servicer import ExternalProcessor, header_map
    from extproc.proxy.session import RequestSession
    from extproc.proxy.ticket import METADATA_NAMESPACE
    from extproc.server import Service

    settings, headers, request_headers, body, events = fixture()
    response_headers = headers({":status": "200", "content-type": "text/event-stream"})
    chunk, clock = b"".join(events), time.process_time

    async def one(gateway: Any, spent: list[float]) -> None:
        start = clock()
        session, answers = RequestSession(gateway, inline=False), []
        if inspect.isasyncgenfunction(RequestSession.request_headers):  # before 2026-12-07
            async for answer in session.request_headers(header_map(request_headers.request_headers)):
                answers.append(ExternalProcessor._headers_answer(session, answer))
        else:
            answer = await session.request_headers(header_map(request_headers.request_headers))
            answers.append(ExternalProcessor._headers_answer(session, answer))
        marks = [start, clock()]
        # Envoy's copy of the body, with the ticket forwarded: not the gateway's work.
        copy = pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))
        copy.metadata_context.filter_metadata[METADATA_NAMESPACE].CopyFrom(
            answers[0].dynamic_metadata.fields[METADATA_NAMESPACE].struct_value)
        marks.append(clock())
        observation = Observation(gateway, ExternalProcessor._ticket_of(copy))
        await observation.attach()
        marks.append(clock())
        observation.on_request_chunk(copy.request_body.body, True)
        marks.append(clock())
        observation.on_response_headers(header_map(response_headers), False)
        marks.append(clock())
        observation.on_response_body(chunk, True)
        marks.append(clock())
        await observation.end()
        marks.append(clock())
        await session.complete(completed=False)
        marks.append(clock())
        spent[0] += marks[1] - marks[0]
        for i in range(1, len(PHASES)):  # marks[1] to marks[2] built the copy
            spent[i] += marks[i + 2] - marks[i + 1]

    async def run() -> dict[str, float]:
        service = Service(settings)
        await service.limiter.start()
        best = [float("inf")] * len(PHASES)
        for _ in range(min(500, number)):
            await one(service.gateway, [0.0] * len(PHASES))
        for _ in range(repeat):
            spent = [0.0] * len(PHASES)
            for _ in range(number):
                await one(service.gateway, spent)
            best = [min(b, s / number * 1e6) for b, s in zip(best, spent)]
        await service.limiter.stop()
        return dict(zip(PHASES, best)) | {"all of them": sum(best)}

    import uvloop
    return uvloop.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", metavar="DIR", help="another checkout, timed side by side")
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=0, metavar="N",
                        help="N other requests admitted and open while measuring")
    parser.add_argument("--concurrent", type=int, default=1, metavar="N",
                        help="N requests at once, their messages interleaved one by one")
    parser.add_argument("--cold", type=int, default=0, metavar="BYTES",
                        help="write over BYTES of memory before every message (caches gone cold)")
    parser.add_argument("--phases", action="store_true",
                        help="the gateway's Python per phase of one request (its parts, not its sum)")
    parser.add_argument("--redis", action="store_true",
                        help="start a redis-server and keep the limiter's state and the claims there "
                             "(REDIS_URL), as with several replicas")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, path = args.child
        sys.path.insert(0, path)
        print(json.dumps(measure_phases(args.number, args.repeat) if kind == "phases" else
                         measure(kind, args.number, args.repeat, in_flight=args.in_flight,
                                 concurrent=args.concurrent, cold=args.cold)))
        return
    redis = None
    if args.redis:
        sys.path.insert(0, str(ROOT))
        from extproc.local.redis_server import start_redis
        redis = start_redis(Path(tempfile.mkdtemp(prefix="zai-bench-redis-")))
        os.environ["ZAI_BENCH_REDIS_URL"] = redis.url  # the children's
    try:
        run_children(args)
    finally:
        if redis is not None:
            redis.stop()


def run_children(args: argparse.Namespace) -> None:
    if args.phases:
        sides = {"gateway": ROOT} | ({"gateway, before": Path(args.before).resolve()} if args.before else {})
        print_table("phase", "CPU µs per request", {
            label: child([__file__, "--child", "phases", str(path)], args.number, args.repeat)
            for label, path in sides.items()})
        return
    runs = {"pass-through": ("passthrough", ROOT), "gateway": ("gateway", ROOT)}
    if args.before:
        runs["gateway, before"] = ("gateway", Path(args.before).resolve())
    results = {label: child([__file__, "--child", kind, str(path), "--in-flight", str(args.in_flight),
                             "--concurrent", str(args.concurrent), "--cold", str(args.cold)],
                            args.number, args.repeat)
               for label, (kind, path) in runs.items()}
    print_table("response", "CPU µs per request", results)

if __name__ == "__main__":
    main()
