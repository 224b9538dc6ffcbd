"""Run one offline operation in this process, to be killed with SIGKILL part-way (crash tests).

    python -m tests.crash_driver rekey DATA NEW_KEY_FILE KILL_AT
    python -m tests.crash_driver restore DATA ARCHIVE KILL_AT

The current key comes from the environment, as for the CLI. KILL_AT > 0: the process sends
itself SIGKILL just before its KILL_AT-th step — every write, fsync, rename, link, unlink,
mkdir and directory swap counts — so a test can crash it at each step in turn. KILL_AT = 0:
it prints `ready`, waits for a line on stdin, runs, and prints `steps N` (the test kills it
at a random moment, or counts the steps).

`kill_at_every_step` and `kill_at_random` are the two ways the tests use it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
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


KILL_CYCLES = int(os.environ.get("CTSD_KILL_CYCLES", "50"))
ROOT = Path(__file__).parent.parent


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.crash_driver", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, cwd=ROOT, start_new_session=True,
    )  # fmt: skip


def kill_at_every_step(
    prepare: Callable[[], list[str]], env: dict[str, str], check: Callable[[], str]
) -> list[str]:
    """Count the steps of one whole run, then run it again killed before each step in turn;
    `prepare` makes a fresh copy and returns the driver's arguments (KILL_AT appended here),
    `check` asserts the promise and returns the outcome ("old"/"new")."""
    p = spawn([*prepare(), "0"], env)
    out, err = p.communicate("go\n", timeout=60)
    assert p.returncode == 0, err
    total = int(out.split("steps ")[1])
    outcomes = []
    for kill_at in range(1, total + 1):
        p = spawn([*prepare(), str(kill_at)], env)
        _, err = p.communicate(timeout=60)
        assert p.returncode == -signal.SIGKILL, (kill_at, err)
        outcomes.append(check())
    # Early kills leave the old content, late ones the new, with one switch-over point.
    assert outcomes[0] == "old" and outcomes[-1] == "new", outcomes
    assert outcomes == sorted(outcomes, key=lambda o: o == "new"), outcomes
    return outcomes


def kill_at_random(
    prepare: Callable[[], list[str]], env: dict[str, str], check: Callable[[], str], seed: int
) -> dict[str, int]:
    """Time one whole run, then KILL_CYCLES runs killed at a uniformly random moment of it
    (imports done: the clock starts when the driver is told to go)."""

    def start() -> subprocess.Popen[str]:
        p = spawn([*prepare(), "0"], env)
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        return p

    p = start()
    t0 = time.monotonic()
    p.communicate("go\n", timeout=60)
    duration = time.monotonic() - t0
    assert p.returncode == 0
    rng = random.Random(int(os.environ.get("CTSD_KILL_SEED", str(seed))))
    outcomes = {"old": 0, "new": 0}
    for _ in range(KILL_CYCLES):
        p = start()
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
        time.sleep(rng.uniform(0, duration * 1.1))
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        outcomes[check()] += 1
    # Both outcomes occur, or the kill window missed the writes entirely.
    assert outcomes["old"] and outcomes["new"], outcomes
    return outcomes


if __name__ == "__main__":
    main()
