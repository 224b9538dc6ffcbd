"""Coarse timestamps: an in-place rewrite of the same size within one clock tick leaves size,
mtime, ctime and inode as they were. Where the store finds such a clock (probed at open) it
compares a content digest while a stamp is fresh; elsewhere it hashes nothing."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ctsd import disk as disk_mod
from ctsd import ops
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
    monkeypatch.setattr(disk_mod, "timestamps_coarse", lambda _d: coarse)
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


def test_probe_on_this_filesystem(tmp_path: Path) -> None:
    """Two writes in a row with a stat between get distinct mtimes here (multigrain
    timestamps), so the write path pays no hashing; the probe must say so."""
    assert disk_mod.timestamps_coarse(tmp_path) is False
    assert not list(tmp_path.iterdir())  # the probe file is gone
