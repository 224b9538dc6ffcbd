"""What the offline commands share: the instance lock held for a whole command, and reading
every data file of a dir.

Holding `DATA/.lock` keeps a daemon from starting in the middle of an offline backup, restore
or key rotation; finding it held means a daemon is running, and the command goes through the
daemon instead (or refuses, for what only works offline).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from ctsd import files
from ctsd.errors import CtsdError
from ctsd.lock import InstanceLock
from ctsd.safefile import read_data_file


class DaemonRunning(Exception):
    """The instance lock is held: a daemon runs on this data dir."""


class NoDataDir(Exception):
    """The data dir does not exist, is not a directory, or this user cannot enter it."""


def check_data_dir(data_dir: Path) -> None:
    """NoDataDir, with a one-line reason, unless `data_dir` is a directory this user may
    enter. (Path.is_dir() lets EACCES through on Python 3.11: a traceback.)"""
    st: os.stat_result | None
    try:
        st = os.stat(data_dir)
        if stat.S_ISDIR(st.st_mode):
            # Search permission on the dir itself: without it every file in it fails later.
            os.stat(os.path.join(data_dir, "."))
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as e:
        raise NoDataDir(f"cannot access {data_dir}: {e.strerror or e}") from None
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise NoDataDir(f"{data_dir}: data dir does not exist or is not a directory")


@contextlib.contextmanager
def exclusive(data_dir: Path) -> Iterator[InstanceLock]:
    """Hold the data dir's instance lock for the block; DaemonRunning when it is taken."""
    check_data_dir(data_dir)
    lock = InstanceLock(data_dir)
    try:
        lock.acquire()
    except CtsdError as e:
        raise DaemonRunning(e.message) from None
    try:
        owner = owner_for(data_dir)
        if owner is not None:
            os.chown(lock.path, *owner)  # a lock file root made must not lock the daemon out
        yield lock
    finally:
        lock.release()


def owner_for(data_dir: Path) -> tuple[int, int] | None:
    """(uid, gid) to give what we write into `data_dir`, when root works in a service user's
    dir (systemd's DynamicUser=): files root owns there, mode 0600, the daemon cannot read.
    None when nothing needs changing."""
    st = os.stat(data_dir)
    if os.geteuid() != 0 or (st.st_uid, st.st_gid) == (0, 0):
        return None
    return st.st_uid, st.st_gid


def data_file_names(data_dir: Path) -> list[str]:
    """The data files present in `data_dir` (tables, documents, `algorithms/*.json`), sorted:
    every name that holds something (`read_data_files` refuses what the daemon would: a
    directory, a link, a FIFO, a device, a file other users may read)."""
    names = [*files.TABLES, *(f for f, _ in files.DOCUMENTS.values())]
    algo_dir = data_dir / files.ALGORITHMS_DIR
    if algo_dir.is_dir():
        names += [f"{files.ALGORITHMS_DIR}/{p.name}" for p in algo_dir.iterdir()]
    out = []
    for name in names:
        if not files.is_data_file(name):
            continue
        if os.path.lexists(data_dir / name):
            out.append(name)
    return sorted(out)


def ignored_files(data_dir: Path) -> list[str]:
    """`algorithms/*.json` files whose names the daemon never reads (`_draft.json`, a name
    with a character outside the rule): in no archive, named so the operator knows."""
    algo_dir = data_dir / files.ALGORITHMS_DIR
    if not algo_dir.is_dir():
        return []
    names = (f"{files.ALGORITHMS_DIR}/{p.name}" for p in algo_dir.glob("*.json"))
    return sorted(n for n in names if not files.is_data_file(n))


def read_data_files(data_dir: Path, names: list[str] | None = None) -> dict[str, bytes]:
    """The bytes of every data file present (or of `names` that exist), by relative path.
    Read as the daemon reads them: raises files.Invalid for a name holding no private regular
    file (a link is never followed, a FIFO never waited on) or one over the size limit."""
    out: dict[str, bytes] = {}
    for name in data_file_names(data_dir) if names is None else names:
        try:
            out[name], _st = read_data_file(data_dir / name, name)
        except FileNotFoundError:
            continue
    return out
