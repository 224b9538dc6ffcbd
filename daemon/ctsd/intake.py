"""Taking files in from disk: start-up loading, hand edits, SIGHUP, late in-place writes.

Every file comes in through the store's one door (`ops.take_in`, source `"file"`) except at
start, before the door opens, when `load` fills the committed state directly. A file that does
not decode is marked invalid (reported, its writes refused, never touched); a file deleted by
hand is written back from memory (by the checkpointer), except an algorithm, which is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import structlog

from ctsd import diagnose, files, ops, safefile
from ctsd.atomic import TEMP_PREFIX, Displaced, Stamp, ensure_dir, stamp_of, written_elsewhere
from ctsd.core import Committed, Op, Outcome, base_of_unread, mirror_state
from ctsd.diagnose import FileProblem
from ctsd.disk import Disk, decode_known
from ctsd.errors import CtsdError
from ctsd.files import CONNECTIONS, STATE, SYNC_LOG, Invalid
from ctsd.redact import bytes_may_hold_placeholder
from ctsd.safefile import SUBDIRS, dir_mode_problem, subdir_problem
from ctsd.secretbox import SecretBox, is_encrypted
from ctsd.secretfields import (
    CONNECTION_SECRETS,
    SECRET_FILES,
    check_placeholders,
    open_connections,
    open_content,
    secret_places,
)
from ctsd.timeutil import now_iso

DECODE_ON_THREAD_BYTES = 1024 * 1024


class Door(Protocol):
    """What the intake uses of the store (`ctsd.store.Store`): its committed state and problems,
    the per-file lock, notices, and the door a hand edit goes through."""

    committed: Committed
    problems: dict[str, FileProblem]
    box: SecretBox  # the key secrets at rest are stored under
    replayed_onto: dict[str, dict[str, list[str] | None]]  # files invalid at start

    @property
    def revision(self) -> int: ...

    def file_lock(self, file: str) -> asyncio.Lock: ...

    def notice(self, notice: dict[str, Any]) -> None: ...

    def notice_watcher(self, file: str) -> None: ...

    async def submit_take_in(self, op: Op) -> tuple[Outcome, int | None]: ...

    def landed(self, msg_id: str) -> bool: ...


log = structlog.get_logger("ctsd.store")


class Intake:
    def __init__(self, store: Door, disk: Disk) -> None:
        self.store = store
        self.disk = disk
        self.data_dir = disk.data_dir
        # Files our writes displaced while an in-place writer held them open (or had just
        # written into them): what it writes into them is taken in by `take_in_late`.
        self.displaced: list[Late] = []
        self._late_retry_at: dict[int, float] = {}  # id of a Displaced → when to try it again
        self._late_closed = False  # the last pass (at close) ran: nothing waits any more
        # Cluster mode: a hand edit answered `unavailable` with an unknown outcome, per file:
        # the group's msg id and the version it took in (decoded, bytes, stamp).
        self._sent: dict[str, tuple[str, Any, bytes, Stamp | None]] = {}
        self._missing_since: dict[str, float] = {}  # file → when a round first found it gone
        self.closing = False  # the store's last rounds: a file gone is written back at once
        # Set by the store: a deleted file is written back from memory by the checkpointer;
        # a file taken in that memory now matches needs no write.
        self.write_back: Callable[[str], None] = lambda _file: None
        self.written: Callable[[str, int], None] = lambda _file, _lsn: None
        self.valid_again: Callable[[str], None] = lambda _file: None
        self.created: set[str] = set()  # files missing at start, created with default content
        # A file taken in becomes its copy (`bases`): the base of an edit made while the
        # daemon is down is the version the daemon last knew the file to hold.
        self.keep_copy: Callable[[str, bytes], None] | None = None
        self.copy_digest: Callable[[str], str] = lambda _file: ""  # (`Bases.copy_digest`)
        # Hand edits the door could not take in, for a reason other than the edit (the journal
        # failing to append, the cluster out of reach or too busy to answer in time): file →
        # (when to try again, the wait after that). Nothing else brings them back until the
        # file is saved again (`due_again`).
        self.failed: dict[str, tuple[float, float]] = {}
        self._misnamed: set[str] = set()  # algorithm files ignored for their name (logged)

    def path(self, file: str) -> Path:
        return self.data_dir / file

    def known_files(self) -> list[str]:
        on_disk = set()
        for p in (self.data_dir / files.ALGORITHMS_DIR).glob("*.json"):
            file = f"{files.ALGORITHMS_DIR}/{p.name}"
            if files.document_name(file):
                on_disk.add(file)
            elif file not in self._misnamed and not p.name.startswith((".", "#")):
                # an operator's `Mean (v2).json` (not an editor's lock file): said, once
                self._misnamed.add(file)
                log.warning("algorithm_file_ignored", file=file, reason=files.ALGORITHM_NAME_RULE)
        # And the algorithms whose file the daemon saw and is gone now: a deletion by hand not
        # taken in yet (the cluster out of reach) is looked at again with every other file.
        # (Not one memory holds that was never written yet.) The poll backend calls this from
        # its thread: `list` copies the keys at once, under the GIL.
        held = set()
        for name in list(self.store.committed.documents):
            if name.startswith(f"{files.ALGORITHMS_DIR}/"):
                file = files.document_file(name)
                od = self.disk.files.get(file)
                if od is not None and od.stamp is not None:
                    held.add(file)
        algos = sorted(on_disk | held)
        docs = [f for f, _ in files.DOCUMENTS.values()]
        # algorithms before documents: instances.json names them
        return [CONNECTIONS, STATE, SYNC_LOG, *algos, *docs]

    # --- start -------------------------------------------------------------------------------

    def prepare(self, copy_of: Callable[[str], bytes | None] = lambda _file: None) -> None:
        """Create what is missing (never touching what exists): a file deleted while the
        daemon was down is written again from its copy (`copy_of`: its bytes, if usable),
        as a running daemon writes a deleted file again from memory; the others get their
        defaults."""
        from ctsd.atomic import ChangedOnDisk, write_files

        for sub in ("", *SUBDIRS):
            d = self.data_dir / sub
            problem = subdir_problem(d) if sub else None
            if problem is not None:  # never followed out of the data dir: refuse to start
                raise CtsdError("io_error", f"{d} {problem}")
            ensure_dir(d)
        wide = dir_mode_problem(self.data_dir)
        if wide is not None:  # files stay private (each must be 0600); /health shows it too
            log.warning("data_dir_mode", data_dir=str(self.data_dir), problem=wide)
        for d in (self.data_dir, self.data_dir / files.ALGORITHMS_DIR):
            for stale in d.glob(f"{TEMP_PREFIX}*"):
                if stale.name.startswith(KEPT_PREFIX):
                    self._keep_stale_late(stale)
                else:
                    stale.unlink(missing_ok=True)
        self.disk.probe_clock()
        defaults: list[tuple[Path, bytes]] = []
        copied: set[str] = set()
        for file in [CONNECTIONS, STATE, SYNC_LOG, *(f for f, _ in files.DOCUMENTS.values())]:
            p = self.path(file)
            if not p.exists() and not p.is_symlink():
                body = copy_of(file)
                if body is not None:
                    copied.add(file)
                else:
                    name = files.document_name(file)
                    default = files.default_document(name) if name else None
                    body = files.encode_document(default) if name else b"[]\n"
                defaults.append((p, body))
        # All or none (a start that failed halfway would leave defaults the next start takes
        # for the operator's), and each only if still absent: a file the operator saves
        # meanwhile is kept, and read like any other at the load that follows.
        while defaults:
            try:
                write_files(defaults, expected={p: None for p, _ in defaults})
            except ChangedOnDisk as e:
                left = [(p, body) for p, body in defaults if p != e.path]
                if len(left) == len(defaults):
                    raise
                defaults = left
                continue
            written = {p.relative_to(self.data_dir).as_posix() for p, _ in defaults}
            self.created = written - copied
            if self.created:
                log.info("created_defaults", files=sorted(self.created))
            if written & copied:
                log.warning("deleted_while_stopped_written_again", files=sorted(written & copied))
            break

    def load(self, committed: Committed) -> None:
        """Read every file into `committed` (before the door opens; `reconcile` follows)."""
        for file in self.known_files():
            self._load(file, committed)
        committed.refresh_settings()

    def _read(self, file: str) -> tuple[bytes, Stamp, int]:
        """The file's bytes, stamp and ctime as read. Never blocks (a FIFO), never follows a
        link, reads only a private regular file."""
        raw, st = safefile.read_data_file(self.path(file), file)
        return raw, Stamp.of(st), st.st_ctime_ns

    def decode(self, file: str, raw: bytes) -> Any:
        od = self.disk.files.get(file)
        if file in (CONNECTIONS, STATE) and od is not None and od.frags:
            records = decode_known(file, raw, od.frags, od.content or {})
            if records is not None:
                return records
        return files.decode_file(file, raw)

    def _load(self, file: str, committed: Committed, digest: str | None = None) -> bool:
        """`file` into `committed`; with `digest`, only if its bytes still have it."""
        try:
            raw, stamp, ctime = self._read(file)
            if digest is not None and hashlib.sha256(raw).hexdigest() != digest.split(":")[0]:
                return False
            decoded = self.decode(file, raw)
            if files.document_name(file) == "instances":
                files.check_instance_refs(
                    decoded, committed.algorithm_names(), file, raw, self.store.problems
                )
            if file in SECRET_FILES:
                self._check_secrets(file, raw, decoded)
                check_placeholders(file, raw, decoded)
        except Invalid as e:
            self.store.problems[file] = e.problem
            self.disk.record(file, stamp_of(self.path(file)))
            log.error("file_invalid", file=file, problem=e.problem.format())
            return False
        except OSError as e:
            self.store.problems[file] = FileProblem(file, 1, 1, "$", f"cannot read: {e.strerror}")
            log.error("file_invalid", file=file, problem=self.store.problems[file].format())
            return False
        _warn_typos(file, decoded)
        self._remember(file, decoded, raw, stamp, ctime)
        _install(file, decoded, committed)
        return True

    def load_as_found(self, file: str, committed: Committed, digest: str) -> bool:
        """At start, before the journal replays: a file set back to its copy (`set_back`)
        that holds the bytes of a hand edit the journal took in (`Change.taken`: the daemon
        died before the copy was kept) is loaded as it is instead, no edit made while the
        daemon was down: the replay then takes that hand edit from it, and the changes
        after it on top. (Taken in again against the old copy, the edit won over those
        acknowledged changes, and was logged twice.) False: it changed again meanwhile."""
        return self._load(file, committed, digest)

    async def known_as_found(self, file: str, digest: str) -> bool:
        """In cluster mode, at start: the file set back to its copy (`set_back`) holds the
        bytes of this host's own hand edit (`Change.taken`) that the stream brought back
        (memory gets it from there, merged as it was taken in): the daemon knows the file to
        hold them, and they become its copy, so neither the start nor a round takes them in
        again. False: it changed again meanwhile."""

        def read() -> tuple[bytes, Stamp, int, Any] | None:
            raw, stamp, ctime = self._read(file)
            if hashlib.sha256(raw).hexdigest() != digest.split(":")[0]:
                return None
            return raw, stamp, ctime, files.decode_file(file, raw)

        try:
            found = await anyio.to_thread.run_sync(read)
        except (Invalid, OSError):
            return False
        if found is None:
            return False
        raw, stamp, ctime, decoded = found
        self._remember(file, decoded, raw, stamp, ctime)
        if self.keep_copy is not None:
            try:
                await anyio.to_thread.run_sync(self.keep_copy, file, raw)
            except OSError as e:  # the journal's record (`taken`) covers the next start
                log.error("base_copy_failed", file=file, error=e.strerror or str(e))
        return True

    def set_back(self, file: str, raw: bytes | None, committed: Committed, *, edited: bool) -> None:
        """At start, before the journal replays: memory holds `raw` for `file` (its content
        as the daemon last knew it; None: an algorithm added meanwhile, not in memory).
        `edited`: the file was edited meanwhile and stays as it is, `raw` its base, judged
        changed so that it is taken in through the door; else (deleted meanwhile) it is
        written again from memory."""
        if raw is None:
            committed.documents.pop(files.document_name(file) or "", None)
            od = self.disk.get(file)
            od.content, od.frags, od.ctime = None, {}, None
            return
        decoded = files.decode_file(file, raw)
        _install(file, decoded, committed)
        if edited:
            od = self.disk.get(file)
            # Judged changed whatever its stamp says; a file gone (an algorithm deleted) is
            # judged deleted by hand, not "still absent".
            self._remember(file, decoded, raw, od.stamp or GONE)
            od.ctime = None
        else:
            self.write_back(file)

    def _check_secrets(self, file: str, raw: bytes, decoded: Any) -> None:
        """At start (and for a refused hand edit): a stored secret that does not decrypt under
        the configured key (a flipped byte, a value cut short or moved to another record, a
        key id of its own) makes its file invalid: reported, left as it is, everything else
        served. Not when no value of the file decrypts for want of the key: the key itself is
        wrong or missing, and the start fails on that (`sealer.secure_loaded`)."""
        box = self.store.box
        if not box.encrypting:
            return
        if file == CONNECTIONS:
            failed = open_connections(box, decoded)[1]
            values = [getattr(c, f) for c in decoded for f in CONNECTION_SECRETS]
        else:
            failed = open_content(box, file, decoded)[1]
            values = [p.value for p in secret_places(file, decoded)]
        if not failed:
            return
        readable = sum(1 for v in values if is_encrypted(v)) - len(failed)
        if readable == 0 and all(e.reason in ("wrong_key", "no_key") for e in failed):
            return
        first = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        where = f" (id {first.record_id})" if first.record_id != file else ""
        raise Invalid(
            diagnose.at_path(file, raw, list(first.path or ()), f"{first.detail}{where}{more}")
        )

    def _explained(self, file: str, raw: bytes, hand: Any, problem: FileProblem) -> FileProblem:
        """A hand edit refused for a stored secret that does not decrypt: reported as a start
        reports it (a value swapped from another record is named as such)."""
        try:
            self._check_secrets(file, raw, hand)
        except Invalid as e:
            if e.problem.path == problem.path:
                return self._renamed(file, raw, hand, e.problem) or e.problem
        return problem

    def _renamed(
        self, file: str, raw: bytes, hand: Any, problem: FileProblem
    ) -> FileProblem | None:
        """`problem` (a secret of the edit that does not decrypt) said plainly when it is the
        secret of a connection the same edit removed: its id was changed by hand, and a
        secret decrypts only under the id it was written for."""
        parts = diagnose.parse_path(problem.path)
        if file != CONNECTIONS or len(parts) != 2 or not isinstance(parts[0], int):
            return None
        index, field = parts
        conn = hand[index] if isinstance(hand, list) and index < len(hand) else None
        value = getattr(conn, str(field), None)
        if conn is None or conn.id in self.store.connections or not isinstance(value, str):
            return None
        ids = {c.id for c in hand}
        gone = [k for k in self.store.connections if k not in ids][:1000]
        was = next((k for k in gone if self.store.box.decrypts_as(value, k, str(field))), None)
        if was is None:
            return None
        why = (
            f"`{field}` is connection {was}'s secret, and this edit renamed {was} to {conn.id}: "
            "a secret decrypts only under the id it was written for; rename it back, or put "
            "the secret in again as plain text (it is encrypted anew)"
        )
        return diagnose.at_path(file, raw, parts, why)

    def _remember(
        self, file: str, decoded: Any, raw: bytes, stamp: Stamp, ctime: int | None = None
    ) -> None:
        """The file now holds `decoded` (its bytes `raw`, its stamp `stamp`; `ctime`: as it
        was read, so a chmod since, while the edit went through the door, is seen)."""
        self.disk.record(file, stamp, raw, ctime=ctime)
        od = self.disk.get(file)
        before, old_frags = od.content or {}, od.frags
        od.content = as_base(file, decoded)
        if file in (CONNECTIONS, STATE):
            frags = {
                k: (
                    old_frags[k]
                    if before.get(k) is r and k in old_frags
                    else files.encode_record(r)
                )
                for k, r in od.content.items()
            }
            # Only when the file is laid out exactly as we write it can its records be found
            # again by their bytes (`decode_known`); else the next hand edit decodes it whole.
            same = b"".join(files.TableBody(list(frags.values()))) == raw
            od.frags = frags if same else {}

    def reconcile(self, committed: Committed) -> None:
        """Cross-file rules on load: state mirrors connections.

        Only when both files loaded: with connections.json invalid, memory has no connections,
        and "mirroring" would throw away every state record (volume factors, test results)."""
        problems = self.store.problems
        if CONNECTIONS in problems or STATE in problems:
            return
        for cid in [c for c in committed.state if c not in committed.connections]:
            log.warning("state_orphan_dropped", connection_id=cid)
            del committed.state[cid]
        for cid, conn in committed.connections.items():
            st = committed.state.get(cid)
            fixed = mirror_state(conn, st, conn.updated_at or now_iso())
            if fixed is not st:
                committed.state[cid] = fixed

    # --- hand edits and reload ---------------------------------------------------------------

    async def ingest(self, file: str, *, force: bool = False, report: bool = True) -> bool:
        """Take a file as it now is on disk in through the one door (`source: "file"`).

        Returns True when the content was taken in (or already matched), False when the file
        is invalid (it is then left exactly as it is, reported, and its writes refused).
        `report=False` only looks: an invalid file is neither reported nor marked (the watcher
        uses it to tell a half-written in-place save from a bad edit).
        """
        async with self.store.file_lock(file):
            return await self.ingest_locked(file, force=force, report=report)

    async def ingest_locked(self, file: str, *, force: bool = False, report: bool = True) -> bool:
        """`ingest` for a caller that holds the file's lock (the checkpointer)."""
        store = self.store
        path = self.path(file)
        sent = self._sent.get(file)
        if sent is not None and store.landed(sent[0]):
            # That edit got in after all (its answer was lost): the version it took in is the
            # base now. Taken in again against the older one, it would undo what other hosts
            # changed since.
            del self._sent[file]
            _msg_id, hand_sent, raw_sent, stamp_sent = sent
            if stamp_sent is not None:
                self._remember(file, hand_sent, raw_sent, stamp_sent)
                await self._keep_copy(file, raw_sent)
        if not force and file not in store.problems and self.disk.unchanged(file):
            self.failed.pop(file, None)  # (saved back as it was)
            return True  # our own write, or nothing new
        if not os.path.lexists(path):
            self.failed.pop(file, None)  # (judged as a file deleted now)
            return await self._gone(file, report)
        self._missing_since.pop(file, None)
        stamp: Stamp | None = None
        try:
            raw, stamp, ctime = await anyio.to_thread.run_sync(self._read, file)
            if len(raw) > DECODE_ON_THREAD_BYTES:
                # Megabytes of JSON take seconds to decode and check: the loop (the bus,
                # the watchdog's pings) goes on meanwhile. The file's lock is held, so
                # nothing changes what `decode` reads of it.
                hand = await anyio.to_thread.run_sync(self.decode, file, raw)
            else:
                hand = self.decode(file, raw)
            # The base: the file's last valid version (an invalid file keeps it: the version
            # its fix started from; in cluster mode memory moved on with other hosts' changes
            # meanwhile, which the fix must not undo). When the file never read valid: memory
            # with what the journal replayed onto it taken as the file holds it, the rest of
            # the file taken whole; when memory has no such document (removed meanwhile):
            # the file whole.
            od = self.disk.files.get(file)
            memory = self._memory(file)
            base = od.content if od is not None and memory is not None else None
            if base is None and memory is not None:
                base = self._base_unread(file, hand, memory)
            op = ops.take_in(
                file, hand, base if base is not None else memory, raw, copy=self.copy_digest(file)
            )
        except Invalid as e:
            # Judged as read: record the stamp of the bytes decoded, not a later stat (a newer
            # version must not pass as already judged). A lasting problem (a FIFO, a link, a
            # loose mode) is no half-written save: reported even when only looking.
            if report or e.lasting:
                self._mark_invalid(file, e.problem, stamp or stamp_of(path))
            return False
        except FileNotFoundError:  # deleted between the stat and the open
            return await self._gone(file, report)
        except OSError as e:
            if report:
                problem = FileProblem(file, 1, 1, "$", f"cannot read: {e.strerror}")
                self._mark_invalid(file, problem, None)
            return False
        try:
            out, lsn = await store.submit_take_in(op, file)
        except CtsdError as e:
            if e.code == "invalid" or "max_payload" in e.extra:
                # More than the cluster's stream takes in one message: not taken in as it is,
                # however often tried, so judged like an invalid edit (left as it is, reported,
                # tried again once saved again, or on SIGHUP once the servers take more).
                if report:
                    why = e.message
                    if e.code == "too_large":
                        why = (
                            f"more than the cluster takes at once ({why}): save it in smaller steps"
                        )
                    problem = e.extra.get("problem") or _placed(file, raw, hand, e.path, why)
                    self._mark_invalid(file, self._explained(file, raw, hand, problem), stamp)
                return False
            if "msg_id" in e.extra:
                self._sent[file] = (e.extra["msg_id"], hand, raw, stamp)
            if not report:  # (the watcher's first look: its second, reported, counts)
                return False
            wait = min(self.failed.get(file, (0.0, RETRY_FIRST_S))[1], RETRY_MAX_S)
            self.failed[file] = (time.monotonic() + wait, wait * 2)
            log.warning("ingest_failed", file=file, error=str(e), retry_in_s=wait)
            return False
        self.failed.pop(file, None)
        self._sent.pop(file, None)
        self.store.replayed_onto.pop(file, None)  # its base from here on: what it holds now
        self._remember(file, hand, raw, stamp, ctime)
        await self._keep_copy(file, raw)
        put_back = file == SYNC_LOG and bool(out.result)  # (history is never rewritten)
        if put_back:
            log.warning("sync_log_edit_not_kept", file=file, why=out.result[0])
            self.write_back(file)  # memory's whole history, with the next round
        elif out.result:  # the admin sees what the hand edit won (field names, never values)
            log.warning("hand_edit_won_over_pending_changes", file=file, conflicts=out.result)
        if out.files and not put_back:  # ... and every hand edit taken in (never its values)
            log.info(
                "hand_edit_taken_in", file=file, changes=len(out.events), revision=store.revision
            )
            _warn_typos(file, hand)
            store.taken_in(file)
        if file == STATE:
            _warn_state_not_kept(hand, base, store.committed)
        if self._memory(file) == self.disk.get(file).content:
            self.written(file, lsn or 0)  # memory is what the file holds: nothing to write
        if store.committer.shared and not put_back and not await self._as_written(file, raw):
            # Every host holds the same bytes: the others wrote this edit as the daemon
            # writes (`3` as `3.0`, its indent); this host does too, with the next round.
            self.write_back(file)
        self._restored(file)
        if file == CONNECTIONS and STATE in store.problems:
            store.notice_watcher(STATE)  # its records may name no connection no longer
        return True

    async def _keep_copy(self, file: str, raw: bytes) -> None:
        """The file as just taken in becomes its copy (`bases`). Not while it may hold a
        masked placeholder (or a URL's masked password) the door put the stored secret back
        for: at a start after a crash before the round rewrote the file, the copy is what
        memory is set back to before the journal replays (which patches only the fields the
        edit changed, not the secret), so the placeholder would be stored. The round's own
        copy follows: memory differs from the file. (Judged on the bytes first: quick for a
        large file. Memory the same as the file means no placeholder was put back, an
        ellipsis in a name, say: then no round follows, and a copy not kept here made every
        start take the edit in again.)"""
        if self.keep_copy is None or file == SYNC_LOG:
            return
        if (
            file in SECRET_FILES
            and bytes_may_hold_placeholder(raw)
            and self._memory(file) != self.disk.get(file).content
        ):
            return
        try:
            await anyio.to_thread.run_sync(self.keep_copy, file, raw)
        except OSError as e:
            log.error("base_copy_failed", file=file, error=e.strerror or str(e))

    def _base_unread(self, file: str, hand: Any, memory: Any) -> Any:
        """The base of the fix of a file that never read valid since the start (None: memory,
        the file taken whole)."""
        if file == SYNC_LOG:
            return []  # what the fixed log holds stays; memory's newer events go on top
        replayed = self.store.replayed_onto.get(file)
        if not replayed:
            return None
        if file in (CONNECTIONS, STATE):  # records by key, as memory holds them
            key = "id" if file == CONNECTIONS else "connection_id"
            return base_of_unread({getattr(r, key): r for r in hand}, memory, replayed, table=True)
        return base_of_unread(hand, memory, replayed, table=False)

    async def _as_written(self, file: str, raw: bytes) -> bool:
        """Are `raw`, just taken in, the bytes the daemon writes for what they hold? (Where
        memory holds more, a sealed secret say, the next round writes the file anyway.)"""
        od = self.disk.get(file)
        if file == SYNC_LOG or od.content is None:
            return True
        if file in (CONNECTIONS, STATE):
            # Laid out as the daemon writes it: `_remember` kept its records' bytes.
            return bool(od.frags) if od.content else raw == files.encode_table([])
        if len(raw) > DECODE_ON_THREAD_BYTES:  # (megabytes: not on the event loop)
            return raw == await anyio.to_thread.run_sync(files.encode_document, od.content)
        return raw == files.encode_document(od.content)

    def _memory(self, file: str) -> Any:
        c = self.store.committed
        if file == CONNECTIONS:
            return c.connections
        if file == STATE:
            return c.state
        if file == SYNC_LOG:
            return list(c.log)
        return c.documents.get(files.document_name(file) or "")

    def _restored(self, file: str) -> None:
        problem = self.store.problems.pop(file, None)
        if problem is not None:
            self.valid_again(file)
            log.info("file_restored", file=file, was=problem.message)
            self.store.notice({"notice": "file_restored", "file": file})
            if file.startswith(f"{files.ALGORITHMS_DIR}/"):
                self._recheck_instances()

    def _recheck_instances(self) -> None:
        # instances.json is judged against the algorithm files: one fixed may make it valid.
        instances = files.document_file("instances")
        if instances in self.store.problems:
            self.store.notice_watcher(instances)

    def due_again(self) -> list[str]:
        """The failed hand edits whose next try is due (the watcher looks at them again)."""
        now = time.monotonic()
        due = [f for f, (at, _) in self.failed.items() if at <= now]
        for f in due:  # not again while this try runs: its failure sets the next
            self.failed[f] = (math.inf, self.failed[f][1])
        return due

    def _mark_invalid(self, file: str, problem: FileProblem, stamp: Stamp | None) -> None:
        self.failed.pop(file, None)  # (judged: what the edit holds is the problem now)
        od = self.disk.files.get(file)
        saved_again = stamp is not None and od is not None and od.stamp != stamp
        if stamp is not None:
            self.disk.record(file, stamp)  # judged as it is now; a later edit changes the stamp
        if self.store.problems.get(file) == problem:
            if saved_again:  # (the operator wonders whether the daemon saw the save)
                log.info("file_still_invalid", file=file, problem=problem.format())
            return
        self.store.problems[file] = problem
        log.error("file_invalid", file=file, problem=problem.format())
        self.store.notice(invalid_notice(file, problem))

    async def _gone(self, file: str, report: bool) -> bool:
        """A data file found missing. For a checkpoint round (`report` False), not before it
        has been gone for `files.DELETE_GRACE_S`, as the watcher waits: written back at once, an
        editor's `mv f f.bak; cp f.bak f` would then copy the old version over the one
        written back, and the changes it held would pass for undone by hand."""
        if file.startswith(f"{files.ALGORITHMS_DIR}/") and subdir_problem(
            self.path(files.ALGORITHMS_DIR)
        ):
            # algorithms/ replaced by a file or a link: its files are out of reach, not
            # deleted (nothing is read or written through it; a change of one waits).
            self._missing_since.pop(file, None)
            return False
        now = time.monotonic()
        since = self._missing_since.setdefault(file, now)
        if not report and not self.closing and now - since < files.DELETE_GRACE_S:
            return False  # not taken in now: the round leaves it and comes back
        self._missing_since.pop(file, None)
        return await self._restore_deleted(file)

    async def _restore_deleted(self, file: str) -> bool:
        """A data file deleted by hand is written back from memory, with a notice."""
        store = self.store
        is_algo = file.startswith(f"{files.ALGORITHMS_DIR}/")
        if is_algo and files.document_name(file) not in store.committed.documents:
            # A new algorithm file that never was valid, removed: nothing to restore, and
            # its problem went with it.
            self.disk.get(file).stamp = None
            if store.problems.pop(file, None) is not None:
                log.info("file_restored", file=file, was="removed")
                store.notice({"notice": "file_restored", "file": file, "reason": "removed"})
            return True
        reason = "deleted; written back from memory"
        if is_algo:
            # algorithms/ is a library of files: deleting one removes that algorithm, unless
            # instances.json still names it (then it comes back, with a notice).
            try:
                await store.submit_take_in(ops.remove_algorithm(file), file)
                self.disk.files.pop(file, None)
                store.problems.pop(file, None)
                log.info("algorithm_removed", file=file)
                store.taken_in(file)
                return True
            except CtsdError as e:
                if e.code != "conflict":
                    log.error("restore_failed", file=file, error=e.message)
                    return False
                reason = f"deleted, but {e.message}; written back from memory"
        od = self.disk.get(file)
        od.stamp, od.ctime, od.frags = None, None, {}
        store.problems.pop(file, None)
        self.write_back(file)
        log.warning("file_restored_from_memory", file=file)
        store.notice({"notice": "file_restored", "file": file, "reason": reason})
        return True

    async def reload_all(self) -> None:
        """SIGHUP: every data file taken in the same way a hand edit is."""
        for file in self.known_files():
            await self.ingest(file, force=True)

    # --- late in-place writes ----------------------------------------------------------------

    async def take_in_late(self, max_age: float, *, final: bool = False) -> None:
        """Take in what in-place writers wrote into files our renames had displaced.

        An in-place writer (nano, cp, open("r+")) that opened a file before our rename
        replaced it writes into the old file, no longer in the directory. The checkpointer
        keeps such a file (`self.displaced`) while that writer holds it open; once the writer
        has closed it, what it wrote is taken in through the door, merged onto memory
        against what the writer saw. One whose writer keeps it open is taken in once nothing
        was written into it for `max_age` (a script that wrote and waits), and watched again
        after: its writer may write more (a script that read it, then asked its user). Still
        held after LATE_HELD_MAX_S, or when the daemon stops (`final`), it is kept beside
        its file as `<name>.late-<time>`, where what its writer writes from then on lands:
        never in a file nobody can find. Called by the watcher often, and at close (`final`:
        one the cluster cannot take now is kept aside, not left for later).
        """
        now = time.monotonic()
        self._late_closed |= final
        due = [x for x in self.displaced if self._late_due(x, now, max_age, final)]
        self.displaced = [x for x in self.displaced if x not in due]
        for x in due:
            d = x.d
            file = str(d.path.relative_to(self.data_dir))
            try:
                done, seen, read_at = await self._take_in_displaced(d, file, x.base, final)
            except Exception as e:  # never lose the watcher over it, nor the bytes
                log.exception("late_hand_write_failed", file=file)
                with contextlib.suppress(Exception):
                    self._keep_late(d, file, "error", None, repr(e))
                done, seen, read_at = True, KEPT_ASIDE, d.stamp
            held_too_long = now - x.first >= LATE_HELD_MAX_S and written_elsewhere(d.fd)
            if not done and (self._late_closed or held_too_long):
                # Refused while the daemon was closing, or still held open after the limit.
                with contextlib.suppress(Exception):
                    why = "the daemon stopped first" if self._late_closed else "held too long"
                    self._keep_late(d, file, "not taken in", None, why)
                done, seen = True, KEPT_ASIDE
            if not done:
                self._late_retry_at[id(d)] = now + LATE_RETRY_S
                x.since = now
                self.displaced.append(x)
                continue
            self._late_retry_at.pop(id(d), None)
            if seen is not KEPT_ASIDE and written_elsewhere(d.fd):
                if not self._late_closed and now - x.first < LATE_HELD_MAX_S:
                    # Watched on from what was read (a write since then is seen as one), its
                    # writer's view now what it wrote.
                    base = x.base if seen is None else seen
                    self.displaced.append(
                        Late(d._replace(stamp=read_at), base, now, x.first, read_at)
                    )
                    continue
                with contextlib.suppress(Exception):
                    self._keep_late(d, file, "held", None, "still open for writing elsewhere")
            drop_displaced(d)

    def _late_due(self, x: Late, now: float, max_age: float, final: bool) -> bool:
        """Is it time to look at what a displaced file holds? At once when its writer has
        closed it; with the writer still holding it, once nothing was written into it for
        `max_age` (each look that finds it written since starts the wait again)."""
        if final:
            return True
        if self._late_retry_at.get(id(x.d), 0.0) > now:
            return False
        if now - x.first >= LATE_HELD_MAX_S:  # (then kept aside if still held)
            return True
        if not written_elsewhere(x.d.fd):
            return True
        if now - x.since < max_age:
            return False
        stamp = Stamp.of(os.fstat(x.d.fd))
        if stamp != x.looked:  # still being written: wait until it is quiet
            x.looked, x.since = stamp, now
            return False
        return True

    async def _take_in_displaced(
        self, d: Displaced, file: str, base: Any, final: bool
    ) -> tuple[bool, Any, Stamp]:
        """A late in-place write, merged like any hand edit against what its writer saw: what
        it changed goes on top of memory, nothing the daemon wrote since is undone. Returns
        (done, seen, the stamp it was read under). Not done: the cluster cannot take it now
        (a single host never says so); it is tried again. `seen`: what it held, decoded (what
        its writer now sees); None when nothing was written into it; KEPT_ASIDE when it was
        kept aside."""
        st = os.fstat(d.fd)
        stamp = Stamp.of(st)
        if stamp == d.stamp:
            return True, None, stamp  # opened for writing, not written
        try:
            files.check_size(file, st.st_size)
            raw = await anyio.to_thread.run_sync(os.pread, d.fd, st.st_size, 0)
            hand = files.decode_file(file, raw)
            op = ops.take_in(file, hand, base, raw, late=True)
            out, _lsn = await self.store.submit_take_in(op, file)
            self.write_back(file)  # the late bytes are in memory, not in the file
        except Invalid as e:
            self._keep_late(d, file, "invalid", e.problem)
            return True, KEPT_ASIDE, stamp
        except CtsdError as e:  # file_invalid on disk, io_error, ...
            if e.code in ("unavailable", "conflict") and not final:
                log.debug("late_hand_write_waits", file=file, reason=e.message)
                return False, None, stamp
            self._keep_late(d, file, e.code, e.extra.get("problem"), e.message)
            return True, KEPT_ASIDE, stamp
        if file == SYNC_LOG and out.result:  # an edit of the history: not taken, kept aside
            self._keep_late(d, file, "sync_log_edit_not_kept", None, out.result[0])
            return True, KEPT_ASIDE, stamp
        log.warning("late_hand_write_taken_in", file=file, bytes=len(raw))
        self.store.taken_in(file)
        return True, as_base(file, hand), stamp

    def _keep_stale_late(self, stale: Path) -> None:
        """A file the daemon's write displaced while an editor still wrote into it, left by a
        daemon that stopped before it was taken in: what the editor wrote may be in it, so it
        is kept as a late write is (`<name>.late-<UTC time>`), never deleted."""
        name = stale.name.removeprefix(KEPT_PREFIX).rsplit(".", 2)[0]  # (.<pid>.<n>)
        if not name or name.startswith("."):  # not a name the daemon makes: a temp file
            stale.unlink(missing_ok=True)
            return
        try:
            kept = _link_late(stale, stale.with_name(name))
            stale.unlink()
        except OSError as e:
            log.error("late_hand_write_not_kept", file=str(stale), error=str(e))
            return
        log.warning(
            "late_hand_write_kept",
            file=name,
            kept=str(kept.relative_to(self.data_dir)),
            why="the daemon stopped before it was taken in",
        )

    def _keep_late(
        self, d: Displaced, file: str, why: str, problem: FileProblem | None, msg: str = ""
    ) -> None:
        """A late write that is not taken in is never dropped: it is kept next to its file as
        `<name>.late-<UTC time>`, which the daemon never reads, writes or deletes, and which
        the operator finds with `ls`. Bytes that do not decode are reported the way an
        invalid file is (a `file_invalid` notice naming the copy, with line and column), but
        the data file is valid, so nothing is refused and /health stays ok. The other cases
        (a newer save superseded it, a write failed) are logged.
        """
        kept = _link_late(d.kept, d.path)
        name = str(kept.relative_to(self.data_dir))
        log.warning("late_hand_write_kept", file=file, kept=name, why=why, error=msg or None)
        if problem is not None:
            reason = f"written into {file} after the daemon had replaced it; kept as {name}, "
            self.store.notice({**invalid_notice(name, problem), "reason": reason + "not taken in"})


