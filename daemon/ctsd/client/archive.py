"""`ctsd backup` and `ctsd restore`: the whole data dir as one archive, and back.

With the daemon stopped they hold the data dir's instance lock throughout. With it running
they go through it: a backup is taken between two commits, a restore is one change through
its door (see `ctsd.livebackup`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import secrets
import shutil
import stat
import sys
from pathlib import Path
from typing import Any, BinaryIO

import click
import msgspec

from ctsd import backup, files
from ctsd.atomic import create_temp, fsync_dir
from ctsd.backup import ArchiveError
from ctsd.client.bus import run_call
from ctsd.client.errors import fail
from ctsd.client.outfile import STDOUT_NAMES, destination
from ctsd.client.render import safe
from ctsd.client.secrets import DATA_DIR_HELP, current_key
from ctsd.client.target import resolve_target
from ctsd.config import resolve_data_dir
from ctsd.livebackup import RESTORE_PREFIX, SUFFIX
from ctsd.offline import DaemonRunning, NoDataDir, ignored_files, owner_for
from ctsd.rekey import RekeyRefused
from ctsd.secretbox import SecretBox


def default_name() -> str:
    return f"ctsd-backup-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}.tar.gz"


def register(main: click.Group) -> None:
    @main.command("backup")
    @click.option(
        "-o",
        "--output",
        help="archive file [ctsd-backup-TIME.tar.gz in the current dir]; - = stdout",
    )
    @click.option("--data-dir", help=DATA_DIR_HELP)
    def backup_(output: str | None, data_dir: str | None) -> None:
        """One archive (tar.gz, mode 0600) of every data file as stored, with a manifest
        (revision, sha256 per file). Secrets stay as they are on disk: encrypted when a key
        is set. With the daemon running, it takes the snapshot between two commits."""
        directory = resolve_data_dir(data_dir)
        named = Path(output or default_name()).absolute()
        try:
            if output not in STDOUT_NAMES and named.is_dir():
                named = named / default_name()
        except OSError as e:  # (a name too long, a directory not searchable)
            fail(f"cannot write the archive to {output}: {e.strerror or e}")
        # A pipe or a device (/dev/null) is written through, as stdout is; never replaced.
        kind, path = destination(output if output in STDOUT_NAMES else str(named), directory)
        to_stdout = kind == "stdout"
        if to_stdout and sys.stdout.isatty():
            fail("refusing to write an archive to a terminal; use -o FILE or a pipe")
        try:
            with contextlib.ExitStack() as stack:
                sink: BinaryIO | None = sys.stdout.buffer if to_stdout else None
                if kind == "stream":
                    sink = stack.enter_context(open(path, "wb"))
                    if os.isatty(sink.fileno()):
                        fail("refusing to write an archive to a terminal; use -o FILE or a pipe")
                try:
                    if sink is not None:
                        # Built whole in memory first: the sink gets a whole archive or
                        # nothing, and no temp file is left behind by a kill mid-copy. (With
                        # a daemon running, DaemonRunning comes before anything is built.)
                        manifest, body = backup.archive_offline(directory)
                        sink.write(body)
                        sink.flush()
                    else:
                        manifest = backup.backup_offline(directory, path)
                except DaemonRunning:
                    manifest = backup_online(directory, path, sink)
        except NoDataDir as e:
            fail(str(e))
        except (ArchiveError, RekeyRefused) as e:
            fail(str(e))
        except OSError as e:
            fail(_backup_error(e, path))
        where = "stdout" if to_stdout else safe(path)
        keys = (
            f"secrets encrypted under key id {', '.join(manifest.key_ids)}"
            if manifest.key_ids
            else "no encrypted secrets"
        )
        click.echo(
            f"backed up {len(manifest.files)} file(s) at revision {manifest.revision} to "
            f"{where} ({keys})",
            err=True,
        )
        with contextlib.suppress(OSError):
            for name in ignored_files(directory):
                click.echo(f"left out {safe(name)}: {files.ALGORITHM_NAME_RULE}", err=True)

    @main.command()
    @click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--data-dir", help=DATA_DIR_HELP)
    @click.option(
        "--no-secret-check",
        is_flag=True,
        help="restore even if the configured key cannot decrypt the archive's secrets",
    )
    def restore(file: Path, data_dir: str | None, no_secret_check: bool) -> None:
        """Replace the data dir with an archive's files, atomically; the old dir is kept as
        DATA.before-restore-TIME. The archive is verified completely first. With the daemon
        running, it goes through the daemon's door as one change (its key must decrypt the
        archive's secrets; --no-secret-check does not apply)."""
        directory = resolve_data_dir(data_dir)
        box = None if no_secret_check else SecretBox(current_key())
        try:
            done = backup.restore_offline(directory, file, box)
        except DaemonRunning:
            restore_online(directory, file)
            return
        except (ArchiveError, NoDataDir) as e:
            fail(f"{e}\nnothing was changed")
        except OSError as e:
            fail(
                f"restore failed: {e.strerror or e} ({safe(getattr(e, 'filename', '') or '')}); "
                f"{directory} holds either its old content or the archive's, never a mix"
            )
        m = done.manifest
        click.echo(
            f"restored {len(m.files)} file(s) from {safe(file)} (made {m.created_at} by ctsd "
            f"{safe(m.ctsd_version)}, revision {m.revision}) into {done.data_dir}"
        )
        if done.revision > m.revision:
            click.echo(
                f"the revision goes on from the data dir's: {done.revision} (an import event "
                "on top of the archive's sync log; ids are never given twice)"
            )
        if done.sealed:
            click.echo(
                f"encrypted the archive's {done.sealed} plain-text secret(s) under the "
                f"configured key ({box.key_id if box else ''})"
            )
        for line in done.tidied:
            click.echo(line)
        if done.kept is not None:
            click.echo(f"the previous data dir is kept as {done.kept}")


