"""The copies the daemon keeps of its files, judged at start (no daemon: files only)."""

from __future__ import annotations

import errno
import json
import shutil
import time
from pathlib import Path

import anyio
import pytest

from ctsd import bases, ops
from ctsd import checkpoint as checkpoints
from ctsd.atomic import TEMP_PREFIX, ensure_dir, write_files
from ctsd.bases import Bases, CopyUnusable
from ctsd.secretbox import SecretBox, new_key_text, parse_key
from ctsd.store import Store
from tests.daemon import wait_until_async
from tests.datadir import before_each_rename, connection
from tests.inprocess import then_killed

FILE = "connections.json"
V1 = b'[\n  {"id": "c1"}\n]\n'
V2 = b'[\n  {"id": "c1", "name": "two"}\n]\n'
EDIT = b'[\n  {"id": "c1", "name": "by hand"}\n]\n'


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    ensure_dir(d)
    return d


def checkpoint(b: Bases, data_dir: Path, body: bytes) -> None:
    """What a checkpoint round does: the copy and the file, in one group (copy first)."""
    group = [(data_dir / FILE, body)]
    copies, digests = b.copies(group)
    write_files(copies + group)
    b.written(digests)


def judge(data_dir: Path, created: set[str] | None = None, invalid: set[str] | None = None):
    return Bases(data_dir).judge([FILE], created or set(), invalid or set())


def test_a_file_as_the_daemon_wrote_it_is_not_edited(data_dir: Path) -> None:
    b = Bases(data_dir)
    checkpoint(b, data_dir, V1)
    checkpoint(b, data_dir, V2)
    judged = judge(data_dir)
    assert judged.edited == {} and judged.deleted == {}


def test_a_file_edited_while_down_keeps_the_last_write_as_its_base(data_dir: Path) -> None:
    b = Bases(data_dir)
    checkpoint(b, data_dir, V1)
    checkpoint(b, data_dir, V2)
    (data_dir / FILE).write_bytes(EDIT)
    judged = judge(data_dir)
    assert judged.edited == {FILE: V2}
    assert (data_dir / FILE).read_bytes() == EDIT  # never touched
    # judged again (a start that failed later): still the same base
    assert judge(data_dir).edited == {FILE: V2}


def test_a_round_cut_between_its_two_renames_is_no_edit(data_dir: Path) -> None:
    """The copy of V2 renamed, the file not: the file is the daemon's write before it."""
    b = Bases(data_dir)
    checkpoint(b, data_dir, V1)
    copies, _ = b.copies([(data_dir / FILE, V2)])
    write_files(copies)  # the crash came before the file's rename
    assert (data_dir / FILE).read_bytes() == V1
    judged = judge(data_dir)
    assert judged.edited == {} and judged.deleted == {}
    # the copy now matches the file again
    assert (data_dir / bases.DIR / FILE).read_bytes().endswith(b"\n" + V1)


def test_an_edit_after_a_cut_round_is_still_an_edit(data_dir: Path) -> None:
    b = Bases(data_dir)
    checkpoint(b, data_dir, V1)
    copies, _ = b.copies([(data_dir / FILE, V2)])
    write_files(copies)
    (data_dir / FILE).write_bytes(EDIT)
    assert FILE in judge(data_dir).edited


def test_a_file_deleted_while_down_is_written_again_from_its_copy(data_dir: Path) -> None:
    b = Bases(data_dir)
    checkpoint(b, data_dir, V1)
    (data_dir / FILE).write_bytes(b"[]\n")  # what the start creates for a missing file
    judged = judge(data_dir, created={FILE})
    assert judged.deleted == {FILE: V1} and judged.edited == {}


def test_a_file_without_a_copy_is_read_as_it_is_and_gets_one(data_dir: Path) -> None:
    (data_dir / FILE).write_bytes(V1)
    assert judge(data_dir).edited == {}
    (data_dir / FILE).write_bytes(EDIT)
    assert judge(data_dir).edited == {FILE: V1}


