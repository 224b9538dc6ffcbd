"""The journal (`DATA/.journal`, `ctsd.journal`): what a crash may leave of it, read back.

The first half drives `Journal` itself: a torn tail cut at every byte offset of the last
record is dropped and everything before it replays; a damaged record in the middle, a file
that is no journal, a journal of other files are refused with one clear line, and nothing is
changed on disk. The second half is the power cut end to end with the real daemon: a change a
real bus client got its acknowledgement for survives `kill -9` straight after the ack, before
any checkpoint, and is in the data files by the time the restarted daemon says READY.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import connect

from ctsd import atomic, files, journal, ops
from ctsd.core import Change, Committed, Context, Request, apply_group
from ctsd.journal import Journal, JournalError, scan_journal
from tests.daemon import Daemon, wait_until


def changes(n: int, first: int = 0) -> list[Change]:
    """`n` groups of changes as the daemon makes them: a create, then updates of it."""
    c = Committed()
    out = []
    for i in range(n):
        op = (
            ops.create({"id": "conn_a", "name": "n0", "exchange": "bybit"})
            if i == 0
            else ops.update("conn_a", {"name": f"n{first + i}", "margin_type": "isolated"})
        )
        (o,), change = apply_group(
            c, [Request(op, "bus")], Context(f"2026-01-01T00:00:{i:02}.000Z")
        )
        assert o.error is None
        c.apply(change)
        out.append(change)
    return out


def write_journal(data_dir: Path, chs: list[Change], base: int = 0) -> bytes:
    data_dir.mkdir(parents=True, exist_ok=True)
    j = Journal(data_dir)
    assert j.open(base).changes == []
    for ch in chs:
        j.append(ch)
    j.close()
    return (data_dir / journal.NAME).read_bytes()


def open_with(data_dir: Path, chs: list[Change]) -> Journal:
    """A new journal on `data_dir` holding `chs`, open for appends."""
    write_journal(data_dir, [])
    j = Journal(data_dir)
    j.open(0)
    for ch in chs:
        j.append(ch)
    return j


def record_ends(raw: bytes) -> list[int]:
    scan = scan_journal(raw, "j", 10**9)
    assert scan is not None
    return [scan.header_end, *(end for _lsn, end in scan.offsets)]


def journal_and_scratch(tmp_path: Path, n: int) -> tuple[list[Change], bytes, list[int], Path]:
    """A journal of `n` changes: the changes, its bytes, where each frame ends, and an empty
    data dir to write variants of it into."""
    chs = changes(n)
    raw = write_journal(tmp_path / "orig", chs)
    scratch = tmp_path / "d"
    scratch.mkdir()
    return chs, raw, record_ends(raw), scratch


def enc(chs: list[Change]) -> list[bytes]:
    return [msgspec.json.encode(c) for c in chs]


def fingerprint(directory: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under `directory`: (sha256, inode, mtime_ns) — a rewrite changes the inode
    or the time even when the bytes come out the same."""
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            st = path.stat()
            out[str(path.relative_to(directory))] = (
                hashlib.sha256(path.read_bytes()).hexdigest(),
                st.st_ino,
                st.st_mtime_ns,
            )
    return out


# --- a torn tail ------------------------------------------------------------------------------


def test_a_tail_torn_at_every_byte_of_the_last_record_is_dropped_and_the_rest_replays(
    tmp_path: Path,
) -> None:
    chs, raw, ends, d = journal_and_scratch(tmp_path, 4)
    last_start, last_end = ends[-2], ends[-1]
    assert last_end == len(raw) and last_end - last_start > 100
    for cut in range(last_start, last_end + 1):
        (d / journal.NAME).write_bytes(raw[:cut])
        j = Journal(d)
        got = j.open(0)
        whole = cut == last_end
        assert enc(got.changes) == enc(chs if whole else chs[:-1]), cut
        # (Zeros that end it read as the room ahead, `Journal.grow`: not counted.)
        torn = len(raw[last_start:cut].rstrip(b"\0"))
        assert got.dropped_bytes == (0 if whole else torn), cut
        # The torn tail is cut off the file, so the next append follows the good records.
        assert (d / journal.NAME).stat().st_size == (last_end if whole else last_start)
        j.append(chs[-1])
        j.close()
        again = Journal(d)
        assert enc(again.open(0).changes) == enc(chs if not whole else [*chs, chs[-1]]), cut
        again.close()


def test_a_last_record_with_a_wrong_checksum_is_a_torn_tail(tmp_path: Path) -> None:
    """A crash may leave the last record whole in length but not in content."""
    chs = changes(3)
    raw = bytearray(write_journal(tmp_path, chs))
    raw[-1] ^= 0x01
    (tmp_path / journal.NAME).write_bytes(bytes(raw))
    j = Journal(tmp_path)
    got = j.open(0)
    j.close()
    assert enc(got.changes) == enc(chs[:2]) and got.dropped_bytes > 0


@pytest.mark.parametrize("zeros", [1, 7, 8, 9, 64, 4096])
def test_a_tail_of_zeros_ends_the_records(tmp_path: Path, zeros: int) -> None:
    """Zeros after the records are the room ahead (`Journal.grow`), or what a file system
    leaves where a last append's data never reached the disk: either way the records end
    there; part of a record before them is a torn tail."""
    chs, raw, ends, d = journal_and_scratch(tmp_path, 3)
    for kept, good in ((len(raw), chs), (ends[-2] + 11, chs[:-1])):
        (d / journal.NAME).write_bytes(raw[:kept] + b"\0" * zeros)
        j = Journal(d)
        got = j.open(0)
        assert enc(got.changes) == enc(good), (kept, zeros)
        part = raw[ends[-2] : kept].rstrip(b"\0") if good != chs else b""
        assert got.dropped_bytes == len(part) and (good == chs or part)
        j.append(chs[-1])  # appends go on right after the good records
        j.close()
        again = Journal(d)
        assert enc(again.open(0).changes) == enc([*good, chs[-1]])
        again.close()


