"""Every kind of change, as an op: a function of a `core.Tx` that checks its input, applies it
to the Tx's overlays and emits its sync-log events. Pure: no files, no clock (the time is
`tx.now`), nothing but the Tx."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from ctsd import diagnose, files
from ctsd.core import (
    STREAM_SEQ,
    Op,
    Tx,
    changed_fields,
    changed_keys,
    merge_document,
    merge_table,
    mirror_state,
    record_key,
)
from ctsd.errors import CtsdError
from ctsd.files import CONNECTIONS, STATE, SYNC_LOG, Invalid
from ctsd.limits import require_depth
from ctsd.models import (
    MAX_SAFE_INT,
    Connection,
    ConnectionState,
    Settings,
    SyncEvent,
    TestResult,
)
from ctsd.redact import (
    bytes_may_hold_placeholder,
    is_secret_key,
    may_hold_placeholders,
    restore_placeholders,
)
from ctsd.sealer import CONNECTION_DOC_NAME
from ctsd.secretbox import SecretError
from ctsd.table import Table
from ctsd.timeutil import beat_after, beat_since

__all__ = ["Op"]

SERVER_MANAGED = ("id", "created_at", "updated_at")
CONNECTION_DOC = files.document_file(CONNECTION_DOC_NAME)
CONNECTION_FIELDS = tuple(f.encode_name for f in msgspec.structs.fields(Connection))
SECRET_CONNECTION_FIELDS = tuple(f for f in CONNECTION_FIELDS if is_secret_key(f))


def new_connection_id() -> str:
    return "conn_" + secrets.token_hex(6)


def _convert(data: Any, kind: Any, path: str) -> Any:
    try:
        return msgspec.convert(data, type=kind, strict=True)
    except msgspec.ValidationError as e:
        msg, sub = diagnose.explain(str(e), kind)
        raise CtsdError("invalid", msg, path=path + sub[1:]) from None


def _require(tx: Tx, cid: Any, path: str = "$.connection_id") -> Connection:
    if not isinstance(cid, str):
        raise CtsdError("invalid", "connection_id must be a string", path=path)
    conn = tx.connections.get(cid)
    if conn is None:
        raise CtsdError("not_found", f"no connection {cid!r}", path=path)
    return conn


def public_values(record: msgspec.Struct, fields: list[str]) -> dict[str, Any]:
    """The new values of `fields`, secrets left out (`fields` still names them; the event
    masks the rest, `Tx.emit`)."""
    return {k: msgspec.to_builtins(getattr(record, k)) for k in fields if not is_secret_key(k)}


# --- writing into the overlays (each put says what it set, for the journal) -----------------


def put_state(tx: Tx, st: ConnectionState, fields: list[str] | None) -> None:
    tx.state.put(st.connection_id, st)
    tx.set_fields("state", st.connection_id, fields)


def seal(tx: Tx, conn: Connection, old: Connection | None, path: str) -> Connection:
    """`conn` with its secrets in their stored form (encrypted when a key is set). Called
    before a change is compared with the stored record, so an unchanged secret stays
    unchanged; a plain value taken in makes the file be written (encrypted) even when no
    record changed."""
    sealer = tx.ctx.sealer
    if sealer is None:
        return conn
    sealed, plain = sealer.connection(conn, old, path)
    if plain:
        tx.touched.add(CONNECTIONS)
    return sealed  # type: ignore[no-any-return]


def put_connection(tx: Tx, conn: Connection, fields: list[str] | None) -> None:
    """Put `conn` (with `fields` changed; None: new or whole) and keep its state mirrored."""
    # Every put is sealed (a no-op for what the caller sealed): no path stores a plain secret.
    conn = seal(tx, conn, tx.connections.get(conn.id), f"$.{conn.id}")
    tx.connections.put(conn.id, conn)
    tx.set_fields("connections", conn.id, fields)
    state = tx.state.get(conn.id)
    fixed = mirror_state(conn, state, tx.now)
    if fixed is not state:
        put_state(tx, fixed, changed_fields(state, fixed) if state is not None else None)


def delete_connection(tx: Tx, cid: str) -> None:
    tx.connections.delete(cid)
    if cid in tx.state:
        tx.state.delete(cid)


def put_document(tx: Tx, name: str, content: dict[str, Any], path: str = "$") -> list[str]:
    """Put a document; returns the top-level keys that changed (emits nothing)."""
    content = own_settings_kept(tx, name, content)
    old = tx.docs.get(name)
    if tx.ctx.sealer is not None:
        content, plain = tx.ctx.sealer.document(name, content, old, path)
        if plain:
            tx.touched.add(files.document_file(name))
    keys = changed_keys(old, content)
    if keys or old is None:
        tx.docs.put(name, content)
        tx.set_fields("documents", name, keys if old is not None else None)
    return keys


def own_settings_kept(tx: Tx, name: str, content: dict[str, Any]) -> dict[str, Any]:
    """`content` with this host's own settings keys (`Context.own_settings`) as they are, unless
    it is a hand edit of this host's settings.json."""
    own = tx.ctx.own_settings
    if name != "settings" or not own or tx.source == "file":
        return content
    old = tx.docs.get(name) or {}
    kept = {k: v for k, v in content.items() if k not in own}
    kept.update((k, old[k]) for k in own if k in old)
    return kept


