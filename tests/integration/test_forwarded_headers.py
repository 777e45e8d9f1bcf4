"""Envoy 1.40 sends each ext_proc stream only the headers the ext_proc reads (`forward_rules`,
extproc/proxy/header_names.py), whatever else a client or Z.AI sends.

A spy ext_proc stands in on the production bootstrap's ext_proc port: it records the header names
each kind of stream receives and answers every phase with no change (so no key swap: the request
carries the emulator's key itself, or a wrong one to make an attempt fail)."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import grpc
import httpx2 as httpx
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.config import Settings
from extproc.local.processes import ProcessGroup, free_port, wait_http_ok
from extproc.local.stack import envoy_argv, start_emulator
from extproc.proxy import header_names
from extproc.routing.envoy_config import write

# What a coding agent sends besides what the gateway reads (SDK telemetry, betas, agent).
CLIENT_EXTRAS = {"user-agent": "claude-cli/2.0 (external, cli)", "x-stainless-lang": "js",
                 "x-stainless-os": "Linux", "anthropic-beta": "interleaved-thinking-2025-05-14",
                 "x-app": "cli"}


def empty_answer(phase: str) -> pb.ProcessingResponse:
    """The answer to `phase` that changes nothing (the response field of the same name, empty)."""
    answer = pb.ProcessingResponse()
    getattr(answer, phase).SetInParent()
    return answer


class Spy(pb_grpc.ExternalProcessorServicer):
    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], set[str]] = defaultdict(set)  # (stream kind, phase) -> names

    async def Process(self, requests, context):
        kind = dict(context.invocation_metadata() or ()).get("x-zai-proxy-phase", "request")
        async for request in requests:
            phase = request.WhichOneof("request")
            if phase in ("request_headers", "response_headers"):
                headers = getattr(request, phase).headers.headers
                self.seen[(kind, phase)].update(h.key for h in headers)
            if kind != "observer":  # the observer's copies are not answered
                yield empty_answer(phase)


async def _scenario(tmp_path) -> dict[tuple[str, str], set[str]]:
    group = ProcessGroup(lambda name, line: None)
    spy = Spy()
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(spy, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        emulator = await start_emulator(group, {})
        grpc_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        settings = Settings.from_env({
            "ZAI_API_KEY": emulator.key, "ZAI_TARGET_URL": f"{emulator.url}/api/anthropic",
            "ZAI_OPENAI_URL": f"{emulator.url}/api/coding/paas/v4", "EXTPROC_GRPC_PORT": str(grpc_port),
            "LISTEN_PORT": str(free_port()), "ENVOY_ADMIN_PORT": str(free_port()),
            "PRODUCTION_LISTEN_PORT": str(free_port()), "CANARY_LISTEN_PORT": str(free_port()),
            "CANARY_EXTPROC_GRPC_PORT": str(free_port()), "ENVOY_ROUTES_DIR": str(tmp_path / "routes"),
            "MAX_RETRIES": "0"})
        envoy = await group.start("envoy", envoy_argv(write(settings, tmp_path / "envoy.yaml")), {})
        await wait_http_ok(f"http://127.0.0.1:{settings.envoy_admin_port}/ready", 30, envoy)
        url = f"http://127.0.0.1:{settings.listen_port}/api/anthropic/v1/messages"
        body = {"model": "glm-4.7", "max_tokens": 16, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient(timeout=20) as client:
            for key, status in ((emulator.key, 200), ("not-the-key", 401)):  # the 401 is an attempt
                for _ in range(40):  # until Envoy's health check has found the spy
                    response = await client.post(url, json=body, headers={
                        "x-api-key": key, "x-claude-code-session-id": "s-1",
                        "x-zai-proxy-worker": "root", **CLIENT_EXTRAS})
                    if response.status_code != 503:
                        break
                    await asyncio.sleep(0.25)
                assert response.status_code == status, response.text
        await asyncio.sleep(0.5)  # the observer's last copies
        return dict(spy.seen)
    finally:
        await group.stop_all(timeout=5)
        await server.stop(None)


def test_each_stream_gets_only_the_headers_it_reads(tmp_path):
    seen = asyncio.run(asyncio.wait_for(_scenario(tmp_path), 90))

    allowed = set(header_names.REQUEST_FILTER)
    request = seen[("request", "request_headers")]
    assert {":path", "x-api-key", "x-request-id", "x-claude-code-session-id",
            "x-zai-proxy-worker"} <= request  # what the key swap, the record and the removal read
    assert request <= allowed | {"x-zai-proxy-worker"}
    assert not request & (set(CLIENT_EXTRAS) | {":method", ":authority", "content-length"})

    observed = seen[("observer", "response_headers")]
    assert ":status" in observed and observed <= set(header_names.OBSERVER)
    attempt = seen[("attempt", "response_headers")]  # the refused attempt
    assert ":status" in attempt and attempt <= set(header_names.ATTEMPT)
    assert not ("request", "response_headers") in seen  # observe mode: the observer has them
