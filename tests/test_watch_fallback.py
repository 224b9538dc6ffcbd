"""inotify out of reach (this user's inotify instances all taken, as on a host running many
watchers): the daemon still starts, takes hand edits in by polling, says why on `/health` and
in its log, and goes back to inotify once it can (here: on the next settings change)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from ctsd import watch
from tests.daemon import Daemon, log_lines, sync_log, wait_until
from tests.datadir import atomic_save
from tests.handedits import CONNS, edit_name, seed
from tests.inprocess import open_app

_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def inotify_exhausted() -> Iterator[int]:
    """Every inotify instance this user may have, held (the kernel's per-user limit), by this
    process: the suite runs serially, and other processes of the user go without meanwhile."""
    limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = limit + 256  # EMFILE must come from the inotify limit, not from our open files
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below max_user_instances {limit}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
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
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def watch_check(d: Daemon) -> dict:
    status, body = d.http("/health", token=None)
    assert status in (200, 503), (status, body)
    return body


@pytest.mark.serial  # every inotify instance of this user: any other daemon would poll
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
            assert "inotify instances or watches are used up" in watch["problem"]
            assert "polling every 300 ms instead" in watch["problem"]
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
        assert body["checks"]["watch"] == {"ok": True, "mode": "inotify", "step_ms": 1}
        assert body["status"] == "ok", body
        before = len(sync_log(d))
        atomic_save(path, edit_name(path.read_bytes(), "conn_0004", "Seen by inotify"))
        wait_until(lambda: len(sync_log(d)) > before, 10)
    finally:
        d.close()


class _FailingNotify:
    """watchfiles' RustNotify whose watch breaks after it was set up (its inotify queue
    overflowed, a watched directory vanished): what the watcher must survive."""

    made = 0

    def __init__(self, *_args: object) -> None:
        type(self).made += 1

    def watch(self, *_args: object) -> object:
        raise RuntimeError("error in underlying watcher: boom")

    def close(self) -> None:
        pass


@pytest.mark.anyio
async def test_a_watch_that_breaks_while_running_polls_until_the_retry(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch, "RustNotify", _FailingNotify)
    app = await open_app(data_dir, [{"id": "a", "name": "A", "exchange": "bybit"}])
    watcher = watch.Watcher(app.store)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher.run)
            with anyio.fail_after(10):
                while watcher.problem is None:
                    await anyio.sleep(0.01)
            assert "boom" in watcher.problem and "polling every 300 ms" in watcher.problem
            assert watcher.status()["mode"] == "polling"
            # Polling now, until the retry a minute on: not a loop of new watches.
            await anyio.sleep(0.5)
            assert _FailingNotify.made == 1
            # A hand edit is still taken in.
            conns = json.loads((data_dir / CONNS).read_text())
            conns[0]["name"] = "Polled"
            atomic_save(data_dir / CONNS, json.dumps(conns, indent=2).encode() + b"\n")
            with anyio.fail_after(10):
                while app.store.committed.connections["a"].name != "Polled":
                    await anyio.sleep(0.01)
            watcher.stop()
            tg.cancel_scope.cancel()  # as the app does after stop()
    finally:
        await app.store.close()


@pytest.mark.anyio
async def test_a_name_that_is_not_utf8_does_not_stop_inotify(data_dir: Path) -> None:
    """watchfiles fails for good on a path it cannot make a string of (an editor's debris
    with a Latin-1 name, say): the watch is made again at once, not replaced by a minute of
    polling (`/health` degraded); a hand edit saved right after it is taken in."""
    app = await open_app(data_dir, [{"id": "a", "name": "A", "exchange": "bybit"}])
    watcher = watch.Watcher(app.store)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher.run)
            # The watch is live once a hand edit is taken in through it.
            conns = json.loads((data_dir / CONNS).read_text())
            conns[0]["name"] = "Before"
            atomic_save(data_dir / CONNS, json.dumps(conns, indent=2).encode() + b"\n")
            with anyio.fail_after(10):
                while app.store.committed.connections["a"].name != "Before":
                    await anyio.sleep(0.01)
            fd = os.open(bytes(data_dir) + b"/\xff.swp", os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
            with anyio.fail_after(10):
                while not watcher._undecodable:  # the watch failed on the name ...
                    await anyio.sleep(0.01)
            conns = json.loads((data_dir / CONNS).read_text())
            conns[0]["name"] = "Seen"
            atomic_save(data_dir / CONNS, json.dumps(conns, indent=2).encode() + b"\n")
            with anyio.fail_after(10):
                while app.store.committed.connections["a"].name != "Seen":
                    await anyio.sleep(0.01)
            # ... and went on with inotify
            assert watcher.problem is None and watcher.status()["mode"] == "inotify"
            watcher.stop()
            tg.cancel_scope.cancel()
    finally:
        await app.store.close()