def _check_fields(
    conn: Connection, path: str, before: Connection | None = None, *, by_hand: bool = False
) -> None:
    """What a door checks beyond the types, when new or changed (a value loaded from a file,
    which an earlier version may have stored, never blocks the record): connection_settings
    (by hand whatever its size: the file was read), and integers every client holds exactly
    (2**70 was taken from a hand edit and broadcast, past int64 and JavaScript numbers)."""
    for name in ("user_id", "exchange_id"):
        value = getattr(conn, name)
        changed = before is None or getattr(before, name) != value
        if changed and value is not None and abs(value) > MAX_SAFE_INT:
            raise CtsdError(
                "invalid", f"{name} must be within ±{MAX_SAFE_INT}", path=f"{path}.{name}"
            )
    unchanged = before is not None and before.connection_settings == conn.connection_settings
    problem = files.connection_settings_problem(
        conn.connection_settings, strict=not unchanged, sized=not by_hand
    )
    if problem:
        raise CtsdError("invalid", problem, path=f"{path}.connection_settings")


# --- connections --------------------------------------------------------------------------


def create(data: Any) -> Op:
    def op(tx: Tx) -> Connection:
        if not isinstance(data, dict):
            raise CtsdError("invalid", "connection must be an object", path="$.connection")
        sent = restore_placeholders(data, None, "$.connection")  # nothing stored: refused
        # Server-managed: whatever a client sends for these is ignored (a record read back
        # and sent again as a new one keeps working).
        body = {**sent, "created_at": tx.now, "updated_at": tx.now}
        if body.get("id") in (None, ""):  # a form's empty id field: one is made, as if absent
            body["id"] = new_connection_id()
            tx.made.add(record_key(body["id"]))
        conn = _convert(body, Connection, "$.connection")
        _check_fields(conn, "$.connection")
        conn = seal(tx, conn, None, "$.connection")
        if conn.id in tx.connections:
            raise CtsdError(
                "conflict", f"connection {conn.id!r} already exists", path="$.connection.id"
            )
        put_connection(tx, conn, None)
        fields = list(CONNECTION_FIELDS)
        tx.emit("create", conn.id, {"fields": fields, "values": public_values(conn, fields)})
        return conn

    return op


def _updated(tx: Tx, conn: Connection, changes: Any, path: str) -> tuple[Connection, list[str]]:
    """`conn` with `changes` applied (sealed, `updated_at` moved if anything changed), and
    the fields that changed."""
    if not isinstance(changes, dict):
        raise CtsdError("invalid", "changes must be an object", path=path)
    # A secret sent back as shown keeps the stored one.
    if may_hold_placeholders(changes):
        changes = restore_placeholders(changes, msgspec.structs.asdict(conn), path, records=True)
    if "id" in changes and changes["id"] != conn.id:
        raise CtsdError(
            "invalid",
            f"`id` is fixed: this is {conn.id!r}, not {changes['id']!r}",
            path=f"{path}.id",
        )
    # Server-managed fields sent back (a record read and sent whole) are ignored.
    changes = {k: v for k, v in changes.items() if k not in SERVER_MANAGED}
    merged = {**msgspec.structs.asdict(conn), **changes}
    new = _convert(merged, Connection, path)
    _check_fields(new, path, conn)
    new = seal(tx, new, conn, path)
    # Server-managed fields were dropped above: `updated_at` is never among these.
    fields = changed_fields(conn, new)
    if fields:
        new = msgspec.structs.replace(new, updated_at=tx.now)
    return new, fields


def _apply_update(tx: Tx, conn: Connection, updated: tuple[Connection, list[str]]) -> Connection:
    new, fields = updated
    if not fields:
        return conn
    put_connection(tx, new, [*fields, "updated_at"])
    tx.emit("update", new.id, {"fields": fields, "values": public_values(new, fields)})
    return new


def update(cid: Any, changes: Any) -> Op:
    def op(tx: Tx) -> Connection:
        conn = _require(tx, cid)
        return _apply_update(tx, conn, _updated(tx, conn, changes, "$.changes"))

    return op


def batch_update(updates: Any) -> Op:
    def op(tx: Tx) -> list[Connection]:
        # (An empty one is a "save all" with nothing changed: answered [], nothing written.)
        if not isinstance(updates, list):
            raise CtsdError("invalid", "updates must be an array", path="$.updates")
        out = []
        seen: set[str] = set()
        for i, item in enumerate(updates):
            path = f"$.updates[{i}]"
            if not isinstance(item, dict):
                raise CtsdError("invalid", "each update must be an object", path=path)
            changes = dict(item)
            cid = changes.pop("id", None)
            if isinstance(cid, str):  # (any other id is refused by `_require` below)
                if cid in seen:
                    # Once per record: each is answered with the whole record, and a batch
                    # naming one thousands of times would be answered with as many copies.
                    why = f"connection {cid!r} twice in one batch"
                    raise CtsdError("invalid", why, path=path)
                seen.add(cid)
            conn = _require(tx, cid, f"{path}.id")
            out.append(_apply_update(tx, conn, _updated(tx, conn, changes, path)))
        return out

    return op


def delete(cid: Any) -> Op:
    def op(tx: Tx) -> dict[str, str]:
        conn = _require(tx, cid)
        delete_connection(tx, conn.id)
        tx.emit("delete", conn.id, {"fields": [], "name": conn.name})
        return {"deleted": conn.id}

    return op


def set_active(cid: Any, active: Any) -> Op:
    def op(tx: Tx) -> Connection:
        conn = _require(tx, cid)
        if not isinstance(active, bool):
            raise CtsdError("invalid", "active must be true or false", path="$.active")
        if conn.is_active != active:
            conn = msgspec.structs.replace(conn, is_active=active, updated_at=tx.now)
            put_connection(tx, conn, ["is_active", "updated_at"])
        tx.emit("set_active", conn.id, {"active": active, "timestamp": tx.now})
        return conn

    return op


def _state_of(tx: Tx, conn: Connection) -> ConnectionState:
    return tx.state.get(conn.id) or mirror_state(conn, None, tx.now)


