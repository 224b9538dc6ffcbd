"""The `ctsd` command's entry point, kept light: `serve` handles its signals from the start.

Importing the daemon takes about half a second. Until `app.serve` installs its handlers, a
SIGHUP (a logrotate script as the daemon boots) or a SIGTERM (`systemctl stop`) ended the
process by their default action, which systemd counts as a clean exit (`Restart=on-failure`
then leaves the service down), and a Ctrl-C printed a traceback. So they are set here,
before anything heavy is imported, as `app.serve` sets them until READY.
"""

from __future__ import annotations

import signal
import sys
from typing import NoReturn

INTERRUPTED = "ctsd: interrupted while starting"


class Interrupted(BaseException):
    """A SIGTERM or Ctrl-C before `app.serve` took the signals over. Not a KeyboardInterrupt:
    click, reading the command line meanwhile, takes that for a Ctrl-C at a prompt
    ("Aborted!", exit 1: a failure to systemd)."""


def _interrupt(_signum: int, _frame: object) -> None:
    raise Interrupted


def run() -> None:
    serving = [a for a in sys.argv[1:] if not a.startswith("-")][:1] == ["serve"]
    if serving:
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)
        for ignored in (signal.SIGIO, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
            signal.signal(ignored, signal.SIG_IGN)  # (SIGHUP last: a test waits for it)
    try:
        from ctsd import cli

        if serving:
            from ctsd import app, logs  # noqa: F401  (`serve` imports them: here, interruptible)
    except (KeyboardInterrupt, Interrupted):
        _stopped()
    try:
        cli.run()
    except Interrupted:
        _stopped()


def _stopped() -> NoReturn:
    print(INTERRUPTED, file=sys.stderr)
    sys.exit(0)
