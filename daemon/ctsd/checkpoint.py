"""The checkpointer: committed changes into the data files, coalesced, then the journal cut.

A change is durable once journalled; the data files follow within `COALESCE_S`, stretched up
to `COALESCE_MAX_S` for big files (plus the write itself). Each round writes every file with
changes (atomically, as `atomic.write_files` does: temp, fsync, swap, fsync the dir), only
after checking each is still what the daemon last read or wrote: if a hand edit landed, it
is taken in first (merged onto memory) and the round written on top of it. A file invalid on
disk is never written; what memory holds for it is carried over in the journal until the
file is fixed. Once a round is on disk the journal drops the records it covered.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog

from ctsd import files
from ctsd.atomic import ChangedOnDisk, Displaced, remove_file, stamp_of, write_files
from ctsd.bases import COPY_IDLE_S, Bases
from ctsd.core import Change, Committed, RecordChange, changed_fields, changed_keys
from ctsd.disk import Disk, digest_of
from ctsd.errors import CtsdError
from ctsd.files import CONNECTIONS, STATE, SYNC_LOG
from ctsd.models import SyncEvent
from ctsd.safefile import subdir_problem

log = structlog.get_logger("ctsd.store")

# Changes arriving within this of the first share one round of writes. Big files stretch it
# (up to COALESCE_MAX_S, three times the last write's time): fewer rounds of a 10 MB file
# disturb the journal's appends less. The wait runs from the oldest change not yet written,
# so a change reaches its file within the wait plus a write or two: under steady load with
# writes as long as the wait, rounds follow one another.
COALESCE_S = 0.03
COALESCE_MAX_S = 0.07
RETRIES = 4  # hand edits a round takes in before it gives up for now (and tries again)
# Changes per journal append (since the last round) from which writers are queueing behind
# the appends: a round then skips the writeback pacing (`atomic.write_files(paced=)`). An
# append that carries many changes already waits several fdatasyncs; the files reaching the
# disk sooner (a bounded journal, `sync: files` answered sooner) is worth more than the few
# ms pacing spares it. A writer alone is answered soonest with pacing.
BATCHED = 8
COPY_RETRY_S = 10.0  # after a failed write of copies
FAILED_RETRY_S = 0.5  # after a failed write (disk full, read-only): the journal keeps all
FAILED_LOG_EVERY_S = 60.0  # a lasting write failure's log line, again
YIELD_EVERY = 64  # records a paced round encodes between two hand-backs of the GIL


@dataclass
class Waiter:
    files: set[str]
    lsn: int
    future: asyncio.Future[None]


class Checkpointer:
    def __init__(
        self,
        committed: Committed,
        disk: Disk,
        invalid: Callable[[], set[str]],
        invalid_error: Callable[[str], CtsdError],
        lock: Callable[[str], asyncio.Lock],
        take_in: Callable[[str], Awaitable[bool]],
        compact: Callable[[int, int, Change | None], Awaitable[None]],
        sync_journal: Callable[[], None],
    ) -> None:
        self.committed = committed
        self.disk = disk
        self.invalid = invalid  # files invalid on disk now: never written
        self.invalid_error = invalid_error  # what a caller waiting for one is told
        self.lock = lock  # a file's lock, shared with the intake
        self.take_in = take_in  # a hand edit taken in through the door (lock held)
        self.compact = compact  # the journal cut (`Store._compact`)
        self.sync_journal = sync_journal  # before a round's files (`Journal.sync_written`)
        # file → (lsn of its oldest unwritten change, of its newest): what a round must write
        # and how far the journal may be cut.
        self.dirty: dict[str, tuple[int, int]] = {}
        self.since: float | None = None  # when the oldest unwritten change came (monotonic)
        # (lsn, when it came) of the changes not yet written, oldest first: after a round the
        # coalescing wait runs from the oldest left, not from the round's end (a change that
        # came during a write has been waiting all along).
        self.arrivals: deque[tuple[int, float]] = deque()
        self.written: dict[str, int] = {}  # file → lsn it holds everything up to
        self.installed = 0  # lsn of the latest change in memory
        self.cut = 0  # lsn the journal was last cut at
        # Each table record's encoding, in the table's order; the keys changed since the last
        # round are encoded again (a round costs the records that changed, not the table).
        self.frags: dict[str, dict[str, bytes]] = {CONNECTIONS: {}, STATE: {}}
        # What a round replaced (the old disk views and encodings), freed by the next round's
        # thread: freeing 10,000 records' worth takes about a millisecond with the GIL held.
        # On the event loop every ack that came meanwhile waited for it; in the thread only
        # one that needs the GIL at that moment does. (Held until then, even when idle.)
        self.dropped: list[Any] = []
        self.stale: dict[str, set[str]] = {CONNECTIONS: set(), STATE: set()}
        # The sync log's encodings, oldest first, and the id of the event each one holds.
        self.log_frags: deque[bytes] = deque()
        self.log_ids: deque[int] = deque()
        self.log_gen = 0  # moves each time they are dropped (the log replaced by hand)
        self.waiters: list[Waiter] = []
        # Files our swaps displaced while an in-place writer held them open (or had just
        # written into them), with what they held (the base of what that writer writes into
        # them late): handed to the intake.
        self.on_displaced: Callable[[list[tuple[Displaced, Any]]], None] = lambda _d: None
        self.wake = asyncio.Event()
        self.hurry = asyncio.Event()  # a waiter came: the coalescing wait ends
        self.last_write_s = 0.0  # how long the last round's write took (in its thread)
        self.stopping = False
        self.rounds = 0
        self.force_cut = False  # the next round cuts the journal even with nothing to drop
        # Files whose writes keep failing: (the error last logged, when, attempts since). A
        # lasting fault (disk full, algorithms/ made a link) is logged when it starts or
        # changes and once a minute while it lasts, not at every retry.
        self.failing: dict[str, tuple[str, float, int]] = {}
        self.bytes_written = 0  # of the data files the rounds wrote (what the disk took)
        self.appends = self.appended = 0  # journal appends and changes since the last round
        self.on_write: list[Callable[[list[str]], None]] = []  # the files of each write
        # Each file's copy (the sync log's aside), written with it: a hand edit made while
        # the daemon is down is told apart at its next start (None: a store with no copies).
        self.bases: Bases | None = None
        self._copies_retry_at = 0.0  # (monotonic) after a failed write of the tables' copies
        # The views a round's thread is writing now (file → what its disk view becomes): a
        # journal made anew meanwhile must cover them too (`beyond_files`).
        self.writing: dict[str, Any] = {}

    # --- what changed ------------------------------------------------------------------------

    def changed(self, change: Change, lsn: int) -> None:
        """A change is in memory (and durable in the journal), as lsn `lsn`."""
        self.appends += 1
        self.appended += len(change.events)
        self.note(change.files(), lsn)
        self._forget(CONNECTIONS, change.connections, change.order is not None)
        self._forget(STATE, change.state, False)
        if change.log is not None:
            self._forget_log()

    def _forget_log(self) -> None:
        self.log_frags.clear()
        self.log_ids.clear()
        self.log_gen += 1

    def note(self, files_touched: set[str], lsn: int) -> None:
        """`files_touched` need writing: they hold less than memory, up to lsn `lsn`."""
        if lsn > self.installed:
            self.arrivals.append((lsn, time.monotonic()))
        self.installed = max(self.installed, lsn)
        fresh = False
        for file in files_touched:
            first, _ = self.dirty.get(file, (lsn, lsn))
            fresh = fresh or first == lsn
            self.dirty[file] = (first, lsn)
        if fresh:
            # A file with nothing waiting before: a round for it (one already waiting, a file
            # not taken in yet, must not hold it up).
            if self.since is None:
                self.since = time.monotonic()
            self.wake.set()

    def valid_again(self, file: str) -> None:
        """`file` reads as valid again: what memory holds beyond it is written now."""
        if file in self.dirty:
            if self.since is None:
                self.since = time.monotonic()
            self.wake.set()

    def _writable_dirty(self) -> bool:
        invalid = self.invalid()
        return any(f not in invalid for f in self.dirty)

    def _oldest_waiting(self) -> float | None:
        """When the oldest change a writable file still lacks came (None: none lacks one)."""
        invalid = self.invalid()
        firsts = [first for f, (first, _) in self.dirty.items() if f not in invalid]
        if not firsts:
            self.arrivals.clear()
            return None
        oldest, arrivals = min(firsts), self.arrivals
        while len(arrivals) > 1 and arrivals[1][0] <= oldest:
            arrivals.popleft()
        return arrivals[0][1] if arrivals else time.monotonic()

    def _forget(self, file: str, records: list[RecordChange], reordered: bool) -> None:
        frags, stale = self.frags[file], self.stale[file]
        for rc in records:
            if rc.value is None:
                frags.pop(rc.key, None)
                stale.discard(rc.key)
            else:
                frags.setdefault(rc.key, b"")  # a new key goes last, as in memory
                stale.add(rc.key)
        if reordered:
            order = self.committed.connections
            self.frags[file] = {k: frags.get(k, b"") for k in order}
            stale.update(k for k in order if k not in frags)

    def write_back(self, file: str) -> None:
        """Write `file` from memory with the next round (it was deleted by hand, or holds an
        edit not taken): woken also when changes wait for it already (held back while it was
        invalid). It no longer holds what memory holds, so `flush` and a `sync: files` waiter
        of the latest change wait for that round."""
        self.note({file}, self.installed)
        self.written[file] = min(self.written.get(file, 0), self.installed - 1)
        self.valid_again(file)

    def mark_written(self, file: str, lsn: int) -> None:
        """`file` holds what memory holds up to `lsn` (a hand edit just taken in)."""
        last = self.dirty.get(file, (0, 0))[1]
        if last <= lsn:
            self.dirty.pop(file, None)
        self.written[file] = max(self.written.get(file, 0), lsn)
        self._wake_waiters()

    def seed(self) -> None:
        """At start: the encodings of the records as read from the files, for reuse (all of
        memory's records are encoded again where memory differs from the file)."""
        for file, table in (
            (CONNECTIONS, self.committed.connections),
            (STATE, self.committed.state),
        ):
            od = self.disk.files.get(file)
            known = od.frags if od is not None else {}
            content = od.content if od is not None and od.content else {}
            self.frags[file] = {k: known.get(k, b"") for k in table}
            self.stale[file] = {
                k for k, r in table.items() if k not in known or content.get(k) is not r
            }

    @property
    def lag_s(self) -> float:
        """How long the oldest change not yet in the files has waited (0: none waits)."""
        return 0.0 if self.since is None else time.monotonic() - self.since

    # --- waiting for the files ---------------------------------------------------------------

    async def wait_written(self, touched: set[str], lsn: int) -> None:
        """Until every file in `touched` holds the change `lsn` (`sync: files`)."""
        if self._covered(touched, lsn):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(Waiter(touched, lsn, fut))
        self.wake.set()
        self.hurry.set()
        await fut

    def _covered(self, touched: set[str], lsn: int) -> bool:
        return all(
            self.written.get(f, 0) >= lsn or self.dirty.get(f, (lsn + 1, 0))[0] > lsn
            for f in touched
        )

    def fail_waiters(self, files_failed: set[str], err: CtsdError) -> None:
        """Callers waiting for files that cannot be written now learn why (their changes stay
        durable in the journal and reach the files once that is fixed)."""
        keep = []
        for w in self.waiters:
            if w.future.done():
                continue
            if w.files & files_failed:
                w.future.set_exception(err)
            else:
                keep.append(w)
        self.waiters = keep

    def _wake_waiters(self) -> None:
        keep = []
        for w in self.waiters:
            if w.future.done():
                continue
            if self._covered(w.files, w.lsn):
                w.future.set_result(None)
            else:
                keep.append(w)
        self.waiters = keep

    def consistent(self) -> bool:
        """Do the files hold one revision? A round renders memory as it is when it writes,
        so a change that came while it waited for its locks is in the files it writes (its
        sync-log event, say) but not yet in another file it touched that the round had not
        picked (a state record): until that file's round, the files disagree. (Files invalid
        on disk aside.)"""
        top = max(self.written.values(), default=0)
        invalid = self.invalid()
        return all(first > top for f, (first, _) in self.dirty.items() if f not in invalid)

    async def flush(self) -> None:
        """Until every change in memory is in the files (but those of files invalid on disk)."""
        waiting = {f for f in self.dirty if f not in self.invalid()}
        if waiting:
            await self.wait_written(waiting, self.installed)

    # --- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Rounds as changes come, until `stop` (a round in progress always finishes: a write
        cancelled half way would leave what the disk holds unknown)."""
        while not self.stopping:
            if await self._copies_due():
                continue
            await self.wake.wait()
            self.wake.clear()
            if self.stopping:
                return
            if self.since is not None and not self.waiters:
                # Coalesce, unless someone waits for the files (`sync: files`, a stop): a
                # caller that asked for them gets the next round at once.
                wait = min(COALESCE_MAX_S, max(COALESCE_S, 3 * self.last_write_s))
                self.hurry.clear()
                with anyio.move_on_after(max(0.0, self.since + wait - time.monotonic())):
                    await self.hurry.wait()
            try:
                await self.round()
            except Exception:  # never let the checkpointer die: the journal keeps everything
                log.exception("checkpoint_failed")
                await anyio.sleep(FAILED_RETRY_S)
                self.wake.set()

    async def _copies_due(self) -> bool:
        """One host: the copies of the tables the rounds wrote (`Bases.later`), each written
        once its file was not written for COPY_IDLE_S (a table written change after change
        keeps none meanwhile; the other goes on being copied). True: look again (copies
        written or tried, or the next one due); False: a round is waiting. A failed try is
        tried again COPY_RETRY_S later."""
        bases = self.bases
        if bases is None or not bases.pending or self.stopping:
            return False
        now = time.monotonic()
        # (Read as a snapshot: the intake's `keep` may drop an entry meanwhile.) A table a
        # round is about to write again is left to that round.
        due = {
            f: max(t + COPY_IDLE_S, self._copies_retry_at)
            for f, (*_, t) in list(bases.pending.items())
            if f not in self.dirty
        }
        ready = [f for f, at in due.items() if at <= now]
        if not ready:
            if not due or self.wake.is_set():
                return False
            with anyio.move_on_after(min(due.values()) - now):
                await self.wake.wait()
            return not self.wake.is_set()
        async with _Locks(self.lock, ready):
            try:
                await anyio.to_thread.run_sync(bases.catch_up, ready)
            except Exception:  # never let the checkpointer die (meanwhile an edit of those
                # files made while the daemon is down would be read as it is)
                log.exception("base_copy_failed", files=sorted(ready))
                self._copies_retry_at = time.monotonic() + COPY_RETRY_S
        return not self.wake.is_set()  # (a round waiting goes first: one copy write at most)

    async def round(self) -> bool:
        """Write every file with changes, then cut the journal. True when nothing is left to
        write (but files invalid on disk)."""
        for _attempt in range(RETRIES):
            invalid = self._invalid_failing_waiters()
            todo = sorted((f for f in self.dirty if f not in invalid), key=_write_order)
            if not todo:
                break
            async with _Locks(self.lock, todo):
                # Judged invalid while we waited for a lock (the intake holds it while it
                # reads): never written, whatever the stamps now say; a `sync: files`
                # change waiting for it is answered now, as at the top of the round (else
                # it waited until another file changed).
                invalid = self._invalid_failing_waiters()
                todo = [f for f in todo if f not in invalid]
                edited = [f for f in todo if not self.disk.unchanged(f)]
                edited = [f for f in edited if self.disk.get(f).stamp is not None]
                # A file whose directory was swapped for a file is out of reach, not edited:
                # its write fails as a refusing disk's does (`_linked_away`).
                away = _linked_away(self.disk.data_dir, [self.disk.path(f) for f in edited])
                edited = [f for f in edited if self.disk.path(f) not in away]
                if edited:
                    # Merged onto memory; the round then writes on top (starting over). One
                    # not taken in now (an in-place save half way, judged once it settles;
                    # in cluster mode, the cluster out of reach) is not written over: the
                    # other files are written, and it is tried again a little later.
                    refused = [f for f in edited if not await self.take_in(f)]
                    if len(refused) < len(edited):
                        continue
                    todo = [f for f in todo if f not in refused]
                    asyncio.get_running_loop().call_later(FAILED_RETRY_S, self.wake.set)
                    if not todo:
                        return False
                outcome = await self._write(todo) if todo else True
            if outcome is not None:
                break
        else:
            log.warning("checkpoint_postponed", files=sorted(self.dirty), why="files keep changing")
            # A little later, not at once: a file put back by hand as it was to be written
            # back stays in the way until the watcher takes it in (round after round of
            # fsync'd writes and warnings, else).
            asyncio.get_running_loop().call_later(FAILED_RETRY_S, self.wake.set)
            return False
        if not self._writable_dirty():
            # Only files invalid on disk wait (the journal keeps their changes): the next
            # change must start a round of its own (`note`).
            self.since = self._oldest_waiting()
        await self._cut()
        invalid = self.invalid()
        return not any(f not in invalid for f in self.dirty)

    def _invalid_failing_waiters(self) -> set[str]:
        """The files invalid on disk now, every change waiting for one of them answered."""
        invalid = self.invalid()
        for file in invalid & {f for w in self.waiters for f in w.files}:
            self.fail_waiters({file}, self.invalid_error(file))
        return invalid

    async def _write(self, todo: list[str]) -> bool | None:
        """Write `todo` from memory. None: a hand save slipped in (take it in and try again);
        False: a file could not be written (the others were; it is tried again later); True:
        all written. The files go as one group (their writeback overlaps); when the group
        fails, each is written alone, so one file the disk refuses holds up no other."""
        upto = self.installed
        jobs: list[tuple[Path, Any]] = []
        views: dict[str, Any] = {}
        gone: list[str] = []
        for file in todo:
            job, view = self._job(file)
            if job is not None:
                jobs.append((self.disk.path(file), job))
                views[file] = view
            elif self.disk.get(file).stamp is not None:
                # An algorithm removed (another host's hand deletion, a restore): its file
                # goes too, or the next start would read it back. The round took in any hand
                # save of it first, so this is the version the daemon knows.
                gone.append(file)
            elif self.bases is not None:
                self.bases.forget(self.disk.path(file))  # deleted by hand: its copy too
        expected = {self.disk.path(f): self.disk.get(f).stamp for f in [*views, *gone]}
        kept: list[Displaced] = []
        paced = self.appended < BATCHED * max(1, self.appends)
        self.appends = self.appended = 0
        t0 = time.monotonic()
        self.writing = {**views, **dict.fromkeys(gone)}
        try:
            removed = [self.disk.path(f) for f in gone]
            stamps, failed, digests = await anyio.to_thread.run_sync(
                _render_and_write,
                self.sync_journal,
                jobs,
                expected,
                kept,
                self.bases,
                removed,
                paced,
                self.dropped,
                self.disk.coarse_mtime,
                self.disk.data_dir,
            )
            self.last_write_s = time.monotonic() - t0
        except ChangedOnDisk:
            self._restale(jobs)
            return None
        finally:
            self.writing = {}  # (the disk views take the round in at once, no await between)
        if kept:
            rel = self.disk.data_dir
            self.on_displaced(
                [(d, self.disk.get(str(d.path.relative_to(rel))).content) for d in kept]
            )
        for file in gone:
            if not self.disk.path(file).exists():
                self.disk.files.pop(file, None)
        written: list[str] = []
        # Written one by one after the group failed, a file saved by hand meanwhile: taken in
        # by the next attempt of the round, then written on top.
        saved = {p for p, _ in jobs if p not in stamps and p not in failed}
        for path, job in jobs:
            file = str(path.relative_to(self.disk.data_dir))
            if path in failed or path in saved:
                self._restale([(path, job)])
                continue
            written.append(file)
            if (failing := self.failing.pop(file, None)) is not None:
                log.info("checkpoint_write_recovered", file=file, attempts=failing[2])
            self.bytes_written += stamps[path].size
            self.disk.record(file, stamps[path], digest=digests.get(path))
            od = self.disk.get(file)
            self.dropped.append(od.content)
            od.content = views[file]
            if isinstance(job, _Table):
                self.dropped.append(od.frags)
                od.frags = job.frags
                self._keep_encoded(file, job)
            elif isinstance(job, _Log) and job.gen == self.log_gen:
                # Unless the log was replaced meanwhile (`_forget_log`): then encoded anew.
                self.log_ids.extend(e.id for e in job.todo)
                self.log_frags.extend(job.encoded)
        for file in todo:
            if self.disk.path(file) in failed or self.disk.path(file) in saved:
                continue
            last = self.dirty.get(file, (0, 0))[1]
            if last <= upto:
                self.dirty.pop(file, None)
            else:
                self.dirty[file] = (upto + 1, last)
            self.written[file] = upto
        self.rounds += 1
        for cb in self.on_write:
            cb(written)
        self.since = self._oldest_waiting()
        self._wake_waiters()
        if failed:
            for path, e in failed.items():
                file = str(path.relative_to(self.disk.data_dir))
                # By its reason, not its text: that names the round's temp file (random),
                # so a lasting refusal (a read-only dir) was logged anew at every retry.
                self._log_failed(file, e.strerror or str(e))
                self.fail_waiters({file}, _cannot_write(e))
            await anyio.sleep(FAILED_RETRY_S)
            self.wake.set()
            return False
        if saved:
            return None
        if any(f not in self.invalid() for f in self.dirty):
            self.wake.set()
        return True

    def _log_failed(self, file: str, error: str) -> None:
        now = time.monotonic()
        last, at, attempts = self.failing.get(file, ("", 0.0, 0))
        if error == last and now - at < FAILED_LOG_EVERY_S:
            self.failing[file] = (last, at, attempts + 1)
            return
        log.error("checkpoint_write_failed", file=file, error=error, attempts=attempts + 1)
        self.failing[file] = (error, now, attempts + 1)

    def _job(self, file: str) -> tuple[Any, Any]:
        """What writing `file` takes (rendered in the write's thread, so a 10,000-record table
        costs the event loop a few copies, not its encoding) and what its disk view becomes.
        None when memory has nothing for it (an algorithm removed)."""
        c = self.committed
        if file in (CONNECTIONS, STATE):
            table = c.connections if file == CONNECTIONS else c.state
            frags, stale = self.frags[file], self.stale[file]
            if len(frags) != len(table):  # out of step (never expected): encode it all again
                frags = self.frags[file] = dict.fromkeys(table, b"")
                stale.update(table)
            self.stale[file] = set()
            todo = [(k, table[k]) for k in stale]
            return _Table(dict(frags), todo), dict(table)
        if file == SYNC_LOG:
            ids, frags = self.log_ids, self.log_frags
            while ids and c.log and ids[0] < c.log[0].id:
                ids.popleft()  # trimmed from the log
                frags.popleft()
            if ids and (not c.log or ids[0] != c.log[0].id):
                self._forget_log()  # not the same history (edited by hand): encode it again
            last = ids[-1] if ids else 0
            new = list(itertools.takewhile(lambda e: e.id > last, reversed(c.log)))
            new.reverse()
            return _Log(list(frags), new, self.log_gen), list(c.log)
        content = c.documents.get(files.document_name(file) or "")
        if content is None:
            return None, None
        return files.encode_document(content), content

    def _restale(self, jobs: list[tuple[Path, Any]]) -> None:
        """A write that did not happen: its records are still to be encoded."""
        for path, job in jobs:
            if isinstance(job, _Table):
                file = str(path.relative_to(self.disk.data_dir))
                self.stale[file].update(k for k, _ in job.todo)

    def _keep_encoded(self, file: str, job: _Table) -> None:
        """The encodings the write's thread made, kept for the records not changed since."""
        table = self.committed.connections if file == CONNECTIONS else self.committed.state
        frags, stale = self.frags[file], self.stale[file]
        for key, record in job.todo:
            if key in frags and table.get(key) is record:
                frags[key] = job.frags[key]
            elif key in table:
                stale.add(key)

    # --- cutting the journal -----------------------------------------------------------------

    async def _cut(self) -> None:
        """The journal drops what the files now hold; what files invalid on disk miss is
        carried over as one record."""
        invalid = self.invalid()
        waiting = [first for f, (first, _) in self.dirty.items() if f not in invalid]
        upto = min(waiting) - 1 if waiting else self.installed
        stuck = sorted(f for f in self.dirty if f in invalid)
        if upto <= self.cut and not stuck and not self.force_cut:
            return
        self.force_cut = False
        carry = self._carry(stuck) if stuck else None
        await self.compact(upto, self._files_revision(), carry)
        self.cut = upto

    def _files_revision(self) -> int:
        sync_log = self.disk.files.get(SYNC_LOG)
        return sync_log.content[-1].id if sync_log is not None and sync_log.content else 0

    def beyond_files(self) -> tuple[Change | None, int]:
        """What memory holds beyond the data files, as one change, and the files' revision:
        a journal made anew (`Journal.rebuild`) holds that instead of its records. Beyond
        what a round writing now puts in them too (a record it writes that memory removed
        since must go again), so whole records and documents. A round follows soon."""
        self.force_cut = True
        self.wake.set()
        files = sorted({*self.dirty, *self.writing})
        return (self._carry(files, whole=True) if files else None), self._files_revision()

    def _carry(self, stuck: list[str], *, whole: bool = False) -> Change | None:
        """What memory holds beyond the files in `stuck` (invalid on disk), as one change.
        `whole`: beyond what a round writing now puts in them too (`beyond_files`)."""
        c = self.committed
        change = Change()
        for file in stuck:
            od = self.disk.files.get(file)
            on_disk = od.content if od is not None else None
            writing = self.writing.get(file) if whole else None
            if file in (CONNECTIONS, STATE):
                table = c.connections if file == CONNECTIONS else c.state
                target = change.connections if file == CONNECTIONS else change.state
                bases = [on_disk or {}, *([writing] if writing is not None else [])]
                target.extend(_table_diff(bases, table))
                if file == CONNECTIONS:
                    change.order = list(table)
            elif file == SYNC_LOG:
                change.log = list(c.log)
                # Replayed, the log is all that tells which revision each record changed at
                # (If-Match): its events' revisions are taken from it, as from a loaded log.
                change.replaces = True
            else:
                name = files.document_name(file) or ""
                new = c.documents.get(name)
                known = on_disk is not None and new and not whole
                keys = changed_keys(on_disk, new) if known else None  # (None: whole)
                change.documents.append(RecordChange(name, new, keys))
        return None if change.empty else change

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()

    async def close(self) -> bool:
        """Everything written (at shutdown): rounds until only invalid files are left;
        whether that was reached."""
        for _ in range(RETRIES):
            try:
                if await self.round():
                    return True
            except Exception:  # (the journal's sync, say): the journal keeps everything
                log.exception("checkpoint_failed")
        return False