def set_volume(cid: Any, live: Any = None, preset: Any = None) -> Op:
    def op(tx: Tx) -> Connection:
        conn = _require(tx, cid)
        if live is None and preset is None:
            raise CtsdError("invalid", "give live, preset or both", path="$")
        for name, value in (("live", live), ("preset", preset)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
            ):
                raise CtsdError("invalid", f"{name} must be a number > 0", path=f"$.{name}")
        state = _state_of(tx, conn)
        state = msgspec.structs.replace(
            state,
            volume_factor_live=live if live is not None else state.volume_factor_live,
            volume_factor_preset=preset if preset is not None else state.volume_factor_preset,
            updated_at=tx.now,
        )
        put_state(tx, state, ["volume_factor_live", "volume_factor_preset", "updated_at"])
        tx.emit(
            "update_volume",
            conn.id,
            {
                "live": state.volume_factor_live,
                "preset": state.volume_factor_preset,
                "timestamp": tx.now,
            },
        )
        return conn

    return op


def record_test(cid: str, result: TestResult) -> Op:
    """A connection test's result; a success counts as a heartbeat and recovers a stale one."""

    def op(tx: Tx) -> TestResult:
        conn = _require(tx, cid)
        state = _state_of(tx, conn)
        changes: dict[str, Any] = {"test_results": result, "updated_at": tx.now}
        if result.success and beat_after(result.timestamp, state.last_heartbeat_at, tx.now):
            changes["last_heartbeat_at"] = result.timestamp
        recovered = result.success and state.status == "stale"
        if recovered:
            changes["status"] = "active"
        put_state(tx, msgspec.structs.replace(state, **changes), list(changes))
        tx.emit("test", conn.id, msgspec.to_builtins(result))
        if recovered and not tx.ctx.local_status:
            # (in cluster mode the stale it recovers from was this host's alone: every host
            # would get the event, for a connection active where it is heartbeated)
            tx.emit("recovered", conn.id, {"reason": "test", "timestamp": tx.now})
        return result

    return op


def set_status(changes: dict[str, tuple[str, str | None]]) -> Op:
    """Sweep transitions: {connection_id: (new status, last heartbeat)} → stale/recovered.

    Checked again when applied, since the sweep decided a moment earlier: only an active
    connection goes stale, and not when a heartbeat other than the one the sweep saw has
    arrived since (told by identity, not by the time in it: a beat from before the clock
    stepped back reads as later than now, and would hold `stale` off until the clock got
    there); only a stale one recovers.
    """

    def op(tx: Tx) -> int:
        n = 0
        for cid, (status, heartbeat) in changes.items():
            state = tx.state.get(cid)
            if state is None:
                continue
            if status == "stale":
                latest = tx.ctx.heartbeats.get(cid)
                if state.status != "active" or beat_since(latest, heartbeat):
                    continue
            elif status != "active" or state.status != "stale":
                continue
            stored = state.last_heartbeat_at
            beat = heartbeat if beat_after(heartbeat, stored, tx.now) else stored
            new = msgspec.structs.replace(
                state, status=status, last_heartbeat_at=beat, updated_at=tx.now
            )
            put_state(tx, new, ["status", "last_heartbeat_at", "updated_at"])
            if status == "stale":
                tx.emit("stale", cid, {"last_heartbeat_at": beat, "timestamp": tx.now})
            else:
                tx.emit("recovered", cid, {"reason": "heartbeat", "timestamp": tx.now})
            n += 1
        return n

    return op


def flush_heartbeats(beats: Mapping[str, str]) -> Op:
    """Coalesced heartbeats into connection-state.json: one write, no sync-log entries. Only
    ever moves a timestamp forward."""

    def op(tx: Tx) -> int:
        n = 0
        for cid, hb in beats.items():
            state = tx.state.get(cid)
            if state is not None and beat_after(hb, state.last_heartbeat_at, tx.now):
                put_state(
                    tx, msgspec.structs.replace(state, last_heartbeat_at=hb), ["last_heartbeat_at"]
                )
                n += 1
        return n

    return op


# --- documents ----------------------------------------------------------------------------


def check_document(
    tx: Tx, name: Any, content: Any, path: str = "$.content", unset: list[str] | None = None
) -> tuple[str, dict[str, Any]]:
    """(file, content to store) for a document sent by a client: checked, with the
    placeholders of secrets it sends back replaced by the stored secrets (`unset`: see
    `restore_placeholders`)."""
    if not isinstance(name, str):
        raise CtsdError("invalid", "name must be a string", path="$.name")
    try:
        file = files.document_file(name)
    except KeyError:
        known = ", ".join([*files.DOCUMENTS, "algorithms/NAME"])
        raise CtsdError(
            "not_found", f"no document {name!r}; documents: {known}", path="$.name"
        ) from None
    if not isinstance(content, dict):
        raise CtsdError("invalid", "content must be a JSON object", path=path)
    require_depth(content, path=path)
    content = restore_placeholders(content, tx.docs.get(name), path, unset=unset)
    _convert(content, files.document_type(name), path)  # names the very field
    if name == "instances":
        try:
            files.check_instance_ids(content, file, None)
            files.check_instance_refs(
                content, tx.algorithm_names(), file, None, tx.ctx.invalid_files
            )
        except Invalid as e:
            raise CtsdError("invalid", e.problem.message, path=path + e.problem.path[1:]) from None
    return file, content


# The keys a `document_update` names, at most: a document of 9,000 keys replaced made an
# 80 KB sync-log entry, and the log (rewritten with every change) tens of MiB.
KEYS_SHOWN = 100
KEYS_SHOWN_CHARS = 4096


def shown_keys(keys: list[str]) -> dict[str, Any]:
    """`keys` for an event's data: all of them, or the first that fit with `keys_truncated`
    and `keys_count` (then read the document to know the rest)."""
    shown: list[str] = []
    chars = 0
    for key in keys[:KEYS_SHOWN]:
        chars += len(key)
        if chars > KEYS_SHOWN_CHARS:
            break
        shown.append(key)
    if len(shown) == len(keys):
        return {"keys": keys}
    return {"keys": shown, "keys_truncated": True, "keys_count": len(keys)}


