"""`ctsd backup` and `ctsd restore`: the whole data dir as one archive, and back.

Both work offline for now: they hold the data dir's instance lock throughout, and refuse
(exit 6) while a daemon holds it.
"""

from __future__ import annotations

import datetime as dt
import sys
import tempfile
from pathlib import Path

import click

from ctsd import backup
from ctsd.backup import ArchiveError
from ctsd.client.errors import fail
from ctsd.client.render import safe
from ctsd.client.secrets import DATA_DIR_HELP, current_key, daemon_running
from ctsd.config import resolve_data_dir
from ctsd.offline import DaemonRunning, NoDataDir
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
        is set. Offline: refuses while the daemon runs."""
        directory = resolve_data_dir(data_dir)
        to_stdout = output == "-"
        if to_stdout and sys.stdout.isatty():
            fail("refusing to write an archive to a terminal; use -o FILE or a pipe")
        path = Path(output or default_name()).absolute()
        if not to_stdout and path.is_dir():
            path = path / default_name()
        try:
            if to_stdout:
                # Built in a private temp file first: stdout gets a whole archive or nothing.
                with tempfile.TemporaryDirectory(prefix="ctsd-backup-") as tmp:
                    tmp_path = Path(tmp) / "backup.tar.gz"
                    manifest = backup.backup_offline(directory, tmp_path)
                    with open(tmp_path, "rb") as f:
                        while chunk := f.read(1 << 20):
                            sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
            else:
                manifest = backup.backup_offline(directory, path)
        except NoDataDir as e:
            fail(str(e))
        except DaemonRunning as e:
            daemon_running(e, "backup")
        except (ArchiveError, RekeyRefused) as e:
            fail(str(e))
        except OSError as e:
            fail(f"cannot write {safe(path)}: {e.strerror or e}")
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
        DATA.before-restore-TIME. The archive is verified completely first. Offline: refuses
        while the daemon runs."""
        directory = resolve_data_dir(data_dir)
        box = None if no_secret_check else SecretBox(current_key())
        try:
            done = backup.restore_offline(directory, file, box)
        except DaemonRunning as e:
            daemon_running(e, "restore")
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
        for line in done.tidied:
            click.echo(line)
        if done.kept is not None:
            click.echo(f"the previous data dir is kept as {done.kept}")
