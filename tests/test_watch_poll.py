"""Polling mode (network filesystems) and switching the watch mode live."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ctsd import watch
from tests.daemon import Daemon, events_after, log_lines, revision, wait_until
from tests.datadir import atomic_save, dump
from tests.handedits import CONNS, SETTINGS, assert_one_name_update, edit_name, seed


def _polling(on: bool, interval_ms: int = 50) -> dict[str, Any]:
    return {**SETTINGS, "watch": {"polling": on, "poll_interval_ms": interval_ms}}


def test_polling_takes_in_edits_spaced_like_a_human(data_dir: Path) -> None:
    """watchfiles' poller missed most edits 125-160 ms apart; ours must not."""
    seed(data_dir, 10, _polling(True, 100))
    d = Daemon(data_dir).start()
    try:
        wait_until(lambda: log_lines(d, "watching"), 5, what="watching")
        assert log_lines(d, "watching")[-1]["polling"] is True
        path, rev = data_dir / CONNS, revision(d)
        pause = threading.Event()
        for i in range(10):
            atomic_save(path, edit_name(path.read_bytes(), f"conn_{i:04d}", f"Polled {i}"))
            pause.wait(0.13)  # the operator's rhythm (part of the scenario)
        wait_until(lambda: len(events_after(d, rev)) >= 10, 5, what="ten polled edits")
        evs = events_after(d, rev)
        assert [(e["connection_id"], e["data"]["values"]["name"]) for e in evs] == [
            (f"conn_{i:04d}", f"Polled {i}") for i in range(10)
        ]
    finally:
        d.close()


def test_polling_sees_an_edit_that_keeps_size_and_mtime(data_dir: Path) -> None:
    """Same size, same inode, mtime put back (cp -p, rsync -t, tar): not a missed edit."""
    seed(data_dir, 10, _polling(True, 50))
    d = Daemon(data_dir).start()
    try:
        path, rev = data_dir / CONNS, revision(d)
        st = path.stat()
        body = path.read_bytes().replace(b'"Connection 4"', b'"Connection X"', 1)
        assert len(body) == st.st_size
        with open(path, "r+b") as fh:
            fh.write(body)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
        assert_one_name_update(d, rev, "conn_0004", "Connection X")
    finally:
        d.close()


class _FakeStat:
    def __init__(self, st: os.stat_result) -> None:
        self.st_size, self.st_mtime_ns, self.st_ino = st.st_size, st.st_mtime_ns, st.st_ino
        self.st_ctime_ns = st.st_ctime_ns


def test_poller_hashes_when_stat_cannot_tell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem whose timestamps are too coarse to show a second edit: the hash does."""
    path = tmp_path / CONNS
    path.write_bytes(b"[1]\n")
    frozen = _FakeStat(path.stat())  # every stat answers the same, as within one tick
    real_stat = os.stat
    monkeypatch.setattr(
        watch.os, "stat", lambda p, *a, **k: frozen if Path(p) == path else real_stat(p)
    )
    store = SimpleNamespace(known_files=lambda: [CONNS], path=lambda f: tmp_path / f)
    poller = watch.Poller(store)  # type: ignore[arg-type]
    assert poller.scan() == [CONNS]  # first look
    assert poller.scan() == []
    path.write_bytes(b"[2]\n")  # same size; stat says nothing changed
    assert poller.scan() == [CONNS]
    assert poller.scan() == []


def test_switching_polling_on_and_off_live(data_dir: Path) -> None:
    seed(data_dir, 10, _polling(False))
    d = Daemon(data_dir).start()
    try:
        wait_until(lambda: log_lines(d, "watching"), 5, what="watching")
        settings = data_dir / "settings.json"
        atomic_save(settings, dump(_polling(True, 50)))
        wait_until(
            lambda: any(e["polling"] for e in log_lines(d, "watching")), 5, what="polling on"
        )
        path, rev = data_dir / CONNS, revision(d)
        atomic_save(path, edit_name(path.read_bytes(), "conn_0002", "While polling"))
        assert_one_name_update(d, rev, "conn_0002", "While polling")
        atomic_save(settings, dump(_polling(False)))
        wait_until(lambda: log_lines(d, "watching")[-1]["polling"] is False, 5, what="polling off")
        rev = revision(d)
        atomic_save(path, edit_name(path.read_bytes(), "conn_0003", "Inotify again"))
        assert_one_name_update(d, rev, "conn_0003", "Inotify again")
        assert len(log_lines(d, "watching")) == 3
        assert json.loads(settings.read_bytes())["watch"]["polling"] is False
    finally:
        d.close()
