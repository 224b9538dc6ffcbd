"""Hand edits against the real daemon process.

Every test edits files the way a tool does (atomic rename, in-place truncate + write, vim's
backup/probe/rename dance, `cp`, `sed -i`, `rm`) and observes only what the outside sees: the
sync log on disk, the daemon's JSON log lines, `/health`, and the bus.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon, log_lines, revision, sync_log, wait_events, wait_until
from tests.datadir import atomic_save, dump
from tests.handedits import CONNS, assert_one_name_update, bus, edit_name, seed


@pytest.fixture
def daemon10(data_dir: Path) -> Iterator[Daemon]:
    seed(data_dir, 10)
    d = Daemon(data_dir).start()
    try:
        yield d
    finally:
        d.close()


# --- the ways a file gets saved -------------------------------------------------------------


def test_atomic_rename_save(daemon10: Daemon) -> None:
    d, path, rev = daemon10, daemon10.data_dir / CONNS, revision(daemon10)
    atomic_save(path, edit_name(path.read_bytes(), "conn_0003", "Renamed"))
    assert_one_name_update(d, rev, "conn_0003", "Renamed")
    # The edited file is left exactly as the operator wrote it.
    assert json.loads(path.read_bytes())[3]["name"] == "Renamed"
    # The admin sees it in the log: which file, how many changes (never values).
    logged = wait_until(lambda: log_lines(d, "hand_edit_taken_in"), 5, what="log line")
    assert [(e["file"], e["changes"]) for e in logged] == [(CONNS, 1)]


def test_in_place_truncate_then_chunks_with_pauses(daemon10: Daemon) -> None:
    """nano/`>`-style: truncate, then write in pieces; the half file must not count."""
    d, path, rev = daemon10, daemon10.data_dir / CONNS, revision(daemon10)
    body = edit_name(path.read_bytes(), "conn_0005", "Chunked")
    pause = threading.Event()  # the writer's pauses between chunks (part of the scenario)
    with open(path, "r+b") as fh:
        fh.truncate(0)
        fh.flush()
        os.fsync(fh.fileno())
        pause.wait(0.02)
        third = len(body) // 3
        for chunk in (body[:third], body[third : 2 * third], body[2 * third :]):
            fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())  # the daemon sees every intermediate state
            pause.wait(0.02)
    assert_one_name_update(d, rev, "conn_0005", "Chunked")


def test_an_in_place_save_that_pauses_after_its_truncate_is_no_invalid_file(
    daemon10: Daemon,
) -> None:
    """Truncated, then written a moment later (a large file, a slow disk, an editor that
    renders first): the empty file was reported invalid ("file is empty", an error and a
    notice to every bot), then restored. An empty file is judged after a longer quiet."""
    d, path, rev = daemon10, daemon10.data_dir / CONNS, revision(daemon10)
    body = edit_name(path.read_bytes(), "conn_0006", "Paused")
    with open(path, "r+b") as fh:
        fh.truncate(0)
        fh.flush()
        threading.Event().wait(0.5)  # the writer's pause (the scenario), ten settles long
        fh.write(body)
    assert_one_name_update(d, rev, "conn_0006", "Paused")
    assert not log_lines(d, "file_invalid")


def test_vim_style_save(daemon10: Daemon) -> None:
    """vim (writebackup, backupcopy=no): swap file, `4913` probe, rename to `~`, write new."""
    d, path, rev = daemon10, daemon10.data_dir / CONNS, revision(daemon10)
    swap = path.with_name(f".{path.name}.swp")
    swap.write_bytes(b"b0VIM 9.0" + b"\0" * 4000)
    body = edit_name(path.read_bytes(), "conn_0007", "From vim")
    probe = path.with_name("4913")
    fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
    os.close(fd)
    probe.unlink()
    backup = path.with_name(f"{path.name}~")
    os.rename(path, backup)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    os.write(fd, body)
    os.fsync(fd)
    os.close(fd)
    backup.unlink()
    swap.unlink()
    assert_one_name_update(d, rev, "conn_0007", "From vim")


def test_cp_over(daemon10: Daemon, tmp_path: Path) -> None:
    d, path, rev = daemon10, daemon10.data_dir / CONNS, revision(daemon10)
    src = tmp_path / "edited.json"
    src.write_bytes(edit_name(path.read_bytes(), "conn_0001", "Copied"))
    ino = path.stat().st_ino
    subprocess.run(["cp", str(src), str(path)], check=True)
    assert path.stat().st_ino == ino  # cp writes in place: truncate + write
    assert_one_name_update(d, rev, "conn_0001", "Copied")


def test_sed_in_place(daemon10: Daemon) -> None:
    d, path, rev = daemon10, daemon10.data_dir / CONNS, revision(daemon10)
    subprocess.run(["sed", "-i", 's/"Connection 2"/"Sedded"/', str(path)], check=True)
    assert_one_name_update(d, rev, "conn_0002", "Sedded")


def test_editor_debris_is_ignored(daemon10: Daemon) -> None:
    d = daemon10
    rev = revision(d)
    for name in ("4913", ".connections.json.swp", "connections.json~", ".#connections.json"):
        (d.data_dir / name).write_text("{not json")
    (d.data_dir / "logs" / "x.json").write_text("{not json")
    # A real edit after the debris: once it is in, the debris has been seen (and ignored).
    path = d.data_dir / CONNS
    atomic_save(path, edit_name(path.read_bytes(), "conn_0000", "After debris"))
    assert_one_name_update(d, rev, "conn_0000", "After debris")
    _, health = d.http("/health")
    assert health["status"] == "ok", health


def test_one_field_of_1000_connections_is_one_event(data_dir: Path) -> None:
    seed(data_dir, 1000)
    d = Daemon(data_dir).start()
    try:
        path = data_dir / CONNS
        rev = revision(d)
        conns = json.loads(path.read_bytes())
        conns[617]["volume_factor"] = 2.5
        atomic_save(path, dump(conns))
        evs = wait_events(d, rev, lambda evs: True, "the one-field edit")
        assert [(e["connection_id"], e["action"], e["data"]["fields"]) for e in evs] == [
            ("conn_0617", "update", ["volume_factor"])
        ]
        assert evs[0]["data"]["values"] == {"volume_factor": 2.5}
        assert evs[0]["data"]["source"] == "file"
        # Secrets typed in plain text are taken in but never shown.
        conns[3]["api_secret"] = "new-plain-secret"
        rev = evs[-1]["id"]
        atomic_save(path, dump(conns))
        evs = wait_events(d, rev, lambda evs: True, "the secret edit")
        assert [e["data"]["fields"] for e in evs] == [["api_secret"]]
        assert "new-plain-secret" not in json.dumps(evs)
        assert "new-plain-secret" not in d.stdout()
    finally:
        d.close()


@pytest.mark.anyio
async def test_hand_edit_under_steady_writes_is_taken_in(daemon10: Daemon) -> None:
    """Under steady bus writes the watch sees batch after batch of the journal's appends only
    and stretches its step (`/health` shows it); a hand edit made then must still come in (as
    one event, from the file) and the writes must all land."""
    d, path = daemon10, daemon10.data_dir / CONNS
    stop = False

    async def write() -> int:
        n = 0
        while not stop:
            await writer.ok(
                "connections.update", connection_id="conn_0002", changes={"user_id": n + 2}
            )
            n += 1
        return n

    def stretched() -> bool:
        return d.http("/health", token=None)[1]["checks"]["watch"].get("step_ms") == 10

    async with bus(d) as b, bus(d, subscribe=False) as writer:
        task = asyncio.ensure_future(write())
        try:
            deadline = asyncio.get_running_loop().time() + 20
            while not await asyncio.to_thread(stretched):
                assert asyncio.get_running_loop().time() < deadline, "the step never stretched"
                await asyncio.sleep(0.01)
            atomic_save(path, edit_name(path.read_bytes(), "conn_0005", "Edited under load"))
            edit = await b.wait_event("update", "conn_0005", timeout=10)
        finally:
            stop = True
            writes = await task
    assert edit["data"]["source"] == "file" and edit["data"]["fields"] == ["name"]
    conns = {c["id"]: c for c in json.loads(path.read_text())}
    assert conns["conn_0005"]["name"] == "Edited under load"
    wait_until(lambda: json.loads(path.read_text())[2].get("user_id") == writes + 1, 5)
    wait_until(lambda: not stretched(), 5)  # quiet again: back to the 1 ms step


# --- invalid edits ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_one_save_of_several_records_is_one_events_frame(daemon10: Daemon) -> None:
    d, path = daemon10, daemon10.data_dir / CONNS
    async with bus(d) as b:
        body = path.read_bytes()
        for cid in ("conn_0001", "conn_0004", "conn_0007"):
            body = edit_name(body, cid, f"Many {cid}")
        atomic_save(path, body)
        await b.wait_for(lambda: len(b.events) >= 3, what="the three edits")
        assert [sorted(e["connection_id"] for e in f) for f in b.event_frames] == [
            ["conn_0001", "conn_0004", "conn_0007"]
        ]
        assert {e["action"] for e in b.event_frames[0]} == {"update"}


@pytest.mark.anyio
async def test_invalid_then_fixed(daemon10: Daemon) -> None:
    d, path = daemon10, daemon10.data_dir / CONNS
    good = path.read_bytes()
    async with bus(d) as b:
        bad = good.replace(b'"is_enabled": true', b'"is_enabeld": true', 1)
        atomic_save(path, bad)
        notice = await b.wait_for(
            lambda: next((n for n in b.notices if n["notice"] == "file_invalid"), None),
            what="file_invalid notice",
        )
        assert notice["file"] == CONNS
        assert notice["path"] == "$[0]", notice  # as in the contract's example
        assert "`is_enabeld`" in notice["message"] and "`is_enabled`" in notice["message"]
        assert notice["line"] > 1 and notice["column"] >= 1
        logged = log_lines(d, "file_invalid")
        assert logged and logged[0]["file"] == CONNS
        _, health = d.http("/health")
        assert health["status"] == "degraded" and CONNS in health["checks"]["files"]["invalid"]

        # The last valid content is still served; every write of the file is refused.
        got = await b.call("connections.get", connection_id="conn_0000")
        assert got["success"] and got["result"]["name"] == "Connection 0"
        for kind, args in [
            ("connections.update", {"connection_id": "conn_0001", "changes": {"name": "x"}}),
            ("connections.create", {"connection": {"name": "new", "exchange": "bybit"}}),
            ("connections.delete", {"connection_id": "conn_0002"}),
            ("connections.set_active", {"connection_id": "conn_0003", "active": True}),
        ]:
            res = await b.call(kind, **args)
            assert not res["success"] and res["error"]["code"] == "file_invalid", (kind, res)
        status, body = d.http("/api/settings/connections/conn_0004", method="DELETE")
        assert status == 409 and body["error"]["code"] == "file_invalid", (status, body)
        # Changes to other files go on.
        res = await b.call("documents.set", name="ui-config", content={"theme": "dark"})
        assert res["success"], res
        # Never overwritten, moved or repaired, also not by SIGHUP.
        rev = revision(d)
        d.send_signal(signal.SIGHUP)
        d.notify.wait_for("RELOADING=1")
        d.notify.wait_for("READY=1", after=d.notify.messages.index("RELOADING=1"))
        assert path.read_bytes() == bad
        assert revision(d) == rev
        assert not log_lines(d, "file_still_invalid")  # (nothing was saved)
        # Saved again with the same mistake: said in the log (at 3 a.m. the operator
        # wonders whether the daemon saw the save), not as another notice.
        atomic_save(path, bad)
        wait_until(lambda: log_lines(d, "file_still_invalid"), 10, what="file_still_invalid")
        assert len([n for n in b.notices if n["notice"] == "file_invalid"]) == 1

        # Fixed (with one real change): cleared, taken in, writes work again.
        fixed = json.loads(good)
        fixed[4]["name"] = "Fixed"
        atomic_save(path, dump(fixed))
        restored = await b.wait_for(
            lambda: next((n for n in b.notices if n["notice"] == "file_restored"), None),
            what="file_restored notice",
        )
        assert restored["file"] == CONNS
        await b.wait_for(
            lambda: any(e["connection_id"] == "conn_0004" for e in b.events), what="the edit"
        )
        ev = next(e for e in b.events if e["connection_id"] == "conn_0004")
        assert ev["data"]["fields"] == ["name"] and ev["data"]["source"] == "file"
        _, health = d.http("/health")
        assert health["status"] == "ok", health
        res = await b.call(
            "connections.update", connection_id="conn_0001", changes={"name": "works"}
        )
        assert res["success"], res
        assert log_lines(d, "file_restored")


@pytest.mark.anyio
async def test_half_written_file_is_not_judged_but_a_bad_one_is(daemon10: Daemon) -> None:
    """An in-place save that stops half way (the editor crashed) is invalid, once quiet."""
    d, path = daemon10, daemon10.data_dir / CONNS
    good = path.read_bytes()
    async with bus(d) as b:
        with open(path, "r+b") as fh:
            fh.truncate(0)
            fh.write(good[: len(good) // 2])
        notice = await b.wait_for(
            lambda: next((n for n in b.notices if n["notice"] == "file_invalid"), None),
            what="file_invalid",
        )
        assert notice["file"] == CONNS
        assert path.read_bytes() == good[: len(good) // 2]
        path.write_bytes(good)  # in place again, now whole
        await b.wait_for(
            lambda: any(n["notice"] == "file_restored" for n in b.notices), what="restored"
        )
        assert len([n for n in b.notices if n["notice"] == "file_invalid"]) == 1
        assert not b.events  # the same content as before: nothing changed


# --- deletion -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_deleted_file_is_written_back(daemon10: Daemon) -> None:
    d, path = daemon10, daemon10.data_dir / CONNS
    before = json.loads(path.read_bytes())
    async with bus(d) as b:
        path.unlink()
        notice = await b.wait_for(
            lambda: next((n for n in b.notices if n["notice"] == "file_restored"), None),
            what="file_restored",
        )
        assert notice["file"] == CONNS
        wait_until(path.exists, 2, what="connections.json back")
        assert [c["id"] for c in json.loads(path.read_bytes())] == [c["id"] for c in before]
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert log_lines(d, "file_restored_from_memory")
        # A document too.
        (d.data_dir / "watchlists.json").unlink()
        wait_until((d.data_dir / "watchlists.json").exists, 2, what="watchlists.json back")
        # Emptying is not deleting: `[]` is taken in as deleting every connection.
        rev = revision(d)
        atomic_save(path, b"[]\n")
        evs = wait_events(d, rev, lambda evs: len(evs) >= 10, "ten deletes")
        assert sorted(e["action"] for e in evs) == ["delete"] * 10
        assert path.read_bytes() == b"[]\n"
        assert not b.events or all(e["action"] == "delete" for e in b.events)


def test_rename_dance_is_not_a_deletion(daemon10: Daemon) -> None:
    """`mv f f.bak; cp f.bak f` with a moment in between: no restore from memory."""
    d, path, rev = daemon10, daemon10.data_dir / CONNS, revision(daemon10)
    body = edit_name(path.read_bytes(), "conn_0009", "Danced")
    aside = path.with_name("connections.json.bak")
    os.rename(path, aside)
    threading.Event().wait(0.03)  # the editor's own pause between its two steps
    path.write_bytes(body)
    aside.unlink()
    assert_one_name_update(d, rev, "conn_0009", "Danced")


# --- reload and settings --------------------------------------------------------------------


def test_sighup_takes_edits_in(daemon10: Daemon) -> None:
    d, path, rev = daemon10, daemon10.data_dir / CONNS, revision(daemon10)
    atomic_save(path, edit_name(path.read_bytes(), "conn_0006", "Via HUP"))
    d.send_signal(signal.SIGHUP)
    d.notify.wait_for("RELOADING=1")
    assert_one_name_update(d, rev, "conn_0006", "Via HUP")


def test_shutil_copyfile_over(daemon10: Daemon, tmp_path: Path) -> None:
    """shutil.copyfile is another in-place writer (one write call)."""
    d, path, rev = daemon10, daemon10.data_dir / CONNS, revision(daemon10)
    src = tmp_path / "src.json"
    src.write_bytes(edit_name(path.read_bytes(), "conn_0008", "Shutil"))
    shutil.copyfile(src, path)
    assert_one_name_update(d, rev, "conn_0008", "Shutil")


def test_settings_edited_by_hand_take_effect_live(daemon10: Daemon) -> None:
    """A hand edit of settings.json goes the same way; the new limit applies at once."""
    d, path = daemon10, daemon10.data_dir / CONNS
    settings = json.loads((d.data_dir / "settings.json").read_bytes())
    settings["sync_log_limit"] = 3
    atomic_save(d.data_dir / "settings.json", dump(settings))
    wait_until(
        lambda: any(e["action"] == "document_update" for e in sync_log(d)), 5, what="taken in"
    )
    for i in range(5):
        rev = revision(d)
        atomic_save(path, edit_name(path.read_bytes(), "conn_0000", f"Limit {i}"))
        wait_events(d, rev, lambda evs: True, f"edit {i}")
    log = sync_log(d)
    assert len(log) == 3 and log[-1]["data"]["values"]["name"] == "Limit 4"
    ids = [e["id"] for e in log]
    assert ids == sorted(ids) and ids[-1] >= 6  # trimmed, ids never reused


@pytest.mark.anyio
async def test_a_cluster_section_the_next_start_would_refuse_is_refused_now(
    daemon10: Daemon,
) -> None:
    """Cluster settings take effect at the next start: a hand edit that would stop it is
    reported while the operator is there (and left as written), not at the next restart."""
    d, path = daemon10, daemon10.data_dir / "settings.json"
    settings = json.loads(path.read_bytes())
    settings["cluster"] = {"nats_urls": ["nats://a:4222"], "name": "desk", "max_age_s": 60}
    async with bus(d) as b:
        atomic_save(path, dump(settings))
        notice = await b.wait_for(
            lambda: next((n for n in b.notices if n["notice"] == "file_invalid"), None),
            what="file_invalid notice",
        )
        assert notice["file"] == "settings.json" and notice["path"] == "$.cluster", notice
        assert "cluster.max_age_s 60 is too short" in notice["message"]
        assert json.loads(path.read_bytes()) == settings
        settings["cluster"]["max_age_s"] = 600
        atomic_save(path, dump(settings))
        await b.wait_for(
            lambda: any(n["notice"] == "file_restored" for n in b.notices), what="restored"
        )
    got = d.http("/api/data/settings")[1]
    assert got["cluster"]["max_age_s"] == 600


@pytest.mark.anyio
async def test_dangling_reference_then_fixed_by_adding_the_algorithm(daemon10: Daemon) -> None:
    d = daemon10
    inst = {
        "instances": [{"id": "i1", "name": "One", "symbol": "BTCUSDT", "algorithmName": "Grid"}],
        "lastSaved": None,
    }
    async with bus(d) as b:
        atomic_save(d.data_dir / "instances.json", dump(inst))
        notice = await b.wait_for(
            lambda: next((n for n in b.notices if n["notice"] == "file_invalid"), None),
            what="file_invalid",
        )
        assert notice["file"] == "instances.json"
        assert notice["path"] == "$.instances[0].algorithmName", notice
        other = {"instances": [], "lastSaved": "2024-01-01T00:00:00.000Z"}
        res = await b.call("documents.set", name="instances", content=other)
        assert not res["success"] and res["error"]["code"] == "file_invalid"
        # Fixed without touching instances.json: the algorithm it names appears.
        atomic_save(d.data_dir / "algorithms" / "Grid.json", dump({"name": "Grid"}))
        restored = await b.wait_for(
            lambda: next((n for n in b.notices if n["notice"] == "file_restored"), None),
            what="file_restored",
        )
        assert restored["file"] == "instances.json"
        _, health = d.http("/health")
        assert health["status"] == "ok", health
        got = await b.call("documents.get", name="instances")
        assert got["result"]["instances"][0]["algorithmName"] == "Grid"


@pytest.mark.anyio
async def test_a_hand_edit_giving_an_instance_id_twice_is_invalid(daemon10: Daemon) -> None:
    d = daemon10
    one = {"id": "i1", "name": "One", "symbol": "BTCUSDT", "algorithmName": "Grid"}
    async with bus(d) as b:
        await b.ok("documents.set", name="algorithms/Grid", content={"name": "Grid"})
        inst = {"instances": [one, {**one, "name": "Two"}], "lastSaved": None}
        atomic_save(d.data_dir / "instances.json", dump(inst))
        notice = await b.wait_for(
            lambda: next((n for n in b.notices if n["notice"] == "file_invalid"), None),
            what="file_invalid",
        )
        assert (notice["file"], notice["path"]) == ("instances.json", "$.instances[1].id")
        assert "duplicate id 'i1' (first at $.instances[0])" in notice["message"], notice
        assert json.loads((d.data_dir / "instances.json").read_text()) == inst  # as left


@pytest.mark.anyio
async def test_state_saved_before_its_connection_is_kept_and_taken_in_with_it(
    daemon10: Daemon,
) -> None:
    """`cp backup/*.json data/` copies connection-state.json first (it sorts first): its record
    of a connection not yet in connections.json is a dangling reference, reported, and the
    file left as saved (it was dropped, and the next write put a default record over the
    operator's volumes); once connections.json has the connection, the state is taken in."""
    d = daemon10
    state_path, conns_path = d.data_dir / "connection-state.json", d.data_dir / CONNS
    state = d.http("/api/connections/state")[1]
    new = dict(state[0], connection_id="conn_0042", volume_factor_live=7.5)
    state.append(new)
    saved = dump(state)
    async with bus(d) as b:
        atomic_save(state_path, saved)
        notice = await b.wait_for(
            lambda: next((n for n in b.notices if n["notice"] == "file_invalid"), None),
            what="file_invalid",
        )
        assert notice["file"] == "connection-state.json" and notice["line"] > 1, notice
        assert notice["path"] == f"$[{len(state) - 1}].connection_id", notice["message"]
        assert "'conn_0042' names no connection" in notice["message"], notice
        assert "; did you mean 'conn_00" in notice["message"], notice
        await b.call("connections.heartbeat", connection_id="conn_0001")
        d.send_signal(signal.SIGHUP)  # (the heartbeat's flush is refused: the file stays)
        wait_until(lambda: d.http("/health")[1]["status"] == "degraded", 5, what="degraded")
        assert state_path.read_bytes() == saved
        conns = json.loads(conns_path.read_bytes())
        conns.append(dict(conns[0], id="conn_0042", name="Restored"))
        atomic_save(conns_path, dump(conns))
        restored = await b.wait_for(
            lambda: next((n for n in b.notices if n["notice"] == "file_restored"), None),
            what="file_restored",
        )
        assert restored["file"] == "connection-state.json"
    _, got = d.http("/api/connections/conn_0042/state")
    assert got["volume_factor_live"] == 7.5, got
    wait_until(lambda: d.http("/health")[1]["status"] == "ok", 5, what="ok again")


def test_the_algorithms_dir_replaced_is_watched_again(daemon10: Daemon) -> None:
    """`mv algorithms algorithms.old; mkdir algorithms; cp ...`: the watch went with the old
    dir, and nothing in the new one was seen until a restart."""
    d = daemon10
    algorithms = d.data_dir / "algorithms"
    atomic_save(algorithms / "Grid.json", dump({"name": "Grid"}))
    wait_until(lambda: d.http("/api/data/algorithms/Grid")[0] == 200, 10, what="Grid")
    algorithms.rename(d.data_dir / "algorithms.old")
    algorithms.mkdir(mode=0o700)
    atomic_save(algorithms / "Grid.json", dump({"name": "Grid", "levels": 3}))
    atomic_save(algorithms / "Mean.json", dump({"name": "Mean"}))

    def taken_in() -> bool:
        return d.http("/api/data/algorithms/Mean")[0] == 200 and (
            d.http("/api/data/algorithms/Grid")[1].get("levels") == 3
        )

    wait_until(taken_in, 10, what="both files of the new dir taken in")
    assert d.http("/health")[1]["status"] == "ok"


def test_an_algorithm_file_of_a_name_not_allowed_is_said_to_be_ignored(daemon10: Daemon) -> None:
    """`Mean Reversion (v2).json` was ignored without a word: an instance naming it was then
    refused as naming no file, the file right there."""
    d = daemon10
    atomic_save(d.data_dir / "algorithms" / "Mean (v2).json", dump({"name": "Mean (v2)"}))
    atomic_save(d.data_dir / "algorithms" / ".#Grid.json", b"emacs lock\n")  # not said

    def ignored() -> list[str]:
        return [e["file"] for e in d.log_events() if e.get("event") == "algorithm_file_ignored"]

    wait_until(ignored, 5, what="the file said to be ignored")
    atomic_save(d.data_dir / "algorithms" / "Mean (v2).json", dump({"name": "again"}))
    d.send_signal(signal.SIGHUP)  # (lists the dir again: said once all the same)
    wait_until(lambda: any(e.get("event") == "reloaded" for e in d.log_events()), 10)
    assert ignored() == ["algorithms/Mean (v2).json"]
    assert "allowed" in next(
        e["reason"] for e in d.log_events() if e.get("event") == "algorithm_file_ignored"
    )


def test_a_hand_edit_beside_a_masked_looking_value_it_did_not_touch_is_taken_in(
    data_dir: Path,
) -> None:
    """A UI setting that reads like a secret and holds what a placeholder looks like
    (`"passwordMask": "********"`): only what an edit changes is looked at for pasted
    placeholders, so an edit of another key is taken in (it was refused, "no secret is
    stored there", on every save)."""
    seed(data_dir, 1)
    ui = data_dir / "ui-config.json"
    ui.write_text(json.dumps({"passwordMask": "********", "theme": "dark"}) + "\n")
    ui.chmod(0o600)
    d = Daemon(data_dir).start()
    try:
        atomic_save(ui, dump({"passwordMask": "********", "theme": "light"}))
        wait_until(lambda: d.http("/api/data/ui-config")[1].get("theme") == "light", 5)
        assert d.http("/health")[1]["status"] == "ok"
    finally:
        d.close()


def test_invalid_new_algorithm_removed_clears_health(daemon10: Daemon) -> None:
    d = daemon10
    algo = d.data_dir / "algorithms" / "Broken.json"
    atomic_save(algo, b'{"no_name": true}\n')
    wait_until(lambda: d.http("/health")[1]["status"] == "degraded", 5, what="degraded")
    assert "algorithms/Broken.json" in d.http("/health")[1]["checks"]["files"]["invalid"]
    algo.unlink()
    wait_until(lambda: d.http("/health")[1]["status"] == "ok", 5, what="ok again")
    assert not algo.exists()  # nothing valid to write back


@pytest.mark.anyio
async def test_in_place_write_into_the_file_we_replaced_is_not_lost(daemon10: Daemon) -> None:
    """An in-place writer opens the file, the daemon renames a change over it, then the writer
    writes: into the old file, no longer in the directory. It is taken in once closed, merged
    against what the writer saw."""
    d, path = daemon10, daemon10.data_dir / CONNS
    async with bus(d) as b:
        body = edit_name(path.read_bytes(), "conn_0005", "Late writer")
        with open(path, "r+b") as fh:  # opened before the daemon's write
            res = await b.call(
                "connections.update",
                connection_id="conn_0001",
                changes={"name": "Bus"},
                sync="files",
            )
            assert res["success"], res
            assert os.fstat(fh.fileno()).st_ino != path.stat().st_ino  # replaced under us
            fh.truncate(0)
            fh.write(body)
        await b.wait_for(
            lambda: any(
                e["data"]["source"] == "file"
                and e["data"].get("values", {}).get("name") == "Late writer"
                for e in b.events
            ),
            what="the late write taken in",
        )
        wait_until(lambda: log_lines(d, "late_hand_write_taken_in"), 5)
        # The late write was based on the file before the bus change: merged against what
        # its writer saw, it changes only what that writer changed; the bus change stays.
        assert not [
            e
            for e in b.events
            if e["connection_id"] == "conn_0001" and e["data"]["source"] == "file"
        ]
        got = await b.call("connections.get", connection_id="conn_0001")
        assert got["result"]["name"] == "Bus"
        # in memory at once, in the file with the next checkpoint
        wait_until(lambda: json.loads(path.read_bytes())[5]["name"] == "Late writer", 5)


def test_a_hand_edit_holding_an_ellipsis_is_taken_in_once_not_at_every_start(
    daemon10: Daemon,
) -> None:
    """An ellipsis is also what a masked secret shows: the file's copy was never kept for a
    file holding one anywhere (a name "Main… (spot)"), so every start took that edit in again
    as made while the daemon was down, one more event each time."""
    d, path, rev = daemon10, daemon10.data_dir / CONNS, revision(daemon10)
    atomic_save(path, edit_name(path.read_bytes(), "conn_0003", "Main… (spot)"))
    assert_one_name_update(d, rev, "conn_0003", "Main… (spot)")
    after = revision(d)
    for _ in range(2):
        assert d.stop() == 0
        d.start()
        assert revision(d) == after, sync_log(d)[-2:]
    assert not log_lines(d, "edited_while_stopped_taken_in")


def test_a_settings_key_close_to_one_of_the_daemons_is_named_in_the_log(
    daemon10: Daemon,
) -> None:
    """Kept (the trading app's own keys are), but the daemon never reads it: a typo would
    leave the setting at its default without a word."""
    d, path = daemon10, daemon10.data_dir / "settings.json"
    settings = json.loads(path.read_text())
    settings.update(stale_after=5, theme="dark", server={"prot": 3600})
    atomic_save(path, dump(settings))
    logged = wait_until(lambda: log_lines(d, "settings_key_unknown"), 10, what="the warning")
    assert {(e["key"], e["did_you_mean"]) for e in logged} == {
        ("stale_after", "stale_after_s"),
        ("server.prot", "server.port"),
    }
    assert json.loads(path.read_text())["theme"] == "dark"  # left as written
    # connection.json too: `autoconnect` left Project X off without a word
    path = d.data_dir / "connection.json"
    doc = json.loads(path.read_text())
    doc["projectX"]["autoconnect"] = True
    doc["trading"]["simulationmode"] = False
    doc["trading"]["riskProfile"] = "low"  # (the app's own: no typo)
    atomic_save(path, dump(doc))
    logged = wait_until(lambda: log_lines(d, "connection_key_unknown"), 10, what="the warning")
    assert {(e["key"], e["did_you_mean"]) for e in logged} == {
        ("projectX.autoconnect", "projectX.autoConnect"),
        ("trading.simulationmode", "trading.simulationMode"),
    }
