"""The store in-process, on real files: every kind of change through the one door."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import resource
import shutil
import stat
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import structlog.testing

from ctsd import backup, checkpoint, core, files, intake, journal, ops
from ctsd.atomic import TEMP_PREFIX, stamp_of
from ctsd.bus import views
from ctsd.core import Change, Committed, RecordChange
from ctsd.errors import CtsdError
from ctsd.files import CONNECTIONS, STATE, SYNC_LOG
from ctsd.metrics import Metrics
from ctsd.models import SyncEvent, TestResult
from ctsd.secretbox import SecretBox, new_key_text, parse_key
from ctsd.store import Store
from tests.daemon import wait_until_async
from tests.datadir import CANARY, connection, small_tmpfs, write_settings
from tests.inprocess import killed_after, loaded_with_copies, then_killed

pytestmark = pytest.mark.anyio


def conn(i: int | str, **extra: Any) -> dict[str, Any]:
    return connection(f"c{i}", **{"name": f"conn {i}", **extra})


@contextlib.asynccontextmanager
async def opened(data_dir: Path) -> AsyncIterator[Store]:
    """The store on `data_dir`, open for changes (each test asks for its changes to be
    answered once in the files: `sync="files"`, as the CLI does)."""
    store = Store(data_dir)
    store.open()
    await store.start()
    try:
        yield store
    finally:
        await store.close()


class Recorder:
    """Collects what the store publishes: one list per op, and (seconds, changes) per write."""

    def __init__(self, store: Store) -> None:
        self.messages: list[list[SyncEvent]] = []
        self.commits: list[int] = []
        store.events_listeners.append(self.messages.append)
        store.on_commit.append(lambda _s, n: self.commits.append(n))

    @property
    def events(self) -> list[SyncEvent]:
        return [e for m in self.messages for e in m]


def disk(data_dir: Path, file: str) -> Any:
    return msgspec.json.decode((data_dir / file).read_bytes())


def by_id(data_dir: Path, file: str = CONNECTIONS) -> dict[str, dict[str, Any]]:
    key = "id" if file == CONNECTIONS else "connection_id"
    return {r[key]: r for r in disk(data_dir, file)}


def snapshot(data_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(data_dir)): p.read_bytes()
        for p in data_dir.rglob("*.json")
        if "logs" not in p.parts
    }


def no_temp_files(data_dir: Path) -> bool:
    return not list(data_dir.rglob(f"{TEMP_PREFIX}*"))


# --- every kind of change ------------------------------------------------------------------


async def test_create_update_delete(data_dir: Path) -> None:
    async with opened(data_dir) as store:
        rec = Recorder(store)
        made = await store.submit(ops.create(conn(1, api_key=CANARY)), "bus", sync="files")
        assert made.id == "c1" and made.created_at == made.updated_at
        on_disk = by_id(data_dir)["c1"]
        assert on_disk["api_key"] == CANARY and on_disk["name"] == "conn 1"
        assert by_id(data_dir, STATE)["c1"]["status"] == "inactive"
        [create] = rec.events
        assert (create.action, create.connection_id, create.id) == ("create", "c1", 1)
        assert create.data["source"] == "bus" and "api_key" in create.data["fields"]
        assert "api_key" not in create.data["values"]

        await store.submit(
            ops.update("c1", {"name": "renamed", "volume_factor": 2.5}), "cli", sync="files"
        )
        assert by_id(data_dir)["c1"]["name"] == "renamed"
        upd = rec.events[-1]
        assert upd.action == "update" and sorted(upd.data["fields"]) == ["name", "volume_factor"]
        assert upd.data["values"] == {"name": "renamed", "volume_factor": 2.5}

        made2 = await store.submit(ops.create(conn("x")), "http", sync="files")
        assert made2.id == "cx"
        generated = await store.submit(
            ops.create({"name": "n", "exchange": "okx"}), "bus", sync="files"
        )
        assert len(generated.id) == 17 and generated.id.startswith("conn_")

        assert await store.submit(ops.delete("c1"), "bus", sync="files") == {"deleted": "c1"}
        assert "c1" not in by_id(data_dir) and "c1" not in by_id(data_dir, STATE)
        assert rec.events[-1].action == "delete"
        log = disk(data_dir, SYNC_LOG)
        assert [e["id"] for e in log] == [1, 2, 3, 4, 5] == [e.id for e in rec.events]
        assert [e["action"] for e in log] == ["create", "update", "create", "create", "delete"]

        for bad, code in [
            (ops.create(conn("x")), "conflict"),
            (ops.update("nope", {"name": "a"}), "not_found"),
            (ops.update("cx", {"is_enabeld": True}), "invalid"),
            (ops.update("cx", {"volume_factor": 0}), "invalid"),
            (ops.update("cx", {"id": "other"}), "invalid"),
            (ops.update("cx", {"connection_settings": "[]"}), "invalid"),
            (ops.update("cx", {"api_key": "********"}), "invalid"),
            (ops.create(conn("bad id")), "invalid"),
            (ops.delete("nope"), "not_found"),
        ]:
            before = snapshot(data_dir)
            with pytest.raises(CtsdError) as exc:
                await store.submit(bad, "bus", sync="files")
            assert exc.value.code == code, exc.value
            assert snapshot(data_dir) == before
        assert store.revision == 5


async def test_a_caller_waiting_for_the_files_cuts_the_coalescing_short(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rounds of writes coalesce the changes of a moment; a caller who asked to be answered
    once in the files (`sync: files`, the CLI) gets the next round at once, also when it
    comes while the round waits for more changes."""
    monkeypatch.setattr(checkpoint, "COALESCE_S", 60.0)
    monkeypatch.setattr(checkpoint, "COALESCE_MAX_S", 60.0)
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus")  # durable; the files wait for a round
        assert store.checkpointer.lag_s >= 0 and "c1" not in by_id(data_dir)
        with anyio.fail_after(10):
            await store.submit(ops.create(conn(2)), "cli", sync="files")
        assert {"c1", "c2"} <= set(by_id(data_dir))