@pytest.mark.parametrize(
    "copy",
    [b"", b"garbage", b"ctsd-base 1 zz\n[]\n", b"ctsd-base 1 " + b"ab" * 10 + b"\n[]\n"],
    ids=["empty", "garbage", "bad-hex", "short-digest"],
)
def test_a_copy_that_is_not_one_is_ignored_and_replaced(data_dir: Path, copy: bytes) -> None:
    (data_dir / FILE).write_bytes(V1)
    ensure_dir(data_dir / bases.DIR)
    (data_dir / bases.DIR / FILE).write_bytes(copy)
    (data_dir / bases.DIR / FILE).chmod(0o600)
    assert judge(data_dir).edited == {}
    (data_dir / FILE).write_bytes(EDIT)
    assert judge(data_dir).edited == {FILE: V1}


def test_a_file_broken_while_down_is_edited_with_its_copy_as_base(data_dir: Path) -> None:
    b = Bases(data_dir)
    checkpoint(b, data_dir, V1)
    (data_dir / FILE).write_bytes(b"[{")
    assert judge(data_dir, invalid={FILE}).edited == {FILE: V1}
    assert (data_dir / FILE).read_bytes() == b"[{"  # left as the operator left it
    assert (data_dir / bases.DIR / FILE).read_bytes().endswith(b"\n" + V1)
    bases.drop(data_dir)
    assert judge(data_dir, invalid={FILE}).edited == {}  # no copy: the intake's alone


def test_a_hand_edit_taken_in_as_it_is_becomes_the_copy(data_dir: Path) -> None:
    b = Bases(data_dir)
    checkpoint(b, data_dir, V1)
    (data_dir / FILE).write_bytes(EDIT)
    b.keep(FILE, EDIT)  # taken in; memory now is what the file holds
    assert judge(data_dir).edited == {}


def test_a_hand_edit_set_back_while_down_to_the_write_before_it_is_an_edit(
    data_dir: Path,
) -> None:
    """The daemon wrote V1, a hand edit was taken in (its copy), then, while the daemon was
    down, the operator put V1 back (vim's backup, git): an edit, not the daemon's write."""
    b = Bases(data_dir)
    checkpoint(b, data_dir, V1)
    (data_dir / FILE).write_bytes(EDIT)
    b.keep(FILE, EDIT)
    (data_dir / FILE).write_bytes(V1)
    assert judge(data_dir).edited == {FILE: EDIT}


def test_after_a_clean_stop_the_write_before_the_last_put_back_is_an_edit(
    data_dir: Path,
) -> None:
    """No round was cut (the daemon stopped cleanly): a file one version behind its copy is
    the operator's (a backup put back), however much it looks like a cut round."""
    b = Bases(data_dir)
    checkpoint(b, data_dir, V1)
    checkpoint(b, data_dir, V2)
    b.stopped_cleanly()
    (data_dir / FILE).write_bytes(V1)
    b = Bases(data_dir)
    assert b.judge([FILE], set(), set()).edited == {FILE: V2}
    assert judge(data_dir).edited == {FILE: V2}  # a start refused after judging: the same
    b.unmark()  # the store's first write
    assert not (data_dir / bases.DIR / bases.CLEAN).exists()  # it counts at one start
    assert judge(data_dir).edited == {FILE: V2}  # a start that failed later: still an edit
    assert (data_dir / FILE).read_bytes() == V1  # never touched


def test_the_clean_stop_counts_at_one_start_only(data_dir: Path) -> None:
    """Once a start has seen the mark, a round a crash cuts is no edit again."""
    b = Bases(data_dir)
    checkpoint(b, data_dir, V1)
    b.stopped_cleanly()
    assert judge(data_dir).edited == {}
    b = Bases(data_dir)
    b.judge([FILE], set(), set())  # the copies' digests, as a start learns them
    b.unmark()  # ... and the store's first write
    copies, _ = b.copies([(data_dir / FILE, V2)])
    write_files(copies)  # the crash came before the file's rename
    assert judge(data_dir).edited == {}


def test_drop_forgets_every_copy(data_dir: Path) -> None:
    b = Bases(data_dir)
    checkpoint(b, data_dir, V1)
    bases.drop(data_dir)
    assert not (data_dir / bases.DIR).exists()
    (data_dir / FILE).write_bytes(EDIT)
    assert judge(data_dir).edited == {}


