"""Backup and restore while the daemon runs (`data.backup`, `data.restore`).

The archive travels through the data dir, never over the bus: any bus client holds a token
(the frontends do), and an archive holds every secret as stored — plain text when no key is
configured. So only whoever can read the data dir (the operator running `ctsd`) gets one:

- backup: every committed change is written to the files, then the files are read while no
  checkpoint round and no hand-edit take-in can run (all file locks held): the files then
  hold one revision, between two commits. The archive is written into the data dir as
  `.backup-…tar.gz` (0600) and the CLI moves it where it was asked to.
- restore: the CLI puts the archive in the data dir as `.restore-…tar.gz`; the daemon reads
  and verifies all of it (checksums, every file valid, every secret decrypting with its key)
  and applies it as one change through the door (subscribers see it; never half-applied).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from ctsd import backup, files, ops
from ctsd.backup import ArchiveError
from ctsd.checkpoint import _Locks
from ctsd.errors import CtsdError
from ctsd.offline import data_file_names, read_data_files

if TYPE_CHECKING:
    from ctsd.store import Store

BACKUP_PREFIX = ".backup-"
RESTORE_PREFIX = ".restore-"
SUFFIX = ".tar.gz"
STALE_S = 3600.0  # a handed-over archive the CLI never took (it was killed): removed after this
# Archives waiting for their CLI to take them: any token holder may ask for a backup, and
# each is a copy of every file left in the data dir for up to STALE_S; unbounded, asking in
# a loop would fill the disk (and then every write fails). One is made at a time. At the
# cap, those older than TAKEN_WITHIN_S (a CLI moves its archive at once) are removed first,
# so uncollected ones never hold the operator's backup off for long.
MAX_WAITING = 4
TAKEN_WITHIN_S = 60.0
# An archive whose mtime is further ahead of the clock than this was made before the clock
# stepped back: its age is unknown, and it counts as old (else it stayed, and held backups
# off, until the clock got there).
AHEAD_S = 5.0
_locks: weakref.WeakKeyDictionary[Store, asyncio.Lock] = weakref.WeakKeyDictionary()


def tidy(
    data_dir: Path,
    max_age: float = STALE_S,
    prefixes: tuple[str, ...] = (BACKUP_PREFIX, RESTORE_PREFIX),
) -> None:
    """Remove handed-over archives older than `max_age` (at start: all of them, since no
    hand-over survives a restart of the daemon that was part of it; `AHEAD_S`)."""
    now = time.time()
    for p in data_dir.iterdir():
        if p.name.startswith(prefixes) and p.name.endswith(SUFFIX):
            with contextlib.suppress(OSError):
                age = now - p.lstat().st_mtime
                if max_age <= 0 or age >= max_age or age < -AHEAD_S:
                    p.unlink()


SNAPSHOT_ATTEMPTS = 20  # flushes a backup waits through for the files to hold one revision


async def snapshot_files(store: Store) -> dict[str, bytes]:
    """Every data file's bytes at one revision (between two commits)."""
    if store.problems:
        bad = sorted(store.problems)
        raise CtsdError(
            "file_invalid",
            f"{bad[0]} is invalid on disk ({store.problems[bad[0]].format()}); a backup would "
            "not hold what the daemon holds: fix the file first",
            extra={"file": bad[0]},
        )
    for _ in range(SNAPSHOT_ATTEMPTS):
        await store.checkpointer.flush()
        names = data_file_names(store.data_dir)
        async with _Locks(store.file_lock, names):
            # (no round writes while the locks are held: what is consistent now stays so)
            if not store.checkpointer.consistent():
                continue  # a change came as the last round waited: its next round first
            try:
                return await anyio.to_thread.run_sync(read_data_files, store.data_dir, names)
            except files.Invalid as e:  # (made a link or a FIFO since the last look)
                raise CtsdError(
                    "file_invalid",
                    f"{e.problem.format()}: a backup would not hold what the daemon holds",
                    extra={"file": e.problem.file},
                ) from None
    raise CtsdError(
        "io_error",
        f"the data files were between two revisions at each of {SNAPSHOT_ATTEMPTS} looks "
        "(changes keep coming as they are written); retry",
    )


def waiting_backups(data_dir: Path) -> int:
    """Uncollected archives, once the stale ones are removed (and, at the cap, those older
    than TAKEN_WITHIN_S)."""
    tidy(data_dir)
    waiting = [
        p
        for p in data_dir.iterdir()
        if p.name.startswith(BACKUP_PREFIX) and p.name.endswith(SUFFIX)
    ]
    if len(waiting) >= MAX_WAITING:
        tidy(data_dir, TAKEN_WITHIN_S, (BACKUP_PREFIX,))  # (a restore handed over stays)
        waiting = [p for p in waiting if p.exists()]
    return len(waiting)


async def backup_running(store: Store) -> dict[str, Any]:
    async with _locks.setdefault(store, asyncio.Lock()):
        if await anyio.to_thread.run_sync(waiting_backups, store.data_dir) >= MAX_WAITING:
            raise CtsdError(
                "rate_limited",
                f"{MAX_WAITING} backups made in the last {TAKEN_WITHIN_S:g} s still wait in the "
                "data dir for the commands that asked for them; try again shortly",
            )
        return await _backup(store)


async def _backup(store: Store) -> dict[str, Any]:
    contents = await snapshot_files(store)
    name = f"{BACKUP_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-"
    name += secrets.token_hex(4) + SUFFIX
    path = store.data_dir / name

    def build() -> backup.Manifest:
        return backup.build_archive(contents, backup.revision_of(contents), path)

    try:
        manifest = await anyio.to_thread.run_sync(build)
    except ArchiveError as e:
        raise CtsdError("file_invalid", str(e)) from None
    except OSError as e:
        raise CtsdError("io_error", f"cannot write the backup: {e.strerror or e}") from None
    return {"file": name, "manifest": msgspec.to_builtins(manifest)}


def _restore_path(store: Store, name: str) -> Path:
    if (
        not name.startswith(RESTORE_PREFIX)
        or not name.endswith(SUFFIX)
        or "/" in name
        or "\0" in name  # (the OS refuses it: ValueError, not OSError)
        or name in (".", "..")
    ):
        raise CtsdError(
            "invalid", f"file must be a {RESTORE_PREFIX}*{SUFFIX} in the data dir", path="$.file"
        )
    return store.data_dir / name


async def restore_running(store: Store, name: str, source: str) -> dict[str, Any]:
    """Verify the archive `name` (in the data dir) completely, then apply it as one change;
    `revision` in the answer is the revision right after it."""
    path = _restore_path(store, name)
    try:

        def verified() -> backup.Archive:
            archive = backup.read_archive(path)
            backup.check_secrets(archive, store.box)
            return archive

        try:
            archive = await anyio.to_thread.run_sync(verified)
        except ArchiveError as e:
            raise CtsdError("invalid", f"nothing was restored: {e}") from None
        contents = {
            f: msgspec.json.decode(raw)
            for f, raw in archive.contents.items()
            if files.is_data_file(f)
        }
        result, revision = await store.submit_answer(
            ops.restore(contents, archive.manifest.revision), source, sync="files"
        )
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return {**result, "revision": revision, "archive_revision": archive.manifest.revision}
