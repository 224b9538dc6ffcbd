"""Subscriptions: topic/connection filters, replay, fan-out with back-pressure.

The store calls `Hub.publish(events)` synchronously after each durable change (one call = one
change = one `events` frame). Each distinct frame is encoded once and the same bytes go to
every subscriber whose filter selects the same events.

Sending follows `websockets.broadcast()`, one step further: a subscriber with nothing queued
and a transport below its high-water mark gets the frame written directly (no task switch),
and the websocket framing itself is done once per frame, not once per subscriber. Otherwise the
frame waits in the subscriber's own bounded queue, drained by its own task with flow control;
a queue over `MAX_QUEUE_FRAMES` or `MAX_QUEUE_BYTES` means the client fell behind: it is
closed with 4008 (it resumes with `since`) and never slows anybody else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from ctsd.bus import protocol
from ctsd.files import STATE
from ctsd.models import SyncEvent
from ctsd.redact import mask

if TYPE_CHECKING:
    from ctsd.store import Store

log = structlog.get_logger("ctsd.bus")

MAX_QUEUE_FRAMES = 1000
MAX_QUEUE_BYTES = 8 * 1024 * 1024
REPLAY_CHUNK = 500  # events per replay frame, about (live frames are one change each)
# CONTRACT §4: idle subscribers get `progress` every 30 s. CTSD_BUS_PROGRESS_S shortens it for
# tests (a 30 s wait per test run is not worth it); nothing else should need to change it.
PROGRESS_S = float(os.environ.get("CTSD_BUS_PROGRESS_S") or 30.0)
CLOSE_LAGGING = 4008
CUT_CLOSE_TIMEOUT_S = 5.0

T_CONNECTIONS, T_STATE, T_DOCUMENTS, T_SYSTEM = 1, 2, 4, 8
TOPIC_BITS = {"connections": 1, "state": 2, "documents": 4, "system": 8}
ALL_TOPICS = 15

_ACTION_TOPICS = {
    "create": T_CONNECTIONS,
    "update": T_CONNECTIONS,
    "delete": T_CONNECTIONS,
    "set_active": T_CONNECTIONS | T_STATE,
    "import": T_CONNECTIONS | T_DOCUMENTS,
    "reset": T_CONNECTIONS | T_DOCUMENTS,
    "update_volume": T_STATE,
    "stale": T_STATE,
    "recovered": T_STATE,
    "test": T_STATE,
    "document_update": T_DOCUMENTS,
}


def topics_of(ev: SyncEvent) -> int:
    bits = _ACTION_TOPICS.get(ev.action, T_CONNECTIONS)
    if ev.data.get("file") == STATE and ev.action in ("create", "update", "delete"):
        return T_STATE  # a hand edit of connection-state.json is state, not configuration
    return bits


Key = tuple[int, frozenset[str] | None]


def selects(key: Key, bits: int, cid: str | None) -> bool:
    topics, cids = key
    if not bits & topics:
        return False
    # Changes to no single connection (import, reset, documents) reach filtered subscribers too:
    # they may affect every connection.
    return cids is None or cid is None or cid in cids


def encode_events(encoded: Iterable[bytes]) -> bytes:
    return b'{"type":"events","events":[' + b",".join(encoded) + b"]}"


def encode_event(ev: SyncEvent) -> bytes:
    return protocol.encode(mask(msgspec.to_builtins(ev)))


def replay_frames(events: list[SyncEvent]) -> deque[list[SyncEvent]]:
    """A replay in frames of about REPLAY_CHUNK events that never split one change (as live
    frames do not): the events of one commit share `created_at`, so a frame ends only where
    it changes."""
    frames: deque[list[SyncEvent]] = deque()
    frame: list[SyncEvent] = []
    for e in events:
        if len(frame) >= REPLAY_CHUNK and e.created_at != frame[-1].created_at:
            frames.append(frame)
            frame = []
        frame.append(e)
    if frame:
        frames.append(frame)
    return frames


def wire_of(payload: bytes) -> bytes:
    """The websocket text frame carrying `payload`, as this server sends it. A server's frames
    are unmasked and compression is off (server.py), so these bytes are the same for every
    client: built once, written to each subscriber's transport (websockets' own send would
    build a Frame and serialize it again per client: measured 1.4 → 1.1 ms for 100)."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