async def test_a_change_made_during_a_write_waits_from_when_it_came(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coalescing wait of a change that came while a round was writing runs from when it
    came, not from the end of that write: under steady load a change reaches its file within
    the wait plus one write, however long the write before it took."""
    wait = 0.5
    monkeypatch.setattr(checkpoint, "COALESCE_S", wait)
    monkeypatch.setattr(checkpoint, "COALESCE_MAX_S", wait)
    writing, release = threading.Event(), threading.Event()
    real = checkpoint._render_and_write

    def slow(*args: Any) -> Any:
        if not release.is_set():
            writing.set()
            release.wait(10)
        return real(*args)

    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")
        monkeypatch.setattr(checkpoint, "_render_and_write", slow)
        await store.submit(ops.update("c1", {"name": "first"}), "bus")
        with anyio.fail_after(5):
            while not writing.is_set():
                await anyio.sleep(0.005)
        await store.submit(ops.update("c1", {"name": "during the write"}), "bus")
        await anyio.sleep(wait + 0.1)  # the write goes on past that change's wait
        release.set()
        released = time.monotonic()
        with anyio.fail_after(5):
            while by_id(data_dir)["c1"]["name"] != "during the write":
                await anyio.sleep(0.005)
        # Its wait was over when the write ended: the next round followed at once (waiting
        # from the end of the write, it would take `wait` more).
        assert time.monotonic() - released < 0.7 * wait


async def test_a_sync_log_replaced_while_it_is_written_is_written_anew(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sync log replaced whole (another host's hand edit of it, in cluster mode, comes
    in without the file's lock) while a round is writing it: what that round encoded of the
    old history is not kept for the next rounds, which write the new history as it is."""
    writing, release = threading.Event(), threading.Event()
    real = checkpoint._render_and_write

    def slow(*args: Any) -> Any:
        if not release.is_set():
            writing.set()
            release.wait(10)
        return real(*args)

    async with opened(data_dir) as store:
        for i in range(4):
            await store.submit(ops.create(conn(i)), "bus", sync="files")
        monkeypatch.setattr(checkpoint, "_render_and_write", slow)
        # A first replacement (the same history): the held round encodes all of it.
        first = Change(log=list(store.log))
        store.install(first, await store.append(first))
        with anyio.fail_after(5):
            while not writing.is_set():
                await anyio.sleep(0.005)
        # The same first entry (so the next round's check of the history's start passes),
        # one entry dropped, and the newest one different: only the frames' contents differ.
        old = list(store.log)
        edited = msgspec.structs.replace(old[-1], data={**old[-1].data, "note": "by hand"})
        replaced = Change(log=[old[0], *old[2:-1], edited])
        store.install(replaced, await store.append(replaced))
        release.set()
        await store.submit(ops.update("c2", {"name": "after"}), "bus", sync="files")
        assert disk(data_dir, SYNC_LOG) == msgspec.to_builtins(list(store.log))
        assert list(store.checkpointer.log_ids) == [e.id for e in store.log]


async def test_a_file_saved_while_the_defaults_are_made_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing file is created only if still absent: the operator's save that lands between
    the look and the default is read, never replaced."""
    data_dir = tmp_path / "data"
    mine = [connection("hand", name="saved by hand")]
    real_link = os.link

    def link(src: Any, dst: Any) -> None:
        if Path(dst).name == CONNECTIONS:
            Path(dst).write_text(json.dumps(mine))  # the save, just before the default
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link)
    async with opened(data_dir) as store:
        assert json.loads((data_dir / CONNECTIONS).read_text()) == mine
        assert list(store.connections) == ["hand"]
        assert CONNECTIONS not in store.intake.created and STATE in store.intake.created


async def test_did_you_mean_on_update(data_dir: Path) -> None:
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")
        with pytest.raises(CtsdError) as exc:
            await store.submit(ops.update("c1", {"is_enabeld": False}), "bus", sync="files")
        assert "did you mean `is_enabled`?" in exc.value.message


async def test_set_active_set_volume_test_and_heartbeats(data_dir: Path) -> None:
    async with opened(data_dir) as store:
        rec = Recorder(store)
        await store.submit(ops.create(conn(1)), "bus", sync="files")
        await store.submit(ops.set_active("c1", True), "bus", sync="files")
        assert by_id(data_dir)["c1"]["is_active"] is True
        st = by_id(data_dir, STATE)["c1"]
        assert st["is_active"] is True and st["status"] == "active"
        ev = rec.events[-1]
        assert ev.action == "set_active" and ev.data["active"] is True
        assert set(ev.data) == {"active", "timestamp", "source"}

        await store.submit(ops.set_volume("c1", live=1.5, preset=2.0), "bus", sync="files")
        st = by_id(data_dir, STATE)["c1"]
        assert (st["volume_factor_live"], st["volume_factor_preset"]) == (1.5, 2.0)
        ev = rec.events[-1]
        assert ev.action == "update_volume"
        assert (ev.data["live"], ev.data["preset"]) == (1.5, 2.0) and "timestamp" in ev.data
        with pytest.raises(CtsdError) as exc:
            await store.submit(ops.set_volume("c1", live=-1), "bus", sync="files")
        assert exc.value.code == "invalid" and exc.value.path == "$.live"

        result = TestResult(success=True, latency=12, timestamp="2024-01-01T00:00:00.000Z")
        await store.submit(ops.record_test("c1", result), "probe", sync="files")
        st = by_id(data_dir, STATE)["c1"]
        assert st["test_results"] == {
            "success": True,
            "latency": 12,
            "timestamp": "2024-01-01T00:00:00.000Z",
        }
        assert rec.events[-1].action == "test" and rec.events[-1].data["source"] == "probe"

        rev = store.revision
        n = await store.submit(
            ops.flush_heartbeats({"c1": "2024-01-02T00:00:00.000Z"}), "sweep", sync="files"
        )
        assert n == 1
        assert by_id(data_dir, STATE)["c1"]["last_heartbeat_at"] == "2024-01-02T00:00:00.000Z"
        assert store.revision == rev  # heartbeats write state, not the sync log

        await store.submit(ops.set_status({"c1": ("stale", None)}), "sweep", sync="files")
        assert by_id(data_dir, STATE)["c1"]["status"] == "stale"
        assert rec.events[-1].action == "stale"
        await store.submit(ops.record_test("c1", result), "probe", sync="files")
        assert [e.action for e in rec.messages[-1]] == ["test", "recovered"]
        assert by_id(data_dir, STATE)["c1"]["status"] == "active"


async def test_documents_import_and_reset(data_dir: Path) -> None:
    async with opened(data_dir) as store:
        rec = Recorder(store)
        await store.submit(ops.set_document("ui-config", {"theme": "dark"}), "bus", sync="files")
        assert disk(data_dir, "ui-config.json") == {"theme": "dark"}
        ev = rec.events[-1]
        assert (ev.action, ev.connection_id) == ("document_update", None)
        assert ev.data["file"] == "ui-config.json" and ev.data["keys"] == ["theme"]
        await store.submit(
            ops.set_document("algorithms/Fast", {"name": "Fast", "n": 3}), "bus", sync="files"
        )
        assert disk(data_dir, "algorithms/Fast.json") == {"name": "Fast", "n": 3}
        inst = {"instances": [{"id": "i", "name": "I", "symbol": "NQ", "algorithmName": "Fast"}]}
        await store.submit(ops.set_document("instances", inst), "bus", sync="files")
        dangling = {"instances": [{"id": "i", "name": "I", "symbol": "NQ", "algorithmName": "X"}]}
        for name, content in [
            ("instances", dangling),
            ("settings", {"sync_log_limit": "many"}),
            ("algorithms/NoName", {"n": 1}),
            ("connection", {"projectX": {"apiKey": "********"}}),
        ]:
            with pytest.raises(CtsdError) as exc:
                await store.submit(ops.set_document(name, content), "bus", sync="files")
            assert exc.value.code == "invalid", (name, exc.value)
        with pytest.raises(CtsdError) as exc:
            await store.submit(ops.set_document("nope", {}), "bus", sync="files")
        assert exc.value.code == "not_found"

        await store.submit(ops.create(conn(1)), "bus", sync="files")
        await store.submit(ops.create(conn(2, api_secret=CANARY)), "bus", sync="files")
        export = {
            "files": {
                CONNECTIONS: [conn(3, created_at="2024-01-01T00:00:00.000Z")],
                "watchlists.json": {"main": ["NQ"]},
            }
        }
        await store.submit(ops.import_data(export, "merge"), "cli", sync="files")
        assert sorted(by_id(data_dir)) == ["c1", "c2", "c3"]
        assert by_id(data_dir)["c2"]["api_secret"] == CANARY
        assert disk(data_dir, "watchlists.json") == {"main": ["NQ"]}
        assert rec.messages[-1][-1].action == "import"
        await store.submit(ops.import_data(export, "replace"), "cli", sync="files")
        assert sorted(by_id(data_dir)) == ["c3"] and sorted(by_id(data_dir, STATE)) == ["c3"]
        deletes = [e.connection_id for e in rec.messages[-1] if e.action == "delete"]
        assert sorted(deletes) == ["c1", "c2"]

        rev = store.revision
        await store.submit(ops.reset(), "bus", sync="files")
        assert disk(data_dir, CONNECTIONS) == [] and disk(data_dir, STATE) == []
        assert disk(data_dir, "ui-config.json") == {} and disk(data_dir, "watchlists.json") == {}
        assert disk(data_dir, "algorithms/Fast.json")["name"] == "Fast"  # the library stays
        assert rec.events[-1].action == "reset" and store.revision == rev + 1
        assert disk(data_dir, SYNC_LOG)[-1]["id"] == rev + 1  # history kept


# --- group commit, batches, revisions -----------------------------------------------------


async def test_group_commit_answers_each_caller_after_its_change_is_on_disk(
    data_dir: Path,
) -> None:
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")
        rec = Recorder(store)
        seen_on_disk: list[bool] = []

        async def changer(i: int) -> None:
            await store.submit(ops.create(conn(f"g{i}", name=f"value {i}")), "bus", sync="files")
            # Answered: the change must already be in the file (read before yielding again).
            seen_on_disk.append(by_id(data_dir).get(f"cg{i}", {}).get("name") == f"value {i}")

        async with anyio.create_task_group() as tg:
            for i in range(64):
                tg.start_soon(changer, i)
        assert seen_on_disk == [True] * 64
        assert sum(rec.commits) == 64
        assert len(rec.commits) < 64, rec.commits  # fewer writes than changes
        ids = [e.id for e in rec.events]
        assert ids == list(range(2, 66))  # one event per change, consecutive
        assert len(rec.messages) == 64  # one message per change
        assert [e["id"] for e in disk(data_dir, SYNC_LOG)] == list(range(1, 66))


async def test_under_load_a_group_waits_to_fill_and_a_few_writers_never_wait(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ctsd import store as store_module

    monkeypatch.setattr(store_module, "GROUP_FILL_AFTER", 3)
    monkeypatch.setattr(store_module, "GROUP_FILL_S", 30.0)  # any wait would show
    monkeypatch.setattr(store_module, "GROUP_IDLE_S", 60.0)
    async with opened(data_dir) as store:
        rec = Recorder(store)
        fills: list[tuple[float, bool]] = []  # what /metrics is told of each wait
        store.on_fill.append(lambda seconds, filled: fills.append((seconds, filled)))

        def submit(i: int) -> asyncio.Future[Any]:
            return asyncio.ensure_future(submit_to(store, i))

        with anyio.fail_after(5):  # a lone writer's change goes out at once, alone
            await submit(1)
            await asyncio.gather(submit(2), submit(3))  # two: one group, no wait after it
            await submit(4)
            await asyncio.gather(submit(5), submit(6), submit(7))  # writers at once: one group
        assert rec.commits == [1, 2, 1, 3]
        first = submit(8)  # the next group waits for as many as the last one held
        for _ in range(10):
            await asyncio.sleep(0)
        assert not first.done() and rec.commits == [1, 2, 1, 3]
        with anyio.fail_after(5):
            await asyncio.gather(first, submit(9), submit(10))
        assert rec.commits == [1, 2, 1, 3, 3]
        monkeypatch.setattr(store_module, "GROUP_FILL_S", 0.05)  # fewer come: it goes after it
        t0 = time.monotonic()
        await submit(11)
        assert time.monotonic() - t0 >= 0.04 and rec.commits == [1, 2, 1, 3, 3, 1]
        monkeypatch.setattr(store_module, "GROUP_FILL_S", 30.0)
        with anyio.fail_after(5):
            await submit(12)  # and alone, the next one goes at once again
            await asyncio.gather(submit(13), submit(14), submit(15))
            # after a pause (any, here) the first change does not wait for the last group's
            monkeypatch.setattr(store_module, "GROUP_IDLE_S", 0.0)
            await submit(16)
        assert rec.commits == [1, 2, 1, 3, 3, 1, 1, 3, 1]
        assert [filled for _, filled in fills] == [True, False]  # only two groups waited
        assert fills[1][0] >= 0.04  # the one that went after the whole wait

    async with opened(data_dir) as store:  # closing ends a group's wait at once
        rec = Recorder(store)
        monkeypatch.setattr(store_module, "GROUP_IDLE_S", 60.0)
        await asyncio.gather(*(submit_to(store, i) for i in (17, 18, 19)))
        waiting = asyncio.ensure_future(submit_to(store, 20))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not waiting.done()
        with anyio.fail_after(5):
            await store.close()
            await waiting
        assert rec.commits == [3, 1]


async def submit_to(store: Store, i: int) -> Any:
    return await store.submit(ops.create(conn(i)), "bus")


@contextlib.asynccontextmanager
async def journal_syncs(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, slow: list[str]
) -> AsyncIterator[tuple[Store, list[str]]]:
    """The store, with no checkpoint rounds (no cut of the journal in between), and the
    thread each fdatasync of its journal ran on, in order. Each entry of `slow` makes the
    next one stall past INLINE_APPEND_MAX_S: "slow" returns, "fail" then fails (EIO)."""
    from ctsd import journal
    from ctsd import store as store_module

    real = os.fdatasync
    where: list[str] = []
    monkeypatch.setattr(journal, "ROOM_STEP", 0)  # no room ahead written (`Journal.grow`)
    async with opened(data_dir) as store:
        store.checkpointer.stop()
        assert store._checkpoints is not None
        await store._checkpoints

        def watched(fd: int) -> None:
            if fd == store.journal.fd:
                where.append(threading.current_thread().name)
                if slow:
                    how = slow.pop(0)
                    time.sleep(store_module.INLINE_APPEND_MAX_S * 2)
                    if how == "fail":
                        raise OSError(errno.EIO, "Input/output error")
            real(fd)

        monkeypatch.setattr(journal.os, "fdatasync", watched)
        try:
            yield store, where
        finally:
            monkeypatch.setattr(journal.os, "fdatasync", real)


def on_journal_thread(names: list[str]) -> bool:
    return bool(names) and all(n.startswith("ctsd-journal") for n in names)


async def test_the_journal_gets_room_ahead_off_the_event_loop(data_dir: Path) -> None:
    # The room (`Journal.grow`) is written by a helper thread, neither the event loop nor the
    # journal thread, so appends go on meanwhile; then they overwrite it in place.
    from ctsd import journal

    async with opened(data_dir) as store:
        j = store.journal
        where: list[str] = []
        running = threading.Semaphore(1)  # held while a grow runs
        grow = j.grow

        def watched() -> None:
            with running:
                where.append(threading.current_thread().name)
                grow()

        def settled() -> bool:  # a grow ran and none runs (nor is due) now
            if not where or not running.acquire(blocking=False):
                return False
            running.release()
            return not j.wants_room()

        j.grow = watched  # type: ignore[method-assign]
        await store.submit(ops.create(conn(0)), "bus")
        with anyio.fail_after(10):
            while not settled():
                await anyio.sleep(0.01)
        size = (data_dir / journal.NAME).stat().st_size
        assert size == j.capacity > j.end
        grows = len(where)
        for i in range(1, 20):
            await store.submit(ops.create(conn(i)), "bus")
        if len(where) == grows:  # (no room was due meanwhile): the appends went into it
            assert (data_dir / journal.NAME).stat().st_size == size
        loop_thread = threading.current_thread().name
        assert where and all(t != loop_thread and "journal" not in t for t in where), where
    assert len(disk(data_dir, CONNECTIONS)) == 20


async def test_a_slow_disk_moves_journal_appends_off_the_event_loop(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A quick fdatasync is made on the event loop (handing it to a thread costs more than it
    # does); once one is slow, appends go to the journal thread, so a stalling disk never
    # holds reads and heartbeats up for more than one fdatasync per stall.
    async with journal_syncs(data_dir, monkeypatch, ["slow"]) as (store, where):
        for i in range(3):
            await store.submit(ops.create(conn(i)), "bus")
        assert store.journal.lsn == 3
    assert where[0] == threading.current_thread().name
    assert on_journal_thread(where[1:3]), where


async def test_a_stall_that_ends_in_an_error_counts_as_a_stall(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with journal_syncs(data_dir, monkeypatch, ["fail"]) as (store, where):
        with pytest.raises(CtsdError) as e:
            await store.submit(ops.create(conn(0)), "bus")
        assert e.value.code == "io_error"
        await store.submit(ops.create(conn(1)), "bus")
    # (the failed append's own cut-back is synced where it failed)
    loop = threading.current_thread().name
    assert where[:2] == [loop, loop] and on_journal_thread(where[2:]), where


async def test_appends_come_back_to_the_loop_once_the_disk_is_quick_again(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ctsd import store as store_module

    monkeypatch.setattr(store_module, "SLOW_DISK_HOLD_S", 0.2)
    async with journal_syncs(data_dir, monkeypatch, ["slow", "slow"]) as (store, where):
        await store.submit(ops.create(conn(0)), "bus")  # stalls on the loop
        await store.submit(ops.create(conn(1)), "bus")  # stalls on the thread: held longer
        with anyio.fail_after(5):
            while time.monotonic() < store._disk_slow_until:
                await anyio.sleep(0.01)
        await store.submit(ops.create(conn(2)), "bus")
    loop_thread = threading.current_thread().name
    assert where[0] == loop_thread and on_journal_thread(where[1:2]) and where[2] == loop_thread


async def test_a_large_record_and_appends_behind_a_thread_job_go_to_the_journal_thread(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ctsd import store as store_module

    async with journal_syncs(data_dir, monkeypatch, []) as (store, where):
        big = {"notes": "x" * (store_module.INLINE_APPEND_MAX_BYTES + 1)}
        await store.submit(ops.set_document("ui-config", big), "bus")
        assert on_journal_thread(where) and store._disk_slow_until == 0.0, where
        # A job on the journal thread (a rewrite of the journal): an append made meanwhile
        # waits behind it, on that thread, never beside it on the loop.
        gate, order = threading.Event(), []

        def job() -> None:
            gate.wait(10)
            order.append("job")

        running = asyncio.ensure_future(store._on_io(job))
        change = asyncio.ensure_future(store.submit(ops.create(conn(1)), "bus"))
        with anyio.fail_after(5):
            while store._io_jobs < 2:  # the job, and the change's append queued behind it
                await anyio.sleep(0.01)
        assert not change.done()
        gate.set()
        await running
        await change
    assert on_journal_thread(where[1:]) and order == ["job"], where


async def test_a_failing_change_fails_alone_in_its_group(data_dir: Path) -> None:
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")
        results: dict[int, Any] = {}

        async def one(i: int) -> None:
            changes = {"volume_factor": -1.0} if i % 2 else {"name": f"n{i}"}
            try:
                results[i] = await store.submit(ops.update("c1", changes), "bus", sync="files")
            except CtsdError as e:
                results[i] = e.code

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(one, i)
        assert [results[i] for i in range(1, 10, 2)] == ["invalid"] * 5
        assert all(results[i].name == f"n{i}" for i in range(0, 10, 2))
        assert by_id(data_dir)["c1"]["volume_factor"] == 1.0


async def test_batch_update_is_all_or_nothing_and_one_write(data_dir: Path) -> None:
    async with opened(data_dir) as store:
        for i in range(3):
            await store.submit(ops.create(conn(i)), "bus", sync="files")
        rec = Recorder(store)
        before = snapshot(data_dir)
        bad = [{"id": "c0", "name": "A"}, {"id": "c1", "volume_factor": 0}, {"id": "c2"}]
        with pytest.raises(CtsdError) as exc:
            await store.submit(ops.batch_update(bad), "bus", sync="files")
        assert exc.value.code == "invalid" and exc.value.path == "$.updates[1].volume_factor"
        missing = [{"id": "c0", "name": "A"}, {"id": "zz", "name": "B"}]
        with pytest.raises(CtsdError) as exc:
            await store.submit(ops.batch_update(missing), "bus", sync="files")
        assert exc.value.code == "not_found"
        assert snapshot(data_dir) == before and rec.commits == [] and store.revision == 3
        assert store.connections["c0"].name == "conn 0"

        good = [{"id": "c0", "name": "A"}, {"id": "c2", "is_enabled": False}]
        out = await store.submit(ops.batch_update(good), "bus", sync="files")
        assert [c.name for c in out] == ["A", "conn 2"]
        assert rec.commits == [1]  # one write
        assert [[e.id for e in m] for m in rec.messages] == [[4, 5]]  # one message, consecutive
        assert by_id(data_dir)["c0"]["name"] == "A" and not by_id(data_dir)["c2"]["is_enabled"]


async def test_revisions_kept_across_trimming_and_restarts(data_dir: Path) -> None:
    async with opened(data_dir) as store:
        await store.submit(ops.set_document("settings", {"sync_log_limit": 5}), "bus", sync="files")
        for i in range(12):
            await store.submit(ops.create(conn(i)), "bus", sync="files")
        assert [e["id"] for e in disk(data_dir, SYNC_LOG)] == [9, 10, 11, 12, 13]
        assert store.revision == 13 and store.oldest_revision() == 9
    async with opened(data_dir) as store:
        assert store.revision == 13
        rec = Recorder(store)
        await store.submit(ops.delete("c0"), "bus", sync="files")
        assert [e.id for e in rec.events] == [14]
        assert [e["id"] for e in disk(data_dir, SYNC_LOG)] == [10, 11, 12, 13, 14]
        # Trim to one entry and restart: the revision still continues, never reused.
        await store.submit(ops.set_document("settings", {"sync_log_limit": 1}), "bus", sync="files")
        assert [e["id"] for e in disk(data_dir, SYNC_LOG)] == [15]
    async with opened(data_dir) as store:
        await store.submit(ops.delete("c1"), "bus", sync="files")
        assert [e["id"] for e in disk(data_dir, SYNC_LOG)] == [16]


# --- failed writes --------------------------------------------------------------------------


async def _assert_refused_and_intact(store: Store, data_dir: Path, expect: str) -> None:
    """The journal cannot take the change: refused, memory and files as they were."""
    before = snapshot(data_dir)
    memory = (dict(store.connections), dict(store.state), list(store.log), store.revision)
    rec = Recorder(store)
    with pytest.raises(CtsdError) as exc:
        await store.submit(ops.update("c0", {"name": "never written " * 10}), "bus")
    assert exc.value.code == "io_error", exc.value
    assert rec.messages == [] and rec.commits == []  # nobody hears of a change not durable
    assert expect in exc.value.message, exc.value.message
    assert snapshot(data_dir) == before
    assert memory == (dict(store.connections), dict(store.state), list(store.log), store.revision)


async def _assert_still_works(store: Store, data_dir: Path) -> None:
    rev = store.revision
    with anyio.fail_after(10):
        await store.submit(ops.update("c0", {"name": "after"}), "bus", sync="files")
    assert by_id(data_dir)["c0"]["name"] == "after" and store.revision == rev + 1
    assert no_temp_files(data_dir)


async def test_disk_full_never_half_writes_and_catches_up(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "mnt") as mnt:
        data_dir = mnt / "data"
        async with opened(data_dir) as store:
            for i in range(20):
                await store.submit(ops.create(conn(i)), "bus", sync="files")
            before = snapshot(data_dir)
            filler = mnt / "filler"
            with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):
                while True:  # fill the tmpfs to the last block
                    fh.write(b"\0" * 4096)
            # The journal's last page may still have room for a small record: then the change
            # is acknowledged (durable), and a caller waiting for the files learns they cannot
            # be written; else the change is refused. Either way no file is touched.
            with pytest.raises(CtsdError) as exc:
                await store.submit(ops.update("c0", {"name": "full"}), "bus", sync="files")
            assert exc.value.code == "io_error", exc.value
            assert "No space left" in exc.value.message
            # connections.json stays as it was (the others, small enough, were written)
            assert snapshot(data_dir)[CONNECTIONS] == before[CONNECTIONS]
            assert no_temp_files(data_dir)
            acknowledged = store.connections["c0"].name == "full"
            filler.unlink()
            await _assert_still_works(store, data_dir)
        if acknowledged:
            assert any(
                e["data"].get("values") == {"name": "full"} for e in disk(data_dir, SYNC_LOG)
            )


async def test_a_journal_that_cannot_take_the_change_refuses_it(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The disk answering EIO to the journal's fdatasync (a failing disk; a file-size limit
    # would hit the test runner's own files too). The append is cut back: nothing remains.
    from ctsd import journal

    async with opened(data_dir) as store:
        for i in range(30):
            await store.submit(ops.create(conn(i)), "bus", sync="files")
        lsn = store.journal.lsn
        real = os.fdatasync

        def failing(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(journal.os, "fdatasync", failing)
        try:
            await _assert_refused_and_intact(store, data_dir, "Input/output error")
            assert store.journal.lsn == lsn  # no record was added
            # /health said ok meanwhile: the disk's free space and mode look fine on EIO
            assert store.status()["journal_error"] == "Input/output error"
        finally:
            monkeypatch.setattr(journal.os, "fdatasync", real)
        assert no_temp_files(data_dir)
        await _assert_still_works(store, data_dir)
        assert store.status()["journal_error"] is None


@pytest.mark.parametrize(
    "lose",
    [
        lambda p: p.unlink(),  # `rm .journal`: the appends went on into the deleted file
        lambda p: p.rename(p.with_name("journal.old")),
        lambda p: os.truncate(p, 0),  # the next start found it damaged and refused to start
        lambda p: p.write_bytes(b""),  # (the same, through another open)
        lambda p: os.truncate(p, 80),  # its header kept, its records cut
    ],
    ids=["deleted", "moved", "truncated", "emptied", "cut"],
)
async def test_a_journal_lost_by_hand_is_made_anew_before_the_next_ack(
    data_dir: Path, lose: Any
) -> None:
    """The journal deleted, moved or cut short while the daemon runs: every change
    acknowledged before and after it survives a crash that comes before the files hold them."""
    with structlog.testing.capture_logs() as logs:
        async with then_killed(data_dir) as store:
            await store.submit(ops.create(conn(1)), "bus")
            lose(data_dir / journal.NAME)
            await store.submit(ops.create(conn(2)), "bus")
            await store.submit(ops.update("c1", {"name": "renamed"}), "bus")
    assert [e["event"] for e in logs if e["event"] == "journal_rebuilt"] == ["journal_rebuilt"]
    store = Store(data_dir)
    store.open()
    try:
        assert {c: r.name for c, r in store.connections.items()} == {
            "c1": "renamed",
            "c2": "conn 2",
        }
        assert [e.action for e in store.log] == ["create", "create", "update"]
    finally:
        store.journal.close()


async def test_a_hand_edit_the_journal_could_not_take_is_taken_in_once_it_can(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk answering EIO to the journal as a hand edit comes in: refused, and nothing
    brought it back until the file was saved again (the daemon served the old content,
    /health ok). It is tried again, /health saying so meanwhile."""
    from ctsd.watch import Watcher

    async with opened(data_dir) as store:
        for i in range(3):
            await store.submit(ops.create(conn(i)), "bus", sync="files")
        watcher = Watcher(store)
        real = os.fdatasync

        def failing(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher.run)
            monkeypatch.setattr(journal.os, "fdatasync", failing)
            try:
                rows = json.loads((data_dir / CONNECTIONS).read_bytes())
                rows[0]["name"] = "by hand"
                tmp = data_dir / "edit.tmp"
                tmp.write_bytes(files.encode_table(rows))
                tmp.chmod(0o600)
                tmp.rename(data_dir / CONNECTIONS)
                with anyio.fail_after(10):  # the watcher's own look, refused
                    while CONNECTIONS not in store.intake.failed:
                        await anyio.sleep(0.02)
                status = watcher.status()
                assert not status["ok"] and CONNECTIONS in status["problem"], status
                assert store.connections["c0"].name != "by hand"
            finally:
                monkeypatch.setattr(journal.os, "fdatasync", real)
            with anyio.fail_after(10):  # the next try (a second later) takes it in
                while store.connections["c0"].name != "by hand":
                    await anyio.sleep(0.02)
            assert store.intake.failed == {} and watcher.status()["ok"]
            watcher.stop()
            tg.cancel_scope.cancel()


async def test_a_data_file_that_cannot_be_written_keeps_its_changes_in_the_journal(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ctsd import journal

    # No room ahead (`Journal.grow`): the journal is cut back to its header at each round,
    # so it stays far smaller than the file the limit is set by.
    monkeypatch.setattr(journal, "ROOM_STEP", 0)
    async with opened(data_dir) as store:
        for i in range(30):
            await store.submit(ops.create(conn(i)), "bus", sync="files")
        before = snapshot(data_dir)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        limit = (data_dir / CONNECTIONS).stat().st_size  # the journal is far smaller
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            done = await store.submit(ops.update("c0", {"name": "grown " * 20}), "bus")
            assert done.name.startswith("grown")  # acknowledged: durable in the journal
            with anyio.fail_after(5):
                while store.status()["checkpoint_lag_s"] < 0.3:  # rounds fail, lag grows
                    await anyio.sleep(0.05)
            # connections.json stays as it was (the others, small enough, were written)
            assert snapshot(data_dir)[CONNECTIONS] == before[CONNECTIONS]
            assert no_temp_files(data_dir)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        with anyio.fail_after(10):
            await store.checkpointer.flush()
        assert by_id(data_dir)["c0"]["name"].startswith("grown")
        assert store.status()["unwritten_files"] == []


# --- files on disk --------------------------------------------------------------------------


async def test_modes_and_exact_formatting(data_dir: Path) -> None:
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1, api_key=CANARY)), "bus", sync="files")
        await store.submit(ops.set_volume("c1", live=2.0), "bus", sync="files")
        await store.submit(
            ops.set_document("ui-config", {"b": [1, {"c": None}], "a": "é"}), "bus", sync="files"
        )
        await store.submit(ops.set_document("algorithms/A", {"name": "A"}), "bus", sync="files")
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    for sub in ("algorithms", "logs", "historical"):
        assert stat.S_IMODE((data_dir / sub).stat().st_mode) == 0o700, sub
    written = snapshot(data_dir)
    assert CONNECTIONS in written and "algorithms/A.json" in written and len(written) >= 12
    for name, raw in written.items():
        assert stat.S_IMODE((data_dir / name).stat().st_mode) == 0o600, name
        expected = msgspec.json.format(msgspec.json.encode(msgspec.json.decode(raw)), indent=2)
        assert raw == expected + b"\n", name
    assert b'\n  {\n    "id": "c1",\n' in written[CONNECTIONS]
    assert (
        written["ui-config.json"]
        == '{\n  "b": [\n    1,\n    {\n      "c": null\n    }\n  ],\n  "a": "é"\n}\n'.encode()
    )


