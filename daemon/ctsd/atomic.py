"""Durable atomic writes: temp file in the same dir → fsync → rename → fsync the dir.

Blocking on purpose: the checkpointer runs a whole round in one worker thread, so one thread
hop pays for every file of the round.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol, TypeAlias

TEMP_PREFIX = ".ctsd-tmp-"
FILE_MODE = 0o600
DIR_MODE = 0o700


Chunk: TypeAlias = bytes | bytearray | memoryview


class Body(Protocol):
    """A file body whose chunks are made as it is iterated (`files.TableBody`), about
    `nbytes` long, so a large one need not be held whole."""

    nbytes: int

    def __iter__(self) -> Iterator[bytes]: ...


class Stamp(NamedTuple):
    """What a file looked like when the daemon last read or wrote it."""

    size: int
    mtime_ns: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


def stamp_of(path: Path) -> Stamp | None:
    """The stamp of whatever is at `path`, never following a link (a link is judged as the
    link: the daemon does not follow links in its data dir), None when nothing is there."""
    try:
        return Stamp.of(os.lstat(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


class ChangedOnDisk(Exception):
    """A file changed under us between our last look and the rename: nothing was replaced."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.path = path


# renameat2(RENAME_EXCHANGE) swaps two names atomically. The old file comes out under the
# temp name, so we can check it is still the version we last saw *after* the swap: a hand
# edit renamed in between our last check and our rename is swapped back, never destroyed.
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTTY}


