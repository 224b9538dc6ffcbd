"""Late in-place writes, in process: an in-place writer opened the file before the daemon's
rename replaced it, and writes into the old file afterwards. What it wrote is taken in through
the one door (`Store.take_in_late`), merged against what that writer saw, never written to the
data file by a side door.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from ctsd import intake, ops
from ctsd.atomic import TEMP_PREFIX
from ctsd.errors import CtsdError
from ctsd.files import SYNC_LOG
from ctsd.store import Store
from ctsd.watch import Watcher
from tests.datadir import before_each_rename

CONNS = "connections.json"


@contextlib.asynccontextmanager
async def _store(tmp_path: Path) -> AsyncIterator[tuple[Store, list[dict[str, Any]]]]:
    s = Store(tmp_path / "data")
    s.open()
    await s.start()
    notices: list[dict[str, Any]] = []
    s.notice_listeners.append(notices.append)
    try:
        for cid in ("c1", "c2"):
            await s.submit(
                ops.create({"id": cid, "name": cid, "exchange": "bybit"}), "bus", sync="files"
            )
        yield s, notices
    finally:
        await s.close()


def _edit(body: bytes, cid: str, **changes: Any) -> bytes:
    conns = json.loads(body)
    for c in conns:
        if c["id"] == cid:
            c.update(changes)
    return (json.dumps(conns, indent=2) + "\n").encode()


async def _displace(s: Store, *, truncate: bool = True) -> Any:
    """An in-place writer opens the file, then a bus change renames a new one over it; the
    writer then truncates it to write it again (unless not `truncate`: not yet)."""
    path = s.path(CONNS)
    fh = open(path, "r+b")  # noqa: SIM115 - the "editor" keeps it open across the change
    before = fh.read()
    await s.submit(ops.update("c1", {"name": "Bus"}), "bus", sync="files")
    assert s.displaced and os.fstat(fh.fileno()).st_ino != path.stat().st_ino
    if truncate:
        fh.seek(0)
        fh.truncate(0)
    return fh, before


def _late_copies(s: Store) -> list[Path]:
    return sorted(s.data_dir.glob(f"{CONNS}.late-*"))


@pytest.mark.anyio
async def test_a_save_landing_while_a_late_write_is_taken_in_is_not_destroyed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The side-door race: the late write is being written back while an operator's rename
    save lands, just before the rename that would put the late write in place. A write that
    checks the file and then renames destroys that save unseen; the checkpointer's swap sees
    it, takes it in, and writes everything on top: the save, the late write and the
    acknowledged change all survive."""
    async with _store(tmp_path) as (s, _notices):
        path = s.path(CONNS)
        armed = False

        def land_hand_save(dst: Any) -> None:
            nonlocal armed
            if armed and Path(dst) == path:
                armed = False
                tmp = path.with_name(".edit.tmp")
                tmp.write_bytes(_edit(path.read_bytes(), "c1", volume_factor=3.0))
                os.rename(tmp, path)

        before_each_rename(monkeypatch, land_hand_save)

        watcher = Watcher(s)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher.run)
            await anyio.sleep(0.1)  # watching
            fh, before = await _displace(s)
            armed = True  # the next rename of connections.json meets the hand save
            fh.write(_edit(before, "c2", name="Late"))
            fh.close()
            for _ in range(200):
                if s.connections["c1"].volume_factor == 3.0 and not armed:
                    break
                await anyio.sleep(0.02)
            await s.checkpointer.flush()
            watcher.stop()
            tg.cancel_scope.cancel()
        assert not armed, "the hand save never landed: the test did not hit the window"
        assert s.connections["c1"].volume_factor == 3.0, "the hand save was destroyed"
        assert s.connections["c1"].name == "Bus"  # the acknowledged change survived too
        assert s.connections["c2"].name == "Late"  # and the late write
        on_disk = json.loads(path.read_bytes())
        assert (on_disk[0]["volume_factor"], on_disk[0]["name"]) == (3.0, "Bus")
        assert on_disk[1]["name"] == "Late"
        assert not _late_copies(s) and s.unchanged(CONNS) and not s.displaced


