"""`ctsd export`, `ctsd import` and `ctsd reset`: the daemon's data as a whole."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from ctsd.atomic import fsync_dir
from ctsd.client.bus import COMMAND_TIMEOUT_S, MAX_FRAME, run_call, warn_unencrypted
from ctsd.client.errors import EXIT_AUTH, EXIT_NO_DAEMON, BusError, CliError, fail
from ctsd.client.options import CMD, bus_options, json_option
from ctsd.client.outfile import destination
from ctsd.client.render import dump_json, echo_json, key_values, load_json, safe
from ctsd.client.target import Target, no_token_message, read_token
from ctsd.files import SYNC_LOG
from ctsd.guard import SOURCE_HEADER
from ctsd.limits import MAX_FILE_BYTES

# What an import can hold: the sync log (at most MAX_FILE_BYTES, not sent) and the rest (in
# one bus frame, or over HTTP past that); a larger file is no export, never read whole.
MAX_IMPORT_BYTES = 2 * MAX_FILE_BYTES


def _read_bounded(file: str) -> bytes | None:
    """The file's bytes (`-`: stdin); None when it holds more than MAX_IMPORT_BYTES (a
    regular file that large is not read at all, a pipe or /dev/zero only that far)."""
    with contextlib.ExitStack() as stack:
        f = sys.stdin.buffer if file == "-" else stack.enter_context(open(file, "rb"))
        if file != "-" and os.fstat(f.fileno()).st_size > MAX_IMPORT_BYTES:
            return None
        raw = f.read(MAX_IMPORT_BYTES + 1)
        return raw if len(raw) <= MAX_IMPORT_BYTES else None


def write_private(path: Path, text: str) -> None:
    """Write atomically with mode 0600: an export holds the whole configuration."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)  # the rename too survives a power cut (an export is a backup)


