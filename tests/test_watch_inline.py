"""A checkpoint that finds a hand edit half written (an in-place save between its truncate and
its last write) must not call the file invalid, nor write over it: it waits for the save to
finish and writes on top of it, or leaves the judgement to the watcher. The change itself was
acknowledged from the journal and is never lost."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from ctsd import ops
from ctsd.errors import CtsdError
from ctsd.store import Store

CONNS = "connections.json"


async def _store(tmp_path: Path) -> tuple[Store, list[dict[str, Any]]]:
    s = Store(tmp_path / "data")
    s.open()
    await s.start()
    notices: list[dict[str, Any]] = []
    s.notice_listeners.append(notices.append)
    await s.submit(
        ops.create({"id": "c1", "name": "One", "exchange": "bybit"}), "bus", sync="files"
    )
    return s, notices


@pytest.mark.anyio
async def test_checkpoint_waits_for_a_save_in_progress(tmp_path: Path) -> None:
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
        assert conn.volume_factor == 2.0  # acknowledged from the journal
        with anyio.fail_after(5):
            await s.checkpointer.flush()
        on_disk = json.loads(path.read_bytes())[0]
        assert (on_disk["name"], on_disk["volume_factor"]) == ("Hand", 2.0)  # on top of it
        assert s.connections["c1"].name == "Hand"
        assert not [n for n in notices if n["notice"] == "file_invalid"]
        assert not s.problems
    finally:
        await s.close()


@pytest.mark.anyio
async def test_checkpoint_meeting_a_half_file_leaves_it_to_the_watcher(tmp_path: Path) -> None:
    s, notices = await _store(tmp_path)
    try:
        path = s.path(CONNS)
        half = path.read_bytes()[:40]
        path.write_bytes(half)  # and the editor never comes back
        conn = await s.submit(ops.update("c1", {"volume_factor": 2.0}), "bus")
        assert conn.volume_factor == 2.0  # durable in the journal all the same
        await anyio.sleep(0.2)  # rounds of the checkpointer meet the half file
        assert not notices and not s.problems  # judging it is the watcher's job
        assert path.read_bytes() == half  # never overwritten
        assert not await s.ingest(CONNS)  # the watcher's settled judgement
        assert s.problems and notices[0]["notice"] == "file_invalid"
        with pytest.raises(CtsdError) as err:
            await s.submit(ops.update("c1", {"volume_factor": 3.0}), "bus")
        assert err.value.code == "file_invalid"
        assert s.connections["c1"].volume_factor == 2.0
        assert path.read_bytes() == half
    finally:
        await s.close()
