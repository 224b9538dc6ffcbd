"""Every kind of change, as an `Op` for `Store.submit`: a function that checks its input,
applies it to a `Tx` and emits its sync-log events. Ops never touch disk or the network."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import msgspec

from ctsd import diagnose, files
from ctsd.atomic import Stamp, stamp_of
from ctsd.errors import CtsdError
from ctsd.files import CONNECTIONS, STATE, SYNC_LOG, Invalid
from ctsd.limits import require_depth
from ctsd.models import Connection, ConnectionState, TestResult
from ctsd.redact import SETTINGS_STRING_KEY, is_secret_key, mask, restore_placeholders
from ctsd.store import Op, Tx, mirror_state
from ctsd.table import Table
from ctsd.timeutil import later

READ_ONLY = ("id", "created_at", "updated_at")
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


def changed_fields(old: msgspec.Struct | None, new: msgspec.Struct | None) -> list[str]:
    if old is not None and new is not None and type(old) is type(new):
        # The hot path (every update, twice): compare attributes without building two dicts.
        return [k for k in old.__struct_fields__ if getattr(old, k) != getattr(new, k)]
    a = msgspec.structs.asdict(old) if old is not None else {}
    b = msgspec.structs.asdict(new) if new is not None else {}
    return [k for k in (b or a) if a.get(k) != b.get(k)]


def public_values(record: msgspec.Struct, fields: list[str]) -> dict[str, Any]:
    """The new values of `fields`, secrets left out (`fields` still names them), and the
    secrets inside `connection_settings` masked."""
    values = {k: msgspec.to_builtins(getattr(record, k)) for k in fields if not is_secret_key(k)}
    return mask(values) if SETTINGS_STRING_KEY in values else values


def _put_connection(tx: Tx, conn: Connection) -> None:
    tx.connections.put(conn.id, conn)
    state = tx.state.get(conn.id)
    fixed = mirror_state(conn, state, tx.now)
    if fixed is not state:
        tx.state.put(conn.id, fixed)


def _check_settings(conn: Connection, path: str) -> None:
    problem = files.connection_settings_problem(conn.connection_settings)
    if problem:
        raise CtsdError("invalid", problem, path=f"{path}.connection_settings")


# --- connections --------------------------------------------------------------------------


def create(data: Any) -> Op:
    def op(tx: Tx) -> Connection:
        if not isinstance(data, dict):
            raise CtsdError("invalid", "connection must be an object", path="$.connection")
        sent = restore_placeholders(data, None, "$.connection")  # nothing stored: refused
        for key in ("created_at", "updated_at"):
            if key in sent:
                raise CtsdError(
                    "invalid", f"`{key}` is set by the daemon", path=f"$.connection.{key}"
                )
        body = {**sent, "created_at": tx.now, "updated_at": tx.now}
        body.setdefault("id", new_connection_id())
        conn = _convert(body, Connection, "$.connection")
        _check_settings(conn, "$.connection")
        if conn.id in tx.connections:
            raise CtsdError(
                "conflict", f"connection {conn.id!r} already exists", path="$.connection.id"
            )
        _put_connection(tx, conn)
        fields = list(CONNECTION_FIELDS)
        tx.emit("create", conn.id, {"fields": fields, "values": public_values(conn, fields)})
        return conn

    return op


def _updated(tx: Tx, conn: Connection, changes: Any, path: str) -> Connection:
    if not isinstance(changes, dict):
        raise CtsdError("invalid", "changes must be an object", path=path)
    # A secret sent back as shown keeps the stored one.
    changes = restore_placeholders(changes, msgspec.structs.asdict(conn), path)
    for key in READ_ONLY:
        if key in changes:
            raise CtsdError("invalid", f"`{key}` cannot be changed", path=f"{path}.{key}")
    merged = {**msgspec.structs.asdict(conn), **changes}
    new = _convert(merged, Connection, path)
    _check_settings(new, path)
    if changed_fields(conn, new):
        new = msgspec.structs.replace(new, updated_at=tx.now)
    return new


def _apply_update(tx: Tx, conn: Connection, new: Connection) -> Connection:
    fields = [f for f in changed_fields(conn, new) if f != "updated_at"]
    if not fields:
        return conn
    _put_connection(tx, new)
    tx.emit("update", new.id, {"fields": fields, "values": public_values(new, fields)})
    return new


def update(cid: Any, changes: Any) -> Op:
    def op(tx: Tx) -> Connection:
        conn = _require(tx, cid)
        return _apply_update(tx, conn, _updated(tx, conn, changes, "$.changes"))

    return op


def batch_update(updates: Any) -> Op:
    def op(tx: Tx) -> list[Connection]:
        if not isinstance(updates, list) or not updates:
            raise CtsdError("invalid", "updates must be a non-empty array", path="$.updates")
        out = []
        for i, item in enumerate(updates):
            path = f"$.updates[{i}]"
            if not isinstance(item, dict):
                raise CtsdError("invalid", "each update must be an object", path=path)
            changes = dict(item)
            conn = _require(tx, changes.pop("id", None), f"{path}.id")
            out.append(_apply_update(tx, conn, _updated(tx, conn, changes, path)))
        return out

    return op


def delete(cid: Any) -> Op:
    def op(tx: Tx) -> dict[str, str]:
        conn = _require(tx, cid)
        tx.connections.delete(conn.id)
        if conn.id in tx.state:
            tx.state.delete(conn.id)
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
            _put_connection(tx, conn)
        tx.emit("set_active", conn.id, {"active": active, "timestamp": tx.now})
        return conn

    return op


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
        state = tx.state.get(conn.id) or mirror_state(conn, None, tx.now)
        state = msgspec.structs.replace(
            state,
            volume_factor_live=live if live is not None else state.volume_factor_live,
            volume_factor_preset=preset if preset is not None else state.volume_factor_preset,
            updated_at=tx.now,
            last_sync_at=tx.now,  # this change's event: free here, the state is written anyway
        )
        tx.state.put(conn.id, state)
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
        state = tx.state.get(conn.id) or mirror_state(conn, None, tx.now)
        changes: dict[str, Any] = {
            "test_results": result,
            "updated_at": tx.now,
            "last_sync_at": tx.now,  # its `test` event; the state is written anyway
        }
        if result.success and later(result.timestamp, state.last_heartbeat_at):
            changes["last_heartbeat_at"] = result.timestamp
        recovered = result.success and state.status == "stale"
        if recovered:
            changes["status"] = "active"
        tx.state.put(conn.id, msgspec.structs.replace(state, **changes))
        tx.emit("test", conn.id, msgspec.to_builtins(result))
        if recovered:
            tx.emit("recovered", conn.id, {"reason": "test", "timestamp": tx.now})
        return result

    return op


def set_status(changes: dict[str, tuple[str, str | None]]) -> Op:
    """Sweep transitions: {connection_id: (new status, last heartbeat)} → stale/recovered.

    Checked again when applied, since the sweep decided a moment earlier: only an active
    connection goes stale, and not when a heartbeat newer than the one the sweep saw has
    arrived since; only a stale one recovers.
    """

    def op(tx: Tx) -> int:
        n = 0
        for cid, (status, heartbeat) in changes.items():
            state = tx.state.get(cid)
            if state is None:
                continue
            if status == "stale":
                latest = tx.store.heartbeats.get(cid)
                if state.status != "active" or later(latest, heartbeat):
                    continue
            elif status != "active" or state.status != "stale":
                continue
            beat = max(
                (b for b in (heartbeat, state.last_heartbeat_at) if b is not None), default=None
            )
            tx.state.put(
                cid,
                msgspec.structs.replace(
                    state,
                    status=status,
                    last_heartbeat_at=beat,
                    updated_at=tx.now,
                    last_sync_at=tx.now,  # the event below; the state is written anyway
                ),
            )
            if status == "stale":
                tx.emit("stale", cid, {"last_heartbeat_at": heartbeat, "timestamp": tx.now})
            else:
                tx.emit("recovered", cid, {"reason": "heartbeat", "timestamp": tx.now})
            n += 1
        return n

    return op


def flush_heartbeats(beats: dict[str, str], synced: dict[str, str] | None = None) -> Op:
    """Coalesced heartbeats (and `last_sync_at`, see sweeps.py) into connection-state.json:
    one write, no sync-log entries. Only ever moves a timestamp forward."""

    def op(tx: Tx) -> int:
        n = 0
        for cid in beats.keys() | (synced or {}).keys():
            state = tx.state.get(cid)
            if state is None:
                continue
            changes: dict[str, str] = {}
            hb = beats.get(cid)
            if later(hb, state.last_heartbeat_at):
                changes["last_heartbeat_at"] = hb
            ls = (synced or {}).get(cid)
            if later(ls, state.last_sync_at):
                changes["last_sync_at"] = ls
            if changes:
                tx.state.put(cid, msgspec.structs.replace(state, **changes))
                n += 1
        return n

    return op


# --- documents ----------------------------------------------------------------------------


def check_document(
    tx: Tx, name: Any, content: Any, path: str = "$.content"
) -> tuple[str, dict[str, Any]]:
    """(file, content to store) for a document sent by a client: checked, with the
    placeholders of secrets it sends back replaced by the stored secrets."""
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
    content = restore_placeholders(content, tx.docs.get(name), path)
    try:
        files.validate_document(name, content)
        if name == "instances":
            files.check_instance_refs(content, tx.store.algorithm_names(tx.docs), file, None)
    except Invalid as e:
        raise CtsdError("invalid", e.problem.message, path=path + e.problem.path[1:]) from None
    return file, content


def set_document(name: Any, content: Any) -> Op:
    def op(tx: Tx) -> dict[str, Any]:
        file, doc = check_document(tx, name, content)
        _put_document(tx, name, file, doc)
        return doc

    return op


def _put_document(tx: Tx, name: str, file: str, content: dict[str, Any]) -> None:
    old = tx.docs.get(name) or {}
    keys = sorted({k for k in {*old, *content} if old.get(k) != content.get(k)})
    if not keys and name in tx.docs:
        return
    tx.docs.put(name, content)
    tx.emit("document_update", None, {"file": file, "name": name, "keys": keys})


# --- hand edits (take a file in as it is on disk) ------------------------------------------


def _flat(table: Table[Any]) -> Mapping[str, Any]:
    """A read-only view of `table`: the committed dict itself when no layer has changes
    (a hand edit of 10,000 records must not walk the overlays 10,000 times)."""
    t: Any = table
    while isinstance(t, Table):
        if t.over or t.order is not None:
            return dict(table.items())
        t = t.base
    return t


def _take_in_table(tx: Tx, file: str, records: list[Any]) -> None:
    if file == CONNECTIONS:
        new = {c.id: c for c in records}
        current = _flat(tx.connections)
        for cid, old in current.items():
            if cid not in new:
                tx.connections.delete(cid)
                if cid in tx.state:
                    tx.state.delete(cid)
                tx.emit("delete", cid, {"fields": [], "name": old.name, "file": file})
        changed: list[str] = []
        for cid, conn in new.items():
            old = current.get(cid)
            if old is conn or (old is not None and old == conn):  # reused, or equal (in C)
                new[cid] = old  # unchanged: keep the object so its encoding is reused
                continue
            changed.append(cid)
            stamped = msgspec.structs.replace(
                conn, created_at=conn.created_at or tx.now, updated_at=conn.updated_at or tx.now
            )
            new[cid] = stamped
            state = tx.state.get(cid)
            fixed = mirror_state(stamped, state, tx.now)
            if fixed is not state:
                tx.state.put(cid, fixed)
            fields = changed_fields(old, stamped) if old else list(CONNECTION_FIELDS)
            fields = [f for f in fields if f != "updated_at"] or fields
            tx.emit(
                "update" if old else "create",
                cid,
                {"fields": fields, "values": public_values(stamped, fields), "file": file},
            )
        # State kept while connections.json was invalid at start, of no connection now
        # (checked on the committed sizes first: a full scan per hand edit costs ms at 10k).
        if len(tx.store.state) > len(tx.store.connections):
            for cid in [c for c in tx.state if c not in new]:
                tx.state.delete(cid)
        if new.keys() == current.keys() and list(new) == list(current):
            # Same records in the same order (the usual hand edit): overlay only the changed
            # ones, so the write re-encodes those and nothing is rebuilt.
            for cid in changed:
                tx.connections.put(cid, new[cid])
        else:
            tx.connections.replace(new)
    elif file == STATE:
        new_state: dict[str, ConnectionState] = {}
        # While connections.json is invalid there is nothing to mirror: keep what the file says.
        mirror = CONNECTIONS not in tx.store.problems
        for st in records:
            conn = tx.connections.get(st.connection_id)
            if conn is None and mirror:
                continue  # state of no connection: ignored, as at start
            if conn is not None:
                st = mirror_state(conn, st, tx.now)  # is_active and status follow connections
            old = tx.state.get(st.connection_id)
            if old is not None and old == st:
                new_state[st.connection_id] = old
                continue
            fields = changed_fields(old, st)
            new_state[st.connection_id] = st
            tx.emit(
                "update",
                st.connection_id,
                {"fields": fields, "values": public_values(st, fields), "file": file},
            )
        for cid, conn in tx.connections.items():
            if cid not in new_state:
                new_state[cid] = mirror_state(conn, tx.state.get(cid), tx.now)
        tx.state.replace(new_state)


def take_in(file: str, decoded: Any, raw: bytes, stamp: Stamp | None, *, force: bool = False) -> Op:
    """The op for a valid hand edit of `file` (already decoded and validated), read from the
    file when it had `stamp`.

    `stamp=None`: bytes that are not in the file, a late in-place write into the file our
    rename displaced (`Store.take_in_late`). Taken in as a hand save made now; not marked
    synced, so the store writes the file from memory like any change (stamp check, swap,
    fsync), unless a newer save of the file is waiting on disk: that one supersedes it.
    """

    def op(tx: Tx) -> None:
        store = tx.store
        if stamp is None:
            if not store.unchanged(file):
                raise CtsdError("conflict", f"{file} was saved again since; that save supersedes")
        else:
            # Applied a moment after the read: the writer may have written the file since.
            if not force and store.unchanged(file) and file not in store.problems:
                return  # our own write, read before the writer had recorded its stamp
            if stamp_of(store.path(file)) != stamp:
                # Changed again since read (by us or by hand): these bytes are stale and would
                # undo that change. Refuse; the next look reads the file as it now is.
                raise CtsdError("conflict", f"{file} changed again while it was being read")
            tx.synced[file] = stamp
        if file == SYNC_LOG:
            if decoded == list(store.log):
                return
            # History edited by hand (old entries removed, say): a change like any other. It is
            # logged, so the file is written back with that one entry on top, which keeps the
            # newest revision on disk: ids are never reused, even after a restart.
            tx.log_replace = decoded
            tx.touched.add(file)
            tx.emit("document_update", None, {"file": file, "entries": len(decoded)})
            return
        if file in (CONNECTIONS, STATE):
            _take_in_table(tx, file, decoded)
            return
        name = files.document_name(file)
        assert name is not None
        if name == "instances":
            try:
                files.check_instance_refs(decoded, tx.store.algorithm_names(tx.docs), file, raw)
            except Invalid as e:
                raise CtsdError(
                    "invalid", e.problem.message, path=e.problem.path, extra={"problem": e.problem}
                ) from None
        _put_document(tx, name, file, decoded)

    return op


def remove_algorithm(file: str) -> Op:
    """`algorithms/NAME.json` deleted by hand: the algorithm goes, unless an instance uses it."""
    name = files.document_name(file)
    algo = file[len(files.ALGORITHMS_DIR) + 1 : -len(".json")]

    def op(tx: Tx) -> None:
        if name is None or name not in tx.docs:
            return
        instances = (tx.docs.get("instances") or {}).get("instances") or []
        users = [i.get("name") for i in instances if i.get("algorithmName") == algo]
        if users:
            raise CtsdError("conflict", f"instances.json names it (instances {users})")
        tx.docs.delete(name)
        tx.synced[file] = None  # already gone from disk
        tx.emit("document_update", None, {"file": file, "name": name, "deleted": True})

    return op


def touch(file: str) -> Op:
    """Write `file` back from memory (it was deleted by hand)."""

    def op(tx: Tx) -> None:
        tx.touched.add(file)

    return op


# --- whole data set -------------------------------------------------------------------------


def import_data(data: Any, mode: Any) -> Op:
    """`data.import`: the `files` of an export, replacing or merging what is there."""

    def op(tx: Tx) -> dict[str, Any]:
        if mode not in ("replace", "merge"):
            raise CtsdError("invalid", 'mode must be "replace" or "merge"', path="$.mode")
        if not isinstance(data, dict):
            raise CtsdError("invalid", "data must be an object", path="$.data")
        content = data.get("files", data)
        if not isinstance(content, dict):
            raise CtsdError("invalid", "data.files must be an object", path="$.data.files")
        imported: list[str] = []
        for file, value in content.items():
            path = f"$.data.files.{file}"
            if file == SYNC_LOG:
                continue  # history is the daemon's own; an import never rewrites it
            if file in (CONNECTIONS, STATE):
                kind = files.TABLES[file]
                if file == CONNECTIONS:
                    # Secrets exported masked come back as placeholders: the stored ones stay
                    # (matched by id); a placeholder for a connection not stored is invalid.
                    stored = [msgspec.to_builtins(c) for c in tx.connections.values()]
                    value = restore_placeholders(value, stored, path)
                records = _convert(value, list[kind], path)
                key = "id" if file == CONNECTIONS else "connection_id"
                # Checked as sent, before any merge (a merge would fold duplicates silently).
                seen: set[str] = set()
                for i, r in enumerate(records):
                    rid = getattr(r, key)
                    if rid in seen:
                        raise CtsdError("invalid", f"duplicate id {rid!r}", path=f"{path}[{i}]")
                    seen.add(rid)
                    if file == CONNECTIONS:
                        _check_settings(r, f"{path}[{i}]")
                if mode == "merge":
                    current = {
                        getattr(r, key): r
                        for r in (tx.connections if file == CONNECTIONS else tx.state).values()
                    }
                    # as sent (records converted from `value`: dicts, ids unique)
                    sent = {v["id"]: v for v in value} if file == CONNECTIONS else {}
                    for r in records:
                        old = current.get(getattr(r, key))
                        if old is not None and file == CONNECTIONS:
                            # secrets absent from the import keep their stored values
                            keep = {
                                k: getattr(old, k)
                                for k in SECRET_CONNECTION_FIELDS
                                if k not in sent[r.id]
                            }
                            r = msgspec.structs.replace(r, **keep)
                        current[getattr(r, key)] = r
                    records = list(current.values())
                _take_in_table(tx, file, records)
            else:
                name = files.document_name(file)
                if name is None:
                    raise CtsdError("invalid", f"{file!r} is not a ctsd data file", path=path)
                doc = (
                    value
                    if mode == "replace" or not isinstance(value, dict)
                    else {**(tx.docs.get(name) or {}), **value}
                )
                _file, doc = check_document(tx, name, doc, path)
                _put_document(tx, name, files.document_file(name), doc)
            imported.append(file)
        tx.emit("import", None, {"mode": mode, "files": imported})
        return {"imported": imported, "mode": mode}

    return op


def reset() -> Op:
    """`data.reset`: connections and state emptied, documents back to their defaults.

    Algorithm files are the strategy library and are kept; the sync log keeps its history.
    """

    def op(tx: Tx) -> dict[str, Any]:
        for cid in list(tx.connections.keys()):
            tx.connections.delete(cid)
        for cid in list(tx.state.keys()):
            tx.state.delete(cid)
        for name in files.DOCUMENTS:
            tx.docs.put(name, files.default_document(name))
        reset_files = [CONNECTIONS, STATE, *(f for f, _ in files.DOCUMENTS.values())]
        tx.touched.update(reset_files)
        tx.emit("reset", None, {"files": reset_files})
        return {"reset": reset_files}

    return op
