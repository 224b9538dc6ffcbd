"""`/health`: data dir writable and private, free space, every file valid, changes
reaching the files."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Any

from ctsd import __version__
from ctsd.safefile import dir_problems

if TYPE_CHECKING:
    from ctsd.services import Services

MIN_FREE_BYTES = 64 * 1024 * 1024
# Acknowledged changes reach the files within milliseconds; one waiting this long (for a file
# that is not invalid) means the disk refuses writes.
MAX_CHECKPOINT_LAG_S = 5.0


def health(svc: Services) -> dict[str, Any]:
    store = svc.store
    writable = os.access(svc.data_dir, os.W_OK | os.X_OK)
    try:
        free = shutil.disk_usage(svc.data_dir).free
    except OSError:
        free = 0
    files = {
        "ok": not store.problems,
        "invalid": {f: p.format() for f, p in sorted(store.problems.items())},
    }
    journal = store.status()
    waiting = [f for f in journal["unwritten_files"] if f not in store.problems]
    journal["ok"] = journal["journal_error"] is None and (
        not waiting or journal["checkpoint_lag_s"] < MAX_CHECKPOINT_LAG_S
    )
    # The dir's mode and its directories (a link, a file where algorithms/ should be):
    # writes into a broken one fail, and a wide mode shows file names to other users.
    layout = dir_problems(svc.data_dir)
    checks = {
        "data_dir_writable": {"ok": writable},
        "data_dir": {"ok": not layout, "problems": layout},
        "free_space": {"ok": free >= MIN_FREE_BYTES, "bytes": free},
        "files": files,
        "checkpoint": journal,
        "watch": svc.watch_status(),
        # Informational: plain text is a supported mode, not a failed check.
        "secrets": {"ok": True, **store.secrets_status()},
    }
    cluster = store.committer_status()  # cluster mode: the engine's state and this host's lag
    if cluster is not None:
        checks["cluster"] = cluster
    ok = all(c["ok"] for c in checks.values())
    return {
        "status": "ok" if ok else "degraded",
        "version": __version__,
        "revision": store.revision,
        "uptime_s": svc.uptime_s,
        "checks": checks,
    }