def _emit_document(tx: Tx, name: str, file: str, keys: list[str]) -> None:
    tx.emit("document_update", None, {"file": file, "name": name, **shown_keys(keys)})


def daemon_settings_kept(tx: Tx, content: dict[str, Any]) -> dict[str, Any]:
    """`settings` as a client replaces it, with the daemon's own keys (`Settings`: its bind
    address, origins, auth, intervals) that it leaves out kept: a frontend saving the app's
    settings must not move the port at the next start or lock itself out (`"server": {}`
    sends the defaults back)."""
    old = tx.docs.get("settings") or {}
    missing = [k for k in Settings.__struct_fields__ if k in old and k not in content]
    return {**content, **{k: old[k] for k in missing}} if missing else content


def instances_stamped(tx: Tx, content: dict[str, Any]) -> dict[str, Any]:
    """`instances` as a client saves it, with a `lastSaved` (the file's
    `{"instances": [...], "lastSaved": ts}`): the one it sends, else now when its instances
    changed, else the one stored (a save of the same instances is no change)."""
    if content.get("lastSaved") is not None:
        return content
    old = tx.docs.get("instances") or {}
    changed = content.get("instances") != old.get("instances")
    stamp = tx.now if changed or old.get("lastSaved") is None else old["lastSaved"]
    return {**content, "lastSaved": stamp}


def set_document(name: Any, content: Any) -> Op:
    def op(tx: Tx) -> dict[str, Any]:
        file, doc = check_document(tx, name, content)
        if name == "settings" and tx.source != "file":
            doc = daemon_settings_kept(tx, doc)
        elif name == "instances":
            doc = instances_stamped(tx, doc)
        existed = name in tx.docs
        keys = put_document(tx, name, doc, "$.content")
        if keys or not existed:
            _emit_document(tx, name, file, keys)
        return tx.docs.get(name)

    return op


# --- hand edits (a file taken in as it is on disk) -------------------------------------------


def _take_in_connections(
    tx: Tx, file: str, base: Mapping[str, Connection], hand: list[Connection]
) -> list[tuple[str, list[str]]]:
    current = _flat(tx.connections)
    merged = merge_table(base, {c.id: c for c in hand}, current)
    new: dict[str, Connection] = {}
    at = {c.id: i for i, c in enumerate(hand)}
    for cid, conn in merged.records.items():
        old = current.get(cid)
        if old is conn:  # not edited by hand: memory's record, sealed when it was stored
            new[cid] = old
            continue
        path = f"$[{at.get(cid, 0)}]"
        edited = changed_fields(base.get(cid), conn) if cid in base else None
        conn = _hand_placeholders(tx, file, conn, old, edited, path)
        _check_fields(conn, path, old, by_hand=True)  # (NaN: as the other doors refuse it)
        conn = seal(tx, conn, old, path)
        if old is not None and old == conn:  # edited back to what memory holds (in C)
            new[cid] = old
            continue
        stamped = msgspec.structs.replace(
            conn, created_at=conn.created_at or tx.now, updated_at=conn.updated_at or tx.now
        )
        new[cid] = stamped
        fields = changed_fields(old, stamped) if old else list(CONNECTION_FIELDS)
        put_connection(tx, stamped, fields if old else None)
        # (an update's `updated_at` is the event's `created_at`; a create shows the record)
        shown = ([f for f in fields if f != "updated_at"] or fields) if old else fields
        tx.emit(
            "update" if old else "create",
            cid,
            {"fields": shown, "values": public_values(stamped, shown), "file": file},
        )
    for cid, old in current.items():
        if cid not in new:
            delete_connection(tx, cid)
            tx.emit("delete", cid, {"fields": [], "name": old.name, "file": file})
    if list(new) != [k for k in current if k in new] + [k for k in new if k not in current]:
        tx.connections.order = list(new)  # the hand edit reordered them
        if not tx.connections.over:
            # A reorder alone: one record put again as it is, so the journalled change says it
            # came from the file (a replay then takes the order the file holds by then).
            first = next(iter(new))
            tx.connections.put(first, new[first])
            tx.set_fields("connections", first, [])
    return merged.conflicts


def _hand_placeholders(
    tx: Tx,
    file: str,
    conn: Connection,
    old: Connection | None,
    edited: list[str] | None,
    path: str,
) -> Connection:
    """A masked value pasted into the file by hand (a record copied from an export or an
    answer) keeps the stored secret, as it does at the door; one where nothing is stored is
    invalid. Stored as typed, it replaced the secret. The file is written back with it.
    Only the fields the edit changed (`edited`; None: all, a new record) are looked at: a
    value the file held already is no paste."""
    whole = msgspec.structs.asdict(conn)
    sent = whole if edited is None else {f: whole[f] for f in edited}
    if not sent or not may_hold_placeholders(sent):
        return conn
    stored = msgspec.structs.asdict(old) if old else None
    if stored is not None and edited is not None:
        stored = {f: stored[f] for f in edited}
    restored = restore_placeholders(sent, stored, path, records=True)
    if restored is sent:
        return conn
    tx.touched.add(file)
    return _convert({**whole, **restored}, Connection, path)


def _orphan(tx: Tx, hand: list[ConnectionState], cid: str, where: str = "$") -> None:
    """A state record the hand edit added for no connection: a dangling reference, so the
    edit is invalid. Dropped, the record (an operator's volumes, say) would
    be gone from the file at the next write: when state is saved before connections.json (`cp
    backup/*.json`: it sorts first), the file is judged again once connections.json is in.
    So too while connections.json is invalid on disk (its connection may be in the fix):
    taken, it was broadcast for a connection no bot knew, before the connection's `create`."""
    at = next(i for i, s in enumerate(hand) if s.connection_id == cid)
    message = files.orphan_message(cid, sorted(_flat(tx.connections)))
    if CONNECTIONS in tx.ctx.invalid_files:
        message += (
            f" ({CONNECTIONS} is invalid on disk: this file is judged again once it is fixed)"
        )
    raise CtsdError("invalid", message, path=f"{where}[{at}].connection_id")


