"""Live updates to many viewers (Server-Sent Events), none of whom can slow the others.

Each update is encoded once and the same bytes go to every viewer's small bounded queue. A viewer
whose queue is full (it stopped reading: its socket and then its queue filled up) is dropped:
its connection is aborted, so its handler ends and its memory is freed. Publishing never waits.
Memory stays bounded: at most `max_viewers` viewers, each with at most `queue_size` queued
messages (shared bytes) and a socket send buffer of `SEND_BUFFER` bytes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import orjson

log = logging.getLogger(__name__)

QUEUE_SIZE = 8
MAX_VIEWERS = 1000
HEARTBEAT_SECONDS = 15.0
SEND_BUFFER = 64 * 1024
HEARTBEAT = b": heartbeat\n\n"


def frame(event: str, doc: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"


@dataclass(eq=False)
class Viewer:
    queue: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    transport: asyncio.Transport | None = None
    dropped: bool = False

    def limit_send_buffer(self) -> None:
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            except OSError:
                pass


class Hub:
    def __init__(self, queue_size: int = QUEUE_SIZE, max_viewers: int = MAX_VIEWERS,
                 heartbeat: float = HEARTBEAT_SECONDS) -> None:
        self.queue_size = queue_size
        self.max_viewers = max_viewers
        self.heartbeat = heartbeat
        self.viewers: set[Viewer] = set()
        self.dropped = 0  # viewers dropped for not reading, since start
        self.published = 0
        self._beat: asyncio.Task[None] | None = None

    def subscribe(self, transport: asyncio.Transport | None = None) -> Viewer | None:
        """A new viewer, or None when there are already `max_viewers`."""
        if len(self.viewers) >= self.max_viewers:
            return None
        viewer = Viewer(asyncio.Queue(self.queue_size), transport)
        viewer.limit_send_buffer()
        self.viewers.add(viewer)
        return viewer

    def unsubscribe(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)

    def publish(self, message: bytes) -> None:
        self.published += 1
        for viewer in list(self.viewers):
            try:
                viewer.queue.put_nowait(message)
            except asyncio.QueueFull:
                self._drop(viewer)

    def _drop(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)
        viewer.dropped = True
        self.dropped += 1
        log.info("dropped a live-update viewer that stopped reading", extra={"viewers": len(self.viewers)})
        if viewer.transport is not None:
            viewer.transport.abort()  # its handler's pending write fails at once

    def close(self) -> None:
        """Ends every viewer's stream (shutdown)."""
        for viewer in list(self.viewers):
            self.viewers.discard(viewer)
            try:
                viewer.queue.put_nowait(None)
            except asyncio.QueueFull:
                if viewer.transport is not None:
                    viewer.transport.abort()
        if self._beat is not None:
            self._beat.cancel()

    def start(self) -> None:
        self._beat = asyncio.ensure_future(self._heartbeats())

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            self.publish(HEARTBEAT)
