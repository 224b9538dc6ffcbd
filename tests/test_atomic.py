"""`ctsd.atomic.write_files` with bodies as chunks: what lands on disk is the chunks in order,
whatever their sizes (small records, empty ones, pieces larger than the write-back pace)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctsd import atomic

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
