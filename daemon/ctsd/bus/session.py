"""One bus connection (ASGI websocket at `/ws`), once admitted: authentication, then commands.

Admission (`ctsd.bus.server.Bus`) happens before the upgrade is accepted: a foreign `Origin`
or a non-loopback `Host` gets 403 and a full server 503, as JSON. Then authentication here:
a right `Authorization` header
gets `auth_ok` at once; without one the client has `AUTH_TIMEOUT_S` to send
`{"type": "auth", "token": ...}`. Then one frame is one command; replies, events and notices
leave through the connection's `Outbox`, in order.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import structlog

from ctsd.bus import protocol as p
from ctsd.bus.commands import HANDLERS, PROBES, WRITE_OPS, WRITES, Call, Write
from ctsd.bus.fanout import Hub, Key
from ctsd.bus.outbox import MAX_QUEUE_BYTES, Outbox, wire_of
from ctsd.bus.ratelimit import Limiter
from ctsd.core import Request
from ctsd.errors import CtsdError
from ctsd.guard import Guard, token_ok
from ctsd.limits import MAX_MESSAGE_DEPTH

if TYPE_CHECKING:
    from ctsd.services import Services

log = structlog.get_logger("ctsd.bus")

AUTH_TIMEOUT_S = 10.0
CLOSE_TRY_AGAIN = 1013  # (RFC 6455: try again later)
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
MAX_ID = 2**53 - 1  # the largest integer every JSON client (JavaScript's numbers) holds exactly
CLOSE_GOING_AWAY = 1001
MAX_INFLIGHT = 256  # pipelined changes per client before we stop reading its frames
# A change frame larger than this (a document, whose answer is as large) waits until every
# change before it is answered and sent: however a client pipelines, the answers waiting for
# it stay within MAX_INFLIGHT small ones and one large one.
BIG_FRAME_BYTES = 64 * 1024
EXEMPT = frozenset({"connections.heartbeat"})  # heartbeats are never rate limited
RATE_LIMITED = CtsdError("rate_limited", "too many requests; slow down and retry")
STOPPING = CtsdError("io_error", "the daemon is stopping: nothing was done; retry once it is back")

_decoder = msgspec.json.Decoder()


def _frame_size(raw: str | bytes) -> int:
    return len(raw) if isinstance(raw, bytes) or raw.isascii() else len(raw.encode())


class Closed(Exception):
    """The client went away (or we closed it): stop serving this connection."""


class BusHost(Protocol):
    """What a session uses of the bus that serves it (`ctsd.bus.server.Bus`)."""

    svc: Services
    hub: Hub
    guard: Guard
    limiter: Limiter

    def count_error(self, code: str) -> None: ...


class Session:
    def __init__(self, bus: BusHost, outbox: Outbox, receive: Any, addr: str) -> None:
        self.bus = bus
        self.svc = bus.svc
        self.outbox = outbox
        self._receive = receive
        self.addr = addr
        self.last_id: int | None = None
        self.inflight: set[asyncio.Future[Any]] = set()  # changes in flight
        self.probes: set[asyncio.Task[None]] = set()  # exchange tests in flight
        self._replay: Iterator[bytes] | None = None  # queued right after a subscribe result
        self._busy = False  # `serve` is handling a frame (a frame read now must wait for it)
        self._idle = asyncio.Event()  # set while not `_busy`
        self._idle.set()
        self._evicted = False  # closed while waiting to authenticate (`evict`)
        self.authenticated = False  # its auth_ok is on its way: no longer one that waits
        self.tokenless = False  # let in without the token (server.auth "loopback")
        outbox.settle = self._settle  # (a cut answers the changes in flight first)

    # --- sending ----------------------------------------------------------------------------

    def push(self, msg: Any) -> None:
        self.outbox.push_reply(wire_of(p.encode(msg)))

    async def reply(self, msg: Any) -> None:
        """A reply; the client's replies pace how fast we read its frames."""
        self.push(msg)
        await self.outbox.drained()

    async def recv(self) -> str | bytes:
        msg = await self._receive()
        kind = msg["type"]
        if kind == "websocket.receive":
            text = msg.get("text")
            return text if text is not None else msg.get("bytes") or b""
        raise Closed(msg.get("code"))

    async def _settle(self) -> None:
        """Until every command under way is answered (the outbox is being cut): the changes
        in flight, and the command `serve` is carrying out (a read, a backup, a restore). A
        connection test is not waited for (asking again for one is harmless)."""
        while True:
            if self.inflight:
                await asyncio.wait(self.inflight)
            elif self._busy:
                await self._idle.wait()
            else:
                return

    # --- subscriptions ------------------------------------------------------------------------

    def subscribe(self, key: Key, since: int | None) -> None:
        self._replay = self.bus.hub.subscribe(self.outbox, key, since)

    def unsubscribe(self) -> bool:
        self._replay = None
        return self.bus.hub.unsubscribe(self.outbox)

    # --- auth -------------------------------------------------------------------------------

    async def _refuse(self, message: str) -> None:
        self.bus.count_error("unauthorized")
        # In summary (a line per address a minute at most): any local process can fail in a
        # loop, and a line each would push the real ones out of the rotated logs.
        self.bus.guard.auth_log.note(self.addr, remote=self.addr, where="bus", reason=message)
        self.push(p.AuthInvalid(message=message))
        await self.outbox.close(CLOSE_POLICY, "authentication failed")

    def evict(self) -> None:
        """Closed while waiting for its `auth` frame, to make room for a newer connection
        (the bus's cap on connections waiting to authenticate). Not `auth_invalid`: its token
        may be right; 1013 tells the client to connect again."""
        self._evicted = True
        self.outbox.close_soon(CLOSE_TRY_AGAIN, "too many connections waiting to authenticate")

    async def authenticate(self, header: bool | None, trusted: Callable[[], None]) -> bool:
        """`header`: the Authorization header's verdict (None when there was none);
        `trusted` is called once a right token is shown."""
        if header is not None:
            if header:
                await self.reply(
                    p.AuthOk(version=p.PROTOCOL_VERSION, revision=self.svc.store.revision)
                )
                return True
            await self._refuse("invalid token in the Authorization header")
            return False
        await self.reply(p.AuthRequired(version=p.PROTOCOL_VERSION))
        try:
            async with asyncio.timeout(AUTH_TIMEOUT_S):
                raw = await self.recv()
        except TimeoutError:
            if self._evicted:
                return False
            await self._refuse(f"no auth message within {AUTH_TIMEOUT_S:g} s")
            return False
        if self._evicted:  # (its auth frame came too late)
            return False
        if await self._too_large(_frame_size(raw)):  # the limit of every frame, and its code
            return False
        try:
            frame = _decoder.decode(raw)
            ok = isinstance(frame, dict) and frame.get("type") == "auth"
            auth = p.parse_args(p.Auth, frame) if ok else None  # type: ignore[arg-type]
        except (msgspec.DecodeError, RecursionError, CtsdError):
            auth = None
        if not isinstance(auth, p.Auth):
            await self._refuse('expected {"type": "auth", "token": TOKEN} first')
            return False
        if not token_ok(auth.token, self.svc.token):
            await self._refuse("invalid token")
            return False
        self.authenticated = True  # (never evicted while its auth_ok goes out)
        trusted()
        await self.reply(p.AuthOk(version=p.PROTOCOL_VERSION, revision=self.svc.store.revision))
        return True

    # --- commands -----------------------------------------------------------------------------

    async def serve(self) -> None:
        """Read and answer frames until the client leaves or we close."""
        wire = self.outbox.wire
        wire.fast = self.take_now
        try:
            while True:
                raw = await self.recv()
                self._busy = True
                self._idle.clear()
                try:
                    await self.on_frame(raw)
                finally:
                    self._busy = False
                    self._idle.set()
        finally:
            wire.fast = None

    def take_now(self, raw: str) -> bool:
        """A change frame taken as it is read, with no task switch (the connection calls
        this for each text frame it reads while nothing is queued for `serve`): True if it
        was. Only a well-formed change that need not wait qualifies; anything else is left,
        untouched, to `serve` (False). A pipelining client's changes mostly come this way."""
        if self.outbox.cutting:
            return True  # read after the cut: dropped, never carried out nor answered
        if self._busy or len(raw) > BIG_FRAME_BYTES or not raw.isascii():
            return False
        try:
            frame = _decoder.decode(raw)
        except (msgspec.DecodeError, RecursionError):
            return False
        if type(frame) is not dict:
            return False
        msg_id, name = frame.get("id"), frame.get("type")
        if (
            type(msg_id) is not int
            or abs(msg_id) > MAX_ID  # (refused by `serve`)
            or (self.last_id is not None and msg_id <= self.last_id)
            or not isinstance(name, str)
            or name not in WRITE_OPS
            or len(self.inflight) + len(self.probes) >= MAX_INFLIGHT
            or self._answers_wait()
        ):
            return False
        self.last_id = msg_id
        try:
            args = self._admit(msg_id, name, p.COMMANDS[name], frame)
            if args is not None:
                self._change(msg_id, name, args)
        except Exception as e:  # taken: it is answered here, never handed on a second time
            self._failed(msg_id, name, e)
        return True

    async def _too_large(self, size: int) -> bool:
        """A frame over the limit is answered `too_large` and the connection closed."""
        if size <= p.MAX_FRAME_BYTES:
            return False
        err = CtsdError("too_large", f"frame of {size} bytes; the limit is {p.MAX_FRAME_BYTES}")
        self.fail(None, err)
        await self.outbox.close(CLOSE_TOO_BIG, "frame too large")
        return True

    async def on_frame(self, raw: str | bytes) -> None:
        if self.outbox.cutting:
            return  # (as in `take_now`)
        size = _frame_size(raw)
        if await self._too_large(size):
            raise Closed(CLOSE_TOO_BIG)
        try:
            frame = _decoder.decode(raw)
        except msgspec.ValidationError as e:  # JSON, with a number no float holds (1e999)
            await self.refuse(_id_of(raw), CtsdError("invalid_format", str(e)))
            return
        except msgspec.DecodeError as e:
            await self.refuse(None, CtsdError("invalid_format", f"not JSON: {e}"))
            return
        except RecursionError:
            deep = f"frame JSON nested deeper than {MAX_MESSAGE_DEPTH} levels"
            await self.refuse(None, CtsdError("invalid_format", deep))
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
        if abs(msg_id) > MAX_ID:  # (a browser reads it rounded; and no later id could pass it)
            why = f"`id` must be an integer from -{MAX_ID} to {MAX_ID}"
            await self.refuse(None, CtsdError("invalid_format", why, path="$.id"))
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
        if not isinstance(name, str):
            why = "`type` must name a command (a string)"
            await self.refuse(msg_id, CtsdError("invalid_format", why, path="$.type"))
            return
        kind = p.COMMANDS.get(name)
        if kind is None:
            await self.refuse(
                msg_id, CtsdError("unknown_command", f"unknown command {name!r}", path="$.type")
            )
            return
        args = self._admit(msg_id, name, kind, frame)
        if args is None:  # refused (rate limited, say): paced like any other answer
            if self._answers_wait():
                await self.outbox.drained()
            return
        if name in WRITES or name in PROBES:
            if (size > BIG_FRAME_BYTES or name in PROBES) and self.inflight:
                # A test reads the record, as a read does: this client's changes go in first.
                await asyncio.wait(self.inflight)
            if len(self.inflight) + len(self.probes) >= MAX_INFLIGHT:
                await asyncio.wait(self.inflight | self.probes, return_when=asyncio.FIRST_COMPLETED)
            if self._answers_wait() or size > BIG_FRAME_BYTES:
                # Answered but not yet sent count against the cap too: a client that
                # pipelines without reading its replies is paced, not dropped for them.
                await self.outbox.drained()
            if not self.bus.accepting:  # the daemon began to stop while it waited
                self.fail(msg_id, STOPPING)
                return
            if self.outbox.cutting or self.outbox.sealed:  # closed while it waited: its
                return  # answer could not be sent, so it is not carried out
            self._change(msg_id, name, args)
            return
        if self.inflight:  # read-your-writes: this client's earlier changes answer first
            await asyncio.wait(self.inflight)
        if self.outbox.cutting or self.outbox.sealed:  # (as for a change, above)
            return
        await self.execute(msg_id, name, args)

    def _answers_wait(self) -> bool:
        """Do enough answers wait for this client to read that its next frame must wait?"""
        return self.outbox.qframes >= MAX_INFLIGHT or self.outbox.rbytes >= MAX_QUEUE_BYTES

    def _admit(self, msg_id: int, name: str, kind: Any, frame: dict[str, Any]) -> Any:
        """A command past the checks of its frame: counted by the rate limit, its arguments
        parsed. None when it was answered already (refused)."""
        if not self.bus.accepting:
            self.fail(msg_id, STOPPING)
            return None
        if name not in EXEMPT and not self.bus.limiter.allow(self):
            self.fail(msg_id, RATE_LIMITED)
            return None
        try:
            return p.parse_args(kind, frame)
        except CtsdError as e:
            self.fail(msg_id, e)
            return None

    def _change(self, msg_id: int, name: str, args: Any) -> None:
        """A change or probe, admitted, under the cap: into the store's next group (answered
        from a callback), or as a task of its own (`sync`, probes, the rest)."""
        write = WRITE_OPS.get(name)
        if write is not None:
            self._enqueue(msg_id, name, write, args)
            return
        task = asyncio.get_running_loop().create_task(self.execute(msg_id, name, args))
        tasks = self.inflight if name in WRITES else self.probes
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def execute(self, msg_id: int, name: str, args: Any) -> None:
        call = Call(self.svc, args.source, sync=args.sync, session=self)
        try:
            result = await HANDLERS[name](call, args)
        except Exception as e:
            self._failed(msg_id, name, e)
            return
        self.push(p.Ok(id=msg_id, result=result))
        replay, self._replay = self._replay, None
        if replay is not None:  # a subscribe: its replay goes right after its result
            self.outbox.push_lazy(replay)
        await self.outbox.drained()

    def _enqueue(self, msg_id: int, name: str, write: Write, args: Any) -> None:
        """A change into the store's next group at once, so that none sent after it overtakes
        it; answered from a callback once durable: no task per change (a client pipelining
        hundreds of them has that many in flight). With `sync: files`, by a task of its own
        once the change is in the data files."""
        try:
            fut = self.svc.store.enqueue(Request(write.op(args), args.source))
        except Exception as e:
            self._failed(msg_id, name, e)
            return
        waiting: asyncio.Future[Any] = fut
        if args.sync is None:
            fut.add_done_callback(functools.partial(self._written, msg_id, name, write))
        else:
            loop = asyncio.get_running_loop()
            waiting = loop.create_task(self._in_files(msg_id, name, write, fut))
        self.inflight.add(waiting)
        waiting.add_done_callback(self.inflight.discard)

    async def _in_files(
        self, msg_id: int, name: str, write: Write, fut: asyncio.Future[Any]
    ) -> None:
        try:
            outcome, lsn = await fut
            await self.svc.store.in_files(outcome, lsn)
            result = write.shown(outcome.result)
        except Exception as e:
            self._failed(msg_id, name, e)
            return
        self.push(p.Ok(id=msg_id, result=result))

    def _written(self, msg_id: int, name: str, write: Write, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            return
        try:
            outcome, _lsn = fut.result()
            result = write.shown(outcome.result)
        except Exception as e:
            self._failed(msg_id, name, e)
            return
        self.push(p.Ok(id=msg_id, result=result))

    def _failed(self, msg_id: int, name: str, e: Exception) -> None:
        if not isinstance(e, CtsdError):
            log.error("command_failed", command=name, exc_info=e)
            # The detail is in the log: an exception's text may quote what it was given.
            e = CtsdError("internal", "internal error; see the daemon's log")
        self.fail(msg_id, e)

    async def refuse(self, msg_id: int | None, err: CtsdError) -> None:
        """A frame refused before it named a command counts against the rate limit too: a
        flood of malformed frames must not be answered without limit."""
        self.fail(msg_id, err if self.bus.limiter.allow(self) else RATE_LIMITED)
        await self.outbox.drained()

    def fail(self, msg_id: int | None, err: CtsdError) -> None:
        self.bus.count_error(err.code)
        self.outbox.push_reply(wire_of(p.encode_fail(msg_id, err)))


def _id_of(raw: str | bytes) -> int | None:
    """The integer `id` of a frame msgspec refused for a number out of its range (1e999), so
    the answer reaches its caller: the standard library reads that number as infinity."""
    try:
        frame = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    msg_id = frame.get("id") if isinstance(frame, dict) else None
    return msg_id if isinstance(msg_id, int) and not isinstance(msg_id, bool) else None
