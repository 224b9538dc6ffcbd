"""inotify out of reach (this user's inotify instances all taken, as on a host running many
watchers): the daemon still starts, takes hand edits in by polling, says why on `/health` and
in its log, and goes back to inotify once it can (here: on the next settings change)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.daemon import Daemon, log_lines, sync_log, wait_until
from tests.datadir import atomic_save
from tests.handedits import CONNS, edit_name, seed

_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def inotify_exhausted() -> Iterator[int]:
    """Every inotify instance this user may have, held (the kernel's per-user limit)."""
    fds: list[int] = []
    try:
        while len(fds) < 100_000:
            fd = _libc.inotify_init1(os.O_CLOEXEC)
            if fd < 0:
                assert ctypes.get_errno() == errno.EMFILE, os.strerror(ctypes.get_errno())
                break
            fds.append(fd)
        yield len(fds)
    finally:
        for fd in fds:
            os.close(fd)


def watch_check(d: Daemon) -> dict:
    status, body = d.http("/health", token=None)
    assert status in (200, 503), (status, body)
    return body


def test_no_inotify_means_polling_then_inotify_again(data_dir: Path) -> None:
    seed(data_dir, 10)
    path = data_dir / CONNS
    with inotify_exhausted() as held:
        assert held > 0
        d = Daemon(data_dir).start()
        try:
            wait_until(lambda: log_lines(d, "watch_failed"), 10)
            body = watch_check(d)
            assert body["status"] == "degraded"
            watch = body["checks"]["watch"]
            assert watch["ok"] is False and watch["mode"] == "polling"
            assert "inotify" in watch["problem"] and "polling every 300 ms" in watch["problem"]
            # Hand edits still come in, by polling.
            atomic_save(path, edit_name(path.read_bytes(), "conn_0003", "Seen by polling"))
            wait_until(lambda: any(e["data"].get("source") == "file" for e in sync_log(d)), 10)
        except BaseException:
            d.close()
            raise
    try:
        # inotify is free again: the next settings change (here the poll interval) restarts
        # the watch, which takes inotify back.
        settings = json.loads((data_dir / "settings.json").read_text())
        settings.setdefault("watch", {})["poll_interval_ms"] = 250
        atomic_save(data_dir / "settings.json", json.dumps(settings, indent=2).encode() + b"\n")
        wait_until(lambda: log_lines(d, "watch_restored"), 10)
        body = watch_check(d)
        assert body["checks"]["watch"] == {"ok": True, "mode": "inotify"}
        assert body["status"] == "ok", body
        before = len(sync_log(d))
        atomic_save(path, edit_name(path.read_bytes(), "conn_0004", "Seen by inotify"))
        wait_until(lambda: len(sync_log(d)) > before, 10)
    finally:
        d.close()
