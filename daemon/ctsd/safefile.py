"""Reading files in the data dir without trusting what sits at their names.

A name in the data dir can hold anything: a FIFO (a plain open blocks until a writer comes,
for good), a device, a socket, a directory, or a symlink out of the dir. Every read of a data
file (start, hand edits, SIGHUP, the writer's check, `ctsd verify`, the token) goes through
`open_regular`:

- `lstat` first: anything but a regular file is refused without being opened (opening a
  device can have effects of its own);
- then `open(O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC)`: a name swapped for a FIFO
  since the lstat does not block the open, a symlink is not followed (ELOOP);
- then `fstat` of the descriptor: only a regular file is read, and only up to a size limit.

Data files may hold secrets (see `secretnames.is_secret_key`: any document may), so a data file
readable or writable by group or others is refused too (`mode_problem`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

from ctsd.diagnose import FileProblem
from ctsd.files import ALGORITHMS_DIR, Invalid, check_size
from ctsd.limits import MAX_FILE_BYTES

# The data dir's own directories: never followed when they are links (the daemon refuses to
# start, naming the path), so nothing is ever read or written outside the data dir.
SUBDIRS = (ALGORITHMS_DIR, "historical", "logs")

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


class NotRegular(OSError):
    """The name holds something other than a regular file; `reason` says what."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(errno.EINVAL, reason, str(path))
        self.reason = reason


def kind_problem(st: os.stat_result) -> str | None:
    """Why a file with this `lstat` result is not read as a data file, or None."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "is a symlink: ctsd does not follow links in its data dir"
    if stat.S_ISDIR(mode):
        return "is a directory, expected a regular JSON file"
    kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
    return f"is {kind}, expected a regular JSON file"


def mode_problem(st: os.stat_result, shown: str | Path) -> str | None:
    """Why a file with these permissions is refused (group or others may read or change it),
    or None. Execute bits alone give nothing away and are allowed."""
    loose = st.st_mode & 0o066
    if not loose:
        return None
    verbs = [v for v, bits in (("read", 0o044), ("change", 0o022)) if loose & bits]
    return (
        f"mode {stat.S_IMODE(st.st_mode):04o} lets other users {' and '.join(verbs)} it; "
        f"chmod 600 {shown}"
    )


def subdir_problem(path: Path) -> str | None:
    """Why `path`, one of the data dir's directories, cannot be used (None: it is a real
    directory, or absent and can be created)."""
    st = lstat(path)
    if st is None or stat.S_ISDIR(st.st_mode):
        return None
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink: ctsd does not follow links in its data dir; make it a directory"
    return "exists and is not a directory"


def dir_mode_problem(path: Path) -> str | None:
    """Why the data dir's permissions are too wide (group or others may enter or list it),
    or None. Files stay safe (each must be 0600), but names, sizes and times show."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    if not mode & 0o077:
        return None
    return f"mode {mode:04o} lets other users list the data dir; chmod 700 {path}"


def dir_problems(data_dir: Path) -> dict[str, str]:
    """What is wrong with the data dir itself ("." for its mode) and its directories."""
    out: dict[str, str] = {}
    wide = dir_mode_problem(data_dir)
    if wide is not None:
        out["."] = wide
    for sub in SUBDIRS:
        problem = subdir_problem(data_dir / sub)
        if problem is not None:
            out[sub] = problem
    return out


