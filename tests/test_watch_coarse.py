"""Coarse timestamps: an in-place rewrite of the same size within one clock tick leaves size,
mtime, ctime and inode as they were. Where the store finds such a clock (probed at open) it
compares a content digest while a stamp is fresh; elsewhere it hashes nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ctsd import disk as disk_mod
from ctsd import ops
from ctsd.atomic import Stamp
from ctsd.store import Store


class _FrozenOs(SimpleNamespace):
    """`os` for the disk module, except that (l)stat of one path answers as within one tick."""

    def __init__(self, path: Path, frozen: os.stat_result) -> None:
        super().__init__()
        self._path, self._frozen = path, frozen

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def stat(self, p: Any, *a: Any, **k: Any) -> os.stat_result:
        return self._frozen if Path(p) == self._path else os.stat(p, *a, **k)

    def lstat(self, p: Any, *a: Any, **k: Any) -> os.stat_result:
        return self._frozen if Path(p) == self._path else os.lstat(p, *a, **k)


def _conn() -> dict[str, Any]:
    return {"id": "c1", "name": "One", "exchange": "bybit"}


@pytest.mark.anyio
@pytest.mark.parametrize("coarse", [True, False])
async def test_same_tick_rewrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, coarse: bool
) -> None:
    window = disk_mod.DIGEST_WITHIN_NS if coarse else 0
    monkeypatch.setattr(disk_mod, "timestamps_coarse", lambda _d: window)
    s = Store(tmp_path / "data")
    s.open()
    await s.start()
    try:
        await s.submit(ops.create(_conn()), "bus", sync="files")
        path = s.path("connections.json")
        assert s.unchanged("connections.json")
        digests = [od.digest for od in s.disk.files.values() if od.digest is not None]
        assert bool(digests) is coarse  # no hashing where timestamps are fine-grained
        frozen = os.stat(path)
        body = path.read_bytes()
        edited = body.replace(b'"One"', b'"Two"')
        assert len(edited) == len(body)
        with open(path, "r+b") as fh:  # in place, same size...
            fh.write(edited)
        monkeypatch.setattr(disk_mod, "os", _FrozenOs(path, frozen))  # ...within one tick
        # Only the digest can tell; without it the edit would pass for our own write.
        assert s.unchanged("connections.json") is (not coarse)
    finally:
        monkeypatch.undo()
        await s.close()


@pytest.mark.parametrize("ago_s", [1, 60])
def test_whole_second_mtimes_are_compared_by_digest_until_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ago_s: int
) -> None:
    """Where mtimes are whole seconds (ext3, FAT, sshfs), a same-size save in place within
    the second of the last write keeps every stamp, and its mtime is over 50 ms old when
    looked at, or a minute (a slow poll): the digest is still compared then."""
    d = disk_mod.Disk(tmp_path)
    d.coarse_mtime = disk_mod.DIGEST_WITHIN_WHOLE_SECONDS_NS
    path = tmp_path / "connections.json"
    body = b'[{"id": "One"}]'
    path.write_bytes(body)
    second = (time.time_ns() // 10**9 - ago_s) * 10**9  # a whole second, that long ago
    real = list(os.stat(path))
    real[7:10] = [second // 10**9] * 3
    ns = {"st_atime_ns": second, "st_mtime_ns": second, "st_ctime_ns": second}
    frozen = os.stat_result(tuple(real[:10]), ns)
    monkeypatch.setattr(disk_mod, "os", _FrozenOs(path, frozen))
    d.record("connections.json", Stamp.of(frozen), body)
    path.write_bytes(body.replace(b"One", b"Two"))  # in place, same size, same second
    assert not d.unchanged("connections.json")
    path.write_bytes(body)  # as the daemon wrote it after all
    assert d.unchanged("connections.json")
    # A look long enough after the mtime found the same bytes: none can share it from now.
    assert d.files["connections.json"].verified is (ago_s * 10**9 >= d.coarse_mtime)


def test_probe_on_this_filesystem(tmp_path: Path) -> None:
    """Two writes in a row with a stat between get distinct mtimes here (multigrain
    timestamps), so the write path pays no hashing; the probe must say so."""
    assert disk_mod.timestamps_coarse(tmp_path) == 0
    assert not list(tmp_path.iterdir())  # the probe file is gone