class Sub:
    """One bus connection's subscription."""

    def __init__(self, hub: Hub, conn: ServerConnection, key: Key, replay: list[SyncEvent]):
        self.hub = hub
        self.conn = conn
        self.key = key
        self.replay = replay_frames(replay)
        self.held = True  # until the subscribe result is on the wire
        self.queue: deque[bytes] = deque()
        self.qbytes = 0
        self.closed = False
        self.last_sent = time.monotonic()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def release(self) -> None:
        """The subscribe result is sent: replay, then queued live frames, may flow."""
        self.held = False
        self.task = asyncio.get_running_loop().create_task(self._drain(), name="ctsd-sub")
        self.wake.set()

    def push(self, frame: bytes, now: float, wire: bytes | None = None) -> None:
        """Send `frame` (the payload; `wire` its `wire_of`, when the caller has it)."""
        if self.closed:
            return
        conn = self.conn
        if (
            not self.held
            and not self.replay
            and not self.queue
            and not conn.paused
            and conn.protocol.state is State.OPEN
        ):
            # Fast path, as websockets.broadcast(): write now, no task switch. Straight to the
            # transport is safe: the connection flushes the protocol's output after every
            # operation, so nothing of its own waits to go before this frame.
            try:
                conn.transport.write(wire or wire_of(frame))
            except Exception:  # closing under us; its handler cleans up
                return
            self.last_sent = now
            self.hub.frames_sent += 1
            return
        self.queue.append(frame)
        self.qbytes += len(frame)
        if len(self.queue) > MAX_QUEUE_FRAMES or self.qbytes > MAX_QUEUE_BYTES:
            self.cut()
        else:
            self.wake.set()

    async def _drain(self) -> None:
        try:
            while not self.closed:
                await self.wake.wait()
                self.wake.clear()
                while self.replay and not self.closed:
                    chunk = self.replay.popleft()
                    bits = [topics_of(e) for e in chunk]
                    sel = [
                        self.hub.event_bytes(e)
                        for e, b in zip(chunk, bits, strict=True)
                        if selects(self.key, b, e.connection_id)
                    ]
                    if sel:
                        await self._send(encode_events(sel))
                while self.queue and not self.closed:
                    frame = self.queue.popleft()
                    self.qbytes -= len(frame)
                    await self._send(frame)
        except ConnectionClosed:
            self.closed = True

    async def _send(self, frame: bytes) -> None:
        await self.conn.send(frame, text=True)  # waits while the client's buffer is full
        self.last_sent = time.monotonic()
        self.hub.frames_sent += 1

    def stop(self) -> None:
        self.closed = True
        self.queue.clear()
        self.replay.clear()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    def cut(self) -> None:
        """Fell behind: drop what is queued and close with 4008 (resume with `since`)."""
        self.hub.remove(self)
        self.stop()
        self.hub.lagging_closed += 1
        log.warning("subscriber_lagging", remote=str(self.conn.remote_address), code=4008)
        task = asyncio.get_running_loop().create_task(self._close_lagging())
        self.hub.closing.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self.hub.closing.discard)

    async def _close_lagging(self) -> None:
        try:
            async with asyncio.timeout(CUT_CLOSE_TIMEOUT_S):
                await self.conn.close(CLOSE_LAGGING, "subscriber fell behind; resume with since")
        except TimeoutError:
            self.conn.transport.abort()


class Hub:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.groups: dict[Key, set[Sub]] = {}
        self.by_conn: dict[ServerConnection, Sub] = {}
        self.frames_sent = 0
        self.events_sent = 0
        self.lagging_closed = 0
        self._event_cache: dict[int, bytes] = {}
        self.closing: set[asyncio.Task[None]] = set()
        self._progress_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.store.events_listeners.append(self.publish)
        self.store.notice_listeners.append(self.notice)
        self._progress_task = asyncio.get_running_loop().create_task(
            self._progress(), name="ctsd-progress"
        )

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.store.events_listeners.remove(self.publish)
        with contextlib.suppress(ValueError):
            self.store.notice_listeners.remove(self.notice)
        if self._progress_task is not None:
            self._progress_task.cancel()
        for sub in list(self.by_conn.values()):
            sub.stop()

    @property
    def count(self) -> int:
        return len(self.by_conn)

    def event_bytes(self, ev: SyncEvent) -> bytes:
        return self._event_cache.get(ev.id) or encode_event(ev)

    # --- subscribe ------------------------------------------------------------------------

    def subscribe(self, conn: ServerConnection, key: Key, since: int | None) -> Sub:
        """Register and take the replay in one synchronous step (no await): the store calls
        `publish` on this loop, so no change can fall between the replay and live events."""
        self.unsubscribe(conn)
        replay = self.store.events_since(since) if since is not None else []
        sub = Sub(self, conn, key, replay)
        self.by_conn[conn] = sub
        self.groups.setdefault(key, set()).add(sub)
        return sub

    def unsubscribe(self, conn: ServerConnection) -> None:
        sub = self.by_conn.get(conn)
        if sub is not None:
            self.remove(sub)
            sub.stop()

    def remove(self, sub: Sub) -> None:
        if self.by_conn.get(sub.conn) is sub:
            del self.by_conn[sub.conn]
        group = self.groups.get(sub.key)
        if group is not None:
            group.discard(sub)
            if not group:
                del self.groups[sub.key]

    # --- publish --------------------------------------------------------------------------

    def publish(self, events: list[SyncEvent]) -> None:
        if not self.groups:
            return
        now = time.monotonic()
        encoded = [encode_event(e) for e in events]
        # Replays started later re-encode from the log; keep only this change's bytes cached.
        self._event_cache = {e.id: b for e, b in zip(events, encoded, strict=True)}
        bits = [topics_of(e) for e in events]
        frames: dict[tuple[int, ...], tuple[bytes, bytes]] = {}
        everything = tuple(range(len(events)))
        for key, subs in list(self.groups.items()):
            if key[0] == ALL_TOPICS and key[1] is None:
                picked = everything
            else:
                picked = tuple(
                    i for i, e in enumerate(events) if selects(key, bits[i], e.connection_id)
                )
            if not picked:
                continue
            if picked not in frames:
                frame = encode_events(encoded[i] for i in picked)
                frames[picked] = (frame, wire_of(frame))
            frame, wire = frames[picked]
            for sub in list(subs):
                sub.push(frame, now, wire)
            self.events_sent += len(picked) * len(subs)

    def notice(self, notice: dict[str, Any]) -> None:
        frame = protocol.encode(mask(notice))
        wire, now = wire_of(frame), time.monotonic()
        for key, subs in list(self.groups.items()):
            if key[0] & T_SYSTEM:
                for sub in list(subs):
                    sub.push(frame, now, wire)

    async def _progress(self) -> None:
        # Idle subscribers learn the current revision so they can resume from it cheaply.
        while True:
            await asyncio.sleep(PROGRESS_S / 6)
            now = time.monotonic()
            frame = protocol.encode(protocol.Progress(revision=self.store.revision))
            wire = wire_of(frame)
            for sub in list(self.by_conn.values()):
                if not sub.held and now - sub.last_sent >= PROGRESS_S:
                    sub.push(frame, now, wire)
