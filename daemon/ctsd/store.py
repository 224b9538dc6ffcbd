"""The store: the one door every change goes through.

    validate → apply (to an overlay) → durable write of the touched files → sync-log events
    → publish to listeners → answer the caller

Changes arrive as `Op`s (see `ops.py`) from the bus, HTTP, the CLI, the watcher (hand edits),
the sweeps and the probes. One writer task takes every change queued while the previous
write was in flight and commits them together (group commit); each caller is answered only
once its own change is durable. A change that fails validation fails alone; a write that
fails (disk full, read-only, permissions) fails the group, memory stays as it was and the old
files are intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
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
from ctsd.atomic import (
    TEMP_PREFIX,
    ChangedOnDisk,
    Displaced,
    Stamp,
    ensure_dir,
    stamp_of,
    write_files,
    written_elsewhere,
)
from ctsd.diagnose import FileProblem
from ctsd.errors import CtsdError
from ctsd.files import CONNECTIONS, STATE, SYNC_LOG, Invalid
from ctsd.models import Connection, ConnectionState, Settings, SyncEvent
from ctsd.table import Table
from ctsd.timeutil import now_iso

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
    result: Any = None
    files: set[str] = field(default_factory=set)
    events: list[SyncEvent] = field(default_factory=list)
    first_event: int = 0
    n_events: int = 0


class Store:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.connections: dict[str, Connection] = {}
        self.state: dict[str, ConnectionState] = {}
        self.documents: dict[str, dict[str, Any]] = {}
        self.log: deque[SyncEvent] = deque()
        self.revision = 0
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
        # ctime of each file when its stamp was last confirmed: every write moves it and no
        # tool can set it back (cp -p, rsync -t, touch -r restore mtime). See `unchanged`.
        self.ctimes: dict[str, int] = {}
        # Where two writes in a row can share a timestamp (coarse clocks: older kernels, some
        # network filesystems), equal stat results within a tick prove nothing: there the
        # store also keeps a digest of each file and compares it while a stamp is that fresh.
        # Probed at open; on fine-grained timestamps no hashing is done at all.
        self.coarse_mtime = False
        self.digests: dict[str, bytes] = {}
        # Files our writes displaced while an in-place writer held them open, and since when
        # (monotonic): what it writes into them is taken in by `take_in_late`.
        self.displaced: list[tuple[Displaced, float]] = []

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

    # --- start ---------------------------------------------------------------------------

    def open(self) -> None:
        """Create what is missing (never touching what exists), then load every file."""
        for sub in ("", files.ALGORITHMS_DIR, "historical", "logs"):
            d = self.data_dir / sub
            if d.exists() and not d.is_dir():
                raise CtsdError("io_error", f"{d} exists and is not a directory")
            ensure_dir(d)
        for stale in self.data_dir.glob(f"{TEMP_PREFIX}*"):
            stale.unlink(missing_ok=True)
        for stale in (self.data_dir / files.ALGORITHMS_DIR).glob(f"{TEMP_PREFIX}*"):
            stale.unlink(missing_ok=True)
        self.coarse_mtime = _timestamps_coarse(self.data_dir)
        defaults: list[tuple[Path, bytes]] = []
        for file in [CONNECTIONS, STATE, SYNC_LOG, *(f for f, _ in files.DOCUMENTS.values())]:
            p = self.path(file)
            if not p.exists() and not p.is_symlink():
                name = files.document_name(file)
                body = files.encode_document(files.default_document(name)) if name else b"[]\n"
                defaults.append((p, body))
        if defaults:
            write_files(defaults)
            log.info("created_defaults", files=[p.name for p, _ in defaults])
        for file in self.known_files():
            self._load_at_start(file)
        self._reconcile()
        self._refresh_settings()
        log.info(
            "loaded",
            connections=len(self.connections),
            revision=self.revision,
            invalid=sorted(self.problems),
        )

    def _read(self, file: str) -> tuple[bytes, Stamp]:
        p = self.path(file)
        if p.is_dir():
            raise Invalid(FileProblem(file, 1, 1, "$", "is a directory, expected a JSON file"))
        with open(p, "rb") as fh:
            st = os.fstat(fh.fileno())
            files.check_size(file, st.st_size)  # before reading: never load a huge file
            return fh.read(), Stamp.of(st)

    def _load_at_start(self, file: str) -> None:
        try:
            raw, stamp = self._read(file)
            decoded = self.decode(file, raw)
        except Invalid as e:
            self.problems[file] = e.problem
            self.stamps[file] = stamp_of(self.path(file))
            log.error("file_invalid", file=file, problem=e.problem.format())
            return
        except OSError as e:
            self.problems[file] = FileProblem(file, 1, 1, "$", f"cannot read: {e.strerror}")
            log.error("file_invalid", file=file, problem=self.problems[file].format())
            return
        self.stamps[file] = stamp
        self._note_ctime(file)
        if self.coarse_mtime:
            self.digests[file] = hashlib.sha1(raw).digest()
        if file == CONNECTIONS:
            self.connections = {c.id: c for c in decoded}
            self._frags[CONNECTIONS] = {c.id: files.encode_record(c) for c in decoded}
        elif file == STATE:
            self.state = {s.connection_id: s for s in decoded}
            self._frags[STATE] = {s.connection_id: files.encode_record(s) for s in decoded}
        elif file == SYNC_LOG:
            self._install_log(decoded)
        else:
            name = files.document_name(file)
            if name == "instances":
                try:
                    files.check_instance_refs(decoded, self.algorithm_names(), file, raw)
                except Invalid as e:
                    self.problems[file] = e.problem
                    log.error("file_invalid", file=file, problem=e.problem.format())
                    return
            self.documents[name] = decoded

    def decode(self, file: str, raw: bytes) -> Any:
        if file in self._frags:
            known = self.connections if file == CONNECTIONS else self.state
            records = _decode_known(file, raw, self._frags[file], known)
            if records is not None:
                return records
        return files.decode_file(file, raw)

    def _install_log(self, events: list[SyncEvent]) -> None:
        self.log = deque(events)
        self._log_frags = deque(files.encode_record(e) for e in events)
        if events:
            self.revision = max(self.revision, events[-1].id)

    def _reconcile(self) -> None:
        """Cross-file rules on load: state mirrors connections.

        Only when both files loaded: with connections.json invalid, memory has no connections,
        and "mirroring" would throw away every state record (volume factors, test results)."""
        if CONNECTIONS in self.problems or STATE in self.problems:
            return
        for cid in [c for c in self.state if c not in self.connections]:
            log.warning("state_orphan_dropped", connection_id=cid)
            del self.state[cid]
            self._frags[STATE].pop(cid, None)
        for cid, conn in self.connections.items():
            st = self.state.get(cid)
            fixed = mirror_state(conn, st, conn.updated_at or now_iso())
            if fixed is not st:
                self.state[cid] = fixed
                self._frags[STATE][cid] = files.encode_record(fixed)

    def _refresh_settings(self) -> None:
        content = self.documents.get("settings", {})
        self.settings = msgspec.convert(content, type=Settings)

    # --- the one door ----------------------------------------------------------------------

    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(
            self._write_loop(), name="ctsd-writer"
        )

    async def submit(self, op: Op, source: str) -> Any:
        """Apply `op` through the one door; returns its result once durable."""
        if self._closing:
            raise CtsdError("io_error", "the daemon is shutting down")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(op, source, fut))
        self._wake.set()
        return await fut

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
        for f, st in group.synced.items():
            self.stamps[f] = st
        for path, st in stamps.items():
            self.stamps[str(path.relative_to(self.data_dir))] = st
        for f in {*group.synced, *(str(p.relative_to(self.data_dir)) for p in stamps)}:
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
        elapsed = time.perf_counter() - t0
        for cb in self.on_commit:
            cb(elapsed, len(ok))
        for p in ok:
            if p.events:
                self._publish(p.events)
        for p in ok:
            if not p.future.done():
                p.future.set_result(p.result)

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

    # --- hand edits and reload -------------------------------------------------------------

    async def ingest(
        self, file: str, *, force: bool = False, _inline: bool = False, report: bool = True
    ) -> bool:
        """Take a file as it now is on disk in through the one door (`source: "file"`).

        Returns True when the content was taken in (or already matched), False when the file
        is invalid (it is then left exactly as it is, reported, and its writes refused).
        `report=False` only looks: an invalid file is neither reported nor marked (the watcher
        uses it to tell a half-written in-place save from a bad edit).
        """
        from ctsd import ops  # ops builds on the store; imported here to keep the flow one-way

        # Our own write of this file is in flight: its stamp is recorded when it returns, so
        # judging now would take our write for a hand edit (and decode it for nothing). A hand
        # edit meanwhile is still caught: the writer checks every file before it writes.
        while file in self._writing and not _inline:
            await self._write_done.wait()
        path = self.path(file)
        before = stamp_of(path)
        if not force and before is not None and self.unchanged(file) and file not in self.problems:
            return True  # our own write, or nothing new
        if before is None:
            return await self._restore_deleted(file, _inline=_inline)
        stamp: Stamp | None = None
        try:
            raw, stamp = await anyio.to_thread.run_sync(self._read, file)
            decoded = self.decode(file, raw)
            op = ops.take_in(file, decoded, raw, stamp, force=force)
        except Invalid as e:
            # Judged as read: record the stamp of the bytes decoded, not a later stat (a newer
            # version must not pass as already judged).
            if report:
                self._mark_invalid(file, e.problem, stamp or stamp_of(path))
            return False
        except FileNotFoundError:  # deleted between the stat and the open
            return await self._restore_deleted(file, _inline=_inline)
        except OSError as e:
            if report:
                self._mark_invalid(
                    file, FileProblem(file, 1, 1, "$", f"cannot read: {e.strerror}"), None
                )
            return False
        try:
            changes = await self._submit_here(_counted(op), _inline)
            exc = None
            if changes:  # the admin sees every hand edit taken in (never its values)
                log.info("hand_edit_taken_in", file=file, changes=changes, revision=self.revision)
        except CtsdError as e:
            exc = e
        if isinstance(exc, CtsdError) and exc.code == "invalid":
            if not report:
                return False
            self._mark_invalid(
                file,
                exc.extra.get("problem") or FileProblem(file, 1, 1, exc.path or "$", exc.message),
                stamp,
            )
            return False
        if exc is not None:
            log.warning("ingest_failed", file=file, error=str(exc))
            return False
        if self.coarse_mtime:
            self.digests[file] = hashlib.sha1(raw).digest()
        return True

    def unchanged(self, file: str) -> bool:
        """Is `file` on disk still what the store last read or wrote?

        Size, mtime and inode as recorded, and the ctime seen right after: an in-place edit
        that keeps the size and puts the mtime back still moves the ctime.
        """
        try:
            st = os.stat(self.path(file))
        except FileNotFoundError:
            return self.stamps.get(file) is None
        same = Stamp.of(st) == self.stamps.get(file) and st.st_ctime_ns == self.ctimes.get(file)
        if same and self.coarse_mtime and time.time_ns() - st.st_mtime_ns < DIGEST_WITHIN_NS:
            digest = self.digests.get(file)
            same = digest is not None and _file_digest(self.path(file)) == digest
        return same

    def _note_ctime(self, file: str) -> None:
        # Called right after a stamp is recorded: the rename of our own write moved the ctime
        # after the stamp was taken, so note it now (only if the stamp still matches).
        try:
            st = os.stat(self.path(file))
        except OSError:
            self.ctimes.pop(file, None)
            return
        if Stamp.of(st) == self.stamps.get(file):
            self.ctimes[file] = st.st_ctime_ns
        else:
            self.ctimes.pop(file, None)

    # --- late in-place writes ------------------------------------------------------------

    async def take_in_late(self, max_age: float) -> None:
        """Take in what in-place writers wrote into files our renames had displaced.

        An in-place writer (nano, cp, open("r+")) that opened a file before our rename
        replaced it writes into the old file, no longer in the directory. `write_files` keeps
        such a file (`self.displaced`) while that writer holds it open; once the writer has
        closed it (or after `max_age`, for one that never does), what it wrote is taken in
        through the door as a hand save made now (`ops.take_in` with no stamp: memory takes
        it, then the store writes the file). Called by the watcher often, and at close.
        """
        now = time.monotonic()
        due = [x for x in self.displaced if now - x[1] >= max_age or not written_elsewhere(x[0].fd)]
        self.displaced = [x for x in self.displaced if x not in due]
        for d, _since in due:
            file = str(d.path.relative_to(self.data_dir))
            try:
                await self._take_in_displaced(d, file)
            except Exception as e:  # never lose the watcher over it, nor the bytes
                log.exception("late_hand_write_failed", file=file)
                with contextlib.suppress(Exception):
                    self._keep_late(d, file, "error", None, repr(e))
            _drop(d)

    async def _take_in_displaced(self, d: Displaced, file: str) -> None:
        from ctsd import ops

        st = os.fstat(d.fd)
        if Stamp.of(st) == d.stamp:
            return  # opened for writing, never written
        if st.st_size > files.MAX_FILE_BYTES:
            limit = f"file is {st.st_size} bytes; the limit is {files.MAX_FILE_BYTES}"
            self._keep_late(d, file, "invalid", FileProblem(file, 1, 1, "$", limit))
            return
        raw = await anyio.to_thread.run_sync(os.pread, d.fd, st.st_size, 0)
        try:
            await self.submit(ops.take_in(file, self.decode(file, raw), raw, None), "file")
        except Invalid as e:
            self._keep_late(d, file, "invalid", e.problem)
        except CtsdError as e:  # superseded (conflict), file_invalid on disk, io_error, ...
            self._keep_late(d, file, e.code, e.extra.get("problem"), e.message)
        else:
            log.warning("late_hand_write_taken_in", file=file, bytes=len(raw))

    def _keep_late(
        self, d: Displaced, file: str, why: str, problem: FileProblem | None, msg: str = ""
    ) -> None:
        """A late write that is not taken in is never dropped: it is kept next to its file as
        `<name>.late-<UTC time>`, which the daemon never reads, writes or deletes, and which
        the operator finds with `ls`. Bytes that do not decode are reported the way an
        invalid file is (a `file_invalid` notice naming the copy, with line and column), but
        the data file is valid, so nothing is refused and /health stays ok. The other cases
        (a newer save superseded it, the file is invalid on disk, a write failed) are logged.
        """
        when = now_iso().replace(":", "")
        for n in itertools.count():
            kept = d.path.with_name(f"{d.path.name}.late-{when}{f'.{n}' if n else ''}")
            try:
                os.link(d.kept, kept)  # no clobbering: never replaces an earlier copy
                break
            except FileExistsError:
                continue
        name = str(kept.relative_to(self.data_dir))
        log.warning("late_hand_write_kept", file=file, kept=name, why=why, error=msg or None)
        if problem is not None:
            self._notice(
                {
                    "notice": "file_invalid",
                    "file": name,
                    "line": problem.line,
                    "column": problem.column,
                    "path": problem.path,
                    "message": problem.message,
                    "reason": f"written into {file} after the daemon had replaced it; "
                    f"kept as {name}, not taken in",
                }
            )

    def _mark_invalid(self, file: str, problem: FileProblem, stamp: Stamp | None) -> None:
        if stamp is not None:
            self.stamps[file] = stamp  # judged as it is now; a later edit changes the stamp
        if self.problems.get(file) == problem:
            return
        self.problems[file] = problem
        log.error("file_invalid", file=file, problem=problem.format())
        self._notice(
            {
                "notice": "file_invalid",
                "file": file,
                "line": problem.line,
                "column": problem.column,
                "path": problem.path,
                "message": problem.message,
            }
        )

    async def _restore_deleted(self, file: str, *, _inline: bool) -> bool:
        """A data file deleted by hand is written back from memory, with a notice."""
        from ctsd import ops

        if (
            file.startswith(f"{files.ALGORITHMS_DIR}/")
            and files.document_name(file) not in self.documents
        ):
            # A new algorithm file that never was valid, removed: nothing to restore, and
            # its problem went with it.
            self.stamps.pop(file, None)
            if self.problems.pop(file, None) is not None:
                log.info("file_restored", file=file, was="removed")
                self._notice({"notice": "file_restored", "file": file, "reason": "removed"})
            return True
        reason = "deleted; written back from memory"
        try:
            if file.startswith(f"{files.ALGORITHMS_DIR}/"):
                # algorithms/ is a library of files: deleting one removes that algorithm,
                # unless instances.json still names it (then it comes back, with a notice).
                try:
                    await self._submit_here(ops.remove_algorithm(file), _inline)
                    self.problems.pop(file, None)
                    log.info("algorithm_removed", file=file)
                    return True
                except CtsdError as e:
                    if e.code != "conflict":
                        raise
                    reason = f"deleted, but {e.message}; written back from memory"
            self.stamps[file] = None
            self.problems.pop(file, None)
            await self._submit_here(ops.touch(file), _inline)
        except CtsdError as e:
            log.error("restore_failed", file=file, error=e.message)
            return False
        log.warning("file_restored_from_memory", file=file)
        self._notice({"notice": "file_restored", "file": file, "reason": reason})
        return True

    async def _submit_here(self, op: Op, inline: bool) -> Any:
        """Submit with source "file"; from inside the writer (`inline`), commit it now."""
        if not inline:
            return await self.submit(op, "file")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._commit_group([_Pending(op, "file", fut)])
        if not fut.done():
            raise CtsdError("internal", "inline commit did not answer")
        return fut.result()

    async def reload_all(self) -> None:
        """SIGHUP: every data file taken in the same way a hand edit is."""
        for file in self.known_files():
            await self.ingest(file, force=True)

    # --- read views (for the bus, HTTP, sweeps) ------------------------------------------

    def state_view(self, cid: str) -> ConnectionState | None:
        st = self.state.get(cid)
        if st is None:
            return None
        # The newer of memory and file wins: a test result or a hand edit may have written a
        # later heartbeat than the last one held in memory (timestamps compare as strings).
        hb = self.heartbeats.get(cid)
        ls = self.last_sync.get(cid)
        newer_hb = hb is not None and (st.last_heartbeat_at is None or hb > st.last_heartbeat_at)
        newer_ls = ls is not None and (st.last_sync_at is None or ls > st.last_sync_at)
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


def _drop(d: Displaced) -> None:
    os.close(d.fd)
    with contextlib.suppress(OSError):
        os.unlink(d.kept)


def _counted(op: Op) -> Op:
    """`op`, answering how many sync-log events it emitted."""

    def counted(tx: Tx) -> int:
        op(tx)
        return len(tx.events)

    return counted


def _fail(p: _Pending, err: CtsdError) -> None:
    if not p.future.done():  # a cancelled caller must not break the group
        p.future.set_exception(err)


INLINE_RETRY_S = 0.005
# Coarse clocks only: a stamp whose mtime is this recent may be shared by a second write, so
# `unchanged` compares the digest too (far above a clock tick of 1-10 ms).
DIGEST_WITHIN_NS = 50_000_000


def _timestamps_coarse(directory: Path) -> bool:
    """Can two writes in a row, with a stat between (as we do), share an mtime here?"""
    probe = directory / f"{TEMP_PREFIX}probe.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            last = -1
            for _ in range(20):
                os.write(fd, b"x")
                mtime = os.fstat(fd).st_mtime_ns
                if mtime == last:
                    return True
                last = mtime
        finally:
            os.close(fd)
    except OSError:
        return True  # cannot tell: assume the worst
    finally:
        probe.unlink(missing_ok=True)
    return False


def _digest_of(body: Any) -> bytes:
    h = hashlib.sha1()
    for chunk in [body] if isinstance(body, bytes | bytearray | memoryview) else body:
        h.update(chunk)
    return h.digest()


def _file_digest(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha1").digest()
    except OSError:
        return None


_SPLIT = b"},\n  {"  # between two records as we write them (inside a record lines go deeper)
_NEXT = b",\n  {"


def _decode_known(
    file: str, raw: bytes, frags: dict[str, bytes], known: dict[str, Any]
) -> list[Any] | None:
    """A table file decoded at the cost of the records that differ from what we wrote.

    A hand edit usually changes a few records of a file we wrote: records whose bytes equal
    our encoding are reused (compared in place, nothing copied), only the others are decoded
    and validated one by one. None when the file is not laid out as we write it or anything
    does not decode: the full decoder then runs and, for an invalid file, reports the exact
    position.
    """
    if not (raw.startswith(b"[\n  {") and raw.endswith(b"}\n]\n")) or not frags:
        return None
    kind = files.TABLES[file]
    key = "connection_id" if kind is ConnectionState else "id"
    ids, ours = list(frags), list(frags.values())
    budget = max(16, len(ours) // 8)  # beyond this many new records one full decode is faster
    end = len(raw) - 3  # where the closing "\n]\n" starts

    def ours_at(k: int, pos: int) -> int:
        """Where our record k ends if the file holds exactly it at `pos`, else -1."""
        if k >= len(ours) or not raw.startswith(ours[k], pos):
            return -1
        stop = pos + len(ours[k])
        return stop if stop == end or raw.startswith(_NEXT, stop) else -1

    out: list[Any] = []
    pos, j = 2, 0
    while pos < end:
        if (stop := ours_at(j, pos)) >= 0:
            out.append(known[ids[j]])
            j += 1
        elif (stop := ours_at(j + 1, pos)) >= 0:  # our record j was deleted
            out.append(known[ids[j + 1]])
            j += 2
        else:  # changed (or inserted): decode it alone
            budget -= 1
            if budget < 0:
                return None
            split = raw.find(_SPLIT, pos, end)
            stop = end if split < 0 else split + 1
            try:
                record = msgspec.json.decode(raw[pos:stop], type=kind)
            except msgspec.MsgspecError:
                return None
            if kind is Connection and files.connection_settings_problem(record.connection_settings):
                return None
            out.append(record)
            if j < len(ids) and getattr(record, key) == ids[j]:
                j += 1  # our record j, edited; else one inserted before it
        pos = stop + 2  # past ",\n" (or past the end)
    if len({getattr(r, key) for r in out}) != len(out):
        return None  # a duplicate id: the full decoder names both places
    return out


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