@pytest.mark.anyio
async def test_late_write_is_taken_in_through_the_door_once_its_writer_closes(
    tmp_path: Path,
) -> None:
    async with _store(tmp_path) as (s, notices):
        path = s.path(CONNS)
        fh, before = await _displace(s)
        body = _edit(before, "c2", name="Late")
        fh.write(body[:30])
        fh.flush()
        await s.take_in_late(max_age=2.0)
        assert s.displaced, "taken while its writer still held it open (half written)"
        fh.write(body[30:])
        fh.close()
        await s.take_in_late(max_age=2.0)
        assert not s.displaced
        assert s.connections["c2"].name == "Late"
        # Merged against what the writer saw: the bus change it never saw stays.
        assert s.connections["c1"].name == "Bus"
        assert s.log[-1].data["source"] == "file" and s.log[-1].connection_id == "c2"
        # Written by the store itself: stamp recorded, nothing left behind.
        await s.checkpointer.flush()
        assert json.loads(path.read_bytes())[1]["name"] == "Late"
        assert s.unchanged(CONNS)
        assert not list(s.data_dir.glob(f"{TEMP_PREFIX}*")) and not _late_copies(s)
        assert not notices


@pytest.mark.anyio
async def test_a_writer_that_holds_the_file_open_past_the_wait_still_gets_its_writes_in(
    tmp_path: Path,
) -> None:
    """A script opened the file, read it, then asked its user (the daemon replaced the file
    meanwhile) and wrote long after: the displaced file was given up after the wait and its
    write went into a file nobody could find. Held open, it is watched on: what is written
    while it is held is taken in once quiet, and what comes after too, each against what
    its writer last saw."""
    async with _store(tmp_path) as (s, _notices):
        fh, before = await _displace(s, truncate=False)
        await s.take_in_late(max_age=0.0)  # long past the wait, nothing written
        assert s.displaced, "given up while its writer still held it"
        first = _edit(before, "c2", name="Late")
        fh.seek(0)
        fh.truncate(0)
        fh.write(first)
        fh.flush()
        await s.take_in_late(max_age=0.0)  # written since the last look: waited for
        assert s.connections["c2"].name == "c2"
        await s.take_in_late(max_age=0.0)  # quiet since: taken in, still watched
        assert s.connections["c2"].name == "Late" and s.displaced
        fh.seek(0)
        fh.truncate(0)
        fh.write(_edit(first, "c2", volume_factor=2.0))
        fh.close()
        await s.take_in_late(max_age=0.0)
        assert (s.connections["c2"].name, s.connections["c2"].volume_factor) == ("Late", 2.0)
        assert s.connections["c1"].name == "Bus" and not s.displaced and not _late_copies(s)


@pytest.mark.anyio
async def test_a_write_landing_while_the_last_one_is_taken_in_is_seen_as_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Watched on after a take-in, the file's stamp was read again after it: a write landing
    during the take-in became part of what "taken in" meant, and was dropped unseen."""
    async with _store(tmp_path) as (s, _notices):
        fh, before = await _displace(s, truncate=False)
        first = _edit(before, "c2", name="Late")
        fh.seek(0)
        fh.truncate(0)
        fh.write(first)
        fh.flush()
        second = _edit(first, "c2", volume_factor=2.0)
        real = s.submit_take_in

        async def write_meanwhile(op: Any, file: str) -> Any:
            out = await real(op, file)
            monkeypatch.setattr(s, "submit_take_in", real)
            fh.seek(0)
            fh.truncate(0)
            fh.write(second)
            fh.flush()
            return out

        monkeypatch.setattr(s, "submit_take_in", write_meanwhile)
        await s.take_in_late(max_age=0.0)  # written since displaced: waits for quiet
        await s.take_in_late(max_age=0.0)  # taken in; the second write lands meanwhile
        assert s.connections["c2"].name == "Late" and s.displaced
        fh.close()
        await s.take_in_late(max_age=0.0)
        assert s.connections["c2"].volume_factor == 2.0 and not s.displaced


@pytest.mark.anyio
async def test_a_writer_that_never_stops_writing_is_kept_aside_after_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each write restarts the quiet wait: a writer that never stops would hold the file's
    watch for ever, past the limit meant to end it."""
    monkeypatch.setattr(intake, "LATE_HELD_MAX_S", 0.0)
    async with _store(tmp_path) as (s, _notices):
        fh, _before = await _displace(s, truncate=False)
        fh.write(b" ")
        fh.flush()
        await s.take_in_late(max_age=0.0)
        assert not s.displaced and len(_late_copies(s)) == 1
        fh.close()


