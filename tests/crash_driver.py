"""Run one offline operation in this process, to be killed with SIGKILL part-way (crash tests).

    python -m tests.crash_driver rekey DATA NEW_KEY_FILE KILL_AT
    python -m tests.crash_driver restore DATA ARCHIVE KILL_AT

The current key comes from the environment, as for the CLI. KILL_AT > 0: the process sends
itself SIGKILL just before its KILL_AT-th step — every write, fsync, rename, link, unlink,
mkdir and directory swap counts — so a test can crash it at each step in turn. KILL_AT = 0:
it prints `ready`, waits for a line on stdin, runs, and prints `steps N` (the test kills it
at a random moment, or counts the steps).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from ctsd import atomic, backup, rekey
from ctsd.secretbox import configured_key, load_key_file

STEPPED = ("write", "writev", "fsync", "replace", "rename", "link", "unlink", "mkdir", "rmdir")


def main() -> None:
    op, data_dir, arg, kill_at_text = sys.argv[1:5]
    kill_at = int(kill_at_text)
    steps = 0

    def stepped(real: Any) -> Any:
        def call(*args: Any, **kw: Any) -> Any:
            nonlocal steps
            steps += 1
            if steps == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kw)

        return call

    if kill_at == 0:
        print("ready", flush=True)
        sys.stdin.readline()
    for name in STEPPED:
        setattr(os, name, stepped(getattr(os, name)))
    atomic._exchange = stepped(atomic._exchange)  # type: ignore[attr-defined]
    if op == "rekey":
        rekey.rekey_offline(Path(data_dir), configured_key(), load_key_file(Path(arg)))
    elif op == "restore":
        backup.restore_offline(Path(data_dir), Path(arg), None)
    else:
        raise SystemExit(f"unknown operation {op}")
    # Plain write: os.write is stepped, and this must not count.
    sys.stdout.write(f"steps {steps}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