def test_a_restore_cut_between_its_two_renames_is_no_edit(data_dir: Path) -> None:
    """A file deleted while down, its restore round then cut after the copy's rename: the
    default content the start created is the daemon's own write, not an edit."""
    b = Bases(data_dir)
    checkpoint(b, data_dir, V1)
    (data_dir / FILE).write_bytes(b"[]\n")  # created by the start
    b = Bases(data_dir)
    assert b.judge([FILE], {FILE}, set()).deleted == {FILE: V1}
    copies, _ = b.copies([(data_dir / FILE, V1)])
    write_files(copies)  # the restore's copy renamed, then the crash
    judged = judge(data_dir)
    assert judged.edited == {} and judged.deleted == {}


def test_an_algorithm_deleted_while_down_is_an_edit(data_dir: Path) -> None:
    algo = "algorithms/trend.json"
    ensure_dir(data_dir / "algorithms")
    b = Bases(data_dir)
    group = [(data_dir / algo, b'{"name": "trend"}\n')]
    copies, digests = b.copies(group)
    write_files(copies + group)
    b.written(digests)
    (data_dir / algo).unlink()
    assert Bases(data_dir).judge([FILE], set(), set()).edited == {algo: b'{"name": "trend"}\n'}
    Bases(data_dir).forget(data_dir / algo)  # removed from memory: its copy goes
    assert Bases(data_dir).judge([FILE], set(), set()).edited == {}


def test_an_algorithm_added_while_down_is_an_edit_once_copies_exist(data_dir: Path) -> None:
    algo = "algorithms/trend.json"
    ensure_dir(data_dir / "algorithms")
    (data_dir / algo).write_bytes(b'{"name": "trend"}\n')
    (data_dir / FILE).write_bytes(V1)
    # the first start: every file as it is, and copied
    assert Bases(data_dir).judge([FILE, algo], set(), set()).edited == {}
    assert Bases(data_dir).judge([FILE, algo], set(), set()).edited == {}
    added = "algorithms/fresh.json"
    (data_dir / added).write_bytes(b'{"name": "fresh"}\n')
    assert Bases(data_dir).judge([FILE, algo, added], set(), set()).edited == {added: None}


# --- with the store (no daemon): what a start does with the judged files ---------------------


def opened_store(data_dir: Path) -> tuple[Store, list[str]]:
    """A store opened as the daemon opens it: load, set back, replay."""
    store = Store(data_dir)
    copies = Bases(data_dir)
    store.load(copies)
    edited = store.set_back(copies)
    store.replay()
    return store, edited


@pytest.mark.anyio
async def test_state_records_survive_connections_edited_while_down(data_dir: Path) -> None:
    """connections.json edited while down (a connection taken out): its state record is
    not mirrored away before the copy sets memory back (the edit is taken in later)."""
    store, _ = opened_store(data_dir)
    await store.start()
    for cid in ("c1", "c2"):
        await store.submit(ops.create(connection(cid)), "bus")
    await store.submit(ops.set_volume("c2", live=2.5), "bus", sync="files")
    await store.close()
    rows = json.loads((data_dir / FILE).read_text())
    (data_dir / FILE).write_text(json.dumps(rows[:1], indent=2) + "\n")
    store, edited = opened_store(data_dir)
    assert edited == [FILE]
    assert sorted(store.connections) == ["c1", "c2"]
    st = store.state_view("c2")
    assert st is not None and st.volume_factor_live == 2.5
    store.journal.close()


@pytest.mark.anyio
async def test_a_hand_edit_taken_in_becomes_the_copy(data_dir: Path) -> None:
    """Taken in while running (a write of the file may follow): a start after a kill then
    finds no edit, whether or not that write happened."""
    store, _ = opened_store(data_dir)
    await store.start()
    await store.submit(ops.create(connection("c1")), "bus", sync="files")
    rows = json.loads((data_dir / FILE).read_text())
    rows[0]["name"] = "by hand"
    (data_dir / FILE).write_text(json.dumps(rows) + "\n")  # not laid out as the daemon does
    assert await store.ingest(FILE)
    await store.close()
    _, edited = opened_store(data_dir)
    assert edited == []


