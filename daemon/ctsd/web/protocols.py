"""uvicorn's HTTP and websocket protocols, with what a daemon among hostile neighbours needs.

uvicorn takes protocol classes as configuration (`Config(http=..., ws=...)`); these subclass
its httptools and websockets-sansio protocols:

- HTTP: a cap on open connections (beyond it a connection gets a 503 and is closed at once,
  before it can hold a descriptor), a deadline for a request's headers (uvicorn arms no timer
  until a first response, so an idle or trickling socket would be held forever), and bounds
  on the request line and headers.
- Websocket: the bus's `Wire` (an ASGI extension in the scope) that the bus uses to write
  frames it framed once for every subscriber, to see whether a client keeps up, and to drop
  one that does not (ASGI has no way to abort a connection whose peer stopped reading).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

from ctsd.bus.outbox import WIRE

_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)
_BUSY_BODY = b'{"error":{"code":"io_error","message":"too many connections; try again shortly"}}'


class HeadersTooLarge(Exception):
    """Raised from a parser callback: httptools turns it into a 400 and a close."""


@dataclass
class ConnectionLimits:
    """Read by every protocol instance as it needs them (settings change while running)."""

    max_connections: Callable[[], int] = lambda: 1024
    header_timeout_s: float = 10.0
    max_url_bytes: int = 8 * 1024
    max_header_bytes: int = 64 * 1024
    refused: int = 0  # connections refused by the cap (metrics)


class SocketWire:
    """The bus's `Wire` over one uvicorn websocket protocol (see the module note)."""

    __slots__ = ("_p",)

    def __init__(self, protocol: WebSocketsSansIOProtocol) -> None:
        self._p = protocol

    @property
    def open(self) -> bool:
        p = self._p
        return p.conn.state is State.OPEN and not p.close_sent and not p.transport.is_closing()

    @property
    def writable(self) -> asyncio.Event:
        """Set while the transport's buffer is below its high-water mark."""
        return self._p.writable

    def write(self, framed: bytes) -> bool:
        """Write an already framed server frame now if the client keeps up; False if not.

        Server frames are unmasked and uncompressed here, so the bytes are the same for every
        client, and the protocol flushes its own output after every operation, so nothing of
        its own waits to go out before them.
        """
        if not self._p.writable.is_set() or not self.open:
            return False
        self._p.transport.write(framed)
        return True

    def abort(self) -> None:
        """Drop the connection now (its peer stopped reading: a close frame cannot reach it)."""
        self._p.transport.abort()


def protocol_classes(limits: ConnectionLimits) -> tuple[type[Any], type[Any]]:
    """The (http, ws) protocol classes for one server, bound to its limits."""

    class GuardedHttp(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _header_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections():
                limits.refused += 1
                transport.write(_BUSY % (len(_BUSY_BODY), _BUSY_BODY))
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(limits.header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._header_bytes = 0
            if self._deadline is None:
                self._arm()  # a next request on a kept-alive connection gets its own deadline

        def on_url(self, url: bytes) -> None:
            self._header_bytes += len(url)
            if self._header_bytes > limits.max_url_bytes:
                raise HeadersTooLarge("request line too long")
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_bytes += len(name) + len(value)
            if self._header_bytes > limits.max_header_bytes:
                raise HeadersTooLarge("headers too large")
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    class WiredWebSocket(WebSocketsSansIOProtocol):
        def handle_connect(self, event: Any) -> None:
            super().handle_connect(event)
            scope = getattr(self, "scope", None)
            if scope is not None:  # None when the handshake itself was refused
                scope["extensions"][WIRE] = SocketWire(self)

    return GuardedHttp, WiredWebSocket
