"""What the daemon knows of each data file as it is on disk: the version it last read or wrote
(its stamp, and on coarse clocks a digest), and that version's content.

The content is the base of a three-way merge when a hand edit lands while changes are still
on their way to the file, and its encoded records let a hand edit of a 10,000-record file be
decoded at the cost of the records that changed (`decode_known`).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from ctsd import files, safefile
from ctsd.atomic import Chunk, Stamp, create_temp
from ctsd.models import Connection, ConnectionState

# Coarse clocks only: a stamp may be shared by a second write within this of its mtime (the
# clock's granule, with room), so `unchanged` compares the digest too until a look this long
# after the mtime found the same bytes: far above a clock tick of 1-10 ms; where mtimes are
# whole seconds (ext3, FAT's 2 s, sshfs, some NFS servers), above two of them.
DIGEST_WITHIN_NS = 50_000_000
DIGEST_WITHIN_WHOLE_SECONDS_NS = 2_500_000_000


@dataclass
class OnDisk:
    """One file as the daemon last read or wrote it."""

    stamp: Stamp | None = None  # None: absent
    ctime: int | None = None  # seen right after the stamp (see `Disk.unchanged`)
    digest: bytes | None = None  # coarse clocks only
    # Coarse clocks: a look a clock granule or more after the mtime found these bytes, so no
    # later save can share the stamp (it would get a newer mtime): no more hashing.
    verified: bool = False
    content: Any = None  # records by key (tables), the events (sync log), or the document
    frags: dict[str, bytes] = field(default_factory=dict)  # tables: each record as in the file


class Disk:
    """Every data file's `OnDisk`, and the checks made before trusting or replacing a file."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.files: dict[str, OnDisk] = {}
        # Where two writes in a row can share a timestamp (coarse clocks: older kernels, some
        # network filesystems), equal stat results within a tick prove nothing: there the
        # daemon also keeps a digest of each file and compares it while a stamp is that fresh.
        # Probed at open; on fine-grained timestamps no hashing is done at all. 0 there; else
        # how long after its mtime a stamp may be shared (ns: `timestamps_coarse`).
        self.coarse_mtime = 0

    def path(self, file: str) -> Path:
        return self.data_dir / file

    def get(self, file: str) -> OnDisk:
        found = self.files.get(file)
        if found is None:
            found = self.files[file] = OnDisk()
        return found

    def record(
        self,
        file: str,
        stamp: Stamp | None,
        body: Any = None,
        *,
        digest: bytes | None = None,
        ctime: int | None = None,
    ) -> None:
        """The file now is `stamp` (our own write, or what we just read); `body` its bytes, or
        `digest` their digest (`digest_of`, made where the bytes were: coarse clocks only);
        `ctime` the one its bytes were read under (else the one seen now)."""
        od = self.get(file)
        od.stamp = stamp
        od.ctime = ctime
        if digest is None and self.coarse_mtime and body is not None:
            digest = digest_of(body)
        od.digest = digest if self.coarse_mtime else None
        od.verified = False
        if ctime is not None:
            return
        # The ctime seen right after: an in-place edit that keeps size and mtime still moves it.
        try:
            st = os.lstat(self.path(file))
        except OSError:
            return
        if Stamp.of(st) == stamp:
            od.ctime = st.st_ctime_ns

    def unchanged(self, file: str) -> bool:
        """Is `file` on disk still what the daemon last read or wrote?"""
        od = self.files.get(file)
        expected = od.stamp if od else None
        try:
            st = os.lstat(self.path(file))  # as stamp_of: a link is judged as the link
        except (FileNotFoundError, NotADirectoryError):
            return expected is None
        if od is None or Stamp.of(st) != expected or st.st_ctime_ns != od.ctime:
            return False
        if self.coarse_mtime and not od.verified:
            # A save in place within the mtime's granule may share every stamp: until a look
            # after that granule found the same bytes, the digest tells (however late the
            # look: a slow poll, a round long after).
            age = time.time_ns() - st.st_mtime_ns
            if od.digest is None:
                return age >= self.coarse_mtime
            if safefile.digest(self.path(file)) != od.digest:
                return False
            od.verified = age >= self.coarse_mtime
        return True

    def probe_clock(self) -> None:
        self.coarse_mtime = timestamps_coarse(self.data_dir)


