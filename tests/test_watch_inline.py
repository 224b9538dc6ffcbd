"""A change that finds a hand edit half written (an in-place save between its truncate and its
last write) must not call the file invalid: it waits a moment for the save to finish, or is
refused with `conflict` and leaves the judgement to the watcher."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from ctsd import ops
from ctsd.errors import CtsdError
from ctsd.store import Store

CONNS = "connections.json"


async def _store(tmp_path: Path) -> tuple[Store, list[dict[str, Any]]]:
    s = Store(tmp_path / "data")
    s.open()
    s.start()
    notices: list[dict[str, Any]] = []
    s.notice_listeners.append(notices.append)
    await s.submit(ops.create({"id": "c1", "name": "One", "exchange": "bybit"}), "bus")
    return s, notices


@pytest.mark.anyio
async def test_change_waits_for_a_save_in_progress(tmp_path: Path) -> None:
    s, notices = await _store(tmp_path)
    try:
        path = s.path(CONNS)
        edited = path.read_bytes().replace(b'"One"', b'"Hand"')
        fh = open(path, "r+b")  # noqa: SIM115 - the "editor" keeps it open across the change
        fh.truncate(0)
        fh.write(edited[:40])
        fh.flush()

        def finish() -> None:
            fh.write(edited[40:])
            fh.close()

        asyncio.get_running_loop().call_later(0.008, finish)  # the editor's last write
        conn = await s.submit(ops.update("c1", {"volume_factor": 2.0}), "bus")
        assert (conn.name, conn.volume_factor) == ("Hand", 2.0)  # on top of the hand edit
        assert not [n for n in notices if n["notice"] == "file_invalid"]
        assert not s.problems
    finally:
        await s.close()


@pytest.mark.anyio
async def test_change_meeting_a_half_file_is_a_conflict_not_invalid(tmp_path: Path) -> None:
    s, notices = await _store(tmp_path)
    try:
        path = s.path(CONNS)
        half = path.read_bytes()[:40]
        path.write_bytes(half)  # and the editor never comes back
        with pytest.raises(CtsdError) as err:
            await s.submit(ops.update("c1", {"volume_factor": 2.0}), "bus")
        assert err.value.code == "conflict"
        assert not notices and not s.problems  # judging it is the watcher's job
        assert path.read_bytes() == half  # never overwritten
        assert not await s.ingest(CONNS)  # the watcher's settled judgement
        assert s.problems and notices[0]["notice"] == "file_invalid"
        with pytest.raises(CtsdError) as err:
            await s.submit(ops.update("c1", {"volume_factor": 3.0}), "bus")
        assert err.value.code == "file_invalid"
    finally:
        await s.close()
