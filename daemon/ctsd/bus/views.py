"""Read views of the store for the bus and HTTP: every record leaves through `redact.mask`.

These read committed memory directly (no door needed for reads); state goes through
`store.state_view` so in-memory heartbeats show before their periodic flush.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import msgspec

from ctsd import __version__, files
from ctsd.errors import CtsdError
from ctsd.health import health
from ctsd.models import Connection, ConnectionState, SyncEvent
from ctsd.redact import mask, mask_record
from ctsd.timeutil import later, now_iso

if TYPE_CHECKING:
    from ctsd.services import Services
    from ctsd.store import Store

to_builtins = msgspec.to_builtins


def connection(conn: Connection) -> dict[str, Any]:
    return mask_record(conn)


# Each connection's masked JSON, kept while the record object is the same (records are
# immutable: a change installs a new object). A list of 1,000 connections is then a join of
# cached bytes instead of 1,000 masks and encodes.
_masked: dict[str, tuple[Connection, msgspec.Raw]] = {}
_encode = msgspec.json.Encoder().encode


def masked_raw(conn: Connection) -> msgspec.Raw:
    hit = _masked.get(conn.id)
    if hit is not None and hit[0] is conn:
        return hit[1]
    raw = msgspec.Raw(_encode(connection(conn)))
    _masked[conn.id] = (conn, raw)
    return raw


# The whole list, kept while no connection changed: repeated reads of an unchanged table cost
# a lookup (keyed on the table and its version: state changes, heartbeat flushes and test
# results every few seconds on a big desk, made every read build it again).
_lists: dict[tuple[Any, ...], tuple[int, msgspec.Raw]] = {}


def connections(
    store: Store,
    exchange: str | None = None,
    enabled: bool | None = None,
    active: bool | None = None,
) -> msgspec.Raw:
    """The connections (masked) as one JSON array, in file order."""
    table = store.connections
    key = (id(store), exchange, enabled, active)
    version = store.committed.connections_version
    hit = _lists.get(key)
    if hit is not None and hit[0] == version:
        return hit[1]
    if len(_masked) > 2 * len(table) + 64:  # records deleted since: forget them
        for cid in [c for c in _masked if c not in table]:
            del _masked[cid]
    out = []
    for c in table.values():
        if exchange is not None and c.exchange != exchange:
            continue
        if enabled is not None and c.is_enabled != enabled:
            continue
        # "Active connections" are the enabled ones with is_active true.
        if active is not None and (c.is_enabled and c.is_active) != active:
            continue
        out.append(masked_raw(c))
    raw = msgspec.Raw(_encode(out))
    if len(_lists) > 64:
        _lists.clear()
    _lists[key] = (version, raw)
    return raw


def get_connection(store: Store, cid: str) -> dict[str, Any]:
    conn = store.connections.get(cid)
    if conn is None:
        raise CtsdError("not_found", f"no connection {cid!r}", path="$.connection_id")
    return connection(conn)


# Each state record's masked JSON, kept while the record and the heartbeat memory holds for
# it are the same (`Store.state_view` lays that over it): the whole list, 10,000 records,
# was masked and encoded again for every read (a dashboard polling it held every bot's ack).
_masked_state: dict[str, tuple[ConnectionState, str | None, msgspec.Raw]] = {}


def state(store: Store) -> msgspec.Raw:
    """The state records (with the heartbeats held in memory), masked, as one JSON array."""
    table, beats = store.state, store.heartbeats
    if len(_masked_state) > 2 * len(table) + 64:  # records deleted since: forget them
        for cid in [c for c in _masked_state if c not in table]:
            del _masked_state[cid]
    out = []
    for cid, st in table.items():
        beat = beats.get(cid)
        hit = _masked_state.get(cid)
        if hit is None or hit[0] is not st or hit[1] != beat:
            view = store.state_view(cid)
            hit = (st, beat, msgspec.Raw(_encode(mask(to_builtins(view)))))
            # (A beat not later than the stored one is laid over it only while the stored
            # one is ahead of the clock: a view that changes with time is not kept.)
            if beat is None or later(beat, st.last_heartbeat_at):
                _masked_state[cid] = hit
        out.append(hit[2])
    return msgspec.Raw(_encode(out))


def state_of(store: Store, cid: str) -> dict[str, Any]:
    st = store.state_view(cid)
    if st is None:
        raise CtsdError("not_found", f"no connection {cid!r}", path="$.connection_id")
    return mask(to_builtins(st))


def documents(store: Store) -> dict[str, Any]:
    return {name: mask(content) for name, content in sorted(store.documents.items())}


def document(store: Store, name: str) -> Any:
    content = store.documents.get(name)
    if content is None:
        raise CtsdError("not_found", f"no document {name!r}", path="$.name")
    return mask(content)


def events(evs: list[SyncEvent]) -> list[dict[str, Any]]:
    # Sync-log data never holds a secret value (ops store only non-secret values); masked
    # anyway so a future op cannot leak through the edge.
    return [mask(to_builtins(e)) for e in evs]


def check_since(store: Store, since: int) -> None:
    """Can the events after `since` be given, all of them? (`subscribe`, `sync_log.get`)"""
    oldest = store.oldest_revision()
    if since < oldest - 1:
        raise CtsdError(
            "revision_compacted",
            f"the events after revision {since} are not all kept (the sync log holds every "
            f"change from revision {oldest} on); take a snapshot and subscribe from its "
            "revision",
            path="$.since",
            extra={"oldest": oldest},
        )
    if since > store.revision:
        # Revisions are never reused: a `since` from the future came from another data dir
        # (answered with nothing, its poller would skip what comes until it passes `since`;
        # in cluster mode, or a host a few changes behind another: it retries).
        raise CtsdError(
            "invalid",
            f"since {since} is ahead of the current revision {store.revision}",
            path="$.since",
        )


def sync_log(store: Store, since: int | None, limit: int) -> list[dict[str, Any]]:
    """Entries after `since` (at most `limit`, oldest first; `revision_compacted` if `since`
    is too old); without `since`, the newest `limit` retained entries, oldest first."""
    if since is None:
        newest = list(itertools.islice(reversed(store.log), limit))
        newest.reverse()
        return events(newest)
    check_since(store, since)
    return events(store.events_since(since)[:limit])


def snapshot(store: Store) -> dict[str, Any]:
    return {
        "revision": store.revision,
        "connections": connections(store),
        "state": state(store),
        "documents": documents(store),
    }


def export(store: Store) -> dict[str, Any]:
    """Every data file as its content, secrets masked (`data.export`)."""
    out: dict[str, Any] = {
        files.CONNECTIONS: connections(store),
        files.STATE: state(store),
        files.SYNC_LOG: events(list(store.log)),
    }
    for name, content in sorted(store.documents.items()):
        out[files.document_file(name)] = mask(content)
    return {"version": 1, "exported_at": now_iso(), "revision": store.revision, "files": out}


def counts(store: Store) -> dict[str, int]:
    by_status = {"active": 0, "stale": 0, "inactive": 0}
    for st in store.state.values():
        by_status[st.status] = by_status.get(st.status, 0) + 1
    conns = store.connections.values()
    return {
        "connections": len(store.connections),
        "enabled": sum(1 for c in conns if c.is_enabled),
        "active": sum(1 for c in conns if c.is_enabled and c.is_active),
        **{f"status_{k}": v for k, v in by_status.items()},
    }


def status(svc: Services) -> dict[str, Any]:
    store = svc.store
    return {
        "version": __version__,
        "revision": store.revision,
        "uptime_s": svc.uptime_s,
        "counts": counts(store),
        "invalid_files": sorted(store.problems),
        "store": store.status(),
        "bus": svc.server_stats(),
        "projectx": svc.prober.projectx_status(),
        "secrets": store.secrets_status(),
        **({"cluster": c} if (c := store.committer_status()) is not None else {}),
        "health": _health_summary(svc),
    }


def _health_summary(svc: Services) -> dict[str, Any]:
    """`/health`'s verdict and its failing checks (`ctsd status` shows them)."""
    report = health(svc)
    failing = {name: check for name, check in report["checks"].items() if not check["ok"]}
    return {"status": report["status"], "failing": failing}