def register(main: click.Group) -> None:
    @main.command(**CMD)
    @bus_options
    @click.option(
        "-o", "--output", type=click.Path(dir_okay=False, writable=True), help="file; - = stdout"
    )
    def export(target: Target, output: str | None) -> None:
        """Export every file of the daemon as one JSON document (secrets masked)."""

        kind, path = (
            destination(output, target.data_dir) if output is not None else ("stdout", Path("-"))
        )
        result = run_call(target, "data.export")
        text = dump_json(result, 2) + "\n"
        if kind == "stdout":
            click.echo(text, nl=False)
            return
        try:
            if kind == "stream":
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
            else:
                write_private(path, text)
        except OSError as e:
            fail(f"cannot write {safe(output)}: {e.strerror or e}")
        files = result.get("files") if isinstance(result, dict) else None
        revision = result.get("revision") if isinstance(result, dict) else None
        click.echo(
            f"exported {len(files or {})} file(s) at revision {revision} to {safe(output)}",
            err=True,
        )

    @main.command("import", **CMD)
    @bus_options
    @json_option
    @click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
    @click.option("--merge", is_flag=True, help="merge into the current data instead of replacing")
    def import_(target: Target, as_json: bool, file: str, merge: bool) -> None:
        """Import a `ctsd export` document: replace everything, or --merge into it."""
        try:
            raw = _read_bounded(file)
        except OSError as e:
            raise click.BadParameter(
                f"cannot read {safe(file)}: {e.strerror or e}", param_hint="'FILE'"
            ) from None
        if raw is None:
            raise click.BadParameter(
                f"{safe(file)} is larger than {MAX_IMPORT_BYTES:,} bytes: no export is",
                param_hint="'FILE'",
            )
        try:
            data = load_json(raw)
        except UnicodeDecodeError:
            raise click.BadParameter(f"{safe(file)} is not UTF-8", param_hint="'FILE'") from None
        except json.JSONDecodeError as e:
            raise click.BadParameter(
                f"{safe(file)}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}", param_hint="'FILE'"
            ) from None
        except RecursionError:
            raise click.BadParameter(
                f"{safe(file)} is nested too deeply", param_hint="'FILE'"
            ) from None
        except ValueError as e:  # NaN, Infinity, 1e999, or an integer too long to read
            raise click.BadParameter(
                f"{safe(file)} holds a number that is no JSON or too long to read: {e}",
                param_hint="'FILE'",
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            raise click.BadParameter(
                f'{safe(file)} is not a ctsd export (expected an object with "files")',
                param_hint="'FILE'",
            )

        # The sync log is history, the daemon's own: an import never rewrites it, so it is
        # not sent (it is most of a large export).
        data["files"].pop(SYNC_LOG, None)
        # Secrets come back masked from an export: sent as they are, the daemon keeps the
        # stored secret for each one (and imports unset, naming it, one where none is).
        mode = "merge" if merge else "replace"
        try:
            body = dump_json(data).encode()
        except UnicodeEncodeError:  # (a lone surrogate escape, `"\ud800"`)
            raise click.BadParameter(
                f"{safe(file)} holds text that is not valid UTF-8", param_hint="'FILE'"
            ) from None
        if len(body) < MAX_FRAME - 1024:
            result = run_call(target, "data.import", data=data, mode=mode)
        else:  # (a bus message takes 1 MiB: a larger export goes the HTTP way, as its own)
            result = _import_over_http(target, body, mode)
        if isinstance(result, dict) and isinstance(result.get("secrets_unset"), list):
            # Paths in the file given (`$.files...`), as HTTP says them, not in the bus
            # command's arguments (`$.data.files...`)
            result["secrets_unset"] = [
                "$." + u.removeprefix("$.data.") if isinstance(u, str) and u.startswith("$.data.")
                else u
                for u in result["secrets_unset"]
            ]  # fmt: skip
        if as_json:
            echo_json(result)
            return
        click.echo(f"imported {safe(file)} ({'merge' if merge else 'replace'})")
        if isinstance(result, dict) and result:
            click.echo("\n".join(key_values(result, 2)))
        unset = result.get("secrets_unset") if isinstance(result, dict) else None
        if unset:
            click.echo(
                f"ctsd: {len(unset)} secret(s) held masked in the export, none stored: imported "
                "unset, set them again: " + ", ".join(safe(str(u)) for u in unset),
                err=True,
            )

    @main.command(**CMD)
    @bus_options
    @json_option
    @click.option("--yes", is_flag=True, help="really reset: every connection and document")
    def reset(target: Target, as_json: bool, yes: bool) -> None:
        """Reset all data to the defaults (needs --yes)."""
        if not yes:
            raise click.UsageError(
                "reset deletes every connection and resets every document; "
                "run `ctsd reset --yes` to do it (`ctsd backup` first keeps a copy you can "
                "`ctsd restore`, secrets included: an export's are masked, so it cannot bring "
                "back a connection's keys once they are gone)"
            )

        result = run_call(target, "data.reset", confirm=True)
        if as_json:
            echo_json(result)
            return
        click.echo(
            "reset: every connection deleted, every document back to its default "
            "(the daemon's own settings kept)"
        )


def _import_over_http(target: Target, body: bytes, mode: str) -> Any:
    """`POST /api/data/import` of an export too large for one bus message: as the bus's
    `data.import` goes (the token found the same way, or none where loopback needs none;
    `sync=files`; the sync log's source `cli`), its answer and errors read the same (the same
    codes, the same exit codes)."""
    import httpx

    token = read_token(target)
    warn_unencrypted(target, token)
    headers = {"Content-Type": "application/json", SOURCE_HEADER: "cli"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        try:
            r = httpx.post(
                f"http://{target.where}/api/data/import",
                params={"mode": mode, "sync": "files"},
                content=body,
                headers=headers,
                timeout=COMMAND_TIMEOUT_S,
                trust_env=False,  # (the token never goes through a proxy from the environment)
            )
        except httpx.HTTPError as e:
            raise CliError(
                f"no daemon answering on {target.where}: {safe(e)}", EXIT_NO_DAEMON
            ) from None
        try:
            answer = r.json()
        except ValueError:
            answer = None
        error = answer.get("error") if isinstance(answer, dict) else None
        if r.status_code == 401 and not token:
            raise CliError(no_token_message(target), EXIT_AUTH)
        if r.status_code != 200 and not isinstance(error, dict):
            raise CliError(
                f"{target.where} answered HTTP {r.status_code}, not as ctsd does: is this ctsd?",
                EXIT_NO_DAEMON,
            )
        if r.status_code != 200:
            raise BusError(error)  # type: ignore[arg-type]
        return answer
    except CliError as e:
        e.show()
        sys.exit(e.exit_code)
