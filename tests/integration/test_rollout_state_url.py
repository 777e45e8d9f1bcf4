"""The dashboard sees a rollout it cannot read from disk (Kubernetes: the state file is on the
controller's own ReadWriteOnce volume): the controller serves the file on its port's `/state`
(`extproc.canary.port`, beside `/metrics`), and the dashboard reads `CANARY_STATE_URL`
(`extproc.dashboard.rollout.fetch`). Both real, on loopback: the state is written by the rollout's
own code, and what the dashboard makes of the URL is exactly what it makes of the file."""

from __future__ import annotations

import asyncio
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import aiohttp
import pytest

from extproc.canary import rollout as ro
from extproc.canary.metrics import CanaryMetrics
from extproc.canary.port import STATE_PATH, serve
from extproc.canary.statefile import StateFile
from extproc.dashboard import rollout as dash_rollout
from extproc.local.processes import ProcessGroup, free_port, python_argv, wait_http_ok

pytestmark = pytest.mark.timeout(60)

PLAN = ro.Plan(steps=(5, 25, 50, 100), interval=300.0, window=300.0, max_inconclusive=6)


@pytest.fixture
def controller_port(tmp_path: Path) -> Iterator[tuple[str, StateFile, CanaryMetrics]]:
    """The controller's port as `zai-proxy canary rollout` serves it, on loopback."""
    states, metrics = StateFile(tmp_path / "canary" / "state.json"), CanaryMetrics()
    port = free_port()
    server = serve(port, "127.0.0.1", metrics.registry, states.path)
    try:
        yield f"http://127.0.0.1:{port}", states, metrics
    finally:
        server.shutdown()
        server.server_close()


def started(now: float) -> ro.State:
    state = ro.start(PLAN, "r-20261207T190000Z-1a2b", 0, now - 60, "alice@build-host", release="v2.5.0")
    decision = ro.decide(state, None, now - 60)
    return ro.apply(ro.with_pending(state, decision, now - 60), decision, None, now - 60)


async def test_the_dashboard_reads_the_controllers_state_as_it_reads_the_file(controller_port):
    base, states, metrics = controller_port
    url = base + STATE_PATH
    # No rollout yet: the controller says 404, the dashboard shows none and no error.
    assert await dash_rollout.fetch(url) == dash_rollout.Reading(None)

    state = started(time.time())
    states.save(state)
    metrics.state(state)
    over_http = await dash_rollout.fetch(url)
    assert over_http == dash_rollout.read(states.path)
    assert over_http.error is None and over_http.rollout is not None
    assert (over_http.rollout["phase"], over_http.rollout["weight"], over_http.rollout["release"]) == (
        "running", 5, "v2.5.0")

    # A file that is no rollout state is judged the same way, whichever way it travelled.
    states.path.write_text('{"schema": 2, "phase": "running"}')
    bad = await dash_rollout.fetch(url)
    assert bad == dash_rollout.read(states.path) and "schema 2" in (bad.error or "")

    # The metrics are still on the same port.
    with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
        assert b"zai_proxy_canary_weight_percent 5.0" in response.read()


async def test_the_state_is_read_only_and_bounded(controller_port):
    base, states, _ = controller_port
    states.save(started(time.time()))
    with urllib.request.urlopen(base + STATE_PATH, timeout=5) as response:
        assert response.headers["Content-Type"] == "application/json"
        assert response.read() == states.path.read_bytes()
    request = urllib.request.Request(base + STATE_PATH, data=b"{}", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 405
    assert states.load() is not None  # untouched
    # Past the dashboard's limit: served cut, and the dashboard says why it shows nothing.
    states.path.write_bytes(b" " * (dash_rollout.MAX_BYTES + 10) + b"{}")
    with urllib.request.urlopen(base + STATE_PATH, timeout=5) as response:
        assert len(response.read()) == dash_rollout.MAX_BYTES + 1
    assert "over" in ((await dash_rollout.fetch(base + STATE_PATH)).error or "")


async def test_an_unreachable_controller_is_no_rollout_with_the_reason():
    port = free_port()  # nothing listens there
    reading = await dash_rollout.fetch(f"http://127.0.0.1:{port}{STATE_PATH}", timeout=2.0)
    assert reading.rollout is None and "cannot be fetched" in (reading.error or "")


async def test_zai_proxy_dashboard_shows_the_rollout_from_the_url(controller_port, tmp_path):
    """`zai-proxy dashboard` with CANARY_STATE_URL (as deploy/dashboard sets it): /api/status
    carries the controller's rollout, follows it, and says why when it cannot show one."""
    base, states, _ = controller_port
    url = base + STATE_PATH
    states.save(started(time.time()))
    port = free_port()
    env = {**os.environ, "DASHBOARD_ADDRESS": "127.0.0.1", "DASHBOARD_PORT": str(port),
           "DASHBOARD_DB": str(tmp_path / "dashboard.sqlite3"), "DASHBOARD_INTERVAL_SECONDS": "1",
           # No ext_proc answers there: the rollout shows all the same.
           "DASHBOARD_TARGETS": f"production=http://127.0.0.1:{free_port()}",
           "CANARY_STATE_URL": url, "CANARY_STATE_FILE": str(tmp_path / "not-this-one.json"),
           "ENVOY_ROUTES_DIR": str(tmp_path / "routes"), "NO_PROXY": "*"}
    group = ProcessGroup()
    try:
        child = await group.start("dashboard", python_argv("extproc", "dashboard"), env)
        await wait_http_ok(f"http://127.0.0.1:{port}/health", 30, child)

        async def status() -> dict[str, Any]:
            async with aiohttp.ClientSession(trust_env=False) as http:
                async with http.get(f"http://127.0.0.1:{port}/api/status") as response:
                    assert response.status == 200
                    return await response.json()

        async def until(check: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                doc = await status()
                if check(doc):
                    return doc
                await asyncio.sleep(0.2)
            raise AssertionError(f"{what}: {doc.get('rollout')} {doc.get('errors')}")

        doc = await until(lambda d: d["rollout"] is not None, "the rollout shows")
        assert (doc["rollout"]["release"], doc["rollout"]["weight"]) == ("v2.5.0", 5)
        states.path.write_text("not json")
        doc = await until(lambda d: d["rollout"] is None, "a bad state shows no rollout")
        assert "not valid JSON" in doc["errors"][url]
        states.path.unlink()
        doc = await until(lambda d: url not in d["errors"], "no state is no rollout, no error")
        assert doc["rollout"] is None
    finally:
        await group.stop_all()
