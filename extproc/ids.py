"""Identifiers unique across processes, replicas and restarts, cheap enough for every request.

A random 64-bit prefix drawn once per process (again in a forked child) and a counter: no system
call and no UUID object per id, where `uuid.uuid4()` costs a `getrandom` call each time.
"""

from __future__ import annotations

import itertools
import os


def _fresh() -> None:
    global _prefix, _counter
    _prefix = os.urandom(8).hex()
    _counter = itertools.count(1)


_prefix = ""
_counter = itertools.count(1)
_fresh()
os.register_at_fork(after_in_child=_fresh)


def unique_id() -> str:
    """32 hex digits, like `uuid.uuid4().hex`."""
    return f"{_prefix}{next(_counter):016x}"