@pytest.mark.anyio
async def test_a_late_write_the_cluster_cannot_take_is_kept_aside_at_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the limit, one the door refuses `unavailable` (a cluster out of reach) was tried
    again at every pass of the watcher, never kept aside."""
    async with _store(tmp_path) as (s, _notices):
        fh, before = await _displace(s)
        fh.write(_edit(before, "c2", name="Late"))
        fh.flush()
        tried: list[str] = []

        async def unavailable(op: Any, file: str) -> Any:
            tried.append(file)
            raise CtsdError("unavailable", "the cluster is out of reach")

        monkeypatch.setattr(s, "submit_take_in", unavailable)
        monkeypatch.setattr(intake, "LATE_HELD_MAX_S", 0.0)
        for _ in range(5):  # watcher passes, well within LATE_RETRY_S
            await s.take_in_late(max_age=2.0)
        assert len(tried) == 1 and not s.displaced and len(_late_copies(s)) == 1
        fh.close()


@pytest.mark.anyio
async def test_a_late_write_closed_after_the_limit_is_tried_again_not_kept_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit is for a writer that still holds the file: one closed since, refused once
    (a cluster briefly out of reach), is tried again and taken in."""
    async with _store(tmp_path) as (s, _notices):
        fh, before = await _displace(s)
        fh.write(_edit(before, "c2", name="Late"))
        fh.close()
        real = s.submit_take_in

        async def once_unavailable(op: Any, file: str) -> Any:
            monkeypatch.setattr(s, "submit_take_in", real)
            raise CtsdError("unavailable", "the cluster is out of reach")

        monkeypatch.setattr(s, "submit_take_in", once_unavailable)
        monkeypatch.setattr(intake, "LATE_HELD_MAX_S", 0.0)
        monkeypatch.setattr(intake, "LATE_RETRY_S", 0.0)
        for _ in range(3):
            await s.take_in_late(max_age=2.0)
        assert s.connections["c2"].name == "Late" and not _late_copies(s)


@pytest.mark.anyio
async def test_a_file_still_held_open_when_the_daemon_stops_is_kept_aside(tmp_path: Path) -> None:
    """Stopping, the daemon cannot wait for a writer that holds a displaced file open: the
    file is kept beside its data file (`.late-`), where what the writer writes after lands."""
    async with _store(tmp_path) as (s, _notices):
        fh, before = await _displace(s, truncate=False)
        data_dir = s.data_dir
    (copy,) = sorted(data_dir.glob(f"{CONNS}.late-*"))
    fh.seek(0)
    fh.truncate(0)
    fh.write(_edit(before, "c2", name="After the stop"))
    fh.close()
    assert json.loads(copy.read_bytes())[1]["name"] == "After the stop"
    assert not list(data_dir.glob(f"{TEMP_PREFIX}*"))


@pytest.mark.anyio
async def test_invalid_late_write_is_kept_and_reported_not_dropped(tmp_path: Path) -> None:
    async with _store(tmp_path) as (s, notices):
        path = s.path(CONNS)
        fh, _before = await _displace(s)
        on_disk = path.read_bytes()
        fh.write(b'[\n  {"id": "c1",\n')  # the editor crashed half way, say
        fh.close()
        await s.take_in_late(max_age=2.0)
        (copy,) = _late_copies(s)
        assert copy.read_bytes() == b'[\n  {"id": "c1",\n'
        (notice,) = notices
        assert notice["notice"] == "file_invalid" and notice["file"] == copy.name
        assert notice["line"] >= 1 and notice["message"]
        assert CONNS in notice["reason"]
        # The data file is valid and untouched: nothing is refused.
        assert path.read_bytes() == on_disk and not s.problems
        await s.submit(ops.update("c2", {"name": "Still works"}), "bus")
        assert not list(s.data_dir.glob(f"{TEMP_PREFIX}*"))