def test_zeros_with_a_good_record_after_them_are_damage(tmp_path: Path) -> None:
    _chs, raw, ends, d = journal_and_scratch(tmp_path, 4)
    bad = raw[: ends[1]] + b"\0" * (ends[2] - ends[1]) + raw[ends[2] :]
    (d / journal.NAME).write_bytes(bad)
    assert "damaged at byte" in refused(d, 0)


# --- damage, strangers: refused, nothing touched ----------------------------------------------


def refused(data_dir: Path, files_revision: int) -> str:
    """Open the journal, expecting a refusal; nothing in the dir may have changed."""
    before = fingerprint(data_dir)
    j = Journal(data_dir)
    with pytest.raises(JournalError) as e:
        j.open(files_revision)
    assert j.fd == -1  # not left open
    assert fingerprint(data_dir) == before, "a refused journal must be left as it was"
    message = str(e.value)
    assert "\n" not in message and str(data_dir / journal.NAME) in message
    return message


def test_a_damaged_record_with_good_ones_after_it_is_refused_at_every_byte(
    tmp_path: Path,
) -> None:
    _chs, raw, ends, d = journal_and_scratch(tmp_path, 4)
    # Any byte of the second record flipped (its length, checksum or payload): damage, since a
    # good record follows. Every 7th byte keeps the test quick and still hits each part.
    for pos in [*range(ends[1], ends[1] + 8), *range(ends[1] + 8, ends[2], 7)]:
        bad = bytearray(raw)
        bad[pos] ^= 0xFF
        (d / journal.NAME).write_bytes(bytes(bad))
        message = refused(d, 0)
        assert "damaged at byte" in message or "does not decode" in message, (pos, message)
        assert "refusing to start" in message or "does not decode" in message


def test_a_file_that_is_no_journal_is_refused_untouched(tmp_path: Path) -> None:
    for content in [
        b"not a journal at all\n",
        b'[{"id": "conn_a"}]',
        journal.frame(b'{"journal": "other", "version": 1, "base_revision": 0}'),
        journal.frame(b'{"journal": "ctsd", "version": 99, "base_revision": 0}'),
        b"\x00" * 4096,
    ]:
        (tmp_path / journal.NAME).write_bytes(content)
        message = refused(tmp_path, 0)
        assert "journal" in message, message


def test_a_journal_of_files_at_a_later_revision_is_refused_untouched(tmp_path: Path) -> None:
    """Its changes were made on top of files this data dir does not have (another dir's
    journal, or data files restored from an older backup)."""
    write_journal(tmp_path, changes(2), base=50)
    message = refused(tmp_path, 49)
    assert "revision 50" in message and "revision 49" in message


def test_a_sync_log_shortened_by_hand_is_no_journal_of_other_files(tmp_path: Path) -> None:
    """The sync log emptied (or cut) by hand while the daemon was stopped: its journal holds
    nothing to replay, and the revision goes on from it (ids are never given twice); the
    start was refused as for another dir's journal. The same while it ran, the edit taken in
    (the journal holds the edited history) and a crash before it was written. Not a journal
    of a cluster host (whose sync log is the cluster's) nor one with other changes."""
    a, b, c, d = (tmp_path / x for x in "abcd")
    write_journal(a, [], base=50)
    j = Journal(a)
    assert j.open(0).base_revision == 50
    j.close()
    c0 = Committed()
    first = changes(1)
    c0.apply(first[0])
    take_in = Request(ops.take_in(files.SYNC_LOG, [], list(c0.log)), "file")
    edit = apply_group(c0, [take_in], Context("2026-01-01T00:01:00.000Z"))[1]
    assert edit.log == []
    write_journal(b, [*first, edit], base=50)
    j = Journal(b)
    assert enc(j.open(0).changes) == enc([*first, edit])
    j.close()
    # ... but not when the files' log holds what the edit did not (another dir's files)
    other = {3: ("2025-06-01T10:00:00.000Z", "update")}
    with pytest.raises(JournalError, match="revision 50"):
        scan_journal((b / journal.NAME).read_bytes(), "j", 3, other)
    c.mkdir()
    header = journal.Header("ctsd", journal.VERSION, 50, 7)  # (a cluster host's)
    (c / journal.NAME).write_bytes(journal.frame(journal._encode(header)))
    message = refused(c, 0)
    assert "revision 50" in message and "empty the log" not in message  # (no help there)
    write_journal(d, changes(2), base=50)
    message = refused(d, 0)
    assert "revision 50" in message and "empty the log (its 2 change(s)" in message, message
    # ... unless the files' log is there and empty (emptied by hand: it tells no revision)
    j = Journal(d)
    assert enc(j.open(0, log_emptied=True).changes) == enc(changes(2))
    j.close()


def test_a_journal_whose_events_the_files_hold_otherwise_is_refused_untouched(
    tmp_path: Path,
) -> None:
    """Another data dir's journal at a revision these files have passed: its events the
    files should already hold (written, the journal not yet cut) are other events here."""
    chs = changes(3)
    write_journal(tmp_path, chs)
    ours = journal.event_marks(e for ch in chs for e in ch.events)
    # The files hold exactly these events (a checkpoint the crash stopped before the cut): fine.
    j = Journal(tmp_path)
    assert enc(j.open(3, [e for ch in chs for e in ch.events]).changes) == enc(chs)
    j.close()
    theirs = dict(ours)
    theirs[2] = ("2025-06-01T10:00:00.000Z", "update")
    assert scan_journal((tmp_path / journal.NAME).read_bytes(), "j", 3, ours) is not None
    with pytest.raises(JournalError, match="belongs to other files"):
        scan_journal((tmp_path / journal.NAME).read_bytes(), "j", 3, theirs)
    # Events the files' log no longer holds (trimmed) cannot be compared: no refusal for them.
    assert scan_journal((tmp_path / journal.NAME).read_bytes(), "j", 3, {}) is not None