LATE_RETRY_S = 0.5  # a late write the cluster could not take: tried again after this
# A displaced file its writer holds open this long is kept aside (`take_in_late`): a process
# that never closes it keeps no file of the daemon's open for ever.
LATE_HELD_MAX_S = 600.0
KEPT_ASIDE = object()  # `_take_in_displaced`: linked beside its file as `<name>.late-<time>`


@dataclass(eq=False)
class Late:
    """A file our write displaced, whose writer may still write into it (`take_in_late`)."""

    d: Displaced
    base: Any  # what its writer saw: what it writes is merged against it
    since: float  # displaced, or looked at (monotonic): its quiet time counts from here
    first: float  # displaced: held open past LATE_HELD_MAX_S from here, it is kept aside
    looked: Stamp  # at the last look


RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0  # a hand edit the door could not take (`failed`)
KEPT_PREFIX = f"{TEMP_PREFIX}old-"  # a displaced file kept while a writer holds it (`atomic`)


def _link_late(source: Path, path: Path) -> Path:
    """`source` linked as `<path's name>.late-<UTC time>` (`.1`, `.2`, ... after it when
    taken: no clobbering, never replaces an earlier copy); the name."""
    when = now_iso().replace(":", "")
    for n in itertools.count():
        kept = path.with_name(f"{path.name}.late-{when}{f'.{n}' if n else ''}")
        try:
            os.link(source, kept)
            return kept
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


