"""`ctsd secrets init|status|rekey`: the key that encrypts secrets at rest.

`init` makes a key file; `status` reads the data dir offline; `rekey` works offline, or
through the running daemon's door when one holds the data dir. No value, plain or
encrypted, is ever printed.
"""

from __future__ import annotations

import base64
import contextlib
import os
import stat
import sys
from pathlib import Path
from typing import Any

import click
import msgspec

from ctsd import files, safefile
from ctsd.atomic import write_all
from ctsd.client.bus import run_call
from ctsd.client.errors import EXIT_REFUSED, fail
from ctsd.client.render import echo_json, safe
from ctsd.client.target import resolve_target
from ctsd.config import is_loopback, resolve_data_dir
from ctsd.files import Invalid
from ctsd.offline import DaemonRunning, NoDataDir, check_data_dir
from ctsd.rekey import RekeyRefused, read_intent, rekey_offline
from ctsd.secretbox import (
    CREDENTIAL_NAME,
    KEY_FILE_ENV,
    Key,
    KeyFileError,
    SecretBox,
    configured_key,
    configured_key_path,
    load_key_file,
    new_key_text,
    parse_key,
)
from ctsd.secretfields import SECRET_FILES, Survey, survey

DEFAULT_KEY_FILE = Path("/etc/ctsd/secrets-key")
DATA_DIR_HELP = "data directory [env CTSD_DATA_DIR, DATA_DIR, DATA_PATH; ./data]"


def current_key() -> Key | None:
    """The configured key, or exit 1 naming the problem."""
    try:
        return configured_key()
    except KeyFileError as e:
        fail(str(e))


def key_file_warning(path: Path) -> str | None:
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            return f"{path} is readable by other users (mode {mode:04o}): chmod 600 it"
    return None


def write_key_file(path: Path) -> Key:
    """A new key in a new file, 0600; never replaces an existing file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = new_key_text()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, text)
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return parse_key(text, str(path))


SYSTEMD_HELP = """\
Load it under systemd, encrypted with the host's credential key (systemd 250 or later):
  sudo systemd-creds encrypt --name={name} {path} {path}.cred
and in the unit ([Service], e.g. `systemctl edit ctsd`):
  LoadCredentialEncrypted={name}:{path}.cred
On a host without systemd-creds, load the file as it is:
  LoadCredential={name}:{path}
Without systemd, point the daemon at it:
  {env}={path} ctsd serve
