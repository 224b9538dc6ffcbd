"""What each bus command does. Changes go through the store's one door (source "bus", or
"cli" when the CLI says so);
reads come from committed memory through `views` (masked)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from ctsd import ops, sweeps
from ctsd.bus import protocol as p
from ctsd.bus import views
from ctsd.bus.fanout import ALL_TOPICS, TOPIC_BITS
from ctsd.errors import CtsdError
from ctsd.models import Connection
from ctsd.redact import mask

if TYPE_CHECKING:
    from ctsd.bus.session import Session

Handler = Callable[["Session", Any], Awaitable[Any]]

# Commands that change something: they run as their own task so a client can pipeline them
# (they group-commit); a read waits for the same client's earlier changes (read-your-writes).
WRITES = frozenset(
    {
        "connections.create",
        "connections.update",
        "connections.delete",
        "connections.batch_update",
        "connections.set_active",
        "connections.set_volume",
        "documents.set",
        "data.import",
        "data.reset",
    }
)
# Exchange probes take up to `test_timeout_s`: their own tasks too, but nothing waits for them.
PROBES = frozenset({"connections.test", "trading.test_connection"})


async def _submit(s: Session, op: ops.Op, a: p.Args) -> Any:
    return await s.app.store.submit(op, source=a.source)


def _conn_out(result: Any) -> Any:
    return views.connection(result) if isinstance(result, Connection) else result


async def ping(s: Session, a: p.NoArgs) -> Any:
    return {"pong": True, "revision": s.app.store.revision}


async def status(s: Session, a: p.NoArgs) -> Any:
    return views.status(s.app)


async def snapshot(s: Session, a: p.NoArgs) -> Any:
    return views.snapshot(s.app.store)


async def subscribe(s: Session, a: p.Subscribe) -> Any:
    store = s.app.store
    if a.since is not None:
        views.check_since(store, a.since)
        if a.since > store.revision:
            # Revisions are never reused: a `since` from the future came from another daemon.
            raise CtsdError(
                "invalid",
                f"since {a.since} is ahead of the current revision {store.revision}",
                path="$.since",
            )
    topics = ALL_TOPICS
    if a.topics is not None:
        if not a.topics:
            raise CtsdError(
                "invalid", "topics must not be empty (leave it out for all)", path="$.topics"
            )
        topics = 0
        for t in a.topics:
            topics |= TOPIC_BITS[t]
    cids = frozenset(a.connection_ids) if a.connection_ids is not None else None
    # Registration and replay happen in this one synchronous step; the result goes out before
    # any event frame (the subscription is held until then).
    sub = s.server.hub.subscribe(s.conn, (topics, cids), a.since)
    s.pending_sub = sub
    return {"revision": store.revision}


async def unsubscribe(s: Session, a: p.NoArgs) -> Any:
    was = s.conn in s.server.hub.by_conn
    s.server.hub.unsubscribe(s.conn)
    return {"unsubscribed": was}


async def sync_log_get(s: Session, a: p.SyncLogGet) -> Any:
    return views.sync_log(s.app.store, a.since, a.limit)


async def connections_list(s: Session, a: p.ConnectionsList) -> Any:
    return views.connections(s.app.store, a.exchange, a.enabled, a.active)


async def connections_get(s: Session, a: p.ConnectionRef) -> Any:
    return views.get_connection(s.app.store, a.connection_id)


async def connections_create(s: Session, a: p.ConnectionsCreate) -> Any:
    return _conn_out(await _submit(s, ops.create(a.connection), a))


async def connections_update(s: Session, a: p.ConnectionsUpdate) -> Any:
    return _conn_out(await _submit(s, ops.update(a.connection_id, a.changes), a))


async def connections_delete(s: Session, a: p.ConnectionRef) -> Any:
    return await _submit(s, ops.delete(a.connection_id), a)


async def connections_batch_update(s: Session, a: p.ConnectionsBatchUpdate) -> Any:
    return [_conn_out(c) for c in await _submit(s, ops.batch_update(a.updates), a)]


async def connections_set_active(s: Session, a: p.ConnectionsSetActive) -> Any:
    return _conn_out(await _submit(s, ops.set_active(a.connection_id, a.active), a))


async def connections_set_volume(s: Session, a: p.ConnectionsSetVolume) -> Any:
    return _conn_out(await _submit(s, ops.set_volume(a.connection_id, a.live, a.preset), a))


async def connections_heartbeat(s: Session, a: p.ConnectionRef) -> Any:
    ts = sweeps.heartbeat(s.app, a.connection_id)
    return {"connection_id": a.connection_id, "timestamp": ts}


async def connections_test(s: Session, a: p.ConnectionRef) -> Any:
    result = await sweeps.test_connection(s.app, a.connection_id)
    return msgspec.to_builtins(result)


async def documents_list(s: Session, a: p.NoArgs) -> Any:
    return sorted(s.app.store.documents)


async def documents_get(s: Session, a: p.DocumentsGet) -> Any:
    return views.document(s.app.store, a.name)


async def documents_set(s: Session, a: p.DocumentsSet) -> Any:
    return mask(await _submit(s, ops.set_document(a.name, a.content), a))


async def data_export(s: Session, a: p.NoArgs) -> Any:
    return views.export(s.app.store)


async def data_import(s: Session, a: p.DataImport) -> Any:
    return await _submit(s, ops.import_data(a.data, a.mode), a)


async def data_reset(s: Session, a: p.DataReset) -> Any:
    if a.confirm is not True:
        raise CtsdError("invalid", "data.reset needs confirm: true", path="$.confirm")
    return await _submit(s, ops.reset(), a)


async def trading_test_connection(s: Session, a: p.NoArgs) -> Any:
    result = await sweeps.test_projectx(s.app)
    return mask(msgspec.to_builtins(result))


HANDLERS: dict[str, Handler] = {
    "ping": ping,
    "status": status,
    "snapshot": snapshot,
    "subscribe": subscribe,
    "unsubscribe": unsubscribe,
    "sync_log.get": sync_log_get,
    "connections.list": connections_list,
    "connections.get": connections_get,
    "connections.create": connections_create,
    "connections.update": connections_update,
    "connections.delete": connections_delete,
    "connections.batch_update": connections_batch_update,
    "connections.set_active": connections_set_active,
    "connections.set_volume": connections_set_volume,
    "connections.heartbeat": connections_heartbeat,
    "connections.test": connections_test,
    "documents.list": documents_list,
    "documents.get": documents_get,
    "documents.set": documents_set,
    "data.export": data_export,
    "data.import": data_import,
    "data.reset": data_reset,
    "trading.test_connection": trading_test_connection,
}
assert set(HANDLERS) == set(p.COMMANDS), "every protocol command has a handler"
