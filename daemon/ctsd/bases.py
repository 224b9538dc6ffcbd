"""Copies of the data files as the daemon last knew them to hold: how a start tells a hand
edit made while the daemon was down from its own last write.

An edit made while the daemon was down must become a change like any hand edit: logged in
the sync log and broadcast (a bot resuming with `since` must see it), and on a cluster host
published, or the other hosts never get it. Taking it in needs the version the operator
started from. So the checkpointer writes each data file's bytes a second time, to
`DATA/.bases/<file>`, and a hand edit taken in becomes the copy too: in cluster mode in the
same durable group as the file; on one host so too, but for a table (connections and their
state, large) written change after change, whose copy follows once the table is left alone
(`later`: the round removes the copy first, so no copy is ever older than its file; a table
left without one for now is read as it is at start). At start (after the files are
read, before the journal replays onto them) a file whose bytes differ from its copy was
edited meanwhile, however the daemon stopped (a clean stop, kill -9, a power cut): memory
and the file's base go back to the copy, the journal replays on top, and once the store has
started (in cluster mode, caught up with the cluster) the file is taken in through the one
door, a three-way merge as for any hand edit. A file deleted meanwhile is written again from
its copy, as a running daemon writes a deleted file again from memory; an algorithm file
deleted or added meanwhile is taken in as such. A file broken meanwhile is served as its
copy holds it until it is fixed.

A copy's first line names the digest of the copy before it. A crash between the two renames
of a round leaves the file one version behind its copy; that digest recognises the daemon's
own previous write (not an edit). A clean stop, every round whole, leaves a mark
(`stopped-cleanly`): after it, a file one version behind is an edit (a backup put back, say),
and the mark is removed before anything is written again. The file is never ahead of its
copy: the copy's rename comes first and journalling filesystems (ext4, xfs) keep the order of
renames across a crash. Only a file new here gets its copy after it (a copy without its file
would read as a deletion made while down), and a table on one host (`later`): its copy is
removed, durably, before the file is written, and written after it, naming no previous
version.

The sync log is not copied: its ids are the daemon's, and a log trimmed while the daemon was
down goes on from the journal's revision. Without a copy (a data dir from a version that kept
none, or after `ctsd rekey` rewrote the files) the file is read as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ctsd import atomic, files, safefile
from ctsd.atomic import ensure_dir, fsync_dir, write_files
from ctsd.files import (
    ALGORITHMS_DIR,
    CONNECTIONS,
    SETTINGS,
    SYNC_LOG,
    TABLES,
    Invalid,
    document_name,
)

log = structlog.get_logger("ctsd.store")

# One host: a table written again within this long of its last write streams, and its copy
# follows once it was left alone this long (`Bases.later_for`).
COPY_IDLE_S = 1.0
DIR = ".bases"
LEGACY_DIR = ".cluster-base"  # its name while only cluster hosts kept copies: adopted at start
CLEAN = "stopped-cleanly"  # in DIR: the daemon stopped with every file at its copy's version
_MAGIC = b"ctsd-base 1 "
_NONE = b"-"

Content = bytes | Sequence[bytes] | atomic.Body
Plan = list[tuple[Path, Content]]


@dataclass
class Judged:
    """The data files as found at start, against their copies."""

    # file → its copy, the merge base (None: an algorithm added meanwhile, no base)
    edited: dict[str, bytes | None] = field(default_factory=dict)
    deleted: dict[str, bytes] = field(default_factory=dict)  # file → its copy (written again)
    # An edited file → "FILE:COPY", the SHA-256 (hex) of what it holds and of its copy ("" for
    # none): the journal may have taken it in against that copy already (`Change.taken`: a
    # crash came before the copy was kept).
    found: dict[str, str] = field(default_factory=dict)


def _chunks(body: Content) -> Sequence[bytes]:
    return [body] if isinstance(body, atomic.Chunk) else list(body)


def _digest(body: Content) -> bytes:
    h = hashlib.sha256()
    for chunk in _chunks(body):
        h.update(chunk)
    return h.digest()


def _parse(raw: bytes) -> tuple[bytes | None, bytes] | None:
    """(digest of the copy before, content) of a copy's bytes; None when it is not one."""
    head, sep, content = raw.partition(b"\n")
    if not sep or not head.startswith(_MAGIC):
        return None
    prev = head[len(_MAGIC) :]
    if prev == _NONE:
        return None, content
    try:
        digest = bytes.fromhex(prev.decode("ascii"))
    except ValueError:
        return None
    return (digest, content) if len(digest) == 32 else None


