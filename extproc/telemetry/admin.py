"""Admin HTTP edge on the ext_proc's own port: GET /health (`?detail=1` adds the requests not
yet recorded and the limiter's state), GET /metrics, and POST /admin/limiter/reset (bearer ADMIN_TOKEN).

Envoy routes the listener's /health and /metrics here, so /health through Envoy fails exactly
when this ext_proc is not there to serve requests. When that listener is reachable from other
machines, Envoy marks what it forwards (`x-zai-proxy-listener: public`): workers then get the plain
/health only, and /metrics or the detail need `Authorization: Bearer <ADMIN_TOKEN>` (Prometheus
scrapes this port directly, unmarked).
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from extproc.limiter.account import AccountLimiter

# Returns None when ready, else the reason it is not.
ReadinessCheck = Callable[[], str | None]


PUBLIC_LISTENER_HEADER = "x-zai-proxy-listener"


def _authorized(request: web.Request, admin_token: str) -> bool:
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    return hmac.compare_digest(given.encode(), admin_token.encode())


def _json(doc: object, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(doc, separators=(",", ":")),
                        content_type="application/json")


def build_admin_app(readiness: ReadinessCheck, exposition: Callable[[], bytes],
                    limiter: "AccountLimiter | None" = None,
                    admin_token: str | None = None,
                    open_requests: Callable[[], int] = lambda: 0,
                    quota: Callable[[], dict[str, object]] | None = None) -> web.Application:
    def refused(request: web.Request) -> web.Response | None:
        """None when the caller may see operator data; else the answer that says why not."""
        if request.headers.get(PUBLIC_LISTENER_HEADER) != "public":
            return None
        if not admin_token:
            return _json({"error": "this is the workers' listener: scrape /metrics on the "
                                   "ext_proc's admin port, or set ADMIN_TOKEN to read it here"}, 403)
        return None if _authorized(request, admin_token) else _json(
            {"error": "missing or wrong admin token (Authorization: Bearer ...)"}, 401)

    async def health(request: web.Request) -> web.Response:
        reason = readiness()
        doc: dict[str, object] = {"status": "ok"} if reason is None else {
            "status": "unavailable", "reason": reason}
        if request.query.get("detail"):
            denied = refused(request)
            if denied is not None:
                return denied
            # Requests between their headers and their record (metrics, usage log line).
            doc["requests_open"] = open_requests()
            if limiter is not None:
                doc["limiter"] = limiter.state()
            if quota is not None:
                doc["quota"] = quota()
        return _json(doc, 200 if reason is None else 503)

    async def reset_limiter(request: web.Request) -> web.Response:
        if not admin_token:
            return _json({"error": "admin endpoints are disabled: set ADMIN_TOKEN"}, 403)
        if not _authorized(request, admin_token):
            return _json({"error": "missing or wrong admin token (Authorization: Bearer ...)"}, 401)
        assert limiter is not None
        await limiter.reset()
        return _json({"status": "reset", "limiter": limiter.state()})

    async def metrics(request: web.Request) -> web.Response:
        denied = refused(request)
        if denied is not None:
            return denied
        return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    if limiter is not None:
        app.router.add_post("/admin/limiter/reset", reset_limiter)
    return app
