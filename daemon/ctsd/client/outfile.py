"""Where a command's output file goes (`-o`): a regular file is written atomically (a temp
file renamed over it); a FIFO or a character device (/dev/null, /dev/stdout, a pipe) is
written through, never replaced; anything else is refused, never replaced."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ctsd.client.errors import fail
from ctsd.client.render import safe


def streamed(path: Path) -> bool:
    """True for a FIFO or a character device (open it and write); False for a regular file
    or a name not taken (write a temp file and rename it). Fails (exit 1) for a directory, a
    link to a file, a block device or a socket: a rename would put a file in its place."""
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        fail(f"cannot write {safe(path)}: {e.strerror or e}")
    if stat.S_ISREG(link.st_mode):
        return False
    try:
        st = os.stat(path)  # (/dev/stdout is a link to one)
    except OSError as e:
        fail(f"cannot write {safe(path)}: {e.strerror or e}")
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return True
    if stat.S_ISLNK(link.st_mode):
        what = "a link to a file" if stat.S_ISREG(st.st_mode) else "a link"
    else:
        what = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
    fail(f"{safe(path)} is {what}: give a regular file, -, a pipe or a device")


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}
