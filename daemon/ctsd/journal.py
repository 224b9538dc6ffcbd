"""The journal, `DATA/.journal`: a change is acknowledged once it is appended here and
fdatasync'ed, long before the data files are rewritten (the checkpointer does that, coalescing).

    frame   = length (u32, little-endian) · crc32 of the payload (u32) · payload
    payload = JSON: the first frame is the header {"journal": "ctsd", "version", "base_revision",
              "stream_seq"}, every other one a record {"lsn", "change", "seq"} (one group of
              changes: `core.Change`) or a cut {"cut", "base_revision", "stream_seq"}

In cluster mode a record also carries `seq`, the cluster stream sequence of its change, and
the header (or the last cut) `stream_seq`, the highest stream sequence the data files already
hold: together they tell a restarted daemon where to resume applying the stream.

The header's `base_revision` is the revision the data files had when this journal was begun, a
cut's the revision they had when it was written; files at a lower revision than the last of
these (another dir's journal, a restored backup) are refused. A frame that ends the file
incomplete or with a wrong checksum is a torn tail: the crash came before its fdatasync, so it
was never acknowledged, and it is dropped (and logged). Zeros after the last frame end the
records (the room ahead, below, or what a file system leaves where an append's data never
reached the disk): they are kept, and only what comes before them is a torn tail. A bad
frame with a synced frame after it is damage, not a torn tail: the daemon refuses to start
rather than lose an acknowledged change. (Records written without an fdatasync, another
host's changes in cluster mode, may reach the disk out of order: the stream holds them, so
only these after a bad frame make it a torn tail still.)

Once the checkpointer has written every change up to a record into the files, `compact`
drops those records: it appends a cut — the records before it up to lsn `cut` are in the
files and are not replayed — so cutting the journal under a steady stream of changes costs
one small append, not a rewrite. With nothing newer left it empties the journal back to its
header instead when there is no room ahead to keep or `EMPTY_CUT_BELOW` bytes of records are
behind it. Past `REWRITE_ABOVE` bytes (or to carry changes for files invalid on disk) the
journal is rewritten with only what is left: it never grows without bound.

Room ahead: an append that makes the file longer must have the file system commit the new
size with it (an fdatasync of metadata, and on ext4 it then waits for whatever else that
commit carries: our checkpoint's data files). So the file is kept longer than what it holds:
`grow` (on a helper thread, ahead of need) writes zeros past the end, `ROOM_CHUNK` at a time,
each synced once, and the appends then overwrite those zeros in place: their fdatasyncs have
no new size to commit, as databases keep their logs pre-written. What writes past the room
(an append, a cut back to the header, a close) waits for the chunk being written, never for
more. Those zeros read back as the end (never as a torn tail), and an emptied journal keeps
them (a cut, above).

Blocking on purpose: the store calls these one at a time, on its event loop or its journal
thread (`Store.append`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
import sys
import threading
import zlib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from ctsd.atomic import create_temp, fsync_dir, write_all
from ctsd.core import Change
from ctsd.models import SyncEvent
from ctsd.safefile import NotRegular, open_regular, read_fd

NAME = ".journal"
VERSION = 2  # 2: cuts. A journal of version 1 (no cuts) is read, and rewritten at its first cut.
READS = (1, 2)
_FRAME = struct.Struct("<II")
MAX_RECORD_BYTES = 256 * 1024 * 1024


class Header(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    journal: str
    version: int
    base_revision: int
    stream_seq: int = 0  # cluster mode: the stream seq the data files hold everything up to


class Record(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    lsn: int
    change: Change
    seq: int | None = None  # cluster mode: the change's stream seq (None: a local change)
    # Cluster mode: another host's change, written without an fdatasync of its own (the
    # stream holds it). Last, so a frame's payload says so in its final bytes.
    unsynced: bool = False


class Cut(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The records before this frame, up to lsn `cut`, are in the data files (at
    `base_revision`, holding the cluster stream up to `stream_seq`)."""

    cut: int
    base_revision: int
    stream_seq: int = 0