class CopyUnusable(Exception):
    """A file deleted while the daemon was down has a copy that cannot be used."""

    def __init__(self, file: str, why: str) -> None:
        super().__init__(
            f"{file} was deleted while the daemon was down, and its copy {DIR}/{file} cannot "
            f"be used ({why}): put {file} back, or remove the copy to start with its defaults"
        )


class Bases:
    """The copies of one data dir: written with each checkpoint, judged at start."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.dir = data_dir / DIR
        self._digests: dict[str, bytes] = {}  # file → digest of its copy on disk
        self._marked = False  # judged after a clean stop: the mark is still there (`unmark`)
        # On one host a table written change after change (a round within COPY_IDLE_S of its
        # last) has its copy follow once it is left alone (`put_aside`, `catch_up`), not in
        # each round: a second copy of every large file a round writes would double the
        # disk's work while changes stream in. Written after a pause (a heartbeat flush, an
        # operator's change), it gets its copy in the round as every other file does, so a
        # crash then never finds it without one. A cluster host keeps them in the round
        # always: a file read as it is at start (no copy) would differ from the cluster's.
        self.later = False
        # file → (its path, what it holds, when it was written: monotonic), its copy not yet
        self.pending: dict[str, tuple[Path, Content, float]] = {}
        self._table_written: dict[str, float] = {}  # table → when a round last wrote it
        self._unsynced: set[Path] = set()  # copies' dirs with a removal not yet made durable
        # (blocking: made at start, before the files load). Only a version that kept copies
        # under the old name writes there, and this one renames it away: it is the newer.
        legacy = data_dir / LEGACY_DIR
        if legacy.is_dir() and not legacy.is_symlink():
            if self.dir.is_dir() and not self.dir.is_symlink():
                shutil.rmtree(self.dir)
            os.rename(legacy, self.dir)
            fsync_dir(data_dir)

    def _copy_path(self, file: str) -> Path:
        return self.dir / file

    # --- written with each checkpoint (in the checkpointer's thread) --------------------------

    def copies(self, plan: Plan, *, before_files: bool = True) -> tuple[Plan, dict[str, bytes]]:
        """The copies to write with `plan` (renamed before it), and their digests, to pass to
        `written` once the group is on disk. `before_files=False`: the files hold `plan`
        already, so no crash can leave them one version behind their copies, and the copies
        name no previous version (a file set back to it later is an edit)."""
        extra: Plan = []
        digests: dict[str, bytes] = {}
        for path, body in plan:
            file = path.relative_to(self.data_dir).as_posix()
            if file == SYNC_LOG:
                continue
            prev = self._digests.get(file) if before_files else None
            head = _MAGIC + (prev.hex().encode() if prev is not None else _NONE) + b"\n"
            target = self._copy_path(file)
            ensure_dir(target.parent)  # removed by hand: made again, never a failed round
            chunks = _chunks(body)
            extra.append((target, [head, *chunks]))
            digests[file] = _digest(chunks)
        return extra, digests

    def written(self, digests: dict[str, bytes]) -> None:
        self._digests.update(digests)

    # --- one host: the copies after the files (in the checkpointer's thread) ------------------

    def later_for(self, path: Path) -> bool:
        """Does the copy of the file at `path` follow once the file is idle? On one host, a
        table's (the large files) while it is written change after change: its copy still
        left for later, or its last round less than COPY_IDLE_S ago. The others' (small, and
        an algorithm file without a copy reads as one added by hand) go with their files."""
        file = path.relative_to(self.data_dir).as_posix()
        if not self.later or file not in TABLES:
            return False
        last = self._table_written.get(file)
        return file in self.pending or (last is not None and time.monotonic() - last < COPY_IDLE_S)

    def tables_written(self, paths: Sequence[Path]) -> None:
        """A round wrote the files at `paths` (`later_for` tells a stream by it)."""
        now = time.monotonic()
        for path in paths:
            file = path.relative_to(self.data_dir).as_posix()
            if file in TABLES:
                self._table_written[file] = now

    def put_aside(self, paths: Sequence[Path]) -> None:
        """Before a round writes the files at `paths` without their copies: the copies they
        have are removed, durably, so that no copy is ever older than its file (the next
        start would take the daemon's own newer write for an edit). Until `catch_up` writes
        them again, an edit made while the daemon is down is read as it is."""
        for path in paths:
            self.pending.pop(path.relative_to(self.data_dir).as_posix(), None)  # (older)
            copy = self.copy_of(path)
            if os.path.lexists(copy):
                self._unsynced.add(copy.parent)  # (until synced: a retry must sync it too)
                copy.unlink()
        for d in sorted(self._unsynced):
            fsync_dir(d)
            self._unsynced.discard(d)

    def left(self, plan: Plan) -> None:
        """The files of `plan` are written, their copies not yet (`catch_up` writes them)."""
        now = time.monotonic()
        for path, body in plan:
            file = path.relative_to(self.data_dir).as_posix()
            if file != SYNC_LOG:
                self.pending[file] = (path, body, now)
                self._digests[file] = _digest(body)

    def catch_up(self, names: Sequence[str] | None = None) -> None:
        """The copies `left` for later (of `names`, else all), written (blocking; the
        checkpointer holds the files' locks): after their files, naming no previous version."""
        found = ((f, self.pending.get(f)) for f in (names or list(self.pending)))
        todo = {f: item for f, item in found if item is not None}
        if not todo:
            return
        copies, digests = self.copies([(p, b) for p, b, _ in todo.values()], before_files=False)
        write_files(copies)
        self.written(digests)
        for file, item in todo.items():
            if self.pending.get(file) is item:  # (not written again meanwhile)
                del self.pending[file]

    def copy_digest(self, file: str) -> str:
        """The SHA-256 (hex) of `file`'s copy on disk, "" for none (`Change.taken`)."""
        digest = self._digests.get(file)
        return digest.hex() if digest is not None else ""

    def keep(self, file: str, raw: bytes) -> None:
        """`file` as it is now (`raw`, a hand edit just taken in) becomes its copy
        (blocking)."""
        self.pending.pop(file, None)  # (under the file's lock, as `catch_up` runs)
        copies, digests = self.copies([(self.data_dir / file, raw)], before_files=False)
        try:
            write_files(copies)
        except OSError:
            self.forget(self.data_dir / file)  # no copy rather than a wrong base
            raise
        self.written(digests)

    def stopped_cleanly(self) -> None:
        """Mark that every data file holds its copy's version (a clean stop, its last round
        whole; the copies left for later written first), so the next start takes none for a
        round a crash cut (blocking)."""
        self.catch_up()
        ensure_dir(self.dir)
        write_files([(self.dir / CLEAN, b"")])

    def _stopped_cleanly(self) -> bool:
        try:
            return safefile.read_data_file(self.dir / CLEAN, f"{DIR}/{CLEAN}")[0] == b""
        except FileNotFoundError:
            return False
        except (OSError, Invalid) as e:  # not the mark the daemon made: no clean stop
            log.warning("base_copy_unreadable", file=CLEAN, reason=str(e))
            return False

    def unmark(self) -> None:
        """The clean stop's mark (if a start judged by it) removed, durably, before anything
        is written again: a round that a crash cuts later must not be taken for an edit. Not
        at `judge`: a start refused after it leaves the data dir as it found it."""
        if self._marked:
            (self.dir / CLEAN).unlink(missing_ok=True)
            fsync_dir(self.dir)
            self._marked = False

    def has_copy(self, file: str) -> bool:
        return self._copy_path(file).exists()

    def content(self, file: str) -> bytes | None:
        """What `file` held as the daemon last knew it (a file deleted while the daemon was
        down is written again from it); None when it has no copy. Raises CopyUnusable when
        the copy is there but cannot be used: its defaults in its place would be taken for
        an edit emptying it, or start a cluster host on its own."""
        if not self.has_copy(file):
            return None
        try:
            raw, _ = safefile.read_data_file(self._copy_path(file), f"{DIR}/{file}")
            parsed = _parse(raw)
            if parsed is None:
                raise CopyUnusable(file, "not a copy ctsd wrote")
            files.decode_file(file, parsed[1])
        except (OSError, Invalid) as e:
            why = e.problem.message if isinstance(e, Invalid) else e.strerror or str(e)
            raise CopyUnusable(file, why) from None
        return parsed[1]

    def copy_of(self, path: Path) -> Path:
        """The copy's path of the data file at `path`."""
        return self._copy_path(path.relative_to(self.data_dir).as_posix())

    def forget(self, path: Path) -> None:
        """No copy of the data file at `path` (gone from memory, or its copy could not be
        kept): removed durably, so it cannot come back to judge a file by."""
        copy = self.copy_of(path)
        self._digests.pop(path.relative_to(self.data_dir).as_posix(), None)
        self.pending.pop(path.relative_to(self.data_dir).as_posix(), None)
        with contextlib.suppress(OSError):
            if os.path.lexists(copy):
                self._unsynced.add(copy.parent)  # (until synced: the next `put_aside` syncs it)
                copy.unlink()
            if copy.parent in self._unsynced:
                fsync_dir(copy.parent)
                self._unsynced.discard(copy.parent)

    # --- at start -----------------------------------------------------------------------------

    def judge(self, names: list[str], created: set[str], invalid: set[str]) -> Judged:
        """Each data file (`names`: the sync log aside) against its copy (blocking: reads
        every file and copy). `created`: files that were missing (just created with default
        content); `invalid`: files that do not read as valid (edited, when they have a copy:
        never written until fixed, then taken in). A file matching its copy, or the daemon's
        write before it (unless the daemon stopped cleanly), gets a fresh copy of what it
        holds, as does a file with none; edited and deleted files keep theirs (the base of
        the merge, the content to write again)."""
        out = Judged()
        for d in (self.dir, self.dir / ALGORITHMS_DIR):  # a write a crash cut left behind
            for stale in d.glob(f"{atomic.TEMP_PREFIX}*"):
                stale.unlink(missing_ok=True)
        fresh: Plan = []
        clean = self._stopped_cleanly()  # no round was cut: one version behind is an edit
        unnamed: Plan = []  # copies to write again naming no previous version
        # Copies were made at an earlier start (one of settings.json always is; a table's
        # may be put aside): an algorithm file without one was added while the daemon was down.
        seeded = any(self._copy_path(f).exists() for f in (SETTINGS, CONNECTIONS))
        for file in [*names, *self._algorithm_copies(names)]:
            copy = self._read_copy(file)
            if copy is not None and file in invalid:
                # Broken while the daemon was down: memory holds what it last wrote, not
                # nothing (the stream applies on top); the fixed file is taken in later.
                out.edited[file] = copy[1]
                self._digests[file] = _digest(copy[1])
                continue
            if file in invalid:
                continue
            try:
                raw, _ = safefile.read_data_file(self.data_dir / file, file)
            except FileNotFoundError:
                if copy is not None:  # an algorithm deleted meanwhile: taken in as such
                    out.edited[file] = copy[1]
                continue
            except (OSError, Invalid):
                continue  # the intake reported it
            if copy is not None and file in created:
                out.deleted[file] = copy[1]
                # What the file holds now: a round cut before the rewrite is no edit.
                self._digests[file] = _digest(raw)
                continue
            if copy is not None and raw != copy[1]:
                prev, content = copy
                if prev is None or clean or _digest(raw) != prev:
                    out.edited[file] = content
                    out.found[file] = f"{hashlib.sha256(raw).hexdigest()}:{_digest(content).hex()}"
                    self._digests[file] = _digest(content)
                    if clean and prev is not None:  # an edit still at a start after this one
                        unnamed.append((self.data_dir / file, content))
                    continue
            if copy is None and seeded and file.startswith(f"{ALGORITHMS_DIR}/"):
                out.edited[file] = None
                out.found[file] = f"{hashlib.sha256(raw).hexdigest()}:"
                continue
            if copy is None or raw != copy[1]:
                fresh.append((self.data_dir / file, raw))
            else:
                self._digests[file] = _digest(raw)
        if fresh:
            extra, digests = self.copies(fresh)
            write_files(extra)
            self.written(digests)
        if unnamed:
            write_files(self.copies(unnamed, before_files=False)[0])
        self._marked = clean
        if out.edited or out.deleted:
            log.warning(
                "edited_while_stopped", files=sorted(out.edited), deleted=sorted(out.deleted)
            )
        return out

    def _algorithm_copies(self, known: list[str]) -> list[str]:
        """The algorithms with a copy but no file (deleted while the daemon was down)."""
        found = (self.dir / ALGORITHMS_DIR).glob("*.json")
        names = (f"{ALGORITHMS_DIR}/{p.name}" for p in found)
        return sorted(f for f in names if f not in known and document_name(f) is not None)

    def _read_copy(self, file: str) -> tuple[bytes | None, bytes] | None:
        path = self._copy_path(file)
        try:
            raw, _ = safefile.read_data_file(path, f"{DIR}/{file}")
        except FileNotFoundError:
            return None
        except (OSError, Invalid) as e:
            log.warning("base_copy_unreadable", file=file, reason=str(e))
            return None
        parsed = _parse(raw)
        if parsed is None:
            log.warning("base_copy_unreadable", file=file, reason="not a copy ctsd wrote")
        return parsed


def drop(data_dir: Path) -> None:
    """Forget every copy (the files rewritten by a tool that is not the daemon): the next
    start reads the files as they are."""
    for path in (data_dir / DIR, data_dir / LEGACY_DIR):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            fsync_dir(data_dir)
