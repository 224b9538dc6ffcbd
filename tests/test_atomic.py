"""`ctsd.atomic.write_files` with bodies as chunks: what lands on disk is the chunks in order,
whatever their sizes (small records, empty ones, pieces larger than the write-back pace)."""

from __future__ import annotations

import ctypes
import errno
import resource
import signal
from pathlib import Path

import pytest

from ctsd import atomic, files

PACE = atomic.PACE_MIN


@pytest.mark.parametrize(
    "sizes",
    [
        [],
        [0, 0],
        [1],
        [100] * 3000,  # many small chunks, past one pace and past IOV_MAX
        [PACE - 1, 1, 1],
        [PACE, 0, PACE + 7, 3],
        [10, 3 * PACE + 5, 10],
        [PACE // 3] * 10,
        [300_000] * 40,  # a 12 MB file: pieces of the largest pace
        [2, *[1400, 2] * 3000],  # small and large chunks in turn, many writevs
    ],
)
@pytest.mark.parametrize("paced", [True, False])
def test_chunks_land_whole_and_in_order(tmp_path: Path, sizes: list[int], paced: bool) -> None:
    chunks = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    path = tmp_path / "f.json"
    path.write_bytes(b"old")
    stamps = atomic.write_files([(path, chunks)], paced=paced)
    assert path.read_bytes() == b"".join(chunks)
    assert stamps[path] == atomic.Stamp.of(path.stat())
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left


@pytest.mark.parametrize("paced", [True, False])
@pytest.mark.parametrize("count", [0, 1, 4000])
def test_a_body_made_as_it_is_written_lands_whole(tmp_path: Path, count: int, paced: bool) -> None:
    frags = [b"  {" + b"y" * (k % 1500) + b"}" for k in range(count)]
    body = files.TableBody(frags)
    path = tmp_path / "t.json"
    atomic.write_files([(path, body)], paced=paced)
    assert path.read_bytes() == b"".join(body)


@pytest.mark.parametrize("most", [1000, 1400, 3 * 1400, 1400 * 1024 + 7])
def test_a_write_the_kernel_takes_short_is_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, most: int
) -> None:
    # A writev may take fewer bytes than it was given (a signal): the rest follows, whether
    # it stopped inside a chunk or at a chunk's end.
    real = atomic.os.writev
    taken: list[int] = []

    def short(fd: int, buffers: list[memoryview]) -> int:
        room, cut = most, []
        for b in buffers:
            if room <= 0:
                break
            cut.append(b[:room])
            room -= len(cut[-1])
        taken.append(real(fd, cut))
        return taken[-1]

    monkeypatch.setattr(atomic.os, "writev", short)
    chunks = [bytes([i % 251]) * 1400 for i in range(3000)]
    path = tmp_path / "f.json"
    atomic.write_files([(path, chunks)], paced=False)
    assert path.read_bytes() == b"".join(chunks)
    assert all(n <= most for n in taken) and sum(taken) == 1400 * 3000


@pytest.mark.skipif(atomic._sync_file_range is None, reason="no sync_file_range here")
@pytest.mark.parametrize("sizes", [[100] * 30_000, [300_000] * 40, [7, 5 * PACE + 3]])
def test_a_paced_file_is_written_back_piece_after_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sizes: list[int]
) -> None:
    real = atomic._sync_file_range
    ranges: list[tuple[int, int]] = []

    def recorded(fd: int, offset: int, length: int, flags: int) -> int:
        if flags == atomic._SYNC_FILE_RANGE_WAIT:  # not the closing start of writeback
            ranges.append((offset, length))
        return int(real(fd, offset, length, flags))

    monkeypatch.setattr(atomic, "_sync_file_range", recorded)
    chunks = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    total = sum(sizes)
    pace = atomic.pace_of(total)
    atomic.write_files([(tmp_path / "f.json", chunks)], paced=True)
    # Back to back from the start, each exactly one pace (what is left after the last is
    # written back with the file's fsync).
    assert ranges == [(k * pace, pace) for k in range(total // pace)]


@pytest.mark.skipif(atomic._sync_file_range is None, reason="no sync_file_range here")
def test_a_writeback_error_a_paced_write_waits_on_fails_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waiting sync_file_range reports a lost page (EIO) and the kernel counts it seen:
    the fsync after it succeeded, and a file with lost pages was renamed in."""
    real = atomic._sync_file_range

    def failing(fd: int, offset: int, length: int, flags: int) -> int:
        if flags == atomic._SYNC_FILE_RANGE_WAIT:
            ctypes.set_errno(errno.EIO)
            return -1
        return int(real(fd, offset, length, flags))

    monkeypatch.setattr(atomic, "_sync_file_range", failing)
    path = tmp_path / "f.json"
    path.write_bytes(b"old")
    with pytest.raises(OSError) as err:
        atomic.write_files([(path, [b"x" * (4 * PACE)])], paced=True)
    assert err.value.errno == errno.EIO
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]

    def not_taken(fd: int, offset: int, length: int, flags: int) -> int:
        ctypes.set_errno(errno.ENOSYS)  # (a sandbox's kernel): no pacing, the write goes on
        return -1

    monkeypatch.setattr(atomic, "_sync_file_range", not_taken)
    atomic.write_files([(path, [b"y" * (4 * PACE)])], paced=True)
    assert path.read_bytes() == b"y" * (4 * PACE)


def test_a_short_write_is_finished_or_fails_whole(tmp_path: Path) -> None:
    # Past RLIMIT_FSIZE a writev stops short and the next write fails (EFBIG): the old file
    # stays, no temp file is left.
    path = tmp_path / "f.json"
    path.write_bytes(b"old")
    chunks = [bytes([i % 251]) * 1400 for i in range(2000)]
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_003, hard))
    try:
        with pytest.raises(OSError) as err:
            atomic.write_files([(path, chunks)], paced=False)
        assert err.value.errno == errno.EFBIG
        small = chunks[:500]  # 700 KB: under the limit, written whole
        atomic.write_files([(tmp_path / "g.json", small)], paced=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_bytes() == b"old"
    assert (tmp_path / "g.json").read_bytes() == b"".join(small)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "g.json"]


def test_a_file_renamed_away_between_the_check_and_the_swap_is_a_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An editor's save under way (`mv f f~`, then a new f) between the last check and the
    swap: the swap finds no file, and the write was put there at once, so the editor then
    wrote its buffer into the daemon's file (and the deletion's grace was skipped). Now a
    change on disk, judged as one; nothing is put there behind the editor's back."""
    path = tmp_path / "f.json"
    path.write_text("old")
    expected = atomic.stamp_of(path)
    real = atomic.stamp_of

    def then_renamed(p: Path) -> atomic.Stamp | None:  # the editor moves in right after it
        stamp = real(p)
        if p == path and path.exists():
            path.rename(tmp_path / "f.json~")
        return stamp

    monkeypatch.setattr(atomic, "stamp_of", then_renamed)
    with pytest.raises(atomic.ChangedOnDisk):
        atomic.write_files([(path, b"new")], expected={path: expected})
    assert not path.exists()
    assert (tmp_path / "f.json~").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json~"]  # no temp file left
