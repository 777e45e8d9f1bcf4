"""How the gateway's long-lived pieces start and stop: background tasks, child processes, the
stop signal. Shared by every layer, so it depends on nothing of the gateway."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
from typing import Any, Coroutine, Generator

log = logging.getLogger(__name__)


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


class _Resumed:
    """A coroutine already run up to its first suspension, as an awaitable a task can drive on:
    what it awaits is handed to the task, and everything sent or thrown in is passed through."""

    __slots__ = ("_coro", "_yielded")

    def __init__(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self._coro = coro
        self._yielded = yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, yielded = self._coro, self._yielded
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancellation: the coroutine decides what it means
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


def run_detached(coro: Coroutine[Any, Any, Any],
                 keep: set[asyncio.Future[Any]]) -> asyncio.Future[Any] | None:
    """Run `coro` to its end whatever happens to the caller (it is not cancelled with it).

    It runs at once, in the caller's step, and becomes a task only if it has to wait: every
    request ends by settling its slot and its record, which almost never wait, and a task per
    request for them costs more than the work. Returns that task (kept in `keep` until done), or
    None when `coro` finished at once. Its errors are logged, never raised into the caller."""
    try:
        yielded = coro.send(None)
    except StopIteration:
        return None
    except Exception:
        log.exception("detached work failed")
        return None
    task = asyncio.ensure_future(_logged(_Resumed(coro, yielded)))
    keep.add(task)
    task.add_done_callback(keep.discard)
    return task


async def _logged(work: _Resumed) -> None:
    try:
        await work
    except Exception:
        log.exception("detached work failed")