REWRITE_ABOVE = 16 * 1024 * 1024  # a journal this big is rewritten at its next cut
# Zeros written past the end at a time (`grow`), once less than half of that is left.
ROOM_STEP = 1024 * 1024
ROOM_CHUNK = 256 * 1024  # written and synced at a time: what writes past the room waits for
ROOM_FREE_MIN = 32 * ROOM_STEP  # never on a file system with less free than this
# An emptied journal holding less than this after its header is emptied by a cut (keeping its
# room ahead); holding more, it is cut back to its header (no start-up reads long runs of
# records already in the files).
EMPTY_CUT_BELOW = 4 * ROOM_STEP


class JournalError(Exception):
    """The journal cannot be used as it is: the daemon must not start (one-line reason)."""


class JournalLost(OSError):
    """The file at the journal's path is no longer the whole journal the daemon writes:
    deleted, moved, replaced or cut short by hand while it ran, or left unsure by a failed
    cut-back. What was appended may be gone (or, deleted, never reach a start): the store
    makes it anew from memory (`Journal.rebuild`), then appends again. An OSError, so a
    caller that cannot rebuild refuses the change as for a failing disk."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.EIO, why)


@dataclass
class Recovered:
    """What `Journal.open` found: the changes to replay, and what it dropped."""

    changes: list[Change]
    dropped_bytes: int = 0  # a torn tail (never acknowledged)
    base_revision: int = 0
    stream_seq: int = 0  # cluster mode: the highest stream seq the files and journal hold


_encode = msgspec.json.Encoder().encode
_decode_header = msgspec.json.Decoder(Header).decode
_decode_record = msgspec.json.Decoder(Record).decode
_decode_cut = msgspec.json.Decoder(Cut).decode


def frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _frames(raw: bytes) -> tuple[list[tuple[int, bytes]], int, str]:
    """(offset-after, payload) of each whole frame; the offset where the good frames end;
    why reading stopped there ('' at the end of the file)."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(raw):
        if len(raw) - pos < _FRAME.size:
            return out, pos, "torn"
        length, crc = _FRAME.unpack_from(raw, pos)
        start, end = pos + _FRAME.size, pos + _FRAME.size + length
        # A frame cut short by the crash, zeros where its bytes never reached the disk (every
        # payload we write is non-empty, so a zero length is never ours), a damaged length
        # that points past the end, or a wrong checksum: the crash cut the last write short
        # unless a whole synced frame follows, which only damage after the fact can leave (a
        # synced append's fdatasync makes everything before it durable too). Records written
        # without one (`unsynced`: the stream holds them) may reach the disk out of order.
        if (
            length == 0
            or length > MAX_RECORD_BYTES
            or end > len(raw)
            or zlib.crc32(raw[start:end]) != crc
        ):
            return out, pos, "damaged" if _synced_after(raw, pos) else "torn"
        out.append((end, raw[start:end]))
        pos = end
    return out, pos, ""


# How every record's and every cut's payload begins (JSON strings escape quotes), and how an
# unsynced record's ends.
_RECORD_START = b'{"lsn":'
_CUT_START = b'{"cut":'
_UNSYNCED_END = b',"unsynced":true}'


def _synced_after(raw: bytes, pos: int) -> bool:
    """Does a whole synced record or a cut, checksum right, begin after the frame at `pos`?"""
    for start in (_RECORD_START, _CUT_START):
        q = raw.find(start, pos + _FRAME.size + 1)
        while q != -1:
            length, crc = _FRAME.unpack_from(raw, q - _FRAME.size)
            payload = raw[q : q + length]
            if (
                q + length <= len(raw)
                and zlib.crc32(payload) == crc
                and not payload.endswith(_UNSYNCED_END)
            ):
                return True
            q = raw.find(start, q + 1)
    return False


def torn_bytes(raw: bytes, good_end: int) -> int:
    """How much of what follows the good frames is a torn tail: the zeros after it are the
    room ahead (`Journal.grow`), not part of it."""
    return len(raw[good_end:].rstrip(b"\0"))


