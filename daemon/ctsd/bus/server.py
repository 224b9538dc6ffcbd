"""The bus endpoint (`/ws`): admission before the upgrade, then one `Session` per connection.

The HTTP server (`ctsd.web.server`) hands every websocket request here as ASGI. Frames over
1 MiB are answered `too_large` and closed with 1009; frames over `HARD_MAX_FRAME_BYTES` are
not even read (the websocket protocol closes them with 1009 itself).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import TYPE_CHECKING, Any

import structlog

from ctsd.bus import protocol
from ctsd.bus.fanout import Hub
from ctsd.bus.outbox import TRUST, WIRE, Outbox
from ctsd.bus.ratelimit import Limiter
from ctsd.bus.session import CLOSE_GOING_AWAY, Closed, Session
from ctsd.errors import CtsdError
from ctsd.guard import Guard

if TYPE_CHECKING:
    from ctsd.services import Services

log = structlog.get_logger("ctsd.bus")

HARD_MAX_FRAME_BYTES = 2 * protocol.MAX_FRAME_BYTES
SHUTDOWN_DRAIN_S = 1.0  # in-flight commands get this long to answer before clients are closed
SHUTDOWN_CLOSE_S = 1.5  # then closing handshakes get this long; the rest are dropped
BUS_PATH = "/ws"

STATUS_OF_REFUSAL = {"forbidden": 403, "io_error": 503}
EVICTED_LOG_EVERY_S = 60.0


class Bus:
    def __init__(self, svc: Services, guard: Guard) -> None:
        self.svc = svc
        self.guard = guard
        self.hub = Hub(svc.store)
        self.sessions: set[Session] = set()  # authenticated
        self.connected: set[Session] = set()  # every accepted one (closed with 1001 at a stop)
        # Connections waiting to send their `auth` frame, oldest first: at the cap the oldest
        # makes room for the newest. Refusing the newest instead would let one local process
        # holding the cap lock every frame-authenticating client (a browser) out.
        self.waiting: dict[Session, None] = {}
        self.evicted = 0  # since the last log line about it
        self.evicted_logged_at = -EVICTED_LOG_EVERY_S
        self.errors: collections.Counter[str] = collections.Counter()
        self.frames_sent_closed = 0  # by connections already gone
        self.limiter = Limiter(lambda: svc.store.settings.server.rate_limit)  # read live
        self.accepting = True

    def start(self) -> None:
        self.hub.start()

    def count_error(self, code: str) -> None:
        self.errors[code] += 1

    def stats(self) -> dict[str, Any]:
        return {
            "clients": len(self.sessions),
            "subscribers": self.hub.count,
            "frames_sent": self.frames_sent_closed + sum(s.outbox.sent for s in self.sessions),
            "events_sent": self.hub.events_sent,
            "lagging_closed": self.hub.lagging_closed,
            "errors": dict(self.errors),
        }

    # --- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        headers = scope["headers"]
        client = scope.get("client")
        addr = str(client[0]) if client else "?"
        server = self.svc.store.settings.server
        try:
            if scope["path"] != BUS_PATH:
                raise CtsdError(
                    "not_found", f"no websocket endpoint {scope['path']}; use {BUS_PATH}"
                )
            self.guard.check_host(headers)
            self.guard.check_origin(headers, server)
            if not self.accepting:
                raise CtsdError("io_error", "the daemon is shutting down")
            header = self.guard.token_state(headers)
            exempt = header is None and self.guard.loopback_exempt(client, headers, server)
        except CtsdError as e:
            self.count_error(e.code)
            if e.code == "forbidden":
                self.guard.bus_refused.note(e.message, remote=addr, reason=e.message)
            await _deny(send, STATUS_OF_REFUSAL.get(e.code, 404), e, self.svc.store.revision)
            return
        wire = scope["extensions"][WIRE]
        trust = scope["extensions"][TRUST]
        if header or exempt:
            trust()  # not closed to make room while its accept and auth_ok go out
        await send({"type": "websocket.accept"})

        async def close(code: int, reason: str) -> None:
            await send({"type": "websocket.close", "code": code, "reason": reason})

        session = Session(self, Outbox(wire, close, addr), receive, addr)
        session.tokenless = exempt  # (server.auth "loopback": what it may do, it does unproven)
        self.connected.add(session)
        if header is None and not exempt:
            self._wait(session, server.max_unauthenticated)
        try:
            try:
                ok = await session.authenticate(True if exempt else header, trust)
            finally:
                self.waiting.pop(session, None)
            if not ok:
                return
            if not self.accepting:  # authenticated after the stop began: closed like the rest
                await session.outbox.close(CLOSE_GOING_AWAY, "daemon stopping")
                return
            self.sessions.add(session)
            await session.serve()
        except Closed:
            pass
        finally:
            self.connected.discard(session)
            self.sessions.discard(session)
            # Exchange tests nobody waits for any more: never left queued behind the prober's
            # limit (a client that asks for hundreds and leaves, again and again, would hold
            # up every periodic test). A change is never cut: it answers from the store.
            for probe in session.probes:
                probe.cancel()
            self.hub.unsubscribe(session.outbox)
            session.outbox.stop()
            self.frames_sent_closed += session.outbox.sent
            self.limiter.forget(session)

    def _wait(self, session: Session, cap: int) -> None:
        """`session` waits for its `auth` frame; past the cap the longest waiting is closed."""
        while len(self.waiting) >= cap:
            oldest = next(iter(self.waiting))
            del self.waiting[oldest]
            if oldest.authenticated:
                continue  # its auth_ok is on its way: it waits no more
            oldest.evict()
            self.evicted += 1
            now = time.monotonic()
            if now - self.evicted_logged_at >= EVICTED_LOG_EVERY_S:
                log.warning(
                    "bus_waiting_evicted",
                    cap=cap,
                    evicted=self.evicted,
                    reason="too many connections waiting to authenticate: the oldest closed",
                )
                self.evicted_logged_at = now
                self.evicted = 0
        self.waiting[session] = None

    # --- shutdown -----------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Take no more commands (each is refused `io_error`, nothing done: safe to retry),
        let those in flight answer, tell subscribers, close everyone with 1001."""
        self.accepting = False
        deadline = time.monotonic() + SHUTDOWN_DRAIN_S
        while pending := [t for s in self.sessions for t in s.inflight]:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.wait(pending, timeout=left)
        # A change is answered from a callback: its reply may still wait in a slow client's
        # outbox, which the close below would drop.
        sending = [
            asyncio.ensure_future(s.outbox.drained()) for s in self.sessions if not s.outbox.idle
        ]
        if sending:
            _, late = await asyncio.wait(sending, timeout=max(0.0, deadline - time.monotonic()))
            for f in late:
                f.cancel()
        self.hub.notice({"type": "notice", "notice": "shutting_down"})
        closing = [
            asyncio.ensure_future(s.outbox.close(CLOSE_GOING_AWAY, "daemon stopping"))
            for s in list(self.connected)
        ]
        if closing:
            await asyncio.wait(closing, timeout=SHUTDOWN_CLOSE_S)
        self.hub.close()


async def _deny(send: Any, status: int, err: CtsdError, revision: int) -> None:
    """Refuse the upgrade with an HTTP response (the ASGI websocket denial extension), which
    carries `X-Revision` as every HTTP response does."""
    body = protocol.encode({"error": {"code": err.code, "message": err.message}})
    await send(
        {
            "type": "websocket.http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                (b"x-revision", str(revision).encode()),
            ],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body})
