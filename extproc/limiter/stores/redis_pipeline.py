"""Redis commands issued during one turn of the event loop, sent as one pipeline.

Under load many requests reach the store in the same turn (one admits, another ends, a third
claims its record). redis-py spends ~70-200 µs of CPU on each command it sends alone (a connection
from the pool, a retry wrapper, its observability hooks, a task switch per reply); sent together
they take one connection, one write and one round trip, and each caller still gets its own reply
or its own error. Commands are not a transaction: each stays atomic on its own (the store's
read-modify-writes are Lua scripts), in the order they were issued.

At most `max_in_flight` pipelines are on their way at once; commands issued meanwhile wait and go
in the next one, so a slow Redis gets bigger pipelines, not more connections. (Sent one by one,
a burst of requests took one pooled connection per command, and past the pool's 100 redis-py
refused with "Too many connections": the replica fell back to local limits.)
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

Command = Callable[[Pipeline], object]  # queues one command on the pipeline it is given


class TurnPipeline:
    def __init__(self, redis: aioredis.Redis, max_in_flight: int = 4) -> None:
        self._redis = redis
        self._max_in_flight = max_in_flight
        self._queued: list[tuple[Command, asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._flush_due = False

    async def call(self, command: Command) -> Any:
        """Queue `command` for the end of this turn; its reply, or its error raised."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((command, future))
        if not self._flush_due and len(self._sending) < self._max_in_flight:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)  # after the callbacks due this turn
        return await future

    def _flush(self) -> None:
        self._flush_due = False
        if not self._queued or len(self._sending) >= self._max_in_flight:
            return  # a pipeline that comes back flushes what waits
        batch, self._queued = self._queued, []
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if self._queued and not self._flush_due:
            self._flush()

    async def _send(self, batch: list[tuple[Command, asyncio.Future[Any]]]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for command, _ in batch:
            command(pipe)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # the connection failed or timed out: every caller's error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else ConnectionError(str(exc)))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), reply in zip(batch, replies):
            if future.done():  # its caller was cancelled (a client that left)
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def close(self) -> None:
        """Wait for what is being sent (a store closing finishes its last turn's commands)."""
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
