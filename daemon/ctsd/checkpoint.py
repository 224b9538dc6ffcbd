"""The checkpointer: committed changes into the data files, coalesced, then the journal cut.

A change is durable once journalled; the data files follow within `COALESCE_S` (plus the
write itself). Each round writes every file with changes (atomically, as `atomic.write_files`
does: temp, fsync, swap, fsync the dir), only after checking each is still what the daemon
last read or wrote: if a hand edit landed, it is taken in first (merged onto memory) and the
round written on top of it. A file invalid on disk is never written; what memory holds for it
is carried over in the journal until the file is fixed. Once a round is on disk the journal
drops the records it covered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog

from ctsd import files
from ctsd.atomic import ChangedOnDisk, Displaced, write_files
from ctsd.core import Change, Committed, RecordChange, changed_fields, changed_keys
from ctsd.disk import Disk
from ctsd.errors import CtsdError
from ctsd.files import CONNECTIONS, STATE, SYNC_LOG

log = structlog.get_logger("ctsd.store")

COALESCE_S = 0.02  # changes arriving within this of the first share one round of writes
RETRIES = 4  # hand edits a round takes in before it gives up for now (and tries again)
FAILED_RETRY_S = 0.5  # after a failed write (disk full, read-only): the journal keeps all


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
        lock: Callable[[str], asyncio.Lock],
        take_in: Callable[[str], Awaitable[bool]],
        compact: Callable[[int, int, Change | None], Awaitable[None]],
    ) -> None:
        self.committed = committed
        self.disk = disk
        self.invalid = invalid  # files invalid on disk now: never written
        self.lock = lock  # a file's lock, shared with the intake
        self.take_in = take_in  # a hand edit taken in through the door (lock held)
        self.compact = compact  # the journal cut (in the journal's thread)
        # file → (lsn of its oldest unwritten change, of its newest): what a round must write
        # and how far the journal may be cut.
        self.dirty: dict[str, tuple[int, int]] = {}
        self.since: float | None = None  # when the oldest unwritten change came (monotonic)
        self.written: dict[str, int] = {}  # file → lsn it holds everything up to
        self.installed = 0  # lsn of the latest change in memory
        self.cut = 0  # lsn the journal was last cut at
        # Each table record's encoding, kept while the record object is the same.
        self.frags: dict[str, dict[str, tuple[Any, bytes]]] = {CONNECTIONS: {}, STATE: {}}
        self.log_frags: dict[int, bytes] = {}
        self.waiters: list[Waiter] = []
        # Files our swaps displaced while an in-place writer held them open, with what they
        # held (the base of what that writer writes into them late): handed to the intake.
        self.on_displaced: Callable[[list[tuple[Displaced, Any]]], None] = lambda _d: None
        self.wake = asyncio.Event()
        self.rounds = 0
        self.on_write: list[Callable[[list[str]], None]] = []  # the files of each write
        self.lags: list[float] = []  # seconds from a change in memory to its file written

    # --- what changed ------------------------------------------------------------------------

    def changed(self, files_touched: set[str], lsn: int) -> None:
        """Changes up to `lsn` are in memory (and durable in the journal)."""
        self.installed = max(self.installed, lsn)
        for file in files_touched:
            first, _ = self.dirty.get(file, (lsn, lsn))
            self.dirty[file] = (first, lsn)
        if files_touched and self.since is None:
            self.since = time.monotonic()
            self.wake.set()

    def write_back(self, file: str) -> None:
        """Write `file` from memory with the next round (it was deleted by hand)."""
        self.changed({file}, self.installed)

    def mark_written(self, file: str, lsn: int) -> None:
        """`file` holds what memory holds up to `lsn` (a hand edit just taken in)."""
        last = self.dirty.get(file, (0, 0))[1]
        if last <= lsn:
            self.dirty.pop(file, None)
        self.written[file] = max(self.written.get(file, 0), lsn)
        self._wake_waiters()

    def seed(self) -> None:
        """At start: the encodings of the records read from the files, for reuse."""
        for file in (CONNECTIONS, STATE):
            od = self.disk.files.get(file)
            if od is None or not od.frags:
                continue
            content = od.content or {}
            self.frags[file] = {k: (content[k], f) for k, f in od.frags.items() if k in content}

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
        await fut

    def _covered(self, touched: set[str], lsn: int) -> bool:
        return all(
            self.written.get(f, 0) >= lsn or self.dirty.get(f, (lsn + 1, 0))[0] > lsn
            for f in touched
        )

    def _fail_waiters(self, files_failed: set[str], e: OSError) -> None:
        """Callers waiting for files that cannot be written now learn so (their changes stay
        durable in the journal and reach the files once the disk allows)."""
        err = CtsdError(
            "io_error",
            f"the change is saved (journal) but the data files cannot be written now: "
            f"{e.strerror or e}; they follow once the disk allows",
        )
        keep = []
        for w in self.waiters:
            if not w.future.done() and w.files & files_failed:
                w.future.set_exception(err)
            elif not w.future.done():
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

    async def flush(self) -> None:
        """Until every change in memory is in the files (but those of files invalid on disk)."""
        waiting = {f for f in self.dirty if f not in self.invalid()}
        if waiting:
            await self.wait_written(waiting, self.installed)

    # --- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.since is not None:
                await anyio.sleep(max(0.0, self.since + COALESCE_S - time.monotonic()))
            try:
                await self.round()
            except Exception:  # never let the checkpointer die: the journal keeps everything
                log.exception("checkpoint_failed")
                await anyio.sleep(FAILED_RETRY_S)
                self.wake.set()

    async def round(self) -> bool:
        """Write every file with changes, then cut the journal. True when nothing is left to
        write (but files invalid on disk)."""
        for _attempt in range(RETRIES):
            invalid = self.invalid()
            todo = sorted((f for f in self.dirty if f not in invalid), key=_write_order)
            if not todo:
                break
            async with _Locks(self.lock, todo):
                edited = [f for f in todo if not self.disk.unchanged(f)]
                edited = [f for f in edited if self.disk.get(f).stamp is not None]
                if edited:
                    # Merged onto memory; the round then writes on top. A file that does not
                    # read as valid may be an in-place save half way: the watcher judges it
                    # once it settles; until then the round waits.
                    taken = [await self.take_in(f) for f in edited]
                    if not all(taken):
                        self.wake.set()
                        await anyio.sleep(COALESCE_S)
                        return False
                    continue
                outcome = await self._write(todo)
            if outcome is not None:
                break
        else:
            log.warning("checkpoint_postponed", files=sorted(self.dirty), why="files keep changing")
            self.wake.set()
            return False
        await self._cut()
        invalid = self.invalid()
        return not any(f not in invalid for f in self.dirty)

    async def _write(self, todo: list[str]) -> bool | None:
        """One atomic write of `todo` from memory. None: a hand save slipped in (take it in
        and try again); False: the write failed (tried again later); True: written."""
        upto = self.installed
        plan: list[tuple[Path, Any]] = []
        views: dict[str, Any] = {}
        for file in todo:
            body, view = self._body(file)
            if body is not None:
                plan.append((self.disk.path(file), body))
                views[file] = view
        expected = {self.disk.path(f): self.disk.get(f).stamp for f in views}
        kept: list[Displaced] = []
        started = self.since
        try:
            stamps = await anyio.to_thread.run_sync(write_files, plan, expected, kept)
        except ChangedOnDisk:
            return None
        except OSError as e:
            log.error("checkpoint_write_failed", error=str(e), files=todo)
            self._fail_waiters(set(todo), e)
            await anyio.sleep(FAILED_RETRY_S)
            self.wake.set()
            return False
        if kept:
            rel = self.disk.data_dir
            self.on_displaced(
                [(d, self.disk.get(str(d.path.relative_to(rel))).content) for d in kept]
            )
        for path, body in plan:
            file = str(path.relative_to(self.disk.data_dir))
            self.disk.record(file, stamps[path], body)
            od = self.disk.get(file)
            od.content, frags = views[file]
            if frags is not None:
                od.frags = frags
        for file in todo:
            last = self.dirty.get(file, (0, 0))[1]
            if last <= upto:
                self.dirty.pop(file, None)
            else:
                self.dirty[file] = (upto + 1, last)
            self.written[file] = upto
        self.rounds += 1
        written = [str(path.relative_to(self.disk.data_dir)) for path, _ in plan]
        for cb in self.on_write:
            cb(written)
        if started is not None:
            self.lags.append(time.monotonic() - started)
            del self.lags[:-1000]
        self.since = time.monotonic() if self.dirty else None
        if any(f not in self.invalid() for f in self.dirty):
            self.wake.set()
        self._wake_waiters()
        return True

    def _body(self, file: str) -> tuple[Any, Any]:
        """The file's bytes from memory (chunks), and what its disk view becomes."""
        c = self.committed
        if file in (CONNECTIONS, STATE):
            table = c.connections if file == CONNECTIONS else c.state
            old = self.frags[file]
            new: dict[str, tuple[Any, bytes]] = {}
            for key, record in table.items():
                hit = old.get(key)
                new[key] = (
                    hit
                    if hit is not None and hit[0] is record
                    else (
                        record,
                        files.encode_record(record),
                    )
                )
            self.frags[file] = new
            encoded = {k: v[1] for k, v in new.items()}
            return files.table_chunks(encoded.values()), (dict(table), encoded)
        if file == SYNC_LOG:
            events = list(c.log)
            encoded_log = [self.log_frags.get(e.id) or files.encode_record(e) for e in events]
            self.log_frags = {e.id: b for e, b in zip(events, encoded_log, strict=True)}
            return files.table_chunks(encoded_log), (events, None)
        content = c.documents.get(files.document_name(file) or "")
        if content is None:
            return None, None
        return files.encode_document(content), (content, None)

    # --- cutting the journal -----------------------------------------------------------------

    async def _cut(self) -> None:
        """The journal drops what the files now hold; what files invalid on disk miss is
        carried over as one record."""
        invalid = self.invalid()
        waiting = [first for f, (first, _) in self.dirty.items() if f not in invalid]
        upto = min(waiting) - 1 if waiting else self.installed
        stuck = sorted(f for f in self.dirty if f in invalid)
        if upto <= self.cut and not stuck:
            return
        carry = self._carry(stuck) if stuck else None
        sync_log = self.disk.files.get(SYNC_LOG)
        base = sync_log.content[-1].id if sync_log is not None and sync_log.content else 0
        await self.compact(upto, base, carry)
        self.cut = upto

    def _carry(self, stuck: list[str]) -> Change | None:
        """What memory holds beyond the files in `stuck` (invalid on disk), as one change."""
        c = self.committed
        change = Change()
        for file in stuck:
            od = self.disk.files.get(file)
            on_disk = od.content if od is not None else None
            if file in (CONNECTIONS, STATE):
                table = c.connections if file == CONNECTIONS else c.state
                target = change.connections if file == CONNECTIONS else change.state
                target.extend(_table_diff(on_disk or {}, table))
                if file == CONNECTIONS:
                    change.order = list(table)
            elif file == SYNC_LOG:
                change.log = list(c.log)
            else:
                name = files.document_name(file) or ""
                new = c.documents.get(name)
                keys = changed_keys(on_disk, new) if on_disk is not None and new else None
                change.documents.append(RecordChange(name, new, keys))
        return None if change.empty else change

    async def close(self) -> None:
        """Everything written (at shutdown): rounds until only invalid files are left."""
        for _ in range(RETRIES):
            if await self.round():
                return


def _table_diff(on_disk: dict[str, Any], memory: dict[str, Any]) -> list[RecordChange]:
    out = [RecordChange(k) for k in on_disk if k not in memory]
    for key, record in memory.items():
        old = on_disk.get(key)
        if old is None:
            out.append(RecordChange(key, record))
        elif old is not record and old != record:
            out.append(RecordChange(key, record, changed_fields(old, record)))
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
