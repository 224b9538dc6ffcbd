"""Plain HTTP routes on the bus port (CONTRACT §5), answered from `process_request`.

websockets parses no request bodies (any non-zero Content-Length is refused while parsing),
so the routes are GET and DELETE only; every change with a body goes over the bus.
"""

from __future__ import annotations

import http
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec
import structlog
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from ctsd import __version__, files, ops
from ctsd.bus import protocol, views
from ctsd.bus.session import TOO_MANY_FAILURES, header_token
from ctsd.errors import CtsdError
from ctsd.health import health

if TYPE_CHECKING:
    from ctsd.app import App
    from ctsd.bus.server import Server

log = structlog.get_logger("ctsd.bus")

# CONTRACT §5: HTTP errors are 400, 401, 403, 404, 405, 409, 429 or 503 (no 500: a failure of
# ours is "unavailable", and a retry may succeed).
STATUS_OF = {
    "invalid_format": 400,
    "invalid": 400,
    "id_reuse": 400,
    "unknown_command": 400,
    "too_large": 400,
    "revision_compacted": 409,
    "unauthorized": 401,
    "not_found": 404,
    "conflict": 409,
    "file_invalid": 409,
    "rate_limited": 429,
    "io_error": 503,
    "internal": 503,
}

Query = dict[str, list[str]]
RouteFn = Callable[["Routes", re.Match[str], Query, Request], Awaitable[Any]]


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str, allow: str = "") -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.allow = status, code, message, allow


def response(
    status: int, body: bytes, content_type: str = "application/json", extra: Headers | None = None
) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body)))])
    headers["Cache-Control"] = "no-store"
    if extra:
        headers.update(extra)
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


def json_response(status: int, body: object, extra: Headers | None = None) -> Response:
    return response(status, protocol.encode(body), extra=extra)


def error_response(status: int, code: str, message: str, extra: Headers | None = None) -> Response:
    return json_response(status, {"error": {"code": code, "message": message}}, extra)


