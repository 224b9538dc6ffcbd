"""The store: the one door every change goes through, around the pure core.

    submit(op) → group commit (the committer): core.apply_group → journal append + fdatasync
    → install in memory → publish the events → answer (with `sync: files`, once the files
    hold it too)

Changes arrive as ops (`ops.py`) from the bus, HTTP, the CLI, the watcher (hand edits), the
sweeps and the probes. One writer task takes every change queued while the previous append
was in flight (under load, after a short wait for more: GROUP_FILL_S) and journals them
together (group commit); each caller is answered once its own change is durable. How a
group is made durable is the committer's (`committer.py`): the journal on one host, the
cluster's stream and then the journal in cluster mode, where changes other hosts made
arrive through `install` and `publish` too. A change that fails validation fails alone; an
append that fails (disk full, read-only) fails the group and memory stays as it was. The
data files follow through the checkpointer; the files come in through the intake.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import structlog

from ctsd import ops
from ctsd.bases import Bases
from ctsd.checkpoint import Checkpointer
from ctsd.committer import Committer, LocalCommitter
from ctsd.core import (
    Change,
    Committed,
    Context,
    Op,
    Outcome,
    Request,
    loaded_files,
    replayed,
    replayed_onto,
)
from ctsd.diagnose import FileProblem
from ctsd.disk import Disk
from ctsd.errors import CtsdError
from ctsd.files import ALGORITHMS_DIR, SYNC_LOG, Invalid
from ctsd.intake import Intake, Late
from ctsd.journal import Journal, JournalError, JournalLost
from ctsd.models import Connection, ConnectionState, Settings, SyncEvent
from ctsd.redact import mask_if_needed
from ctsd.sealer import Sealer, secure_loaded
from ctsd.secretbox import SecretBox
from ctsd.secretfields import SECRET_FILES
from ctsd.timeutil import beat_after, later, now_iso

log = structlog.get_logger("ctsd.store")

EventsListener = Callable[[list[SyncEvent]], None]
NoticeListener = Callable[[dict[str, Any]], None]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass
class _Pending:
    request: Request
    future: asyncio.Future[Any]


# Group commit under load, as PostgreSQL's commit_delay with commit_siblings: when the last
# group held GROUP_FILL_AFTER changes or more, many writers are active, and the next group
# waits up to GROUP_FILL_S for as many changes as the last one held (their writers, answered,
# send their next) rather than going out with the first of them. Each group costs a journal
# append with its fdatasync, and in cluster mode a stream message every host applies: fewer,
# fuller groups carry more changes per second, and under such a load each change waits less
# in all. A few writers never wait, nor does the first change after GROUP_IDLE_S without any.
GROUP_FILL_AFTER = 4
GROUP_FILL_S = 0.002
GROUP_IDLE_S = 0.010

# A small journal job slower than this (the disk stalls) sends the next ones to the journal
# thread, until one there is quick again and at least SLOW_DISK_HOLD_S have passed: see
# `Store.append`. Well above what an fdatasync takes while our own checkpoint of a large
# table is being written back (milliseconds), which is no stall.
INLINE_APPEND_MAX_S = 0.050
SLOW_DISK_HOLD_S = 5.0
# A record larger than this (an import, a restore, a large document) is written by the
# journal thread whatever the disk: its write would hold the event loop up by itself.
INLINE_APPEND_MAX_BYTES = 256 * 1024


class Store:
    """Committed memory, the one door (`submit`), and the parts that move files in and out."""

    def __init__(self, data_dir: Path, box: SecretBox | None = None) -> None:
        self.data_dir = data_dir
        # The secrets key (None inside: plain-text mode); a rekey through the door replaces it.
        self.box = box if box is not None else SecretBox(None)
        self.committed = Committed()
        self.problems: dict[str, FileProblem] = {}
        # Per file invalid at start: what the journal replayed onto memory for it (key →
        # fields), which its fix must not take back (`core.base_of_unread`).
        self.replayed_onto: dict[str, dict[str, list[str] | None]] = {}
        # Heartbeats live here, in memory at once; the sweeps' periodic flush writes them.
        self.heartbeats: dict[str, str] = {}
        self.disk = Disk(data_dir)
        self.intake = Intake(self, self.disk)
        self.journal = Journal(data_dir)
        # One thread for the journal's rewrites, large records, and its appends and cuts while
        # the disk is slow (`append`): every journal job happens in order.
        self._io = ThreadPoolExecutor(1, thread_name_prefix="ctsd-journal")
        self._io_jobs = 0  # journal jobs handed to that thread and not yet done
        self._disk_slow_until = 0.0  # appends go to the thread until then (see `append`)
        self._growing = False  # the journal's room ahead is being written (`_make_room`)
        self.journal_error: str | None = None  # the last append's failure (`status`)
        self.checkpointer = Checkpointer(
            self.committed,
            self.disk,
            invalid=lambda: set(self.problems),
            invalid_error=self._invalid_error,
            lock=self.file_lock,
            take_in=lambda f: self.intake.ingest_locked(f, report=False),
            compact=self._compact,
            sync_journal=self.journal.sync_written,
        )
        self.intake.write_back = self.checkpointer.write_back
        self.intake.written = self.checkpointer.mark_written
        self.intake.valid_again = self.checkpointer.valid_again
        self.checkpointer.on_displaced = self._displaced
        self._locks: dict[str, asyncio.Lock] = {}
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._last_group = 0
        self._filled: asyncio.Future[None] | None = None  # set once the group has filled
        self._fill_size = 0
        self._writer: asyncio.Task[None] | None = None
        self._checkpoints: asyncio.Task[None] | None = None
        self._closing = False
        self.events_listeners: list[EventsListener] = []
        self.notice_listeners: list[NoticeListener] = []
        # A hand edit of this host's taken in (its file): also one that makes no event (a
        # cluster host's own settings keys) or comes to the other hosts as their events.
        self.hand_edit_listeners: list[Callable[[str], None]] = []
        # The shared state replaced from a cluster snapshot (`replaced`): True when the events
        # published before do not lead to it (the snapshot's history skips some).
        self.replaced_listeners: list[Callable[[bool], None]] = []
        # At start: files edited while down (`set_back`) → the digest of what they hold, and
        # those found to hold a hand edit the journal took in already (`replay`).
        self._found: dict[str, str] = {}
        self.not_edited: set[str] = set()
        # The settings document installed anew (by any change: one with no event too, as a
        # cluster host's edit of its own keys): the watcher may switch its mode.
        self.settings_listeners: list[Callable[[], None]] = []
        self.on_commit: list[Callable[[float, int], None]] = []  # (seconds, changes): metrics
        # (seconds, filled): a group waited to fill, for that long, and filled or timed out
        self.on_fill: list[Callable[[float, bool], None]] = []
        self.watch_again: Callable[[str], None] = lambda _file: None  # set by the watcher
        # How a group is made durable: the journal here, or the cluster (set by the app).
        self.committer: Committer = LocalCommitter(self)

    # --- reads (committed memory) ----------------------------------------------------------------

    @property
    def connections(self) -> dict[str, Connection]:
        return self.committed.connections

    @property
    def state(self) -> dict[str, ConnectionState]:
        return self.committed.state

    @property
    def documents(self) -> dict[str, dict[str, Any]]:
        return self.committed.documents

    @property
    def log(self) -> Any:
        return self.committed.log

    @property
    def revision(self) -> int:
        return self.committed.revision

    @property
    def settings(self) -> Settings:
        return self.committed.settings

    @property
    def version(self) -> int:
        return self.committed.version

    def path(self, file: str) -> Path:
        return self.data_dir / file

    def known_files(self) -> list[str]:
        return self.intake.known_files()

    def oldest_revision(self) -> int:
        return self.committed.oldest_revision()

    def events_since(self, since: int) -> list[SyncEvent]:
        return self.committed.events_since(since)

    def state_view(self, cid: str) -> ConnectionState | None:
        """A state record with the latest heartbeat held in memory (the flush writes it)."""
        st = self.committed.state.get(cid)
        if st is None:
            return None
        hb = self.heartbeats.get(cid)
        stored = st.last_heartbeat_at
        if hb is not None and (later(hb, stored) or beat_after(hb, stored, now_iso())):
            st = msgspec.structs.replace(st, last_heartbeat_at=hb)
        return st

    def state_views(self) -> Iterable[ConnectionState]:
        for cid in self.committed.state:
            yield self.state_view(cid)  # type: ignore[misc]

    def file_lock(self, file: str) -> asyncio.Lock:
        lock = self._locks.get(file)
        if lock is None:
            lock = self._locks[file] = asyncio.Lock()
        return lock

    def status(self) -> dict[str, Any]:
        """The journal and the checkpoint, for `status` and /health."""
        cp = self.checkpointer
        return {
            "journal_bytes": self.journal.size(),
            "journal_records": self.journal.pending,
            "checkpoint_lag_s": round(cp.lag_s, 3),
            "unwritten_files": sorted(cp.dirty),
            # The last append's failure (changes are refused while it lasts), None once one
            # succeeds: /health shows it, as the disk's state alone may not (EIO).
            "journal_error": self.journal_error,
        }

    def secrets_status(self) -> dict[str, Any]:
        """Whether secrets are encrypted at rest, and under which key (never the key)."""
        return {"encrypted": self.box.encrypting, "key_id": self.box.key_id}

    async def rekey(self, new_box: SecretBox, source: str) -> tuple[Any, int]:
        """Every secret re-encrypted under `new_box`'s key: one change through the door (its
        answer, and the revision right after it). Refused while a file holding secrets is
        invalid on disk: memory does not hold what it holds, so its secrets would stay under
        the old key, and a restart with the new one would refuse them."""
        for file in SECRET_FILES:
            if (problem := self.problems.get(file)) is not None:
                raise CtsdError(
                    "file_invalid",
                    f"{file} is invalid on disk ({problem.format()}): its secrets cannot be "
                    "re-encrypted; fix it, then re-key",
                    extra={"file": file},
                )
        was = self.box.key_id
        try:
            answer = await self.submit_answer(ops.rekey(new_box), source, sync="files")
            # The admin reading the log sees the key switch (the sync log has it too).
            log.warning("secrets_rekeyed", key_id=new_box.key_id, was=was, source=source)
            return answer
        finally:
            # The journal's records from before hold values under the old key (or plain):
            # gone from the file at the first cut past the re-key, asked for now. (Also when
            # its answer failed: it may be journalled all the same.)
            self.journal.scrub_through = self.journal.lsn
            self.checkpointer.force_cut = True
            self.checkpointer.wake.set()

    def landed(self, msg_id: str) -> bool:
        return self.committer.landed(msg_id)

    def committer_status(self) -> dict[str, Any] | None:
        """The cluster's part of /health and `status` (None on one host)."""
        return self.committer.status()

    # --- start and stop --------------------------------------------------------------------------

    def open(self) -> int:
        """Create what is missing, load every file, replay the journal onto them (no copies:
        files edited while down are read as they are). Returns how many journalled changes
        were replayed (they are written before the door opens)."""
        self.load()
        return self.replay()

    def load(self, bases: Bases | None = None) -> None:
        """Create what is missing, load every file (the first half of `open`; `bases`: the
        copies a file deleted while the daemon was down is written again from, and that
        `set_back` judges the files by next)."""
        self.intake.prepare(bases.content if bases is not None else lambda _file: None)
        self.intake.load(self.committed)

    def set_back(self, bases: Bases) -> list[str]:
        """Between `load` and `replay`: the files edited or deleted while the daemon was down
        set back to their copies (`bases`); returns the edited ones, to take in once the
        store has started (`take_in_edited`; in cluster mode, caught up with the cluster)."""
        names = [f for f in self.intake.known_files() if f != SYNC_LOG]
        judged = bases.judge(names, self.intake.created, set(self.problems))
        for file, raw in judged.deleted.items():
            self._set_back(file, raw, edited=False)
        # The journal's hand edits then replay with what the copies hold (what the daemon
        # knew the file to hold): an edit made since, while it was down, is taken in later.
        edited = [f for f, raw in judged.edited.items() if self._set_back(f, raw, edited=True)]
        self._found = {f: judged.found[f] for f in edited if f in judged.found}
        self.committed.refresh_settings()
        # From here every write and take-in of a file (the sync log aside) keeps its copy.
        self.checkpointer.bases = bases
        self.intake.keep_copy = bases.keep
        self.intake.copy_digest = bases.copy_digest
        return sorted(edited)

    def _set_back(self, file: str, raw: bytes | None, *, edited: bool) -> bool:
        try:
            self.intake.set_back(file, raw, self.committed, edited=edited)
        except Invalid as e:  # a copy this version no longer reads: the file as it is
            log.warning("base_copy_unreadable", file=file, reason=e.problem.format())
            return False
        return True

    def replay(self) -> int:
        """Replay the journal onto the files as loaded (the second half of `open`); returns
        how many changes it held."""
        self.intake.reconcile(self.committed)
        sync_log = self.disk.files.get(SYNC_LOG)
        files_revision: int | None = (
            None  # invalid on disk: its revision is not known
            if SYNC_LOG in self.problems
            else sync_log.content[-1].id
            if sync_log and sync_log.content
            else 0
        )
        # (one created at this start, missing, is no log emptied by hand: the files were
        # removed, and the journal may be another's)
        emptied = files_revision == 0 and SYNC_LOG not in self.intake.created
        try:
            recovered = self.journal.open(files_revision, self.committed.log, log_emptied=emptied)
        except JournalError as e:
            if SYNC_LOG in self.intake.created:  # made by this start: left, the next one
                # (systemd's restart a moment later) would take it for a log emptied by hand
                made = self.disk.path(SYNC_LOG)
                with contextlib.suppress(OSError):
                    if made.read_bytes() == b"[]\n":  # (not one saved since: that one stays)
                        made.unlink()
            raise CtsdError("io_error", str(e)) from None
        if recovered.dropped_bytes:
            log.warning("journal_torn_tail_dropped", bytes=recovered.dropped_bytes)
        taken: dict[str, str] = {}  # file → the digest of its last hand edit taken in
        for change in recovered.changes:
            taken.update(change.taken)
        # (algorithms first: instances.json is checked against them)
        found = sorted(self._found.items(), key=lambda f: not f[0].startswith(ALGORITHMS_DIR))
        for file, digest in found:
            if taken.get(file) == digest and self.intake.load_as_found(
                file, self.committed, digest
            ):
                self.not_edited.add(file)
                log.warning("hand_edit_taken_in_before_a_crash", file=file)
        if self.not_edited:
            self.intake.reconcile(self.committed)  # (a file loaded again)
        touched: set[str] = set()
        on_disk, invalid = loaded_files(self.committed), frozenset(self.problems)
        # The files' revision as of the journal's last cut: all there is to go on when the
        # sync log did not load (its ids are never given out again).
        self.committed.revision = max(self.committed.revision, recovered.base_revision)
        for change in recovered.changes:
            self.committed.apply(replayed(change, on_disk, invalid, self.committed))
            touched |= change.files()
        self.replayed_onto = replayed_onto(recovered.changes, invalid)
        # Every stored secret must decrypt; plain ones are encrypted, written before READY.
        sealed = secure_loaded(self.box, self.committed, set(self.problems))
        sealed |= _masked_log(self.committed)
        if self.box.encrypting and self.journal.end > self.journal.header_end:
            # Its bytes (records the cuts after them dropped included) may hold secrets in
            # plain text, or under a key retired offline: written before this key was set.
            # Gone from the file at the first cut past its live records (those replayed, in
            # memory now), which the first round makes: at once when there are none.
            live = self.journal.offsets
            self.journal.scrub_through = live[-1][0] if live else 0
            self.checkpointer.force_cut = True
            self.checkpointer.wake.set()
        self.checkpointer.seed()
        if touched:
            log.warning("journal_replayed", changes=len(recovered.changes), files=sorted(touched))
            # From the first replayed record on: a cut must keep every one of them until
            # their files are written (a round that fails to write one cuts nothing of it).
            self.checkpointer.note(touched, self.journal.offsets[0][0])
        if touched | sealed:
            self.checkpointer.note(touched | sealed, self.journal.lsn)
        # Memory holds everything up to the journal's last lsn (a cut's too): a journal made
        # anew from it is stamped so (`_rebuild_journal`).
        self.checkpointer.installed = max(self.checkpointer.installed, self.journal.lsn)
        c = self.committed
        _warn_seed_origins(c)
        oldest = c.oldest_revision()
        if c.log and oldest > c.log[0].id and not _restored_at(c.log, oldest):
            log.warning(
                "sync_log_gap",
                oldest_resumable=oldest,
                reason=f"ids are missing before {oldest} in {SYNC_LOG} (entries "
                "removed by hand while the daemon was down?): a bot resuming from an earlier "
                "revision gets revision_compacted and takes a snapshot",
            )
        log.info(
            "loaded",
            connections=len(self.connections),
            revision=self.revision,
            invalid=sorted(self.problems),
        )
        return len(recovered.changes)

    async def start(self) -> None:
        """Open the door; changes replayed from the journal reach the files first."""
        loop = asyncio.get_running_loop()
        # What the files edited while down hold is judged before any round runs (`replay`; in
        # cluster mode the catch-up, `taken_in_before_a_crash`): from here, a file that
        # changes under the rounds is taken in as any hand edit.
        self._found = {}
        if self.checkpointer.bases is not None:
            self.checkpointer.bases.unmark()  # before the first write
        # The writer first: a file edited while the daemon was down is taken in through it
        # before the round writes (nothing else comes to the door yet).
        self._writer = loop.create_task(self._write_loop(), name="ctsd-writer")
        if self.checkpointer.dirty:
            await self.checkpointer.round()
        self._checkpoints = loop.create_task(self.checkpointer.run(), name="ctsd-checkpoint")

    async def abandon(self) -> None:
        """Close without writing a file (a start refused before the door opened): the journal
        keeps every change for the next start."""
        await self.committer.close()
        self.journal.close()
        self._io.shutdown(wait=True)

    async def close(self) -> None:
        """Take in late writes, finish every queued change, write everything to the files."""
        if self._writer is not None and not self._closing:
            await self.intake.take_in_late(max_age=0, final=True)
        self._closing = True
        self._wake.set()
        if self._filled is not None:  # a group filling up goes now: nothing more will come
            _resolve(self._filled)
        if self._writer is not None:
            await self._writer
        await self.committer.close()  # cluster mode: no other host's change comes in after
        if self._checkpoints is not None:
            self.checkpointer.stop()
            await self._checkpoints
        self.intake.closing = True  # no round comes after these: nothing is left for later
        whole = await self.checkpointer.close()
        bases = self.checkpointer.bases
        if bases is not None:
            # The copies left for later written, and (every file written) the clean stop's mark.
            last = bases.stopped_cleanly if whole else bases.catch_up
            try:
                await asyncio.get_running_loop().run_in_executor(self._io, last)
            except OSError as e:  # no mark: the next start is as careful as after a crash
                log.warning("clean_stop_not_marked", reason=str(e))
        self.journal.close()
        self._io.shutdown(wait=True)

    # --- the one door ----------------------------------------------------------------------------

    async def submit(
        self, op: Op, source: str, *, if_match: int | None = None, sync: str | None = None
    ) -> Any:
        """Apply `op` through the one door; its result once durable.

        `if_match`: refuse (`precondition_failed`) when a record the change touches changed
        after that revision. `sync="files"`: answer once the change is in the data files.
        """
        return (await self.submit_answer(op, source, if_match=if_match, sync=sync))[0]

    async def submit_answer(
        self, op: Op, source: str, *, if_match: int | None = None, sync: str | None = None
    ) -> tuple[Any, int]:
        """`submit`, and the revision its change reached (its last event's; when it made
        none, the one it was applied at): the revision of its answer, which later groups may
        have moved past by the time it is answered (`X-Revision`, which an `If-Match` then
        gives back: a later revision would pass over a change its answer never showed)."""
        out, lsn = await self._submit(Request(op, source, if_match))
        if sync == "files":
            await self.in_files(out, lsn)
        return out.result, (out.events[-1].id if out.events else out.seen)

    async def in_files(self, out: Outcome, lsn: int | None) -> None:
        """Until a change (as `enqueue` answers it) is in the data files."""
        if lsn is not None:
            await self.checkpointer.wait_written(out.files, lsn)

    async def submit_take_in(self, op: Op, file: str) -> tuple[Outcome, int | None]:
        """A hand edit of `file` (source "file"): its outcome and the lsn its change got
        (None: none)."""
        return await self._submit(Request(op, "file", file=file))

    async def _submit(self, request: Request) -> tuple[Outcome, int | None]:
        return await self.enqueue(request)

    def enqueue(self, request: Request) -> asyncio.Future[tuple[Outcome, int | None]]:
        """`request` into the next group; its future resolves as `submit` returns (without
        `sync`): (its Outcome, the lsn of its change), or the refusal. For a caller that
        answers from a callback: the bus, which has a whole connection of changes in flight
        and no task to spare for each."""
        if self._closing:
            raise CtsdError("io_error", "the daemon is shutting down")
        fut: asyncio.Future[tuple[Outcome, int | None]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(request, fut))
        self._wake.set()
        filled = self._filled
        if filled is not None and len(self._pending) >= self._fill_size and not filled.done():
            filled.set_result(None)
        return fut

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        done_at = 0.0  # when the last group was answered
        while True:
            await self._wake.wait()
            if (
                len(self._pending) < self._last_group
                and loop.time() - done_at < GROUP_IDLE_S
                and not self._closing
            ):
                await self._fill(self._last_group)
            self._wake.clear()
            batch, self._pending = self._pending, []
            batch = [p for p in batch if not p.future.done()]  # callers gone: skip
            self._last_group = len(batch) if len(batch) >= GROUP_FILL_AFTER else 0
            if batch:
                try:
                    await self._commit(batch)
                except Exception:  # never let the writer die: fail the group, go on
                    log.exception("commit_failed")
                    for p in batch:
                        _fail(p.future, CtsdError("internal", "commit failed; see the log"))
                done_at = loop.time()
            if self._closing and not self._pending:
                return

    async def _fill(self, size: int) -> None:
        """Until `size` changes are queued, or GROUP_FILL_S has passed."""
        loop = asyncio.get_running_loop()
        self._filled = filled = loop.create_future()
        self._fill_size = size
        timer = loop.call_later(GROUP_FILL_S, _resolve, filled)
        t0 = loop.time()
        try:
            await filled
        finally:
            timer.cancel()
            self._filled = None
        for cb in self.on_fill:  # (metrics: never a reason for the writer to stop)
            with contextlib.suppress(Exception):
                cb(loop.time() - t0, len(self._pending) >= size)

    async def _commit(self, batch: list[_Pending]) -> None:
        t0 = time.perf_counter()
        outcomes, lsn = await self.committer.commit([p.request for p in batch])
        if lsn is not None:
            elapsed = time.perf_counter() - t0
            for cb in self.on_commit:
                cb(elapsed, sum(1 for o in outcomes if o.error is None))
        for p, out in zip(batch, outcomes, strict=True):
            if p.future.done():
                continue
            if out.error is not None:
                p.future.set_exception(out.error)
            else:
                p.future.set_result((out, lsn if out.files else None))

    def _invalid_error(self, file: str) -> CtsdError:
        problem = self.problems.get(file)
        why = problem.format() if problem is not None else f"{file} is invalid"
        return CtsdError(
            "file_invalid",
            f"the change is saved (journal) but {file} is invalid on disk ({why}); it reaches "
            "the file once the file is fixed",
            extra={"file": file},
        )

    def context(self) -> Context:
        """What the core is told for the next group: the time, invalid files, heartbeats, and
        the sealer that puts secrets in their stored form under the current key."""
        invalid = {f: p.format() for f, p in self.problems.items()}
        return Context(now_iso(), invalid, self.heartbeats, Sealer(self.box))

    async def append(self, change: Change, seq: int | None = None, *, sync: bool = True) -> int:
        """Journal `change`; its lsn. `sync=False` (a change another host made, which the
        cluster's stream holds durably and this host acknowledges to nobody): written without
        an fdatasync of its own; a host that loses it re-applies it from the stream.

        On the event loop while the disk is quick, and nothing else is queued for the journal
        thread (the order of journal jobs is kept): handing a quick fdatasync to a thread
        costs more than it, as the thread must win the GIL back from a busy loop before the
        group can be answered. After a slow one, on the thread (`INLINE_APPEND_MAX_S`); a
        large record always."""
        try:
            try:
                lsn = await self._append(change, seq, sync)
            except JournalLost as lost:  # (the change is not installed: appended again)
                await self._rebuild_journal(lost)
                lsn = await self._append(change, seq, sync)
        except OSError as e:
            self.journal_error = e.strerror or str(e)
            raise
        self.journal_error = None
        self._make_room()
        return lsn

    async def _append(self, change: Change, seq: int | None, sync: bool) -> int:
        lsn, data = self.journal.record(change, seq, sync=sync)
        job = functools.partial(self.journal.append_record, lsn, data, seq, sync=sync)
        if len(data) > INLINE_APPEND_MAX_BYTES:
            return int(await self._on_io(job, judged=False))
        return int(await self._journal(job))

    async def _rebuild_journal(self, lost: JournalLost) -> None:
        """The journal file lost (`JournalLost`): made anew from memory, before anything is
        appended to it."""
        carry, base = self.checkpointer.beyond_files()
        upto = self.checkpointer.installed  # (what the carry holds)
        await self._on_io(functools.partial(self.journal.rebuild, carry, base, upto), judged=False)
        log.error(
            "journal_rebuilt",
            reason=lost.strerror,
            message="the journal was made anew from memory; never touch .journal",
        )

    def _make_room(self) -> None:
        """The journal's room ahead written on a helper thread (`Journal.grow`), neither on
        the event loop nor on the journal thread, once it runs short (after an append, or a
        cut back to the header or a rewrite): the appends go on meanwhile."""
        if self._growing or not self.journal.wants_room():
            return
        self._growing = True

        def done(fut: asyncio.Future[None]) -> None:
            self._growing = False
            if not fut.cancelled() and (e := fut.exception()) is not None:
                # Disk full, say: the appends go on, each lengthening the file as it goes.
                log.warning("journal_room_not_written", error=str(e))

        fut = asyncio.get_running_loop().run_in_executor(None, self.journal.grow)
        fut.add_done_callback(done)

    async def _journal(self, job: Callable[[], Any]) -> Any:
        """A quick journal job (an append, a cut): on the event loop unless the disk was slow
        lately or the journal thread has work queued (journal jobs keep their order)."""
        if self._io_jobs or time.monotonic() < self._disk_slow_until:
            return await self._on_io(job)
        t0 = time.perf_counter()
        try:
            return job()
        finally:
            self._judge(time.perf_counter() - t0)

    def _judge(self, took: float) -> None:
        """A small journal job took `took` seconds (raising or not): a stall keeps the next
        ones off the event loop; a quick one on the thread after the hold lets them back."""
        if took > INLINE_APPEND_MAX_S:
            if time.monotonic() >= self._disk_slow_until:
                log.warning("journal_append_slow", seconds=round(took, 3))
            self._disk_slow_until = max(self._disk_slow_until, time.monotonic() + SLOW_DISK_HOLD_S)

    async def _on_io(self, job: Callable[[], Any], *, judged: bool = True) -> Any:
        """`job` on the journal thread. Counted until the thread is done with it, even when
        the caller is cancelled: no append runs inline while a job may still be running.
        `judged`: its time tells whether the disk stalls (not so for a large record)."""
        loop = asyncio.get_running_loop()

        def timed() -> Any:
            t0 = time.perf_counter()
            try:
                return job()
            finally:
                took = time.perf_counter() - t0
                if judged:
                    with contextlib.suppress(RuntimeError):  # the loop closed: nothing to judge
                        loop.call_soon_threadsafe(self._judge, took)

        done = self._io.submit(timed)
        self._io_jobs += 1
        done.add_done_callback(lambda _: loop.call_soon_threadsafe(self._io_done))
        return await asyncio.wrap_future(done)

    def _io_done(self) -> None:
        self._io_jobs -= 1

    def install(
        self, change: Change, lsn: int, ctx: Context | None = None, exact: bool = False
    ) -> None:
        """A journalled change into memory (and onto the checkpointer's list). `ctx`: the
        context the change was computed in; a rekey in it is durable now, so secrets are
        sealed under its key from here on. `exact`: computed on the state it is installed
        on (`Committed.apply`)."""
        self.committed.apply(change, exact)
        for rc in change.connections:
            if rc.value is None:
                self.heartbeats.pop(rc.key, None)
        self.checkpointer.changed(change, lsn)
        if ctx is not None and ctx.sealer is not None and ctx.sealer.rotated is not None:
            self.box = ctx.sealer.rotated
        if any(rc.key in ("settings", "connection") for rc in change.documents):
            _warn_seed_origins(self.committed)
        if any(rc.key == "settings" for rc in change.documents):
            for listener in self.settings_listeners:
                try:
                    listener()
                except Exception:
                    log.exception("listener_failed")

    async def _compact(self, upto: int, base: int, carry: Change | None) -> None:
        job = functools.partial(self.journal.compact, upto, base, carry)
        try:
            if self.journal.cut_is_cheap(carry) and self.journal.scrub_through is None:
                await self._journal(job)
            else:
                await self._on_io(job, judged=False)  # a rewrite of the journal
        except JournalLost as lost:
            # (A change appended meanwhile, not yet in memory: its append, or the next one,
            # makes it anew, the journal left unsure.)
            with contextlib.suppress(JournalLost):
                await self._rebuild_journal(lost)
        self._make_room()

    # --- publishing ------------------------------------------------------------------------------

    def publish(self, events: list[SyncEvent]) -> None:
        for listener in self.events_listeners:
            try:
                listener(events)
            except Exception:
                log.exception("listener_failed")

    def replaced(self, gap: bool) -> None:
        for listener in self.replaced_listeners:
            try:
                listener(gap)
            except Exception:
                log.exception("listener_failed")

    def notice(self, notice: dict[str, Any]) -> None:
        notice = {"type": "notice", **notice}
        for listener in self.notice_listeners:
            try:
                listener(notice)
            except Exception:
                log.exception("listener_failed")

    def notice_watcher(self, file: str) -> None:
        self.watch_again(file)

    # --- files in ---------------------------------------------------------------------------------

    async def ingest(self, file: str, *, force: bool = False, report: bool = True) -> bool:
        return await self.intake.ingest(file, force=force, report=report)

    def taken_in(self, file: str) -> None:
        """A hand edit of `file` was taken in here (for the listeners: the metrics)."""
        for listener in self.hand_edit_listeners:
            listener(file)

    async def taken_in_before_a_crash(self, tags: Mapping[str, str]) -> dict[str, str]:
        """In cluster mode, as the catch-up at start applies this host's own change from the
        stream (the daemon died after it published it, before its journal had it): a hand
        edit it took in (`tags`: `Change.taken` as published, `SecretBox.tag`) whose file
        still holds the bytes it was taken in from, beside the same copy, is no edit made
        while the daemon was down (as `replay` finds from the journal on one host). Taken in
        again against the old copy, the edit would win over the changes other hosts made
        after it. Returns those files' digests, for the change's journal record."""
        out: dict[str, str] = {}
        for file, tag in tags.items():
            digest = self._found.get(file)
            if digest is None or not hmac.compare_digest(self.box.tag(digest), tag):
                continue
            if await self.intake.known_as_found(file, digest):
                self.not_edited.add(file)
                out[file] = digest
                log.warning("hand_edit_taken_in_before_a_crash", file=file)
        return out

    async def take_in_edited(self, edited: list[str]) -> None:
        """Once the store has started (in cluster mode, caught up): the files edited while
        the daemon was down (`set_back`) taken in through the door, logged and broadcast (a
        file refused now stays as it is, reported, and is taken in once fixed). An algorithm
        deleted goes last: instances.json, edited too, may have stopped naming it (while it
        names it, the deletion is refused and the file written back)."""

        def deleted_algorithm(file: str) -> bool:
            return file.startswith(f"{ALGORITHMS_DIR}/") and not self.path(file).exists()

        for file in sorted(edited, key=deleted_algorithm):  # (stable: the others in order)
            if file in self.not_edited:  # taken in before a crash (`replay`)
                continue
            if await self.ingest(file, force=True):  # a deleted algorithm too
                log.info("edited_while_stopped_taken_in", file=file)

    async def reload_all(self) -> None:
        """SIGHUP: every file taken in as a hand edit is, and what that changed written (for
        up to RELOAD_WRITE_S: a file waiting for the cluster, out of reach, is written once
        it is back; the reload is done all the same)."""
        await self.intake.reload_all()
        try:
            async with asyncio.timeout(RELOAD_WRITE_S):
                await self.checkpointer.flush()
        except TimeoutError:
            log.warning("reload_files_pending", files=sorted(self.checkpointer.dirty))

    def unchanged(self, file: str) -> bool:
        return self.disk.unchanged(file)

    @property
    def displaced(self) -> list[Any]:
        return self.intake.displaced

    async def take_in_late(self, max_age: float) -> None:
        await self.intake.take_in_late(max_age)

    def _displaced(self, kept: list[Any]) -> None:
        now = time.monotonic()
        self.intake.displaced += [Late(d, base, now, now, d.stamp) for d, base in kept]


