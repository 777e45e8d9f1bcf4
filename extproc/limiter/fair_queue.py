"""Waiting requests, served fairly across workers.

The next request to get a free slot comes from the worker with the fewest requests in flight;
among those, the one served least since it started waiting, then the earliest to arrive. So one
worker with 20 parallel calls cannot starve five workers with one call each: each of them is
admitted before the busy worker gets another slot. Pure bookkeeping: no clocks, no I/O; the admission controller
decides when a slot is free.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


@dataclass
class _Lane(Generic[T]):
    worker: str
    items: deque[T] = field(default_factory=deque)
    served: int = 0  # admissions since the lane formed: the less served go first
    turn: int = 0  # when this lane was last served (or joined): older turns go first


class FairQueue(Generic[T]):
    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._lanes: dict[str, _Lane[T]] = {}
        self._size = 0
        self._turns = itertools.count(1)

    def __len__(self) -> int:
        return self._size

    @property
    def full(self) -> bool:
        return self._size >= self.max_waiting

    def push(self, worker: str, item: T, in_flight: int = 0) -> bool:
        """Queue `item` for `worker` (who has `in_flight` requests admitted already); False when
        the queue is full."""
        if self.full:
            return False
        lane = self._lanes.get(worker)
        if lane is None:
            # Requests admitted without waiting count as served: a busy worker's first queued
            # request must not outrank a newcomer's.
            lane = self._lanes[worker] = _Lane(worker, served=in_flight, turn=next(self._turns))
        lane.items.append(item)
        self._size += 1
        return True

    def remove(self, worker: str, item: T) -> bool:
        """Take `item` out (its client left, or it timed out); False if it was not queued."""
        lane = self._lanes.get(worker)
        if lane is None:
            return False
        try:
            lane.items.remove(item)
        except ValueError:
            return False
        self._size -= 1
        if not lane.items:
            del self._lanes[worker]
        return True

    def peek(self, in_flight: dict[str, int]) -> tuple[str, T] | None:
        """The next (worker, item) to admit, given each worker's requests in flight."""
        best: _Lane[T] | None = None
        for lane in self._lanes.values():
            if best is None or self._before(lane, best, in_flight):
                best = lane
        return None if best is None else (best.worker, best.items[0])

    def head(self, worker: str) -> T | None:
        lane = self._lanes.get(worker)
        return lane.items[0] if lane is not None else None

    def pop(self, worker: str) -> T:
        """Remove and return `worker`'s oldest item (after `peek` chose it)."""
        lane = self._lanes[worker]
        item = lane.items.popleft()
        self._size -= 1
        lane.turn = next(self._turns)
        lane.served += 1
        if not lane.items:
            del self._lanes[worker]
        return item

    def workers(self) -> Iterator[str]:
        return iter(self._lanes)

    def waiting(self) -> dict[str, int]:
        """Requests waiting now, by worker."""
        return {worker: len(lane.items) for worker, lane in self._lanes.items()}

    @staticmethod
    def _before(a: _Lane[T], b: _Lane[T], in_flight: dict[str, int]) -> bool:
        key_a = (in_flight.get(a.worker, 0), a.served, a.turn)
        key_b = (in_flight.get(b.worker, 0), b.served, b.turn)
        return key_a < key_b
