"""The local stack's process group: waiting for a child to be ready stops at once when one it
depends on dies, instead of polling until the timeout."""

from __future__ import annotations

import random
import socket
import sys
import time

import pytest

from extproc.local.processes import _POOL_SIZE, ProcessGroup, _ephemeral_floor, child_env, free_port, wait_http_ok


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


def test_free_ports_lie_below_the_range_the_kernel_hands_to_outgoing_connections():
    # An outgoing connection on the host can't take such a port before the child binds it.
    floor = _ephemeral_floor()
    assert all(1024 <= free_port() < floor for _ in range(100))


def test_a_free_port_skips_one_that_is_taken():
    # The seeded first draw may be busy already (a child of an earlier test, a TIME_WAIT socket):
    # take the first seed whose first draw this test can hold itself.
    bottom, top = max(1024, _ephemeral_floor() - _POOL_SIZE), _ephemeral_floor()
    for seed in range(100):
        first = random.Random(seed).randrange(bottom, top)
        taken = socket.socket()
        try:
            taken.bind(("127.0.0.1", first))
            break
        except OSError:
            taken.close()
    else:
        pytest.fail("no seed's first port could be bound")
    with taken:
        taken.listen()
        port = free_port(random.Random(seed))
    assert port != first
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


async def test_a_child_that_dies_while_awaited_is_reported_with_its_last_lines():
    group = ProcessGroup(sink=lambda name, line: None)
    try:
        dying = await group.start("dying", [sys.executable, "-c",
                                            "import sys; print('address already in use', file=sys.stderr); "
                                            "raise SystemExit(1)"], child_env())
        with pytest.raises(RuntimeError, match="dying exited with code 1\n  address already in use"):
            await wait_http_ok(f"http://127.0.0.1:{free_port()}/health", 20, dying)
    finally:
        await group.stop_all(timeout=2)