def token_problem(path: Path) -> str | None:
    """Why a bus token file must not be used (not a regular file, or group or others may
    read or change it), or None (also when it is absent)."""
    try:
        fd, st = open_regular(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except NotRegular as e:
        return e.reason
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    os.close(fd)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return (
            f"is mode {mode:04o}: other users may have read the bus token; "
            "chmod 600 it and consider a new token"
        )
    return None


def lstat(path: Path) -> os.stat_result | None:
    """`os.lstat`, None when nothing is there (also when a parent is not a directory)."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """Open `path` for reading if, and only if, it is a regular file (never following a link,
    never blocking); returns the descriptor and its `fstat`. Raises `NotRegular` (an
    OSError) for anything else, and OSError as `os.open` does."""
    before = os.lstat(path)
    reason = kind_problem(before)
    if reason is not None:
        raise NotRegular(path, reason)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        if e.errno == errno.ELOOP:  # swapped for a link since the lstat
            raise NotRegular(path, kind_problem(os.lstat(path)) or "is a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        reason = kind_problem(st)
        if reason is not None:
            raise NotRegular(path, reason)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_fd(fd: int, limit: int = MAX_FILE_BYTES) -> bytes | None:
    """Everything in `fd` from the start, or None when it holds more than `limit` bytes
    (bounded even for a file that grows while it is read)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = os.pread(fd, min(1 << 20, limit + 1 - size), size)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None


def read_data_file(path: Path, file: str, *, private: bool = True) -> tuple[bytes, os.stat_result]:
    """The bytes of data file `file` (at `path`) and the `fstat` they were read under.

    Raises `files.Invalid` (with `lasting=True`: waiting will not change it) when the name
    holds no regular file, when `private` and group or others may read or change it, or
    when it is larger than the limit; OSError when it cannot be read (FileNotFoundError when
    it is gone). A file in one of the data dir's directories (`algorithms/`) is not read
    through that directory once it was swapped for a link: no open follows it out."""
    if "/" in file and (problem := subdir_problem(path.parent)) is not None:
        why = f"{path.parent.name}/ {problem}"
        raise Invalid(FileProblem(file, 1, 1, "$", why), lasting=True)
    try:
        fd, st = open_regular(path)
    except NotRegular as e:
        raise Invalid(FileProblem(file, 1, 1, "$", e.reason), lasting=True) from None
    try:
        if private and (reason := mode_problem(st, path)) is not None:
            raise Invalid(FileProblem(file, 1, 1, "$", reason), lasting=True)
        check_size(file, st.st_size)  # before reading: never load a huge file
        raw = read_fd(fd)
        if raw is None:
            check_size(file, MAX_FILE_BYTES + 1)  # grew past the limit while read
        assert raw is not None
        return raw, st
    finally:
        os.close(fd)


def read_text_file(path: Path, limit: int = 64 * 1024) -> tuple[str, os.stat_result]:
    """A small text file (a token, a key) read as safely as a data file: raises NotRegular
    for anything but a regular file, ValueError when larger than `limit` or not UTF-8."""
    fd, st = open_regular(path)
    try:
        raw = read_fd(fd, limit)
    finally:
        os.close(fd)
    if raw is None:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return raw.decode("utf-8"), st


def read_configured_file(path: Path, limit: int) -> bytes:
    """A small file an operator named (a key, credentials): links are followed, as the
    operator chose the path, but anything other than a regular file is refused before it is
    read (a FIFO would block the start for good, /dev/zero would never end). Raises
    NotRegular (an OSError) for those, OSError as `os.open` does, and ValueError when the file
    holds more than `limit` bytes."""

    def check(st: os.stat_result) -> None:
        reason = kind_problem(st)
        if reason is not None:
            raise NotRegular(path, f"it {reason.split(',')[0]}, not a regular file")

    check(os.stat(path))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        check(os.fstat(fd))  # swapped since the stat
        raw = read_fd(fd, limit)
    finally:
        os.close(fd)
    if raw is None:
        raise ValueError(f"it is larger than {limit} bytes")
    return raw


def digest(path: Path) -> bytes | None:
    """SHA-1 of a regular file's content; None for anything else or on error."""
    try:
        fd, _st = open_regular(path)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return hashlib.file_digest(fh, "sha1").digest()
    except OSError:
        return None
    finally:
        os.close(fd)


def resolved(path: Path) -> Path:
    """`path.resolve()`, a symlink loop raised as OSError (ELOOP), as Python 3.13 raises it:
    3.11 and 3.12 raise RuntimeError, which no OSError handler catches."""
    try:
        return path.resolve()
    except RuntimeError:
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from None
