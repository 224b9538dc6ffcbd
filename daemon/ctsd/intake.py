"""Taking files in from disk: start-up loading, hand edits, SIGHUP, late in-place writes.

The store (store.py) is the one door; this is what reads the data files into it. `Intake` is
mixed into `Store`, so callers keep `store.open()`, `store.ingest(file)`,
`store.unchanged(file)`, `store.reload_all()` and `store.take_in_late(max_age)`:

- `open`: create what is missing, load every file, reconcile state with connections;
- `ingest`: a file as it now is on disk, taken in through the door (`ops.take_in`, source
  `"file"`), marked invalid (reported, its writes refused) or, deleted, written back;
- `unchanged`: is a file still what the store last read or wrote (stamp, ctime, and on coarse
  clocks a digest)? The writer asks it before every write;
- `take_in_late`: what an in-place writer wrote into a file our rename had displaced;
- `_decode_known`: a table file decoded at the cost of the records that differ from ours.

It works on the store's memory and stamps and submits through its door (`submit`,
`_submit_here`, `_notice`); the writer records here what it wrote (`stamps`, `_note_ctime`,
`digests`, `displaced`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog

from ctsd import files, safefile
from ctsd.atomic import (
    TEMP_PREFIX,
    Displaced,
    Stamp,
    create_temp,
    ensure_dir,
    stamp_of,
    write_files,
    written_elsewhere,
)
from ctsd.diagnose import FileProblem
from ctsd.errors import CtsdError
from ctsd.files import CONNECTIONS, STATE, SYNC_LOG, Invalid
from ctsd.models import Connection, ConnectionState, SyncEvent
from ctsd.safefile import SUBDIRS, dir_mode_problem, subdir_problem
from ctsd.timeutil import now_iso

if TYPE_CHECKING:
    from ctsd.store import Op, Tx

log = structlog.get_logger("ctsd.store")  # the store's log, as before the split

# Coarse clocks only: a stamp whose mtime is this recent may be shared by a second write, so
# `unchanged` compares the digest too (far above a clock tick of 1-10 ms).
DIGEST_WITHIN_NS = 50_000_000


class Intake:
    """The store's side that takes files in from disk (see the module docstring)."""

    def __init__(self) -> None:
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

    # --- start ---------------------------------------------------------------------------

    def open(self) -> None:
        """Create what is missing (never touching what exists), then load every file."""
        for sub in ("", *SUBDIRS):
            d = self.data_dir / sub
            problem = subdir_problem(d) if sub else None
            if problem is not None:  # never followed out of the data dir: refuse to start
                raise CtsdError("io_error", f"{d} {problem}")
            ensure_dir(d)
        wide = dir_mode_problem(self.data_dir)
        if wide is not None:  # files stay private (each must be 0600); /health shows it too
            log.warning("data_dir_mode", data_dir=str(self.data_dir), problem=wide)
        for d in (self.data_dir, self.data_dir / files.ALGORITHMS_DIR):
            for stale in d.glob(f"{TEMP_PREFIX}*"):
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
        # Never blocks (a FIFO), never follows a link, reads only a private regular file.
        raw, st = safefile.read_data_file(self.path(file), file)
        return raw, Stamp.of(st)

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
            self.digests[file] = _digest_of(raw)
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
        from ctsd.store import mirror_state  # the store imports this module

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
            # version must not pass as already judged). A lasting problem (a FIFO, a link, a
            # loose mode) is no half-written save: reported even when only looking.
            if report or e.lasting:
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
            self.digests[file] = _digest_of(raw)
        return True

    def unchanged(self, file: str) -> bool:
        """Is `file` on disk still what the store last read or wrote?

        Size, mtime and inode as recorded, and the ctime seen right after: an in-place edit
        that keeps the size and puts the mtime back still moves the ctime.
        """
        try:
            st = os.lstat(self.path(file))  # as stamp_of: a link is judged as the link
        except (FileNotFoundError, NotADirectoryError):
            return self.stamps.get(file) is None
        same = Stamp.of(st) == self.stamps.get(file) and st.st_ctime_ns == self.ctimes.get(file)
        if same and self.coarse_mtime and time.time_ns() - st.st_mtime_ns < DIGEST_WITHIN_NS:
            digest = self.digests.get(file)
            same = digest is not None and safefile.digest(self.path(file)) == digest
        return same

    def _note_ctime(self, file: str) -> None:
        # Called right after a stamp is recorded: the rename of our own write moved the ctime
        # after the stamp was taken, so note it now (only if the stamp still matches).
        try:
            st = os.lstat(self.path(file))
        except OSError:
            self.ctimes.pop(file, None)
            return
        if Stamp.of(st) == self.stamps.get(file):
            self.ctimes[file] = st.st_ctime_ns
        else:
            self.ctimes.pop(file, None)

    def _mark_invalid(self, file: str, problem: FileProblem, stamp: Stamp | None) -> None:
        if stamp is not None:
            self.stamps[file] = stamp  # judged as it is now; a later edit changes the stamp
        if self.problems.get(file) == problem:
            return
        self.problems[file] = problem
        log.error("file_invalid", file=file, problem=problem.format())
        self._notice(_invalid_notice(file, problem))

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

    async def reload_all(self) -> None:
        """SIGHUP: every data file taken in the same way a hand edit is."""
        for file in self.known_files():
            await self.ingest(file, force=True)

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
        try:
            files.check_size(file, st.st_size)
            raw = await anyio.to_thread.run_sync(os.pread, d.fd, st.st_size, 0)
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
            reason = f"written into {file} after the daemon had replaced it; kept as {name}, "
            self._notice({**_invalid_notice(name, problem), "reason": reason + "not taken in"})


def _invalid_notice(file: str, problem: FileProblem) -> dict[str, Any]:
    return {
        "notice": "file_invalid",
        "file": file,
        "line": problem.line,
        "column": problem.column,
        "path": problem.path,
        "message": problem.message,
    }


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


def _timestamps_coarse(directory: Path) -> bool:
    """Can two writes in a row, with a stat between (as we do), share an mtime here?"""
    probe: Path | None = None
    try:
        probe, fd = create_temp(directory / "probe")
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
        if probe is not None:
            probe.unlink(missing_ok=True)
    return False


def _digest_of(body: Any) -> bytes:
    h = hashlib.sha1()
    for chunk in [body] if isinstance(body, bytes | bytearray | memoryview) else body:
        h.update(chunk)
    return h.digest()


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
            except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError):
                return None
            if files.has_duplicate_keys(raw[pos:stop]):
                return None  # the full decoder names the key and both places
            if kind is Connection and files.connection_settings_problem(record.connection_settings):
                return None
            out.append(record)
            if j < len(ids) and getattr(record, key) == ids[j]:
                j += 1  # our record j, edited; else one inserted before it
        pos = stop + 2  # past ",\n" (or past the end)
    if len({getattr(r, key) for r in out}) != len(out):
        return None  # a duplicate id: the full decoder names both places
    return out
