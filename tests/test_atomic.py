"""`ctsd.atomic.write_files` with bodies as chunks: what lands on disk is the chunks in order,
whatever their sizes (small records, empty ones, pieces larger than the write-back pace)."""

from __future__ import annotations

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
        [100] * 3000,  # a table: one small chunk per record, past one pace
        [PACE - 1, 1, 1],
        [PACE, 0, PACE + 7, 3],
        [10, 3 * PACE + 5, 10],
        [PACE // 3] * 10,
        [300_000] * 40,  # a 12 MB file: pieces of the largest pace
        [2, *[1400, 2] * 3000],  # a table as it comes: records and separators, many writevs
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