@pytest.mark.anyio
async def test_a_late_write_that_rewrites_the_sync_log_history_is_kept_aside(
    tmp_path: Path,
) -> None:
    """Not taken (only the oldest entries may go), and not dropped either: kept beside the
    log as any late write that is not taken in, said why; the history stays whole."""
    async with _store(tmp_path) as (s, _notices):
        path = s.path(SYNC_LOG)
        fh = open(path, "r+b")  # noqa: SIM115 - the "editor" keeps it open across the change
        before = json.loads(fh.read())
        await s.submit(ops.update("c1", {"name": "Bus"}), "bus", sync="files")
        assert s.displaced
        written = json.dumps(before[:1]).encode()  # its newest entry removed
        fh.seek(0)
        fh.truncate(0)
        fh.write(written)
        fh.close()
        with structlog.testing.capture_logs() as logs:
            await s.take_in_late(max_age=2.0)
        (copy,) = sorted(s.data_dir.glob(f"{SYNC_LOG}.late-*"))
        assert copy.read_bytes() == written
        (kept,) = [e for e in logs if e["event"] == "late_hand_write_kept"]
        assert kept["why"] == "sync_log_edit_not_kept" and "were gone" in kept["error"], kept
        assert not [e for e in logs if e["event"] == "late_hand_write_taken_in"]
        assert [e.id for e in s.log] == [1, 2, 3]


@pytest.mark.anyio
async def test_late_write_pending_at_close_is_taken_in(tmp_path: Path) -> None:
    async with _store(tmp_path) as (s, _notices):
        fh, before = await _displace(s)
        fh.write(_edit(before, "c2", name="Late"))
        fh.close()
        data_dir = s.data_dir
    assert not list(data_dir.glob(f"{TEMP_PREFIX}*"))
    again = Store(data_dir)
    again.open()
    assert again.connections["c2"].name == "Late"


@pytest.mark.anyio
async def test_a_late_write_taken_in_survives_a_crash_before_the_file_is_written(
    tmp_path: Path,
) -> None:
    """Taken in (journalled, published, its displaced file removed), then killed before a
    round wrote it into the data file: the next start replays it from the journal. It was
    journalled as a hand edit of the data file, which a replay takes from that file, where it
    never was: gone without a trace."""
    async with _store(tmp_path) as (s, _notices):
        fh, before = await _displace(s)
        fh.write(_edit(before, "c2", name="Late"))
        fh.close()
        s.checkpointer.stop()  # no round after this: the kill comes first
        await s.checkpointer.flush()
        await s.take_in_late(max_age=2.0)
        assert s.connections["c2"].name == "Late" and not s.displaced
        crashed = tmp_path / "crashed"
        shutil.copytree(s.data_dir, crashed)  # what a kill -9 leaves
    assert json.loads((crashed / CONNS).read_bytes())[1]["name"] == "c2"
    again = Store(crashed)
    again.open()
    assert again.connections["c2"].name == "Late"
    assert again.connections["c1"].name == "Bus"


def test_a_late_write_left_by_a_daemon_that_died_is_kept_not_deleted(tmp_path: Path) -> None:
    """The daemon was killed while an editor's in-place write sat in the file its own write
    had displaced (kept under a temp name until taken in): the next start keeps it beside
    the data file as a late write is kept, never deletes it with the other temp files."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    left = data_dir / f"{TEMP_PREFIX}old-{CONNS}.4242.0"  # as `atomic` names one
    left.write_bytes(b'[{"id": "c1", "name": "typed at 3 a.m."}]\n')
    scrap = data_dir / f"{TEMP_PREFIX}{CONNS}.0123abcd"  # a write of the daemon's, cut
    scrap.write_bytes(b"[")
    (data_dir / f"{TEMP_PREFIX}old-.1.2").write_bytes(b"?")  # no name the daemon makes
    s = Store(data_dir)
    s.open()
    s.journal.close()
    (kept,) = sorted(data_dir.glob(f"{CONNS}.late-*"))
    assert kept.read_bytes() == b'[{"id": "c1", "name": "typed at 3 a.m."}]\n'
    assert not list(data_dir.glob(f"{TEMP_PREFIX}*"))
