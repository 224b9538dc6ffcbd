"""The copies a cluster host keeps of its files, judged at start (no daemon: files only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctsd import bases
from ctsd.atomic import ensure_dir, write_files
from ctsd.bases import Bases

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


def test_an_invalid_file_is_left_to_the_intake(data_dir: Path) -> None:
    b = Bases(data_dir)
    checkpoint(b, data_dir, V1)
    (data_dir / FILE).write_bytes(b"[{")
    assert judge(data_dir, invalid={FILE}).edited == {}
    assert (data_dir / bases.DIR / FILE).read_bytes().endswith(b"\n" + V1)


def test_a_hand_edit_taken_in_as_it_is_becomes_the_copy(data_dir: Path) -> None:
    b = Bases(data_dir)
    checkpoint(b, data_dir, V1)
    (data_dir / FILE).write_bytes(EDIT)
    b.keep(FILE, EDIT)  # taken in; memory now is what the file holds
    assert judge(data_dir).edited == {}


def test_drop_forgets_every_copy(data_dir: Path) -> None:
    b = Bases(data_dir)
    checkpoint(b, data_dir, V1)
    bases.drop(data_dir)
    assert not (data_dir / bases.DIR).exists()
    (data_dir / FILE).write_bytes(EDIT)
    assert judge(data_dir).edited == {}