@pytest.mark.anyio
async def test_an_edit_found_at_start_is_judged_against_a_crash_until_the_store_starts(
    data_dir: Path,
) -> None:
    """The digests of the files found edited at start are what a cluster host's catch-up
    judges its own hand edits from before a crash by (`taken_in_before_a_crash`). Once the
    store has started (a start that could not catch up applies the stream later, while the
    rounds write), they no longer say what the files hold: a tag matching one must not make
    the file known as found, else the edit made while the daemon was down is never taken
    in."""
    store, _ = opened_store(data_dir)
    await store.start()
    await store.submit(ops.create(connection("c1")), "bus", sync="files")
    await store.close()
    rows = json.loads((data_dir / FILE).read_text())
    rows[0]["name"] = "by hand, while down"
    (data_dir / FILE).write_text(json.dumps(rows, indent=2) + "\n")
    store, edited = opened_store(data_dir)
    assert edited == [FILE]
    tags = {FILE: store.box.tag(store._found[FILE])}  # as the stream's message would carry
    await store.start()
    try:
        assert await store.taken_in_before_a_crash(tags) == {}
        await store.take_in_edited(edited)
        assert store.connections["c1"].name == "by hand, while down"
    finally:
        await store.close()


@pytest.mark.anyio
async def test_an_algorithm_deleted_while_down_with_the_instances_that_named_it_goes(
    data_dir: Path,
) -> None:
    """Deleted, and instances.json edited to stop naming it, both while the daemon was
    down: taken in algorithm first, the deletion met the old instances.json, was refused,
    and the file came back from memory."""
    store, _ = opened_store(data_dir)
    await store.start()
    await store.submit(ops.set_document("algorithms/foo", {"name": "foo", "period": 14}), "bus")
    inst = {"instances": [{"id": "i1", "name": "one", "symbol": "BTC", "algorithmName": "foo"}]}
    await store.submit(ops.set_document("instances", inst), "bus", sync="files")
    await store.close()
    (data_dir / "instances.json").write_text(json.dumps({"instances": []}, indent=2) + "\n")
    (data_dir / "algorithms" / "foo.json").unlink()
    store, edited = opened_store(data_dir)
    assert sorted(edited) == ["algorithms/foo.json", "instances.json"]
    await store.start()
    try:
        await store.take_in_edited(edited)
        await store.checkpointer.flush()
        assert "algorithms/foo" not in store.documents
        assert store.documents["instances"]["instances"] == []
        assert not (data_dir / "algorithms" / "foo.json").exists()
    finally:
        await store.close()


