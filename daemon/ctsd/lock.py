"""The single-instance lock: `flock` on DATA/.lock, holding our pid for the error message."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ctsd.errors import CtsdError


class InstanceLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        # Never through a link planted at the name (ELOOP: start fails, naming the path).
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CtsdError(
                "conflict", f"another ctsd (pid {holder}) holds {self.path}; stop it first"
            ) from None
        # Only the holder truncates: a loser must not wipe the holder's pid.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
