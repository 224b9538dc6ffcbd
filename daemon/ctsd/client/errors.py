"""Exit codes and the errors that end a client command with one line on stderr."""

from __future__ import annotations

from typing import Any, NoReturn

import click

from ctsd.client.render import safe

# Exit codes. Scripts rely on them: append, never renumber.
EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2  # click's own code for usage errors
EXIT_NO_DAEMON = 3
EXIT_AUTH = 4
EXIT_NOT_FOUND = 5
EXIT_CONFLICT = 6
EXIT_RATE_LIMITED = 7
EXIT_COMPACTED = 8
EXIT_TEST_FAILED = 9
EXIT_UNAVAILABLE = 10  # cluster mode: the cluster cannot take changes now; retry later
EXIT_DEGRADED = 11  # `status`: /health says degraded for another reason (the disk, the dir)

ERROR_EXIT: dict[str, int] = {
    "unauthorized": EXIT_AUTH,
    "not_found": EXIT_NOT_FOUND,
    "conflict": EXIT_CONFLICT,
    "file_invalid": EXIT_CONFLICT,
    "rate_limited": EXIT_RATE_LIMITED,
    "revision_compacted": EXIT_COMPACTED,
    "unavailable": EXIT_UNAVAILABLE,
}

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  the daemon refused the command (invalid, io_error, internal, ...)
  2  bad usage or arguments (nothing was sent)
  3  no daemon answering, or the connection was lost
  4  not authorized: no token, or a wrong one
  5  not found
  6  conflict, or a data file is invalid on disk (file_invalid)
  7  rate limited
  8  revision compacted (watch --since too old)
  9  a connection test ran and failed
  10 unavailable: in cluster mode the cluster cannot take changes now"""


class CliError(click.ClickException):
    """A failure to report as one line on stderr and an exit code (click shows it)."""

    def __init__(self, message: str, exit_code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        # Line by line: a message may list several problems, one per line.
        click.echo("ctsd: " + "\n".join(safe(line) for line in self.message.split("\n")), err=True)


class BusError(CliError):
    """The daemon answered a command with `success: false`."""

    def __init__(self, error: dict[str, Any]) -> None:
        self.error = error
        self.code = str(error.get("code", "internal"))
        message = str(error.get("message", "")) or self.code
        path = error.get("path")
        text = f"{self.code}: {message}"
        if path and f"`{path}`" not in message:
            text += f" (at {path})"
        super().__init__(text, ERROR_EXIT.get(self.code, EXIT_REFUSED))


class FellBehind(CliError):
    """Closed with 4008: a subscriber too slow for the daemon's queue; it may resume."""


def fail(message: str, exit_code: int = EXIT_REFUSED) -> NoReturn:
    raise CliError(message, exit_code)