def timestamps_coarse(directory: Path) -> int:
    """Can two writes in a row, with a stat between (as we do), share an mtime here? 0 if
    not; else how long after its mtime a stamp may still be shared (ns)."""
    probe: Path | None = None
    try:
        probe, fd = create_temp(directory / "probe")
        try:
            last = -1
            for _ in range(20):
                os.write(fd, b"x")
                mtime = os.fstat(fd).st_mtime_ns
                if mtime == last:
                    whole = mtime % 1_000_000_000 == 0
                    return DIGEST_WITHIN_WHOLE_SECONDS_NS if whole else DIGEST_WITHIN_NS
                last = mtime
        finally:
            os.close(fd)
    except OSError:
        return DIGEST_WITHIN_WHOLE_SECONDS_NS  # cannot tell: assume the worst
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)
    return 0


def digest_of(body: Any) -> bytes:
    h = hashlib.sha1()
    for chunk in [body] if isinstance(body, Chunk) else body:
        h.update(chunk)
    return h.digest()


_SPLIT = b"},\n  {"  # between two records as we write them (inside a record lines go deeper)
_NEXT = b",\n  {"


def decode_known(
    file: str, raw: bytes, frags: dict[str, bytes], known: dict[str, Any]
) -> list[Any] | None:
    """A table file decoded at the cost of the records that differ from what we wrote.

    A hand edit usually changes a few records of a file we wrote: records whose bytes equal
    our encoding are reused (compared in place, nothing copied), only the others are decoded
    and validated one by one. None when the file is not laid out as we write it or anything
    does not decode: the full decoder then runs and, for an invalid file, reports the exact
    position.
    """
    if not (raw.startswith(b"[\n  {") and raw.endswith(b"}\n]\n")) or not frags:
        return None
    kind = files.TABLES[file]
    key = "connection_id" if kind is ConnectionState else "id"
    ids, ours = list(frags), list(frags.values())
    budget = max(16, len(ours) // 8)  # beyond this many new records one full decode is faster
    end = len(raw) - 3  # where the closing "\n]\n" starts

    def ours_at(k: int, pos: int) -> int:
        """Where our record k ends if the file holds exactly it at `pos`, else -1."""
        if k >= len(ours) or not raw.startswith(ours[k], pos):
            return -1
        stop = pos + len(ours[k])
        return stop if stop == end or raw.startswith(_NEXT, stop) else -1

    out: list[Any] = []
    pos, j = 2, 0
    while pos < end:
        if (stop := ours_at(j, pos)) >= 0 and ids[j] in known:
            out.append(known[ids[j]])
            j += 1
        elif (stop := ours_at(j + 1, pos)) >= 0 and ids[j + 1] in known:  # our record j went
            out.append(known[ids[j + 1]])
            j += 2
        else:  # changed (or inserted): decode it alone
            budget -= 1
            if budget < 0:
                return None
            split = raw.find(_SPLIT, pos, end)
            stop = end if split < 0 else split + 1
            try:
                record = msgspec.json.decode(raw[pos:stop], type=kind)
            except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError):
                return None
            if files.has_duplicate_keys(raw[pos:stop]):
                return None  # the full decoder names the key and both places
            if kind is Connection and files.connection_settings_problem(record.connection_settings):
                return None
            out.append(record)
            if j < len(ids) and getattr(record, key) == ids[j]:
                j += 1  # our record j, edited; else one inserted before it
        pos = stop + 2  # past ",\n" (or past the end)
    if len({getattr(r, key) for r in out}) != len(out):
        return None  # a duplicate id: the full decoder names both places
    return out
