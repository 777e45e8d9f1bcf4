"""run_detached: work that must finish whatever happens to its caller, without a task per call."""

import asyncio
import logging

import pytest

from extproc.lifecycle import run_detached


async def test_work_that_never_waits_runs_at_once_without_a_task():
    done: list[int] = []

    async def settle() -> None:
        done.append(1)

    keep: set[asyncio.Future[object]] = set()
    assert run_detached(settle(), keep) is None
    assert done == [1] and not keep


async def test_work_that_waits_finishes_in_a_task_even_when_its_caller_is_cancelled():
    steps: list[object] = []
    keep: set[asyncio.Future[object]] = set()
    loop = asyncio.get_running_loop()

    async def settle() -> None:
        steps.append("started")
        await asyncio.sleep(0)  # a bare yield to the loop
        answer = loop.create_future()
        loop.call_later(0.01, answer.set_result, "stored")
        steps.append(await answer)

    async def caller() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            run_detached(settle(), keep)

    task = asyncio.ensure_future(caller())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert steps == ["started"] and len(keep) == 1
    await asyncio.gather(*keep)
    await asyncio.sleep(0)
    assert steps == ["started", "stored"] and not keep


async def test_errors_are_logged_not_raised(caplog):
    async def fails_at_once() -> None:
        raise ValueError("at once")

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise ValueError("later")

    keep: set[asyncio.Future[object]] = set()
    with caplog.at_level(logging.ERROR):
        assert run_detached(fails_at_once(), keep) is None
        task = run_detached(fails_later(), keep)
        assert task is not None
        await task
    assert [r.exc_info[1].args[0] for r in caplog.records] == ["at once", "later"]
