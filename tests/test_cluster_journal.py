"""The journal keeps the cluster stream seq of each change, across compaction and restart."""

from __future__ import annotations

from pathlib import Path

from ctsd.core import Change
from ctsd.journal import Journal


def reopened(data_dir: Path) -> Journal:
    j = Journal(data_dir)
    j.open(0)
    return j


def test_stream_seq_survives_compaction_and_restart(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.open(0)
    first = j.append(Change(touched=["a.json"]), 7)
    j.append(Change(touched=["b.json"]))  # a local change: no seq
    j.append(Change(touched=["c.json"]), 9)
    assert j.last_seq == 9
    j.compact(first, 0, None)  # seq 7 is in the files now: the header keeps it
    j.close()
    j = reopened(tmp_path)
    assert j.last_seq == 9 and j.stream_seq == 7 and j.pending == 2
    j.compact(j.lsn, 0, None)  # everything in the files
    j.close()
    j = reopened(tmp_path)
    assert j.last_seq == 9 and j.pending == 0
    j.close()


def test_one_host_journal_header_has_no_stream_seq(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.open(0)
    lsn = j.append(Change(touched=["a.json"]))
    j.compact(lsn, 0, None)
    j.close()
    raw = (tmp_path / ".journal").read_bytes()
    assert b"stream_seq" not in raw and b'"base_revision":0' in raw
    assert reopened(tmp_path).last_seq == 0