def _one(query: Query, name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _int(query: Query, name: str, default: int, lo: int, hi: int) -> int:
    value = _opt_int(query, name, lo, hi)
    return default if value is None else value


def _opt_int(query: Query, name: str, lo: int, hi: int) -> int | None:
    text = _one(query, name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise HttpError(400, "invalid", f"?{name} must be an integer") from None
    if not lo <= value <= hi:
        raise HttpError(400, "invalid", f"?{name} must be between {lo} and {hi}")
    return value


class Routes:
    def __init__(self, app: App, server: Server) -> None:
        self.app = app
        self.server = server

    # --- routes ---------------------------------------------------------------------------

    async def bootstrap(self, m: re.Match[str], q: Query, r: Request) -> Any:
        s = self.app.store.settings.server
        host = r.headers.get("Host") or f"{self.app.listen.host}:{self.app.listen.port}"
        return {
            "version": __version__,
            "protocol_version": protocol.PROTOCOL_VERSION,
            "bus_url": f"ws://{host}/ws",
            "server": {
                "host": self.app.listen.host,
                "port": self.app.listen.port,
                "cors_origins": s.cors_origins,
                "rate_limit": msgspec.to_builtins(s.rate_limit),
            },
            "capabilities": {
                "commands": sorted(protocol.COMMANDS),
                "topics": list(protocol.TOPICS),
                "max_frame_bytes": protocol.MAX_FRAME_BYTES,
                "documents": sorted(self.app.store.documents),
            },
        }

    async def server_status(self, m: re.Match[str], q: Query, r: Request) -> Any:
        return views.status(self.app)

    async def list_connections(self, m: re.Match[str], q: Query, r: Request) -> Any:
        return views.connections(self.app.store, exchange=_one(q, "exchange"))

    async def get_connection(self, m: re.Match[str], q: Query, r: Request) -> Any:
        return views.get_connection(self.app.store, m["id"])

    async def delete_connection(self, m: re.Match[str], q: Query, r: Request) -> Any:
        return await self.app.store.submit(ops.delete(m["id"]), source="http")

    async def active(self, m: re.Match[str], q: Query, r: Request) -> Any:
        return views.connections(self.app.store, active=True)

    async def state(self, m: re.Match[str], q: Query, r: Request) -> Any:
        return views.state(self.app.store)

    async def sync_log(self, m: re.Match[str], q: Query, r: Request) -> Any:
        since = _opt_int(q, "since", 0, 2**63)  # absent: the newest `limit` entries
        limit = _int(q, "limit", 1000, 1, 100_000)
        return views.sync_log(self.app.store, since, limit)

    async def export(self, m: re.Match[str], q: Query, r: Request) -> Any:
        return views.export(self.app.store)

    async def document(self, m: re.Match[str], q: Query, r: Request) -> Any:
        name = m["name"]
        try:
            files.document_file(name)
        except KeyError:
            raise HttpError(404, "not_found", f"no document {name!r}") from None
        return views.document(self.app.store, name)

    async def reset(self, m: re.Match[str], q: Query, r: Request) -> Any:
        if _one(q, "confirm") != "yes":
            raise HttpError(400, "invalid", "DELETE /api/data/reset needs ?confirm=yes")
        return await self.app.store.submit(ops.reset(), source="http")

    # --- dispatch -------------------------------------------------------------------------

    async def handle(self, conn: ServerConnection, request: Request) -> Response:
        url = urlsplit(request.path)
        path = unquote(url.path)
        extra = self._cors(request)
        try:
            if path == "/health":
                if request.method != "GET":
                    raise HttpError(405, "method_not_allowed", "use GET", allow="GET")
                return json_response(200, health(self.app), extra)
            origin_ok = self.server.origin_ok(request)
            if not origin_ok:
                raise HttpError(403, "forbidden", "origin not allowed")
            if request.method == "OPTIONS":
                return response(204, b"", extra=extra)
            route, match = self._route(request.method, path)
            addr = self.server.remote(conn)
            self._authorize(addr, header_token(request.headers, self.app.token))
            if not self.server.http_limiter.allow(addr):
                raise HttpError(429, "rate_limited", "too many requests; slow down and retry")
            if route is None:
                return self.server.metrics_response()
            q = parse_qs(url.query, keep_blank_values=True)
            return json_response(200, await route(self, match, q, request), extra)
        except HttpError as e:
            self.server.count_error(e.code)
            headers = Headers(extra or [])
            if e.allow:
                headers["Allow"] = e.allow
            return error_response(e.status, e.code, e.message, headers)
        except CtsdError as e:
            self.server.count_error(e.code)
            body = {"code": e.code, "message": e.message}  # no JSON path: there is no body
            body.update({k: v for k, v in e.extra.items() if isinstance(v, str | int)})
            return json_response(STATUS_OF.get(e.code, 503), {"error": body}, extra)
        except Exception as e:
            log.exception("http_route_failed", method=request.method, path=path)
            self.server.count_error("internal")
            body = {"code": "internal", "message": f"{type(e).__name__}: {e}"}
            return json_response(503, {"error": body}, extra)

    def _authorize(self, addr: str, token: bool | None) -> None:
        """Count only a token presented and wrong; a blocked address gets its token checked
        only when admitted (`AuthFailures.admit`).

        A request without a token is no guess: any web page can make the trader's browser
        send one (an <img> to /api/...), so counting those would let it lock the trader out.
        """
        if token is None:
            raise HttpError(401, "unauthorized", "Authorization: Bearer TOKEN required")
        if not self.server.auth_failures.admit(addr):
            raise HttpError(429, "rate_limited", TOO_MANY_FAILURES)
        if token:
            return
        if self.server.auth_failures.wrong_token(addr):
            raise HttpError(429, "rate_limited", TOO_MANY_FAILURES)
        raise HttpError(401, "unauthorized", "invalid token")

    def _route(self, method: str, path: str) -> tuple[Any, Any]:
        if path == "/metrics":
            if method != "GET":
                raise HttpError(405, "method_not_allowed", f"{method} not allowed", allow="GET")
            return None, None
        allowed = []
        for pattern, verb, fn in ROUTES:
            m = pattern.fullmatch(path)
            if m is None:
                continue
            if verb == method:
                return fn, m
            allowed.append(verb)
        if allowed:
            raise HttpError(
                405, "method_not_allowed", f"{method} not allowed on {path}", ", ".join(allowed)
            )
        raise HttpError(404, "not_found", f"no route {path}")

    def _cors(self, request: Request) -> Headers | None:
        origin = request.headers.get("Origin")
        if origin is None or not self.server.origin_ok(request):
            return None
        return Headers(
            [
                ("Access-Control-Allow-Origin", origin),
                ("Vary", "Origin"),
                ("Access-Control-Allow-Methods", "GET, DELETE, OPTIONS"),
                ("Access-Control-Allow-Headers", "Authorization"),
            ]
        )


_ID = r"(?P<id>[A-Za-z0-9_-]{1,64})"
ROUTES: list[tuple[re.Pattern[str], str, RouteFn]] = [
    (re.compile(r"/api/trading/connection"), "GET", Routes.bootstrap),
    (re.compile(r"/api/trading/server-status"), "GET", Routes.server_status),
    (re.compile(r"/api/settings/connections"), "GET", Routes.list_connections),
    (re.compile(rf"/api/settings/connections/{_ID}"), "GET", Routes.get_connection),
    (re.compile(rf"/api/settings/connections/{_ID}"), "DELETE", Routes.delete_connection),
    (re.compile(r"/api/connections/active"), "GET", Routes.active),
    (re.compile(r"/api/connections/state"), "GET", Routes.state),
    (re.compile(r"/api/sync-log"), "GET", Routes.sync_log),
    (re.compile(r"/api/data/export"), "GET", Routes.export),
    (re.compile(r"/api/data/reset"), "DELETE", Routes.reset),
    (re.compile(r"/api/data/(?P<name>(?!export$|reset$).+)"), "GET", Routes.document),
]
