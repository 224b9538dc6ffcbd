"""The `ctsd` command: `serve`, the offline tools, and the bus client commands."""

from __future__ import annotations

import contextlib
import errno
import os
import sys

import click
import msgspec

from ctsd import __version__
from ctsd.client import register as register_client
from ctsd.client.render import safe, short
from ctsd.config import resolve_data_dir

LOG_FORMATS = click.Choice(["json", "console"], case_sensitive=False)
LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ctsd")
def main() -> None:
    """ctsd: exchange connections, their state and the trading app's settings as JSON files,
    watched and broadcast over a websocket bus."""


@main.command()
@click.option("--data-dir", help="data directory [env CTSD_DATA_DIR, DATA_DIR, DATA_PATH; ./data]")
@click.option("--host", help="bind address [env CTSD_HOST; settings server.host; 127.0.0.1]")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    help="port [env CTSD_PORT; settings server.port; 3587]",
)
# The environment is read here, not by click: a bad value there is a start failure (exit 1,
# one line), where click would print a usage block and exit 2 as for a bad flag.
@click.option(
    "--log-format", type=LOG_FORMATS, help="[env CTSD_LOG_FORMAT; console on a TTY, else json]"
)
@click.option("--log-level", type=LOG_LEVELS, help="[env CTSD_LOG_LEVEL; info]")
def serve(
    data_dir: str | None,
    host: str | None,
    port: int | None,
    log_format: str | None,
    log_level: str | None,
) -> None:
    """Run the daemon in the foreground (systemd runs it this way)."""
    from ctsd import app, logs

    log_format = log_format or _choice_from_env("CTSD_LOG_FORMAT", LOG_FORMATS)
    log_level = log_level or _choice_from_env("CTSD_LOG_LEVEL", LOG_LEVELS) or "info"
    logs.setup(log_format, log_level)
    sys.exit(app.serve(resolve_data_dir(data_dir), host, port))


def _choice_from_env(name: str, choice: click.Choice) -> str | None:
    """The environment variable `name` as one of `choice` (None when unset or empty, as
    click took it); otherwise exit 1 with one line naming the variable and what it takes."""
    value = os.environ.get(name)
    if not value:
        return None
    for accepted in choice.choices:
        if value.lower() == str(accepted).lower():
            return str(accepted)
    click.echo(
        f"ctsd: {name}={short(value)!r} is not one of: {', '.join(map(str, choice.choices))}",
        err=True,
    )
    sys.exit(1)


@main.command()
@click.option("--data-dir", help="data directory to check [default: as for serve]")
def verify(data_dir: str | None) -> None:
    """Check every data file offline; print each problem as file:line:column: message."""
    from ctsd.offline import NoDataDir, check_data_dir
    from ctsd.verify import NO_POSITION, verify_dir

    directory = resolve_data_dir(data_dir)
    try:
        check_data_dir(directory)
    except NoDataDir as e:
        # A missing or closed dir is not a file problem: a file:1:1 location would confuse.
        click.echo(f"ctsd: {e}", err=True)
        sys.exit(1)
    checked, problems, notes = verify_dir(directory)
    # (safe: a key or a file name in a data dir may carry a terminal's escape sequences)
    for note in notes:
        click.echo(safe(f"{directory}/{note}"))
    for problem in problems:
        if problem.line == NO_POSITION:  # the dir, or a file as a whole
            where = directory if problem.file == "." else directory / problem.file
            click.echo(safe(f"{where}: {problem.message}"))
        else:
            click.echo(safe(f"{directory}/{problem.format()}"))
    if problems:
        click.echo(f"{len(problems)} problem(s) in {len(checked)} file(s)", err=True)
        sys.exit(1)
    click.echo(f"ok: {len(checked)} file(s) valid in {directory}")


@main.command()
@click.argument("name", required=False)
def schema(name: str | None) -> None:
    """Print the JSON Schema of a data file (NAME: connections, settings, ...)."""
    from ctsd import schema as schemas

    if name is None:
        click.echo("\n".join(schemas.schema_names()))
        return
    try:
        out = schemas.schema(name)
    except KeyError:
        raise click.UsageError(
            f"no schema {name!r}; one of: {', '.join(schemas.schema_names())}"
        ) from None
    click.echo(msgspec.json.format(msgspec.json.encode(out), indent=2).decode())


# Client commands (status, conn, watch, export, import, reset) live in ctsd.client.
register_client(main)


# Errors of a write to a file that is no longer there to take it: the output (stdout).
_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def run() -> None:
    """The `ctsd` script: `main`, with a write to stdout that fails (a full disk, an I/O
    error: `ctsd export > /mnt/full/backup.json`) one line and exit 1, not a traceback. click
    itself handles only a closed pipe."""
    code: int | str | None = 0
    try:
        try:
            main()
        except SystemExit as e:
            code = e.code
        if sys.stdout is not None:  # (None: started with stdout closed)
            sys.stdout.flush()  # what is still buffered fails here, not at exit
    except OSError as e:
        if e.errno in _WRITE_ERRORS and not e.filename:
            click.echo(f"ctsd: cannot write the output: {e.strerror}", err=True)
        else:  # (each command names its own paths: one that escaped is shown as it is)
            where = f"{safe(str(e.filename))}: " if e.filename else ""
            click.echo(f"ctsd: {where}{e.strerror or e}", err=True)
        code = 1
    if sys.stdout is not None:
        # Bytes that could not be written are not flushed again at exit.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)