@dataclass
class _Table:
    """A table file to write: the encodings known, and the records to encode first."""

    frags: dict[str, bytes]
    todo: list[tuple[str, Any]]


@dataclass
class _Log:
    """The sync log to write: the encodings known (oldest first), and the events after them,
    to encode first (`gen`: the checkpointer's `log_gen` when the job was made)."""

    known: list[bytes]
    todo: list[SyncEvent]
    gen: int
    encoded: list[bytes] = field(default_factory=list)


def _render_and_write(
    sync_journal: Callable[[], None],
    jobs: list[tuple[Path, Any]],
    expected: dict[Path, Any],
    kept: list[Displaced],
    bases: Bases | None,
    gone: list[Path],
    paced: bool,
    dropped: list[Any],
    coarse: int,
    data_dir: Path,
) -> tuple[dict[Path, Any], dict[Path, OSError], dict[Path, bytes]]:
    """In the write's thread: encode what changed, then write the files atomically, as one
    group, or (when the group fails) one by one, each with its copy (`bases`); remove
    the files in `gone` (unless changed since: ChangedOnDisk): (stamps, the files that
    failed, and on `coarse` clocks the digests of those written: `Disk.record`). The journal
    first holds durably every change the files will hold (`sync_journal`)."""
    sync_journal()
    # A paced round (a writer alone: `Checkpointer._write`) hands the GIL back between its
    # steps (`time.sleep(0)`): a thread running Python keeps the GIL until the switch
    # interval ends, so the event loop, woken by the writer's next change, would wait out
    # all of the step it came in. Under load (unpaced) the round goes through: each hand-back
    # would then cost the thread up to a switch interval of a busy loop's, and the files
    # lagging behind the journal cost more than an answer a fraction of a millisecond later.
    while dropped:
        dropped.pop()  # the last round's leftovers (`Checkpointer.dropped`), one at a time
        if paced:
            time.sleep(0)
    plan: list[tuple[Path, Any]] = []
    for path, job in jobs:
        if isinstance(job, _Table):
            for i, (key, record) in enumerate(job.todo, 1):
                job.frags[key] = files.encode_record(record)
                if paced and not i % YIELD_EVERY:
                    time.sleep(0)
            body: Any = files.TableBody(list(job.frags.values()))
            if paced:
                time.sleep(0)
        elif isinstance(job, _Log):
            job.encoded = [files.encode_record(e) for e in job.todo]
            body = files.TableBody(job.known + job.encoded)
        else:
            body = job
        if bases is not None and isinstance(body, files.TableBody):
            body = list(body)  # joined once for the file and its copy
        plan.append((path, body))

    def write(group: list[tuple[Path, Any]]) -> dict[Path, Any]:
        if bases is None:
            return write_files(group, {p: expected.get(p) for p, _ in group}, kept, paced=paced)
        # The tables' copies on one host follow once idle (`Bases.later`): put aside first.
        later = [(p, b) for p, b in group if bases.later_for(p)]
        bases.put_aside([p for p, _ in later])  # (which changes what `later_for` says)
        aside = {p for p, _ in later}
        copies, digests = bases.copies([(p, b) for p, b in group if p not in aside])
        # A copy is renamed before its file (a file is never ahead of its copy), but after a
        # file new here (a copy with no file would read as a file deleted by hand); copies
        # are put back with the files when a hand save slipped in.
        checks = {p: stamp_of(p) for p, _ in copies}
        checks.update((p, expected.get(p)) for p, _ in group)
        new = {bases.copy_of(p) for p, _ in group if expected.get(p) is None}
        before = [c for c in copies if c[0] not in new]
        after = [c for c in copies if c[0] in new]
        stamps = write_files(before + group + after, checks, kept, paced=paced)
        bases.written(digests)
        bases.left(later)
        bases.tables_written([p for p, _ in group])
        return stamps

    stamps: dict[Path, Any] = {}
    failed = _linked_away(data_dir, [p for p, _ in plan] + gone)
    plan = [(p, b) for p, b in plan if p not in failed]
    gone = [p for p in gone if p not in failed]
    try:
        stamps = write(plan) if plan else {}
    except ChangedOnDisk:
        raise
    except OSError as e:
        if len(plan) == 1:
            failed[plan[0][0]] = e
        else:
            for path, body in plan:
                try:
                    stamps.update(write([(path, body)]))
                except ChangedOnDisk:
                    # Saved by hand meanwhile: in neither result (taken in, then written); the
                    # files written before it stand, with their stamps.
                    continue
                except OSError as e1:
                    failed[path] = e1
    for path in gone:
        try:
            remove_file(path, expected.get(path))
        except ChangedOnDisk:
            pass  # saved by hand meanwhile: kept, and taken in as the watcher sees it
        except OSError as e:
            failed[path] = e
        else:
            if bases is not None:
                bases.forget(path)
    digests = {p: digest_of(b) for p, b in plan if p in stamps} if coarse else {}
    return stamps, failed, digests