GONE = Stamp(-1, -1, -1)  # the stamp of a file that was there: it matches no file, nor none


def _install(file: str, decoded: Any, committed: Committed) -> None:
    if file == CONNECTIONS:
        committed.connections = {c.id: c for c in decoded}
        committed.touch_connections()
    elif file == STATE:
        committed.state = {s.connection_id: s for s in decoded}
    elif file == SYNC_LOG:
        committed.load_log(decoded)
    else:
        committed.documents[files.document_name(file)] = decoded  # type: ignore[index]


def invalid_notice(file: str, problem: FileProblem) -> dict[str, Any]:
    return {
        "notice": "file_invalid",
        "file": file,
        "line": problem.line,
        "column": problem.column,
        "path": problem.path,
        "message": problem.message,
    }


def _warn_state_not_kept(hand: list[Any], base: Any, committed: Committed) -> None:
    """What a state edited by hand asked for and did not get is logged, with where to make
    it: `is_active` or `status` changed (from `base`, what the file held), which follow
    connections.json; a connection's record removed, which every connection has."""
    read = isinstance(base, dict)
    was = base if read else {}  # (none: a file unread since the start)

    def not_kept(field: str) -> list[str]:
        return [
            s.connection_id
            for s in hand
            if (now := committed.state.get(s.connection_id)) is not None
            and getattr(now, field) != getattr(s, field)
            and (
                (before := was.get(s.connection_id)) is None
                or getattr(before, field) != getattr(s, field)
            )
        ]

    named = {s.connection_id for s in hand}
    for event, cids, why in (
        (
            "state_is_active_not_kept",
            not_kept("is_active"),
            "its `is_active` there is mirrored here",
        ),
        (
            "state_status_not_kept",
            not_kept("status"),
            "`status` follows its `is_active` and `is_enabled` there, then the heartbeats",
        ),
        (
            "state_record_put_back",
            # (of those the file held: one it has not received yet is no removal; of a file
            # unread since the start, whatever it lacks)
            [c for c in committed.connections if c not in named and (c in was or not read)],
            "every connection has its state record; remove the connection there",
        ),
    ):
        if cids:
            log.warning(event, file=STATE, connections=cids[:20], why=f"{CONNECTIONS}: {why}")


