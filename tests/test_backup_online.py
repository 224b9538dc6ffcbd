"""`ctsd backup` and `ctsd restore` while the daemon runs: a backup is one revision between two
commits even under a stream of changes; a restore is verified, then one change through the
door that subscribers see; secrets stay encrypted throughout."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import stat
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from ctsd import backup, files, livebackup, ops
from ctsd.livebackup import MAX_WAITING, RESTORE_PREFIX, SUFFIX, TAKEN_WITHIN_S
from ctsd.store import Store
from tests.bus import bus
from tests.cli_helpers import CANARY, cli
from tests.daemon import Daemon, wait_until_async
from tests.datadir import small_tmpfs
from tests.secrets_helpers import keyed, make_key, plaintexts, stored_under, write_plain_data

pytestmark = pytest.mark.anyio


def backup_while_running(d: Daemon, archive: Path) -> None:
    try:
        d.start()
        r = cli(d, "backup", "-o", str(archive), "--data-dir", str(d.data_dir))
        assert r.returncode == 0, r.stderr
        assert d.stop() == 0
    finally:
        d.close()


def test_a_backup_to_another_filesystem_that_fills_up_leaves_nothing(
    data_dir: Path, tmp_path: Path
) -> None:
    """The archive is copied out of the data dir: it was copied by `shutil` with the umask's
    mode (0644, every secret as stored readable meanwhile) and a failed copy left its part
    behind; now a new 0600 file, removed when the copy fails."""
    write_plain_data(data_dir, connections=3)
    noise = data_dir / "ui-config.json"  # an archive far over the 16 KiB there is room for
    noise.write_text(json.dumps({"noise": os.urandom(60_000).hex()}) + "\n")
    noise.chmod(0o600)
    d = Daemon(data_dir)
    with small_tmpfs(tmp_path / "mnt", size="16k") as mnt:
        try:
            d.start()
            r = cli(d, "backup", "-o", str(mnt / "b.tar.gz"), "--data-dir", str(data_dir))
            assert r.returncode == 1 and "No space left" in r.stderr, r.stderr
            assert list(mnt.iterdir()) == []
            assert leftovers(data_dir) == []
            r = cli(d, "backup", "-o", str(tmp_path / "b.tar.gz"), "--data-dir", str(data_dir))
            assert r.returncode == 0, r.stderr
            assert stat.S_IMODE((tmp_path / "b.tar.gz").stat().st_mode) == 0o600
            assert d.stop() == 0
        finally:
            d.close()


def leftovers(data_dir: Path) -> list[str]:
    return [p.name for p in data_dir.iterdir() if p.name.startswith((".backup-", ".restore-"))]


async def test_backup_under_load_is_one_revision(data_dir: Path, tmp_path: Path) -> None:
    write_plain_data(data_dir, connections=50)
    fast = {"theme": "dark", "server": {"rate_limit": {"requests": 1000000, "window_s": 1}}}
    (data_dir / "settings.json").write_text(json.dumps(fast) + "\n")
    key = make_key(tmp_path / "key")
    d = keyed(data_dir, tmp_path / "key")
    archives = [tmp_path / f"b{i}.tar.gz" for i in range(3)]
    try:
        d.start()
        async with bus(d) as b:
            stop = anyio.Event()

            async def writer() -> None:
                # Each change renames two connections together: a consistent snapshot never
                # holds one renamed without the other.
                i = 0
                while not stop.is_set():
                    i += 1
                    await b.ok(
                        "connections.batch_update",
                        updates=[
                            {"id": "conn_00000", "name": f"n{i}", "api_secret": f"{CANARY}-{i}"},
                            {"id": "conn_00001", "name": f"n{i}"},
                        ],
                        sync=None,
                    )

            async with anyio.create_task_group() as tg:
                tg.start_soon(writer)
                for path in archives:
                    r = await anyio.to_thread.run_sync(
                        lambda p=path: cli(d, "backup", "-o", str(p), "--data-dir", str(data_dir))
                    )
                    assert r.returncode == 0, r.stderr
                stop.set()
        assert d.stop() == 0
    finally:
        d.close()
    assert leftovers(data_dir) == []
    revisions = []
    for path in archives:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        raw = path.read_bytes()
        archive = backup.read_archive(path)  # checksums and every file valid
        conns = {c["id"]: c for c in json.loads(archive.contents["connections.json"])}
        assert conns["conn_00000"]["name"] == conns["conn_00001"]["name"]
        log = json.loads(archive.contents["connection-sync-log.json"])
        assert archive.manifest.revision == log[-1]["id"]
        assert archive.manifest.key_ids == [key.id]
        revisions.append(archive.manifest.revision)
        for member in archive.contents.values():
            assert CANARY.encode() not in member
        assert CANARY.encode() not in raw
    assert revisions == sorted(revisions) and revisions[-1] > revisions[0]


async def test_a_backup_waits_until_the_files_hold_one_revision(tmp_path: Path) -> None:
    """A round writes memory as it is when it writes: a change that came while it waited for
    its locks is in the files it picked (the sync log) and not yet in the others it touched
    (connections, state). A backup released by that round must not read the files then."""
    store = Store(tmp_path / "data")
    store.open()
    await store.start()
    try:
        c1 = {"id": "c1", "name": "one", "exchange": "bybit"}
        await store.submit(ops.create(c1), "bus", sync="files")
        lock = store.file_lock(files.document_file("ui-config"))
        await lock.acquire()
        try:
            await store.submit(ops.set_document("ui-config", {"theme": "dark"}), "bus")
            await wait_until_async(
                lambda: bool(getattr(lock, "_waiters", None)), 5, what="the round at the lock"
            )
            backup = asyncio.create_task(livebackup.snapshot_files(store))
            await store.submit(ops.update("c1", {"name": "two"}), "bus")
            # As after a slow fdatasync: the journal's jobs go to its thread for a while, so
            # the round's cut after its write lets other tasks run (the backup, here).
            store._disk_slow_until = time.monotonic() + 60
        finally:
            lock.release()
        contents = await asyncio.wait_for(backup, 10)
    finally:
        await store.close()
    log = json.loads(contents["connection-sync-log.json"])
    (conn,) = json.loads(contents["connections.json"])
    actions = [e["action"] for e in log]
    assert actions[:2] == ["create", "document_update"], actions
    # one revision: the update's event and its record both, or neither
    assert (conn["name"] == "two") == ("update" in actions), (conn, actions)


async def test_restore_through_the_door(data_dir: Path, tmp_path: Path) -> None:
    write_plain_data(data_dir, connections=4)
    expected = plaintexts(data_dir)
    key = make_key(tmp_path / "key")
    archive = tmp_path / "b.tar.gz"
    d = keyed(data_dir, tmp_path / "key")
    # A state record of no connection, as a stopped daemon's file may hold one its start
    # dropped: the backup takes it, and a restore through the daemon drops it, named.
    state_file = data_dir / "connection-state.json"
    state_file.write_text(json.dumps([{"connection_id": "ghost"}]))
    state_file.chmod(0o600)
    try:
        r = cli(d, "backup", "-o", str(archive), "--data-dir", str(data_dir))
        assert r.returncode == 0, r.stderr
        d.start()
        async with bus(d) as b:
            await b.ok("connections.delete", connection_id="conn_00003")
            await b.ok(
                "connections.create",
                connection={
                    "id": "new1",
                    "name": "after",
                    "exchange": "bybit",
                    "api_key": f"{CANARY}-later",
                },
            )
            await b.ok("documents.set", name="ui-config", content={"theme": "light"})
            algo = {"name": "later", "params": {}}
            await b.ok("documents.set", name="algorithms/later", content=algo, sync="files")
            assert (data_dir / "algorithms/later.json").exists()
            # A damaged archive is refused before anything changes.
            bad = tmp_path / "bad.tar.gz"
            blob = bytearray(archive.read_bytes())
            blob[len(blob) // 2] ^= 0xFF
            bad.write_bytes(bytes(blob))
            before = {p: (data_dir / p).read_bytes() for p in ("connections.json",)}
            r = cli(d, "restore", str(bad), "--data-dir", str(data_dir))
            assert r.returncode != 0 and "nothing was changed" in r.stderr, r.stderr
            assert {p: (data_dir / p).read_bytes() for p in before} == before
            # The real one: one change, seen by subscribers.
            await b.ok("subscribe")
            rev = (await b.ok("status"))["revision"]
            r = cli(d, "restore", str(archive), "--data-dir", str(data_dir))
            assert r.returncode == 0, r.stderr
            assert "as one change" in r.stdout
            assert "state record(s) of no connection dropped, as a start drops them: ghost" in (
                r.stderr
            )
            events = await b.events_until(rev + 1)
            last = events[-1]
            assert last["action"] == "import" and last["data"]["mode"] == "restore"
            assert len({e["created_at"] for e in events}) == 1  # one change
            code, conns = d.http("/api/settings/connections")
            assert code == 200
            assert sorted(c["id"] for c in conns) == [f"conn_{i:05d}" for i in range(4)]
            assert d.http("/api/data/ui-config")[1] != {"theme": "light"}
            assert CANARY not in json.dumps(events)
            # An algorithm the archive lacks is removed, its file too (else the next start
            # would read it back)
            assert not (data_dir / "algorithms/later.json").exists()
        assert d.stop() == 0
    finally:
        d.close()
    assert leftovers(data_dir) == []
    assert stored_under(data_dir, [key], expected) == {key.id}


async def test_restore_of_a_name_that_is_no_restore_archive_is_invalid(daemon: Daemon) -> None:
    async with bus(daemon) as b:
        for name in ("../x.tar.gz", ".restore-\0.tar.gz", ".restore-x.zip", ".restore-/x.tar.gz"):
            err = await b.err("data.restore", file=name)
            assert err["code"] == "invalid" and err["path"] == "$.file", (name, err)
    assert "command_failed" not in daemon.stdout()


async def test_restore_refuses_an_archive_under_another_key(data_dir: Path, tmp_path: Path) -> None:
    """Made under key A, restored into a daemon running with key B: refused, nothing changed."""
    write_plain_data(data_dir, connections=2)
    make_key(tmp_path / "a")
    make_key(tmp_path / "b")
    other = tmp_path / "other"
    write_plain_data(other, connections=2)
    archive = tmp_path / "a.tar.gz"
    backup_while_running(keyed(other, tmp_path / "a"), archive)
    d = keyed(data_dir, tmp_path / "b")
    try:
        d.start()
        before = (data_dir / "connections.json").read_bytes()
        r = cli(d, "restore", str(archive), "--data-dir", str(data_dir))
        assert r.returncode != 0
        assert "do not decrypt with the configured key" in r.stderr, r.stderr
        assert (data_dir / "connections.json").read_bytes() == before
        assert leftovers(data_dir) == []
        assert d.stop() == 0
    finally:
        d.close()


def _manifest(path: Path) -> Any:
    return msgspec.to_builtins(backup.read_archive(path).manifest)


def test_offline_backup_still_works_after_an_online_one(data_dir: Path, tmp_path: Path) -> None:
    write_plain_data(data_dir, connections=2)
    d = Daemon(data_dir)
    try:
        d.start()
        r = cli(d, "backup", "-o", str(tmp_path / "on.tar.gz"), "--data-dir", str(data_dir))
        assert r.returncode == 0, r.stderr
        assert d.stop() == 0
    finally:
        d.close()
    r = cli(d, "backup", "-o", str(tmp_path / "off.tar.gz"), "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stderr
    on, off = _manifest(tmp_path / "on.tar.gz"), _manifest(tmp_path / "off.tar.gz")
    assert on["files"] == off["files"] and on["revision"] == off["revision"]


async def test_kill_9_during_an_online_restore_leaves_old_or_new(
    data_dir: Path, tmp_path: Path
) -> None:
    """The restore is one journalled change: after a kill at any moment the daemon starts
    with the content from before or the archive's, never a mix, every secret readable."""
    write_plain_data(data_dir, connections=1000)
    expected = plaintexts(data_dir)
    key = make_key(tmp_path / "key")
    archive = tmp_path / "b.tar.gz"
    backup_while_running(keyed(data_dir, tmp_path / "key"), archive)
    rng = random.Random(5)
    outcomes = []
    took = 0.0
    for n in range(7):
        d = keyed(data_dir, tmp_path / "key")
        try:
            d.start()
            async with bus(d) as b:
                # Away from the archive's content: every connection renamed, in one change.
                updates = [{"id": f"conn_{i:05d}", "name": f"moved {n}"} for i in range(1000)]
                await b.ok("connections.batch_update", updates=updates)
                name = f"{RESTORE_PREFIX}test{n}{SUFFIX}"
                shutil.copyfile(archive, data_dir / name)
                t0 = time.monotonic()
                msg_id = await b.send("data.restore", file=name)
                if n in (0, 6):  # runs to the end (the first: how long a restore takes here)
                    assert (await b.result(msg_id, timeout=60))["success"]
                    took = took or time.monotonic() - t0
                elif n > 1:  # killed somewhere in the restore (round 1: at once, before it)
                    await anyio.sleep(rng.uniform(0.0, took))
                d.kill()
        finally:
            d.close()
        d = keyed(data_dir, tmp_path / "key")
        try:
            d.start()
            names = {c["name"] for c in d.http("/api/settings/connections")[1]}
            assert leftovers(data_dir) == []  # a hand-over cut by the kill is tidied at start
            assert d.stop() == 0
        finally:
            d.close()
        restored = {f"Conn {i}" for i in range(1000)}
        assert names in (restored, {f"moved {n}"}), sorted(names)[:3]
        outcomes.append(names == restored)
        if names == restored:
            assert stored_under(data_dir, [key], expected) == {key.id}
    # killed before the restore could commit, and after it did: both outcomes were seen
    assert outcomes[1] is False and outcomes[6] is True, (outcomes, took)


