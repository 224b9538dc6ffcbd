"""Subscriptions: topic/connection filters, replay, and the fan-out of every change.

The store calls `Hub.publish(events)` synchronously after each durable change (one call = one
change = one `events` frame). Each distinct frame is encoded and framed once, and the same
bytes go to every subscriber whose filter selects the same events, through each connection's
`Outbox` (written at once when the client keeps up, else queued, bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from ctsd.bus import protocol
from ctsd.bus.outbox import Outbox, wire_of
from ctsd.files import STATE
from ctsd.models import SyncEvent
from ctsd.redact import mask

if TYPE_CHECKING:
    from ctsd.store import Store

REPLAY_CHUNK = 500  # events per replay frame, about (live frames are one change each)
# Idle subscribers get `progress` every 30 s. CTSD_BUS_PROGRESS_S shortens it for tests (a 30 s
# wait per test run is not worth it); nothing else should need to change it.
PROGRESS_S = float(os.environ.get("CTSD_BUS_PROGRESS_S") or 30.0)
# The progress loop wakes when the next subscriber is due, but at most this often: those due
# within it are served together (a frame at most this late), and a thousand subscribers
# due at a thousand moments cost a few scans a second, not a thousand.
PROGRESS_SLACK_S = min(0.25, PROGRESS_S / 10)

T_CONNECTIONS, T_STATE, T_DOCUMENTS, T_SYSTEM = 1, 2, 4, 8
TOPIC_BITS = {"connections": 1, "state": 2, "documents": 4, "system": 8}
ALL_TOPICS = 15

# An event reaches every topic whose records its change touched: a create or delete makes or
# removes the state record too, an import or a reset may change every table.
_ACTION_TOPICS = {
    "create": T_CONNECTIONS | T_STATE,
    "update": T_CONNECTIONS,
    "delete": T_CONNECTIONS | T_STATE,
    "set_active": T_CONNECTIONS | T_STATE,
    "import": T_CONNECTIONS | T_STATE | T_DOCUMENTS,
    "reset": T_CONNECTIONS | T_STATE | T_DOCUMENTS,
    "update_volume": T_STATE,
    "stale": T_STATE,
    "recovered": T_STATE,
    "test": T_STATE,
    "document_update": T_DOCUMENTS,
}


# The fields of a connection its state record mirrors (`core.mirror_state`): an update of
# one of them changes the state record in the same change.
_MIRRORED = ("is_active", "is_enabled")


def topics_of(ev: SyncEvent) -> int:
    bits = _ACTION_TOPICS.get(ev.action, T_CONNECTIONS)
    if ev.data.get("file") == STATE and ev.action in ("create", "update", "delete"):
        return T_STATE  # a hand edit of connection-state.json is state, not configuration
    if ev.action == "update":
        fields = ev.data.get("fields")
        if isinstance(fields, list) and any(f in fields for f in _MIRRORED):
            bits |= T_STATE
    return bits


Key = tuple[int, frozenset[str] | None]


def selects(key: Key, bits: int, cid: str | None) -> bool:
    topics, cids = key
    if not bits & topics:
        return False
    # Changes to no single connection (import, reset, documents) reach filtered subscribers too:
    # they may affect every connection.
    return cids is None or cid is None or cid in cids


class Picker:
    """Which events of one change each filter selects (`selects` for every event), costing
    what a filter names, not every event times every filter: a change of 10,000 events (a
    sweep turning a dead bot host's connections stale) was checked event by event against
    each of 500 bots' filters, on the event loop, before any of them got it."""

    def __init__(self, events: list[SyncEvent]) -> None:
        self.bits = [topics_of(e) for e in events]
        self.cids = [e.connection_id for e in events]
        self.everything = tuple(range(len(events)))
        self._by_cid: dict[str | None, list[int]] | None = None

    def picked(self, key: Key) -> tuple[int, ...]:
        topics, cids = key
        if cids is None or len(cids) >= len(self.everything):
            if topics == ALL_TOPICS and cids is None:
                return self.everything
            bits, of = self.bits, self.cids
            return tuple(i for i in self.everything if selects(key, bits[i], of[i]))
        if self._by_cid is None:
            self._by_cid = {}
            for i, cid in enumerate(self.cids):
                self._by_cid.setdefault(cid, []).append(i)
        by_cid = self._by_cid
        found = [*by_cid.get(None, ())]  # (no single connection: every filter's)
        for cid in cids:
            found.extend(by_cid.get(cid, ()))
        found.sort()
        return tuple(i for i in found if self.bits[i] & topics)


def encode_events(encoded: Iterable[bytes]) -> bytes:
    return b'{"type":"events","events":[' + b",".join(encoded) + b"]}"


def encode_event(ev: SyncEvent) -> bytes:
    return protocol.encode(mask(msgspec.to_builtins(ev)))


def replay_chunks(events: list[SyncEvent]) -> Iterator[list[SyncEvent]]:
    """A replay in frames of about REPLAY_CHUNK events that never split one change (as live
    frames do not): the events of one commit share `created_at`, so a frame ends only where
    it changes."""
    frame: list[SyncEvent] = []
    for e in events:
        if len(frame) >= REPLAY_CHUNK and e.created_at != frame[-1].created_at:
            yield frame
            frame = []
        frame.append(e)
    if frame:
        yield frame


@dataclass(eq=False)
class Sub:
    """One bus connection's subscription (at most one per connection)."""

    outbox: Outbox
    key: Key
    progress_at: float = 0.0  # when `progress` was last queued for it (monotonic)

    def quiet_since(self) -> float:
        """Its last frame sent, or progress queued: a client that reads nothing (its frames
        queued, none sent) gets one progress per period, not one per wake of the loop."""
        return max(self.outbox.last_sent, self.progress_at)


class Hub:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.groups: dict[Key, set[Sub]] = {}
        self.by_outbox: dict[Outbox, Sub] = {}
        self.events_sent = 0
        self.lagging_closed = 0
        self._event_cache: dict[int, bytes] = {}
        self._progress_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.store.events_listeners.append(self.publish)
        self.store.notice_listeners.append(self.notice)
        self.store.replaced_listeners.append(self._replaced)
        self._progress_task = asyncio.get_running_loop().create_task(
            self._progress(), name="ctsd-progress"
        )

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.store.events_listeners.remove(self.publish)
        with contextlib.suppress(ValueError):
            self.store.notice_listeners.remove(self.notice)
        with contextlib.suppress(ValueError):
            self.store.replaced_listeners.remove(self._replaced)
        if self._progress_task is not None:
            self._progress_task.cancel()

    @property
    def count(self) -> int:
        return len(self.by_outbox)

    def event_bytes(self, ev: SyncEvent) -> bytes:
        return self._event_cache.get(ev.id) or encode_event(ev)

    # --- subscribe ------------------------------------------------------------------------

    def subscribe(self, outbox: Outbox, key: Key, since: int | None) -> Iterator[bytes]:
        """Register and take the replay in one synchronous step (no await): the store calls
        `publish` on this loop, so no change can fall between the replay and live events.
        Returns the replay's frames, produced lazily; the caller queues them right after the
        subscribe result."""
        self.unsubscribe(outbox)
        replay = self.store.events_since(since) if since is not None else []
        sub = Sub(outbox, key)
        self.by_outbox[outbox] = sub
        self.groups.setdefault(key, set()).add(sub)
        outbox.on_cut = self._on_cut
        return self._replay_frames(key, replay)

    def _replay_frames(self, key: Key, events: list[SyncEvent]) -> Iterator[bytes]:
        for chunk in replay_chunks(events):
            sel = [
                self.event_bytes(e) for e in chunk if selects(key, topics_of(e), e.connection_id)
            ]
            if sel:
                yield wire_of(encode_events(sel))

    def unsubscribe(self, outbox: Outbox) -> bool:
        sub = self.by_outbox.pop(outbox, None)
        if sub is None:
            return False
        group = self.groups.get(sub.key)
        if group is not None:
            group.discard(sub)
            if not group:
                del self.groups[sub.key]
        return True

    def _on_cut(self, outbox: Outbox) -> None:
        if self.unsubscribe(outbox):
            self.lagging_closed += 1

    def _replaced(self, gap: bool) -> None:
        """Events were skipped (a cluster snapshot installed past them): every subscriber is
        closed with 4008; resuming with `since` it gets `revision_compacted` and takes a
        snapshot, rather than read a gap as no change."""
        if not gap:
            return
        for outbox in list(self.by_outbox):
            self.unsubscribe(outbox)  # (not counted as lagging)
            outbox.cut("this daemon skipped events (a cluster snapshot); resume with since")

    # --- publish --------------------------------------------------------------------------

    def publish(self, events: list[SyncEvent]) -> None:
        if not self.groups:
            return
        encoded = [encode_event(e) for e in events]
        # Replays started later re-encode from the log; keep only this change's bytes cached.
        self._event_cache = {e.id: b for e, b in zip(events, encoded, strict=True)}
        picker = Picker(events)
        frames: dict[tuple[int, ...], bytes] = {}
        for key, subs in list(self.groups.items()):
            picked = picker.picked(key)
            if not picked:
                continue
            framed = frames.get(picked)
            if framed is None:
                framed = frames[picked] = wire_of(encode_events(encoded[i] for i in picked))
            for sub in list(subs):
                sub.outbox.push(framed)
            self.events_sent += len(picked) * len(subs)

    def notice(self, notice: dict[str, Any]) -> None:
        framed = wire_of(protocol.encode(mask(notice)))
        for key, subs in list(self.groups.items()):
            if key[0] & T_SYSTEM:
                for sub in list(subs):
                    sub.outbox.push(framed)

    async def _progress(self) -> None:
        # Idle subscribers learn the current revision so they can resume from it cheaply.
        while True:
            quiet = (sub.quiet_since() for sub in self.by_outbox.values())
            await asyncio.sleep(progress_wait(time.monotonic(), quiet))
            now = time.monotonic()
            framed = wire_of(protocol.encode(protocol.Progress(revision=self.store.revision)))
            for sub in list(self.by_outbox.values()):
                if now - sub.quiet_since() >= PROGRESS_S - PROGRESS_SLACK_S:
                    sub.progress_at = now
                    sub.outbox.push(framed)


def progress_wait(now: float, quiet_since: Iterable[float]) -> float:
    """How long the progress loop sleeps: until the first subscriber is due (PROGRESS_S after
    its last frame, `Sub.quiet_since`), at least PROGRESS_SLACK_S. One that subscribes
    meanwhile is due later than any wake this computes, so none is ever served late."""
    due = min((t + PROGRESS_S for t in quiet_since), default=now + PROGRESS_S)
    return max(PROGRESS_SLACK_S, due - now)
