"""The shared state of a cluster host as one value: what a snapshot holds.

`capture` takes the shared part of the committed state as it is at one stream seq (references
only, on the event loop); `encode` turns it into the snapshot's bytes (JSON, zlib; in a
thread); `decode` checks a snapshot read back as strictly as the data files are checked at
start (every table and document through the files' own validation), so a snapshot that does
not validate is refused whole; `replacement` is the one change that makes a host's shared
state equal to it (every record put whole, every record it lacks deleted, the sync log
replaced), which then takes the same way as any change from the stream.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Any

import msgspec

from ctsd import files, limits
from ctsd.cluster.errors import SnapshotInvalid, SnapshotTooLarge
from ctsd.cluster.messages import MAX_INFLATED, inflate
from ctsd.core import (
    STREAM_SEQ,
    Change,
    Committed,
    RecordChange,
    algorithm_names,
    patch_document,
)
from ctsd.files import CONNECTIONS, STATE, SYNC_LOG, Invalid
from ctsd.limits import MAX_DEPTH
from ctsd.models import Connection, ConnectionState, SyncEvent
from ctsd.secretbox import SecretBox, SecretError, is_encrypted, stored_key_id
from ctsd.secretfields import CONNECTION_SECRETS, open_connection, secret_places

# Each host's own (its bind address, its cluster settings, how it watches its own data dir,
# which may be on NFS); never in a snapshot.
LOCAL_SETTINGS_KEYS = ("server", "cluster", "watch")
ALGORITHMS_PREFIX = f"{files.ALGORITHMS_DIR}/"


class SharedState(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The shared state of a cluster at one stream seq (the tables in file order)."""

    cluster: str
    seq: int
    connections: list[Connection]
    state: list[ConnectionState]
    documents: dict[str, dict[str, Any]]
    log: list[SyncEvent]


_decode = msgspec.json.Decoder(SharedState).decode
_encode = msgspec.json.Encoder().encode


def capture(c: Committed, cluster: str, seq: int) -> SharedState:
    """The shared part of `c` (at stream seq `seq`). Copies references only: records and
    documents are replaced on a change, never changed in place, so it may be encoded later
    (in a thread) while the committed state moves on."""
    documents = dict(c.documents)
    settings = documents.get("settings")
    if settings is not None:
        documents["settings"] = {k: v for k, v in settings.items() if k not in LOCAL_SETTINGS_KEYS}
    return SharedState(
        cluster=cluster,
        seq=seq,
        connections=list(c.connections.values()),
        state=list(c.state.values()),
        documents=documents,
        log=list(c.log),
    )


def encode(state: SharedState, limit: int = MAX_INFLATED) -> bytes:
    """The snapshot's bytes. Raises SnapshotTooLarge past what a host inflates (`limit`):
    stored, it would be refused by every host that needs it."""
    raw = _encode(state)
    if len(raw) > limit:
        raise SnapshotTooLarge(
            f"the shared state at seq {state.seq} is {len(raw):,} bytes, more than the "
            f"{limit:,} a snapshot may hold: it is not stored"
        )
    return zlib.compress(raw, 1)


