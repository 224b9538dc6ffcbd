"""`/health`: data dir writable and private, free space, every file valid."""

from __future__ import annotations

import os
import shutil
import time
from typing import TYPE_CHECKING, Any

from ctsd import __version__
from ctsd.safefile import dir_problems

if TYPE_CHECKING:
    from ctsd.app import App

MIN_FREE_BYTES = 64 * 1024 * 1024


def health(app: App) -> dict[str, Any]:
    store = app.store
    writable = os.access(app.data_dir, os.W_OK | os.X_OK)
    try:
        free = shutil.disk_usage(app.data_dir).free
    except OSError:
        free = 0
    files = {
        "ok": not store.problems,
        "invalid": {f: p.format() for f, p in sorted(store.problems.items())},
    }
    # The dir's mode and its directories (a link, a file where algorithms/ should be):
    # writes into a broken one fail, and a wide mode shows file names to other users.
    layout = dir_problems(app.data_dir)
    checks = {
        "data_dir_writable": {"ok": writable},
        "data_dir": {"ok": not layout, "problems": layout},
        "free_space": {"ok": free >= MIN_FREE_BYTES, "bytes": free},
        "files": files,
    }
    ok = all(c["ok"] for c in checks.values())
    return {
        "status": "ok" if ok else "degraded",
        "version": __version__,
        "revision": store.revision,
        "uptime_s": round(time.monotonic() - app.started_at, 3),
        "checks": checks,
    }
