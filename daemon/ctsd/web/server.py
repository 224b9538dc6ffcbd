"""The one port: a real HTTP/1.1 server (uvicorn) in the daemon's own event loop, serving the
REST API (Starlette) and the bus upgrade at `/ws` (the websockets library's own protocol, in
uvicorn's `websockets-sansio` implementation).

Every HTTP request passes the same door before any route: Host (DNS rebinding) and Origin
checks → CORS preflight → token → rate limit. Every response carries `X-Revision`. uvicorn's
signal handling is off: the daemon owns SIGTERM, SIGINT and SIGHUP (and sd_notify).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import resource
import socket
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING, Any

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response

from ctsd.bus.outbox import TRUST
from ctsd.bus.ratelimit import Limiter, http_limited
from ctsd.bus.server import BUS_PATH, HARD_MAX_FRAME_BYTES, Bus
from ctsd.config import is_loopback
from ctsd.errors import CtsdError
from ctsd.guard import Guard, allowed_origins, header, rate_key
from ctsd.metrics import Metrics
from ctsd.web import api
from ctsd.web.protocols import ConnectionLimits, protocol_classes, quiet_uvicorn

if TYPE_CHECKING:
    from ctsd.services import Services
    from ctsd.store import Store

log = structlog.get_logger("ctsd.web")

# Keepalive pings on the bus every 20 s; a client that does not answer within as long again is
# dropped. CTSD_BUS_PING_S shortens both for tests.
PING_INTERVAL_S = float(os.environ.get("CTSD_BUS_PING_S") or 20.0)
GRACEFUL_S = 1.0  # open HTTP requests get this long at shutdown (inside the daemon's 5 s)
# The listen backlog, and so how many connections asyncio accepts in one go before the
# connection cap can close the excess (closes lag accepts by a loop turn or two): kept small,
# so a flood of sockets takes at most a few times this many descriptors beyond the cap.
BACKLOG = 64
# Descriptors kept for the daemon's own work (journal, data files, logs, watcher, probes, the
# cluster's sockets, and the accepts beyond the cap that are closed a loop turn later):
# `server.max_connections` never takes these, whatever it says.
FD_RESERVE = 4 * BACKLOG


def connection_budget() -> int:
    """How many connections the descriptor limit leaves room for (see FD_RESERVE)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(16, soft - FD_RESERVE)


# A connection must send a request's headers within this, and then its body within the
# next, and read what it is sent (see `protocols`); CTSD_HEADER_TIMEOUT_S,
# CTSD_BODY_TIMEOUT_S and CTSD_WRITE_STALL_S are for tests.
HEADER_TIMEOUT_S = float(os.environ.get("CTSD_HEADER_TIMEOUT_S") or 10.0)
BODY_TIMEOUT_S = float(os.environ.get("CTSD_BODY_TIMEOUT_S") or 30.0)
WRITE_STALL_S = float(os.environ.get("CTSD_WRITE_STALL_S") or 30.0)
# Readable by an allowed origin's page: why it must wait (429), which methods a route has
# (405), how to authenticate (401), besides the revision and a created record's place.
EXPOSED = ["X-Revision", "Location", "Retry-After", "Allow", "WWW-Authenticate"]
# Any header an allowed origin's page asks for (`X-Requested-With`, `Cache-Control`: what
# HTTP libraries add): the token, not a header list, is what guards a route.
ALLOWED_HEADERS = ["*"]
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class LiveOrigins(Collection[str]):
    """`server.cors_origins` as read now (a hand edit of settings.json applies at once), as
    `guard.allowed_origins` takes them."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _current(self) -> frozenset[str]:
        return allowed_origins(self.store.settings.server)

    def __contains__(self, origin: object) -> bool:
        return isinstance(origin, str) and origin.lower() in self._current()

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())


class JsonCORS(CORSMiddleware):
    """Starlette's CORS, answering a refused preflight in JSON like every other error."""

    def preflight_response(self, request_headers: Any) -> Response:
        response = super().preflight_response(request_headers)
        # Starlette's preflight answer carries a body ("OK") and its length and type: a 204
        # must have none (uvicorn refuses it and drops the connection), and a 403 gets ours.
        headers = {
            k: v
            for k, v in response.headers.items()
            if k.lower() not in ("content-length", "content-type")
        }
        if response.status_code == 200:
            return Response(status_code=204, headers=headers)
        said = response.body.decode()  # ("Disallowed CORS origin, method")
        if "origin" in said:
            said += f" {request_headers.get('origin', '')[:120]!a} (see server.cors_origins)"
        err = CtsdError("forbidden", said)
        return api.json_response(403, api.error_body(err), headers)


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the daemon handles its own signals