@dataclass
class Scan:
    """What a journal's bytes hold (`scan_journal`), read without changing anything."""

    base_revision: int  # the header's, or the last cut's
    header_end: int
    changes: list[Change]
    offsets: list[tuple[int, int]]  # (lsn, end offset) of each record
    good_end: int  # where the good frames end; after it, a torn tail
    stream_seq: int = 0  # the header's, or the last cut's
    version: int = VERSION  # the header's
    seqs: dict[int, int] = field(default_factory=dict)  # lsn → stream seq (cluster records)
    last_lsn: int = 0  # of every record read, the cut ones too (no lsn in the file repeats)


EventMark = tuple[str, str]  # (created_at, action): enough to tell two events apart


def event_marks(events: Iterable[SyncEvent]) -> dict[int, EventMark]:
    """The sync log's events as `scan_journal` compares them."""
    return {e.id: (e.created_at, e.action) for e in events}


def read_journal(path: Path) -> tuple[bytes, os.stat_result] | None:
    """The bytes of the journal at `path` and the `fstat` they were read under (None: there
    is none), for the offline tools: read whole, whatever its size, as the daemon reads it
    at start (a data file's size limit is no journal's); never following a link, never
    blocking on a FIFO. Raises JournalError when it is no regular file or cannot be read."""
    try:
        fd, st = open_regular(path)
    except FileNotFoundError:
        return None
    except NotRegular as e:
        raise JournalError(f"{path} {e.reason}") from None
    except OSError as e:
        raise JournalError(f"cannot open {path}: {e.strerror}") from None
    try:
        raw = read_fd(fd, limit=sys.maxsize)
    except OSError as e:
        raise JournalError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    assert raw is not None
    return raw, st


def scan_journal(
    raw: bytes,
    where: str,
    files_revision: int | None,
    files_log: Mapping[int, EventMark] | None = None,
    *,
    log_emptied: bool = False,
) -> Scan | None:
    """Read a journal's bytes: None for an empty one; raises JournalError (one line) for one
    that cannot be trusted with data files at `files_revision` whose sync log holds
    `files_log` (`event_marks`). `files_revision` None: not known, because the sync log is
    invalid on disk; the journal is then not judged by the files. `log_emptied`: the sync log
    is there and holds nothing (emptied by hand: it tells no revision either)."""
    frames, good_end, stop = _frames(raw)
    what = f"{where} ({len(raw)} bytes)"
    if stop == "damaged":
        raise JournalError(
            f"{what} is damaged at byte {good_end}, with data after it: refusing to start "
            "rather than lose acknowledged changes; move it aside to start from the data "
            "files as they are (its changes after that point would be lost)"
        )
    if not frames:
        if raw:  # the header is written whole (temp file, rename): this is something else
            raise JournalError(
                f"{what} is not a ctsd journal; move it aside to start from the data files"
            )
        return None
    try:
        header = _decode_header(frames[0][1])
    except msgspec.MsgspecError:
        raise JournalError(
            f"{what} is not a ctsd journal; move it aside to start from the data files"
        ) from None
    if header.journal != "ctsd" or header.version not in READS:
        raise JournalError(
            f"{what} is a journal of another kind or version ({header.journal!r} "
            f"v{header.version}); this ctsd reads v{READS[0]} to v{READS[-1]}"
        )
    scan = Scan(
        header.base_revision, frames[0][0], [], [], good_end, header.stream_seq, header.version
    )
    for end, payload in frames[1:]:
        try:
            if payload.startswith(_CUT_START):
                _cut(scan, _decode_cut(payload))
                continue
            rec = _decode_record(payload)
        except msgspec.MsgspecError as e:
            raise JournalError(f"{what}: a record does not decode ({e})") from None
        scan.changes.append(rec.change)
        scan.offsets.append((rec.lsn, end))
        scan.last_lsn = max(scan.last_lsn, rec.lsn)
        if rec.seq is not None:
            scan.seqs[rec.lsn] = rec.seq
    # A journal of other files (a copied data dir) begins past the files' revision; so does
    # this one when the sync log was shortened by hand: while the daemon was stopped (nothing
    # to replay: the revision goes on from the journal's; or emptied, after a crash that left
    # changes to replay), or while it ran, taken in (the journal holds the edited history)
    # and cut short by a crash before it was written. Not in cluster mode, whose sync log is
    # the cluster's.
    edited = next((c.log for c in scan.changes if c.log is not None), None)
    one_host = not (scan.stream_seq or scan.seqs)
    by_hand = one_host and (
        not scan.changes or log_emptied or (edited is not None and _holds(edited, files_log))
    )
    if files_revision is not None and files_revision < scan.base_revision and not by_hand:
        # (on one host, this dir's own journal after the log's newest entries were removed
        # by hand: emptied, the log tells no revision, and the journal is replayed)
        own = (
            "; if it is this dir's own and the sync log's newest entries were removed by hand, "
            f"put them back or empty the log (its {len(scan.changes)} change(s) are then "
            "replayed)"
        )
        raise JournalError(
            f"{where} begins at revision {scan.base_revision} but the data files are "
            f"at revision {files_revision}: it belongs to other files (a copied or restored "
            f"data dir?){own if one_host else ''}; else move it aside to start from the files "
            "as they are, without the changes it holds"
        )
    # Events the files' sync log should hold already (a checkpoint that the crash stopped
    # before the journal was cut): a journal of other files holds other events there.
    written: dict[int, EventMark] = {}
    for change in scan.changes:
        if change.log is not None:
            written.clear()  # the history was replaced (edited by hand): compare from here
        written.update((e.id, (e.created_at, e.action)) for e in change.events)
    for rev, mark in written.items():
        known = files_revision is not None and rev <= files_revision
        theirs = (files_log or {}).get(rev) if known else None
        if theirs is not None and theirs != mark:
            raise JournalError(
                f"{where} holds revision {rev} as {mark[1]!r} at {mark[0]} but the data files' "
                f"sync log has {theirs[1]!r} at {theirs[0]}: it belongs to other files (a "
                "copied or restored data dir?); move it aside to start from the files as they are"
            )
    return scan