RELOAD_WRITE_S = 5.0


def _masked_log(c: Committed) -> set[str]:
    """Sync-log entries an older ctsd wrote holding what this one masks (a URL's `?api_key=`
    value): masked as an event is now (ids and all else kept); the file to write again."""
    masked, events = 0, list(c.log)
    for i, event in enumerate(events):
        data = mask_if_needed(event.data) if isinstance(event.data, dict) else event.data
        if data is not event.data and data != event.data:
            events[i] = msgspec.structs.replace(event, data=data)
            masked += 1
    if not masked:
        return set()
    c.replace_log(events)
    log.warning("sync_log_secrets_masked", entries=masked, file=SYNC_LOG)
    return {SYNC_LOG}


def _warn_seed_origins(c: Committed) -> None:
    """Seed 003 keeps browser origins in connection.json (`server.corsOrigins`); ctsd lets
    in those of settings.json (`server.cors_origins`) only, so that emptying that list shuts
    browsers out whatever the app's file holds. Origins listed only in connection.json are
    named, or a frontend set up as the seed says meets a 403 with no word why."""
    server = (c.documents.get("connection") or {}).get("server")
    seed = server.get("corsOrigins") if isinstance(server, dict) else None
    allowed = {o.rstrip("/").lower() for o in c.settings.server.cors_origins}
    left = [o for o in seed or () if isinstance(o, str) and o.rstrip("/").lower() not in allowed]
    if left:
        log.warning(
            "cors_origins_not_read",
            file="connection.json",
            origins=left[:20],
            why="browsers are let in by settings.json server.cors_origins: add them there",
        )


def _restored_at(log: Sequence[SyncEvent], first: int) -> bool:
    """Is entry `first`, the first after a gap, the `import` event of a restore? A CLI restore
    of an older archive leaves that gap on purpose (`backup`: ids are never given twice)."""
    for e in reversed(log):
        if e.id <= first:
            return e.id == first and e.action == "import" and e.data.get("mode") == "restore"
    return False


def _fail(fut: asyncio.Future[Any], err: CtsdError) -> None:
    if not fut.done():  # a cancelled caller must not break the group
        fut.set_exception(err)