class Web:
    """The server of one daemon: HTTP routes, the bus, and the port they share."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        store = svc.store
        self.guard = Guard(svc.token, bound_loopback=is_loopback(svc.listen.host))
        self.bus = Bus(svc, self.guard)
        self.limiter = Limiter(lambda: store.settings.server.rate_limit)  # per HTTP client
        budget = connection_budget()
        warned = 0  # the value last warned about (a settings change that keeps it: no repeat)

        def check_budget() -> None:
            nonlocal warned
            wanted = store.settings.server.max_connections
            if wanted > budget and wanted != warned:
                log.warning(
                    "max_connections_above_descriptor_limit",
                    max_connections=wanted,
                    allowed=budget,
                    message="the open-file limit (LimitNOFILE=) leaves room for fewer "
                    "connections; the daemon's own files keep theirs",
                )
            warned = wanted if wanted > budget else 0

        check_budget()
        store.settings_listeners.append(check_budget)  # (a hand edit while running too)
        self.limits = ConnectionLimits(
            max_connections=lambda: min(store.settings.server.max_connections, budget),
            header_timeout_s=HEADER_TIMEOUT_S,
            body_timeout_s=BODY_TIMEOUT_S,
            write_stall_s=WRITE_STALL_S,
            revision=lambda: store.revision,
        )
        self.requests = 0
        self.status_counts: collections.Counter[int] = collections.Counter()
        self.metrics = Metrics(store, self.stats)
        svc.server_stats = self.stats
        svc.render_metrics = self.metrics.render
        starlette = Starlette(
            routes=api.routes(svc),
            exception_handlers={HTTPException: _http_error, Exception: self._crash},
        )
        starlette.router.redirect_slashes = False  # /api/x/ is not /api/x: no redirects
        self.cors = JsonCORS(
            starlette,
            allow_origins=LiveOrigins(store),
            allow_methods=METHODS,
            allow_headers=ALLOWED_HEADERS,
            # (A page that sends `credentials: "include"`, as axios's withCredentials does:
            # the daemon sets no cookie, the token guards every route.)
            allow_credentials=True,
            expose_headers=EXPOSED,
            max_age=600,
            # A page of an allowed origin served from a public or LAN address calling this
            # daemon on localhost: Chrome's Private Network Access preflight asks for this;
            # refused, every call of that page failed. The origin list decides, as always.
            allow_private_network=True,
        )
        self.server: _Uvicorn | None = None
        self.port = svc.listen.port  # the port bound, once started
        self._task: asyncio.Task[None] | None = None

    def stats(self) -> dict[str, Any]:
        out = self.bus.stats()
        out["http_requests"] = self.requests
        out["connections_refused"] = self.limits.refused
        out["connections_evicted"] = self.limits.evicted
        return out

    # --- ASGI -------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self.bus(scope, receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.requests += 1
        store = self.svc.store

        async def send_with_revision(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.status_counts[message["status"]] += 1
                headers = message.setdefault("headers", [])
                revision = scope.get(api.REVISION_SCOPE, store.revision)
                headers.append((b"x-revision", str(revision).encode()))
                if not any(k.lower() == b"cache-control" for k, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
            await send(message)

        headers = scope["headers"]
        server = store.settings.server
        path = scope["path"]
        extra: dict[str, str] = {}  # headers of a refusal
        try:
            self.guard.check_host(headers)
            self.guard.check_origin(headers, server)
            # A preflight as the CORS layer takes it (an origin too): anything else is a request
            # like any, token and rate limit first.
            preflight = (
                scope["method"] == "OPTIONS"
                and header(headers, b"access-control-request-method")
                and header(headers, b"origin")
            )
            if not preflight:
                if path != "/health":
                    self.guard.require_token(scope.get("client"), headers, server)
                    scope["extensions"][TRUST]()
                elif self.guard.token_state(headers):  # a monitor that sends it
                    scope["extensions"][TRUST]()
                limited = http_limited(scope["method"], path)
                key = rate_key(scope.get("client"))
                if limited and not self.limiter.allow(key):
                    extra["Retry-After"] = str(math.ceil(self.limiter.wait_s(key)) or 1)
                    raise CtsdError("rate_limited", "too many requests; slow down and retry")
            if path == BUS_PATH:
                raise CtsdError(
                    "invalid_format",
                    f"{BUS_PATH} is the websocket bus: connect with a websocket client",
                )
        except CtsdError as e:
            self.bus.count_error(e.code)
            if e.code == "forbidden":
                shown = path[:200]  # (a request line may be 8 KiB)
                self.guard.http_refused.note(f"{e.message} {shown}", path=shown, reason=e.message)
            if e.code == "unauthorized":
                extra["WWW-Authenticate"] = "Bearer"
            extra.update(self._cors_headers(headers))
            await api.error_response(e, extra or None)(scope, receive, send_with_revision)
            return
        await self.cors(scope, receive, send_with_revision)

    def _cors_headers(self, headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
        """What the CORS layer adds to an answer for an allowed origin, for the answers the
        checks before it give (a 401, a 429): without them a browser frontend cannot read
        why it was refused, and takes the daemon for down."""
        origins = header(headers, b"origin")
        if len(origins) != 1 or origins[0] not in self.cors.allow_origins:
            return {}
        return {
            "Access-Control-Allow-Origin": origins[0],
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Expose-Headers": ", ".join(EXPOSED),
            "Vary": "Origin",
        }

    async def _crash(self, request: Request, exc: Exception) -> Response:
        log.exception("http_route_failed", method=request.method, path=request.url.path)
        self.bus.count_error("internal")
        # What failed is in the daemon's log: an exception's text may quote what it was given.
        return api.error_response(CtsdError("internal", "internal error; see the daemon's log"))

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind (OSError when the port is taken) and serve; returns once accepting."""
        http_cls, ws_cls = protocol_classes(self.limits)
        sockets = _bind(self.svc.listen.host, self.svc.listen.port)
        self.port = sockets[0].getsockname()[1]  # (the one the system chose for port 0)
        config = uvicorn.Config(
            self,
            http=http_cls,
            ws=ws_cls,
            interface="asgi3",
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,  # a local client must not pick its own address
            server_header=False,
            ws_max_size=HARD_MAX_FRAME_BYTES,
            ws_per_message_deflate=False,  # compression triples a broadcast's cost
            ws_ping_interval=PING_INTERVAL_S,
            ws_ping_timeout=PING_INTERVAL_S,
            timeout_graceful_shutdown=GRACEFUL_S,
            backlog=BACKLOG,
        )
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        quiet_uvicorn(logging.getLogger("uvicorn.error"))
        self.server = _Uvicorn(config)
        self.bus.start()
        self._task = asyncio.get_running_loop().create_task(
            self.server.serve(sockets=sockets), name="ctsd-http"
        )
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what failed
                raise OSError("the HTTP server stopped before it started")
            await asyncio.sleep(0.005)

    async def shutdown(self) -> None:
        """Stop accepting, answer what is in flight, close bus clients with 1001."""
        if self.server is None:
            return
        for srv in getattr(self.server, "servers", []):
            srv.close()  # no new connections from here on
        await self.bus.shutdown()
        self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid")
    if exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    elif exc.status_code == 404:
        message = f"no route {request.url.path}"
    else:
        message = str(exc.detail)
    return api.json_response(
        exc.status_code, api.error_body(CtsdError(code, message)), dict(exc.headers or {})
    )


def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address `host` names (as asyncio would bind them)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen: set[tuple[Any, ...]] = set()
    out: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr) in seen or (port == 0 and out):
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in out:
            sock.close()
        raise
    return out
