"""The rollout's state file (JSON, replaced atomically, beside the audit file) and the lock that
keeps two rollouts from driving one split.

The dashboard reads the state file; `zai-proxy canary status` and `weights show` print it; a
restarted `canary rollout` resumes from it. Its shape is `rollout.State.to_json()` (documented in
the README, "Canary analysis and rollout").
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from extproc.canary.rollout import RolloutError, State

# A state file is a few kB; anything far bigger is not one (the dashboard refuses it, the
# controller's /state serves no more).
MAX_STATE_BYTES = 1 << 20


class StateFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read_json(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise RolloutError(f"{self.path} is not valid JSON ({exc}); move it away to start afresh") from None

    def load(self) -> State | None:
        doc = self.read_json()
        if doc is None:
            return None
        try:
            return State.from_json(doc)
        except (KeyError, TypeError, ValueError) as exc:
            raise RolloutError(f"{self.path} is not a rollout state ({exc}); move it away to start "
                               "afresh") from None

    def save(self, state: State) -> None:
        self.write_json(state.to_json())

    def write_json(self, doc: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with tmp.open("w", encoding="utf-8") as out:
            json.dump(doc, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)


class RolloutLock:
    """An exclusive lock beside the state file, held while a rollout runs (released by the OS
    when the process dies, however it dies)."""

    def __init__(self, state_path: str | Path) -> None:
        self.path = Path(str(state_path) + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RolloutError(f"another canary rollout is running (pid {holder}, lock {self.path}); "
                               "stop it first, or wait for it") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RolloutLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
