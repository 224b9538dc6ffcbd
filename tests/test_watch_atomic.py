"""The daemon's rename never destroys a hand edit that lands after its last check.

`write_files` swaps its file in with renameat2(RENAME_EXCHANGE) and checks what it displaced;
here the "hand edit" is made to land exactly in that window by wrapping the exchange.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ctsd import atomic
from ctsd.atomic import TEMP_PREFIX, ChangedOnDisk, stamp_of, write_files


def _land_before_exchange(
    monkeypatch: pytest.MonkeyPatch, target: Path, body: bytes, in_place: bool = False
) -> None:
    real = atomic._exchange

    def exchange(a: Path, b: Path) -> bool:
        if b == target and not getattr(exchange, "done", False):
            exchange.done = True  # type: ignore[attr-defined]
            if in_place:
                target.write_bytes(body)
            else:
                tmp = target.with_name("edit.tmp")
                tmp.write_bytes(body)
                os.replace(tmp, target)
        return real(a, b)

    monkeypatch.setattr(atomic, "_exchange", exchange)


def _no_temps(d: Path) -> bool:
    return not list(d.glob(f"{TEMP_PREFIX}*"))


@pytest.mark.parametrize(
    ("landed", "in_place"), [(b"[2]\n", False), (b"[22]\n", True)], ids=["renamed", "in_place"]
)
def test_edit_in_the_window_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, landed: bytes, in_place: bool
) -> None:
    """A hand save (by rename, or in place) between our check and our rename survives."""
    path = tmp_path / "connections.json"
    write_files([(path, b"[1]\n")])
    seen = stamp_of(path)
    _land_before_exchange(monkeypatch, path, landed, in_place=in_place)
    with pytest.raises(ChangedOnDisk):
        write_files([(path, b"[3]\n")], {path: seen})
    assert path.read_bytes() == landed
    assert _no_temps(tmp_path)


def test_group_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, log = tmp_path / "connections.json", tmp_path / "connection-sync-log.json"
    write_files([(a, b"[1]\n"), (log, b"[]\n")])
    seen = {a: stamp_of(a), log: stamp_of(log)}
    _land_before_exchange(monkeypatch, log, b'[{"hand": 1}]\n')
    with pytest.raises(ChangedOnDisk):
        write_files([(a, b"[2]\n"), (log, b"[9]\n")], seen)
    assert a.read_bytes() == b"[1]\n"  # swapped back: the group did not half happen
    assert log.read_bytes() == b'[{"hand": 1}]\n'
    assert _no_temps(tmp_path)


def test_created_meanwhile_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "watchlists.json"
    real_link = os.link

    def link(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        Path(dst).write_bytes(b'{"hand": true}\n')  # created by hand just before ours
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link)
    with pytest.raises(ChangedOnDisk):
        write_files([(path, b"{}\n")], {path: None})
    assert path.read_bytes() == b'{"hand": true}\n'
    assert _no_temps(tmp_path)


def test_unchanged_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "connections.json"
    write_files([(path, b"[1]\n")])
    stamps = write_files([(path, b"[2]\n")], {path: stamp_of(path)})
    assert path.read_bytes() == b"[2]\n"
    assert stamps[path] == stamp_of(path)
    assert _no_temps(tmp_path)
    new = tmp_path / "new.json"
    write_files([(new, b"{}\n")], {new: None})
    assert new.read_bytes() == b"{}\n" and oct(new.stat().st_mode & 0o777) == "0o600"
    assert _no_temps(tmp_path)


def test_an_in_place_write_ended_just_before_the_look_for_writers_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An in-place writer that opened the file before our swap, and wrote and closed it
    after the swap's check but before the look for writers: its write is in the displaced
    file, which is kept for the take-in, not removed with the temp files."""
    path = tmp_path / "connections.json"
    write_files([(path, b"[1]\n")])
    seen = stamp_of(path)
    real = atomic.written_elsewhere

    def look(fd: int) -> bool:
        if not getattr(look, "done", False):
            look.done = True  # type: ignore[attr-defined]
            with open(os.readlink(f"/proc/self/fd/{fd}"), "r+b") as fh:  # the write, the close
                fh.truncate(0)
                fh.write(b"[22, 22]\n")
            look.closed = not real(fd)  # type: ignore[attr-defined]
        return real(fd)

    monkeypatch.setattr(atomic, "written_elsewhere", look)
    kept: list[atomic.Displaced] = []
    write_files([(path, b"[3]\n")], {path: seen}, kept)
    assert look.closed  # type: ignore[attr-defined]  # kept for its write, not for a writer
    assert path.read_bytes() == b"[3]\n"
    assert [os.pread(d.fd, 100, 0) for d in kept] == [b"[22, 22]\n"]
    for d in kept:
        os.close(d.fd)
        d.kept.unlink()
    assert _no_temps(tmp_path)