def test_an_unreadable_journal_is_refused(tmp_path: Path) -> None:
    path = tmp_path / journal.NAME
    path.mkdir()
    assert "cannot open" in refused(tmp_path, 0)
    path.rmdir()
    os.mkfifo(path)
    assert "not a regular file" in refused(tmp_path, 0)
    path.unlink()
    path.symlink_to("/etc/hostname")  # never followed: it is not the daemon's journal
    assert "cannot open" in refused(tmp_path, 0)


def test_compact_keeps_what_was_not_checkpointed_and_stays_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under a steady stream of changes a cut is one small append; past REWRITE_ABOVE bytes
    # the journal is rewritten with only what is left.
    monkeypatch.setattr(journal, "REWRITE_ABOVE", 20_000)
    chs = changes(6)
    write_journal(tmp_path, [])
    j = Journal(tmp_path)
    j.open(0)
    sizes, inodes = [], []
    for round_ in range(8):
        for ch in chs:
            j.append(ch)
        keep_from = j.lsn - 1  # the last two records are not in the files yet
        j.compact(keep_from - 1, base_revision=round_, carry=None)
        sizes.append(j.size())
        inodes.append(os.fstat(j.fd).st_ino)
        assert j.pending == 2
        assert j.size() == (tmp_path / journal.NAME).stat().st_size
    assert sizes[1] > sizes[0] and inodes[1] == inodes[0], "a cut appends"
    assert len(set(inodes)) > 1, "a journal past REWRITE_ABOVE is rewritten"
    assert max(sizes) < 20_000 + sizes[0], sizes
    j.close()
    again = Journal(tmp_path)
    got = again.open(7)
    again.close()
    assert enc(got.changes) == enc(chs[-2:]) and got.base_revision == 7


def test_a_cut_torn_at_every_byte_replays_either_side_of_it(tmp_path: Path) -> None:
    # The crash came while the cut was being written: the records it drops are in the files,
    # so replaying them again gives the same files; the rest replays either way.
    chs = changes(4)
    j = open_with(tmp_path / "orig", chs)
    before = j.size()
    j.compact(2, base_revision=0, carry=None)
    j.close()
    raw = (tmp_path / "orig" / journal.NAME).read_bytes()
    assert len(raw) > before
    d = tmp_path / "d"
    d.mkdir()
    for end in range(before, len(raw) + 1):
        (d / journal.NAME).write_bytes(raw[:end])
        again = Journal(d)
        got = again.open(0)
        again.close()
        whole = end == len(raw)
        assert enc(got.changes) == enc(chs[2:] if whole else chs), end
        torn = len(raw[before:end].rstrip(b"\0"))  # zeros ending it: room ahead
        assert got.dropped_bytes == (0 if whole else torn), end


def test_a_rewrite_carrying_changes_keeps_them_past_the_cuts_before_it(tmp_path: Path) -> None:
    chs = changes(5)
    j = open_with(tmp_path, chs[:3])
    j.compact(1, base_revision=0, carry=None)  # a cut frame
    j.append(chs[3])
    j.compact(2, base_revision=0, carry=chs[4])  # a rewrite: the carry goes first
    assert j.pending == 2
    j.close()
    again = Journal(tmp_path)
    got = again.open(0)
    again.close()
    assert enc(got.changes) == enc([chs[4], chs[2], chs[3]])


def test_lsns_go_on_past_a_cut_across_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A journal whose records a cut dropped all of: the next record still gets a new lsn, so
    # a later rewrite copies it and no dropped record that had its number.
    chs = changes(4)
    j = open_with(tmp_path, chs[:2])
    j.stream_seq = 7  # cluster mode: the journal is cut, never emptied
    j.compact(2, base_revision=0, carry=None)
    j.close()
    j = Journal(tmp_path)
    assert j.open(0).changes == [] and j.lsn == 2
    assert j.append(chs[2]) == 3
    monkeypatch.setattr(journal, "REWRITE_ABOVE", 0)
    j.append(chs[3])
    j.compact(3, base_revision=0, carry=None)  # a rewrite
    j.close()
    j = Journal(tmp_path)
    got = j.open(0)
    j.close()
    assert enc(got.changes) == enc(chs[3:]) and got.stream_seq == 7


def test_unsynced_records_after_a_bad_frame_are_a_torn_tail(tmp_path: Path) -> None:
    # Cluster mode: another host's changes are written without an fdatasync of their own, so
    # after a power cut one may be lost while a later one reached the disk. The stream holds
    # them: a bad frame followed only by such records is a torn tail, not damage. A synced
    # record after it (its fdatasync made everything before it durable) is damage still.
    chs = changes(4)
    for synced_last in (False, True):
        d = tmp_path / f"d{int(synced_last)}"
        j = open_with(d, chs[:1])
        j.append(chs[1], 5, sync=False)
        j.append(chs[2], 6, sync=False)
        if synced_last:
            j.append(chs[3], 7)
        ends = [j.header_end, *(end for _lsn, end in j.offsets)]
        j.close()
        raw = bytearray((d / journal.NAME).read_bytes())
        raw[ends[1] + 20] ^= 0xFF  # inside the first unsynced record
        (d / journal.NAME).write_bytes(bytes(raw))
        if synced_last:
            assert "damaged at byte" in refused(d, 0)
            continue
        again = Journal(d)
        got = again.open(0)
        again.close()
        assert enc(got.changes) == enc(chs[:1])
        assert got.dropped_bytes == len(raw) - ends[1]


