"""The collection loop: every interval (on the clock's multiples of it), collect from the source,
record the interval in the history, compute the status document and publish it to the viewers.
A collection that fails or takes too long is skipped (logged once per change), never retried in a
burst; the next starts on the next multiple of the interval."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from extproc.dashboard import panels
from extproc.dashboard.events import Hub, frame
from extproc.dashboard.history import DbThread, History, ReplicaState
from extproc.dashboard.rollout import Reading
from extproc.dashboard.sources import Collection

log = logging.getLogger(__name__)
FORGET_REPLICAS_AFTER = 3600.0


class Source(Protocol):
    kind: str

    @property
    def variants(self) -> list[str]: ...

    async def collect(self, now: float) -> Collection: ...

    def restore(self, states: dict[str, ReplicaState]) -> None: ...

    async def close(self) -> None: ...


async def _no_rollout() -> Reading:
    return Reading(None)


class Collector:
    def __init__(self, source: Source, history: History, db: DbThread, hub: Hub, interval: int,
                 weights: Callable[[], dict[str, float] | None] = lambda: None,
                 clock: Callable[[], float] = time.time,
                 rollout: Callable[[], Awaitable[Reading]] = _no_rollout,
                 rollout_name: str = "rollout state file") -> None:
        self.source = source
        self.history = history
        self.db = db
        self.hub = hub
        self.interval = interval
        self.weights = weights
        self.clock = clock
        self.rollout = rollout
        self.rollout_name = rollout_name  # its key in the status document's `errors`
        self.live = panels.Live(source.kind, list(source.variants))
        self.doc: dict[str, Any] | None = None  # the latest status document
        self.collections = 0
        self.updated = asyncio.Event()
        self._error: str | None = None
        self._rollout_error: str | None = None

    async def start(self) -> None:
        now = self.clock()
        states = await self.db.run(self.history.baselines, now)
        self.source.restore(states)
        deltas = getattr(self.source, "deltas", None)
        if deltas is not None:
            # ext_procs started just before the dashboard (as `zai-proxy up` starts them): what
            # they counted meanwhile is new.
            deltas.watching_since = now - max(60.0, 3.0 * self.interval)
        await self._read_rollout()
        self.doc = await self.db.run(self._status, self.clock())

    async def run(self) -> None:
        while True:
            now = self.clock()
            due = (int(now // self.interval) + 1) * self.interval
            await asyncio.sleep(max(0.0, due - now))
            try:
                await asyncio.wait_for(self.collect_once(due), timeout=self.interval * 3)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep collecting
                self._report(f"collection failed: {type(exc).__name__}: {exc}")

    def _report(self, error: str | None) -> None:
        if error != self._error:
            if error:
                log.warning(error)
            else:
                log.info("collecting again")
            self._error = error

    async def collect_once(self, t: int) -> dict[str, Any]:
        collection = await self.source.collect(t)
        self._report("; ".join(f"{k}: {v}" for k, v in sorted(collection.errors.items())) or None)
        await self.db.run(self.history.record, t, collection.ticks, collection.baselines)
        if self.collections % 60 == 0 and hasattr(self.source, "deltas"):
            gone = self.source.deltas.forget_older_than(t - FORGET_REPLICAS_AFTER)
            if gone:
                await self.db.run(self.history.forget_replicas, gone)
        self.collections += 1
        self.live.variants = list(self.source.variants)
        # A variant that gave nothing this time keeps its last gauges out: they are not "now".
        self.live.gauges = collection.gauges
        self.live.errors = dict(collection.errors)
        self.live.weights = self.weights()
        await self._read_rollout()
        doc = await self.db.run(self._status, float(t))
        self.doc = doc
        self.hub.publish(frame("update", doc))
        self.updated.set()
        self.updated = asyncio.Event()
        return doc

    async def _read_rollout(self) -> None:
        """The canary rollout's state, read afresh (a bad one is no rollout, said once)."""
        try:
            reading = await self.rollout()
        except Exception as exc:  # noqa: BLE001 - the rollout never stops the collection
            reading = Reading(None, f"cannot be read ({type(exc).__name__}: {exc})")
        self.live.rollout = reading.rollout
        if reading.error:
            self.live.errors[self.rollout_name] = reading.error
        if reading.error != self._rollout_error:
            if reading.error:
                log.warning(f"{self.rollout_name} {reading.error}: showing no rollout")
            elif self._rollout_error:
                log.info(f"{self.rollout_name} reads again")
            self._rollout_error = reading.error

    def _status(self, now: float) -> dict[str, Any]:
        return panels.status(self.history, now, self.live)
