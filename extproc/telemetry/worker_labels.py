"""Which `worker` label a request's metrics carry: bounded, the same on every replica.

Named workers (the operator's names in WORKER_KEYS_FILE) are labels as they are: the operator
bounded them. Unnamed credentials (key fingerprints) are labels up to WORKER_LABEL_LIMIT, first
come first served across every replica (a capped set in the state store: Redis with REDIS_URL),
and `other` after that, so a fleet of throwaway keys cannot blow up Prometheus.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Protocol

from extproc.limiter.stores.base import StoreUnavailable

OTHER = "other"
# Decisions remembered per process, so a known worker costs no store round trip.
MAX_REMEMBERED_OTHERS = 10_000


class CappedSet(Protocol):
    async def join_capped(self, key: str, member: str, limit: int) -> bool: ...


class WorkerLabels:
    def __init__(self, store: CappedSet, account: str, limit: int,
                 is_named: Callable[[str], bool]) -> None:
        self.store = store
        self.key = f"worker-labels:{account}"
        self.limit = limit
        self.is_named = is_named
        self._labelled: set[str] = set()  # at most `limit` (what the store let in)
        self._others: OrderedDict[str, None] = OrderedDict()

    def known(self, worker: str) -> str:
        """The label already decided for `worker` (no store call): "other" until it has one."""
        return worker if worker in self._labelled or self.is_named(worker) else OTHER

    async def label(self, worker: str) -> str:
        if worker in self._labelled or self.is_named(worker):
            return worker
        if worker in self._others:
            return OTHER
        try:
            joined = await self.store.join_capped(self.key, worker, self.limit)
        except StoreUnavailable:
            joined = len(self._labelled) < self.limit
        if joined and len(self._labelled) < self.limit:
            self._labelled.add(worker)
            return worker
        self._others[worker] = None
        if len(self._others) > MAX_REMEMBERED_OTHERS:
            self._others.popitem(last=False)
        return OTHER