def test_a_damaged_record_before_a_good_cut_is_refused(tmp_path: Path) -> None:
    j = open_with(tmp_path, changes(3))
    ends = [j.header_end, *(end for _lsn, end in j.offsets)]
    j.compact(1, base_revision=0, carry=None)
    j.close()
    raw = bytearray((tmp_path / journal.NAME).read_bytes())
    raw[ends[2] + 20] ^= 0xFF  # inside the last record; only the cut follows it
    (tmp_path / journal.NAME).write_bytes(bytes(raw))
    assert "damaged at byte" in refused(tmp_path, 0)


def test_a_journal_of_version_1_is_read_and_rewritten_at_its_first_cut(tmp_path: Path) -> None:
    # An older ctsd reading the journal again must refuse its version, not meet a cut frame.
    chs = changes(3)
    header = journal.frame(b'{"journal":"ctsd","version":1,"base_revision":0}')
    records = [
        journal.frame(msgspec.json.encode(journal.Record(i + 1, c))) for i, c in enumerate(chs)
    ]
    (tmp_path / journal.NAME).write_bytes(header + b"".join(records))
    j = Journal(tmp_path)
    got = j.open(0)
    assert enc(got.changes) == enc(chs)
    assert not j.cut_is_cheap(None)
    j.compact(1, base_revision=0, carry=None)
    j.close()
    raw = (tmp_path / journal.NAME).read_bytes()
    scan = scan_journal(raw, "j", 0)
    assert scan is not None and scan.version == journal.VERSION
    assert journal._CUT_START not in raw
    again = Journal(tmp_path)
    assert enc(again.open(0).changes) == enc(chs[1:])
    assert again.cut_is_cheap(None)
    again.close()


def test_a_journal_cut_at_a_later_revision_than_the_files_is_refused(tmp_path: Path) -> None:
    j = open_with(tmp_path, changes(3))
    j.compact(1, base_revision=9, carry=None)  # the files were at revision 9 then
    j.close()
    message = refused(tmp_path, 5)
    assert "begins at revision 9" in message and "revision 5" in message


# --- the room ahead ---------------------------------------------------------------------------


def test_appends_go_into_the_room_ahead_without_lengthening_the_file(tmp_path: Path) -> None:
    chs = changes(5)
    j = open_with(tmp_path, chs[:1])
    assert j.wants_room()
    j.grow()
    size = (tmp_path / journal.NAME).stat().st_size
    assert size == j.capacity >= j.end + journal.ROOM_STEP // 2 and not j.wants_room()
    for ch in chs[1:]:
        j.append(ch)
    assert (tmp_path / journal.NAME).stat().st_size == size  # overwritten in place
    j.close()
    again = Journal(tmp_path)
    got = again.open(0)
    # The zeros after the records are the room, not a torn tail: kept, and appended into.
    assert enc(got.changes) == enc(chs) and got.dropped_bytes == 0
    assert again.capacity == size and again.end < size
    again.append(chs[0])
    again.close()
    assert (tmp_path / journal.NAME).stat().st_size == size
    third = Journal(tmp_path)
    assert enc(third.open(0).changes) == enc([*chs, chs[0]])
    third.close()