async def test_every_hand_edit_taken_in_is_counted_an_algorithm_deleted_too(
    data_dir: Path,
) -> None:
    """`ctsd_hand_edits_total{result="taken_in"}`: a save and a deletion by hand."""
    async with opened(data_dir) as store:
        metrics = Metrics(store, dict)
        await store.submit(ops.set_document("algorithms/A", {"name": "A"}), "bus", sync="files")
        (data_dir / "ui-config.json").write_text('{"theme": "dark"}\n')
        assert await store.ingest("ui-config.json")
        (data_dir / "algorithms" / "A.json").unlink()
        assert await store.ingest("algorithms/A.json")
        assert "algorithms/A" not in store.documents
        [family] = metrics.hand_edits.collect()
        counted = {s.labels["result"]: s.value for s in family.samples if s.name.endswith("total")}
        assert counted == {"taken_in": 2, "refused": 0}


async def test_secrets_never_in_the_sync_log(data_dir: Path) -> None:
    async with opened(data_dir) as store:
        rec = Recorder(store)
        await store.submit(
            ops.create(conn(1, api_key=CANARY + "k", api_secret=CANARY)), "bus", sync="files"
        )
        await store.submit(
            ops.update("c1", {"api_passphrase": CANARY + "p", "name": "x"}), "bus", sync="files"
        )
        await store.submit(
            ops.batch_update([{"id": "c1", "api_secret": CANARY + "s"}]), "bus", sync="files"
        )
        await store.submit(
            ops.import_data({"files": {CONNECTIONS: [conn(1, api_key=CANARY)]}}, "merge"),
            "cli",
            sync="files",
        )
        await store.submit(
            ops.set_document("connection", {"projectX": {"apiKey": CANARY, "username": "u"}}),
            "bus",
            sync="files",
        )
    raw = (data_dir / SYNC_LOG).read_bytes()
    assert CANARY not in raw.decode()
    assert CANARY in (data_dir / CONNECTIONS).read_text()  # the value itself is stored
    upd = [e for e in rec.events if e.action == "update"]
    assert "api_passphrase" in upd[0].data["fields"] and upd[0].data["values"] == {"name": "x"}
    for e in rec.events:
        assert not set(e.data.get("values", {})) & {"api_key", "api_secret", "api_passphrase"}


# --- a file invalid at start ----------------------------------------------------------------


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "with a key"])
async def test_a_placeholder_pasted_while_stopped_is_invalid_at_start(
    data_dir: Path, sealed: bool
) -> None:
    """A record pasted from an export while the daemon was stopped carries placeholders: no
    secret, and nothing holds the one each stood for. The file is invalid at its line and
    column, left as it is; taken as it was, "********" was stored (with a key: sealed) in
    place of the secret. Project X's credentials in connection.json alike."""
    data_dir.mkdir(mode=0o700)
    pasted = (
        b'[\n  {"id": "c1", "name": "x", "exchange": "bybit",\n'
        b'   "api_key": "\xe2\x80\xa6abcd", "api_secret": "********"}\n]\n'
    )
    (data_dir / CONNECTIONS).write_bytes(pasted)
    doc = b'{"projectX": {"userName": "me", "apiKey": "********"}}\n'
    (data_dir / "connection.json").write_bytes(doc)
    box = SecretBox(parse_key(new_key_text(), "test key") if sealed else None)
    store = Store(data_dir, box)
    store.open()
    await store.start()
    try:
        problem = store.problems[CONNECTIONS]
        assert (problem.line, problem.path) == (3, "$[0].api_key"), problem
        assert "placeholder" in problem.message and "real value" in problem.message, problem
        problem = store.problems["connection.json"]
        assert problem.path == "$.projectX.apiKey" and problem.line == 1, problem
        assert store.connections == {}
    finally:
        await store.close()
    assert (data_dir / CONNECTIONS).read_bytes() == pasted
    assert (data_dir / "connection.json").read_bytes() == doc


