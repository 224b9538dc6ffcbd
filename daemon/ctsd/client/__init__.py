"""The client commands: `status`, `conn …`, `watch`, `export`, `import`, `reset`, and the
data-dir commands `secrets …`, `backup`, `restore`, `migrate`.

Each command that talks to the daemon opens one bus connection (`ws://HOST:PORT/ws`)
(a data-dir command working offline opens none), sends its commands
with `"source": "cli"` so the sync log says the change came from the CLI, prints the reply and
exits with a code from `EXIT_CODES_HELP`. Secrets: the daemon masks every record it returns; the
only secrets the client ever holds are the ones read for `conn add`/`conn set` (environment
or a prompt without echo, never argv: argv is visible in `ps`), and they are only ever sent,
never printed.

Modules: `target` (where the daemon is, the token), `errors` (exit codes), `bus` (the
connection), `render` (escaping, tables, event lines), `options` (shared options), `fields`
(FIELD=VALUE and secrets), and one module per command group: `status`, `conn`, `watch`,
`data` (export, import, reset), `secrets` (the key for secrets at rest), `archive` (backup,
restore: offline, under the data dir's lock) and `migrate` (from a database, into the
running daemon).
"""

from __future__ import annotations

import click

from ctsd.client import archive, conn, data, migrate, secrets, status, watch
from ctsd.client.bus import Bus, open_bus, run, run_main
from ctsd.client.errors import (
    EXIT_AUTH,
    EXIT_CODES_HELP,
    EXIT_COMPACTED,
    EXIT_CONFLICT,
    EXIT_NO_DAEMON,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_RATE_LIMITED,
    EXIT_REFUSED,
    EXIT_TEST_FAILED,
    EXIT_USAGE,
    BusError,
    CliError,
    FellBehind,
)
from ctsd.client.target import SYSTEM_TOKEN, Target, read_token, resolve_target

__all__ = [
    "EXIT_AUTH",
    "EXIT_CODES_HELP",
    "EXIT_COMPACTED",
    "EXIT_CONFLICT",
    "EXIT_NOT_FOUND",
    "EXIT_NO_DAEMON",
    "EXIT_OK",
    "EXIT_RATE_LIMITED",
    "EXIT_REFUSED",
    "EXIT_TEST_FAILED",
    "EXIT_USAGE",
    "SYSTEM_TOKEN",
    "Bus",
    "BusError",
    "CliError",
    "FellBehind",
    "Target",
    "open_bus",
    "read_token",
    "register",
    "resolve_target",
    "run",
    "run_main",
]


def register(main: click.Group) -> None:
    """Add the client commands to the `ctsd` group."""
    status.register(main)
    conn.register(main)
    watch.register(main)
    data.register(main)
    secrets.register(main)
    archive.register(main)
    migrate.register(main)
    main.epilog = EXIT_CODES_HELP