def decode(data: bytes, *, cluster: str, seq: int, what: str) -> SharedState:
    """A snapshot's bytes, checked whole; raises SnapshotInvalid naming `what` and the fault."""

    def invalid(why: str) -> SnapshotInvalid:
        return SnapshotInvalid(f"{what} is not valid: {why}; nothing of it was applied")

    try:
        raw = inflate(data)
    except zlib.error as exc:
        raise invalid(f"it does not inflate ({exc})") from None
    try:
        state = _decode(raw)
    except msgspec.MsgspecError as exc:
        raise invalid(f"it does not decode ({exc})") from None
    except RecursionError:
        raise invalid("it is nested too deeply") from None
    if state.cluster != cluster:
        raise invalid(f"it holds the state of cluster {state.cluster!r}, not {cluster!r}")
    if state.seq != seq:
        raise invalid(f"it holds the state at seq {state.seq}, but is tagged seq {seq}")
    # The checks the data files get at start: ids unique, connection_settings, documents
    # against their typed views, sync-log ids increasing, instances naming algorithms.
    try:
        for file, records in (
            (CONNECTIONS, state.connections),
            (STATE, state.state),
            (SYNC_LOG, state.log),
        ):
            files.decode_table(file, files.encode_table(records))
        for name, content in state.documents.items():
            try:
                file = files.document_file(name)
            except KeyError:
                raise invalid(f"it holds an unknown document {name[:80]!r}") from None
            files.validate_document(name, content, file)
        instances = state.documents.get("instances")
        if instances is not None:
            algorithms = algorithm_names(state.documents)
            files.check_instance_refs(instances, algorithms, files.document_file("instances"), None)
    except Invalid as exc:
        raise invalid(exc.problem.format()) from None
    ids = {c.id for c in state.connections}
    orphans = [s.connection_id for s in state.state if s.connection_id not in ids]
    if orphans:
        raise invalid(f"it holds the state of connection {orphans[0]!r} but not the connection")
    # As for a message's log: a stream seq past the snapshot's own would have the host skip
    # the stream's next changes as held already.
    problem = _events_problem("log", state.log, seq, ordered=True)
    if problem is not None:
        raise invalid(problem)
    return state


def shown(value: str, limit: int = 80) -> str:
    """A value from a snapshot's tags as shown in a message (foreign input: cut when long)."""
    return value if len(value) <= limit else value[: limit - 1] + "…"


def holds_data(c: Committed) -> str | None:
    """What of `c` joining a cluster would lose or fork (None: nothing): connections, sync-log
    history, algorithms. Documents are not counted: a host joining takes the cluster's."""
    held = [
        f"{n} {what}"
        for n, what in (
            (len(c.connections), "connection(s)"),
            (len(c.log), "sync-log event(s)"),
            (len(c.algorithm_names()), "algorithm(s)"),
        )
        if n
    ]
    return ", ".join(held) or None


def foreign_secret(
    key_ids: tuple[str, ...],
    connections: Iterable[RecordChange],
    documents: Iterable[RecordChange],
) -> str | None:
    """The first secret these changes would store that this host cannot open (sealed under a
    key it does not hold: another host with another key), described; None when there is
    none. Only what a change sets counts (a patched record's `fields`); plain text is sealed
    here like any secret that comes in plain. Every host of a cluster holds the same key."""
    held = ", ".join(key_ids) or "none (plain text)"

    def misfit(value: object) -> str | None:
        if not is_encrypted(value):
            return None
        kid = stored_key_id(str(value))
        if kid is not None and kid in key_ids:
            return None
        return f"is sealed under secrets key {kid or '(unknown)'}; this host's key: {held}"

    for rc in connections:
        if rc.value is None:
            continue
        for name in CONNECTION_SECRETS:
            if rc.fields is None or name in rc.fields:
                problem = misfit(getattr(rc.value, name))
                if problem:
                    return f"connection {rc.key!r}: {name} {problem}"
    for rc in documents:
        try:
            file = files.document_file(rc.key)
        except KeyError:
            continue
        for place in secret_places(file, rc.value):
            if rc.fields is None or (place.path and place.path[0] in rc.fields):
                problem = misfit(place.value)
                if problem:
                    return f"{file}: {place.field} {problem}"
    return None


def same_data(c: Committed, state: SharedState, box: SecretBox) -> bool:
    """Does `c` hold the connections, sync log and algorithms of `state`? Secrets compare
    opened: the same value sealed twice reads differently (a fresh nonce each time)."""
    algorithms = {k: v for k, v in state.documents.items() if k.startswith(ALGORITHMS_PREFIX)}
    if list(c.log) != state.log or algorithms != {
        k: v for k, v in c.documents.items() if k.startswith(ALGORITHMS_PREFIX)
    }:
        return False
    try:
        return [open_connection(box, x) for x in c.connections.values()] == [
            open_connection(box, x) for x in state.connections
        ]
    except SecretError:
        return False


