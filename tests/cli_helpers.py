"""Running the real `ctsd` console script as a subprocess, as a user or a script would."""

from __future__ import annotations

import contextlib
import os
import queue
import select
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, wait_until
from tests.datadir import CANARY

CTSD = Path(sys.executable).with_name("ctsd")
__all__ = ["CANARY", "CTSD", "Tail", "clean_env", "closed", "ctsd", "env_for", "without_dac"]


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that would point the CLI elsewhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CTSD_", "NOTIFY_", "WATCHDOG_", "CREDENTIALS_"))
        and k not in ("DATA_DIR", "DATA_PATH")
        and not k.lower().endswith("_proxy")
    }
    env.update(extra)
    return env


def ctsd(
    *args: str,
    env: dict[str, str] | None = None,
    input: str | None = None,
    timeout: float = 60.0,
    cwd: Path | None = None,
    prefix: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, str(CTSD), *args],
        env=env if env is not None else clean_env(),
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        # No controlling terminal: a prompt reads stdin, as in a pipeline.
        start_new_session=True,
    )


def without_dac() -> tuple[str, ...]:
    """The prefix that runs a command as this user but without reading or entering every
    directory: root (CI's user) does that by CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, which
    setpriv drops, so a test of a directory closed to the user is a real test under root."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root without setpriv: directory permissions are not enforced")
    caps = "-dac_override,-dac_read_search"
    return (setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", "--")


@contextlib.contextmanager
def closed(path: Path, mode: int = 0o000) -> Iterator[Path]:
    """`path` with `mode` for the block (run the command through `without_dac()`)."""
    before = stat.S_IMODE(path.stat().st_mode)
    path.chmod(mode)
    try:
        yield path
    finally:
        path.chmod(before)


def env_for(d: Daemon, **extra: str) -> dict[str, str]:
    return clean_env(**{"CTSD_TOKEN": d.token or "", "CTSD_PORT": str(d.port), **extra})


class Tail:
    """`ctsd watch` as a subprocess; its stdout lines collected by a thread."""

    def __init__(self, d: Daemon, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(CTSD), "watch", *args],
            env=env_for(d),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.got: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def take(self, n: int, timeout: float = 15.0) -> list[str]:
        def enough() -> bool:
            while True:
                try:
                    self.got.append(self.lines.get_nowait())
                except queue.Empty:
                    break
            if self.proc.poll() is not None and len(self.got) < n and self.lines.empty():
                stderr = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"watch exited {self.proc.returncode}: {stderr}")
            return len(self.got) >= n

        wait_until(enough, timeout, interval=0.02, what=f"{n} lines from ctsd watch")
        out, self.got = self.got[:n], self.got[n:]
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# The canary and its tail: no output of the CLI may carry either.
SECRET_BITS = (CANARY, "7f3a9c")


def cli(
    d: Daemon, *args: str, input: str | None = None, **extra: str
) -> subprocess.CompletedProcess[str]:
    r = ctsd(*args, env=env_for(d, **extra), input=input)
    # Whatever the command, no output of the CLI ever carries the canary secret.
    for bit in SECRET_BITS:
        assert bit not in r.stdout and bit not in r.stderr, (args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def through_fifo(fifo: Path, run: Callable[[], Any]) -> bytes:
    """What `run` (a command given `fifo` as its output) writes into the pipe, read while it
    runs (a pipe holds 64 KiB: a larger output waits for its reader). The read end is open
    first, so the command's open does not wait; if it never opens the pipe, nothing is read,
    never a hang."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    out = bytearray()
    done = threading.Event()

    def drain() -> None:
        while True:
            finished = done.is_set()  # (read once more after it: nothing is left behind)
            select.select([fd], [], [], 0.05)
            try:
                while chunk := os.read(fd, 1 << 16):
                    out.extend(chunk)
            except BlockingIOError:
                pass
            if finished:
                return
            time.sleep(0.005)  # (no writer yet: a FIFO then reads as at its end at once)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        run()
    finally:
        done.set()
        reader.join(30)
        os.close(fd)
    return bytes(out)