async def test_a_placeholder_with_a_slip_pasted_while_stopped_is_refused_at_start(
    data_dir: Path,
) -> None:
    """`sed` while the service is down, putting `"******** "` where the secret was: judged
    against the file's copy by the door, it is refused (the file left as it is) and the
    stored secret kept. A value that reads so but was stored by an earlier version (file and
    copy alike) still loads: an upgrade must not leave the connections unserved."""
    store, _ = loaded_with_copies(data_dir)
    await store.start()
    await store.submit(ops.create(conn(1, api_secret=CANARY)), "bus", sync="files")
    await store.close()
    rows = disk(data_dir, CONNECTIONS)
    rows[0]["api_secret"] = "******** "
    pasted = (json.dumps(rows, indent=2) + "\n").encode()
    (data_dir / CONNECTIONS).write_bytes(pasted)
    store, edited = loaded_with_copies(data_dir)
    await store.start()
    try:
        await store.take_in_edited(edited)
        problem = store.problems[CONNECTIONS]
        assert problem.path == "$[0].api_secret" and "slip" in problem.message, problem
        assert store.connections["c1"].api_secret == CANARY
    finally:
        await store.close()
    assert (data_dir / CONNECTIONS).read_bytes() == pasted
    older = data_dir.parent / "older"  # a data dir an earlier version wrote (no copies)
    older.mkdir(mode=0o700)
    stored = [{**connection(id="c2"), "api_passphrase": " *******"}]
    (older / CONNECTIONS).write_text(json.dumps(stored, indent=2) + "\n")
    async with opened(older) as store:
        assert CONNECTIONS not in store.problems
        assert store.connections["c2"].api_passphrase == " *******"


async def test_file_invalid_at_start_is_never_overwritten(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)
    bad = b'[\n  {"id": "c1", "name": "x", "exchange": "bybit", "is_enabeld": true}\n]\n'
    (data_dir / CONNECTIONS).write_bytes(bad)
    async with opened(data_dir) as store:
        assert "did you mean `is_enabled`?" in store.problems[CONNECTIONS].message
        assert (data_dir / CONNECTIONS).read_bytes() == bad
        imp = ops.import_data({"files": {CONNECTIONS: [conn(3)]}}, "replace")
        for op in (ops.create(conn(2)), ops.reset(), imp):
            with pytest.raises(CtsdError) as exc:
                await store.submit(op, "bus", sync="files")
            assert exc.value.code == "file_invalid", exc.value
            assert CONNECTIONS in exc.value.message
        # Other files still take changes.
        await store.submit(ops.set_document("ui-config", {"x": 1}), "bus", sync="files")
        assert (data_dir / CONNECTIONS).read_bytes() == bad
        assert not (await store.ingest(CONNECTIONS))  # still invalid: reported, untouched
        assert (data_dir / CONNECTIONS).read_bytes() == bad
        # Fixed by hand: taken in, and writes work again.
        (data_dir / CONNECTIONS).write_bytes(bad.replace(b"enabeld", b"enabled"))
        assert await store.ingest(CONNECTIONS)
        assert CONNECTIONS not in store.problems
        await store.submit(ops.create(conn(2)), "bus", sync="files")
        assert sorted(by_id(data_dir)) == ["c1", "c2"]


async def test_a_record_deleted_by_hand_while_down_is_not_brought_back_by_the_replay(
    data_dir: Path,
) -> None:
    """An update journalled but not yet in the file when the daemon died, its record then
    deleted by hand before the start: the deletion is the newer edit. Replayed, the update
    brought the whole record back (and wrote it into the file)."""
    async with opened(data_dir) as store:
        for i in (1, 2):
            await store.submit(ops.create(conn(i)), "bus", sync="files")
        await store.submit(ops.set_document("algorithms/a1", {"name": "a1"}), "bus", sync="files")
    await killed_after(
        data_dir,
        ops.update("c1", {"name": "journalled only"}),
        ops.set_document("algorithms/a1", {"name": "a1", "x": 2}),
    )
    rows = [r for r in disk(data_dir, CONNECTIONS) if r["id"] != "c1"]
    (data_dir / CONNECTIONS).write_bytes(msgspec.json.encode(rows))
    (data_dir / "algorithms" / "a1.json").unlink()
    async with opened(data_dir) as store:
        assert list(store.connections) == ["c2"] and list(store.state) == ["c2"]
        assert "algorithms/a1" not in store.documents
        assert [e.action for e in store.committed.log][-2:] == ["update", "document_update"]
    assert [r["id"] for r in disk(data_dir, CONNECTIONS)] == ["c2"]
    assert not (data_dir / "algorithms" / "a1.json").exists()


async def test_a_write_that_changes_nothing_answers_the_revision_it_saw(data_dir: Path) -> None:
    """A write that changes nothing (a Save with no edits) is answered with the revision its
    answer shows, not whatever the store reached when it was sent: a later one (a change in
    the same group, after it) given back as If-Match would pass over that change (a review
    found it)."""
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus")
        start = store.revision
        same = ops.update("c1", {"name": "conn 1"})
        other = ops.update("c1", {"name": "renamed"})
        (_, noop), (_, changed) = await asyncio.gather(
            store.submit_answer(same, "http"), store.submit_answer(other, "bus")
        )
        assert (noop, changed) == (start, start + 1)
        (_, changed), (_, noop) = await asyncio.gather(
            store.submit_answer(ops.update("c1", {"name": "again"}), "bus"),
            store.submit_answer(ops.update("c1", {"name": "again"}), "http"),
        )
        assert (changed, noop) == (start + 2, start + 2)


async def test_a_placeholder_pasted_by_hand_never_replaces_the_secret_after_a_kill(
    data_dir: Path,
) -> None:
    """A masked value pasted into the file is taken in keeping the stored secret, but the
    file holds the placeholder until the round writes it back. Killed in that window, the
    start set memory back to the file's copy, kept of the paste as it was: the journal's
    take-in patched only the fields it changed, and the placeholder was stored as the
    secret (a review found it)."""
    secret = CANARY + "-secret"
    store, _ = loaded_with_copies(data_dir)
    await store.start()
    await store.submit(ops.create(conn(1, api_secret=secret)), "bus", sync="files")
    await store.close()  # (the copies written)
    async with then_killed(data_dir, copies=True) as store:
        rows = disk(data_dir, CONNECTIONS)
        rows[0].update(name="pasted", api_secret="********")
        (data_dir / CONNECTIONS).write_bytes(msgspec.json.encode(rows))
        assert await store.intake.ingest(CONNECTIONS)
        assert store.connections["c1"].api_secret == secret
    store, edited = loaded_with_copies(data_dir)
    await store.start()
    try:
        await store.take_in_edited(edited)
        assert store.connections["c1"].name == "pasted"
        assert store.connections["c1"].api_secret == secret
        await store.checkpointer.flush()
    finally:
        await store.close()
    assert disk(data_dir, CONNECTIONS)[0]["api_secret"] == secret


async def test_a_placeholder_copied_by_hand_with_a_slip_leaves_the_file_invalid(
    data_dir: Path,
) -> None:
    """`sed` putting `"******** "` (a space too many) in place of a sealed secret: not taken
    as the new secret; the file is invalid where it is, the stored secret kept."""
    box = SecretBox(parse_key(new_key_text(), "test key"))
    secret = CANARY + "-secret"
    store = Store(data_dir, box)
    store.open()
    await store.start()
    try:
        await store.submit(ops.create(conn(1, api_secret=secret)), "bus", sync="files")
        sealed = store.connections["c1"].api_secret
        assert sealed is not None and sealed.startswith("enc:")
        rows = disk(data_dir, CONNECTIONS)
        rows[0].update(name="edited", api_secret="******** ")
        (data_dir / CONNECTIONS).write_text(json.dumps(rows, indent=2) + "\n")
        assert not await store.ingest(CONNECTIONS)
        problem = store.problems[CONNECTIONS]
        assert problem.path == "$[0].api_secret" and "slip" in problem.message, problem
        assert store.connections["c1"].api_secret == sealed
        assert store.connections["c1"].name == "conn 1"  # (nothing of the edit taken)
    finally:
        await store.close()


async def test_a_connection_renamed_by_hand_is_told_its_secrets_stay_with_the_old_id(
    data_dir: Path,
) -> None:
    """Secrets are bound to the id they were encrypted for: an id changed by hand leaves them
    undecryptable. The refusal says so, naming the old id (it read "altered or cut short")."""
    box = SecretBox(parse_key(new_key_text(), "test key"))
    store = Store(data_dir, box)
    store.open()
    await store.start()
    try:
        await store.submit(ops.create(conn(4, api_key=CANARY + "-k4")), "bus", sync="files")
        rows = disk(data_dir, CONNECTIONS)
        rows[0]["id"] = "c4-bingx"
        (data_dir / CONNECTIONS).write_text(json.dumps(rows, indent=2) + "\n")
        assert not await store.ingest(CONNECTIONS)
        problem = store.problems[CONNECTIONS]
        assert problem.path == "$[0].api_key", problem
        assert "connection c4's secret" in problem.message and "renamed c4" in problem.message
        assert CANARY not in problem.message and list(store.connections) == ["c4"]
    finally:
        await store.close()


async def test_changes_waiting_for_an_invalid_file_hold_up_no_other_file(
    data_dir: Path,
) -> None:
    """A change journalled but not yet in connections.json when the daemon died, the file
    then broken by hand: the change waits in the journal for the fix, and every other file
    still gets its changes within a checkpoint (not only once that file is fixed)."""
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")
    await killed_after(data_dir, ops.update("c1", {"name": "journalled only"}))
    good = (data_dir / CONNECTIONS).read_bytes()
    broken = good[:-5]
    (data_dir / CONNECTIONS).write_bytes(broken)
    async with opened(data_dir) as store:
        assert CONNECTIONS in store.problems
        assert store.connections["c1"].name == "journalled only"
        ck = store.checkpointer
        settled = time.monotonic() + checkpoint.COALESCE_MAX_S + 0.3
        with anyio.fail_after(5):  # the rounds of the start done: nothing else wakes it
            while (
                ck.wake.is_set()
                or any(f != CONNECTIONS for f in ck.dirty)
                or (time.monotonic() < settled)
            ):
                await anyio.sleep(0.01)
        await store.submit(ops.set_document("ui-config", {"x": 1}), "bus")
        with anyio.fail_after(5):
            while disk(data_dir, "ui-config.json") != {"x": 1}:
                await anyio.sleep(0.01)
        assert (data_dir / CONNECTIONS).read_bytes() == broken
        # Fixed as it was (without the change it never got), and a field edited by hand
        # meanwhile: the journalled change is not taken back, the edit is taken in.
        fixed = json.loads(good)
        fixed[0]["exchange"] = "by hand"
        (data_dir / CONNECTIONS).write_text(json.dumps(fixed, indent=2) + "\n")
        assert await store.ingest(CONNECTIONS)
        await store.checkpointer.flush()
        c1 = by_id(data_dir)["c1"]
        assert (c1["name"], c1["exchange"]) == ("journalled only", "by hand"), c1