def replacement(c: Committed, state: SharedState) -> Change:
    """The change that makes `c`'s shared part equal `state` (records in its order)."""
    conns = {x.id: x for x in state.connections}
    connections = [RecordChange(k) for k in c.connections if k not in conns]
    connections += [RecordChange(x.id, x) for x in state.connections]
    # The state table in the snapshot's order: every record out, then in again in order.
    records = [RecordChange(k) for k in c.state]
    records += [RecordChange(x.connection_id, x) for x in state.state]
    documents = [RecordChange(k) for k in c.documents if k not in state.documents]
    documents += [RecordChange(k, v) for k, v in state.documents.items()]
    return Change(
        connections=connections,
        state=records,
        documents=documents,
        order=list(conns),
        log=list(state.log),
        replaces=True,
    )


def change_problem(c: Committed, change: Change, seq: int) -> str | None:
    """What in another host's change (stream seq `seq`) the data files could not hold,
    checked as they are at start, on the state it would be applied to; None when nothing.
    Its records' types are checked by the decode; this is the rest: files it names, records
    under their own ids, connection_settings, the sync log's order, depth and stream seqs,
    documents against their typed views (as patched here), instances naming algorithms."""
    for name in change.touched:
        if not files.is_data_file(name):  # (a name out of the data dir, `../.token`, above all)
            return f"it names {name[:80]!r} as a file to write, which is no data file"
    for rc in change.connections:
        if rc.value is not None and rc.value.id != rc.key:
            return f"connection {rc.key[:80]!r} holds a record of id {rc.value.id[:80]!r}"
    for rc in change.state:
        if rc.value is not None and rc.value.connection_id != rc.key:
            return (
                f"the state of {rc.key[:80]!r} is a record of connection "
                f"{rc.value.connection_id[:80]!r}"
            )
    problem = _events_problem("events", change.events, seq, ordered=False)
    if problem is None and change.log is not None:
        problem = _events_problem("log", change.log, seq, ordered=True)
    if problem is not None:
        return problem
    try:
        for rc in change.connections:
            if rc.value is not None:
                problem = files.connection_settings_problem(rc.value.connection_settings)
                if problem:
                    return f"connection {rc.key[:80]!r}: {problem}"
        documents = dict(c.documents)
        for rc in change.documents:
            try:
                file = files.document_file(rc.key)
            except KeyError:
                return f"it changes an unknown document {rc.key[:80]!r}"
            if rc.value is None:
                documents.pop(rc.key, None)
                continue
            documents[rc.key] = patch_document(documents.get(rc.key), rc)
            files.validate_document(rc.key, documents[rc.key], file)
        instances = documents.get("instances")
        if instances is not None and any(
            rc.key == "instances" or rc.key.startswith(f"{files.ALGORITHMS_DIR}/")
            for rc in change.documents
        ):
            files.check_instance_refs(
                instances, algorithm_names(documents), files.document_file("instances"), None
            )
    except Invalid as exc:
        return exc.problem.format()
    return None


def _events_problem(what: str, events: list[SyncEvent], seq: int, ordered: bool) -> str | None:
    """Sync-log entries as the sync-log file holds them: `data` within the depth limit, ids
    strictly increasing, and no stream seq past the change's own (`held_seq` reads it: one
    past it would make this host skip the stream's next changes as held already) — the last
    two for a log put whole (`ordered`): events get their ids and seq when applied."""
    for i, e in enumerate(events):
        if limits.check_depth(e.data, MAX_DEPTH - 2) is not None:
            return f"{what}[{i}]: data {limits.depth_message(MAX_DEPTH - 2)}"
        if ordered and i and e.id <= events[i - 1].id:
            return f"{what}[{i}]: sync-log ids must strictly increase"
        at = e.data.get(STREAM_SEQ, 1) if ordered else 1
        if type(at) is not int or not 0 < at <= seq:
            return f"{what}[{i}]: {STREAM_SEQ} {str(at)[:40]} is no seq of this stream up to {seq}"
    return None
