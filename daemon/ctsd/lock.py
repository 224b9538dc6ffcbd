"""The single-instance lock: `flock` on DATA/.lock, holding our pid for the error message,
and once bound the address the daemon listens on (`pid\nHOST PORT\n`): the CLI reaches the
running daemon there, whatever settings.json says now (its server.host and port take effect
only at the next start)."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
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
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # (a FIFO planted at the name)
                raise OSError(errno.EINVAL, "not a regular file: remove it", str(self.path))
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if not isinstance(e, BlockingIOError):
                os.close(fd)
                raise
            head = os.read(fd, 32).decode(errors="replace").split("\n", 1)[0]
            holder = head.strip() or "unknown"
            os.close(fd)
            raise CtsdError(
                "conflict", f"another ctsd (pid {holder}) holds {self.path}; stop it first"
            ) from None
        # Only the holder truncates: a loser must not wipe the holder's pid.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def note_listen(self, host: str, port: int) -> None:
        if self._fd is not None:
            data = f"{os.getpid()}\n{host} {port}\n".encode()
            os.pwrite(self._fd, data, 0)
            os.ftruncate(self._fd, len(data))

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def running_listen(data_dir: Path) -> tuple[str, int] | None:
    """(host, port) the daemon holding DATA/.lock listens on, or None: no lock file, no
    address in it yet, or its pid is not running (a daemon killed left it behind). Read
    without taking the lock (a probe could make a starting daemon fail) and without waiting
    (O_NONBLOCK: a FIFO planted at the name)."""
    try:
        fd = os.open(data_dir / ".lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        lines = os.read(fd, 512).decode(errors="replace").split("\n")
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        pid = int(lines[0])
        host, port = lines[1].rsplit(" ", 1)
        address = (host, int(port))
        if pid <= 0:  # (kill(0) would ask about this very process group)
            return None
        os.kill(pid, 0)
    except PermissionError:
        return address  # running, as another user
    except (ValueError, IndexError, OSError, OverflowError):
        return None
    return address