def _exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` atomically; False when this system or filesystem cannot
    (FileNotFoundError when one of them is gone)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(b))


def exchange(a: Path, b: Path) -> bool:
    """Swap two names (files or directories) atomically; False when this system or
    filesystem cannot, or one of them is gone."""
    try:
        return _exchange(a, b)
    except FileNotFoundError:
        return False


_Swapped = list[tuple[Path | None, Path, Stamp]]  # (temp or None for a link, path, ours)


def _put(tmp: Path, path: Path, ours: Stamp, expected: Stamp | None, swapped: _Swapped) -> None:
    """Rename `tmp` over `path` unless `path` is no longer `expected` (ChangedOnDisk)."""
    if expected is None:
        try:
            os.link(tmp, path)  # create-if-absent: fails if someone created it meanwhile
        except FileExistsError:
            raise ChangedOnDisk(path) from None
        except OSError as e:
            if e.errno not in _UNSUPPORTED and e.errno != errno.EPERM:
                raise
            os.replace(tmp, path)
            return
        swapped.append((None, path, ours))
        return
    try:
        exchanged = _exchange(tmp, path)
    except FileNotFoundError:
        # Gone since the check (an editor's save under way: `mv f f~`, then a new f): a
        # change on disk, judged as one (a deletion's grace, a new file taken in); put back
        # now, the editor would then write its buffer into the daemon's file.
        raise ChangedOnDisk(path) from None
    if not exchanged:
        os.replace(tmp, path)  # no exchange here: the check above is the best we can do
        return
    swapped.append((tmp, path, ours))
    if Stamp.of(os.lstat(tmp)) != expected:
        raise ChangedOnDisk(path)


def _unswap(swapped: _Swapped) -> None:
    """Put back what the exchanges displaced (newest first), unless replaced again since."""
    for tmp, path, ours in reversed(swapped):
        with contextlib.suppress(OSError):
            if os.lstat(path).st_ino != ours.ino:
                continue  # a newer edit superseded both: leave it
            if tmp is None:
                os.unlink(path)  # we created it: it was absent before
            else:
                _exchange(tmp, path)


class Displaced(NamedTuple):
    """A file our swap displaced while another process held it open for writing (an in-place
    writer that opened it before the swap), or had just written into it: kept open, and
    linked under `kept`, because that writer may still write into it, or has (see
    `Store.take_in_late`)."""

    path: Path
    fd: int
    stamp: Stamp  # what it was when displaced: any other stamp means it was written since
    kept: Path  # linked, not just open: an open unlinked file makes a ro remount fail busy


_kept_ids = itertools.count()


def written_elsewhere(fd: int) -> bool:
    """Does another process hold this file open for writing? (A read lease is granted only
    when none does; Linux, local filesystems. When leases are unavailable: assume not.)"""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        return e.errno == errno.EAGAIN
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False


def _keep_if_written(tmp: Path, path: Path, old: Stamp, displaced: list[Displaced]) -> None:
    """Keep the file our swap displaced (now at `tmp`) if a writer still has it open, or
    wrote into it since the swap's check: one that wrote and closed in between, a moment
    before this look, would otherwise lose its write with the temp file."""
    try:
        fd = os.open(tmp, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        # (In this order: once no writer holds it, none can write into it any more.)
        if written_elsewhere(fd) or Stamp.of(os.fstat(fd)) != old:
            kept = path.with_name(f"{TEMP_PREFIX}old-{path.name}.{os.getpid()}.{next(_kept_ids)}")
            os.replace(tmp, kept)
            displaced.append(Displaced(path, fd, old, kept))
            return
    except OSError:
        pass
    os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# sync_file_range(SYNC_FILE_RANGE_WRITE) starts writeback without waiting (Linux; Python's os
# module lacks it). Started for every file of a group before the first fsync, the disk works
# on all of them at once and that fsync's journal commit also covers the other files' block
# allocations. A hint only: fsync still decides durability.
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int) -> None:
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # failure is harmless: fsync follows


# A temp file is always a new file of ours: never one that is there already, never through a
# link planted at its name (O_EXCL fails on both), and its name cannot be guessed ahead.
_TEMP_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def create_temp(path: Path, readable: bool = False) -> tuple[Path, int]:
    """A new file beside `path` (mode 0600), opened for writing (and reading, if asked):
    (its name, descriptor)."""
    access = os.O_RDWR if readable else os.O_WRONLY
    for _ in range(8):
        tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(8)}")
        try:
            return tmp, os.open(tmp, access | _TEMP_FLAGS, FILE_MODE)
        except FileExistsError:
            continue  # 64 random bits taken: someone is planting names; draw again
    raise FileExistsError(errno.EEXIST, "no free temp file name", str(path.parent))


# A large file is written back in pieces as it is written (the write waits for each): the
# disk queue then holds about one piece of it, so a journal append's fdatasync waits behind
# one piece, not behind the whole file. A piece is an eighth of the file within these bounds:
# small, so an append (made on the event loop while the disk is quick: `Store.append`) never
# waits behind more than a quarter megabyte, even while a table of many megabytes goes out;
# and not smaller, so such a table is not hundreds of waits (each write and wait hands the
# GIL back, and a busy event loop keeps it up to a switch interval before this thread gets
# it again).
PACE_MIN = 128 << 10
PACE_MAX = 256 << 10
PIECES = 8
_SYNC_FILE_RANGE_WAIT = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER
_IOV_MAX = max(16, os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 0)


def pace_of(total: int) -> int:
    return min(PACE_MAX, max(PACE_MIN, total // PIECES))


def _write_all(fd: int, chunks: Sequence[Chunk] | Body, paced: bool) -> None:
    """Write every chunk, in order, in pieces, written back as it goes if `paced`. A `Body`
    (its chunks made as they are iterated) is made a chunk at a time when paced, all first
    when not (one writev)."""
    if not paced or _sync_file_range is None:
        _write_at_once(fd, list(chunks))
        return
    pace = pace_of(sum(map(len, chunks)) if isinstance(chunks, Sequence) else chunks.nbytes)
    written = flushed = 0
    for chunk in chunks:
        view = memoryview(chunk)
        while len(view):
            n = os.write(fd, view[: pace - (written - flushed)])
            view = view[n:]
            written += n
            if written - flushed >= pace:
                _wait_written_back(fd, flushed, written - flushed)
                flushed = written


def _wait_written_back(fd: int, offset: int, nbytes: int) -> None:
    """A waiting sync_file_range reports a writeback error (EIO) and the kernel counts it as
    seen by this open file: the fsync after it would then succeed on pages that were lost.
    So its failure is raised (the write fails as a failing fsync's would), but for a call
    this kernel or file system does not take (a sandbox, FUSE): pacing is only a hint."""
    assert _sync_file_range is not None
    if _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WAIT) != 0:
        err = ctypes.get_errno()
        if err not in _NOT_TAKEN:
            raise OSError(err, os.strerror(err))


_NOT_TAKEN = frozenset({errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ESPIPE})


def write_all(fd: int, data: Chunk) -> None:
    """All of `data`: a write cut short (a disk filling up) goes on with the rest, and one
    that can take no more raises (ENOSPC), never a file silently shorter."""
    _write_at_once(fd, [data])


def _write_at_once(fd: int, chunks: Sequence[Chunk]) -> None:
    """Every chunk in as few writes as the kernel takes (a writev of up to IOV_MAX chunks).
    A thread gives the GIL away at each write, and winning it back from a busy event loop
    can take a whole switch interval: an unpaced 10 MB table must not be fifty writes."""
    todo = [memoryview(c) for c in chunks if len(c)]
    first = 0
    while first < len(todo):
        n = os.writev(fd, todo[first : first + _IOV_MAX])
        if n <= 0:
            raise OSError(errno.EIO, "the write took nothing")
        while n:
            if n < len(todo[first]):
                todo[first] = todo[first][n:]
                break
            n -= len(todo[first])
            first += 1


def write_files(
    plan: Sequence[tuple[Path, Chunk | Sequence[Chunk] | Body]],
    expected: dict[Path, Stamp | None] | None = None,
    displaced: list[Displaced] | None = None,
    owner: tuple[int, int] | None = None,
    paced: bool = True,
) -> dict[Path, Stamp]:
    """Write every file of `plan` durably and return their new stamps.

    Each body is bytes, a sequence of chunks or a `Body` (chunks made as they are written), so
    a large file is never joined whole. When `expected` names a file, its current stamp is checked
    again just before the renames; if any differs, nothing is renamed and `ChangedOnDisk` is
    raised.
    On any error every temp file is removed and the old files are untouched.

    With `displaced`, each file our swap displaced that another process still holds open for
    writing, or wrote into since the swap's check, is appended to it as a `Displaced` (the
    caller closes and unlinks it); the others go as before.

    With `owner` (uid, gid), every file is given to that owner before it is installed (root
    writing into a service user's data dir).

    `paced`: a large file is written back piece by piece as it is written (`pace_of`);
    False skips those waits (the caller wants the files on disk sooner rather than journal
    appends answered sooner).
    """
    temps: list[tuple[Path, Path]] = []
    stamps: dict[Path, Stamp] = {}
    swapped: _Swapped = []
    fds: list[int] = []
    try:
        try:
            for path, body in plan:
                tmp, fd = create_temp(path)
                temps.append((tmp, path))
                fds.append(fd)
                if owner is not None:
                    os.fchown(fd, *owner)
                chunks = [body] if isinstance(body, Chunk) else body
                _write_all(fd, chunks, paced)
                _start_writeback(fd)
            for fd, (_tmp, path) in zip(fds, temps, strict=True):
                os.fsync(fd)
                stamps[path] = Stamp.of(os.fstat(fd))
        finally:
            for fd in fds:
                os.close(fd)
        for path, stamp in (expected or {}).items():
            if stamp_of(path) != stamp:
                raise ChangedOnDisk(path)
        try:
            for tmp, path in temps:
                if expected is not None and path in expected:
                    _put(tmp, path, stamps[path], expected[path], swapped)
                else:
                    os.replace(tmp, path)
        except BaseException:
            _unswap(swapped)  # all or nothing: a group is never half installed
            raise
        # Temps that were not renamed away now hold the displaced old files (or ours after
        # a link): removed below either way.
        if displaced is not None and expected is not None:
            for tmp, path, _ours in swapped:
                old = expected.get(path)
                if tmp is not None and old is not None:
                    _keep_if_written(tmp, path, old, displaced)
        temps = [(tmp, path) for tmp, path in temps if os.path.lexists(tmp)]
        for directory in {path.parent for path, _ in plan}:
            fsync_dir(directory)
        return stamps
    finally:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def remove_file(path: Path, expected: Stamp | None) -> None:
    """Remove `path` if it still is `expected` (ChangedOnDisk if not: nothing removed). It is
    renamed aside and checked there, so a save that lands in between is put back, not lost."""
    if stamp_of(path) != expected:
        raise ChangedOnDisk(path)
    aside = path.with_name(f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(8)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if stamp_of(aside) != expected:
        try:
            os.link(aside, path)  # back where it was, unless yet another save is there
            os.unlink(aside)
        except FileExistsError:
            os.rename(aside, path.with_name(f"{path.name}.late-{secrets.token_hex(4)}"))
        raise ChangedOnDisk(path)
    os.unlink(aside)
    fsync_dir(path.parent)


def ensure_dir(path: Path) -> None:
    """Create a data directory 0700 (never chmod one that already exists)."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
