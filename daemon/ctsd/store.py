"""The store: the one door every change goes through.

    validate → apply (to an overlay) → durable write of the touched files → sync-log events
    → publish to listeners → answer the caller

Changes arrive as `Op`s (see `ops.py`) from the bus, HTTP, the CLI, the watcher (hand edits),
the sweeps and the probes. One writer task takes every change queued while the previous
write was in flight and commits them together (group commit); each caller is answered only
once its own change is durable. A change that fails validation fails alone; a write that
fails (disk full, read-only, permissions) fails the group, memory stays as it was and the old
files are intact.

Taking files in from disk (start-up loading, hand edits, SIGHUP, late in-place writes) is
`intake.py`, mixed into `Store`: this module is the door they go through.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog

from ctsd import files
from ctsd.atomic import ChangedOnDisk, Displaced, Stamp, write_files
from ctsd.diagnose import FileProblem
from ctsd.errors import CtsdError
from ctsd.files import CONNECTIONS, STATE, SYNC_LOG
from ctsd.intake import Intake, _digest_of, _drop
from ctsd.models import Connection, ConnectionState, Settings, SyncEvent
from ctsd.table import Table
from ctsd.timeutil import later, now_iso

log = structlog.get_logger("ctsd.store")

Op = Callable[["Tx"], Any]
EventsListener = Callable[[list[SyncEvent]], None]
NoticeListener = Callable[[dict[str, Any]], None]


class Tx:
    """One change being applied: overlays on the committed tables plus the events it emits."""

    def __init__(self, store: Store, source: str, parent: Tx | None = None) -> None:
        self.store = store
        self.source = source
        self.now = parent.now if parent else now_iso()
        self.connections: Table[Connection] = Table(
            parent.connections if parent else store.connections
        )
        self.state: Table[ConnectionState] = Table(parent.state if parent else store.state)
        self.docs: Table[dict[str, Any]] = Table(parent.docs if parent else store.documents)
        self.events: list[tuple[str | None, str, dict[str, Any]]] = []
        self.touched: set[str] = set()  # files to write even without a table change
        self.synced: dict[str, Stamp | None] = {}  # files whose disk content already is this change
        self.log_replace: list[SyncEvent] | None = None  # a hand edit of the sync log

    def emit(self, action: str, connection_id: str | None, data: dict[str, Any]) -> None:
        self.events.append((connection_id, action, {**data, "source": self.source}))

    def keys(self) -> list[str]:
        """The records this change touched, as revision keys (see `Store.record_revs`)."""
        out = [record_key(cid) for cid in self.connections.over]
        out += [record_key(cid) for cid in self.state.over if cid not in self.connections.over]
        out += [document_key(name) for name in self.docs.over]
        return out

    def files(self) -> set[str]:
        out = set(self.touched)
        if self.connections.dirty:
            out.add(CONNECTIONS)
        if self.state.dirty:
            out.add(STATE)
        out.update(files.document_file(name) for name in self.docs.over)
        if self.events or self.log_replace is not None:
            out.add(SYNC_LOG)
        return out

    def merge_into(self, parent: Tx) -> None:
        self.connections.merge_into(parent.connections)
        self.state.merge_into(parent.state)
        self.docs.merge_into(parent.docs)
        parent.events.extend(self.events)
        parent.touched |= self.touched
        parent.synced.update(self.synced)
        if self.log_replace is not None:
            parent.log_replace = self.log_replace


@dataclass
class _Pending:
    op: Op
    source: str
    future: asyncio.Future[Any]
    if_match: int | None = None
    result: Any = None
    keys: list[str] = field(default_factory=list)
    files: set[str] = field(default_factory=set)
    events: list[SyncEvent] = field(default_factory=list)
    first_event: int = 0
    n_events: int = 0


class Store(Intake):
    """Committed memory and the one door (`submit`); taking files in comes from `Intake`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.connections: dict[str, Connection] = {}
        self.state: dict[str, ConnectionState] = {}
        self.documents: dict[str, dict[str, Any]] = {}
        self.log: deque[SyncEvent] = deque()
        self.revision = 0
        # The revision of the latest retained event of each record (`record_key`,
        # `document_key`): what `If-Match` compares against.
        self.record_revs: dict[str, int] = {}
        self.settings = Settings()
        self.problems: dict[str, FileProblem] = {}
        self.stamps: dict[str, Stamp | None] = {}
        # Heartbeats live here, in memory at once; a periodic flush writes them (issue 5).
        self.heartbeats: dict[str, str] = {}
        # Time of each connection's latest sync-log event, set on commit by the sweeps and
        # persisted by the same coalesced flush (it is derived data; see sweeps.py).
        self.last_sync: dict[str, str] = {}
        self._frags: dict[str, dict[str, bytes]] = {CONNECTIONS: {}, STATE: {}}
        self._log_frags: deque[bytes] = deque()
        self._writing: frozenset[str] = frozenset()  # files of the write in flight
        self._write_done = asyncio.Event()  # set (and replaced) when that write returns
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self.events_listeners: list[EventsListener] = []
        self.notice_listeners: list[NoticeListener] = []
        self.on_commit: list[Callable[[float, int], None]] = []  # (seconds, changes): metrics
        super().__init__()  # the intake's own state (intake.py)

    # --- paths ---------------------------------------------------------------------------

    def path(self, file: str) -> Path:
        return self.data_dir / file

    def known_files(self) -> list[str]:
        algos = sorted(
            f"{files.ALGORITHMS_DIR}/{p.name}"
            for p in (self.data_dir / files.ALGORITHMS_DIR).glob("*.json")
            if files.document_name(f"{files.ALGORITHMS_DIR}/{p.name}")
        )
        docs = [f for f, _ in files.DOCUMENTS.values()]
        # algorithms before documents: instances.json names them
        return [CONNECTIONS, STATE, SYNC_LOG, *algos, *docs]

    def algorithm_names(self, docs: Table[dict[str, Any]] | None = None) -> set[str]:
        names = (docs or self.documents).keys()
        prefix = f"{files.ALGORITHMS_DIR}/"
        return {n[len(prefix) :] for n in names if n.startswith(prefix)}

    def _refresh_settings(self) -> None:
        content = self.documents.get("settings", {})
        self.settings = msgspec.convert(content, type=Settings)

    # --- the one door ----------------------------------------------------------------------

    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(
            self._write_loop(), name="ctsd-writer"
        )

    async def submit(
        self, op: Op, source: str, *, if_match: int | None = None, sync: str | None = None
    ) -> Any:
        """Apply `op` through the one door; returns its result once durable.

        `if_match`: refuse (`precondition_failed`) when a record the change touches was
        changed after that revision. `sync="files"`: answer once the change is in the data
        files (every change is written to them before it is answered today).
        """
        if self._closing:
            raise CtsdError("io_error", "the daemon is shutting down")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(op, source, fut, if_match))
        self._wake.set()
        return await fut

    async def _submit_here(self, op: Op, inline: bool) -> Any:
        """Submit with source "file"; from inside the writer (`inline`), commit it now."""
        if not inline:
            return await self.submit(op, "file")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._commit_group([_Pending(op, "file", fut)])
        if not fut.done():
            raise CtsdError("internal", "inline commit did not answer")
        return fut.result()

    async def close(self) -> None:
        """Take in late writes now, finish every queued change, then stop the writer."""
        if self._writer is not None and not self._closing:
            await self.take_in_late(max_age=0)
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await self._writer

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if batch:
                try:
                    await self._commit_group(batch)
                except Exception as e:  # never let the writer die: fail the group, go on
                    log.exception("commit_failed")
                    for p in batch:
                        _fail(p, CtsdError("internal", f"commit failed: {e}"))
            if self._closing and not self._pending:
                return

    def _apply(self, batch: list[_Pending]) -> tuple[Tx, list[_Pending]]:
        group = Tx(self, "group")
        ok: list[_Pending] = []
        for p in batch:
            if p.future.done():  # the caller went away before we got to it: skip the change
                continue
            tx = Tx(self, p.source, group)
            try:
                p.result = p.op(tx)
                p.keys = tx.keys()
                if p.if_match is not None:
                    self._check_if_match(p.keys, p.if_match)
                touched = tx.files()
                blocked = sorted(f for f in touched if f in self.problems and f not in tx.synced)
                if blocked:
                    problem = self.problems[blocked[0]]
                    raise CtsdError(
                        "file_invalid",
                        f"{blocked[0]} is invalid on disk ({problem.format()}); fix the file first",
                        extra={"file": blocked[0]},
                    )
            except CtsdError as e:
                _fail(p, e)
                continue
            except Exception as e:
                log.exception("op_failed", source=p.source)
                _fail(p, CtsdError("internal", f"{type(e).__name__}: {e}"))
                continue
            p.files = touched
            p.first_event = len(group.events)
            p.n_events = len(tx.events)
            tx.merge_into(group)
            ok.append(p)
        return group, ok

    async def _commit_group(self, batch: list[_Pending]) -> None:
        for _attempt in range(4):
            group, ok = self._apply(batch)
            if not ok:
                return
            dirty = set().union(*(p.files for p in ok))
            changed = [f for f in sorted(dirty) if f not in group.synced and not self.unchanged(f)]
            if changed:
                # A hand edit landed that we have not taken in: take it in first, then retry
                # the whole group on top of it (or refuse what no longer applies).
                for f in changed:
                    taken = await self.ingest(f, _inline=True, report=False)
                    if not taken and f not in self.problems:
                        # Not readable as it is now: maybe an in-place save half way. Judging
                        # it is the watcher's, once it settles; give the writer a moment and
                        # look again (after the last attempt the group is refused: conflict).
                        await asyncio.sleep(INLINE_RETRY_S)
                batch = [p for p in ok if not p.future.done()]
                continue
            try:
                await self._write_group(group, ok, dirty)
            except ChangedOnDisk:
                batch = [p for p in ok if not p.future.done()]
                continue
            return
        for p in batch:
            _fail(p, CtsdError("conflict", "the file keeps changing on disk; try again"))

    async def _write_group(self, group: Tx, ok: list[_Pending], dirty: set[str]) -> None:
        t0 = time.perf_counter()
        # Revisions and the events of each change (consecutive ids per change).
        events: list[SyncEvent] = []
        rev = self.revision
        for cid, action, data in group.events:
            rev += 1
            events.append(
                SyncEvent(id=rev, connection_id=cid, action=action, data=data, created_at=group.now)
            )
        for p in ok:
            p.events = events[p.first_event : p.first_event + p.n_events]

        new_conns, conn_frags = (
            group.connections.materialize(
                self.connections, self._frags[CONNECTIONS], files.encode_record
            )
            if group.connections.dirty
            else (self.connections, self._frags[CONNECTIONS])
        )
        new_state, state_frags = (
            group.state.materialize(self.state, self._frags[STATE], files.encode_record)
            if group.state.dirty
            else (self.state, self._frags[STATE])
        )
        new_docs = dict(group.docs.items()) if group.docs.dirty else self.documents

        if group.log_replace is not None:
            log_events = deque(group.log_replace)
            log_frags = deque(files.encode_record(e) for e in group.log_replace)
        else:
            log_events, log_frags = self.log.copy(), self._log_frags.copy()
        for e in events:
            log_events.append(e)
            log_frags.append(files.encode_record(e))
        limit = self.settings.sync_log_limit
        if "settings" in group.docs.over and group.docs.get("settings") is not None:
            limit = msgspec.convert(group.docs.get("settings"), type=Settings).sync_log_limit
        while len(log_events) > limit:
            log_events.popleft()
            log_frags.popleft()

        plan: list[tuple[Path, Any]] = []
        # A file taken in from disk is already what memory holds: write it only when another
        # change of the group touched it too.
        write = [
            f
            for f in sorted(dirty)
            if f not in group.synced
            or f in group.touched
            or any(p.source != "file" and f in p.files for p in ok)
        ]
        for f in write:
            if f == CONNECTIONS:
                body: Any = files.table_chunks(conn_frags.values())
            elif f == STATE:
                body = files.table_chunks(state_frags.values())
            elif f == SYNC_LOG:
                body = files.table_chunks(log_frags)
            else:
                content = new_docs.get(files.document_name(f))
                if content is None:
                    continue
                body = files.encode_document(content)
            plan.append((self.path(f), body))
        # Data files first, the sync log last: a crash in between loses only unacked events.
        plan.sort(key=lambda item: item[0].name == SYNC_LOG)
        expected = {
            self.path(f): (group.synced[f] if f in group.synced else self.stamps.get(f))
            for f in write
        }
        kept: list[Displaced] = []
        self._writing = frozenset(write)
        try:
            try:
                stamps = await anyio.to_thread.run_sync(write_files, plan, expected, kept)
            finally:
                # Waiters run only once we yield: after the stamps below are recorded.
                self._writing = frozenset()
                self._write_done.set()
                self._write_done = asyncio.Event()
        except ChangedOnDisk:
            raise
        except OSError as e:
            for d in kept:  # kept only once renamed: a late failure
                _drop(d)
            err = CtsdError(
                "io_error",
                f"write failed: {e.strerror or e} ({e.filename or ''}); nothing was changed",
            )
            log.error("write_failed", error=str(e), files=sorted(dirty))
            for p in ok:
                _fail(p, err)
            return

        # Durable: install the new state, then publish, then answer.
        if new_conns is not self.connections:
            for cid in [c for c in self.heartbeats if c not in new_conns]:
                del self.heartbeats[cid]
            for cid in [c for c in self.last_sync if c not in new_conns]:
                del self.last_sync[cid]
        self.connections, self._frags[CONNECTIONS] = new_conns, conn_frags
        self.state, self._frags[STATE] = new_state, state_frags
        if new_docs is not self.documents:
            self.documents = new_docs
            if "settings" in group.docs.over:
                self._refresh_settings()
        self.log, self._log_frags = log_events, log_frags
        if events:
            self.revision = events[-1].id
        elif group.log_replace:
            self.revision = max(self.revision, group.log_replace[-1].id)
        written = {str(path.relative_to(self.data_dir)): st for path, st in stamps.items()}
        self.stamps.update(group.synced)
        self.stamps.update(written)
        for f in {*group.synced, *written}:
            self._note_ctime(f)
        self.displaced += [(d, time.monotonic()) for d in kept]
        if self.coarse_mtime:
            for path, body in plan:
                self.digests[str(path.relative_to(self.data_dir))] = _digest_of(body)
        for f in list(group.synced):
            if f in self.problems:
                problem = self.problems.pop(f)
                log.info("file_restored", file=f, was=problem.message)
                self._notice({"notice": "file_restored", "file": f})
        self._note_revisions(ok)
        elapsed = time.perf_counter() - t0
        for cb in self.on_commit:
            cb(elapsed, len(ok))
        for p in ok:
            if p.events:
                self._publish(p.events)
        for p in ok:
            if not p.future.done():
                p.future.set_result(p.result)

    def revision_of(self, key: str) -> int:
        """The revision of the last change of a record; one whose events were trimmed from
        the log changed at the latest just before the oldest retained one."""
        rev = self.record_revs.get(key)
        return rev if rev is not None else self.oldest_revision() - 1

    def _check_if_match(self, keys: list[str], expected: int) -> None:
        for key in keys:
            rev = self.revision_of(key)
            if rev > expected:
                raise CtsdError(
                    "precondition_failed",
                    f"{key[2:]} changed at revision {rev}, after the {expected} given in "
                    "If-Match; read it again and retry",
                )

    def _note_revisions(self, ok: list[_Pending]) -> None:
        for p in ok:
            if p.events:
                for key in p.keys:
                    self.record_revs[key] = p.events[-1].id

    def _publish(self, events: list[SyncEvent]) -> None:
        for listener in self.events_listeners:
            try:
                listener(events)
            except Exception:
                log.exception("listener_failed")

    def _notice(self, notice: dict[str, Any]) -> None:
        notice = {"type": "notice", **notice}
        for listener in self.notice_listeners:
            try:
                listener(notice)
            except Exception:
                log.exception("listener_failed")

    # --- read views (for the bus, HTTP, sweeps) ------------------------------------------

    def state_view(self, cid: str) -> ConnectionState | None:
        st = self.state.get(cid)
        if st is None:
            return None
        # The newer of memory and file wins: a test result or a hand edit may have written a
        # later heartbeat than the last one held in memory (timestamps compare as strings).
        hb = self.heartbeats.get(cid)
        ls = self.last_sync.get(cid)
        newer_hb = later(hb, st.last_heartbeat_at)
        newer_ls = later(ls, st.last_sync_at)
        if newer_hb or newer_ls:
            st = msgspec.structs.replace(
                st,
                last_heartbeat_at=hb if newer_hb else st.last_heartbeat_at,
                last_sync_at=ls if newer_ls else st.last_sync_at,
            )
        return st

    def state_views(self) -> Iterable[ConnectionState]:
        for cid in self.state:
            yield self.state_view(cid)  # type: ignore[misc]

    def oldest_revision(self) -> int:
        return self.log[0].id if self.log else self.revision + 1

    def events_since(self, since: int) -> list[SyncEvent]:
        """Retained events with id > since, oldest first (callers check compaction)."""
        out: list[SyncEvent] = []
        for event in reversed(self.log):
            if event.id <= since:
                break
            out.append(event)
        out.reverse()
        return out


def record_key(cid: str) -> str:
    return f"c:{cid}"  # a connection and its state record are one resource


def document_key(name: str) -> str:
    return f"d:{name}"


def _fail(p: _Pending, err: CtsdError) -> None:
    if not p.future.done():  # a cancelled caller must not break the group
        p.future.set_exception(err)


INLINE_RETRY_S = 0.005


def mirror_state(conn: Connection, st: ConnectionState | None, now: str) -> ConnectionState:
    """The state record of `conn`, with `is_active` mirrored and `status` consistent."""
    if st is None:
        return ConnectionState(
            connection_id=conn.id,
            is_active=conn.is_active,
            volume_factor_live=conn.volume_factor,
            volume_factor_preset=conn.volume_factor,
            created_at=now,
            updated_at=now,
            status="active" if conn.is_enabled and conn.is_active else "inactive",
        )
    live = conn.is_enabled and conn.is_active
    status = st.status if live and st.status != "inactive" else ("active" if live else "inactive")
    if st.is_active == conn.is_active and st.status == status:
        return st
    return msgspec.structs.replace(st, is_active=conn.is_active, status=status, updated_at=now)