def _cut(scan: Scan, cut: Cut) -> None:
    """A cut read back: the records before it up to its lsn are not replayed."""
    drop = 0
    while drop < len(scan.offsets) and scan.offsets[drop][0] <= cut.cut:
        seq = scan.seqs.pop(scan.offsets[drop][0], None)
        if seq is not None:
            scan.stream_seq = max(scan.stream_seq, seq)
        drop += 1
    del scan.changes[:drop], scan.offsets[:drop]
    scan.base_revision = cut.base_revision  # the files' revision then (the latest cut's)
    scan.last_lsn = max(scan.last_lsn, cut.cut)
    scan.stream_seq = max(scan.stream_seq, cut.stream_seq)


def _holds(edited: list[SyncEvent], files_log: Mapping[int, EventMark] | None) -> bool:
    """Is the files' log one the operator left, as the journal's edited log says: every entry
    of it one of the edited log's, but those older than all of them (a backup's, copied over
    a log trimmed since by its limit, that the daemon wrote back whole)?"""
    marks = event_marks(edited)
    first = min(marks, default=None)
    return all(
        (first is not None and rev < first) or marks.get(rev) == mark
        for rev, mark in (files_log or {}).items()
    )


class Journal:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / NAME
        self.fd = -1
        self.end = 0  # where the next frame goes (everything before is good and synced)
        # ... but for records written without an fdatasync since the last (`sync_written`)
        self.written_unsynced = False
        # The first `compact` that drops every record up to this lsn leaves none of them in
        # the file (a truncate or a rewrite, never a cut appended after them): their bytes
        # hold what must go, the secrets under a key just retired. Kept until one has.
        self.scrub_through: int | None = None
        # The file's length: zeros from `end` to here, written and synced ahead (`grow`).
        self.capacity = 0
        # Held by `grow` while it writes past `capacity`, and by whatever writes there too or
        # closes or replaces the file meanwhile (the appends below `capacity` go on).
        self._room = threading.RLock()
        self.header_end = 0
        self.lsn = 0  # the last record's (or cut's: an lsn is never used twice in one file)
        self.offsets: deque[tuple[int, int]] = deque()  # (lsn, end offset) of each record
        self.base_revision = 0
        self.stream_seq = 0  # what the data files hold of the cluster stream (header, cuts)
        self.version = VERSION  # the header's (a version 1 journal is rewritten at its first cut)
        self.seqs: dict[int, int] = {}  # lsn → stream seq of the records kept (cluster mode)
        # Set when a failed append could not be cut back (its unacknowledged frame may still
        # be in the file, to be replayed at a start): the next append rebuilds first.
        self.unsure: str | None = None
        # The file's last bytes before `end` (a frame's: never zeros), to tell it was cut
        # short (`_append`): the room's zeros written past a cut, or the append itself,
        # would make it as long again.
        self.tail = b""

    @property
    def last_seq(self) -> int:
        """The highest cluster stream seq this journal and the files it covers hold."""
        return max(self.stream_seq, max(self.seqs.values(), default=0))

    # --- opening ---------------------------------------------------------------------------

    def open(
        self,
        files_revision: int | None,
        files_log: Iterable[SyncEvent] = (),
        *,
        log_emptied: bool = False,
    ) -> Recovered:
        """Read what the journal holds (to replay onto the files at `files_revision`, whose
        sync log holds `files_log`; `log_emptied`: see `scan_journal`) and keep it open for
        appends. Raises JournalError when it cannot be trusted."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return self._begin(files_revision)
        except OSError as e:
            raise JournalError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not _is_regular(st.st_mode):
                raise JournalError(f"{self.path} is not a regular file")
            raw = os.pread(fd, st.st_size, 0)
        except OSError as e:
            os.close(fd)
            raise JournalError(f"cannot read {self.path}: {e.strerror}") from None
        except JournalError:
            os.close(fd)
            raise
        self.fd = fd
        try:
            return self._recover(raw, files_revision, event_marks(files_log), log_emptied)
        except JournalError:
            self.close()
            raise

    def _recover(
        self,
        raw: bytes,
        files_revision: int | None,
        files_log: Mapping[int, EventMark],
        log_emptied: bool,
    ) -> Recovered:
        scan = scan_journal(raw, str(self.path), files_revision, files_log, log_emptied=log_emptied)
        if scan is None:
            return self._begin(files_revision)
        self.base_revision = scan.base_revision
        self.stream_seq = scan.stream_seq
        self.version = scan.version
        self.seqs = dict(scan.seqs)
        self.header_end = scan.header_end
        self.tail = raw[max(0, scan.good_end - _FRAME.size) : scan.good_end]
        self.offsets.extend(scan.offsets)
        self.lsn = scan.last_lsn
        self.end = self.capacity = scan.good_end
        dropped = torn_bytes(raw, scan.good_end)
        if dropped:
            os.ftruncate(self.fd, scan.good_end)  # the torn tail was never acknowledged
            os.fsync(self.fd)
        else:
            self.capacity = len(raw)  # only the room ahead follows the records: kept
        return Recovered(scan.changes, dropped, scan.base_revision, self.last_seq)

    def _begin(self, files_revision: int | None) -> Recovered:
        """A new journal holding only its header."""
        base_revision = files_revision or 0
        header = frame(_encode(Header("ctsd", VERSION, base_revision, self.stream_seq)))
        self._replace(header, len(header))
        self.offsets.clear()
        self.base_revision = base_revision
        self.version = VERSION
        return Recovered([], base_revision=base_revision)

    # --- appending -------------------------------------------------------------------------

    def append(self, change: Change, seq: int | None = None, *, sync: bool = True) -> int:
        """Append one group's change (with its cluster stream seq, if any) and make it
        durable; returns its lsn. On any error nothing is left appended (the file is cut
        back) and the error is raised. `sync=False` (a change the cluster's stream already
        holds durably) leaves the fdatasync to the next synced append or cut."""
        lsn, data = self.record(change, seq, sync=sync)
        return self.append_record(lsn, data, seq, sync=sync)

    def record(
        self, change: Change, seq: int | None = None, *, sync: bool = True
    ) -> tuple[int, bytes]:
        """The next record's lsn and frame (`append_record` writes it): the caller can judge
        its size before it chooses where to write it."""
        lsn = self.lsn + 1
        return lsn, frame(_encode(Record(lsn, change, seq, unsynced=not sync)))

    def append_record(self, lsn: int, data: bytes, seq: int | None, *, sync: bool = True) -> int:
        """`append` of a frame made by `record` (nothing appended since)."""
        if lsn != self.lsn + 1:
            raise RuntimeError(f"journal record {lsn} framed out of turn (at {self.lsn})")
        self._append(data, sync)
        self.lsn = lsn
        self.offsets.append((lsn, self.end))
        if seq is not None:
            self.seqs[lsn] = seq
        return lsn

    def _append(self, data: bytes, sync: bool) -> None:
        if self.unsure is not None:
            raise JournalLost(self.unsure)
        self._check_end()
        before = (self.end, self.capacity, self.tail, self.written_unsynced)
        if self.end + len(data) <= self.capacity:
            self._write(data, sync)  # into the room ahead
        else:
            with self._room:  # past it: never while `grow` writes there
                self._write(data, sync)
                self.capacity = max(self.capacity, self.end)
        try:
            self._check()
        except JournalLost:
            # Not acknowledged: it must not be replayed from this file either (the journal
            # made anew may fail, and this file then stands).
            try:
                with self._room:
                    os.ftruncate(self.fd, before[0])
                    self.end, _, self.tail, self.written_unsynced = before
                    self.capacity = self.end
                    os.fdatasync(self.fd)  # (a power cut must not bring it back either)
            except OSError as e:
                self.unsure = f"an append into a lost journal could not be cut back ({e.strerror})"
            raise

    def _check_end(self) -> None:
        """Raise JournalLost if the file no longer holds its last bytes (cut short: an append
        there, or the room written past the cut, would make it as long again)."""
        if os.pread(self.fd, len(self.tail), self.end - len(self.tail)) != self.tail:
            raise JournalLost(f"{NAME} was cut short while the daemon ran")

    def _check(self) -> None:
        """Raise JournalLost unless the journal's path still names the file written (after
        each append: microseconds beside its fdatasync; `_append` checks its end before).
        An operator's `rm` left the appends going to a file no start would read; a
        truncation, to one no start would accept."""
        need = max(self.end, self.capacity)  # (before the fstat: `grow` raises it after)
        st = os.fstat(self.fd)
        why = None
        if st.st_nlink == 0:
            why = "was deleted"
        elif st.st_size < need:
            why = "was cut short"
        else:
            try:
                at = os.lstat(self.path)
            except FileNotFoundError:
                why = "was moved away"
            else:
                if (at.st_dev, at.st_ino) != (st.st_dev, st.st_ino):
                    why = "was replaced by another file"
        if why is not None:
            raise JournalLost(f"{NAME} {why} while the daemon ran")

    def rebuild(self, carry: Change | None, base_revision: int, upto: int) -> None:
        """The journal made anew after `JournalLost` (blocking): its header at the files'
        revision, then `carry`, what memory holds beyond the data files (every change
        acknowledged so far, up to lsn `upto`), as one record at the last lsn: kept, as a
        record is, until a cut passes it. Nothing of this journal changes unless the new
        file is in place. A change appended since `carry` was made (not in it) leaves the
        journal unsure: the next append makes it anew."""
        if self.lsn != upto:
            self.unsure = f"{NAME} was lost and a change was appended to it meanwhile"
            raise JournalLost(self.unsure)
        stream_seq = self.last_seq  # (the carry holds the records' changes)
        header = frame(_encode(Header("ctsd", VERSION, base_revision, stream_seq)))
        body = header + (frame(_encode(Record(self.lsn, carry))) if carry is not None else b"")
        fd = self.fd
        try:
            self._replace(body, len(header))
        except OSError as e:
            if self.fd == fd:  # the old file stands, lost still: made anew at the next use
                self.unsure = self.unsure or f"{NAME} was lost and not made anew ({e.strerror})"
                raise
            # In place, its directory entry maybe not durable (`_replace` left it unsure):
            # made anew again before the next append is answered.
            self._made_anew(stream_seq, base_revision, len(body) if carry is not None else None)
            raise
        self._made_anew(stream_seq, base_revision, len(body) if carry is not None else None)
        self.unsure = None

    def _made_anew(self, stream_seq: int, base_revision: int, carry_end: int | None) -> None:
        self.stream_seq, self.base_revision, self.version = stream_seq, base_revision, VERSION
        self.seqs.clear()
        self.offsets.clear()
        if carry_end is not None:
            self.offsets.append((self.lsn, carry_end))
        self.written_unsynced = False

    def sync_written(self) -> None:
        """Make durable the records written without an fdatasync of their own (another
        host's changes), before a data file may hold what they did: a power cut must never
        leave a file (the sync log, say) ahead of the journal, or the next start would take
        the changes the file lacks for held (blocking)."""
        if self.written_unsynced:
            self.written_unsynced = False  # before: a record written meanwhile sets it again
            try:
                os.fdatasync(self.fd)
            except OSError:
                self.written_unsynced = True
                raise

    def _write(self, data: bytes, sync: bool) -> None:
        try:
            done = 0
            while done < len(data):  # a short write (the disk filling up) goes on, or raises
                n = os.pwrite(self.fd, memoryview(data)[done:], self.end + done)
                if n <= 0:
                    raise OSError(errno.ENOSPC, "the journal write took nothing")
                done += n
            if sync:
                os.fdatasync(self.fd)
        except OSError:
            try:
                with self._room:
                    os.ftruncate(self.fd, self.end)
                    self.capacity = self.end
                    os.fdatasync(self.fd)  # (a power cut must not bring it back either)
            except OSError as e:
                self.unsure = f"a failed append could not be cut back ({e.strerror})"
            raise
        self.end += len(data)
        self.tail = data[-_FRAME.size :]
        self.written_unsynced = not sync  # a synced write made everything before it durable

    def wants_room(self, short: int | None = None) -> bool:
        """Has the room ahead less than `short` bytes (half a step) left: should `grow` run?"""
        return (
            self.fd >= 0
            and self.capacity - self.end < (ROOM_STEP // 2 if short is None else short)
            and self.capacity < REWRITE_ABOVE + ROOM_STEP
        )

    def _has_room(self) -> bool:
        """Is there room ahead to keep, or is `grow` writing some now?"""
        if self.capacity > self.end or not self._room.acquire(blocking=False):
            return True
        self._room.release()
        return False

    def grow(self) -> None:
        """Write `ROOM_STEP` zeros past the file's end, a synced `ROOM_CHUNK` at a time
        (blocking: the store runs it on a helper thread while appends go on below)."""
        for _ in range(max(1, ROOM_STEP // max(1, ROOM_CHUNK))):
            with self._room:  # held for one chunk: an append past the room waits that long
                fd, start = self.fd, self.capacity
                if not self.wants_room(short=ROOM_STEP):
                    return
                st = os.fstatvfs(fd)
                if st.f_bavail * st.f_frsize < ROOM_FREE_MIN:
                    return  # it would take space the data files need: appends lengthen it
                written = os.pwrite(fd, bytes(min(ROOM_CHUNK, ROOM_STEP)), start)
                os.fdatasync(fd)
                self.capacity = start + written

    # --- compacting ------------------------------------------------------------------------

    def cut_is_cheap(self, carry: Change | None) -> bool:
        """Will `compact` cost one small write (an emptying or a cut), not a rewrite?"""
        return carry is None and self.end < REWRITE_ABOVE and self.version == VERSION

    def compact(self, upto: int, base_revision: int, carry: Change | None) -> None:
        """Drop the records up to lsn `upto` (their changes are in the data files, which are
        at `base_revision`). `carry` holds what those records changed in files the
        checkpointer could not write (invalid on disk): it is kept, as the new first record."""
        # (Only once everything up to it is in the files: a record still needed, or a carried
        # one at the head, is never dropped by it.) A journal lost by hand is not rewritten
        # from what is left of it: the store makes it anew from memory (`JournalLost`).
        if self.unsure is not None:
            raise JournalLost(self.unsure)
        self._check_end()
        self._check()
        scrub = self.scrub_through is not None and upto >= self.scrub_through
        dropped = False
        while self.offsets and self.offsets[0][0] <= upto:
            lsn, _end = self.offsets.popleft()
            dropped = True
            seq = self.seqs.pop(lsn, None)
            if seq is not None:
                self.stream_seq = max(self.stream_seq, seq)
        if not dropped and carry is None and not scrub:
            return  # nothing to drop
        self.base_revision = base_revision
        emptied = carry is None and not self.offsets and self.stream_seq == 0
        if emptied and (
            scrub
            or self.end - self.header_end >= EMPTY_CUT_BELOW
            or not self.cut_is_cheap(None)
            or not self._has_room()
        ):
            with self._room:  # everything is written: back to the header
                os.ftruncate(self.fd, self.header_end)
                # (Before the sync: if it fails, the next append goes here, not past a hole.)
                self.end = self.capacity = self.header_end
                self.tail = os.pread(self.fd, _FRAME.size, self.header_end - _FRAME.size)
                os.fdatasync(self.fd)
            if scrub:
                self.scrub_through = None
            if self.version != VERSION:
                self._rewrite(None)  # (a header that says cuts may follow)
            else:
                # The files' revision now, as a cut: the header's is older, and when the sync
                # log does not load at the next start it is all there is to go on.
                self._append(frame(_encode(Cut(upto, self.base_revision, self.stream_seq))), True)
            return
        # A cut goes only under a header that says cuts may follow (an older ctsd reading
        # the journal must refuse its version, not stumble on a frame it cannot read).
        if self.cut_is_cheap(carry) and not scrub:
            self._append(frame(_encode(Cut(upto, self.base_revision, self.stream_seq))), True)
            return
        self._rewrite(carry)
        if scrub:
            self.scrub_through = None

    def _rewrite(self, carry: Change | None) -> None:
        """The journal again with only the records not dropped (after `carry`, if any)."""
        live = {end - self.header_end for _lsn, end in self.offsets}  # where each one ends
        old = os.pread(self.fd, self.end - self.header_end, self.header_end)
        frames, _, _ = _frames(old)
        header = frame(_encode(Header("ctsd", VERSION, self.base_revision, self.stream_seq)))
        body = [header]
        if carry is not None:
            body.append(frame(_encode(Record(0, carry))))
        end = sum(map(len, body))
        offsets: deque[tuple[int, int]] = deque()
        for old_end, payload in frames:
            if old_end in live:  # cuts and the records they dropped are not copied
                body.append(frame(payload))
                end += len(body[-1])
                offsets.append((_decode_record(payload).lsn, end))
        if len(offsets) != len(self.offsets):  # (never without a hand in it)
            # (Damage the per-append checks do not see: remembered until made anew.)
            self.unsure = f"{NAME} no longer holds the records it had"
            raise JournalLost(self.unsure)
        fd = self.fd
        try:
            self._replace(b"".join(body), len(header))
        finally:
            if self.fd != fd:  # (in place, even when its directory's sync failed)
                self.offsets = offsets
                self.version = VERSION

    def _replace(self, data: bytes, header_end: int) -> None:
        """Make `data` the journal, atomically (temp file, fsync, rename, fsync the dir)."""
        tmp, fd = create_temp(self.path, readable=True)
        try:
            write_all(fd, data)  # (a short write would have cut acknowledged records)
            os.fsync(fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # The new file is the journal from here on, even if the dir's fsync fails below.
        with self._room:
            if self.fd >= 0:
                os.close(self.fd)
            self.fd = fd
            self.end = self.capacity = len(data)
        self.header_end = header_end
        self.tail = data[-_FRAME.size :]
        try:
            fsync_dir(self.path.parent)
        except OSError as e:
            # Its name maybe not durable: a power cut could bring the old file back, so
            # nothing is answered on it until it is made anew (`JournalLost` at the next use).
            self.unsure = f"the journal written anew may not be durable ({e.strerror})"
            raise

    @property
    def pending(self) -> int:
        """Records not yet compacted away."""
        return len(self.offsets)

    def size(self) -> int:
        return self.end

    def close(self) -> None:
        with self._room:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def _is_regular(mode: int) -> bool:
    return stat.S_ISREG(mode)