async def test_a_file_that_cannot_be_taken_in_now_holds_up_no_other_file(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """connections.json caught half way through an in-place save (not yet judged: no watcher
    here) while it has a change to write: it is not written over, and the other files still
    get theirs at once."""
    monkeypatch.setattr(checkpoint, "FAILED_RETRY_S", 30.0)  # only their own rounds write them
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")
        good = (data_dir / CONNECTIONS).read_bytes()
        half = good[: len(good) // 2]
        store.checkpointer.stop()  # the next change must not be written before the save
        assert store._checkpoints is not None
        await store._checkpoints
        await store.submit(ops.update("c1", {"name": "pending"}), "bus")
        (data_dir / CONNECTIONS).write_bytes(half)
        store._checkpoints = asyncio.get_running_loop().create_task(_restart(store))
        with anyio.fail_after(5):
            await store.submit(ops.set_document("ui-config", {"x": 1}), "bus", sync="files")
        assert disk(data_dir, "ui-config.json") == {"x": 1}
        # A change that nobody waits for is not held up either (not until the retry).
        await store.submit(ops.set_document("watchlists", {"y": 2}), "bus")
        with anyio.fail_after(5):
            while disk(data_dir, "watchlists.json") != {"y": 2}:
                await anyio.sleep(0.01)
        assert (data_dir / CONNECTIONS).read_bytes() == half
        (data_dir / CONNECTIONS).write_bytes(good)  # the save completes: taken in
        await store.ingest(CONNECTIONS)
        await store.checkpointer.flush()
    assert by_id(data_dir)["c1"]["name"] == "pending"


async def test_changes_carried_for_an_invalid_sync_log_keep_their_revisions_for_if_match(
    data_dir: Path,
) -> None:
    """The sync log broken by hand while a change waits to be written to it: across journal
    cuts and a restart the change is carried in the journal, and once the log is fixed an
    If-Match older than that change is still refused (its revision is known from the carried
    log, not guessed from the log's oldest event)."""
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")
        await store.submit(ops.create(conn(2)), "bus", sync="files")
        before = (data_dir / SYNC_LOG).read_bytes()
        store.checkpointer.stop()  # the next change is journalled, not yet written
        assert store._checkpoints is not None
        await store._checkpoints
        await store.submit(ops.update("c1", {"name": "later"}), "bus")
        assert store.revision == 3
        (data_dir / SYNC_LOG).write_bytes(b"[")
        assert not await store.ingest(SYNC_LOG)
        store._checkpoints = asyncio.get_running_loop().create_task(_restart(store))
        with anyio.fail_after(5):  # connections.json written, then the journal cut
            while store.checkpointer.cut < store.journal.lsn:
                await anyio.sleep(0.01)
    async with opened(data_dir) as store:
        assert SYNC_LOG in store.problems and store.connections["c1"].name == "later"
        (data_dir / SYNC_LOG).write_bytes(before)  # fixed, as it was before it broke
        assert await store.ingest(SYNC_LOG)
        with pytest.raises(CtsdError) as exc:
            await store.submit(ops.update("c1", {"name": "stale"}), "bus", if_match=2)
        assert exc.value.code == "precondition_failed", exc.value
        assert store.connections["c1"].name == "later"


async def test_a_round_leaves_a_file_just_deleted_to_the_grace_of_an_editors_save(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mv connections.json x.bak; cp x.bak connections.json` while a change waits to be
    written: a round that finds the file gone does not write it back at once (the copy would
    then land over it, and the change would pass for undone by hand); the copy is taken in
    against what the file held, so the change stays and is written on top."""
    monkeypatch.setattr(files, "DELETE_GRACE_S", 30.0)  # only the round's own retry matters
    path = data_dir / CONNECTIONS
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")
        store.checkpointer.stop()  # the next change is journalled, not yet written
        assert store._checkpoints is not None
        await store._checkpoints
        await store.submit(ops.update("c1", {"name": "pending"}), "bus")
        path.rename(data_dir / "x.bak")
        assert not await store.checkpointer.round()  # gone: left for now
        assert not path.exists()
        shutil.copyfile(data_dir / "x.bak", path)
        assert await store.checkpointer.round()
        assert by_id(data_dir)["c1"]["name"] == "pending"
        assert store.connections["c1"].name == "pending"
        store._checkpoints = asyncio.get_running_loop().create_task(_restart(store))
        await store.submit(ops.update("c1", {"name": "at the stop"}), "bus")
        path.unlink()  # deleted right before the stop: its last rounds write it back
    assert by_id(data_dir)["c1"]["name"] == "at the stop"


async def test_a_rekey_is_refused_while_a_file_of_secrets_is_invalid(data_dir: Path) -> None:
    """connections.json invalid at start (a tampered value, say): memory holds none of its
    records, so a re-key answered success and left its secrets under the old key, which a
    restart with the new one then refused. Now refused until the file is fixed."""
    old_box = SecretBox(parse_key(new_key_text(), "old"))
    new_box = SecretBox(parse_key(new_key_text(), "new"), also=(old_box.key,))
    store = Store(data_dir, old_box)
    store.open()
    await store.start()
    try:
        await store.submit(ops.create(conn(1, api_key=CANARY)), "bus", sync="files")
    finally:
        await store.close()
    good = (data_dir / CONNECTIONS).read_bytes()
    (data_dir / CONNECTIONS).write_bytes(good.replace(b"enc:v1:", b"enc:v9:", 1))
    store = Store(data_dir, old_box)
    store.open()
    await store.start()
    try:
        assert CONNECTIONS in store.problems
        with pytest.raises(CtsdError) as exc:
            await store.rekey(new_box, "cli")
        assert exc.value.code == "file_invalid" and CONNECTIONS in exc.value.message
        assert store.box is old_box
        (data_dir / CONNECTIONS).write_bytes(good)
        assert await store.ingest(CONNECTIONS)
        assert old_box.key.id.encode() in (data_dir / ".journal").read_bytes()  # (the edit)
        await store.rekey(new_box, "cli")
        assert new_box.key.id in (data_dir / CONNECTIONS).read_text()
        # The journal's records from before the re-key go from the file, not only cut away:
        # they hold values under the retired key.
        with anyio.fail_after(10):
            while old_box.key.id.encode() in (data_dir / ".journal").read_bytes():
                await anyio.sleep(0.01)
    finally:
        await store.close()


async def test_algorithms_swapped_for_a_link_is_neither_written_nor_read_through(
    data_dir: Path, tmp_path: Path
) -> None:
    """algorithms/ replaced by a symlink while the daemon runs (a start refuses one): a
    change of an algorithm was written through it, out of the data dir, and a hand edit read
    through it. Now the write fails as a refusing disk does (the change waits in the
    journal), the read is refused naming the link, and both follow once it is a directory.
    The retries (twice a second) log the fault once, and its end."""
    algo = "algorithms/Fast.json"
    with structlog.testing.capture_logs() as logs:
        async with opened(data_dir) as store:
            await _through_a_link(data_dir, tmp_path, store, algo)
    events = [e["event"] for e in logs if e["event"].startswith("checkpoint_write")]
    assert events == ["checkpoint_write_failed", "checkpoint_write_recovered"], events


async def test_a_lasting_refusal_is_logged_once_though_each_try_names_another_temp_file(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data dir made read-only (chmod 500: root passes it, so the refusal is put at the
    temp file's creation, as the kernel answers it): each retry's error named its own random
    temp file, so every retry, twice a second for every file, logged the fault anew."""
    from ctsd import atomic

    real = atomic.create_temp
    refusing = True

    def create_temp(path: Path, readable: bool = False) -> tuple[Path, int]:
        if refusing:
            name = f"{path.parent}/{TEMP_PREFIX}{path.name}.{os.urandom(4).hex()}"
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)
        return real(path, readable)

    with structlog.testing.capture_logs() as logs:
        async with opened(data_dir) as store:
            monkeypatch.setattr(atomic, "create_temp", create_temp)
            await store.submit(ops.create(conn(1)), "bus")
            failing = store.checkpointer.failing
            with anyio.fail_after(10):
                while failing.get(CONNECTIONS, ("", 0, 0))[2] < 3:  # three tries at least
                    await anyio.sleep(0.05)
            refusing = False
            await store.checkpointer.flush()
    failed = [e["file"] for e in logs if e["event"] == "checkpoint_write_failed"]
    assert sorted(failed) == sorted(set(failed)) and CONNECTIONS in failed, failed
    errors = {e["error"] for e in logs if e["event"] == "checkpoint_write_failed"}
    assert errors == {"Permission denied"}  # (the file is named beside it)


async def test_algorithms_replaced_by_a_file_deletes_no_algorithm(
    data_dir: Path, tmp_path: Path
) -> None:
    """algorithms/ moved away with a file put in its place: its algorithms are out of reach,
    not deleted by hand. A change made meanwhile waits in the journal and is written once the
    directory is back; the old files coming back do not undo it."""
    algo = "algorithms/Fast.json"
    async with opened(data_dir) as store:
        recorder = Recorder(store)
        await store.submit(ops.set_document("algorithms/Fast", {"name": "Fast", "p": 1}), "bus")
        await store.checkpointer.flush()
        elsewhere = tmp_path / "algs"
        (data_dir / "algorithms").rename(elsewhere)
        (data_dir / "algorithms").write_text("not a directory\n")
        assert not await store.ingest(algo)  # as the watcher looks
        with pytest.raises(CtsdError) as exc:  # answered as a refusing disk's write
            change = ops.set_document("algorithms/Fast", {"name": "Fast", "p": 2})
            await store.submit(change, "bus", sync="files")
        assert exc.value.code == "io_error" and "not a directory" in exc.value.message
        with anyio.fail_after(10):  # retried past the grace a deleted file gets, logged once
            while store.checkpointer.failing[algo][2] < 3:
                await anyio.sleep(0.05)
        assert not await store.ingest(algo)
        assert store.documents["algorithms/Fast"] == {"name": "Fast", "p": 2}
        (data_dir / "algorithms").unlink()
        elsewhere.rename(data_dir / "algorithms")
        assert await store.ingest(algo)
        await store.checkpointer.flush()
    assert disk(data_dir, algo) == {"name": "Fast", "p": 2}
    assert not [e for e in recorder.events if e.data.get("deleted")], recorder.events


async def _through_a_link(data_dir: Path, tmp_path: Path, store: Store, algo: str) -> None:
    await store.submit(ops.set_document("algorithms/Fast", {"name": "Fast"}), "bus", sync="files")
    before = (data_dir / algo).read_bytes()
    elsewhere = tmp_path / "elsewhere"
    (data_dir / "algorithms").rename(elsewhere)
    (data_dir / "algorithms").symlink_to(elsewhere)
    with pytest.raises(CtsdError) as exc:
        await store.submit(
            ops.set_document("algorithms/Fast", {"name": "Fast", "n": 2}), "bus", sync="files"
        )
    assert exc.value.code == "io_error" and "algorithms/ is a symlink" in exc.value.message
    with anyio.fail_after(10):
        while store.checkpointer.failing[algo][2] < 3:  # retried, logged once
            await anyio.sleep(0.05)
    assert (elsewhere / "Fast.json").read_bytes() == before
    (elsewhere / "Fast.json").write_text('{"name": "Fast", "by_hand": true}')  # through it
    assert not await store.ingest(algo)
    assert "algorithms/ is a symlink" in store.problems[algo].format()
    assert store.documents["algorithms/Fast"] == {"name": "Fast", "n": 2}  # (journalled)
    (data_dir / "algorithms").unlink()
    elsewhere.rename(data_dir / "algorithms")
    assert await store.ingest(algo)
    await store.checkpointer.flush()
    assert disk(data_dir, algo) == {"name": "Fast", "n": 2, "by_hand": True}


async def test_a_file_gone_while_the_watcher_looks_gets_the_grace_of_an_editors_save(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mv connections.json x.bak` right as the watcher starts looking at the file, then a
    bus change, then `cp x.bak connections.json`: the watcher found the file gone after its
    first check and wrote it back once it had settled (50 ms), not after the deletion's
    grace; the copy then landed over the written-back file and the bus change passed for
    undone by hand. Now a file gone as it is looked at gets the grace like any deletion."""
    from ctsd import watch

    monkeypatch.setattr(files, "DELETE_GRACE_S", 5.0)  # the copy comes well within it
    path = data_dir / CONNECTIONS
    real = watch._stat_key
    moved = False

    def then_moved(p: Path) -> tuple[int, int, int] | None:  # the editor moves in after it
        nonlocal moved
        key = real(p)
        if p == path and not moved:
            moved = True
            path.rename(data_dir / "x.bak")
        return key

    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")
        monkeypatch.setattr(watch, "_stat_key", then_moved)
        watcher = watch.Watcher(store)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher.handle, CONNECTIONS)
            with anyio.fail_after(5):
                while not moved:
                    await anyio.sleep(0.005)
            await store.submit(ops.update("c1", {"name": "pending"}), "bus")
            with anyio.move_on_after(0.5):  # the write-back of old came after ~50 ms
                while not path.exists():
                    await anyio.sleep(0.005)
            shutil.copyfile(data_dir / "x.bak", path)
            await store.ingest(CONNECTIONS)  # as the watcher does on the copy's event
        assert store.connections["c1"].name == "pending"
        await store.checkpointer.flush()
    assert by_id(data_dir)["c1"]["name"] == "pending"


async def test_an_invalid_file_with_changes_waiting_deleted_is_written_back_at_once(
    data_dir: Path,
) -> None:
    """connection-state.json invalid (a loose mode) while a hand edit of connections.json
    gives it a record to hold; then deleted: it is written back from memory at once, not
    whenever some later change happens to wake the writer (a kill meanwhile lost it)."""
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")
        state = data_dir / STATE
        state.chmod(0o644)
        assert not await store.ingest(STATE)
        assert STATE in store.problems
        (data_dir / CONNECTIONS).write_text(json.dumps([*disk(data_dir, CONNECTIONS), conn(2)]))
        assert await store.ingest(CONNECTIONS)
        assert "c2" in store.state
        await store.submit(ops.set_document("ui-config", {"zoom": 2}), "bus", sync="files")
        deadline = time.monotonic() + 5
        while store.checkpointer.wake.is_set():  # its rounds done: nothing else wakes it
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        state.unlink()
        assert await store.ingest(STATE)
        deadline = time.monotonic() + 3
        while not state.exists():
            assert time.monotonic() < deadline, "not written back"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)
        assert set(by_id(data_dir, STATE)) == {"c1", "c2"}


@pytest.mark.parametrize("emptied", [False, True])
async def test_a_sync_log_invalid_at_start_never_gives_an_id_out_twice(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, emptied: bool
) -> None:
    """The sync log broken while the daemon was down: the revision goes on from the files'
    (the journal's last cut), so a hand edit taken in meanwhile gets a new id; once the log
    is fixed, it holds what the file had and that event on top, none lost or given twice.
    `emptied`: each cut takes the journal back to its header (a long run does so)."""
    if emptied:
        monkeypatch.setattr(journal, "EMPTY_CUT_BELOW", 0)
    async with opened(data_dir) as store:
        for i in (1, 2, 3):
            await store.submit(ops.create(conn(i)), "bus", sync="files")
    good = (data_dir / SYNC_LOG).read_bytes()
    (data_dir / SYNC_LOG).write_bytes(good[:-3])
    async with opened(data_dir) as store:
        assert SYNC_LOG in store.problems and store.revision == 3
        (data_dir / "watchlists.json").write_text('{"main": ["ES"]}\n')
        assert await store.ingest("watchlists.json")
        assert [e.id for e in store.log] == [4]
        (data_dir / SYNC_LOG).write_bytes(good)  # fixed as it was
        assert await store.ingest(SYNC_LOG)
        await store.checkpointer.flush()
        assert [e.id for e in store.log] == [1, 2, 3, 4, 5]
        assert [e["id"] for e in disk(data_dir, SYNC_LOG)] == [1, 2, 3, 4, 5]


def test_files_written_one_by_one_keep_their_stamps_past_one_saved_by_hand(
    tmp_path: Path,
) -> None:
    """The group write failed (one file's name is too long for the filesystem), so each
    file is written alone; one of them was saved by hand meanwhile. The files written before
    it keep their stamps (else the daemon's own write would come back as a hand edit), the
    saved one is left for the round to take in, the broken one is reported."""
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / f"{'c' * 300}.json"
    b.write_bytes(b"{}\n")
    before = stamp_of(b)
    b.write_bytes(b'{"by": "hand"}\n')
    jobs = [(a, b"[]\n"), (b, b"[1]\n"), (c, b"[]\n")]
    stamps, failed, _ = checkpoint._render_and_write(
        lambda: None, jobs, {b: before}, [], None, [], False, [], 0, tmp_path
    )
    assert set(stamps) == {a} and stamps[a] == stamp_of(a) and a.read_bytes() == b"[]\n"
    assert set(failed) == {c}
    assert b.read_bytes() == b'{"by": "hand"}\n'


async def test_a_file_put_back_by_hand_as_it_is_written_back_is_no_busy_loop(
    data_dir: Path,
) -> None:
    """A deleted file about to be written back from memory is put back by hand first (`cp
    backup/x.json .`): the round cannot create it, and gives up for now; it tries again a
    little later (the watcher takes the copy in meanwhile), not at once, round after round
    of fsync'd writes and warnings."""
    path = data_dir / "ui-config.json"
    async with opened(data_dir) as store:
        await store.submit(ops.set_document("ui-config", {"zoom": 1}), "bus", sync="files")
        store.checkpointer.stop()
        assert store._checkpoints is not None
        await store._checkpoints
        saved = path.read_bytes()
        path.unlink()
        assert await store.ingest("ui-config.json")  # deleted: to be written back
        path.write_bytes(saved)
        path.chmod(0o600)
        store.checkpointer.wake.clear()
        assert not await store.checkpointer.round()
        assert not store.checkpointer.wake.is_set()  # later, not at once
        store._checkpoints = asyncio.get_running_loop().create_task(_restart(store))
        assert await store.ingest("ui-config.json")  # (the watcher's take-in)
        await store.submit(ops.set_document("ui-config", {"zoom": 2}), "bus", sync="files")
        assert json.loads(path.read_text()) == {"zoom": 2}


async def _restart(store: Store) -> None:
    store.checkpointer.stopping = False
    store.checkpointer.wake.set()
    await store.checkpointer.run()


async def test_a_fixed_file_of_a_document_memory_no_longer_has_is_taken_whole(
    data_dir: Path,
) -> None:
    """An algorithm file broken by hand, the algorithm then removed (another host's hand
    deletion, applied here), the file fixed: the fix is the algorithm again, whole, not
    only the keys it changed against the version before."""
    algo = "algorithms/a.json"
    async with opened(data_dir) as store:
        content = {"name": "a", "x": 1, "y": 2}
        await store.submit(ops.set_document("algorithms/a", content), "bus", sync="files")
        (data_dir / algo).write_bytes(b'{"name": "a", "x": ')
        assert not await store.ingest(algo)
        assert algo in store.problems
        store.install(Change(documents=[RecordChange("algorithms/a")]), store.journal.lsn)
        (data_dir / algo).write_text(json.dumps({"name": "a", "x": 1, "y": 3}))
        assert await store.ingest(algo)
        assert store.documents["algorithms/a"] == {"name": "a", "x": 1, "y": 3}


async def test_missing_dir_and_files_are_created(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "b"
    async with opened(data_dir) as store:
        assert store.problems == {}
    assert disk(data_dir, CONNECTIONS) == [] and disk(data_dir, "instances.json") == {
        "instances": [],
        "lastSaved": None,
    }
    assert os.path.isdir(data_dir / "algorithms")


async def test_state_survives_connections_invalid_at_start(data_dir: Path) -> None:
    # State (volume factors, test results) must not be "mirrored away" while connections.json
    # cannot be read; fixing the file brings the connections back with their state intact.
    data_dir.mkdir(mode=0o700)
    good = msgspec.json.format(msgspec.json.encode([conn(1, is_active=True)]), indent=2) + b"\n"
    (data_dir / CONNECTIONS).write_bytes(good.replace(b'"c1"', b'"c1",,'))
    state = [{"connection_id": "c1", "is_active": True, "volume_factor_live": 2.5,
              "volume_factor_preset": 3.5}]  # fmt: skip
    (data_dir / STATE).write_bytes(msgspec.json.format(msgspec.json.encode(state), indent=2))
    async with opened(data_dir) as store:
        assert CONNECTIONS in store.problems
        assert store.state["c1"].volume_factor_live == 2.5
        (data_dir / CONNECTIONS).write_bytes(good)
        assert await store.ingest(CONNECTIONS)
        st = store.state_view("c1")
        assert st is not None and (st.volume_factor_live, st.volume_factor_preset) == (2.5, 3.5)
        await store.submit(ops.set_active("c1", False), "bus", sync="files")
    assert by_id(data_dir, STATE)["c1"]["volume_factor_preset"] == 3.5


async def test_a_large_hand_edit_is_decoded_off_the_loop_and_taken_in(data_dir: Path) -> None:
    """Megabytes of JSON are decoded on a thread (the loop serves meanwhile): taken in all
    the same, connections.json's records and a document."""
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")
        big = {"layout": ["x" * 1000] * 2000}  # 2 MB
        (data_dir / "ui-config.json").write_text(json.dumps(big))
        assert await store.ingest("ui-config.json")
        assert store.documents["ui-config"] == big
        many = [conn(i, connection_settings=json.dumps({"n": "y" * 600})) for i in range(2000)]
        (data_dir / CONNECTIONS).write_text(json.dumps(many))
        assert (data_dir / CONNECTIONS).stat().st_size > intake.DECODE_ON_THREAD_BYTES
        assert await store.ingest(CONNECTIONS)
        assert len(store.connections) == 2000 and store.log[-1].data["source"] == "file"


async def test_a_chmod_while_a_hand_edit_goes_through_the_door_is_seen(data_dir: Path) -> None:
    """The file was read private; a chmod lands before the edit is recorded (its journal
    append under way): the mode seen with the bytes is what is recorded, so the file is
    judged again, and refused as readable by others (it passed for unchanged: never
    reported while others could read it)."""
    path = data_dir / "watchlists.json"
    async with opened(data_dir) as store:
        path.write_text('{"es": ["ESZ6"]}')
        path.chmod(0o600)
        door = store.submit_take_in

        async def chmod_meanwhile(op: Any, file: str) -> Any:
            path.chmod(0o644)
            return await door(op, file)

        store.submit_take_in = chmod_meanwhile  # type: ignore[method-assign]
        assert await store.ingest("watchlists.json")
        store.submit_take_in = door  # type: ignore[method-assign]
        assert store.documents["watchlists"] == {"es": ["ESZ6"]}
        assert not store.unchanged("watchlists.json")
        assert not await store.ingest("watchlists.json")
        assert "watchlists.json" in store.problems, store.problems


async def test_state_hand_edit_cannot_contradict_connections(data_dir: Path) -> None:
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")  # not active
        await store.submit(ops.set_volume("c1", 2.0), "bus", sync="files")
        rows = disk(data_dir, STATE)
        rows[0].update(is_active=True, status="active", volume_factor_preset=4.0)
        (data_dir / STATE).write_bytes(msgspec.json.encode(rows))
        with structlog.testing.capture_logs() as logs:
            assert await store.ingest(STATE)
        st = store.state["c1"]
        assert (st.is_active, st.status, st.volume_factor_preset) == (False, "inactive", 4.0)
        # ... and the admin is told which edit was not kept, and where to make it
        (told,) = [e for e in logs if e["event"] == "state_is_active_not_kept"]
        assert told["connections"] == ["c1"] and CONNECTIONS in told["why"]
        (told,) = [e for e in logs if e["event"] == "state_status_not_kept"]
        assert told["connections"] == ["c1"] and "heartbeats" in told["why"]
        # `status` alone, on a connection that is not live: not kept, said so
        rows = disk(data_dir, STATE)
        rows[0].update(status="stale")
        (data_dir / STATE).write_bytes(msgspec.json.encode(rows))
        with structlog.testing.capture_logs() as logs:
            assert await store.ingest(STATE)
        assert store.state["c1"].status == "inactive"
        assert [e["event"] for e in logs if e["event"].startswith("state_")] == [
            "state_status_not_kept"
        ]


async def test_is_active_put_back_is_logged_for_a_state_file_invalid_since_the_start(
    data_dir: Path,
) -> None:
    """With no version of the file read since the start, whatever it holds is the edit: a
    record it lacks too."""
    async with opened(data_dir) as store:
        for i in (1, 2):
            await store.submit(ops.create(conn(i)), "bus", sync="files")  # not active
    rows = disk(data_dir, STATE)[:1]  # (c2's left out)
    (data_dir / STATE).write_text("[ this is not json")
    async with opened(data_dir) as store:
        assert STATE in store.problems
        rows[0].update(is_active=True, status="active", volume_factor_preset=4.0)
        (data_dir / STATE).write_bytes(msgspec.json.encode(rows))
        with structlog.testing.capture_logs() as logs:
            assert await store.ingest(STATE)
        assert (store.state["c1"].is_active, store.state["c1"].volume_factor_preset) == (
            False,
            4.0,
        )
        assert [e for e in logs if e["event"] == "state_is_active_not_kept"]
        (back,) = [e for e in logs if e["event"] == "state_record_put_back"]
        assert back["connections"] == ["c2"] and "c2" in store.state


async def test_a_state_edit_of_another_field_logs_no_is_active_put_back(data_dir: Path) -> None:
    """Memory ahead of the file (an activation not written yet) is no edit of is_active."""
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")
        store.checkpointer.stop()  # what follows stays in memory
        await store.submit(ops.set_active("c1", True), "bus")
        rows = disk(data_dir, STATE)
        rows[0].update(volume_factor_preset=4.0)
        (data_dir / STATE).write_bytes(msgspec.json.encode(rows))
        with structlog.testing.capture_logs() as logs:
            assert await store.ingest(STATE)
        assert store.state["c1"].volume_factor_preset == 4.0
        assert not [e for e in logs if e["event"] == "state_is_active_not_kept"]


async def test_a_state_record_removed_by_hand_is_written_back(data_dir: Path) -> None:
    """Every connection has its state record: one removed by hand from the file is put back
    there (logged), not kept in memory alone, so a restart still has its volumes."""
    async with opened(data_dir) as store:
        for i in (1, 2):
            await store.submit(ops.create(conn(i)), "bus", sync="files")
        await store.submit(ops.set_volume("c1", live=9, preset=4), "bus", sync="files")
        rows = [r for r in disk(data_dir, STATE) if r["connection_id"] != "c1"]
        (data_dir / STATE).write_bytes(msgspec.json.encode(rows))
        with structlog.testing.capture_logs() as logs:
            assert await store.ingest(STATE)
        (back,) = [e for e in logs if e["event"] == "state_record_put_back"]
        assert back["connections"] == ["c1"]
        await store.checkpointer.flush()
        assert by_id(data_dir, STATE)["c1"]["volume_factor_live"] == 9
        # A connection whose record the file has not received yet: no removal, not said so
        store.checkpointer.stop()  # (what follows stays in memory)
        await store.submit(ops.create(conn(3)), "bus")
        rows = disk(data_dir, STATE)
        rows[-1].update(volume_factor_preset=3.0)  # (c2's)
        (data_dir / STATE).write_bytes(msgspec.json.encode(rows))
        with structlog.testing.capture_logs() as logs:
            assert await store.ingest(STATE)
        assert store.state["c2"].volume_factor_preset == 3.0 and "c3" in store.state
        assert not [e for e in logs if e["event"] == "state_record_put_back"], logs
    async with opened(data_dir) as store:
        assert store.state["c1"].volume_factor_live == 9
        assert store.state["c1"].volume_factor_preset == 4


async def test_a_backup_copied_over_a_running_daemon_keeps_its_history_and_its_writes(
    data_dir: Path, tmp_path: Path
) -> None:
    """`cp backup/*.json DATA/`: the backup's older sync log is no trim of the history; it is
    written back whole (logged), not left invalid (which held every change after it), and
    the other files are taken in as the edits they are."""
    backup = tmp_path / "backup"
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")
        backup.mkdir()
        for p in data_dir.glob("*.json"):
            (backup / p.name).write_bytes(p.read_bytes())
        await store.submit(ops.create(conn(2)), "bus", sync="files")
        for p in sorted(backup.glob("*.json")):  # (as cp copies them: by name)
            (data_dir / p.name).write_bytes(p.read_bytes())
        with structlog.testing.capture_logs() as logs:
            for file in (STATE, SYNC_LOG, CONNECTIONS):
                assert await store.ingest(file), file
        (kept,) = [e for e in logs if e["event"] == "sync_log_edit_not_kept"]
        assert "after id 1, up to 2" in kept["why"], kept
        taken = [e["file"] for e in logs if e["event"] == "hand_edit_taken_in"]
        assert SYNC_LOG not in taken, taken
        assert SYNC_LOG not in store.problems and sorted(store.connections) == ["c1"]
        await store.submit(ops.create(conn(3)), "bus", sync="files")
        log = disk(data_dir, SYNC_LOG)
        assert [(e["id"], e["action"], e["connection_id"]) for e in log] == [
            (1, "create", "c1"),
            (2, "create", "c2"),
            (3, "delete", "c2"),
            (4, "create", "c3"),
        ]


@pytest.mark.parametrize("limit", [1000, 3])
async def test_a_sync_log_put_back_then_a_kill_before_the_write_keeps_the_history(
    data_dir: Path, limit: int
) -> None:
    """The put-back is journalled as the history it keeps: killed before the round wrote it
    (and after another change, journalled only), the next start replays it onto the older
    log on disk, which reads as a log edited by hand, not as another dir's. `limit` 3: memory
    trimmed past the older log's first entries (a backup's) since."""
    write_settings(data_dir, {"sync_log_limit": limit})
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")
        older = (data_dir / SYNC_LOG).read_bytes()
        for i in (2, 3, 4):
            await store.submit(ops.create(conn(i)), "bus", sync="files")
        kept = [e.id for e in store.log]
    async with then_killed(data_dir) as store:
        (data_dir / SYNC_LOG).write_bytes(older)
        assert await store.ingest(SYNC_LOG)
        assert [e.id for e in store.log] == kept
        await store.submit(ops.create(conn(5)), "bus")  # (in the journal alone)
    assert (data_dir / SYNC_LOG).read_bytes() == older  # (the round never came)
    async with opened(data_dir) as store:
        assert [e.id for e in store.log] == [*kept, 5][-min(limit, 5) :]
        assert store.revision == 5 and "c5" in store.connections
    assert [e["id"] for e in disk(data_dir, SYNC_LOG)] == [*kept, 5][-min(limit, 5) :]


async def test_sync_log_emptied_by_hand_keeps_the_revision(data_dir: Path) -> None:
    async with opened(data_dir) as store:
        for i in range(3):
            await store.submit(ops.create(conn(i)), "bus", sync="files")
        assert store.revision == 3
        (data_dir / SYNC_LOG).write_bytes(b"[]\n")
        assert await store.ingest(SYNC_LOG)
        assert [(e.id, e.action, e.data["file"]) for e in store.log] == [
            (4, "document_update", SYNC_LOG)
        ]
        assert await store.ingest(SYNC_LOG, force=True)  # as SIGHUP: nothing new, no event
        assert store.revision == 4
    assert [e["id"] for e in disk(data_dir, SYNC_LOG)] == [4]
    async with opened(data_dir) as store:
        assert store.revision == 4
        await store.submit(ops.create(conn(9)), "bus", sync="files")
        assert store.revision == 5


async def test_entries_removed_from_the_middle_while_stopped_make_a_resume_before_them_refused(
    data_dir: Path,
) -> None:
    """The sync log has no copy, so entries removed from its middle while the daemon was
    stopped cannot be put back: a resume from before the gap is refused (the bot takes a
    snapshot) rather than handed the history with a change missing, and the records whose
    last event sits before it are not vouched for by If-Match."""
    async with opened(data_dir) as store:
        for i in range(1, 5):
            await store.submit(ops.create(conn(i)), "bus", sync="files")
    log = disk(data_dir, SYNC_LOG)
    (data_dir / SYNC_LOG).write_text(json.dumps([log[0], *log[2:]]))  # id 2 gone
    with structlog.testing.capture_logs() as logs:
        async with opened(data_dir) as store:
            (gap,) = [e for e in logs if e["event"] == "sync_log_gap"]
            assert gap["oldest_resumable"] == 3, gap
            assert store.oldest_revision() == 3
            with pytest.raises(CtsdError) as refused:
                views.check_since(store, 1)
            assert refused.value.code == "revision_compacted" and refused.value.extra == {
                "oldest": 3
            }
            views.check_since(store, 2)
            assert [e.id for e in store.events_since(2)] == [3, 4]
            assert store.committed.revision_of("c:c1") == 2  # (its event 1 is before the gap)
            assert store.committed.revision_of("c:c4") == 4
            await store.submit(ops.create(conn(5)), "bus", sync="files")
            assert store.oldest_revision() == 3
    assert [e["id"] for e in disk(data_dir, SYNC_LOG)] == [1, 3, 4, 5]  # as the operator left it


async def test_sync_log_entries_of_an_older_ctsd_holding_a_secret_are_masked_at_start(
    data_dir: Path,
) -> None:
    """An older ctsd did not mask a URL's secret query value in events (`?api_key=`): its
    entries are masked at the next start and the file written again (ids and the rest kept);
    a log with nothing to mask is left as it is."""
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")
        await store.submit(ops.create(conn(2)), "bus", sync="files")
    log = disk(data_dir, SYNC_LOG)
    log[1]["data"]["name"] = "https://h/x?api_key=OLD-SECRET-99"  # as an older ctsd wrote it
    (data_dir / SYNC_LOG).write_text(json.dumps(log, indent=2) + "\n")
    with structlog.testing.capture_logs() as logs:
        async with opened(data_dir) as store:
            await store.checkpointer.flush()
            (masked,) = [e for e in logs if e["event"] == "sync_log_secrets_masked"]
            assert masked["entries"] == 1
    text = (data_dir / SYNC_LOG).read_text()
    assert "OLD-SECRET-99" not in text and "api_key=********" in text
    assert store.committed.log_bytes == sum(core.event_bytes(e) for e in store.committed.log)
    assert [e["id"] for e in json.loads(text)] == [1, 2]
    assert json.loads(text)[0] == log[0]
    before = (data_dir / SYNC_LOG).stat().st_mtime_ns
    with structlog.testing.capture_logs() as logs:
        async with opened(data_dir):
            pass
    assert not [e for e in logs if e["event"] == "sync_log_secrets_masked"]
    assert (data_dir / SYNC_LOG).stat().st_mtime_ns == before


async def test_the_newest_entries_removed_while_stopped_make_a_resume_before_them_refused(
    data_dir: Path,
) -> None:
    """The newest entries removed by hand while stopped: the revision goes on from the
    journal's, and a resume from the log's last id would miss the changes removed (their ids
    are not given again); refused, as for a gap."""
    async with opened(data_dir) as store:
        for i in range(1, 5):
            await store.submit(ops.create(conn(i)), "bus", sync="files")
    log = disk(data_dir, SYNC_LOG)
    (data_dir / SYNC_LOG).write_text(json.dumps(log[:2]))  # 3 and 4 gone
    with structlog.testing.capture_logs() as logs:
        async with opened(data_dir) as store:
            assert [e["oldest_resumable"] for e in logs if e["event"] == "sync_log_gap"] == [5]
            assert store.revision == 4 and store.oldest_revision() == 5
            with pytest.raises(CtsdError, match="not all kept"):
                views.check_since(store, 2)
            views.check_since(store, 4)
            assert store.committed.revision_of("c:c1") == 4
            await store.submit(ops.create(conn(5)), "bus", sync="files")
            assert store.oldest_revision() == 5 and [e.id for e in store.events_since(4)] == [5]


async def test_a_restore_of_an_older_archive_leaves_a_gap_it_explains(
    data_dir: Path, tmp_path: Path
) -> None:
    """`ctsd restore` of an older archive (while stopped) puts one `import` event past the
    revision given out: a gap on purpose, not reported as an edit."""
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")
        archive = {p.name: p.read_bytes() for p in data_dir.glob("*.json")}
        for i in (2, 3):
            await store.submit(ops.create(conn(i)), "bus", sync="files")
    contents = backup._going_on(archive, 3, 1)
    for name, raw in contents.items():
        (data_dir / name).write_bytes(raw)
    (data_dir / journal.NAME).unlink()
    with structlog.testing.capture_logs() as logs:
        async with opened(data_dir) as store:
            assert [e.id for e in store.log] == [1, 4] and store.oldest_revision() == 4
    assert not [e for e in logs if e["event"] == "sync_log_gap"]


def test_a_gap_in_the_log_is_forgotten_once_trimmed_past() -> None:
    c = Committed()

    def ev(i: int) -> SyncEvent:
        return SyncEvent(
            id=i,
            action="create",
            connection_id=f"c{i}",
            data={},
            created_at="2026-01-01T00:00:00.000Z",
        )

    c.load_log([ev(i) for i in (1, 2, 5, 6)])
    assert (c.whole_from, c.oldest_revision()) == (5, 5)
    c.settings.sync_log_limit = 2
    c.apply(Change(events=[ev(7)]))
    assert [e.id for e in c.log] == [6, 7] and c.oldest_revision() == 6
    c.apply(Change(events=[ev(9)]))  # (a gap)
    assert c.oldest_revision() == 9


async def test_origins_only_in_the_seeds_connection_json_are_named(data_dir: Path) -> None:
    """Seed 003 keeps browser origins in connection.json; ctsd reads settings.json's. One
    listed only there is named at start and when either file changes, not let in."""
    async with opened(data_dir) as store:
        doc = dict(store.documents["connection"])
        doc["server"] = {**doc.get("server", {}), "corsOrigins": ["http://localhost:3000"]}
        with structlog.testing.capture_logs() as logs:
            await store.submit(ops.set_document("connection", doc), "http", sync="files")
        (named,) = [e for e in logs if e["event"] == "cors_origins_not_read"]
        assert named["origins"] == ["http://localhost:3000"], named
        assert "http://localhost:3000" not in store.settings.server.cors_origins
        with structlog.testing.capture_logs() as logs:
            cors = {"cors_origins": ["http://localhost:3000/"]}
            await store.submit(ops.set_document("settings", {"server": cors}), "http")
        assert not [e for e in logs if e["event"] == "cors_origins_not_read"]


@pytest.mark.parametrize("huge", [2**53, 10**400])
async def test_a_sync_log_id_past_what_clients_can_hold_is_invalid_at_start(
    data_dir: Path, huge: int
) -> None:
    """Ids are revisions every client must hold exactly (a dashboard's JavaScript number): a
    file written by hand while the daemon was stopped with one past 2**53 - 1 is invalid,
    left as written, and the daemon goes on writing (revisions too long for If-Match, the
    metrics' floats and the journal's encoder broke every write)."""
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")
    log = disk(data_dir, SYNC_LOG)
    edited = json.dumps([*log, {**log[-1], "id": huge}]).encode()
    (data_dir / SYNC_LOG).write_bytes(edited)
    async with opened(data_dir) as store:
        problem = store.problems[SYNC_LOG].format()
        assert "$[1].id" in problem and "9007199254740991" in problem, problem
        with pytest.raises(CtsdError, match=r"sync-log\.json is invalid on disk"):
            await store.submit(ops.create(conn(2)), "bus")
        assert (data_dir / SYNC_LOG).read_bytes() == edited
        (data_dir / SYNC_LOG).write_bytes(json.dumps(log).encode())  # fixed
        assert await store.ingest(SYNC_LOG)
        await store.submit(ops.create(conn(2)), "bus")
        assert [e.id for e in store.log] == [1, 2, 3]  # (2: the fix taken in)


async def test_sync_log_emptied_after_a_kill_replays_the_journal_and_keeps_the_revision(
    data_dir: Path,
) -> None:
    """Emptied while the daemon was down after a kill -9 that left an acknowledged change in
    the journal alone: the change is replayed and the revision goes on (the start was refused
    as for another data dir's journal, and moving it aside lost the change and gave its ids
    out again). A sync log that is missing (the files removed) is no such edit: refused."""
    async with opened(data_dir) as store:
        for i in range(2):
            await store.submit(ops.create(conn(i)), "bus", sync="files")
    await killed_after(data_dir, ops.create(conn(2)))
    (data_dir / SYNC_LOG).write_bytes(b"[]\n")
    async with opened(data_dir) as store:
        assert sorted(store.connections) == ["c0", "c1", "c2"] and store.revision == 3
        await store.submit(ops.create(conn(3)), "bus", sync="files")
        assert [(e.id, e.connection_id) for e in store.log] == [(3, "c2"), (4, "c3")]
    await killed_after(data_dir, ops.create(conn(4)))
    (data_dir / SYNC_LOG).unlink()
    for _ in range(2):  # (and again: the refused start left no log of its making behind)
        store = Store(data_dir)
        with pytest.raises(CtsdError, match="belongs to other files"):
            store.open()
        store.journal.close()
        assert not (data_dir / SYNC_LOG).exists()


async def test_algorithm_file_deleted_by_hand(data_dir: Path) -> None:
    # An unused algorithm is removed (and logged); one that instances.json names comes back.
    algos = data_dir / "algorithms"
    async with opened(data_dir) as store:
        for name in ("Used", "Unused"):
            await store.submit(
                ops.set_document(f"algorithms/{name}", {"name": name}), "bus", sync="files"
            )
        instance = {"id": "i1", "name": "NQ", "symbol": "NQ", "algorithmName": "Used"}
        await store.submit(
            ops.set_document("instances", {"instances": [instance]}), "bus", sync="files"
        )
        rec = Recorder(store)
        (algos / "Unused.json").unlink()
        (algos / "Used.json").unlink()
        assert await store.ingest("algorithms/Unused.json")
        assert await store.ingest("algorithms/Used.json")
        assert "algorithms/Unused" not in store.documents
        assert [(e.action, e.data["file"], e.data.get("deleted")) for e in rec.events] == [
            ("document_update", "algorithms/Unused.json", True)
        ]
    assert not (algos / "Unused.json").exists()
    assert msgspec.json.decode((algos / "Used.json").read_bytes()) == {"name": "Used"}


@pytest.mark.parametrize("mode", ["replace", "merge"])
async def test_import_refuses_duplicate_ids_in_either_mode(data_dir: Path, mode: str) -> None:
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")
        data = {"files": {CONNECTIONS: [conn(2), conn(3), conn(2, name="again")]}}
        with pytest.raises(CtsdError) as e:
            await store.submit(ops.import_data(data, mode), "bus", sync="files")
        assert e.value.code == "invalid" and e.value.path == f"$.data.files.{CONNECTIONS}[2]"
        assert list(store.connections) == ["c1"]


async def test_sighup_keeps_an_algorithm_whose_file_is_not_written_yet(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Set through the door, its file still to come (a round coalescing, or a disk refusing
    writes): a reload of every file (SIGHUP) takes the missing file for no deletion."""
    monkeypatch.setattr(checkpoint, "COALESCE_S", 1.0)
    monkeypatch.setattr(checkpoint, "COALESCE_MAX_S", 1.0)
    async with opened(data_dir) as store:
        await store.submit(ops.set_document("algorithms/Fresh", {"name": "Fresh"}), "bus")
        assert not (data_dir / "algorithms" / "Fresh.json").exists()
        await store.intake.reload_all()
        assert "algorithms/Fresh" in store.committed.documents
    assert (data_dir / "algorithms" / "Fresh.json").exists()  # written at close


@contextlib.asynccontextmanager
async def restarted(data_dir: Path) -> AsyncIterator[Store]:
    """The store started again on `data_dir` as the daemon starts (its copies judged, the
    files edited while down taken in)."""
    store, edited = loaded_with_copies(data_dir)
    await store.start()
    try:
        await store.take_in_edited(edited)
        yield store
    finally:
        await store.close()


async def _crash_while_keeping_the_copy(
    store: Store, file: str, body: dict[str, Any], later: Any, crashed: Path
) -> None:
    """`body` saved to `file` by hand and taken in; the power goes while its copy is being
    kept (`Intake._keep_copy`), after `later()` ran: `crashed` is what the disk holds."""
    release = threading.Event()
    keep = store.intake.keep_copy
    assert keep is not None

    def keep_late(f: str, raw: bytes) -> None:
        if f == file:
            release.wait(10)
            shutil.copytree(store.data_dir, crashed)
        keep(f, raw)

    store.intake.keep_copy = keep_late
    rev = store.revision
    (store.data_dir / file).write_text(json.dumps(body, indent=2) + "\n")
    ingest = asyncio.create_task(store.ingest(file))
    with anyio.fail_after(10):
        while store.revision == rev:  # the hand edit journalled and published
            await asyncio.sleep(0.001)
    await later()
    release.set()
    await ingest


@pytest.mark.parametrize("name", ["main-indications", "algorithms/X"])
async def test_a_hand_edit_taken_in_before_a_crash_is_not_taken_in_again_over_later_changes(
    tmp_path: Path, name: str
) -> None:
    """Killed between a hand edit's journal append and its copy, with a later change of the
    same key acknowledged in between: the next start took the file in again against the old
    copy (or, for an algorithm added by hand, no copy), as an edit made while down; the edit
    won over the acknowledged change (lost) and was logged twice. The journal now knows the
    bytes it took in and the copy it took them against: the file is loaded as it is, the
    change replays on top."""
    data_dir, crashed = tmp_path / "data", tmp_path / "crashed"
    file = files.document_file(name)
    store, _ = loaded_with_copies(data_dir)
    await store.start()
    try:
        await store.submit(ops.set_document("ui-config", {"x": 1}), "bus", sync="files")
        if not name.startswith("algorithms/"):
            await store.submit(ops.set_document(name, {"a": 1, "name": "X"}), "bus", sync="files")

        async def acknowledged() -> None:
            await store.submit(ops.set_document(name, {"a": 3, "name": "X"}), "bus")

        await _crash_while_keeping_the_copy(
            store, file, {"a": 2, "name": "X"}, acknowledged, crashed
        )
        events = [e.id for e in store.log]
    finally:
        await store.close()
    async with restarted(crashed) as again:
        assert again.documents[name] == {"a": 3, "name": "X"}
        assert [e.id for e in again.log] == events  # the hand edit logged once
        await again.checkpointer.flush()
        assert json.loads((crashed / file).read_text()) == {"a": 3, "name": "X"}


async def test_a_hand_edit_whose_placeholders_were_put_back_is_taken_in_again_after_a_crash(
    tmp_path: Path,
) -> None:
    """Masked values pasted back (an export's) are replaced by the stored secrets, so memory
    is not the file: after a kill before the round rewrote it, the file must be taken in
    again against its copy (the secrets put back once more), never loaded as it is."""
    data_dir, crashed = tmp_path / "data", tmp_path / "crashed"
    settings = json.dumps({"password": "hunter2", "url": "https://me:pw9@host/x"})
    store, _ = loaded_with_copies(data_dir)
    await store.start()
    try:
        await store.submit(ops.create(conn(1, connection_settings=settings)), "bus", sync="files")
        await store.checkpointer.flush()
        store.checkpointer.stop()  # the kill comes before the next round
        assert store._checkpoints is not None
        await store._checkpoints
        rows = json.loads((data_dir / CONNECTIONS).read_bytes())
        rows[0]["name"] = "renamed"
        rows[0]["connection_settings"] = json.dumps(
            {"password": "********", "url": "https://me:********@host/x"}
        )
        (data_dir / CONNECTIONS).write_text(json.dumps(rows, indent=2) + "\n")
        assert await store.ingest(CONNECTIONS)
        assert store.connections["c1"].connection_settings == settings
        shutil.copytree(data_dir, crashed)
    finally:
        await store.close()
    async with restarted(crashed) as again:
        assert again.connections["c1"].name == "renamed"
        assert again.connections["c1"].connection_settings == settings


async def test_a_hand_edit_put_back_while_down_is_taken_in_though_the_journal_took_it_before(
    tmp_path: Path,
) -> None:
    """The journal still holds an old take-in of the same bytes (its cut held back, by a
    file whose write keeps failing, say) whose copy was kept and since moved on: bytes alone
    would pass the operator's `git checkout` of that version for no edit, and drop it."""
    data_dir, crashed = tmp_path / "data", tmp_path / "crashed"
    name, file = "main-indications", "main-indications.json"
    store, _ = loaded_with_copies(data_dir)
    await store.start()
    try:
        await store.submit(ops.set_document(name, {"a": 1}), "bus", sync="files")

        async def no_cut(*_args: Any, **_kw: Any) -> None:
            pass

        store.checkpointer.compact = no_cut  # type: ignore[method-assign]
        saved = (json.dumps({"a": 2}, indent=2) + "\n").encode()
        (data_dir / file).write_bytes(saved)
        assert await store.ingest(file)
        for a in (3, 4):
            await store.submit(ops.set_document(name, {"a": a}), "bus", sync="files")
        shutil.copytree(data_dir, crashed)
    finally:
        await store.close()
    (crashed / file).write_bytes(saved)  # while down: the version saved then, put back
    async with restarted(crashed) as again:
        assert again.documents[name] == {"a": 2}


async def test_the_connection_list_is_built_again_only_when_a_connection_changed(
    data_dir: Path,
) -> None:
    """Kept by the store's version, the list was built again after every heartbeat flush,
    test result or volume change: on a big desk nearly every read rebuilt it."""
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus")
        first = views.connections(store)
        await store.submit(ops.set_volume("c1", live=2.0), "bus")
        assert views.connections(store) is first
        await store.submit(ops.update("c1", {"name": "renamed"}), "bus")
        again = views.connections(store)
        assert again is not first and b'"renamed"' in bytes(again)
        await store.submit(ops.create(conn(2)), "bus")
        assert len(json.loads(bytes(views.connections(store)))) == 2


def _crash(store: Store) -> None:
    """The daemon gone at once, as at a kill -9: no further round, no stop."""
    store.checkpointer.stop()
    store.journal.close()
    assert store._writer is not None
    store._writer.cancel()
    store._io.shutdown(wait=True)


def _after_restart(data_dir: Path) -> tuple[list[str], list[tuple[str, str | None]]]:
    again = Store(data_dir)
    again.open()
    try:
        return sorted(again.connections), [(e.action, e.connection_id) for e in again.log]
    finally:
        again.journal.close()


async def test_a_journal_made_anew_while_a_round_writes_covers_what_that_round_writes(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made anew from memory against the files as they were, while a round was writing c1
    (deleted meanwhile) into them: the round landed, a crash came, and c1 was back."""
    real = checkpoint._render_and_write
    entered, gate = threading.Event(), threading.Event()
    rounds = [0]

    def render(*args: Any) -> Any:
        rounds[0] += 1
        if rounds[0] == 1:
            entered.set()
            gate.wait(10)
            return real(*args)
        raise OSError(errno.EIO, "Input/output error")  # (or the crash comes first)

    store = Store(data_dir)
    store.open()
    await store.start()
    monkeypatch.setattr(checkpoint, "_render_and_write", render)
    await store.submit(ops.create(conn(1)), "bus")  # a round starts writing c1
    await wait_until_async(entered.is_set, 5, what="the round writing")
    await store.submit(ops.delete("c1"), "bus")
    (data_dir / journal.NAME).unlink()
    await store.submit(ops.create(conn(2)), "bus")  # the journal made anew
    gate.set()
    await wait_until_async(lambda: rounds[0] >= 2, 5, what="the round landed, the next failed")
    _crash(store)
    assert _after_restart(data_dir) == (
        ["c2"],
        [("create", "c1"), ("delete", "c1"), ("create", "c2")],
    )


def _refusing(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """The disk refuses writes of these files (their rounds fail; the others go on)."""
    from ctsd import atomic

    real = atomic.create_temp

    def create_temp(path: Path, readable: bool = False) -> tuple[Path, int]:
        if path.name in names:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, readable)

    monkeypatch.setattr(atomic, "create_temp", create_temp)


@pytest.mark.parametrize("lose", ["deleted", "cut"])
async def test_a_journal_lost_by_hand_while_a_file_is_invalid_keeps_every_change(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, lose: str
) -> None:
    """connections.json invalid on disk (its changes carried in the journal) and the sync
    log refused by the disk: a cut then rewrote the journal with the stuck file's carry, and
    dropped the record a journal made anew holds; one cut short by hand was rewritten from
    what was left of it. Either way an acknowledged event was gone after a crash."""
    store = Store(data_dir)
    store.open()
    await store.start()
    await store.submit(ops.create(conn(1)), "bus", sync="files")
    _refusing(monkeypatch, CONNECTIONS, SYNC_LOG)
    await store.submit(ops.create(conn(2)), "bus")
    (data_dir / CONNECTIONS).write_text("[{,")  # invalid by hand
    assert not await store.ingest(CONNECTIONS) and CONNECTIONS in store.problems
    done = store.checkpointer.rounds
    await wait_until_async(lambda: store.checkpointer.rounds >= done + 2, 10, what="2 rounds")
    if lose == "deleted":
        (data_dir / journal.NAME).unlink()
        await store.submit(ops.set_document("ui-config", {"theme": "dark"}), "bus")
    else:
        os.truncate(data_dir / journal.NAME, 0)
    done = store.checkpointer.rounds
    await wait_until_async(lambda: store.checkpointer.rounds >= done + 3, 10, what="3 rounds")
    _crash(store)
    monkeypatch.undo()
    (data_dir / CONNECTIONS).write_text("[]")  # (whatever it holds: the log tells)
    _, log = _after_restart(data_dir)
    assert log[:2] == [("create", "c1"), ("create", "c2")], log


async def test_the_state_list_is_encoded_again_only_for_what_changed(data_dir: Path) -> None:
    """Masked and encoded record by record on every read (a dashboard polling it held every
    bot's ack on a big desk): now kept per record while it and its heartbeat are the same."""
    async with opened(data_dir) as store:
        for i in (1, 2):
            await store.submit(ops.create(conn(i)), "bus")
        first = json.loads(bytes(views.state(store)))
        kept = dict(views._masked_state)
        assert json.loads(bytes(views.state(store))) == first
        assert all(views._masked_state[c] is kept[c] for c in kept)  # nothing made again
        store.heartbeats["c1"] = "2099-01-01T00:00:00.000Z"  # a heartbeat held in memory
        await store.submit(ops.set_volume("c2", live=3.0), "bus")
        rows = {r["connection_id"]: r for r in json.loads(bytes(views.state(store)))}
        assert rows["c1"]["last_heartbeat_at"] == "2099-01-01T00:00:00.000Z"
        assert rows["c2"]["volume_factor_live"] == 3.0
        await store.submit(ops.delete("c2"), "bus")
        assert [r["connection_id"] for r in json.loads(bytes(views.state(store)))] == ["c1"]


async def test_an_append_refused_into_a_lost_journal_is_not_replayed(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The room ahead cut by hand (the records kept): the append went into the file, the
    loss was seen after it, and the journal could not be made anew (disk full). The
    change was refused, yet its frame stayed in the file and came back at the next start."""
    async with then_killed(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus")
        j = store.journal
        await wait_until_async(lambda: j.capacity > j.end + 10, 5, what="the room ahead")
        os.truncate(data_dir / journal.NAME, j.end + 10)

        def full(*_args: Any, **_kw: Any) -> Any:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(journal, "create_temp", full)
        with pytest.raises(CtsdError) as refused:
            await store.submit(ops.create(conn(2)), "bus")
        assert refused.value.code == "io_error"
    monkeypatch.undo()
    assert _after_restart(data_dir)[0] == ["c1"]


async def test_a_journal_lost_after_a_start_that_replayed_nothing_is_made_anew(
    data_dir: Path,
) -> None:
    """Its last lsn a cut's (nothing to replay): memory was taken to hold less than the
    journal, so the journal was never made anew and every change was refused."""
    async with opened(data_dir) as store:
        await store.submit(ops.create(conn(1)), "bus", sync="files")
    async with opened(data_dir) as store:
        assert store.journal.lsn >= 1
        (data_dir / journal.NAME).unlink()
        await store.submit(ops.create(conn(2)), "bus")
        assert (data_dir / journal.NAME).exists()