def _take_in_state(
    tx: Tx, file: str, base: Mapping[str, ConnectionState], hand: list[ConnectionState]
) -> list[tuple[str, list[str]]]:
    current = _flat(tx.state)
    merged = merge_table(base, {s.connection_id: s for s in hand}, current)
    # While connections.json is invalid there is nothing to mirror: keep what the file says
    # of the records memory has.
    mirror = CONNECTIONS not in tx.ctx.invalid_files
    new: dict[str, ConnectionState] = {}
    for cid, st in merged.records.items():
        conn = tx.connections.get(cid)
        if conn is None and mirror and cid in base:
            continue  # its connection deleted meanwhile: the state goes with it
        if conn is None and (mirror or cid not in current):
            _orphan(tx, hand, cid)
        new[cid] = _hand_state(conn, st, current.get(cid), tx.now) if conn else st
    for cid, conn in tx.connections.items():  # a connection always has its state record
        if cid not in new:
            new[cid] = mirror_state(conn, current.get(cid), tx.now)
            tx.touched.add(file)  # (the file gets it back, even when memory keeps it as is)
    for cid, st in new.items():
        old = current.get(cid)
        if old is not None and (old is st or old == st):
            continue
        fields = changed_fields(old, st)
        if st.last_sync_at is not None and (old is None or old.last_sync_at != st.last_sync_at):
            tx.sync_given.add(cid)  # (one given, by hand or an import: kept, not now)
        put_state(tx, st, fields if old is not None else None)
        tx.emit(
            "update", cid, {"fields": fields, "values": public_values(st, fields), "file": file}
        )
    for cid in [c for c in current if c not in new]:
        tx.state.delete(cid)
    return merged.conflicts


def _hand_state(
    conn: Connection, st: ConnectionState, was: ConnectionState | None, now: str
) -> ConnectionState:
    """A state record edited by hand as kept: `is_active` mirrored, `status` consistent. An
    edit of only what is put back changes nothing (it was broadcast as an update of
    `updated_at`, the put-back's own stamp)."""
    new = _kept_status(mirror_state(conn, st, now), was)
    put_back = new is not st and was is not None and new.updated_at == now
    if put_back and msgspec.structs.replace(new, updated_at=was.updated_at) == was:
        return was
    return new


def _kept_status(st: ConnectionState, was: ConnectionState | None) -> ConnectionState:
    """A live connection's `active` or `stale` is the sweep's, by its heartbeats: one set by
    hand (or brought by an import) is put back (`state_status_not_kept`), not broadcast as
    an update the next heartbeat or sweep undoes."""
    if was is None or "inactive" in (was.status, st.status) or st.status == was.status:
        return st
    return msgspec.structs.replace(st, status=was.status)


def _flat(table: Table[Any]) -> Mapping[str, Any]:
    """A read-only view of `table`: the committed dict itself when no layer has changes
    (a hand edit of 10,000 records must not walk the overlays 10,000 times)."""
    t: Any = table
    while isinstance(t, Table):
        if t.over or t.order is not None:
            return dict(table.items())
        t = t.base
    return t


def _history_rewritten(
    hand: list[SyncEvent], was: list[SyncEvent], log: Iterable[SyncEvent]
) -> str | None:
    """Why a sync log edited by hand is more than its oldest entries removed (or all of
    them); None when it is no more. A bot resuming after an entry removed from the middle or
    the newest end, or changed, would miss or misread a change without a word. Entries
    older than memory's log (trimmed there, not yet in the file) cannot be judged."""
    if not hand:
        return None
    only = "only the oldest entries of the sync log may be removed by hand"
    if was and hand[-1].id < was[-1].id:
        return (
            f"its newest entries (after id {hand[-1].id}, up to {was[-1].id}) were gone: an "
            f"older copy saved over it (a backup, an editor's buffer)? {only}"
        )
    mine = {e.id: e for e in log}
    for e in hand:
        ours = mine.get(e.id)
        if ours is not None and ours != e:
            return f"entry id {e.id} was not the event logged as {e.id}: {only}, never changed"
    ids = {e.id for e in hand}
    gone = [i for i in mine if hand[0].id < i < hand[-1].id and i not in ids]
    if gone:
        more = f" and {len(gone) - 1} more" if len(gone) > 1 else ""
        return (
            f"entries between ids {hand[0].id} and {hand[-1].id} were gone (id {gone[0]}{more}): "
            f"{only}; a bot resuming before them would miss them without a word"
        )
    return None


def _daemon_seqs(hand: list[SyncEvent], log: Iterable[SyncEvent]) -> list[SyncEvent]:
    """A sync log edited by hand, each entry with the stream seq the daemon gave it (none
    where it gave none): in cluster mode it tells which changes the files hold, and one set
    by hand past the stream's made this host skip the next changes as held already."""
    given = {e.id: e.data.get(STREAM_SEQ) for e in log}
    out = []
    for e in hand:
        seq = given.get(e.id)
        if e.data.get(STREAM_SEQ) != seq:
            data = {k: v for k, v in e.data.items() if k != STREAM_SEQ}
            if seq is not None:
                data[STREAM_SEQ] = seq
            e = msgspec.structs.replace(e, data=data)
        out.append(e)
    return out