Keep a copy of the key somewhere safe and apart from the backups: without it, neither the
data dir's secrets nor any backup's can be read."""


def print_survey(found: Survey, box: SecretBox, as_json: bool) -> bool:
    """Print the survey; True when everything is in order."""
    key_id = box.key_id
    other = {k: n for k, n in found.readable.items() if k != key_id}
    mine = found.readable.get(key_id or "", 0) if key_id else 0
    ok = not found.problems and (key_id is None or not found.plain)
    if as_json:
        echo_json(
            {
                "ok": ok,
                "key_id": key_id,
                "values": found.total,
                "encrypted": dict(found.readable),
                "plain": [p.where() for p in found.plain],
                "not_strings": [p.where() for p in found.not_strings],
                "undecryptable": [e.message for e in found.problems],
            }
        )
        return ok
    parts = []
    if mine:
        parts.append(f"{mine} encrypted under key id {key_id}")
    parts += [f"{n} encrypted under key id {k}" for k, n in sorted(other.items())]
    if found.plain:
        parts.append(f"{len(found.plain)} plain text")
    if found.not_strings:
        parts.append(f"{len(found.not_strings)} not text (stay plain)")
    if found.problems:
        parts.append(f"{len(found.problems)} cannot be decrypted")
    click.echo(f"secret values: {found.total}" + (f" — {', '.join(parts)}" if parts else ""))
    if found.plain:
        click.echo(
            "plain text"
            + (
                " (the daemon encrypts them when it next writes the file; "
                "`ctsd secrets rekey` does it now):"
                if key_id
                else ":"
            )
        )
        for p in found.plain:
            click.echo(f"  {safe(p.where())}")
    if found.not_strings:
        click.echo("not text (numbers, booleans: cannot be encrypted, stay plain):")
        for p in found.not_strings:
            click.echo(f"  {safe(p.where())}")
    if found.problems:
        click.echo("cannot be decrypted:")
        for e in found.problems:
            click.echo(f"  {safe(e.message)}")
    return ok


def register(main: click.Group) -> None:
    @main.group()
    def secrets() -> None:
        """The key that encrypts secrets at rest: init, status, rekey."""

    @secrets.command()
    @click.option(
        "--key-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help=f"where to make it [env {KEY_FILE_ENV}; {DEFAULT_KEY_FILE}]",
    )
    def init(key_file: Path | None) -> None:
        """Make a new secrets key file (32 random bytes as base64, mode 0600)."""
        path = key_file or Path(os.environ.get(KEY_FILE_ENV) or DEFAULT_KEY_FILE)
        try:
            path = path.expanduser().absolute()
        except RuntimeError:  # `~name` of a user this host does not know
            fail(f"{safe(path)}: no user's home to put for its ~")
        try:
            key = write_key_file(path)
        except FileExistsError:
            fail(
                f"{path} already exists; a key file is never replaced (the secrets encrypted "
                "with it could not be read again). Pick another path, or `ctsd secrets rekey` "
                "to move to a new key"
            )
        except OSError as e:
            fail(f"cannot create {path}: {e.strerror or e}")
        click.echo(f"made a secrets key, key id {key.id}, in {path} (mode 0600)\n")
        click.echo(
            SYSTEMD_HELP.format(name=CREDENTIAL_NAME, path=path, env=KEY_FILE_ENV)
            + "\n\nThen restart the daemon with the key configured: it encrypts every plain "
            "secret before it is ready. Or encrypt them now (through the daemon when it runs):\n"
            f"  ctsd secrets rekey --new-key {path}"
        )

    @secrets.command()
    @click.option("--data-dir", help=DATA_DIR_HELP)
    @click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")
    def status(data_dir: str | None, as_json: bool) -> None:
        """Is a key configured, and how is every secret stored (read from the files)? Exit 1
        when a value cannot be decrypted, or when a key is set and a value is still plain."""
        directory = resolve_data_dir(data_dir)
        try:
            check_data_dir(directory)
        except NoDataDir as e:
            fail(str(e))
        key = current_key()
        box = SecretBox(key)
        lines: list[str] = []
        if key is None:
            lines.append(
                "key: none configured — the daemon stores new secrets in plain text and "
                "cannot open encrypted ones; how each is stored now is below "
                f"(set {KEY_FILE_ENV}, or load the credential {CREDENTIAL_NAME}; "
                "`ctsd secrets init` makes a key)"
            )
        else:
            found = configured_key_path()
            how = found[1] if found else key.source
            lines.append(f"key: configured ({safe(how)}), key id {key.id}")
            if found:
                warning = key_file_warning(found[0])
                if warning:
                    lines.append(f"warning: {warning}")
        try:
            intent = read_intent(directory)
        except RekeyRefused as e:
            fail(str(e))
        contents: dict[str, Any] = {}
        problems: list[str] = []
        for file in SECRET_FILES:
            raw: bytes | None = None
            try:
                if intent is not None and file in intent.files:
                    raw = intent.files[file].encode()
                else:
                    with contextlib.suppress(FileNotFoundError):
                        # Never blocks (a FIFO), never follows a link, bounded in size.
                        raw, _st = safefile.read_data_file(directory / file, file)
                if raw is None:
                    continue
                files.decode_file(file, raw)
            except Invalid as e:
                problems.append(e.problem.format())
                continue
            except OSError as e:  # (no permission: run it as the daemon's user or root)
                problems.append(f"{file}: cannot read: {e.strerror or e}")
                continue
            contents[file] = msgspec.json.decode(raw)
        if intent is not None:
            lines.append(
                f"an interrupted rekey to key id {intent.new_key_id} is pending: the next "
                "offline command or daemon start finishes it (shown here as finished)"
            )
        found_survey = survey(box, contents)
        if not as_json:
            for line in lines:
                click.echo(line)
            for p in problems:
                click.echo(f"invalid file (its secrets are not counted): {safe(p)}")
        ok = print_survey(found_survey, box, as_json) and not problems
        sys.exit(0 if ok else EXIT_REFUSED)

    @secrets.command()
    @click.option(
        "--new-key",
        "new_key",
        required=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="the new key file (`ctsd secrets init --key-file FILE` makes one)",
    )
    @click.option("--data-dir", help=DATA_DIR_HELP)
    def rekey(new_key: Path, data_dir: str | None) -> None:
        """Re-encrypt every secret under a new key, through the running daemon or offline.
        Every value is decrypted with the key in use first; if one fails, nothing is changed."""
        directory = resolve_data_dir(data_dir)
        try:
            new = load_key_file(new_key)
        except KeyFileError as e:
            fail(str(e))
        try:
            result = rekey_offline(directory, current_key(), new)
        except NoDataDir as e:
            fail(str(e))
        except DaemonRunning:
            rekey_online(directory, new, new_key)
            return
        except RekeyRefused as e:
            for line in e.problems:
                click.echo(f"ctsd: {safe(line)}", err=True)
            fail(f"{len(e.problems)} problem(s): nothing was changed")
        except OSError as e:
            fail(f"cannot rewrite the data files: {e.strerror or e}; nothing was lost")
        current = current_key()
        was = f"key id {current.id}" if current else "plain text"
        if not result.files:
            click.echo(f"no secret values to re-encrypt in {directory}")
        else:
            click.echo(
                f"re-encrypted {result.values} secret value(s) in "
                f"{', '.join(sorted(result.files))} under key id {new.id} (was {was})"
            )
        click.echo(
            f"\nNow configure the new key ({new_key.absolute()}) where the daemon loads its key "
            f"({KEY_FILE_ENV} or the {CREDENTIAL_NAME} credential), then start the daemon. "
            + KEEP_OLD_KEY
        )


KEEP_OLD_KEY = "Keep the old key as long as you keep backups made before now: they need it."


def rekey_online(directory: Path, new: Key, new_key: Path) -> None:
    """The rekey through the running daemon's door: one change, answered once in the files.
    The key travels over the bus, so only to a daemon on this host (loopback)."""
    target = resolve_target(str(directory), None, None)
    if not is_loopback(target.host):
        fail(
            f"the daemon listens on {target.host}, not loopback: the key would cross the "
            "network in clear; run the rekey on the daemon's host",
            EXIT_REFUSED,
        )
    key_text = base64.b64encode(new.material).decode()
    result = run_call(target, "secrets.rekey", secrets_key=key_text)
    count = result.get("connections") if isinstance(result, dict) else None
    click.echo(
        f"the running daemon re-encrypted every secret under key id {new.id} "
        f"({safe(count)} connection(s)); it uses the new key from now on"
    )
    click.echo(
        f"\nNow configure the new key ({new_key.absolute()}) where the daemon loads its key "
        f"({KEY_FILE_ENV} or the {CREDENTIAL_NAME} credential) before the daemon restarts: "
        "a restart with the old key refuses to start, naming both key ids. " + KEEP_OLD_KEY
    )
