"""The pure core of a change: committed state in, the change and its events out.

No files, no clock, no event loop, no listeners. A group of ops (see `ops.py`) is applied to
the committed state `Committed` with `apply_group`, each op on its own overlay (`Tx`) so one
that fails fails alone; the result is a `Change`: the records it puts, patches and deletes,
and its sync-log events with their revisions. `Committed.apply` installs a Change — the same
function for a change made here, one replayed from the journal after a crash, and one that
another host made (a change made here on the very state it is installed on is taken as it
is; the others are patched onto records that may have moved since: `RecordChange`).
Everything the shell knows and a change may need (the time, which files are invalid on disk,
the heartbeats held in memory) comes in a `Context`.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ctsd import files
from ctsd.errors import CtsdError
from ctsd.files import CONNECTIONS, STATE, SYNC_LOG
from ctsd.limits import MAX_DEPTH, MAX_FILE_BYTES
from ctsd.models import Connection, ConnectionState, Settings, SyncEvent
from ctsd.redact import mask_if_needed
from ctsd.table import DELETED, Table

# A data file the daemon writes must stay under the limit every read applies, or the next
# start would find it invalid. Sizes are counted in compact JSON; a quarter of the limit
# leaves room for the indentation the files are written with.
# The sync log keeps its newest events within this many bytes, however large
# `sync_log_limit` is; a change that would make connections.json or a document larger is
# refused `too_large`.
LOG_MAX_BYTES = MAX_FILE_BYTES // 4
CONTENT_MAX_BYTES = MAX_FILE_BYTES // 4
_encoder = msgspec.json.Encoder()


def event_bytes(e: SyncEvent) -> int:
    return len(_encoder.encode(e))


def _bytes_of(value: Any) -> int:
    return 0 if value is None or value is DELETED else len(_encoder.encode(value))


# --- the journalled shape of a change -------------------------------------------------------


class RecordChange(msgspec.Struct, array_like=True, omit_defaults=True):
    """One record (or document) a change touched.

    `value` is the record after the change, None when it was deleted. `fields` names what the
    change set (record fields, or a document's top-level keys): applied on a record that moved
    meanwhile (a hand edit made while the daemon was down, another host's change), only those
    are set; None means the whole record. `hand`: set by a hand edit of its own file taken in
    (and by nothing else in the group): a replay takes it from the file as it is (`replayed`).
    """

    key: str
    value: Any = None
    fields: list[str] | None = None
    hand: bool = False


class Change(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """What one group of changes did: the unit of the journal (and of the cluster stream)."""

    connections: list[RecordChange] = msgspec.field(default_factory=list)
    state: list[RecordChange] = msgspec.field(default_factory=list)
    documents: list[RecordChange] = msgspec.field(default_factory=list)
    order: list[str] | None = None  # the connections' new order (a hand edit reordered them)
    events: list[SyncEvent] = msgspec.field(default_factory=list)
    log: list[SyncEvent] | None = None  # the sync log as edited by hand (before `events`)
    touched: list[str] = msgspec.field(default_factory=list)  # files written even unchanged
    # The whole state replaced by another history's (a cluster snapshot), or the sync log
    # carried in the journal while invalid on disk: what If-Match compares is what its `log`
    # tells, no longer the revisions known before.
    replaces: bool = False
    # file → SHA-256 (hex) of the bytes a hand edit of it was taken in from: a start that
    # finds the file holding exactly these bytes knows it was taken in, whatever its copy
    # says (a crash before the copy was kept). Journal only, never published.
    taken: dict[str, str] = msgspec.field(default_factory=dict)

    def files(self) -> set[str]:
        """The data files this change touches."""
        out: set[str] = set(self.touched)
        if self.connections or self.order is not None:
            out.add(CONNECTIONS)
        if self.state:
            out.add(STATE)
        out.update(files.document_file(rc.key) for rc in self.documents)
        if self.events or self.log is not None:
            out.add(SYNC_LOG)
        return out

    @property
    def empty(self) -> bool:
        return not (
            self.connections
            or self.state
            or self.documents
            or self.order is not None
            or self.events
            or self.log is not None
            or self.touched
        )


# In cluster mode, in an event's data: the stream seq of the change that added it (given by
# the daemon that applies it; `cluster.keyed`).
STREAM_SEQ = "stream_seq"

# --- revision keys (what If-Match compares) ------------------------------------------------


def record_key(cid: str) -> str:
    return f"c:{cid}"  # a connection and its state record are one resource


def document_key(name: str) -> str:
    return f"d:{name}"


_TABLE_VERSIONS = itertools.count(1)


# --- the committed state ---------------------------------------------------------------------


class Committed:
    """What every reader sees: changed only by `apply`, one change at a time."""

    def __init__(self) -> None:
        self.connections: dict[str, Connection] = {}
        self.state: dict[str, ConnectionState] = {}
        self.documents: dict[str, dict[str, Any]] = {}
        self.log: deque[SyncEvent] = deque()
        self._log_sizes: deque[int] = deque()  # event_bytes of each event in `log`
        self.log_bytes = 0
        # The id from which the log is a whole history: an id missing before it (entries
        # removed from the middle by hand while the daemon was down, as a running daemon
        # puts such an edit back; a CLI restore of an older archive) means the entries
        # before it cannot serve a resume.
        self.whole_from = 0
        self.revision = 0
        # The revision of the latest event of each record (`record_key`, `document_key`).
        self.record_revs: dict[str, int] = {}
        self.settings = Settings()
        self.version = 0  # moves on every applied change (read caches key on it)
        # Moves on every change of a connection or their order only (the list's cache keys on
        # it: a heartbeat flush, a test result, a volume change leave the list as it was).
        # Unique in the process (`touch_connections`): no two stores' tables share one.
        self.connections_version = next(_TABLE_VERSIONS)
        # Compact JSON size of each connection, and their sum, for the dict they were counted
        # in (`connections_bytes`): counted again whole when the dict was replaced (a load).
        self._sized: dict[str, Connection] | None = None
        self._conn_sizes: dict[str, int] = {}
        self._conn_bytes = 0

    # --- reads ---------------------------------------------------------------------------------

    def oldest_revision(self) -> int:
        """The oldest retained revision a resume can start after (minus one): the log's first
        entry, or the first after its last gap (`_whole_from`)."""
        return max(self.log[0].id, self._whole_from()) if self.log else self.revision + 1

    def _whole_from(self) -> int:
        """The id from which the log holds every change up to the revision: past the last gap
        in it, or past the revision when its newest entries are missing (removed by hand
        while the daemon was down: the revision went on from the journal's)."""
        if self.log and self.log[-1].id < self.revision:
            return self.revision + 1
        return self.whole_from

    def revision_of(self, key: str) -> int:
        """The revision of a record's last change; one whose events were trimmed from the log
        (or sit before a gap in it, so a later change may be missing) changed at the latest
        just before the oldest retained one."""
        rev = self.record_revs.get(key)
        if rev is not None and rev >= self._whole_from():
            return rev
        return self.oldest_revision() - 1

    def events_since(self, since: int) -> list[SyncEvent]:
        """Retained events with id > since, oldest first (callers check compaction)."""
        out: list[SyncEvent] = []
        for event in reversed(self.log):
            if event.id <= since:
                break
            out.append(event)
        out.reverse()
        return out

    def algorithm_names(self) -> set[str]:
        return algorithm_names(self.documents.keys())

    def connections_bytes(self) -> int:
        """connections.json's records in compact JSON: counted once, then kept by `apply`."""
        if self._sized is not self.connections:
            self._conn_sizes = {k: _bytes_of(v) for k, v in self.connections.items()}
            self._conn_bytes = sum(self._conn_sizes.values())
            self._sized = self.connections
        return self._conn_bytes

    def connection_bytes(self, cid: str) -> int:
        self.connections_bytes()
        return self._conn_sizes.get(cid, 0)

    # --- loading (the shell's intake fills these from the files) --------------------------------

    def _set_log(self, events: Iterable[SyncEvent]) -> None:
        self.log = deque(events)
        self._log_sizes = deque(event_bytes(e) for e in self.log)
        self.log_bytes = sum(self._log_sizes)
        self.whole_from = 0
        for before, e in itertools.pairwise(self.log):
            if e.id != before.id + 1:
                self.whole_from = e.id

    def replace_log(self, events: list[SyncEvent]) -> None:
        """The log's entries as they are now: the same ids in the same order (a start's
        masking of what an older version wrote), their sizes kept in step."""
        self.log = deque(events)
        self._log_sizes = deque(event_bytes(e) for e in self.log)
        self.log_bytes = sum(self._log_sizes)

    def load_log(self, events: list[SyncEvent]) -> None:
        self._set_log(events)
        if events:
            self.revision = max(self.revision, events[-1].id)
        for e in events:
            self._note_revision(e)
        self.version += 1

    def touch_connections(self) -> None:
        """The connections changed (`connections_version`)."""
        self.connections_version = next(_TABLE_VERSIONS)

    def refresh_settings(self) -> None:
        self.settings = msgspec.convert(self.documents.get("settings", {}), type=Settings)

    # --- applying a change ---------------------------------------------------------------------

    def apply(self, change: Change, exact: bool = False) -> None:
        """Install `change` (see `RecordChange` for how a moved record is patched). `exact`:
        it was computed on this very state (nothing installed since), so no record moved and
        its records are taken as they are."""
        _apply_records(self.connections, change.connections, Connection, exact)
        if change.connections or change.order is not None:
            self.touch_connections()
        if self._sized is self.connections:
            for rc in change.connections:
                size = _bytes_of(self.connections.get(rc.key))
                self._conn_bytes += size - self._conn_sizes.pop(rc.key, 0)
                if size:
                    self._conn_sizes[rc.key] = size
        if change.order is not None:
            reordered = _reordered(self.connections, change.order)
            if self._sized is self.connections:
                self._sized = reordered  # the same records: the sizes hold
            self.connections = reordered
        _apply_records(self.state, change.state, ConnectionState, exact)
        settings_changed = False
        for rc in change.documents:
            settings_changed |= rc.key == "settings"
            if rc.value is None:
                self.documents.pop(rc.key, None)
            else:
                self.documents[rc.key] = patch_document(self.documents.get(rc.key), rc)
        if change.log is not None:
            self._set_log(change.log)
            if change.log:
                self.revision = max(self.revision, change.log[-1].id)
            if change.replaces:
                self.record_revs.clear()
                for e in change.log:
                    self._note_revision(e)
        # An event the log holds already is skipped (a journal replayed onto files that have
        # it). Judged by the log, not the revision: a replayed edit of the history sets the
        # log back, and the events logged after that edit must go on top of it again.
        last = self.log[-1].id if self.log else 0
        for e in change.events:
            if e.id > last:
                if self.log and e.id != last + 1:
                    self.whole_from = e.id
                self.log.append(e)
                size = event_bytes(e)
                self._log_sizes.append(size)
                self.log_bytes += size
                last = e.id
                self.revision = max(self.revision, e.id)
                self._note_revision(e)
        if settings_changed:
            self.refresh_settings()
        limit = self.settings.sync_log_limit
        while len(self.log) > limit or (self.log_bytes > LOG_MAX_BYTES and len(self.log) > 1):
            self._trimmed(self.log.popleft())
            self.log_bytes -= self._log_sizes.popleft()
        self.version += 1

    def _note_revision(self, e: SyncEvent) -> None:
        for key in event_keys(e):
            self.record_revs[key] = e.id

    def _trimmed(self, e: SyncEvent) -> None:
        """`e` left the log: the revisions it was the last event of, of records gone since,
        are forgotten (a desk whose bots make and remove connections all day grew the dict
        without end). A record still there keeps its exact revision (If-Match)."""
        for key in event_keys(e):
            if self.record_revs.get(key) == e.id:
                kind, name = key.split(":", 1)
                if name not in (self.connections if kind == "c" else self.documents):
                    del self.record_revs[key]


def event_keys(e: SyncEvent) -> list[str]:
    """The revision keys of the records an event changed."""
    keys = [record_key(e.connection_id)] if e.connection_id is not None else []
    names: list[Any] = [e.data.get("name")] if e.action == "document_update" else []
    if e.action == "reset":  # (an import logs each record and document it changed as well)
        names = [files.document_name(f) for f in e.data.get("files") or []]
    keys += [document_key(name) for name in names if isinstance(name, str)]
    return keys


def algorithm_names(document_names: Any) -> set[str]:
    prefix = f"{files.ALGORITHMS_DIR}/"
    return {n[len(prefix) :] for n in document_names if n.startswith(prefix)}


def _apply_records(
    table: dict[str, Any], changes: list[RecordChange], kind: type[Any], exact: bool
) -> None:
    for rc in changes:
        if rc.value is None:
            table.pop(rc.key, None)
            continue
        value = rc.value if isinstance(rc.value, kind) else msgspec.convert(rc.value, kind)
        current = table.get(rc.key)
        moved = not exact and current is not None and current is not value
        if rc.fields is not None and moved:
            value = msgspec.structs.replace(
                current, **{f: getattr(value, f) for f in rc.fields if f in kind.__struct_fields__}
            )
        table[rc.key] = value


def patch_document(current: dict[str, Any] | None, rc: RecordChange) -> dict[str, Any]:
    value: dict[str, Any] = rc.value
    if rc.fields is None or current is None:
        return value
    patched = dict(current)
    for key in rc.fields:
        if key in value:
            patched[key] = value[key]
        else:
            patched.pop(key, None)
    return value if patched == value else patched  # keep the new key order when it is the same


def _reordered(table: dict[str, Any], order: list[str]) -> dict[str, Any]:
    out = {k: table[k] for k in order if k in table}
    out.update((k, v) for k, v in table.items() if k not in out)
    return out


# --- applying ops ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What the shell tells the core for one group of changes."""

    now: str
    # Files invalid on disk, each with why: changes that would write them are refused.
    invalid_files: Mapping[str, str] = field(default_factory=dict)
    heartbeats: Mapping[str, str] = field(default_factory=dict)  # held in memory (sweeps)
    # Puts secrets in their stored form (`sealer.Sealer`); None: stored as sent.
    sealer: Any = None
    # Keys of settings.json that are this host's own (cluster mode): only a hand edit of its
    # settings.json changes them; a reset, restore, import or set keeps them as they are.
    own_settings: tuple[str, ...] = ()
    # A connection's `status` is this host's own (cluster mode): stale and back on its own
    # sweep, with no event in the shared sync log; a change the hosts share moves it without
    # one too.
    local_status: bool = False


class Tx:
    """One change being applied: overlays on the committed tables plus the events it emits."""

    def __init__(
        self, base: Committed, source: str, ctx: Context, parent: Tx | None = None
    ) -> None:
        self.base = base
        self.source = source
        self.ctx = ctx
        self.now = ctx.now
        self.connections: Table[Connection] = Table(
            parent.connections if parent else base.connections
        )
        self.state: Table[ConnectionState] = Table(parent.state if parent else base.state)
        self.docs: Table[dict[str, Any]] = Table(parent.docs if parent else base.documents)
        self.events: list[tuple[str | None, str, dict[str, Any]]] = []
        self.fields: dict[tuple[str, str], list[str] | None] = {}  # (table, key) → what was set
        self.log_replace: list[SyncEvent] | None = None
        self.touched: set[str] = set()  # files to write even if no record changed (a reset)
        # The file of a hand edit being taken in: never refused for files invalid on disk
        # (memory may get ahead of such a file; the file itself is never written until fixed).
        self.taken: str | None = None
        self.taken_digests: dict[str, str] = {}  # `Change.taken`
        # False for a late write taken in (written into a file a round had displaced): the
        # data file does not hold it until a round writes it, so its records are not `hand`
        # (a replay after a crash must take them from the journal, not from the file).
        self.on_disk = True
        # (table, key) of the records set by a hand edit of their own file, and by anything else
        self.by_hand: set[tuple[str, str]] = set()
        self.by_others: set[tuple[str, str]] = set()
        # Keys of records created under an id made here: none had it before, so an If-Match
        # (however old) cannot find it changed (`_check_if_match`).
        self.made: set[str] = set()
        # Connections whose `last_sync_at` the op took as given (an import, a restore, a
        # hand edit that sets it): not stamped with now (`_note_sync`).
        self.sync_given: set[str] = set()

    @property
    def takes_in(self) -> bool:
        return self.taken is not None

    def emit(self, action: str, connection_id: str | None, data: dict[str, Any]) -> None:
        # Masked here, once, for the sync log and every copy of the event (a name or a test
        # error may quote a URL with its password; `connection_settings` holds secrets).
        self.events.append((connection_id, action, {**mask_if_needed(data), "source": self.source}))

    def set_fields(self, table: str, key: str, fields: list[str] | None) -> None:
        """Record which fields a put changed (None: the whole record); merged across puts."""
        if (table, key) in self.fields:
            prev = self.fields[(table, key)]
            fields = None if prev is None or fields is None else sorted({*prev, *fields})
        self.fields[(table, key)] = fields

    def algorithm_names(self) -> set[str]:
        return algorithm_names(self.docs.keys())

    def files(self) -> set[str]:
        out: set[str] = set(self.touched)
        if self.connections.dirty:
            out.add(CONNECTIONS)
        if self.state.dirty:
            out.add(STATE)
        out.update(files.document_file(name) for name in self.docs.over)
        if self.events or self.log_replace is not None:
            out.add(SYNC_LOG)
        return out

    def keys(self) -> list[str]:
        """The records this change touched, as revision keys."""
        out = [record_key(cid) for cid in self.connections.over]
        out += [record_key(cid) for cid in self.state.over if cid not in self.connections.over]
        out += [document_key(name) for name in self.docs.over]
        return out

    def merge_into(self, parent: Tx) -> None:
        for table, overlay in (
            ("connections", self.connections),
            ("state", self.state),
            ("documents", self.docs),
        ):
            for key in overlay.over:
                own = self.taken is not None and self.on_disk and _file_of(table, key) == self.taken
                (parent.by_hand if own else parent.by_others).add((table, key))
        parent.by_hand |= self.by_hand
        parent.by_others |= self.by_others
        parent.made |= self.made
        parent.taken_digests.update(self.taken_digests)
        self.connections.merge_into(parent.connections)
        self.state.merge_into(parent.state)
        self.docs.merge_into(parent.docs)
        parent.events.extend(self.events)
        parent.touched |= self.touched
        for (table, key), fields in self.fields.items():
            parent.set_fields(table, key, fields)
        if self.log_replace is not None:
            parent.log_replace = self.log_replace


Op = Callable[[Tx], Any]


@dataclass
class Outcome:
    """One op of a group: its result or its refusal, and what it did."""

    result: Any = None
    error: CtsdError | None = None
    events: list[SyncEvent] = field(default_factory=list)
    files: set[str] = field(default_factory=set)
    # The revision it was applied at (the events of the requests before it in its group
    # included): what its answer shows when it made no event. (In cluster mode, when other
    # hosts' changes landed before the group, its base: see ClusterCommitter._apply_own.)
    seen: int = 0


@dataclass
class Request:
    op: Op
    source: str
    if_match: int | None = None
    # `if_match` is compared with what the group started from only, not with what the
    # requests before it in the group changed: a cluster host's recomputation guards each
    # request against other hosts' changes, and its own earlier requests are no such change.
    against_base: bool = False
    file: str | None = None  # a hand edit's file (source "file"), when it comes from one


def apply_group(
    base: Committed, requests: list[Request], ctx: Context
) -> tuple[list[Outcome], Change]:
    """Apply each request on its own overlay over the ones before it; a refused one (its
    error in its Outcome) leaves nothing behind. Returns each request's Outcome and the
    group's Change, revisions assigned (consecutive per request)."""
    group = Tx(base, "group", ctx)
    outcomes: list[Outcome] = []
    rev = base.revision
    events: list[SyncEvent] = []
    # Revisions given by the requests before in this group: an If-Match is checked against
    # them too (two clients that read the same revision may land in one group).
    group_revs: dict[str, int] = {}
    sizes = _Sizes(base)
    sealer = ctx.sealer
    for req in requests:
        tx = Tx(base, req.source, ctx, group)
        out = Outcome(seen=rev)
        outcomes.append(out)
        keys = sealer.keys() if sealer is not None else None
        try:
            out.result = req.op(tx)
            _note_sync(tx)
            if req.if_match is not None:
                revs = {} if req.against_base else group_revs
                _check_if_match(base, revs, tx.keys(), req.if_match, tx.made)
            out.files = tx.files()
            if not tx.takes_in:
                _check_blocked(out.files, ctx)
                sizes.check(tx)  # a hand edit is taken in as large as it is: it was read
        except (CtsdError, RecursionError) as e:
            out.error = (
                e if isinstance(e, CtsdError) else CtsdError("invalid", "input nested too deeply")
            )
            if sealer is not None and keys is not None:  # (a refused rekey rotated nothing)
                sealer.restore(keys)
            continue
        for cid, action, data in tx.events:
            rev += 1
            out.events.append(
                SyncEvent(id=rev, connection_id=cid, action=action, data=data, created_at=ctx.now)
            )
        events.extend(out.events)
        for e in out.events:
            group_revs.update(dict.fromkeys(event_keys(e), e.id))
        tx.merge_into(group)
    return outcomes, _change_of(group, events)


class _Sizes:
    """connections.json's size as a group's requests change it, and the check that refuses
    a request that would take it, or a document, past what the daemon reads back. A change
    that makes a file already past it smaller (a delete) is taken: the file got there by a
    hand edit, taken in as it was, or an earlier version."""

    def __init__(self, base: Committed) -> None:
        self.base = base
        self.total: int | None = None  # counted at the first request that changes a record
        self.sizes: dict[str, int] = {}  # the group's records, as the requests left them

    def check(self, tx: Tx) -> None:
        if tx.connections.over:
            if self.total is None:
                self.total = self.base.connections_bytes()
            now = {k: _bytes_of(v) for k, v in tx.connections.over.items()}
            total = self.total + sum(
                size - self.sizes.get(k, self.base.connection_bytes(k)) for k, size in now.items()
            )
            if total > CONTENT_MAX_BYTES and total > self.total:
                raise _too_large(CONNECTIONS, f"{total} bytes of JSON", CONTENT_MAX_BYTES)
            self.total = total
            self.sizes.update(now)
        for name, content in tx.docs.over.items():
            self._check_document(name, content)

    def _check_document(self, name: str, content: Any) -> None:
        size = _bytes_of(content)
        before = self.base.documents.get(name)
        if size > CONTENT_MAX_BYTES and size > _bytes_of(before):
            raise _too_large(files.document_file(name), f"{size} bytes of JSON", CONTENT_MAX_BYTES)
        if size * INDENT_WORST > MAX_FILE_BYTES:
            # Deep nesting indents each value by up to twice its depth: a 1 MB document of
            # zeros 64 levels down is written as 68 MB. Only then is the file encoded here,
            # and judged against the file as written before it.
            written = len(files.encode_document(content))
            if written > MAX_FILE_BYTES and (
                before is None or written > len(files.encode_document(before))
            ):
                what = f"{written} bytes as written (indented)"
                raise _too_large(files.document_file(name), what, MAX_FILE_BYTES)


# How much larger than its compact JSON a document can be once indented (2 spaces a level,
# MAX_DEPTH levels, a newline per value).
INDENT_WORST = 2 * MAX_DEPTH + 2


def _too_large(file: str, what: str, limit: int) -> CtsdError:
    return CtsdError(
        "too_large",
        f"{file} would be {what}; the limit is {limit}: nothing was changed",
    )


def _note_sync(tx: Tx) -> None:
    """A connection's state record carries the time of its latest event (`last_sync_at`),
    written with the change that moves it."""
    for cid, _action, _data in tx.events:
        if cid is None or cid in tx.sync_given:
            continue
        st = tx.state.get(cid)
        if st is not None and st.last_sync_at != tx.now:
            tx.state.put(cid, msgspec.structs.replace(st, last_sync_at=tx.now))
            tx.set_fields("state", cid, ["last_sync_at"])


def _check_if_match(
    base: Committed, group_revs: dict[str, int], keys: list[str], expected: int, made: set[str]
) -> None:
    for key in keys:
        if key in made:
            continue
        rev = group_revs.get(key) or base.revision_of(key)
        if rev > expected:
            raise CtsdError(
                "precondition_failed",
                f"{key[2:]} changed at revision {rev}, after the {expected} given in If-Match; "
                "read it again and retry",
            )


def _check_blocked(touched: set[str], ctx: Context) -> None:
    if not ctx.invalid_files:
        return  # the usual case, on every request
    blocked = sorted(f for f in touched if f in ctx.invalid_files)
    if blocked:
        file = blocked[0]
        raise CtsdError(
            "file_invalid",
            f"{file} is invalid on disk ({ctx.invalid_files[file]}); fix the file first",
            extra={"file": file},
        )


def _file_of(table: str, key: str) -> str:
    return {"connections": CONNECTIONS, "state": STATE}.get(table) or files.document_file(key)


def _change_of(group: Tx, events: list[SyncEvent]) -> Change:
    def records(table: Table[Any], name: str) -> list[RecordChange]:
        out = []
        for key, value in table.over.items():
            hand = (name, key) in group.by_hand and (name, key) not in group.by_others
            if value is DELETED:
                out.append(RecordChange(key, hand=hand))
            else:
                out.append(RecordChange(key, value, group.fields.get((name, key)), hand))
        return out

    return Change(
        connections=records(group.connections, "connections"),
        state=records(group.state, "state"),
        documents=records(group.docs, "documents"),
        order=group.connections.order,
        events=events,
        log=group.log_replace,
        touched=sorted(group.touched),
        taken=group.taken_digests,
    )


# --- replaying the journal ------------------------------------------------------------------


def loaded_files(c: Committed) -> Committed:
    """The records as loaded from the files, kept aside while the journal is replayed."""
    out = Committed()
    out.connections, out.state = dict(c.connections), dict(c.state)
    out.documents = dict(c.documents)
    return out


def replayed(
    change: Change, on_disk: Committed, invalid: frozenset[str], now: Committed | None = None
) -> Change:
    """`change` as replayed from the journal onto the data files as loaded (`on_disk`; files
    in `invalid` did not load), `now` the state the replay reached (the changes before it
    applied). A record a hand edit set takes the values its file holds now: since that edit
    was taken in the file can only have moved on (the daemon writing on top of it, or the
    operator saving again, not yet taken in when the daemon died), never back, and an older
    hand edit must not undo a newer one. A patch of fields of a record `now` lacks is
    dropped: the record was in its file (no change before it made it) and was deleted by
    hand while the daemon was down, after the patch; applied, it brought the whole record
    back."""
    if now is not None:
        change = _without_deleted(change, now, invalid)

    def as_on_disk(rcs: list[RecordChange], table: str, now: Mapping[str, Any]) -> None:
        for i, rc in enumerate(rcs):
            if not rc.hand or _file_of(table, rc.key) in invalid:
                continue
            current = now.get(rc.key)
            if current is None:
                rcs[i] = RecordChange(rc.key, hand=True)  # deleted by hand since
            else:
                fields = rc.fields if rc.value is not None else None
                rcs[i] = RecordChange(rc.key, current, fields, hand=True)

    tables = (change.connections, change.state, change.documents)
    if not any(rc.hand for rcs in tables for rc in rcs):
        return change
    out = msgspec.structs.replace(
        change,
        connections=list(change.connections),
        state=list(change.state),
        documents=list(change.documents),
    )
    # A reorder by hand: the order the file holds now, for the same reason.
    if (
        change.order is not None
        and CONNECTIONS not in invalid
        and any(rc.hand for rc in change.connections)
    ):
        out.order = list(on_disk.connections)
    as_on_disk(out.connections, "connections", on_disk.connections)
    as_on_disk(out.state, "state", on_disk.state)
    as_on_disk(out.documents, "documents", on_disk.documents)
    # A connection deleted by hand and back in the file keeps its state record too.
    back = {rc.key for rc in out.connections if rc.hand and rc.value is not None}
    out.state = [
        RecordChange(rc.key, on_disk.state[rc.key])
        if rc.value is None and rc.key in back and rc.key in on_disk.state
        else rc
        for rc in out.state
    ]
    return out


def _without_deleted(change: Change, now: Committed, invalid: frozenset[str]) -> Change:
    def kept(rcs: list[RecordChange], table: str, have: Mapping[str, Any]) -> list[RecordChange]:
        return [
            rc
            for rc in rcs
            if rc.hand
            or rc.value is None
            or rc.fields is None
            or rc.key in have
            or _file_of(table, rc.key) in invalid
        ]

    connections = kept(change.connections, "connections", now.connections)
    state = kept(change.state, "state", now.state)
    documents = kept(change.documents, "documents", now.documents)
    if (len(connections), len(state), len(documents)) == (
        len(change.connections),
        len(change.state),
        len(change.documents),
    ):
        return change
    return msgspec.structs.replace(
        change, connections=connections, state=state, documents=documents
    )


def replayed_onto(
    changes: Iterable[Change], invalid: Collection[str]
) -> dict[str, dict[str, list[str] | None]]:
    """Per file in `invalid` (it did not load): the records the journal replayed onto memory
    for it, key → the fields set (None: the whole record, or its removal)."""
    out: dict[str, dict[str, list[str] | None]] = {}
    for change in changes:
        for table, rcs in (
            ("connections", change.connections),
            ("state", change.state),
            ("documents", change.documents),
        ):
            for rc in rcs:
                file = _file_of(table, rc.key)
                if file not in invalid:
                    continue
                keys = out.setdefault(file, {})
                fields = rc.fields if rc.value is not None else None
                if rc.key in keys and (keys[rc.key] is None or fields is None):
                    keys[rc.key] = None
                else:
                    keys[rc.key] = sorted({*(keys.get(rc.key) or ()), *(fields or ())}) or None
    return out


def base_of_unread(
    hand: Any, memory: Any, replayed: Mapping[str, list[str] | None], *, table: bool
) -> Any:
    """The base to take in `hand` against, the fix of a file that never read valid since the
    start: memory, but with what the journal replayed onto it as `hand` holds it. The fix
    then takes nothing of those fields back (they were acknowledged; the file never got them)
    and is taken whole elsewhere (memory has nothing else of its own for it). `table`: records
    by key (connections, state); else a document (its top-level keys)."""
    if not table:
        fields = next(iter(replayed.values()), None)  # one document per file
        if fields is None or not isinstance(hand, dict) or not isinstance(memory, dict):
            return hand  # set whole by the journal: memory keeps all of it
        base = dict(memory)
        for key in fields:
            if key in hand:
                base[key] = hand[key]
            else:
                base.pop(key, None)
        return base
    base = dict(memory)
    for key, fields in replayed.items():
        theirs, ours = hand.get(key), memory.get(key)
        if fields is None or theirs is None or ours is None:
            if theirs is None:
                base.pop(key, None)
            else:
                base[key] = theirs
        else:
            known = [f for f in fields if f in ours.__struct_fields__]  # (a journal of before)
            base[key] = msgspec.structs.replace(ours, **{f: getattr(theirs, f) for f in known})
    return base


# --- comparing records -------------------------------------------------------------------------


_astuple = msgspec.structs.astuple


def changed_fields(old: msgspec.Struct | None, new: msgspec.Struct | None) -> list[str]:
    if old is not None and new is not None and type(old) is type(new):
        # The hot path (every update): compare two tuples built in C, no dicts.
        pairs = zip(old.__struct_fields__, _astuple(old), _astuple(new), strict=True)
        return [k for k, a, b in pairs if a != b]
    a = msgspec.structs.asdict(old) if old is not None else {}
    b = msgspec.structs.asdict(new) if new is not None else {}
    return [k for k in (b or a) if a.get(k) != b.get(k)]


_ABSENT = object()


def changed_keys(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """The top-level keys whose value differs, a key set to null and an absent one apart."""
    old = old or {}
    return sorted({k for k in {*old, *new} if old.get(k, _ABSENT) != new.get(k, _ABSENT)})


def mirror_state(conn: Connection, st: ConnectionState | None, now: str) -> ConnectionState:
    """The state record of `conn`, with `is_active` mirrored and `status` consistent."""
    live = conn.is_enabled and conn.is_active
    if st is None:
        return ConnectionState(
            connection_id=conn.id,
            is_active=conn.is_active,
            volume_factor_live=conn.volume_factor,
            volume_factor_preset=conn.volume_factor,
            created_at=now,
            updated_at=now,
            status="active" if live else "inactive",
        )
    status = st.status if live and st.status != "inactive" else ("active" if live else "inactive")
    if st.is_active == conn.is_active and st.status == status:
        return st
    return msgspec.structs.replace(st, is_active=conn.is_active, status=status, updated_at=now)


# --- hand edits made while changes were still on their way to the file ----------------------


@dataclass
class Merged:
    """A hand edit merged onto memory: the records, and the fields both sides changed."""

    records: dict[str, Any]
    conflicts: list[tuple[str, list[str]]]  # (key, fields the hand edit won)


def merge_table(
    base: Mapping[str, Any], hand: Mapping[str, Any], memory: Mapping[str, Any]
) -> Merged:
    """Three-way merge of a table file: `base` is what the file held when the daemon last
    read or wrote it, `hand` what it holds now, `memory` the committed records (base plus the
    changes not yet written). The hand edit's own changes (per field, against base) go on top
    of memory; a field both sides changed goes to the hand edit. Order: the hand edit's, then
    records memory has that the hand edit neither has nor deleted."""
    out: dict[str, Any] = {}
    conflicts: list[tuple[str, list[str]]] = []
    for key, h in hand.items():
        b, m = base.get(key), memory.get(key)
        if b is not None and (h is b or h == b):  # untouched by hand: memory's version
            if m is not None:
                out[key] = m
            continue
        if m is None or b is None or m is b or m == b:  # only the hand edit changed it
            out[key] = h
            if b is None and m is not None and m != h:
                conflicts.append((key, changed_fields(m, h)))
            continue
        hand_fields = changed_fields(b, h)
        mine = set(changed_fields(b, m))
        both = [f for f in hand_fields if f in mine]
        out[key] = msgspec.structs.replace(m, **{f: getattr(h, f) for f in hand_fields})
        if both:
            conflicts.append((key, both))
    for key, m in memory.items():
        if key in out or key in hand:
            continue
        b = base.get(key)
        if b is None:
            out[key] = m  # created by a change the file has not seen yet
        elif m is not b and m != b:
            conflicts.append((key, ["(deleted by hand)"]))  # the hand deletion wins
    return Merged(out, conflicts)


def merge_document(
    base: Mapping[str, Any] | None, hand: dict[str, Any], memory: Mapping[str, Any] | None
) -> Merged:
    """`merge_table` for a document, per top-level key."""
    base, memory = base or {}, memory or {}
    if memory == base:
        return Merged(hand, [])
    out = dict(hand)
    hand_keys = set(changed_keys(base, hand))
    conflicts = [k for k in changed_keys(base, memory) if k in hand_keys]
    for key in changed_keys(base, memory):
        if key in hand_keys:
            continue
        if key in memory:
            out[key] = memory[key]
        else:
            out.pop(key, None)
    return Merged(out, [("", conflicts)] if conflicts else [])
