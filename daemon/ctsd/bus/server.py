"""The websockets server on one port: `/ws` for the bus, plain HTTP routes beside it.

Limits (CONTRACT §4): frames over 1 MiB are answered `too_large` and closed with 1009; frames
over `HARD_MAX_FRAME_BYTES` (2 MiB) are not even read — websockets closes them with 1009
itself. Keepalive pings every 20 s. `compression=None`: permessage-deflate roughly triples the
cost of a broadcast on a local bus (FINDINGS).
"""

from __future__ import annotations

import asyncio
import collections
import os
from typing import TYPE_CHECKING, Any

import structlog
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from ctsd.bus import protocol
from ctsd.bus.fanout import Hub
from ctsd.bus.http import Routes, error_response, response
from ctsd.bus.ratelimit import AuthFailures, Limiter
from ctsd.bus.session import TOO_MANY_FAILURES, Session, header_token
from ctsd.metrics import CONTENT_TYPE, Metrics

if TYPE_CHECKING:
    from ctsd.app import App

log = structlog.get_logger("ctsd.bus")

HARD_MAX_FRAME_BYTES = 2 * protocol.MAX_FRAME_BYTES
# CONTRACT §4: keepalive pings every 20 s; a client that does not answer within as long again
# is dropped. CTSD_BUS_PING_S shortens both for tests.
PING_INTERVAL_S = float(os.environ.get("CTSD_BUS_PING_S") or 20.0)
PING_TIMEOUT_S = PING_INTERVAL_S
CLOSE_TIMEOUT_S = 3.0  # shutdown must fit in the contract's 5 s
SHUTDOWN_DRAIN_S = 1.0  # in-flight commands get this long to answer before clients are closed
SHUTDOWN_CLOSE_S = 1.5  # then closing handshakes get this long; the rest are aborted
BUS_PATH = "/ws"


class Server:
    def __init__(self, app: App) -> None:
        self.app = app
        self.ws: WsServer | None = None
        self.hub = Hub(app.store)
        self.sessions: set[Session] = set()
        self.errors: collections.Counter[str] = collections.Counter()
        rate = lambda: app.store.settings.server.rate_limit  # noqa: E731 - read live
        self.limiter = Limiter(rate)  # per bus connection
        self.http_limiter = Limiter(rate)  # per remote address
        self.auth_failures = AuthFailures()
        self.routes = Routes(app, self)
        self.metrics = Metrics(app, self.stats)

    # --- shared helpers -------------------------------------------------------------------

    def count_error(self, code: str) -> None:
        self.errors[code] += 1

    def stats(self) -> dict[str, Any]:
        return {
            "clients": len(self.sessions),
            "subscribers": self.hub.count,
            "frames_sent": self.hub.frames_sent,
            "events_sent": self.hub.events_sent,
            "lagging_closed": self.hub.lagging_closed,
            "errors": dict(self.errors),
        }

    def origin_ok(self, request: Request) -> bool:
        """No Origin header (a script, the CLI) is allowed; a browser's must be listed."""
        origins = request.headers.get_all("Origin")
        if not origins:
            return True
        return len(origins) == 1 and origins[0] in self.app.store.settings.server.cors_origins

    @staticmethod
    def remote(conn: ServerConnection) -> str:
        return str(conn.remote_address[0]) if conn.remote_address else "?"

    def metrics_response(self) -> Response:
        return response(200, self.metrics.render(), CONTENT_TYPE)

    # --- websockets callbacks -------------------------------------------------------------

    async def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] != BUS_PATH:
            return await self.routes.handle(conn, request)
        if request.method != "GET":
            return error_response(405, "method_not_allowed", "the bus upgrades from GET /ws")
        if "websocket" not in request.headers.get("Upgrade", "").lower():
            # A plain GET (a browser, curl): a JSON error as on every route, not websockets'
            # text/plain 426.
            self.count_error("invalid_format")
            return error_response(
                400, "invalid_format", "/ws is the websocket bus: connect with a websocket client"
            )
        if not self.origin_ok(request):
            # Refused before the upgrade: a web page must not reach the bus from a browser.
            self.count_error("forbidden")
            log.warning("origin_refused", origin=request.headers.get("Origin"))
            return error_response(403, "forbidden", "origin not allowed")
        # A header token from a blocked address is checked only when admitted (once a
        # second); a client with none may still authenticate with an `auth` message.
        presented = header_token(request.headers, self.app.token) is not None
        if presented and not self.auth_failures.admit(self.remote(conn)):
            self.count_error("rate_limited")
            return error_response(429, "rate_limited", TOO_MANY_FAILURES)
        return None

    async def handler(self, conn: ServerConnection) -> None:
        await Session(self, conn).run()

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight commands answer, tell subscribers, close with 1001."""
        if self.ws is None:
            return
        self.ws.server.close()  # no new TCP connections from here on
        pending = [t for s in self.sessions for t in s.inflight]
        if pending:
            await asyncio.wait(pending, timeout=SHUTDOWN_DRAIN_S)
        self.hub.notice({"type": "notice", "notice": "shutting_down"})
        self.ws.close(close_connections=True)  # 1001 going away
        try:
            # app.py gives shutdown 4 s in all and still has to finish the store's writes.
            async with asyncio.timeout(SHUTDOWN_CLOSE_S):
                await self.ws.wait_closed()
        except TimeoutError:
            # A client that reads nothing cannot complete the closing handshake.
            for conn in list(self.ws.connections):
                conn.transport.abort()
        self.hub.close()


async def start(app: App) -> Server:
    server = Server(app)
    server.ws = await serve(
        server.handler,
        app.listen.host,
        app.listen.port,
        process_request=server.process_request,
        compression=None,
        max_size=HARD_MAX_FRAME_BYTES,
        ping_interval=PING_INTERVAL_S,
        ping_timeout=PING_TIMEOUT_S,
        close_timeout=CLOSE_TIMEOUT_S,
        server_header=None,
    )
    server.hub.start()
    return server