def take_in(
    file: str,
    hand: Any,
    base: Any,
    raw: bytes | None = None,
    *,
    late: bool = False,
    copy: str = "",
) -> Op:
    """The op for a valid hand edit of `file`: `hand` is what the file holds now (decoded and
    validated), `base` what it held when the daemon last read or wrote it (records by id, a
    document, or the sync-log events). Changes still on their way to the file are kept: the
    hand edit's own changes go on top of them (`core.merge_table`); the conflicts (fields both
    changed, which the hand edit wins) are the op's result. `late`: written into a file a
    round had displaced, not in the data file (`Tx.on_disk`). `copy`: the digest (hex) of the
    file's copy the edit is merged against ("" for none), for `Change.taken`."""

    def op(tx: Tx) -> list[Any]:
        tx.taken = file
        tx.on_disk = not late
        if raw is not None and not late and not _placeholders_put_back(file, raw):
            tx.taken_digests[file] = f"{hashlib.sha256(raw).hexdigest()}:{copy}"
        if file == SYNC_LOG:
            was = base if base is not None else list(tx.base.log)
            if hand == was:
                return []
            # History edited by hand (old entries removed, say): a change like any other. Events
            # the file has not received yet stay. It is logged, so the file is written back
            # with that one entry on top, which keeps the newest revision on disk: ids are never
            # reused, even after a restart.
            # (a fix of a log that never read valid comes with `was` empty: what it holds is
            # what the file has received)
            if hand and hand[-1].id > tx.base.revision:
                # Ids are the daemon's to give: one past its revision would make the next
                # change's event older than the log's newest (kept from the log, sent to
                # subscribers all the same, and a resume would replay the made-up one).
                why = (
                    f"id {hand[-1].id} is past the daemon's revision {tx.base.revision}: "
                    "sync-log ids are given by the daemon, never written by hand (a log the "
                    "daemon started without, its journal moved aside, is taken at a restart)"
                )
                raw_ = raw if raw is not None else files.encode_table(hand)
                problem = diagnose.at_path(file, raw_, [len(hand) - 1, "id"], why)
                raise CtsdError(
                    "invalid", problem.message, path=problem.path, extra={"problem": problem}
                )
            kept = _daemon_seqs(hand, tx.base.log)
            why = _history_rewritten(kept, was, tx.base.log)
            if why is not None:
                # Not taken: memory keeps the whole history and the file gets it back (a
                # backup's older log copied over it, an editor's stale copy saved), said in
                # the log. Refused instead, the file would stay invalid and every change with
                # it. On one host journalled as the history it keeps: killed before the
                # write, the next start replays it onto the older log (which then reads as
                # a log edited by hand, not another dir's). In cluster mode nothing is
                # published (the hosts hold that history; a whole log may pass what a
                # message takes): the intake has the file written back from memory.
                tx.taken_digests.pop(file, None)
                if not tx.ctx.local_status:  # (one host)
                    tx.log_replace = list(tx.base.log)
                return [why]
            seen = max(was[-1].id if was else 0, kept[-1].id if kept else 0)
            newer = [e for e in tx.base.log if e.id > seen]
            tx.log_replace = [*kept, *newer]
            # (what it holds after the edit, as its limit leaves it: this event takes a place)
            entries = min(len(tx.log_replace), tx.base.settings.sync_log_limit - 1)
            tx.emit("document_update", None, {"file": file, "entries": entries})
            return []
        if file == CONNECTIONS:
            return _take_in_connections(tx, file, base or {}, hand)
        if file == STATE:
            return _take_in_state(tx, file, base or {}, hand)
        name = files.document_name(file)
        assert name is not None
        content = hand
        # As for a connection (`_hand_placeholders`), in the keys the edit changed.
        edited = {k: hand[k] for k in changed_keys(base, hand) if k in hand}
        if edited and may_hold_placeholders(edited):
            stored = tx.docs.get(name) or {}
            restored = restore_placeholders(edited, {k: stored.get(k) for k in edited}, "$")
            if restored is not edited:
                tx.touched.add(file)
                content = {**hand, **restored}
        merged = merge_document(base, content, tx.docs.get(name))
        if name == "instances":
            try:
                files.check_instance_ids(merged.records, file, raw)
                files.check_instance_refs(
                    merged.records, tx.algorithm_names(), file, raw, tx.ctx.invalid_files
                )
            except Invalid as e:
                raise CtsdError(
                    "invalid", e.problem.message, path=e.problem.path, extra={"problem": e.problem}
                ) from None
        existed = name in tx.docs
        keys = put_document(tx, name, merged.records)
        if keys or not existed:
            _emit_document(tx, name, file, keys)
        return merged.conflicts

    return op


def _placeholders_put_back(file: str, raw: bytes) -> bool:
    """May the door have put stored secrets back for placeholders in these bytes? Then memory
    is not what the file holds, and a start must never load the file as it is."""
    return file in (CONNECTIONS, CONNECTION_DOC) and bytes_may_hold_placeholder(raw)


def remove_algorithm(file: str) -> Op:
    """`algorithms/NAME.json` deleted by hand: the algorithm goes, unless an instance uses it."""
    name = files.document_name(file)
    algo = file[len(files.ALGORITHMS_DIR) + 1 : -len(".json")]

    def op(tx: Tx) -> None:
        tx.taken = file
        if name is None or name not in tx.docs:
            return
        instances = (tx.docs.get("instances") or {}).get("instances") or []
        users = [i.get("name") for i in instances if i.get("algorithmName") == algo]
        if users:
            raise CtsdError("conflict", f"instances.json names it (instances {users})")
        tx.docs.delete(name)
        tx.emit("document_update", None, {"file": file, "name": name, "deleted": True})

    return op


# --- whole data set -------------------------------------------------------------------------