async def test_backups_asked_for_in_a_loop_never_fill_the_disk(daemon: Daemon) -> None:
    """Any token holder may ask for a backup over the bus; each is a copy of every file left
    in the data dir for its CLI to take. At most MAX_WAITING wait: then `rate_limited`."""
    async with bus(daemon) as b:
        made = [await b.ok("data.backup") for _ in range(MAX_WAITING)]
        assert len({m["file"] for m in made}) == MAX_WAITING
        err = await b.err("data.backup")
        assert err["code"] == "rate_limited" and "wait in the data dir" in err["message"]
        assert len([n for n in leftovers(daemon.data_dir) if n.startswith(".backup-")]) == 4
        (daemon.data_dir / made[0]["file"]).unlink()  # taken by its CLI
        assert (await b.ok("data.backup"))["file"]
        # Left uncollected past a minute, they make room (never hold a backup off long).
        old = time.time() - TAKEN_WITHIN_S - 1
        handed = daemon.data_dir / f"{RESTORE_PREFIX}handed-over{SUFFIX}"
        handed.write_bytes(b"")  # a restore the daemon has yet to open: it stays
        for name in leftovers(daemon.data_dir):
            os.utime(daemon.data_dir / name, (old, old))
        assert (await b.ok("data.backup"))["file"]
        assert sorted(leftovers(daemon.data_dir))[1:] == [handed.name]


def test_archives_from_before_the_clock_stepped_back_make_room(tmp_path: Path) -> None:
    """Archives made before the clock stepped back an hour have mtimes ahead of it: their
    age came out negative, so none was ever old enough to go, and MAX_WAITING of them held
    every backup off (`rate_limited`) until the clock got there."""
    ahead = time.time() + 3600
    for i in range(MAX_WAITING):
        made = tmp_path / f"{livebackup.BACKUP_PREFIX}{i}{SUFFIX}"
        made.write_bytes(b"")
        os.utime(made, (ahead, ahead))
    just_made = tmp_path / f"{livebackup.BACKUP_PREFIX}now{SUFFIX}"
    just_made.write_bytes(b"")  # (its CLI is about to take it: it stays)
    assert livebackup.waiting_backups(tmp_path) == 1
    assert just_made.exists()
