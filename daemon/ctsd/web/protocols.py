"""uvicorn's HTTP and websocket protocols, with what a daemon among hostile neighbours needs.

uvicorn takes protocol classes as configuration (`Config(http=..., ws=...)`); these subclass
its httptools and websockets-sansio protocols:

- Both: a cap on open connections. At the cap the oldest connection that has not shown a
  right token (an HTTP request that passed the token check, a bus session that
  authenticated) is closed to make room, so idle or unauthenticated sockets never keep a
  client with the token out; only when every open connection has shown one is the newest
  answered 503 and closed at once, before it can hold a descriptor.
- HTTP: a deadline for a request's headers and one for its body
  (uvicorn arms no timer until a first response, nor while a body trickles in, so an idle
  or trickling socket would be held forever, and enough of them would lock every new
  client out), bounds
  on the request line and headers, and a JSON error (not uvicorn's plain text) for a request
  the parser refuses.
- Websocket: the bus's `Wire` (an ASGI extension in the scope) that the bus uses to write
  frames it framed once for every subscriber, to see whether a client keeps up, to drop
  one that does not (ASGI has no way to abort a connection whose peer stopped reading), and
  to take a frame as it is read (`fast`: ASGI has no synchronous receive); and the answers
  to frames read together sent in one socket write (`CoalescingTransport`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import http
import json
import logging
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.protocol import State

from ctsd.bus.outbox import TRUST, WIRE
from ctsd.bus.protocol import MAX_FRAME_BYTES, encode_fail
from ctsd.bus.session import CLOSE_TOO_BIG, CLOSE_TRY_AGAIN
from ctsd.errors import CtsdError
from ctsd.guard import SummaryLog

log = structlog.get_logger("ctsd.web")

_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncache-control: no-store\r\nx-revision: %d\r\n"
    b"content-length: %d\r\n\r\n%s"
)
_BUSY_BODY = b'{"error":{"code":"io_error","message":"too many connections; try again shortly"}}'
_BAD = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"cache-control: no-store\r\nx-revision: %d\r\n"
)
# The answer to a frame the websocket protocol refused unread (past `ws_max_size`).
_FRAME_TOO_LARGE = encode_fail(
    None, CtsdError("too_large", f"frame larger than {MAX_FRAME_BYTES} bytes, the limit")
)
_PONG = b"\x8a"  # the first byte of a server's pong frame (FIN, opcode 0xA)
CLOSE_BEHIND_S = 60.0  # a cut subscriber's backlog and close, read out, or the socket closed
_NOT_UTF8 = SummaryLog("bus_frame_not_utf8")  # (closed 1007; a line per peer a minute)
_MALFORMED = "malformed HTTP request (its request line, headers or body framing)"
# Requests the HTTP parser refused (a TLS hello on the plain port, a scan), by why: uvicorn's
# own warning for each, which names neither peer nor reason, is left out (`quiet_uvicorn`).
_REFUSED = SummaryLog("http_malformed")
_UVICORN_PER_REQUEST = frozenset({"Invalid HTTP request received.", "Unsupported upgrade request."})


class _PerRequestWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Unsupported upgrade request.":
            _REFUSED.note(record.msg, reason="an upgrade to another protocol than websocket")
        return record.msg not in _UVICORN_PER_REQUEST


def quiet_uvicorn(logger: logging.Logger) -> None:
    """uvicorn's warning of every refused request, one line each: a client or a scan in a
    loop would flood the log. They are summarised in `http_malformed` lines instead."""
    if not any(isinstance(f, _PerRequestWarnings) for f in logger.filters):
        logger.addFilter(_PerRequestWarnings())


class HeadersTooLarge(Exception):
    """Raised from a parser callback: httptools turns it into a 400 and a close."""


@dataclass
class ConnectionLimits:
    """Read by every protocol instance as it needs them (settings change while running)."""

    max_connections: Callable[[], int] = lambda: 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0  # from the end of the headers to the end of the body
    max_url_bytes: int = 8 * 1024
    max_header_bytes: int = 64 * 1024
    write_stall_s: float = 30.0  # a buffer over its high-water mark not drained for this long
    refused: int = 0  # connections refused by the cap (metrics)
    evicted: int = 0  # connections closed to make room for a newer one (metrics)
    # Connections that have not shown a right token, oldest first: who makes room at the cap.
    unproven: dict[Any, None] = field(default_factory=dict)
    revision: Callable[[], int] = lambda: 0  # the X-Revision every answer carries


# Beyond this many bytes waiting, a write goes out at once: the transport's own high-water
# mark (and so the bus's test of whether a client keeps up) then sees it without delay.
COALESCE_MAX_BYTES = 64 * 1024


class CoalescingTransport:
    """A transport that sends the answers to frames read together in one socket write.

    A client that pipelines commands gets its frames read in one go; without this every
    reply is its own `send()` system call, which dominates the cost of a small command such
    as a heartbeat. So a write waits while the connection still has frames read but not yet
    taken by the app (`backlog`), and goes out with the answer to the last of them (or at the
    end of the event-loop turn at the latest). A write with nothing read ahead goes out at
    once, as before. Neither uvicorn nor asyncio offers write coalescing (asyncio and uvloop
    send at once when their buffer is empty), hence this wrapper. Every write of the protocol
    goes through it too, so frames never overtake one another (a close frame never goes out
    before the replies queued ahead of it).
    """

    __slots__ = ("_backlog", "_loop", "_pending", "_size", "_t")

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        backlog: Callable[[], int],
    ) -> None:
        self._t = transport
        self._loop = loop
        self._backlog = backlog
        self._pending: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        if not self._pending and not self._backlog():
            self._t.write(data)
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)
        self._size += len(data)
        if self._size > COALESCE_MAX_BYTES or not self._backlog():
            self.flush()

    def writelines(self, chunks: Any) -> None:
        for data in chunks:
            self.write(data)

    def flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self._size = 0
        if not self._t.is_closing():
            self._t.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def get_write_buffer_size(self) -> int:
        return self._t.get_write_buffer_size() + self._size

    def is_closing(self) -> bool:  # on every write of a fan-out: not through __getattr__
        return self._t.is_closing()

    def close(self) -> None:
        self.flush()
        self._t.close()

    def abort(self) -> None:
        self._pending = []
        self._size = 0
        self._t.abort()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's own
        return getattr(self._t, name)


class SocketWire:
    """The bus's `Wire` over one uvicorn websocket protocol (see the module note)."""

    __slots__ = ("_p", "fast")

    def __init__(self, protocol: WebSocketsSansIOProtocol) -> None:
        self._p = protocol
        self.fast: Callable[[str], bool] | None = None

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

    def close_behind(self, code: int, reason: str, before: list[bytes]) -> None:
        """Close with `code` now, behind what the transport holds: ASGI's close waits until
        that drained, so a peer that had stopped reading got no close frame at all, only an
        abort (1006) once the wait gave up, and a subscriber cut for falling behind could not
        tell it may resume (4008). It reads its backlog, then the close; one that never reads
        is dropped by the write-stall check. Mirrors uvicorn's close, without the wait: the
        connection is read on (what comes is dropped) until the peer's close answers ours, as
        a socket closed with unread bytes in it is reset, its backlog and our close lost
        (a lagging peer's keepalive ping would do), or until CLOSE_BEHIND_S. `before`: frames
        (framed) to send ahead of the close."""
        p = self._p
        if not self.open:
            return
        p.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        p.conn.send_close(code, reason)
        p.transport.write(b"".join([*before, *p.conn.data_to_send()]))
        p.transport.flush()  # (not held back for frames read ahead)
        p.close_sent = True
        if p.read_paused:
            p.read_paused = False
            p.transport.resume_reading()
        p.close_timer = p.loop.call_later(CLOSE_BEHIND_S, p.transport.close)
        p.watch_writes()


