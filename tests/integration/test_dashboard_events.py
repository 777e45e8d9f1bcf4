"""Live updates (`GET /api/events`) to many viewers at once, one of whom never reads: the others
get every update on time, the one that never reads is dropped, and the dashboard's memory stays
bounded (RSS from /proc)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import httpx2 as httpx
import pytest

from harness import StackHandle, stack_env

INTERVAL = 1
VIEWERS = 50
WATCH_SECONDS = 25

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("events")
    env = stack_env(MAX_RETRIES="0", DASHBOARD_INTERVAL_SECONDS=str(INTERVAL),
                    DASHBOARD_DB=str(run_dir / "dash.db"))
    handle = StackHandle(run_dir, env, dashboard=True).start()
    yield handle
    handle.stop()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def detail(stack: StackHandle) -> dict:
    return httpx.get(f"{stack.dashboard_url}/health?detail=1", trust_env=False, timeout=10).json()


async def viewer(url: str, until: float, got: list[tuple[str, int, float]]) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/api/events", timeout=aiohttp.ClientTimeout(total=None)) as resp:
            assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
            event = None
            while time.time() < until:
                try:
                    line = await asyncio.wait_for(resp.content.readline(), until - time.time())
                except asyncio.TimeoutError:
                    break
                line = line.rstrip(b"\n")
                if line.startswith(b"event: "):
                    event = line[7:].decode()
                elif line.startswith(b"data: "):
                    got.append((event or "", json.loads(line[6:])["time"], time.time()))
                elif line.startswith(b":"):
                    got.append(("heartbeat", 0, time.time()))


def never_reads(url: str) -> socket.socket:
    """A viewer that connects, asks for the stream and then never reads a byte."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(f"GET /api/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return sock


async def test_many_viewers_get_every_update_and_one_that_never_reads_is_dropped(stack):
    # A hundred workers: a status document of some size, so a viewer that never reads fills
    # its socket quickly.
    def ask(i: int) -> int:
        return httpx.post(f"{stack.url}/v1/messages", trust_env=False, timeout=30,
                          headers={"x-api-key": f"worker-key-{i:03d}"},
                          json={"model": "glm-4.7", "max_tokens": 8,
                                "messages": [{"role": "user", "content": "hi"}]}).status_code
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(ask, range(100))) == {200}
    stack.settle()
    await asyncio.sleep(2 * INTERVAL)
    doc = httpx.get(f"{stack.dashboard_url}/api/status", trust_env=False, timeout=10)
    assert len(doc.json()["workers"]) >= 100
    size = len(doc.content)

    pid = next(c.pid for c in stack.stack.group.children if c.name == "dashboard")
    stuck = never_reads(stack.dashboard_url)
    until = time.time() + WATCH_SECONDS
    logs: list[list[tuple[str, int, float]]] = [[] for _ in range(VIEWERS)]
    tasks = [asyncio.create_task(viewer(stack.dashboard_url, until, log)) for log in logs]
    rss = []
    try:
        state: dict = {}
        while time.time() < until:
            rss.append(rss_mb(pid))
            if time.time() > until - 4 and not state:
                state = await asyncio.to_thread(detail, stack)  # while all of them still watch
            await asyncio.sleep(1)
        await asyncio.gather(*tasks)
    finally:
        stuck.close()
    # Every viewer: the snapshot first, then the same updates, one per collection, each on time.
    # Compared over the collections every viewer was there for: after the last one connected
    # (its snapshot) and a margin before they all stopped reading (an update at the very end
    # reaches some before `until` and others after).
    assert all(log[0][0] == "snapshot" for log in logs)
    all_connected = max(log[0][2] for log in logs)
    updates = [[t for event, t, _ in log if event == "update" and all_connected < t <= until - 2]
               for log in logs]
    expected = max(updates, key=len)
    assert len(expected) >= WATCH_SECONDS / INTERVAL - 6, expected
    assert all(u == expected for u in updates), "a viewer missed updates"
    assert expected == sorted(set(expected))
    late = max(received - t for log in logs for event, t, received in log if event == "update")
    assert late < 1.0, f"an update reached a viewer {late:.2f} s after its collection"
    # The viewer that never read was dropped; the others were not.
    assert state["dropped_viewers"] >= 1, (state, size)
    assert state["viewers"] == VIEWERS
    # Memory: bounded while 51 viewers watched (no growth beyond noise).
    steady = rss[len(rss) // 3:]
    assert max(steady) - min(steady) < 15, rss
    assert max(rss) < 200, rss
    deadline = time.monotonic() + 10
    while detail(stack)["viewers"]:
        assert time.monotonic() < deadline, "viewers that left are still counted"
        await asyncio.sleep(0.2)
