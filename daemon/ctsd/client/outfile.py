"""Where a command's output file goes (`-o`):

- a regular file, or a name not taken: written atomically (a temp file renamed over it);
- a link to a regular file (an operator's `latest.json`): its file, written atomically
  beside it, the link kept;
- `/dev/stdout` (and `/dev/fd/1`): stdout, as `-` (with `>> FILE` it appends);
- a FIFO or a character device (a pipe, /dev/null): written through, never replaced;
- anything else (a directory, a socket, a block device, a link to nothing): refused, never
  replaced;
- anything in the data dir (also through a link): refused, so an archive or an export can
  never replace a data file, the journal or the token."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal

from ctsd.client.errors import fail
from ctsd.client.render import safe
from ctsd.safefile import resolved

Kind = Literal["stdout", "stream", "file"]

STDOUT_NAMES = frozenset({"-", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"})


def destination(output: str, data_dir: Path) -> tuple[Kind, Path]:
    """How to write `output`, and the path to write (for "file": the file a link names).
    Fails (exit 1) for what no output may replace."""
    if not output:  # (Path("") is the current directory: "is a directory" misled)
        fail("the output path is empty: give a file name, or - for stdout")
    path = Path(output)
    if output in STDOUT_NAMES:
        return "stdout", path
    try:
        target = resolved(path)
        inside = target.is_relative_to(resolved(data_dir))
        # (The daemon reached by --port and a token may keep another data dir than the one
        # this command names: any dir a daemon has marked as its own is refused too.)
        other = next((d for d in target.parents if _is_data_dir(d)), None)
    except OSError as e:
        fail(f"cannot write {safe(output)}: {e.strerror or e} ({safe(e.filename or '')})")
    if inside or other is not None:
        fail(
            f"{safe(output)} is in the data dir {safe(data_dir if inside else other)}: write "
            "it elsewhere (it could replace the daemon's own files)"
        )
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        return "file", path
    except OSError as e:
        fail(f"cannot write {safe(output)}: {e.strerror or e}")
    if stat.S_ISREG(link.st_mode):
        return "file", path
    try:
        st = os.stat(path)
    except OSError as e:
        fail(f"cannot write {safe(output)}: {e.strerror or e}")
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return "stream", path
    if stat.S_ISREG(st.st_mode):  # a link to a file: that file (the link stays)
        return "file", resolved(path)
    what = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
    fail(f"{safe(output)} is {what}: give a regular file, -, a pipe or a device")


def _is_data_dir(d: Path) -> bool:
    """Does `d` look like a ctsd data dir: its instance lock beside its connections?"""
    return (d / ".lock").is_file() and (d / "connections.json").exists()


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}