def _as_json_refusal(response: Response, revision: int) -> Response:
    """A handshake websockets refuses (no Sec-WebSocket-Key, another version), answered as
    every other refusal is: a JSON error with X-Revision, not websockets' plain text."""
    message = response.body.decode("utf-8", "replace").strip()
    body = json.dumps({"error": {"code": "invalid", "message": message}}).encode()
    headers = Headers(
        (k, v)
        for k, v in response.headers.raw_items()
        if k.lower() not in ("content-type", "content-length")
    )
    headers["Content-Type"] = "application/json"
    headers["Content-Length"] = str(len(body))
    headers["Cache-Control"] = "no-store"
    headers["X-Revision"] = str(revision)
    return dataclasses.replace(response, headers=headers, body=body)


_TOO_LARGE = {414: "its request line is too long", 431: "its headers are too large"}


def _refusal_bytes(status: int, revision: int) -> bytes:
    """A refused handshake the parser could not read, whole (status line to body)."""
    why = _TOO_LARGE.get(status, "the request does not parse")
    body = json.dumps(
        {"error": {"code": "invalid", "message": f"not a websocket handshake: {why}"}}
    ).encode()
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        status, reason = 400, "Bad Request"
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\ncache-control: no-store\r\n"
        f"x-revision: {revision}\r\n\r\n"
    ).encode() + body


