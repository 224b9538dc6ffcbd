"""One bus connection's ordered sender: replies, events, notices and progress frames leave in
the order they were pushed, each written as soon as the client keeps up.

Frames are websocket frames already framed (`wire_of`): a frame fanned out to many subscribers
is framed once. A client that keeps up gets each frame written at once, with no task switch
(as `websockets.broadcast()` does). Otherwise frames wait here, drained by the connection's own
task as the transport's buffer empties. A client whose queue passes `MAX_QUEUE_FRAMES` or
`MAX_QUEUE_BYTES` fell behind: it is dropped with close code 4008 (it resumes with `since`)
and never slows anybody else. Replies count as frames but not as bytes: the session paces
them (it reads a client's next frame once they are on their way), so a large one (a
snapshot, an export) never drops the client that asked for it. A replay is queued as a
lazy iterator of frames, produced as the client reads them, so a long replay never sits in
memory at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

import structlog
from websockets.frames import Frame, Opcode

log = structlog.get_logger("ctsd.bus")

MAX_QUEUE_FRAMES = 1000
MAX_QUEUE_BYTES = 8 * 1024 * 1024
CLOSE_LAGGING = 4008
CLOSE_TIMEOUT_S = 3.0
# A client cut (4008) is closed once its commands under way are answered, at most this long
# (past what a change waits for the cluster's stream, `cluster.publish_timeout_s`).
SETTLE_MAX_S = 30.0
# The ASGI scope extension under which the HTTP server hands each websocket its `Wire`.
WIRE = "ctsd.wire"


# The ASGI scope extension (HTTP and websocket) to call once a request or bus session showed
# a right token: from then on its connection is never closed to make room at the cap.
TRUST = "ctsd.trust"


class Wire(Protocol):
    """What the bus needs of one websocket connection beyond ASGI (`ctsd.web.protocols` makes
    it): ASGI cannot write a frame framed once for many clients, tell whether a client keeps
    up, or drop one whose peer stopped reading."""

    @property
    def open(self) -> bool: ...

    @property
    def writable(self) -> asyncio.Event: ...

    def write(self, framed: bytes) -> bool: ...

    def abort(self) -> None: ...

    def close_behind(self, code: int, reason: str, before: list[bytes]) -> None: ...

    # Set by the connection's session while it serves: called with each text frame read
    # while nothing waits for the session; True when it took the frame then and there.
    fast: Callable[[str], bool] | None


def wire_of(payload: bytes) -> bytes:
    """The websocket text frame carrying `payload` as this server sends it (unmasked, no
    compression): the same bytes for every client."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


Close = Callable[[int, str], Awaitable[None]]


class _Reply:
    """A queued reply (`Outbox.push_reply`): not counted against MAX_QUEUE_BYTES."""

    __slots__ = ("framed",)

    def __init__(self, framed: bytes) -> None:
        self.framed = framed


