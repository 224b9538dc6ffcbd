"""What each command does, whoever asks: a bus frame and an HTTP route both end here.

Changes go through the store's one door with the caller's source (`bus`, `cli`, `http`);
reads come from committed memory through `views` (masked). A handler gets the `Call` (who
asks, how it wants to be answered) and the command's argument Struct.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

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


@dataclass(slots=True)
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
    revision: int | None = None  # set by a change: the revision right after it


Handler = Callable[[Call, Any], Awaitable[Any]]

# Commands that change something: on the bus a client can pipeline them (they group-commit;
# `WRITE_OPS` go into the store's queue as their frames come, in order, and are answered
# from a callback, or with `sync` by a task; the rest run as a task each); a read waits for
# the same client's earlier changes.
WRITES = p.WRITE_COMMANDS
# Exchange probes take up to `test_timeout_s`: their own tasks too, but nothing waits for them.
PROBES = frozenset({"connections.test", "trading.test_connection"})


def _conn_out(result: Any) -> Any:
    return views.connection(result) if isinstance(result, Connection) else result


def _same(result: Any) -> Any:
    return result


def _reset(a: p.DataReset) -> ops.Op:
    if a.confirm is not True:
        raise CtsdError("invalid", "data.reset needs confirm: true", path="$.confirm")
    return ops.reset()


class Write(NamedTuple):
    """A change command: the op its arguments make (may refuse them) and how its result
    is shown. The bus answers these from a callback when the change is durable (no task per
    change); a route, or a caller that waits for the files, through `HANDLERS`."""

    op: Callable[[Any], ops.Op]
    shown: Callable[[Any], Any]


WRITE_OPS: dict[str, Write] = {
    "connections.create": Write(lambda a: ops.create(a.connection), _conn_out),
    "connections.update": Write(lambda a: ops.update(a.connection_id, a.changes), _conn_out),
    "connections.delete": Write(lambda a: ops.delete(a.connection_id), _same),
    "connections.batch_update": Write(
        lambda a: ops.batch_update(a.updates), lambda r: [_conn_out(x) for x in r]
    ),
    "connections.set_active": Write(lambda a: ops.set_active(a.connection_id, a.active), _conn_out),
    "connections.set_volume": Write(
        lambda a: ops.set_volume(a.connection_id, a.live, a.preset), _conn_out
    ),
    "documents.set": Write(lambda a: ops.set_document(a.name, a.content), mask),
    "data.import": Write(lambda a: ops.import_data(a.data, a.mode), _same),
    "data.reset": Write(_reset, _same),
}


def _handler(w: Write) -> Handler:
    async def handle(c: Call, a: Any) -> Any:
        op = w.op(a)
        store = c.svc.store
        result, c.revision = await store.submit_answer(
            op, c.source, if_match=c.if_match, sync=c.sync
        )
        return w.shown(result)

    return handle


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


async def connections_heartbeat(c: Call, a: p.ConnectionRef) -> Any:
    ts = c.svc.sweeper.heartbeat(a.connection_id)
    return {"connection_id": a.connection_id, "timestamp": ts}


async def connections_test(c: Call, a: p.ConnectionRef) -> Any:
    result, c.revision = await c.svc.prober.test_connection(a.connection_id, c.source, c.sync)
    return result


async def documents_list(c: Call, a: p.NoArgs) -> Any:
    return sorted(c.svc.store.documents)


async def documents_get(c: Call, a: p.DocumentsGet) -> Any:
    return views.document(c.svc.store, a.name)


async def data_export(c: Call, a: p.NoArgs) -> Any:
    return views.export(c.svc.store)


async def trading_test_connection(c: Call, a: p.NoArgs) -> Any:
    return mask(await c.svc.prober.test_projectx())


async def data_backup(c: Call, a: p.NoArgs) -> Any:
    """A consistent archive of the data files, written into the data dir (never sent)."""
    return await livebackup.backup_running(c.svc.store)


async def data_restore(c: Call, a: p.DataRestore) -> Any:
    result = await livebackup.restore_running(c.svc.store, a.file, c.source)
    c.revision = result["revision"]
    return result


async def secrets_rekey(c: Call, a: p.SecretsRekey) -> Any:
    """Every secret re-encrypted under a new key, as one change through the door. The key is
    in the frame, so only from a client on this host (`ws://` is not encrypted)."""
    session = _session(c)
    if not is_loopback(session.addr):
        raise CtsdError("invalid", "secrets.rekey is taken only from a client on this host")
    if session.tokenless:
        # server.auth "loopback" lets a browser page of an allowed origin in without the
        # token: a re-key to a key only that page knows would leave the data unreadable at
        # the next start. The operator's CLI always shows the token.
        raise CtsdError("unauthorized", "secrets.rekey needs the bus token, also in loopback mode")
    store = c.svc.store
    if store.committer.shared:
        # The other hosts would get values sealed under a key they do not hold, and could
        # not start on the files they hold with the new one.
        raise CtsdError(
            "invalid",
            "in cluster mode every host must hold the same secrets key: stop every host, run "
            "`ctsd secrets rekey --new-key FILE --data-dir DIR` on each with the same new key "
            "file, configure it on each, then start them",
        )
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
    result, c.revision = await store.rekey(box, c.source)
    return result


HANDLERS: dict[str, Handler] = {
    **{name: _handler(w) for name, w in WRITE_OPS.items()},
    "ping": ping,
    "status": status,
    "snapshot": snapshot,
    "subscribe": subscribe,
    "unsubscribe": unsubscribe,
    "sync_log.get": sync_log_get,
    "connections.list": connections_list,
    "connections.get": connections_get,
    "connections.heartbeat": connections_heartbeat,
    "connections.test": connections_test,
    "documents.list": documents_list,
    "documents.get": documents_get,
    "data.export": data_export,
    "secrets.rekey": secrets_rekey,
    "data.backup": data_backup,
    "data.restore": data_restore,
    "trading.test_connection": trading_test_connection,
}
assert set(HANDLERS) == set(p.COMMANDS), "every protocol command has a handler"