def _warn_typos(file: str, content: Any) -> None:
    event = "settings_key_unknown" if file == files.SETTINGS else "connection_key_unknown"
    for key, meant in files.key_typos(file, content):
        log.warning(event, file=file, key=key, did_you_mean=meant)


def as_base(file: str, decoded: Any) -> Any:
    """A file's decoded content as a merge takes it for a base (`Disk` keeps it so): a
    table's records by key, the sync log's events, a document as it is."""
    if file in (CONNECTIONS, STATE):
        key = "id" if file == CONNECTIONS else "connection_id"
        return {getattr(r, key): r for r in decoded}
    return list(decoded) if file == SYNC_LOG else decoded


def drop_displaced(d: Displaced) -> None:
    os.close(d.fd)
    with contextlib.suppress(OSError):
        os.unlink(d.kept)


def _placed(file: str, raw: bytes, hand: Any, path: str | None, message: str) -> FileProblem:
    """A refusal of the door (a secret that does not decrypt here, a placeholder with nothing
    stored) at its line and column in the file: the door names a table's record by its id
    (`$.ID.field`), the file by its index."""
    if not path:
        return FileProblem(file, 1, 1, "$", message)
    parts = diagnose.parse_path(path)
    if file in files.TABLES and parts and isinstance(hand, list):
        key = "connection_id" if file == STATE else "id"
        ids = [getattr(r, key, None) for r in hand]
        if parts[0] in ids:
            parts = [ids.index(parts[0]), *parts[1:]]
    return diagnose.at_path(file, raw, parts, message)