def _unsent(transport: Any) -> int:
    """Bytes not yet taken by the peer: the transport's buffer and the socket's send queue.
    The buffer alone shows no progress while a slow reader empties a send queue of megabytes
    (the loop refills it only once a third of it is free)."""
    unsent = int(transport.get_write_buffer_size())
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            unsent += struct.unpack("i", queued)[0]
    return unsent


def protocol_classes(limits: ConnectionLimits) -> tuple[type[Any], type[Any]]:
    """The (http, ws) protocol classes for one server, bound to its limits."""

    class WriteStall:
        """A peer that stops reading (answers pipelined, a snapshot asked for, and never
        read): from the moment its buffer is over the high-water mark, or a close waits for
        the buffer to go out (uvicorn's keep-alive, ping and our deadlines only close, and a
        close waits for ever on a peer that reads nothing), the buffer is looked at every
        `write_stall_s`: a peer that read nothing of it since the last look is dropped. Else
        the socket and its slot under the connection cap were held until the daemon
        stopped. A slow peer that reads is never dropped. (A mixin of both protocols, before
        their uvicorn base.)"""

        loop: asyncio.AbstractEventLoop
        transport: Any
        _stall: asyncio.TimerHandle | None = None
        _unsent = 0  # the buffer at the last look
        _drained = False  # resume_writing since the last look

        def watch_writes(self) -> None:
            if self._stall is None and self.transport.get_write_buffer_size():
                self._unsent = _unsent(self.transport)
                self._drained = False
                self._stall = self.loop.call_later(limits.write_stall_s, self._look)

        def pause_writing(self) -> None:
            super().pause_writing()  # type: ignore[misc]
            self.watch_writes()

        def resume_writing(self) -> None:
            super().resume_writing()  # type: ignore[misc]
            self._drained = True

        def _look(self) -> None:
            self._stall = None
            if not self.transport.get_write_buffer_size():
                return
            unsent = _unsent(self.transport)
            if self._drained or unsent < self._unsent:  # it reads: look again later
                self.watch_writes()
                return
            peer = self.transport.get_extra_info("peername")
            log.warning(
                "connection_dropped",
                reason=f"it read nothing of its answers for {limits.write_stall_s:g} s",
                peer=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer),
                unsent_bytes=unsent,
            )
            self.transport.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None
            super().connection_lost(exc)  # type: ignore[misc]

    class Admitted:
        """Its place under the connection cap (a mixin of both protocols, before their base)."""

        def admit(self) -> None:
            limits.unproven[self] = None

        def trust(self) -> None:
            limits.unproven.pop(self, None)

        def make_room(self) -> bool:
            """At the cap: close the oldest connection that has not shown a right token, at
            once (it leaves `connections` within the loop's turn: the count stays at the cap).
            False when every open one has."""
            for victim in limits.unproven:  # oldest first
                del limits.unproven[victim]
                limits.evicted += 1
                victim.evict()
                return True
            return False

        def evict(self) -> None:
            raise NotImplementedError

        def close_now(self) -> None:
            """Closed with what was just written if that went out whole, else dropped: a
            victim must free its slot now, not once a peer that reads nothing drains it."""
            if self.transport.get_write_buffer_size():  # type: ignore[attr-defined]
                self.transport.abort()  # type: ignore[attr-defined]
            else:
                self.transport.close()  # type: ignore[attr-defined]

        def connection_lost(self, exc: Exception | None) -> None:
            self.trust()
            super().connection_lost(exc)  # type: ignore[misc]

    class GuardedHttp(Admitted, WriteStall, HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _header_bytes = 0
        _refusal: str | None = None  # why the parser stopped, when a bound stopped it
        _running: Any = None  # the request being answered (with pipelining, not the last read)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections() and not self.make_room():
                limits.refused += 1
                transport.write(_BUSY % (limits.revision(), len(_BUSY_BODY), _BUSY_BODY))
                transport.close()
                return
            self.admit()
            self._arm()

        def evict(self) -> None:
            """Made room for a newer connection: one that never had an answer is told why
            (503); an idle kept-alive one just closes, as a keep-alive timeout would close it;
            one with a request under way, or already on its way out, is dropped."""
            cycle = self.cycle
            idle = cycle is None or cycle.response_complete
            if not idle or self.transport.is_closing() or self.transport.get_write_buffer_size():
                self.transport.abort()
                return
            if cycle is None:
                self.transport.write(_BUSY % (limits.revision(), len(_BUSY_BODY), _BUSY_BODY))
            self.close_now()

        def _arm(self, timeout_s: float | None = None) -> None:
            self._disarm()
            wait = limits.header_timeout_s if timeout_s is None else timeout_s
            self._deadline = self.loop.call_later(wait, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()
                self.watch_writes()

        def timeout_keep_alive_handler(self) -> None:
            super().timeout_keep_alive_handler()
            if self.transport.is_closing():
                self.watch_writes()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope["extensions"] = {TRUST: self.trust}
            self._header_bytes = 0
            if self._deadline is None:
                self._arm()  # a next request on a kept-alive connection gets its own deadline

        def on_url(self, url: bytes) -> None:
            self._header_bytes += len(url)
            if self._header_bytes > limits.max_url_bytes:
                self._refusal = f"request line longer than {limits.max_url_bytes} bytes"
                raise HeadersTooLarge(self._refusal)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_bytes += len(name) + len(value)
            if self._header_bytes > limits.max_header_bytes:
                self._refusal = f"headers larger than {limits.max_header_bytes} bytes"
                raise HeadersTooLarge(self._refusal)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()
            if not (self.parser.should_upgrade() and self._should_upgrade()):
                # Until the body's end (at once when it has none): even after an answer sent
                # without reading it (a 401), the rest of it is still read off the socket.
                self._arm(limits.body_timeout_s)

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def handle_websocket_upgrade(self) -> None:
            self.trust()  # the websocket protocol takes its place
            super().handle_websocket_upgrade()

        def send_400_response(self, msg: str) -> None:
            """A request the parser refused (uvicorn answers it in plain text): the error
            every route documents, then the connection closes."""
            reason = self._refusal or _MALFORMED
            peer = self.client[0] if self.client else "?"
            _REFUSED.note(reason, reason=reason, remote=peer)  # (a few reasons: few keys)
            error = {"code": "invalid", "message": reason}
            body = json.dumps({"error": error}).encode()
            head = [
                _BAD % limits.revision(),
                *(b"%s: %s\r\n" % h for h in self.server_state.default_headers),
            ]
            self.transport.write(b"".join([*head, b"content-length: %d\r\n\r\n" % len(body), body]))
            self.transport.close()

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            self._running = cycle
            super()._start_asgi_task(cycle, app)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            # uvicorn marks only the request parsed last as disconnected: with requests
            # pipelined, the one answering is an earlier one, and its next write (once the
            # drop let it resume) raised on the closed transport, logged as a crash.
            running = self._running
            if running is not None and not running.response_complete:
                running.disconnected = True
            super().connection_lost(exc)
            # uvicorn cancels its keep-alive timer only on a clean close: a client's reset
            # left the timer holding the connection (some 8 KB) until it fired.
            self._unset_keepalive_if_required()

    class WiredWebSocket(Admitted, WriteStall, WebSocketsSansIOProtocol):
        wire: SocketWire | None = None
        _owed_pong: bytes | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            accept = self.conn.accept

            def accept_or_refuse(request: Request) -> Response:
                response = accept(request)
                if response.status_code == 101:
                    response.headers["X-Revision"] = str(limits.revision())  # as every answer
                    return response
                return _as_json_refusal(response, limits.revision())

            self.conn.accept = accept_or_refuse  # type: ignore[method-assign]
            fail = self.conn.fail

            def fail_saying_why(code: int, reason: str = "") -> None:
                # A frame over the hard limit is refused by the protocol unread: its client is
                # told `too_large` first, as for one under that limit, then the 1009 close.
                if code == CLOSE_TOO_BIG and self.conn.state is State.OPEN:
                    self.conn.send_text(_FRAME_TOO_LARGE)
                fail(code, reason)

            self.conn.fail = fail_saying_why  # type: ignore[method-assign]

        def handle_handshake_exception(self) -> None:
            """A handshake websockets' parser refused (a header line over 8 KiB, a big
            Cookie say, or over 128 headers): its 414/431, or uvicorn's 400, as the JSON
            error every refusal is, with X-Revision, not plain text."""
            self.handshake_complete = True
            self.close_sent = True
            queued = b"".join(self.conn.data_to_send())
            status = 400
            if queued.startswith(b"HTTP/1.1 ") and queued[9:12].isdigit():
                status = int(queued[9:12])
            self.transport.write(_refusal_bytes(status, limits.revision()))
            self.transport.close()

        def handle_ping(self) -> None:
            """A ping is answered only while the peer reads what it is sent: a client flooding
            pings and reading nothing grew the buffer of pongs without bound until the write
            stall dropped it. RFC 6455 (5.5.3) lets a pong answer only the latest ping; these
            go unanswered while the buffer is over its high-water mark, but for the latest,
            answered when the peer has read it down. What else the protocol queued (the echo
            of a close read in the same chunk) still goes out."""
            if self.writable.is_set():
                super().handle_ping()
                return
            rest = []
            for chunk in self.conn.data_to_send():
                if chunk[:1] == _PONG:
                    self._owed_pong = chunk  # the latest: sent once the peer reads again
                else:
                    rest.append(chunk)
            if rest:
                self.transport.write(b"".join(rest))

        def resume_writing(self) -> None:
            super().resume_writing()
            owed, self._owed_pong = self._owed_pong, None
            if owed is not None and self.conn.state is State.OPEN and not self.close_sent:
                self.transport.write(owed)

        def keepalive_timeout(self) -> None:
            super().keepalive_timeout()
            if self.transport.is_closing():
                self.watch_writes()

        def connection_made(self, transport: Any) -> None:
            backlog = self.queue.qsize  # frames read that the app has not taken yet
            super().connection_made(CoalescingTransport(transport, self.loop, backlog))
            self.admit()  # until its bus session authenticates

        def evict(self) -> None:
            """Made room for a newer connection: told to connect again (1013), then closed;
            dropped when it cannot be told (not yet accepted, closing, not reading)."""
            t = self.transport
            if (
                self.conn.state is not State.OPEN
                or self.close_sent
                or t.is_closing()
                or t.get_write_buffer_size()
            ):
                t.abort()
                return
            self.conn.send_close(CLOSE_TRY_AGAIN, "too many connections; connect again shortly")
            t.write(b"".join(self.conn.data_to_send()))
            t.flush()  # (not held back for frames read ahead: it goes now or never)
            self.close_sent = True
            self.close_now()

        def handle_connect(self, event: Any) -> None:
            super().handle_connect(event)
            scope = getattr(self, "scope", None)
            if scope is not None:  # None when the handshake itself was refused
                self.wire = scope["extensions"][WIRE] = SocketWire(self)
                scope["extensions"][TRUST] = self.trust

        def send_receive_event_to_app(self) -> None:
            # A frame the bus can take at once skips the ASGI queue and the task switch
            # (ASGI has no synchronous receive); anything else goes the ASGI way, in order.
            # Text is decoded here, once, for both: uvicorn's own path logged each frame
            # that is not UTF-8 as an error with a traceback, which any peer, token or not,
            # could repeat. Past the decode, what it does for text, as it does it.
            if self.curr_msg_data_type != "text" or self.close_sent:
                super().send_receive_event_to_app()
                return
            single = len(self.frames) == 1
            data = self.frames[0] if single else b"".join(self.frames)
            self.frames = []
            try:
                text = data.decode()
            except UnicodeDecodeError:
                peer = self.client[0] if self.client else "?"
                _NOT_UTF8.note(peer, remote=peer)
                self.conn.send_close(1007, "a text frame that is not UTF-8")
                self.handle_parser_exception()
                return
            wire = self.wire
            fast = wire.fast if wire is not None else None
            if fast is not None and single and self.queue.empty() and fast(text):
                return
            self.queue.put_nowait({"type": "websocket.receive", "text": text})
            if not self.read_paused:
                self.read_paused = True
                self.transport.pause_reading()

    return GuardedHttp, WiredWebSocket
