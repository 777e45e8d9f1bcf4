"""The local stack's process group: waiting for a child to be ready stops at once when one it
depends on dies, instead of polling until the timeout."""

from __future__ import annotations

import sys
import time

import pytest

from extproc.local.processes import ProcessGroup, child_env, free_port, wait_http_ok


async def test_waiting_for_readiness_fails_fast_when_any_watched_child_dies():
    group = ProcessGroup(sink=lambda name, line: None)
    try:
        alive = await group.start("alive", [sys.executable, "-c", "import time; time.sleep(30)"], child_env())
        dying = await group.start("dying", [sys.executable, "-c", "raise SystemExit(3)"], child_env())
        started = time.monotonic()
        # Nothing listens on this port: only the death of a watched child ends the wait early.
        with pytest.raises(RuntimeError, match="dying exited with code 3"):
            await wait_http_ok(f"http://127.0.0.1:{free_port()}/health", 20, alive, dying)
        assert time.monotonic() - started < 10
    finally:
        await group.stop_all(timeout=2)


def test_free_ports_taken_one_after_another_are_distinct():
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