def _backup_error(e: OSError, path: Path) -> str:
    """The line for a backup's OSError, naming the file it was about: a data dir's lock or
    data file it could not open was reported as the archive it could not write."""
    name = e.filename
    if name is None or Path(os.fsdecode(name)) == path:
        return f"cannot write {safe(path)}: {e.strerror or e}"
    return f"backup failed: {safe(os.fsdecode(name))}: {e.strerror or e}; nothing was written"


def _call(directory: Path, command: str, **args: Any) -> Any:
    target = resolve_target(str(directory), None, None)
    return run_call(target, command, **args)


def _copy(source: BinaryIO, sink: BinaryIO) -> None:
    while chunk := source.read(1 << 20):
        sink.write(chunk)
    sink.flush()


def backup_online(directory: Path, path: Path, sink: BinaryIO | None) -> backup.Manifest:
    """The running daemon writes a consistent archive into its data dir (archives never
    travel over the bus); it is copied to `path` (or a `sink`) and removed.

    Copied, never moved or chowned: in the daemon's dir its user could have put a link
    there (a root CLI would then move it out and chmod what it names), and a copy to
    another filesystem through `shutil` was made with the umask's mode (0644) and left
    behind when it failed. The copy is a new 0600 file beside `path`, renamed over it once
    whole."""
    result = _call(directory, "data.backup")
    made = directory / result["file"]
    manifest = msgspec.convert(result["manifest"], type=backup.Manifest)
    try:
        # (O_NONBLOCK: a FIFO there must not hang the open; it is refused just below)
        fd = os.open(made, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as src:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", str(made))
            os.set_blocking(fd, True)
            if sink is not None:
                _copy(src, sink)
                return manifest
            tmp, out_fd = create_temp(path)
            try:
                with os.fdopen(out_fd, "wb") as out:
                    _copy(src, out)
                    os.fsync(out.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            fsync_dir(path.parent)
        return manifest
    finally:
        with contextlib.suppress(OSError):
            os.unlink(made)


def restore_online(directory: Path, file: Path) -> None:
    """Verified here first (a clear message before anything moves), handed to the daemon
    through its data dir, verified there again and applied as one change through its door."""
    try:
        archive = backup.read_archive(file)
    except ArchiveError as e:
        fail(f"{e}\nnothing was changed")
    name = f"{RESTORE_PREFIX}{secrets.token_hex(8)}{SUFFIX}"
    staged = directory / name
    try:
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out, open(file, "rb") as src:
            shutil.copyfileobj(src, out)
            owner = owner_for(directory)
            if owner is not None:  # the daemon runs as the data dir's owner
                # (by descriptor: the name, in the daemon's dir, may be a link by now)
                os.fchown(out.fileno(), *owner)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(staged)
        fail(f"cannot hand the archive to the daemon in {directory}: {e.strerror or e}")
    try:
        result = _call(directory, "data.restore", file=name)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(staged)
    m = archive.manifest
    click.echo(
        f"the running daemon restored {len(m.files)} file(s) from {safe(file)} (made "
        f"{m.created_at} by ctsd {safe(m.ctsd_version)}, revision {m.revision}) as one change, "
        f"now at revision {safe(result.get('revision'))}"
    )
    dropped = result.get("state_dropped")
    if dropped:
        click.echo(
            f"ctsd: the archive's state record(s) of no connection dropped, as a start drops "
            f"them: {', '.join(safe(str(d)) for d in dropped)}",
            err=True,
        )
