"""The websockets server on one port: `/ws` for the bus, plain HTTP routes beside it.

Minimal for now: `/health` only. The bus issue builds the protocol here.
"""

from __future__ import annotations

import http
from typing import TYPE_CHECKING

import msgspec
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from ctsd.health import health

if TYPE_CHECKING:
    from ctsd.app import App


def json_response(status: int, body: object) -> Response:
    data = msgspec.json.encode(body)
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return Response(status, http.HTTPStatus(status).phrase, headers, data)


class Server:
    def __init__(self, app: App) -> None:
        self.app = app
        self.ws: WsServer | None = None

    def process_request(self, _conn: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] == "/health":
            return json_response(200, health(self.app))
        return json_response(404, {"error": {"code": "not_found", "message": "no such route"}})

    async def handler(self, conn: ServerConnection) -> None:
        await conn.close(1011, "bus not implemented")

    async def shutdown(self) -> None:
        if self.ws is not None:
            self.ws.close(close_connections=True)
            await self.ws.wait_closed()


async def start(app: App) -> Server:
    server = Server(app)
    server.ws = await serve(
        server.handler,
        app.listen.host,
        app.listen.port,
        process_request=server.process_request,
        compression=None,
    )
    return server
