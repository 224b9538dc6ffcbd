"""What the bus and the HTTP API work with: the parts of a running daemon, built by the app.

Nothing below the app imports the app; each part gets this (or the pieces of it it needs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctsd.config import Listen
from ctsd.probes import Prober
from ctsd.store import Store
from ctsd.sweeps import Sweeper


@dataclass
class Services:
    store: Store
    sweeper: Sweeper
    prober: Prober
    token: str
    listen: Listen
    data_dir: Path
    started_at: float = field(default_factory=time.monotonic)
    # The server's own numbers (clients, subscribers, errors) and its metrics, once it runs.
    server_stats: Callable[[], dict[str, Any]] = dict
    render_metrics: Callable[[], bytes] = bytes
    # The watcher's `/health` check (`Watcher.status`), once it runs.
    watch_status: Callable[[], dict[str, Any]] = lambda: {"ok": True, "mode": "inotify"}

    @property
    def uptime_s(self) -> float:
        return round(time.monotonic() - self.started_at, 3)
