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

INTERRUPTED = "ctsd: interrupted while starting"


def run() -> None:
    serving = [a for a in sys.argv[1:] if not a.startswith("-")][:1] == ["serve"]
    if serving:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        for ignored in (signal.SIGIO, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
            signal.signal(ignored, signal.SIG_IGN)  # (SIGHUP last: a test waits for it)
    try:
        from ctsd import cli

        if serving:
            from ctsd import app, logs  # noqa: F401  (`serve` imports them: here, interruptible)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(0)
    cli.run()
