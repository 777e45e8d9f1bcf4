"""How the gateway's long-lived pieces start and stop: background tasks, child processes, the
stop signal. Shared by every layer, so it depends on nothing of the gateway."""

from __future__ import annotations

import asyncio
import ctypes
import signal


async def cancel_and_wait(task: asyncio.Task[object] | None) -> None:
    """Cancel a background task and wait until it has stopped (None: nothing to stop)."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux (a `preexec_fn`): the kernel sends `sig` to the child if its parent dies without
    cleaning up."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, sig)  # PR_SET_PDEATHSIG
    except OSError:
        pass


async def wait_for_stop_signal(stop: asyncio.Event | None = None) -> None:
    """Until SIGTERM or SIGINT (or `stop` is set)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    await stop.wait()
