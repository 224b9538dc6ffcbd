"""One bus connection: authentication, then the command loop (CONTRACT §4)."""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from ctsd.bus import protocol as p
from ctsd.bus.commands import HANDLERS, PROBES, WRITES
from ctsd.bus.fanout import Sub
from ctsd.errors import CtsdError

if TYPE_CHECKING:
    from ctsd.bus.server import Server

log = structlog.get_logger("ctsd.bus")

AUTH_TIMEOUT_S = 10.0
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
MAX_INFLIGHT = 256  # pipelined changes per client before we stop reading its frames
EXEMPT = frozenset({"connections.heartbeat"})  # CONTRACT §2: heartbeats are not rate limited
TOO_MANY_FAILURES = "too many failed attempts; try again later"
RATE_LIMITED = CtsdError("rate_limited", "too many requests; slow down and retry")

_decoder = msgspec.json.Decoder()


def token_ok(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def bearer(headers: Headers) -> str | None:
    """The token of an `Authorization: Bearer` header, '' for a malformed one, else None."""
    values = headers.get_all("Authorization")
    if not values:
        return None
    scheme, _, token = values[0].partition(" ")
    return token.strip() if scheme.lower() == "bearer" and len(values) == 1 else ""


def header_token(headers: Headers, expected: str) -> bool | None:
    """The Authorization header against the token: None when there is none, True when it
    holds the right token, False for a wrong or malformed one (the only counted failure)."""
    given = bearer(headers)
    if given is None:
        return None
    return bool(given) and token_ok(given, expected)


class Session:
    def __init__(self, server: Server, conn: ServerConnection) -> None:
        self.server = server
        self.app = server.app
        self.conn = conn
        self.addr = str(conn.remote_address[0]) if conn.remote_address else "?"
        self.last_id: int | None = None
        self.inflight: set[asyncio.Task[None]] = set()  # changes in flight
        self.probes: set[asyncio.Task[None]] = set()  # exchange tests in flight
        self.pending_sub: Sub | None = None

    async def send(self, msg: Any) -> None:
        await self.send_bytes(p.encode(msg))

    async def send_bytes(self, data: bytes) -> None:
        conn = self.conn
        sub = self.server.hub.by_conn.get(conn)
        if sub is not None and not sub.held and (sub.queue or sub.replay):
            # Behind this client's own event backlog: a reply never overtakes the events of
            # the change it acknowledges.
            sub.push(data, time.monotonic())
            return
        if not conn.paused and conn.protocol.state is State.OPEN and conn.send_in_progress is None:
            # Fast path (as websockets.broadcast()): the client keeps up, write now; this skips
            # send()'s context manager, a measurable share of a heartbeat's cost.
            conn.protocol.send_text(data)
            conn.send_data()
            return
        await conn.send(data, text=True)  # waits while the client's buffer is full

    # --- auth -----------------------------------------------------------------------------

    async def _refuse(self, message: str) -> None:
        self.server.count_error("unauthorized")
        log.warning("auth_invalid", remote=self.addr, reason=message)
        await self.send(p.AuthInvalid(message=message))
        await self.conn.close(CLOSE_POLICY, "authentication failed")

    async def _wrong_token(self, message: str) -> None:
        """A token was presented and is wrong: the one kind of failure that is counted."""
        if self.server.auth_failures.wrong_token(self.addr):
            message = TOO_MANY_FAILURES
        await self._refuse(message)

    async def authenticate(self) -> bool:
        """Only a wrong token counts as a failed attempt (no token, a timeout or a malformed
        first frame do not); a blocked address gets a token checked only when admitted
        (a header token was admitted before the upgrade, in `Server.process_request`)."""
        assert self.conn.request is not None
        header = header_token(self.conn.request.headers, self.app.token)
        if header is not None:
            if header:
                await self.send(
                    p.AuthOk(version=p.PROTOCOL_VERSION, revision=self.app.store.revision)
                )
                return True
            await self._wrong_token("invalid token in the Authorization header")
            return False
        await self.send(p.AuthRequired(version=p.PROTOCOL_VERSION))
        try:
            async with asyncio.timeout(AUTH_TIMEOUT_S):
                raw = await self.conn.recv()
        except TimeoutError:
            await self._refuse(f"no auth message within {AUTH_TIMEOUT_S:g} s")
            return False
        try:
            frame = _decoder.decode(raw)
            ok = isinstance(frame, dict) and frame.get("type") == "auth"
            auth = p.parse_args(p.Auth, frame) if ok else None
        except (msgspec.DecodeError, CtsdError):
            auth = None
        if auth is None:
            await self._refuse('expected {"type": "auth", "token": TOKEN} first')
            return False
        if not self.server.auth_failures.admit(self.addr):
            await self._refuse(TOO_MANY_FAILURES)  # unchecked: right or wrong, not now
            return False
        if not token_ok(auth.token, self.app.token):
            await self._wrong_token("invalid token")
            return False
        await self.send(p.AuthOk(version=p.PROTOCOL_VERSION, revision=self.app.store.revision))
        return True

    # --- commands -------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if not await self.authenticate():
                return
            self.server.sessions.add(self)
            recv = self.conn.recv
            while True:
                # Bytes, not str: msgspec decodes (and checks UTF-8) without a str round trip.
                await self.on_frame(await recv(decode=False))
        except ConnectionClosed:
            pass
        finally:
            self.server.sessions.discard(self)
            self.server.hub.unsubscribe(self.conn)
            self.server.limiter.forget(self)

    async def on_frame(self, raw: bytes) -> None:
        size = len(raw)
        if size > p.MAX_FRAME_BYTES:
            err = CtsdError("too_large", f"frame of {size} bytes; the limit is {p.MAX_FRAME_BYTES}")
            await self.fail(None, err)
            await self.conn.close(CLOSE_TOO_BIG, "frame too large")
            return
        try:
            frame = _decoder.decode(raw)
        except msgspec.DecodeError as e:
            await self.refuse(None, CtsdError("invalid_format", f"not JSON: {e}"))
            return
        if not isinstance(frame, dict):
            await self.refuse(None, CtsdError("invalid_format", "a frame must be a JSON object"))
            return
        msg_id = frame.get("id")
        if not isinstance(msg_id, int) or isinstance(msg_id, bool):
            await self.refuse(
                None, CtsdError("invalid_format", "`id` must be an integer", path="$.id")
            )
            return
        if self.last_id is not None and msg_id <= self.last_id:
            await self.refuse(
                msg_id,
                CtsdError(
                    "id_reuse",
                    f"ids must strictly increase; the last one was {self.last_id}",
                    path="$.id",
                ),
            )
            return
        self.last_id = msg_id
        name = frame.get("type")
        kind = p.COMMANDS.get(name) if isinstance(name, str) else None
        if kind is None:
            await self.refuse(
                msg_id, CtsdError("unknown_command", f"unknown command {name!r}", path="$.type")
            )
            return
        if name not in EXEMPT and not self.server.limiter.allow(self):
            await self.fail(msg_id, RATE_LIMITED)
            return
        try:
            args = p.parse_args(kind, frame)
        except CtsdError as e:
            await self.fail(msg_id, e)
            return
        if name in WRITES or name in PROBES:
            if len(self.inflight) + len(self.probes) >= MAX_INFLIGHT:
                await asyncio.wait(self.inflight | self.probes, return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.get_running_loop().create_task(self.execute(msg_id, name, args))
            tasks = self.inflight if name in WRITES else self.probes
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            return
        if self.inflight:  # read-your-writes: this client's earlier changes answer first
            await asyncio.wait(self.inflight)
        await self.execute(msg_id, name, args)

    async def execute(self, msg_id: int, name: str, args: Any) -> None:
        try:
            try:
                result = await HANDLERS[name](self, args)
            except CtsdError as e:
                await self.fail(msg_id, e)
                return
            except Exception as e:
                log.exception("command_failed", command=name)
                await self.fail(msg_id, CtsdError("internal", f"{type(e).__name__}: {e}"))
                return
            try:
                await self.send(p.Ok(id=msg_id, result=result))
            finally:
                sub, self.pending_sub = self.pending_sub, None
                if sub is not None and not sub.closed:
                    sub.release()
        except ConnectionClosed:
            pass  # the client left; its change (if any) is durable all the same

    async def refuse(self, msg_id: int | None, err: CtsdError) -> None:
        """A frame refused before it named a command counts against the rate limit too: a
        flood of malformed frames must not be answered without limit."""
        await self.fail(msg_id, err if self.server.limiter.allow(self) else RATE_LIMITED)

    async def fail(self, msg_id: int | None, err: CtsdError) -> None:
        self.server.count_error(err.code)
        await self.send_bytes(p.encode_fail(msg_id, err))
