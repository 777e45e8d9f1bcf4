"""Keys: the real upstream key, and the optional table of worker keys.

Both may come from files that change while the gateway runs (Kubernetes swaps the symlink of a
secret mount), so files are re-read when their identity changes, checked at most once a second on
use. No key is ever logged; workers are known by name, or by a short hash of their key.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]


class KeyUnavailable(RuntimeError):
    """The upstream key cannot be read right now."""


@functools.lru_cache(maxsize=4096)  # a worker sends its key with every request
def fingerprint(secret: str) -> str:
    """A short, stable, non-reversible name for a secret (safe to log and to use as a label)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


class WatchedFile(Generic[T]):
    """The parsed content of a small file, re-read when the file's identity changes."""

    def __init__(self, path: str, parse: Callable[[str], T], clock: Clock = time.monotonic,
                 interval: float = 1.0) -> None:
        self.path = path
        self._parse = parse
        self._clock = clock
        self._interval = interval
        self._checked_at = float("-inf")
        self._signature: tuple[int, int, int] | None = None
        self._value: T | None = None
        self._error: str | None = None

    def value(self) -> T:
        now = self._clock()
        if now - self._checked_at >= self._interval:
            self._checked_at = now
            self._refresh()
        if self._value is None:
            raise KeyUnavailable(self._error or f"{self.path} has not been read")
        return self._value

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)  # follows the symlink a secret mount swaps
            signature = (st.st_ino, st.st_mtime_ns, st.st_size)
            if signature == self._signature:
                return
            with open(self.path, encoding="utf-8") as fh:
                parsed = self._parse(fh.read())
        except (OSError, ValueError) as exc:
            # Keep serving with the last good value: a secret swap is briefly inconsistent.
            message = f"cannot read {self.path}: {exc.__class__.__name__}"
            if message != self._error:
                log.warning("key file unreadable", extra={"path": self.path, "error": message})
            self._error = message
            return
        if self._signature is not None:
            log.info("key file reloaded", extra={"path": self.path})
        self._signature = signature
        self._value = parsed
        self._error = None


def parse_key_file(text: str) -> str:
    key = text.strip()
    if not key or any(c.isspace() for c in key):
        raise ValueError("the key file must hold exactly one key")
    return key


class UpstreamKey:
    """Where the real Z.AI key comes from: a fixed value, or a watched file."""

    def __init__(self, value: str | None = None, path: str | None = None,
                 clock: Clock = time.monotonic) -> None:
        if not value and not path:
            raise ValueError("an upstream key or key file is required")
        self._value = value
        self._file = WatchedFile(path, parse_key_file, clock) if path else None

    def current(self) -> str:
        if self._file is not None:
            return self._file.value()
        assert self._value is not None
        return self._value


@dataclass(frozen=True)
class WorkerTable:
    """Worker keys by sha256 digest, so lookups compare digests rather than secrets."""

    names_by_digest: dict[bytes, str]
    named: frozenset[str] = frozenset()  # names given in the file (not key fingerprints)
    priority: frozenset[str] = frozenset()  # may use the quota reserve (QUOTA_RESERVE_PERCENT)

    def name_for(self, key: str) -> str | None:
        return self.names_by_digest.get(hashlib.sha256(key.encode()).digest())

    def __len__(self) -> int:
        return len(self.names_by_digest)


def parse_worker_keys(text: str) -> WorkerTable:
    """Lines of `name key [priority]` (a bare `key` is named by its fingerprint); `#` starts a
    comment. `priority` lets the worker use the quota reserve."""
    table: dict[bytes, str] = {}
    named: set[str] = set()
    priority: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) == 1:
            name, key = f"key-{fingerprint(parts[0])}", parts[0]
        elif len(parts) == 2 or (len(parts) == 3 and parts[2] == "priority"):
            name, key = parts[0], parts[1]
            named.add(name)
            if len(parts) == 3:
                priority.add(name)
        else:
            raise ValueError(f"line {number}: expected `name key` or `name key priority`")
        digest = hashlib.sha256(key.encode()).digest()
        if digest in table:
            raise ValueError(f"line {number}: the key of {name!r} is already used by {table[digest]!r}")
        table[digest] = name
    if not table:
        raise ValueError("the worker keys file lists no keys")
    return WorkerTable(table, frozenset(named), frozenset(priority))


class WorkerKeys:
    """The optional worker key table; without one, any token (a placeholder) is accepted."""

    def __init__(self, path: str | None = None, clock: Clock = time.monotonic) -> None:
        self._file = WatchedFile(path, parse_worker_keys, clock) if path else None

    @property
    def enforced(self) -> bool:
        return self._file is not None

    def _table(self) -> WorkerTable | None:
        try:
            return self._file.value() if self._file is not None else None
        except KeyUnavailable:
            return None

    def is_priority(self, worker: str) -> bool:
        table = self._table()
        return table is not None and worker in table.priority

    def is_named(self, worker: str) -> bool:
        """A name the operator chose (a metric label as it is), not a key's fingerprint."""
        table = self._table()
        return table is not None and worker in table.named

    def identify(self, token: str | None) -> str | None:
        """The worker's identity, or None when keys are enforced and the token is not known."""
        if self._file is None:
            return f"key-{fingerprint(token)}" if token else "anonymous"
        if not token:
            return None
        try:
            return self._file.value().name_for(token)
        except KeyUnavailable:
            return None