def _linked_away(data_dir: Path, paths: list[Path]) -> dict[Path, OSError]:
    """The data files in a directory of the data dir (`algorithms/`) swapped for a link or a
    file since the start: never written or removed through it (a write would land outside
    the data dir). They wait in the journal, failing as a refusing disk does, until the
    directory is one again (/health names it)."""
    out: dict[Path, OSError] = {}
    for path in paths:
        if path.parent != data_dir and (problem := subdir_problem(path.parent)):
            out[path] = OSError(errno.ELOOP, f"{path.parent.name}/ {problem}")
    return out


def _cannot_write(e: OSError) -> CtsdError:
    return CtsdError(
        "io_error",
        f"the change is saved (journal) but the data file cannot be written now: "
        f"{e.strerror or e}; it follows once the disk allows",
    )


def _table_diff(bases: list[dict[str, Any]], memory: dict[str, Any]) -> list[RecordChange]:
    """The record changes that bring a table holding any of `bases` to `memory` (whole
    records where there are several)."""
    gone = dict.fromkeys(k for base in bases for k in base if k not in memory)
    out = [RecordChange(k) for k in gone]
    for key, record in memory.items():
        olds = [base.get(key) for base in bases]
        if any(old is None for old in olds):
            out.append(RecordChange(key, record))
        elif any(old is not record and old != record for old in olds):
            fields = changed_fields(olds[0], record) if len(olds) == 1 else None
            out.append(RecordChange(key, record, fields))
    return out


def _write_order(file: str) -> tuple[bool, str]:
    # Data files first, the sync log last: a crash in between leaves events unwritten, never
    # events of changes the files do not hold (and the journal still has both).
    return file == SYNC_LOG, file


class _Locks:
    """Hold several files' locks (in a fixed order, so two holders never deadlock)."""

    def __init__(self, lock: Callable[[str], asyncio.Lock], names: list[str]) -> None:
        self.locks = [lock(n) for n in sorted(names)]

    async def __aenter__(self) -> None:
        for lk in self.locks:
            await lk.acquire()

    async def __aexit__(self, *exc: object) -> None:
        for lk in reversed(self.locks):
            lk.release()
