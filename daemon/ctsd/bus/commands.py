"""What each command does, whoever asks: a bus frame and an HTTP route both end here.

Changes go through the store's one door with the caller's source (`bus`, `cli`, `http`);
reads come from committed memory through `views` (masked). A handler gets the `Call` (who
asks, how it wants to be answered) and the command's argument Struct.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ctsd import livebackup, ops
from ctsd.bus import protocol as p
from ctsd.bus import views
from ctsd.bus.fanout import ALL_TOPICS, TOPIC_BITS, Key
from ctsd.config import is_loopback
from ctsd.errors import CtsdError
from ctsd.models import Connection, Source
from ctsd.redact import mask
from ctsd.secretbox import KeyFileError, SecretBox, parse_key

if TYPE_CHECKING:
    from ctsd.services import Services


class BusConnection(Protocol):
    """The bus connection a bus-only command acts on (`ctsd.bus.session.Session`)."""

    addr: str  # the peer's address

    def subscribe(self, key: Key, since: int | None) -> None: ...

    def unsubscribe(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Call:
    """Who asks and how they want the answer.

    `sync="files"`: answer only once the change is in the data files. `if_match`: refuse with
    `precondition_failed` when what the change touches moved past that revision (HTTP
    `If-Match`). `session`: the bus connection, for the commands that only a bus has.
    """

    svc: Services
    source: Source
    sync: str | None = None
    if_match: int | None = None
    session: BusConnection | None = None


Handler = Callable[[Call, Any], Awaitable[Any]]

# Commands that change something: on the bus they run as their own task so a client can
# pipeline them (they group-commit); a read waits for the same client's earlier changes.
WRITES = p.WRITE_COMMANDS
# Exchange probes take up to `test_timeout_s`: their own tasks too, but nothing waits for them.
PROBES = frozenset({"connections.test", "trading.test_connection"})


async def _submit(c: Call, op: ops.Op) -> Any:
    return await c.svc.store.submit(op, c.source, if_match=c.if_match, sync=c.sync)


def _conn_out(result: Any) -> Any:
    return views.connection(result) if isinstance(result, Connection) else result


def _session(c: Call) -> BusConnection:
    if c.session is None:  # a route never maps to these; a bug if it does
        raise CtsdError("invalid", "this command needs a bus connection")
    return c.session


async def ping(c: Call, a: p.NoArgs) -> Any:
    return {"pong": True, "revision": c.svc.store.revision}


async def status(c: Call, a: p.NoArgs) -> Any:
    return views.status(c.svc)


async def snapshot(c: Call, a: p.NoArgs) -> Any:
    return views.snapshot(c.svc.store)


async def subscribe(c: Call, a: p.Subscribe) -> Any:
    s = _session(c)
    store = c.svc.store
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
    # Registration and the replay's snapshot happen in this one synchronous step, and the
    # result is queued before any event frame (the replay follows it).
    s.subscribe((topics, cids), a.since)
    return {"revision": store.revision}


async def unsubscribe(c: Call, a: p.NoArgs) -> Any:
    return {"unsubscribed": _session(c).unsubscribe()}


async def sync_log_get(c: Call, a: p.SyncLogGet) -> Any:
    return views.sync_log(c.svc.store, a.since, a.limit)


async def connections_list(c: Call, a: p.ConnectionsList) -> Any:
    return views.connections(c.svc.store, a.exchange, a.enabled, a.active)


async def connections_get(c: Call, a: p.ConnectionRef) -> Any:
    return views.get_connection(c.svc.store, a.connection_id)


async def connections_create(c: Call, a: p.ConnectionsCreate) -> Any:
    return _conn_out(await _submit(c, ops.create(a.connection)))


async def connections_update(c: Call, a: p.ConnectionsUpdate) -> Any:
    return _conn_out(await _submit(c, ops.update(a.connection_id, a.changes)))


async def connections_delete(c: Call, a: p.ConnectionRef) -> Any:
    return await _submit(c, ops.delete(a.connection_id))


async def connections_batch_update(c: Call, a: p.ConnectionsBatchUpdate) -> Any:
    return [_conn_out(r) for r in await _submit(c, ops.batch_update(a.updates))]


async def connections_set_active(c: Call, a: p.ConnectionsSetActive) -> Any:
    return _conn_out(await _submit(c, ops.set_active(a.connection_id, a.active)))


async def connections_set_volume(c: Call, a: p.ConnectionsSetVolume) -> Any:
    return _conn_out(await _submit(c, ops.set_volume(a.connection_id, a.live, a.preset)))


async def connections_heartbeat(c: Call, a: p.ConnectionRef) -> Any:
    ts = c.svc.sweeper.heartbeat(a.connection_id)
    return {"connection_id": a.connection_id, "timestamp": ts}


async def connections_test(c: Call, a: p.ConnectionRef) -> Any:
    return await c.svc.prober.test_connection(a.connection_id)


async def documents_list(c: Call, a: p.NoArgs) -> Any:
    return sorted(c.svc.store.documents)


async def documents_get(c: Call, a: p.DocumentsGet) -> Any:
    return views.document(c.svc.store, a.name)


async def documents_set(c: Call, a: p.DocumentsSet) -> Any:
    return mask(await _submit(c, ops.set_document(a.name, a.content)))


async def data_export(c: Call, a: p.NoArgs) -> Any:
    return views.export(c.svc.store)


async def data_import(c: Call, a: p.DataImport) -> Any:
    return await _submit(c, ops.import_data(a.data, a.mode))


async def data_reset(c: Call, a: p.DataReset) -> Any:
    if a.confirm is not True:
        raise CtsdError("invalid", "data.reset needs confirm: true", path="$.confirm")
    return await _submit(c, ops.reset())


async def trading_test_connection(c: Call, a: p.NoArgs) -> Any:
    return mask(await c.svc.prober.test_projectx())


async def data_backup(c: Call, a: p.NoArgs) -> Any:
    """A consistent archive of the data files, written into the data dir (never sent)."""
    return await livebackup.backup_running(c.svc.store)


async def data_restore(c: Call, a: p.DataRestore) -> Any:
    return await livebackup.restore_running(c.svc.store, a.file, c.source)


async def secrets_rekey(c: Call, a: p.SecretsRekey) -> Any:
    """Every secret re-encrypted under a new key, as one change through the door. The key is
    in the frame, so only from a client on this host (`ws://` is not encrypted)."""
    if not is_loopback(_session(c).addr):
        raise CtsdError("invalid", "secrets.rekey is taken only from a client on this host")
    store = c.svc.store
    try:
        new = parse_key(a.secrets_key.encode(), "the new key")
    except KeyFileError as e:
        raise CtsdError("invalid", str(e), path="$.secrets_key") from None
    if new.id == store.box.key_id:
        raise CtsdError(
            "invalid", f"the new key is the key in use (id {new.id})", path="$.secrets_key"
        )
    old = store.box.key
    box = SecretBox(new, also=(old,) if old is not None else ())
    return await store.rekey(box, c.source)


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
    "secrets.rekey": secrets_rekey,
    "data.backup": data_backup,
    "data.restore": data_restore,
    "trading.test_connection": trading_test_connection,
}
assert set(HANDLERS) == set(p.COMMANDS), "every protocol command has a handler"
