"""The `redis_server` fixture (module scope: a real redis-server, always stopped afterwards) and
`redis_url`, its URL. Use them with `from redis_server import redis_server, redis_url`; the server
itself is `extproc.local.redis_server`."""

from __future__ import annotations

from typing import Iterator

import pytest

from extproc.local.processes import free_port
from extproc.local.redis_server import RedisServer, start_redis

__all__ = ["RedisServer", "free_port", "redis_server", "redis_url", "start_redis"]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url