def test_an_append_torn_in_the_room_is_dropped_and_the_room_kept(tmp_path: Path) -> None:
    chs = changes(3)
    j = open_with(tmp_path, chs[:2])
    j.grow()
    start = j.end
    data = journal.frame(b'{"lsn":3,"change":{}}')
    os.pwrite(j.fd, data[: len(data) // 2], start)  # the crash cut the write short
    j.close()
    again = Journal(tmp_path)
    got = again.open(0)
    assert enc(got.changes) == enc(chs[:2]) and got.dropped_bytes == len(data) // 2
    assert again.end == start
    again.append(chs[2])
    again.close()
    third = Journal(tmp_path)
    assert enc(third.open(0).changes) == enc(chs)
    third.close()


def test_an_emptied_journal_keeps_its_room_and_replays_nothing(tmp_path: Path) -> None:
    chs = changes(3)
    j = open_with(tmp_path, chs)
    j.grow()
    size = (tmp_path / journal.NAME).stat().st_size
    j.compact(j.lsn, base_revision=3, carry=None)  # everything is in the files
    assert (tmp_path / journal.NAME).stat().st_size == size and j.pending == 0
    j.close()
    again = Journal(tmp_path)
    got = again.open(3)
    assert got.changes == [] and got.dropped_bytes == 0 and got.base_revision == 3
    again.close()


def test_without_room_an_emptied_journal_is_cut_back_to_its_header(tmp_path: Path) -> None:
    """... and one cut that holds the files' revision now (the header's is older: when the
    sync log does not load at the next start, this is what the ids go on from)."""
    j = open_with(tmp_path, changes(3))
    header_end = j.header_end
    j.compact(j.lsn, base_revision=3, carry=None)
    assert (tmp_path / journal.NAME).stat().st_size == j.end < header_end + 200
    j.close()
    assert reopened_base(tmp_path) == 3


def reopened_base(tmp_path: Path) -> int:
    again = Journal(tmp_path)
    got = again.open(None)  # the sync log did not load
    again.close()
    assert got.changes == []
    return got.base_revision


def test_no_room_is_written_on_a_nearly_full_file_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = open_with(tmp_path, changes(1))
    free = os.statvfs(tmp_path)
    monkeypatch.setattr(journal, "ROOM_FREE_MIN", free.f_bavail * free.f_frsize * 2)
    j.grow()
    assert (tmp_path / journal.NAME).stat().st_size == j.end == j.capacity
    j.close()


def test_appends_during_a_grow_are_never_zeroed_and_past_the_room_they_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    monkeypatch.setattr(journal, "ROOM_STEP", 4096)
    monkeypatch.setattr(journal, "ROOM_CHUNK", 4096)
    chs = changes(12)
    j = open_with(tmp_path, chs[:1])
    j.grow()
    while not j.wants_room():
        j.append(chs[1])
    cap = j.capacity
    inside, release = threading.Event(), threading.Event()
    real = os.fstatvfs

    def held(fd: int) -> os.statvfs_result:  # grow stops here, holding the room's lock
        inside.set()
        assert release.wait(10)
        return real(fd)

    monkeypatch.setattr(journal.os, "fstatvfs", held)
    grower = threading.Thread(target=j.grow)
    grower.start()
    assert inside.wait(10)
    written = []
    size = len(j.record(chs[2])[1])
    while j.end + size <= cap:  # within the room: no wait for the grow
        j.append(chs[2])
        written.append(chs[2])
    past = threading.Thread(target=lambda: [j.append(ch) for ch in chs[3:]])
    past.start()
    past.join(0.3)
    assert past.is_alive(), "an append past the room waits for the grow under way"
    release.set()
    grower.join(10)
    past.join(10)
    assert not past.is_alive() and j.capacity > cap
    j.close()
    again = Journal(tmp_path)
    got = again.open(0)
    again.close()
    n_first = len(got.changes) - len(written) - len(chs[3:])
    assert enc(got.changes[n_first:]) == enc([*written, *chs[3:]]) and got.dropped_bytes == 0


def test_an_emptied_journal_with_many_bytes_of_cut_records_goes_back_to_its_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "EMPTY_CUT_BELOW", 1)
    j = open_with(tmp_path, changes(3))
    j.grow()
    j.compact(j.lsn, base_revision=3, carry=None)
    size = (tmp_path / journal.NAME).stat().st_size
    assert size == j.end == j.capacity < j.header_end + 200  # the header and one cut
    j.close()
    assert reopened_base(tmp_path) == 3


def test_a_rewrite_and_a_failed_append_leave_no_room_counted_that_is_not_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chs = changes(4)
    j = open_with(tmp_path, chs[:2])
    j.grow()
    j.compact(1, base_revision=1, carry=chs[3])  # a carry: rewritten into a new file
    assert j.capacity == j.end == (tmp_path / journal.NAME).stat().st_size
    j.grow()

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(journal.os, "fdatasync", failing)
    with pytest.raises(OSError):
        j.append(chs[2])
    assert j.capacity == j.end == (tmp_path / journal.NAME).stat().st_size
    j.close()


def test_a_failed_append_that_cannot_be_cut_back_makes_the_next_one_rebuild(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk refused the append's fdatasync and then its cut-back: the refused frame may
    be whole in the file, to be replayed at a start as a change its caller was told failed."""
    chs = changes(3)
    j = open_with(tmp_path, chs[:1])
    real_sync, real_truncate = os.fdatasync, os.ftruncate

    def failing(*_args: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(journal.os, "fdatasync", failing)
    monkeypatch.setattr(journal.os, "ftruncate", failing)
    with pytest.raises(OSError) as refused:
        j.append(chs[1])
    assert not isinstance(refused.value, journal.JournalLost)
    monkeypatch.setattr(journal.os, "fdatasync", real_sync)
    monkeypatch.setattr(journal.os, "ftruncate", real_truncate)
    with pytest.raises(journal.JournalLost, match="could not be cut back"):
        j.append(chs[2])
    j.rebuild(chs[0], base_revision=0, upto=j.lsn)  # (what the store does: memory, as one record)
    j.append(chs[2])
    j.close()
    again = Journal(tmp_path)
    assert [c.events for c in again.open(0).changes] == [chs[0].events, chs[2].events]
    again.close()


def test_a_cut_back_to_the_header_whose_sync_fails_leaves_no_hole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Truncated to its header, then the fdatasync failed: the next append went past a hole
    of zeros at the old end, and the start after a crash refused the journal as damaged."""
    chs = changes(3)
    j = open_with(tmp_path, chs[:2])
    real_sync = os.fdatasync

    def failing(_fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(journal.os, "fdatasync", failing)
    with pytest.raises(OSError):
        j.compact(j.lsn, base_revision=2, carry=None)
    monkeypatch.setattr(journal.os, "fdatasync", real_sync)
    j.append(chs[2])
    j.close()
    again = Journal(tmp_path)
    assert [c.events for c in again.open(2).changes] == [chs[2].events]
    again.close()


@contextlib.contextmanager
def _dir_sync_failing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The directory's fsync answers EIO within the block."""

    def failing(_path: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(journal, "fsync_dir", failing)
        yield


def test_a_journal_made_anew_whose_dir_sync_failed_is_made_anew_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In place, but its name maybe not durable: the next append was answered on it."""
    chs = changes(3)
    j = open_with(tmp_path, chs[:1])
    with pytest.raises(OSError), _dir_sync_failing(monkeypatch):
        j.rebuild(chs[0], base_revision=0, upto=j.lsn)
    with pytest.raises(journal.JournalLost, match="may not be durable"):
        j.append(chs[1])
    j.rebuild(chs[0], base_revision=0, upto=j.lsn)
    j.append(chs[1])
    j.close()
    again = Journal(tmp_path)
    assert [c.events for c in again.open(0).changes] == [chs[0].events, chs[1].events]
    again.close()


def test_a_rewrite_whose_dir_sync_failed_answers_nothing_until_made_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rewritten journal in place but its name maybe not durable: appends were answered
    on it (a power cut could bring the old file back), and its records' places were the old
    file's, so the next rewrite took it for lost."""
    chs = changes(6)
    j = open_with(tmp_path, chs[:3])
    with pytest.raises(OSError), _dir_sync_failing(monkeypatch):
        j.compact(1, base_revision=0, carry=chs[5])
    assert [lsn for lsn, _ in j.offsets] == [2, 3]  # (the new file's)
    with pytest.raises(journal.JournalLost, match="may not be durable"):
        j.append(chs[3])
    j.close()


def test_damage_only_a_rewrite_sees_is_remembered_when_not_made_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record damaged in the middle (the per-append checks see only the ends): the rewrite
    saw it, making the journal anew failed (disk full), and the next append was answered
    into a file the next start refused."""
    chs = changes(4)
    j = open_with(tmp_path, chs[:3])
    _end_of_first, end_of_second = j.offsets[0][1], j.offsets[1][1]
    with open(tmp_path / journal.NAME, "r+b") as f:  # a byte of the second record flipped
        f.seek(end_of_second - 3)
        byte = f.read(1)
        f.seek(end_of_second - 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(journal.JournalLost):
        j.compact(1, base_revision=0, carry=chs[3])

    def full(*_args: Any, **_kw: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(journal, "create_temp", full)
    with pytest.raises(OSError):
        j.rebuild(chs[2], base_revision=0, upto=j.lsn)
    with pytest.raises(journal.JournalLost):
        j.append(chs[3])
    j.close()


def test_room_written_during_the_loss_check_is_no_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`grow` finishing a chunk between the check's fstat and its read of the room: the
    file looked shorter than its room, and the journal was made anew for no loss at all."""
    monkeypatch.setattr(journal, "ROOM_FREE_MIN", 0)
    chs = changes(3)
    j = open_with(tmp_path, chs[:1])
    monkeypatch.setattr(journal, "ROOM_STEP", 64 * 1024)
    j.grow()  # some room, as the store keeps
    monkeypatch.setattr(journal, "ROOM_STEP", 1024 * 1024)
    assert j.wants_room() and j.capacity > j.end  # (running short: the store grows it)
    real = os.fstat
    fired: list[int] = []

    def fstat(fd: int) -> os.stat_result:
        st = real(fd)
        if not fired and fd == j.fd:
            fired.append(1)  # grow's thread finishing a chunk right here
            grower = threading.Thread(target=j.grow)
            grower.start()
            grower.join()
        return st

    monkeypatch.setattr(journal.os, "fstat", fstat)
    j.append(chs[1])  # (raised JournalLost: "cut short")
    assert fired
    j.close()


def test_a_rewrite_the_disk_cuts_short_keeps_the_whole_old_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk filling up takes only part of a rewrite (a short write, then ENOSPC): the
    rewrite fails and the old journal stays, every record in it; never a shorter journal
    that drops acknowledged changes as a torn tail at the next start."""
    chs = changes(4)
    j = open_with(tmp_path, chs[:3])
    before = (tmp_path / journal.NAME).read_bytes()
    real = atomic.os.writev
    calls = 0

    def filling(fd: int, buffers: list[Any]) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:  # part of it, as the kernel does when the space runs out midway
            return real(fd, [bytes(buffers[0])[: len(buffers[0]) // 2]])
        raise OSError(errno.ENOSPC, "No space left on device")

    def short(fd: int, data: Any) -> int:  # (the same for a plain write)
        return filling(fd, [data])

    monkeypatch.setattr(atomic.os, "writev", filling)
    monkeypatch.setattr(atomic.os, "write", short)
    with pytest.raises(OSError):
        j.compact(1, base_revision=0, carry=chs[3])  # a carry: rewritten into a new file
    monkeypatch.undo()
    assert calls == 2
    assert (tmp_path / journal.NAME).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name != journal.NAME]  # no temp left
    j.close()
    again = Journal(tmp_path)
    assert enc(again.open(0).changes) == enc(chs[:3])
    again.close()


def test_verify_reports_no_torn_tail_for_the_room(tmp_path: Path) -> None:
    from ctsd.verify import journal_note

    j = open_with(tmp_path, changes(2))
    j.grow()
    j.close()
    note, problem = journal_note(tmp_path, {})
    assert problem is None and note is not None and "torn" not in note, note


def test_verify_judges_a_journal_past_the_files_as_a_start_does(tmp_path: Path) -> None:
    """Changes from revision 50 on: another dir's, by a sync log at 3 or a missing one (the
    files removed), but replayed after one emptied by hand."""
    from ctsd.verify import journal_note

    write_journal(tmp_path, changes(2), base=50)
    for contents in (
        {},
        {files.SYNC_LOG: json.dumps([{"id": 3, "created_at": "x", "action": "create"}]).encode()},
    ):
        _note, problem = journal_note(tmp_path, contents)
        assert problem is not None and "belongs to other files" in problem.message, contents
    note, problem = journal_note(tmp_path, {files.SYNC_LOG: b"[]"})
    assert problem is None and note is not None and "2 change group(s)" in note, note


# --- the power cut, end to end ------------------------------------------------------------------

N_CONNS = 3


def seed_dir(data_dir: Path) -> None:
    """A data dir with N_CONNS connections, written by the daemon itself."""
    data_dir.mkdir(parents=True, exist_ok=True)
    conns = [
        {"id": f"conn_{i}", "name": f"c{i}", "exchange": "bybit", "api_secret": "canary-9d1e"}
        for i in range(N_CONNS)
    ]
    (data_dir / files.CONNECTIONS).write_text(json.dumps(conns))
    d = Daemon(data_dir).start()
    try:
        assert d.stop() == 0
    finally:
        d.close()


async def acked_then_killed(d: Daemon, names: list[str]) -> list[dict[str, Any]]:
    """Rename conn_0 to each of `names` in turn (no `sync`: answered from the journal), each
    waiting for its ack; SIGKILL the daemon the instant the last ack arrives. Returns the acks."""
    acks = []
    headers = {"Authorization": f"Bearer {d.token}"}
    async with connect(d.ws_url, additional_headers=headers, compression=None) as ws:
        assert json.loads(await ws.recv())["type"] == "auth_ok"
        for i, name in enumerate(names, 1):
            cmd = {"id": i, "type": "connections.update", "connection_id": "conn_0"}
            await ws.send(json.dumps({**cmd, "changes": {"name": name}}))
            while True:
                msg = json.loads(await ws.recv())
                if msg.get("type") == "result" and msg.get("id") == i:
                    break
            assert msg["success"], msg
            acks.append(msg)
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    assert d.proc.returncode == -signal.SIGKILL
    return acks


def names_in_files(data_dir: Path) -> dict[str, str]:
    return {c["id"]: c["name"] for c in json.loads((data_dir / files.CONNECTIONS).read_text())}


def journal_records(data_dir: Path) -> list[Change]:
    scan = scan_journal((data_dir / journal.NAME).read_bytes(), "j", 10**9)
    return scan.changes if scan is not None else []


def restart_and_kill_at_ready(data_dir: Path) -> Daemon:
    """Start the daemon and SIGKILL it the moment READY=1 arrives: what the files hold then
    was written before READY, not by a checkpoint a moment later."""
    d = Daemon(data_dir).start(wait=False)

    def ready() -> bool:
        assert d.proc is not None and d.proc.poll() is None, d.stderr()
        return "READY=1" in d.notify.poll()

    wait_until(ready, 15, what="READY=1")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    return d


def test_acknowledged_changes_survive_kill_9_right_after_the_ack(data_dir: Path) -> None:
    seed_dir(data_dir)
    caught_before_checkpoint = 0
    for attempt in range(5):
        names = [f"acked-{attempt}-{k}" for k in range(3)]
        d = Daemon(data_dir).start()
        try:
            asyncio.run(acked_then_killed(d, names))
        finally:
            d.close()
        # The kill came before the checkpointer wrote the file: only the journal has it.
        in_journal = [rc.value["name"] for ch in journal_records(data_dir) for rc in ch.connections]
        if names_in_files(data_dir)["conn_0"] != names[-1]:
            caught_before_checkpoint += 1
            assert names[-1] in in_journal
        d = restart_and_kill_at_ready(data_dir)
        try:
            on_disk = names_in_files(data_dir)
            assert on_disk["conn_0"] == names[-1], (attempt, on_disk, d.stdout()[-2000:])
            log = json.loads((data_dir / files.SYNC_LOG).read_text())
            logged = [e["data"]["values"]["name"] for e in log if e["action"] == "update"]
            assert logged[-3:] == names  # each acked change is in the sync log, in order
            ids = [e["id"] for e in log]
            assert ids == list(range(ids[0], ids[0] + len(ids)))
            if names[-1] in in_journal:
                assert any(e.get("event") == "journal_replayed" for e in d.log_events())
        finally:
            d.close()
    # The point of the test: at least some kills landed before any checkpoint (the coalescing
    # delay is tens of milliseconds; a kill right after an ack takes far less).
    assert caught_before_checkpoint >= 3, caught_before_checkpoint
    # and a clean stop leaves a journal of its header alone
    d = Daemon(data_dir).start()
    try:
        assert d.stop() == 0
    finally:
        d.close()
    assert journal_records(data_dir) == []
    assert names_in_files(data_dir)["conn_0"] == "acked-4-2"


def start_refused(data_dir: Path) -> str:
    """Start the daemon, expecting it to refuse: exit 1, one line on stderr, no READY, and
    every data file and the journal as they were (its own lock file and logs aside)."""
    before = fingerprint(data_dir)
    d = Daemon(data_dir).start(wait=False)
    try:
        assert d.proc is not None
        assert d.proc.wait(15) == 1
        err = d.stderr().strip()
        assert "READY=1" not in d.notify.poll()
    finally:
        d.close()
    assert len(err.splitlines()) == 1, err
    own = {".lock", *(k for k in {*before, *fingerprint(data_dir)} if k.startswith("logs/"))}
    assert {k: v for k, v in fingerprint(data_dir).items() if k not in own} == {
        k: v for k, v in before.items() if k not in own
    }
    return err


def test_a_journal_from_another_data_dir_keeps_the_daemon_from_starting(
    tmp_path: Path,
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for data_dir, names in ((a, ["a1", "a2"]), (b, ["b1", "b2", "b3", "b4"])):
        seed_dir(data_dir)
        d = Daemon(data_dir).start()
        try:
            asyncio.run(acked_then_killed(d, names))
        finally:
            d.close()
    d = Daemon(b).start()  # b replays its own journal and stops cleanly: b's journal empty
    try:
        assert d.stop() == 0
    finally:
        d.close()
    assert journal_records(a) and not journal_records(b)
    # a's journal copied into b, whose files have passed a's revisions: replayed, it would put
    # a's names into b's files under b's sync log.
    (b / journal.NAME).write_bytes((a / journal.NAME).read_bytes())
    err = start_refused(b)
    assert ".journal" in err and "belongs to other files" in err, err
    assert names_in_files(b)["conn_0"] == "b4"


def test_a_damaged_journal_keeps_the_daemon_from_starting_and_touches_nothing(
    data_dir: Path,
) -> None:
    seed_dir(data_dir)
    for _ in range(10):
        d = Daemon(data_dir).start()
        try:
            asyncio.run(acked_then_killed(d, ["x1", "x2", "x3", "x4"]))
        finally:
            d.close()
        if len(journal_records(data_dir)) >= 2:
            break
    raw = (data_dir / journal.NAME).read_bytes()
    ends = record_ends(raw)
    assert len(ends) >= 3, "no kill left two records in the journal"
    bad = bytearray(raw)
    bad[ends[0] + 20] ^= 0xFF  # inside the first record, good ones after it
    (data_dir / journal.NAME).write_bytes(bytes(bad))
    err = start_refused(data_dir)
    assert ".journal" in err and "damaged at byte" in err and "refusing to start" in err


def test_a_hand_save_after_one_taken_in_is_not_undone_by_the_replay(data_dir: Path) -> None:
    """The daemon took in a hand edit (journalled, the journal not yet cut) and died before it
    took in the operator's next save of the same file: the replay must not put the older
    edit back over the newer one (nor anything acknowledged over the file's newer state)."""
    from ctsd.store import Store

    seed_dir(data_dir)
    conns_path, ui_path = data_dir / files.CONNECTIONS, data_dir / "ui-config.json"

    def save(path: Path, value: Any) -> None:
        path.write_text(json.dumps(value, indent=2))

    store = Store(data_dir)
    store.open()
    try:
        c = store.committed
        ui0, conns0 = dict(c.documents["ui-config"]), dict(c.connections)
        # Hand edit 1 of each file, taken in (as the daemon's intake does) and journalled.
        ui1 = {**ui0, "theme": "edit-1", "panel": "edit-1"}
        conns1 = [
            msgspec.structs.replace(conns0["conn_0"], margin_type="isolated"),
            *(v for k, v in conns0.items() if k not in ("conn_0", "conn_2")),  # conn_2 deleted
        ]
        requests = [
            Request(ops.take_in("ui-config.json", ui1, ui0), "file"),
            Request(ops.take_in(files.CONNECTIONS, conns1, conns0), "file"),
            Request(ops.update("conn_1", {"name": "acked-bus-change"}), "bus"),
        ]
        outcomes, change = apply_group(c, requests, Context("2026-01-01T00:00:00.000Z"))
        assert all(o.error is None for o in outcomes)
        store.journal.append(change)
    finally:
        store.journal.close()
    # what the files held then, and the operator's next saves, never taken in
    save(ui_path, {**ui0, "theme": "edit-2", "panel": "edit-1"})
    on_disk = json.loads(conns_path.read_text())
    for rec in on_disk:
        if rec["id"] == "conn_0":
            rec["margin_type"] = "cross-again"  # edit 2 changes the same field back
    save(conns_path, on_disk)  # conn_2 is still in the file: edit 2 kept it
    d = restart_and_kill_at_ready(data_dir)
    d.close()
    ui = json.loads(ui_path.read_text())
    assert (ui["theme"], ui["panel"]) == ("edit-2", "edit-1")
    by_id = {r["id"]: r for r in json.loads(conns_path.read_text())}
    assert by_id["conn_0"]["margin_type"] == "cross-again"
    assert "conn_2" in by_id  # the newer save has it
    states = {s["connection_id"] for s in json.loads((data_dir / files.STATE).read_text())}
    assert states == set(by_id)  # and so has its state record
    assert by_id["conn_1"]["name"] == "acked-bus-change"  # the acknowledged change is kept
    log = json.loads((data_dir / files.SYNC_LOG).read_text())
    assert any(e["data"].get("file") == "ui-config.json" for e in log)  # edit 1 was logged


def test_a_reorder_by_hand_saved_again_is_not_undone_by_the_replay(data_dir: Path) -> None:
    """The same for the order of `connections.json`: a reorder taken in and journalled, the
    operator's next reorder saved but not taken in when the daemon died."""
    from ctsd.store import Store

    seed_dir(data_dir)
    conns_path = data_dir / files.CONNECTIONS
    store = Store(data_dir)
    store.open()
    try:
        c = store.committed
        conns0 = dict(c.connections)
        reordered = [conns0[k] for k in ("conn_2", "conn_0", "conn_1")]
        request = Request(ops.take_in(files.CONNECTIONS, reordered, conns0), "file")
        (outcome,), change = apply_group(c, [request], Context("2026-01-01T00:00:00.000Z"))
        assert outcome.error is None and change.order == ["conn_2", "conn_0", "conn_1"]
        store.journal.append(change)
    finally:
        store.journal.close()
    rows = {r["id"]: r for r in json.loads(conns_path.read_text())}
    again = [rows[k] for k in ("conn_1", "conn_2", "conn_0")]  # the operator's next save
    conns_path.write_text(json.dumps(again, indent=2))
    d = restart_and_kill_at_ready(data_dir)
    d.close()
    assert [r["id"] for r in json.loads(conns_path.read_text())] == ["conn_1", "conn_2", "conn_0"]


def test_a_scrub_waits_for_the_first_cut_past_its_record(tmp_path: Path) -> None:
    """After a re-key the journal's earlier records must go from the file, not only be cut
    away. A cut short of the re-key's record used the request up (its records then stayed
    for good); the scrub now comes with the first cut that drops everything up to it."""
    j = open_with(tmp_path, changes(4))
    names = [f'"n{i}"'.encode() for i in range(4)]  # each record's own name
    j.scrub_through = 3
    j.compact(2, 2, None)  # short of it: a cut appended, records 1-2 still in the file
    raw = (tmp_path / journal.NAME).read_bytes()
    assert j.scrub_through == 3 and all(n in raw for n in names)
    j.compact(3, 3, None)  # past it: records 1-3 gone from the file, 4 kept
    raw = (tmp_path / journal.NAME).read_bytes()
    assert j.scrub_through is None
    assert not any(n in raw for n in names[:3]) and names[3] in raw
    j.close()
