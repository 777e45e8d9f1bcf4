"""Admin HTTP edge: GET /health and GET /metrics on the ext_proc's own port.

Envoy routes the listener's /health and /metrics here, so /health through Envoy fails exactly
when this ext_proc is not there to serve requests.
"""

from __future__ import annotations

import json
from typing import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

# Returns None when ready, else the reason it is not.
ReadinessCheck = Callable[[], str | None]


def build_admin_app(readiness: ReadinessCheck, exposition: Callable[[], bytes]) -> web.Application:
    async def health(_: web.Request) -> web.Response:
        reason = readiness()
        if reason is None:
            return web.Response(text='{"status":"ok"}', content_type="application/json")
        body = json.dumps({"status": "unavailable", "reason": reason}, separators=(",", ":"))
        return web.Response(status=503, text=body, content_type="application/json")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app
