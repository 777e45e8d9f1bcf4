"""The append-only audit file: one JSON line per weight change (who, when, from what weight to
what, why), never rewritten.

Each line is written with one `write` on a file opened for appending and flushed to disk before
the change is reported done, so concurrent writers never interleave lines and a crash loses at
most the line being written. A change carries an id (`change`): `append_once` skips an id already
there, which is how a resumed rollout records a change it made just before it was killed, once.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator

from extproc.canary.durations import iso


def who() -> str:
    """user@host of this process; in a pod, the pod's name is the host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


class AuditLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def entries(self) -> Iterator[dict[str, Any]]:
        try:
            with self.path.open(encoding="utf-8") as lines:
                for line in lines:
                    line = line.strip()
                    if line:
                        try:
                            yield json.loads(line)
                        except ValueError:
                            continue  # a line cut by a crash: skipped, never rewritten
        except FileNotFoundError:
            return

    def has(self, change: str) -> bool:
        return any(e.get("change") == change for e in self.entries())

    def append(self, entry: dict[str, Any], now: float) -> dict[str, Any]:
        record = {"at": iso(now), "ts": round(now, 3), **entry}
        line = (json.dumps(record, sort_keys=False, separators=(",", ":")) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # after a line cut by a crash: start a line of our own
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return record

    def append_once(self, entry: dict[str, Any], now: float) -> bool:
        change = entry.get("change")
        if change and self.has(change):
            return False
        self.append(entry, now)
        return True