class Outbox:
    def __init__(self, wire: Wire, close: Close, remote: str) -> None:
        self.wire = wire
        self._close = close  # the ASGI close of this connection
        self.remote = remote
        self.queue: deque[bytes | _Reply | Iterator[bytes]] = deque()
        self.qframes = 0  # frames waiting (replays not counted: they are lazy)
        self.qbytes = 0  # bytes of the events, notices and progress frames waiting
        self.rbytes = 0  # bytes of the replies waiting (the session paces on them)
        self.task: asyncio.Task[None] | None = None
        self.closed = False  # nothing more is sent
        self.sealed = False  # closing: what is queued goes out, nothing pushed from now on
        self.last_sent = time.monotonic()
        self.sent = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self.on_cut: Callable[[Outbox], None] | None = None
        # Cut (`cut`): no more events; the replies of commands still in flight are awaited
        # (`settle`, the session's) and sent before the close.
        self.cutting = False
        self.settle: Callable[[], Awaitable[None]] | None = None

    @property
    def idle(self) -> bool:
        return not self.queue and self.task is None

    def push(self, framed: bytes) -> None:
        """Queue (or write now) one framed frame; drop the client if it fell too far behind."""
        if self.closed or self.sealed or self.cutting:
            return
        if self.idle and self.wire.write(framed):
            self.last_sent = time.monotonic()
            self.sent += 1
            return
        self.queue.append(framed)
        self.qframes += 1
        self.qbytes += len(framed)
        if self.qframes > MAX_QUEUE_FRAMES or self.qbytes > MAX_QUEUE_BYTES:
            self.cut()
            return
        self._start()

    def push_reply(self, framed: bytes) -> None:
        """Queue (or write now) a reply to this client's command."""
        if self.closed or self.sealed:
            return
        if self.cutting:  # (sent with the close)
            self.queue.append(_Reply(framed))
            return
        if self.idle and self.wire.write(framed):
            self.last_sent = time.monotonic()
            self.sent += 1
            return
        self.queue.append(_Reply(framed))
        self.qframes += 1
        self.rbytes += len(framed)
        self._start()

    def push_lazy(self, frames: Iterator[bytes]) -> None:
        """Queue frames produced only when the client is ready for them (a replay)."""
        if self.closed or self.sealed or self.cutting:
            return
        self.queue.append(frames)
        self._start()

    async def drained(self) -> None:
        """Wait until nothing is queued (a client's replies pace how fast we read it)."""
        if not self.idle:
            await self._drained.wait()

    def _start(self) -> None:
        if self.task is None:
            self._drained.clear()
            self.task = asyncio.get_running_loop().create_task(self._drain(), name="ctsd-outbox")

    async def _drain(self) -> None:
        wire = self.wire
        try:
            while self.queue and not self.closed:
                # Waited for before an item is taken: a cut (which cancels this task) keeps
                # every reply not yet written.
                if not wire.writable.is_set():
                    if not wire.open:
                        self.stop()
                        return
                    await wire.writable.wait()
                    continue
                item = self.queue[0]
                if isinstance(item, bytes):
                    framed: bytes | None = item
                    self.queue.popleft()
                    self.qframes -= 1
                    self.qbytes -= len(item)
                elif isinstance(item, _Reply):
                    framed = item.framed
                    self.queue.popleft()
                    self.qframes -= 1
                    self.rbytes -= len(framed)
                else:
                    framed = next(item, None)
                    if framed is None:
                        self.queue.popleft()
                        continue
                if not wire.write(framed):  # (writable: so it is closed)
                    self.stop()
                    return
                self.last_sent = time.monotonic()
                self.sent += 1
        finally:
            self.task = None
            self._drained.set()

    def stop(self) -> None:
        """Send nothing more (the connection is closing or gone)."""
        self.closed = True
        self.queue.clear()
        self.qframes = self.qbytes = self.rbytes = 0
        self._drained.set()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    def cut(self, reason: str = "subscriber fell behind; resume with since") -> None:
        """Fell behind (or the daemon's history was replaced): drop the events queued and
        close with 4008 (resume with `since`). Every command of the client carried out is
        answered before the close (the events do not say whose they were: a bot resending a
        create would make it twice): the replies queued, and those of the commands under
        way, awaited (`settle`, up to SETTLE_MAX_S); the session takes no new one."""
        if self.cutting or self.closed or self.sealed:
            return
        log.warning("subscriber_cut", remote=self.remote, code=CLOSE_LAGGING, reason=reason)
        if self.on_cut is not None:
            self.on_cut(self)
        self.cutting = True
        if self.task is not None:
            self.task.cancel()  # (one not yet started never runs its `finally`: done here)
            self.task = None
        self._drained.set()
        self.queue = deque(item for item in self.queue if isinstance(item, _Reply))
        self.qframes, self.qbytes = len(self.queue), 0
        self.rbytes = sum(len(item.framed) for item in self.queue if isinstance(item, _Reply))
        if self.settle is None:
            self._close_cut(CLOSE_LAGGING, reason)
            return
        task = asyncio.get_running_loop().create_task(self._settled(self.settle, reason))
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    async def _settled(self, settle: Callable[[], Awaitable[None]], reason: str) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE_MAX_S):
                await settle()
        self._close_cut(CLOSE_LAGGING, reason)

    def _close_cut(self, code: int, reason: str) -> None:
        if self.closed:
            return
        replies = [item.framed for item in self.queue if isinstance(item, _Reply)]
        self.stop()
        self.sealed = True
        # (it is behind: never waits for it; the replies are few, the session paces them)
        self.wire.close_behind(code, reason, replies)

    def close_soon(self, code: int, reason: str) -> None:
        """`close`, in a task of its own (from code that cannot wait for it)."""
        task = asyncio.get_running_loop().create_task(self.close(code, reason))
        _closing.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(_closing.discard)

    async def close(self, code: int, reason: str) -> None:
        """Close with `code` once what is queued went out: the answer or notice pushed just
        before it (`too_large`, `shutting_down`) reaches a client with a backlog too. Nothing
        pushed from now on is sent. A client that reads nothing cannot take it, nor a close
        frame, so after CLOSE_TIMEOUT_S the connection is dropped. One being cut gets the
        replies it was to get with this close instead (the daemon stopping)."""
        if self.cutting:
            self._close_cut(code, reason)
            return
        self.sealed = True
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.drained()
                self.stop()
                await self._close(code, reason)
        except TimeoutError:
            self.stop()
            self.wire.abort()
        except Exception:  # already gone
            self.stop()


_closing: set[asyncio.Task[None]] = set()