def _import_table(
    tx: Tx, file: str, value: Any, mode: str, path: str, unset: list[str] | None
) -> None:
    kind = files.TABLES[file]
    key = "id" if file == CONNECTIONS else "connection_id"
    table = tx.connections if file == CONNECTIONS else tx.state
    if file == CONNECTIONS:
        # Secrets exported masked come back as placeholders: the stored ones stay (matched by
        # id); one for a connection not stored (deleted, reset since) is imported unset and
        # named in the answer: the rest of the export still comes back.
        stored = [msgspec.to_builtins(c) for c in tx.connections.values()]
        value = restore_placeholders(value, stored, path, records=True, unset=unset)
    # The states whose last_sync_at this import gives, as sent (before a merge fills in the
    # stored ones): kept, changed or not, whatever else moves their connections.
    given = (
        {
            v[key]
            for v in value
            if isinstance(v, dict)
            and isinstance(v.get(key), str)  # (what is no id is refused below, by the model)
            and v.get("last_sync_at") is not None
        }
        if file == STATE and isinstance(value, list)
        else set()
    )
    if mode == "merge" and isinstance(value, list):
        # A record sent for one stored is laid over it, as an update is: the fields it leaves
        # out (its secrets, `created_at`, test results) keep their stored values.
        value = [_laid_over(table, key, v) for v in value]
    records = _convert(value, list[kind], path)
    # Checked as sent, before any merge (a merge would fold duplicates silently).
    seen: set[str] = set()
    for i, r in enumerate(records):
        rid = getattr(r, key)
        if rid in seen:
            raise CtsdError("invalid", f"duplicate id {rid!r}", path=f"{path}[{i}]")
        seen.add(rid)
        if file == CONNECTIONS:
            _check_fields(r, f"{path}[{i}]", tx.connections.get(rid))
        elif rid not in tx.connections and CONNECTIONS not in tx.ctx.invalid_files:
            _orphan(tx, records, rid, path)  # (named where it was sent, not in the merge)
    current = dict(table.items())
    if mode == "merge":
        merged = dict(current)
        merged.update((getattr(r, key), r) for r in records)
        records = list(merged.values())
    # An import is a hand edit of the whole file made through the bus: taken in against what
    # memory holds (nothing pending can be lost: the base is memory itself).
    if file == CONNECTIONS:
        _take_in_connections(tx, file, current, records)
    else:
        _take_in_state(tx, file, current, records)
        tx.sync_given.update(given)


def _laid_over(table: Table[Any], key: str, sent: Any) -> Any:
    rid = sent.get(key) if isinstance(sent, dict) else None
    old = table.get(rid) if isinstance(rid, str) else None
    return sent if old is None else {**msgspec.to_builtins(old), **sent}


def import_data(data: Any, mode: Any) -> Op:
    """`data.import`: the `files` of an export, replacing or merging what is there."""

    def op(tx: Tx) -> dict[str, Any]:
        if mode not in ("replace", "merge"):
            raise CtsdError("invalid", 'mode must be "replace" or "merge"', path="$.mode")
        if not isinstance(data, dict):
            raise CtsdError("invalid", "data must be an object", path="$.data")
        # An export ({"files": {FILE: CONTENT}, "version", ...}) or its bare `files`.
        export = "files" in data or not _EXPORT_KEYS.keys().isdisjoint(data)
        content = data.get("files") if export else data
        where = "$.data.files" if export else "$.data"
        for key, kind in _EXPORT_KEYS.items():  # (not used: but of the type an export has)
            value = data.get(key) if export else None
            if value is not None and type(value) is not kind:
                what = "an integer" if kind is int else "a string"
                raise CtsdError("invalid", f"an export's `{key}` is {what}", path=f"$.data.{key}")
        if not isinstance(content, dict):
            raise CtsdError(
                "invalid",
                "an export's `files` must be an object: {FILE: CONTENT, ...}",
                path=where,
            )
        unset: list[str] = []
        imported = _import_files(tx, content, mode, where, unset, by_client=True)
        tx.emit("import", None, {"mode": mode, "files": imported})
        # (the secrets an export held masked where nothing is stored: to be set again)
        return {"imported": imported, "mode": mode, "secrets_unset": unset}

    return op


_EXPORT_KEYS = {"version": int, "exported_at": str, "revision": int}  # beside `files`


def _import_files(
    tx: Tx,
    content: dict[str, Any],
    mode: str,
    where: str,
    unset: list[str] | None = None,
    *,
    by_client: bool = False,
) -> list[str]:
    """`content`'s files into memory; `unset`: see `restore_placeholders` (None: refused).
    `by_client` (an import, not a restore of an archive): a settings.json without the
    daemon's own keys keeps them, as `documents.set` does."""
    imported: list[str] = []
    algos = f"{files.ALGORITHMS_DIR}/"

    # Whatever the order sent (`jq -S` puts connection-state.json before connections.json):
    # algorithms first, instances.json is checked against them; connections before their
    # state, which is kept only for a connection that exists.
    def rank(f: str) -> int:
        return 0 if f.startswith(algos) else 1 if f == CONNECTIONS else 2

    for file in sorted(content, key=rank):
        value = content[file]
        path = f"{where}.{file}"
        if file == SYNC_LOG:
            continue  # history is the daemon's own; an import never rewrites it
        if file in (CONNECTIONS, STATE):
            _import_table(tx, file, value, mode, path, unset)
        else:
            name = files.document_name(file)
            if name is None:
                raise CtsdError("invalid", f"{file!r} is not a ctsd data file", path=path)
            doc = (
                value
                if mode == "replace" or not isinstance(value, dict)
                else {**(tx.docs.get(name) or {}), **value}
            )
            _file, doc = check_document(tx, name, doc, path, unset)
            if name == "settings" and by_client:
                doc = daemon_settings_kept(tx, doc)
            existed = name in tx.docs
            keys = put_document(tx, name, doc, path)
            if keys or not existed:
                _emit_document(tx, name, files.document_file(name), keys)
        imported.append(file)
    return imported


