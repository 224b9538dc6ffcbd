"""`ctsd serve`: start-up, readiness, signals and shutdown (CONTRACT §1).

The flow: data dir → lock → store (load and validate every file) → token → bus (bind) →
watcher and sweeps → READY. Components attach to the store's listeners; none of them writes
a file except through `Store.submit`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog

from ctsd import __version__, logs
from ctsd.atomic import ensure_dir
from ctsd.config import Listen, is_loopback, resolve_listen
from ctsd.errors import CtsdError
from ctsd.lock import InstanceLock
from ctsd.notify import Notifier
from ctsd.store import Store
from ctsd.tokenfile import load_token

log = structlog.get_logger("ctsd.app")
SHUTDOWN_GRACE_S = 4.0  # inside the contract's 5 s


class StartError(Exception):
    """Start failed: the daemon exits 1 with this one-line reason on stderr."""


@dataclass
class App:
    """What every component shares: the store, the listen address, the token."""

    data_dir: Path
    store: Store
    token: str
    listen: Listen
    notifier: Notifier
    started_at: float = field(default_factory=time.monotonic)
    components: dict[str, Any] = field(default_factory=dict)

    def status_line(self) -> str:
        s = self.store
        return (
            f"{len(s.connections)} connections, revision {s.revision}, "
            f"{len(s.problems)} invalid files"
        )


def _prepare(data_dir: Path, host: str | None, port: int | None) -> tuple[App, InstanceLock]:
    try:
        if data_dir.exists() and not data_dir.is_dir():
            raise StartError(f"data dir {data_dir} is not a directory")
        ensure_dir(data_dir)
        if not os.access(data_dir, os.W_OK | os.X_OK):
            raise StartError(f"data dir {data_dir} is not writable")
    except OSError as e:
        raise StartError(f"data dir {data_dir} unusable: {e.strerror}") from None
    lock = InstanceLock(data_dir)
    try:
        lock.acquire()
    except CtsdError as e:
        raise StartError(e.message) from None
    except OSError as e:
        raise StartError(f"cannot lock {lock.path}: {e.strerror}") from None
    try:
        store = Store(data_dir)
        store.open()
        logs.add_file(data_dir / "logs")
        listen = resolve_listen(host, port, store.settings)
        token = load_token(data_dir)
        assert token is not None
    except (OSError, CtsdError, ValueError) as e:
        lock.release()
        raise StartError(f"start failed: {getattr(e, 'message', None) or e}") from None
    return App(data_dir, store, token, listen, Notifier()), lock


async def _watchdog(app: App, interval: float) -> None:
    # Sent from the event loop itself: a blocked loop stops the pings and systemd notices.
    while True:
        app.notifier.send("WATCHDOG=1")
        await anyio.sleep(interval)


async def _serve(app: App) -> None:
    from ctsd import sweeps
    from ctsd.web.server import Web

    store = app.store
    store.start()
    web = Web(app)
    try:
        await web.start()
    except OSError as e:
        await store.close()
        raise StartError(
            f"cannot listen on {app.listen.host}:{app.listen.port}: {e.strerror or e}"
        ) from None
    app.components["web"] = web
    if not is_loopback(app.listen.host):
        log.warning(
            "non_loopback_bind",
            host=app.listen.host,
            message="the bus is reachable from other hosts; keep the token secret",
        )
    async with anyio.create_task_group() as tg:
        for name, runner in _components():
            tg.start_soon(runner, app, name=f"ctsd-{name}")
        interval = app.notifier.watchdog_interval()
        if interval:
            tg.start_soon(_watchdog, app, interval)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            log.info(
                "ready",
                version=__version__,
                host=app.listen.host,
                port=app.listen.port,
                data_dir=str(app.data_dir),
                revision=store.revision,
                invalid_files=sorted(store.problems),
            )
            app.notifier.send("READY=1", f"STATUS={app.status_line()}", f"MAINPID={os.getpid()}")
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await _reload(app)
                    continue
                log.info("stopping", signal=signal.Signals(signum).name)
                break
        app.notifier.send("STOPPING=1", "STATUS=stopping")
        with anyio.move_on_after(SHUTDOWN_GRACE_S, shield=True):
            await web.shutdown()  # stop accepting; close bus clients with 1001
            await sweeps.sweeper(app).flush()  # heartbeats not yet on disk
            await store.close()  # finish in-flight writes
        watcher = app.components.get("watch")
        if watcher is not None:
            watcher.stop()  # watchfiles' thread sees this within `step`; a cancel waits ~1 s
        tg.cancel_scope.cancel()
    log.info("stopped", revision=store.revision)


async def _reload(app: App) -> None:
    app.notifier.send(
        "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    )
    log.info("reloading")
    try:
        await app.store.reload_all()
    except Exception:  # a failed reload must not take the daemon (and the bus) down
        log.exception("reload_failed")
    app.notifier.send("READY=1", f"STATUS={app.status_line()}")
    log.info("reloaded", revision=app.store.revision, invalid_files=sorted(app.store.problems))


def _components() -> list[tuple[str, Any]]:
    """Long-running parts attached to the store: (name, async runner(app))."""
    from ctsd import sweeps, watch

    return [("watch", watch.run), ("sweeps", sweeps.run)]


def serve(data_dir: Path, host: str | None, port: int | None) -> int:
    os.umask(0o077)  # files we create (logs, temp files) are the owner's alone
    # atomic.written_elsewhere probes with a read lease for an instant; a lease break sends
    # SIGIO, whose default action would kill the daemon.
    signal.signal(signal.SIGIO, signal.SIG_IGN)
    try:
        app, lock = _prepare(data_dir, host, port)
    except StartError as e:
        print(f"ctsd: {e}", file=sys.stderr)
        return 1
    try:
        anyio.run(_serve, app)
    except StartError as e:
        print(f"ctsd: {e}", file=sys.stderr)
        return 1
    finally:
        app.notifier.close()
        lock.release()
    return 0
