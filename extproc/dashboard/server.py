"""The dashboard's HTTP edge (aiohttp), read-only: GET only, nothing changes anything.

    GET /                the web page (extproc/dashboard/static/index.html)
    GET /static/...      its files
    GET /api/status      the status document (?range=15m|1h|6h|24h|7d|30d for the workers' totals)
    GET /api/series      ?name=<series>&variant=production|canary|both&range=...: one chart
    GET /api/events      text/event-stream: `snapshot` on connect, `update` after each collection,
                         a `: heartbeat` comment every 15 s
    GET /health          {"status":"ok"}

With DASHBOARD_TOKEN set, every request but /health needs it: `Authorization: Bearer <token>`, or
`?token=<token>` (what a browser's address bar and EventSource can send), which also sets an
HttpOnly, SameSite=Strict cookie so the page's own requests need not repeat it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable

import orjson
from aiohttp import web

from extproc.dashboard import panels
from extproc.dashboard.events import Hub, frame
from extproc.dashboard.history import DbThread, Reader

if TYPE_CHECKING:
    from extproc.dashboard.collector import Collector

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "zai_proxy_dashboard"
OPEN_PATHS = frozenset({"/health"})
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    # a ?token= in the address bar must not leak to other sites
                    "Referrer-Policy": "no-referrer"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(doc: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _cookie_value(token: str) -> str:
    return hmac.new(token.encode(), b"zai-proxy dashboard cookie", hashlib.sha256).hexdigest()


def credential(request: web.Request, token: str) -> str | None:
    """How the request proves it knows the token ("bearer", "query", "cookie"), or None."""
    header = request.headers.get("Authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else None
    if given is not None and hmac.compare_digest(given.encode(), token.encode()):
        return "bearer"
    query = request.query.get("token")
    if query is not None and hmac.compare_digest(query.encode(), token.encode()):
        return "query"
    cookie = request.cookies.get(COOKIE)
    if cookie is not None and hmac.compare_digest(cookie.encode(), _cookie_value(token).encode()):
        return "cookie"
    return None


def auth_middleware(token: str | None) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        set_cookie = False
        if token and request.path not in OPEN_PATHS:
            how = credential(request, token)
            if how is None:
                return json_response({"error": "this dashboard needs its token (DASHBOARD_TOKEN): "
                                               "send Authorization: Bearer <token>, or open "
                                               "/?token=<token>"}, 401)
            set_cookie = how == "query"
        response = await handler(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if set_cookie and token and not response.prepared:
            response.set_cookie(COOKIE, _cookie_value(token), httponly=True, samesite="Strict",
                                path="/", secure=request.secure)
        return response

    return middleware


def build_app(collector: "Collector", reader: Reader, reader_db: DbThread, hub: Hub,
              token: str | None = None, interval: int = 5) -> web.Application:
    app = web.Application(middlewares=[auth_middleware(token)])

    def authorized(request: web.Request) -> bool:
        return token is None or credential(request, token) is not None

    async def health(request: web.Request) -> web.Response:
        if not request.query.get("detail"):
            return json_response({"status": "ok"})
        if token and not authorized(request):
            return json_response({"error": "the detail needs the dashboard's token"}, 401)
        doc = collector.doc
        return json_response({
            "status": "ok", "source": collector.source.kind, "collections": collector.collections,
            "last_collection": doc["time"] if doc is not None else None,
            "errors": collector.live.errors, "viewers": len(hub.viewers),
            "dropped_viewers": hub.dropped, "updates_published": hub.published})

    async def index(_: web.Request) -> web.StreamResponse:
        page = STATIC / "index.html"
        if not page.is_file():
            return web.Response(status=404, text="the dashboard's page is not installed "
                                                 "(extproc/dashboard/static/index.html)")
        return web.FileResponse(page, headers={"Cache-Control": "no-cache"})

    async def status(request: web.Request) -> web.Response:
        try:
            name, seconds = panels.parse_range(request.query.get("range"))
        except panels.BadRequest as exc:
            return json_response({"error": str(exc)}, 400)
        doc = collector.doc
        if doc is not None and name == panels.DEFAULT_RANGE:
            return json_response(doc)
        now = float(doc["time"]) if doc is not None else collector.clock()
        doc = await reader_db.run(panels.status, reader, now, collector.live, seconds)
        return json_response(doc)

    async def series(request: web.Request) -> web.Response:
        try:
            name = request.query.get("name")
            if not name:
                raise panels.BadRequest(f"name is required; one of {', '.join(panels.SERIES)}")
            if name not in panels.SERIES:
                raise panels.BadRequest(f"unknown series {name!r}; one of {', '.join(panels.SERIES)}")
            _, seconds = panels.parse_range(request.query.get("range"), "1h")
            known = collector.live.variants
            wanted = request.query.get("variant", "both")
            if wanted == "both":
                variants = list(known)
            elif wanted in known:
                variants = [wanted]
            else:
                raise panels.BadRequest(f"unknown variant {wanted!r}; one of {', '.join([*known, 'both'])}")
        except panels.BadRequest as exc:
            return json_response({"error": str(exc)}, 400)
        doc = collector.doc
        now = float(doc["time"]) if doc is not None else collector.clock()
        return json_response(await reader_db.run(panels.series, reader, name, variants, seconds, now,
                                                 interval))

    async def events(request: web.Request) -> web.StreamResponse:
        viewer = hub.subscribe(request.transport)
        if viewer is None:
            return json_response({"error": "too many live viewers; try again later"}, 503)
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no", **SECURITY_HEADERS})
        try:
            await response.prepare(request)
            if collector.doc is not None:
                await response.write(frame("snapshot", collector.doc))
            while True:
                message = await viewer.queue.get()
                if message is None or viewer.dropped:
                    break
                await response.write(message)
        except (ConnectionResetError, ConnectionError, RuntimeError):
            pass  # the viewer left, or was dropped for not reading
        finally:
            hub.unsubscribe(viewer)
        return response

    app.router.add_get("/health", health)
    app.router.add_get("/", index)
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/series", series)
    app.router.add_get("/api/events", events)
    if STATIC.is_dir():
        app.router.add_static("/static/", STATIC, follow_symlinks=False)
    return app