def restore(content: dict[str, Any], archive_revision: int) -> Op:
    """`data.restore`: every data file as a backup archive holds it (decoded), as one change.

    What the archive does not hold goes: connections and state are replaced whole, other
    documents go back to their defaults, algorithms it lacks are removed. The sync log keeps
    its history (revisions never go back while the daemon runs): the restore is an `import`
    event on top of it, naming the archive's revision.
    """

    def op(tx: Tx) -> dict[str, Any]:
        for name in list(tx.docs.keys()):
            file = files.document_file(name)
            if file in content:
                continue
            if name.startswith(f"{files.ALGORITHMS_DIR}/"):
                tx.docs.delete(name)
                tx.emit("document_update", None, {"file": file, "name": name, "deleted": True})
            else:
                keys = put_document(tx, name, files.default_document(name))
                if keys:
                    _emit_document(tx, name, file, keys)
        tables = {f: content.get(f, []) for f in (CONNECTIONS, STATE)}
        # A state record of no connection (a stopped daemon's file may hold one its start
        # dropped; `ctsd verify` notes it): dropped as a start drops it, and named.
        tables[STATE], orphans = _without_orphans(tables[CONNECTIONS], tables[STATE])
        docs = {f: value for f, value in content.items() if f not in tables}
        imported = _import_files(tx, {**tables, **docs}, "replace", "$.data.files")
        tx.touched.update(imported)
        data = {"mode": "restore", "files": imported, "archive_revision": archive_revision}
        tx.emit("import", None, data)
        answer: dict[str, Any] = {"restored": imported}
        if orphans:
            answer["state_dropped"] = orphans
        return answer

    return op


def _without_orphans(conns: Any, states: Any) -> tuple[Any, list[str]]:
    """An archive's state records (decoded) without those of no connection, and their ids."""
    if not isinstance(conns, list) or not isinstance(states, list):
        return states, []  # (what is not a table is refused as such by the import)
    ids = {c.get("id") for c in conns if isinstance(c, dict)}

    def orphan(st: Any) -> bool:
        return (
            isinstance(st, dict)
            and isinstance(st.get("connection_id"), str)
            and (st["connection_id"] not in ids)
        )

    orphans = [st["connection_id"] for st in states if orphan(st)]
    return ([st for st in states if not orphan(st)], orphans) if orphans else (states, [])


def reset() -> Op:
    """`data.reset`: connections and state emptied, documents back to their defaults.

    Algorithm files are the strategy library and are kept; the sync log keeps its history.
    So is the daemon's own configuration in settings.json (`Settings`: its bind address,
    origins, auth, intervals): a reset of the trading data that locked out the frontend
    asking for it, or moved the daemon's port at its next start, would be no reset of data.
    """

    def op(tx: Tx) -> dict[str, Any]:
        for cid in list(tx.connections.keys()):
            delete_connection(tx, cid)
        for cid in list(tx.state.keys()):
            tx.state.delete(cid)
        for name in files.DOCUMENTS:
            content = files.default_document(name)
            if name == "settings":
                content = daemon_settings_kept(tx, content)
            tx.docs.put(name, content)
            tx.set_fields("documents", name, None)
        reset_files = [CONNECTIONS, STATE, *(f for f, _ in files.DOCUMENTS.values())]
        tx.touched.update(reset_files)  # each file is reset, whatever memory held
        tx.emit("reset", None, {"files": reset_files})
        return {"reset": reset_files}

    return op


# --- secrets ----------------------------------------------------------------------------------


def rekey(new_box: Any) -> Op:
    """`secrets.rekey`: every stored secret re-encrypted under `new_box`'s key, as one change.

    Every value is decrypted first (with the key the daemon runs with); one that does not
    decrypt refuses the whole change, naming each place. The events say which files and
    fields changed, never a value. Later changes of the same group are sealed under the new
    key (the group's sealer is switched); the store adopts the key once the change is durable.
    """

    def op(tx: Tx) -> dict[str, Any]:
        sealer = tx.ctx.sealer
        if sealer is None or new_box.key is None:
            raise CtsdError("invalid", "no key to re-encrypt under")
        opened: list[Connection] = []
        problems: list[str] = []
        for i, conn in enumerate(tx.connections.values()):
            try:
                opened.append(sealer.open_connection(conn))
            except SecretError as e:
                problems.append(e.at(CONNECTIONS, (i, e.field)).message)
        doc = tx.docs.get(CONNECTION_DOC_NAME)
        opened_doc = None
        if doc is not None:
            try:
                opened_doc = sealer.open_document(doc)
            except SecretError as e:
                problems.append(e.message)
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise CtsdError(
                "invalid",
                "nothing was re-encrypted: " + "; ".join(problems[:3]) + more,
                extra={"problems": problems},
            )
        sealer.rotate(new_box)
        changed: set[str] = set()
        for conn in opened:
            old = tx.connections.get(conn.id)
            sealed = seal(tx, conn, None, f"$.{conn.id}")
            fields = [f for f in changed_fields(old, sealed) if f in SECRET_CONNECTION_FIELDS]
            if fields:
                changed.update(fields)
                put_connection(tx, sealed, fields)
        if changed:
            data = {"file": CONNECTIONS, "fields": sorted(changed), "rekey": new_box.key_id}
            tx.emit("document_update", None, data)
        if opened_doc is not None:
            keys = put_document(tx, CONNECTION_DOC_NAME, opened_doc)
            if keys:
                file = files.document_file(CONNECTION_DOC_NAME)
                tx.emit(
                    "document_update",
                    None,
                    {
                        "file": file,
                        "name": CONNECTION_DOC_NAME,
                        **shown_keys(keys),
                        "rekey": new_box.key_id,
                    },
                )
        return {"key_id": new_box.key_id, "connections": len(opened)}

    return op