@pytest.mark.anyio
async def test_a_crash_between_the_renames_of_the_start_sealing_write_is_no_edit(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first start with a key writes the plain secrets back encrypted, a write with no
    change in the journal behind it: killed between its copy's rename and its file's, the
    file holds the plain version the copy names as the one before, which is the daemon's
    own write cut short, no hand edit."""
    store, _ = opened_store(data_dir)
    await store.start()
    doc = {"projectX": {"apiUrl": "https://px.example", "apiKey": "PLAIN-KEY-123456"}}
    await store.submit(ops.set_document("connection", doc), "bus", sync="files")
    await store.close()
    crashed = tmp_path / "crashed"
    target = data_dir / "connection.json"

    def killed_at(dst: Path) -> None:
        if dst == target and not crashed.exists():
            shutil.copytree(data_dir, crashed)  # what a kill -9 now leaves
            raise OSError("killed")

    before_each_rename(monkeypatch, killed_at)
    box = SecretBox(parse_key(new_key_text(), "k"))
    store = Store(data_dir, box)
    copies = Bases(data_dir)
    store.load(copies)
    store.set_back(copies)
    store.replay()
    await store.start()
    await wait_until_async(crashed.exists, what="the sealing write")
    monkeypatch.undo()
    await store.close()
    assert b"PLAIN-KEY-123456" in (crashed / "connection.json").read_bytes()
    again = Store(crashed, box)
    copies = Bases(crashed)
    again.load(copies)
    assert again.set_back(copies) == []
    again.replay()
    again.journal.close()


@pytest.mark.anyio
@pytest.mark.parametrize("keyed", [False, True], ids=["no key", "secrets sealed at start"])
async def test_replayed_changes_stay_in_the_journal_until_their_file_is_written(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keyed: bool
) -> None:
    """The changes a start replays were noted at the journal's last lsn as their files'
    first: a first round that could not write one (disk full) then cut them all, and a kill
    before the retry lost them (with secrets sealed at start, one replayed change was
    enough: its record came after them)."""
    store, _ = opened_store(data_dir)
    await store.start()
    doc = {"projectX": {"apiUrl": "https://px.example", "apiKey": "PLAIN-KEY-123456"}}
    await store.submit(ops.set_document("connection", doc), "bus", sync="files")
    await store.submit(ops.set_document("ui-config", {"theme": "light"}), "bus", sync="files")
    await store.close()
    async with then_killed(data_dir, copies=True) as s:
        await s.submit(ops.set_document("ui-config", {"theme": "dark"}), "bus")
        await s.submit(ops.set_document("ui-config", {"theme": "dark", "font": "big"}), "bus")
    target = data_dir / "ui-config.json"

    def disk_full(dst: Path) -> None:
        if dst == target:
            raise OSError(errno.ENOSPC, "No space left on device")

    before_each_rename(monkeypatch, disk_full)
    box = SecretBox(parse_key(new_key_text(), "k")) if keyed else None
    store = Store(data_dir, box)
    copies = Bases(data_dir)
    store.load(copies)
    store.set_back(copies)
    store.replay()
    await store.start()  # its first round cannot write ui-config.json
    crashed = tmp_path / "crashed"
    shutil.copytree(data_dir, crashed)  # killed now
    monkeypatch.undo()
    await store.close()
    assert json.loads((crashed / "ui-config.json").read_text()) == {"theme": "light"}
    again = Store(crashed, box)
    again.open()
    try:
        assert again.documents["ui-config"] == {"theme": "dark", "font": "big"}
    finally:
        again.journal.close()


@pytest.mark.anyio
async def test_a_start_refused_after_sealing_leaves_a_journal_a_trimmed_sync_log_still_takes(
    data_dir: Path,
) -> None:
    """A start with a key refused before the door opened (its port taken) leaves the journal
    as it found it: a sync log emptied by hand after it is taken as any such edit (a record
    of the sealing left behind made the journal look like another data dir's)."""
    store, _ = opened_store(data_dir)
    await store.start()
    conn = connection("c1", name="one")
    await store.submit(ops.create({**conn, "api_secret": "PLAIN-SECRET-1"}), "bus", sync="files")
    await store.submit(ops.update("c1", {"name": "two"}), "bus", sync="files")
    await store.close()
    box = SecretBox(parse_key(new_key_text(), "k"))
    refused = Store(data_dir, box)
    refused.open()
    await refused.abandon()
    (data_dir / "connection-sync-log.json").write_text("[]\n")
    again = Store(data_dir, box)
    again.open()
    await again.start()
    try:
        await again.submit(ops.update("c1", {"name": "three"}), "bus")
        assert again.revision == 3  # ids are never given out again
    finally:
        await again.close()


@pytest.mark.anyio
async def test_a_clean_close_marks_the_copies_for_the_next_start(data_dir: Path) -> None:
    store, _ = opened_store(data_dir)
    await store.start()
    await store.submit(ops.create(connection("c1")), "bus", sync="files")
    before = (data_dir / FILE).read_bytes()
    await store.submit(ops.update("c1", {"name": "later"}), "bus", sync="files")
    await store.close()
    assert (data_dir / bases.DIR / bases.CLEAN).exists()
    (data_dir / FILE).write_bytes(before)  # the write before the last, put back meanwhile
    store, edited = opened_store(data_dir)
    assert edited == [FILE] and store.connections["c1"].name == "later"  # taken in later
    store.journal.close()


def test_copies_of_an_earlier_version_are_adopted_and_cut_writes_tidied(data_dir: Path) -> None:
    """Copies kept under the directory's old name (when only cluster hosts kept them) still
    judge the files; what a crash cut short among them is removed at start."""
    b = Bases(data_dir)
    checkpoint(b, data_dir, V1)
    (data_dir / bases.DIR).rename(data_dir / bases.LEGACY_DIR)
    temp = data_dir / bases.LEGACY_DIR / f"{TEMP_PREFIX}{FILE}.0123"
    temp.write_bytes(b"half")
    (data_dir / FILE).write_bytes(EDIT)
    assert judge(data_dir).edited == {FILE: V1}
    assert not (data_dir / bases.LEGACY_DIR).exists()
    assert not (data_dir / bases.DIR / temp.name).exists()


@pytest.mark.anyio
async def test_a_file_deleted_while_down_is_written_again_from_its_copy_at_once(
    data_dir: Path,
) -> None:
    """Never from its defaults first: a start refused after that (or a kill) must not leave
    an empty connections.json that the next start takes for an edit deleting everything."""
    store, _ = opened_store(data_dir)
    await store.start()
    await store.submit(ops.create(connection("c1")), "bus", sync="files")
    await store.close()
    written = (data_dir / FILE).read_bytes()
    (data_dir / FILE).unlink()
    store = Store(data_dir)
    store.load(Bases(data_dir))  # a start refused right after this
    store.journal.close()
    assert (data_dir / FILE).read_bytes() == written
    store, edited = opened_store(data_dir)
    assert edited == [] and list(store.connections) == ["c1"]
    store.journal.close()


def test_a_file_deleted_while_down_whose_copy_cannot_be_used_stops_the_start(
    data_dir: Path,
) -> None:
    """Neither its defaults (an edit emptying it, for the next start) nor a guess: the start
    stops, naming the copy and what to do, and writes nothing."""
    b = Bases(data_dir)
    checkpoint(b, data_dir, V1)
    (data_dir / FILE).unlink()
    (data_dir / bases.DIR / FILE).chmod(0o644)
    with pytest.raises(CopyUnusable, match=r"deleted while .* lets other users read it.*put"):
        Store(data_dir).load(Bases(data_dir))
    assert not (data_dir / FILE).exists()


def test_one_host_puts_copies_aside_and_writes_them_after_the_files(data_dir: Path) -> None:
    """`later` (one host, the tables): a round removes the file's copy durably before writing
    the file (a copy older than its file would read as an edit), and the copy follows once
    idle, naming no previous version; a hand edit taken in meanwhile is not overwritten."""
    b = Bases(data_dir)
    checkpoint(b, data_dir, V1)
    b.later = True
    assert not b.later_for(data_dir / FILE)  # written after a pause: its copy in the round
    b.tables_written([data_dir / FILE, data_dir / "settings.json"])  # (a round, just now)
    assert b.later_for(data_dir / FILE) and not b.later_for(data_dir / "settings.json")
    b.put_aside([data_dir / FILE])
    assert not (data_dir / bases.DIR / FILE).exists()
    write_files([(data_dir / FILE, V2)])
    b.left([(data_dir / FILE, V2)])
    assert judge(data_dir).edited == {}  # no copy: read as it is
    b.catch_up()
    assert (data_dir / bases.DIR / FILE).read_bytes() == b"ctsd-base 1 -\n" + V2
    assert b.pending == {} and judge(data_dir).edited == {}
    b.left([(data_dir / FILE, V1)])
    b.put_aside([data_dir / FILE])  # written again (a write that may fail half way): the
    assert b.pending == {}  # older content left for later is no copy of it any more
    b.left([(data_dir / FILE, V1)])
    b.keep(FILE, EDIT)  # taken in: the copy is the hand edit's, the left one is dropped
    b.catch_up()
    assert (data_dir / bases.DIR / FILE).read_bytes().endswith(b"\n" + EDIT)


def test_a_removal_not_made_durable_is_synced_by_the_next_round(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy's removal done, its directory's sync failed (the round fails): the retry finds
    no copy, and must still sync the directory before its file is written, or a power cut
    could bring the old copy back beside the newer file (read as an edit: a lost update)."""
    b = Bases(data_dir)
    checkpoint(b, data_dir, V1)
    synced: list[Path] = []

    def fsync_dir(d: Path) -> None:
        synced.append(d)
        if len(synced) == 1:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(bases, "fsync_dir", fsync_dir)
    with pytest.raises(OSError):
        b.put_aside([data_dir / FILE])
    assert not (data_dir / bases.DIR / FILE).exists()
    b.put_aside([data_dir / FILE])
    assert synced == [data_dir / bases.DIR] * 2


def test_an_algorithm_added_while_down_is_seen_when_a_table_has_no_copy(data_dir: Path) -> None:
    """Whether copies were made before is told by settings.json's (a table's may be put
    aside): an algorithm file without a copy is then one added while the daemon was down."""
    for name in (FILE, "settings.json"):
        (data_dir / name).write_bytes(b"{}\n" if name == "settings.json" else V1)
    names = [FILE, "settings.json"]
    Bases(data_dir).judge(names, set(), set())  # the copies a first start makes
    Bases(data_dir).put_aside([data_dir / FILE])
    ensure_dir(data_dir / "algorithms")
    (data_dir / "algorithms" / "grid.json").write_bytes(b"{}\n")
    judged = Bases(data_dir).judge([*names, "algorithms/grid.json"], set(), set())
    assert judged.edited == {"algorithms/grid.json": None}


@pytest.mark.anyio
async def test_a_table_left_alone_gets_its_copy_while_the_other_streams(data_dir: Path) -> None:
    """One host: connection-state.json written change after change (volumes, periodic tests
    of many connections) never holds up connections.json's copy, written once that file was
    left alone for COPY_IDLE_S; the streaming table keeps none meanwhile."""
    store, _ = opened_store(data_dir)
    assert store.checkpointer.bases is not None
    store.checkpointer.bases.later = True
    await store.start()
    await store.submit(ops.create(connection("c1")), "bus", sync="files")
    await store.submit(ops.update("c1", {"name": "renamed"}), "bus", sync="files")
    renamed = time.monotonic()
    copy, state_copy = (data_dir / bases.DIR / f for f in (FILE, "connection-state.json"))
    n = 0
    while not (copy.exists() and b'"renamed"' in copy.read_bytes()):
        assert time.monotonic() < renamed + 10, "connections.json's copy never followed"
        n += 1
        await store.submit(ops.set_volume("c1", live=1 + n / 1000), "bus", sync="files")
        if n > 1:  # (the first may come after a pause: its copy in the round)
            assert not state_copy.exists()  # (written just now, streaming: put aside)
        await anyio.sleep(0.05)
    assert time.monotonic() - renamed >= checkpoints.COPY_IDLE_S  # not at once
    await store.close()
    state = (data_dir / "connection-state.json").read_bytes()
    assert state_copy.read_bytes() == b"ctsd-base 1 -\n" + state  # a clean stop writes it


@pytest.mark.anyio
async def test_a_table_written_after_a_pause_has_its_copy_in_the_round(data_dir: Path) -> None:
    """One host: a heartbeat flush or an operator's change after a pause writes the table's
    copy with it, as every other file's, so a kill -9 right after it finds the copy (without
    one, the next start read an edit made while down as it is, without an event, and a table
    broken or deleted meanwhile came back empty). Only a table written change after change
    leaves its copy for later."""
    store, _ = opened_store(data_dir)
    assert store.checkpointer.bases is not None
    store.checkpointer.bases.later = True
    await store.start()
    await store.submit(ops.create(connection("c1")), "bus", sync="files")
    file, copy = data_dir / "connection-state.json", data_dir / bases.DIR / "connection-state.json"

    def copy_current() -> bool:
        return copy.exists() and copy.read_bytes().split(b"\n", 1)[1] == file.read_bytes()

    for n in (1, 2):
        # (left alone: the copy follows, COPY_IDLE_S after the last write)
        await wait_until_async(copy_current, timeout=10)
        quiet = time.monotonic()
        while time.monotonic() - quiet < checkpoints.COPY_IDLE_S:
            await anyio.sleep(0.05)
        await store.submit(ops.set_volume("c1", live=1 + n), "bus", sync="files")
        assert json.loads(file.read_bytes())[0]["volume_factor_live"] == 1 + n
        assert copy_current()  # at once: no moment without it
    await store.close()
