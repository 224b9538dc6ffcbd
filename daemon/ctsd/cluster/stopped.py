"""Hand edits made while a cluster host was stopped: told apart at start, then taken in.

On one host the data files are the truth at start. In cluster mode a file edited while the
daemon was stopped must become a change like any hand edit, or the other hosts never get it;
read as the files' content, it would only make this host differ from them. So at a clean stop
the daemon keeps what its files hold (`DATA/.cluster-files`: the records and documents at its
stream seq, written once every change is in the files). At the next start, a file whose
content differs from that was edited meanwhile: memory and the file's base are set back to the
kept version, and once the daemon has caught up the file is taken in through the one door, a
three-way merge onto the cluster's state published like any hand edit.

The kept copy serves one start, at the seq it was taken at: after a kill (no clean stop), or
once the seq moved, an edit cannot be told from the daemon's own last writes, and the files
are read as they are. The sync log is not compared: it is the cluster's, never edited by hand.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from ctsd import files, safefile
from ctsd.atomic import write_files
from ctsd.cluster.messages import inflate
from ctsd.files import CONNECTIONS, STATE, Invalid
from ctsd.models import Connection, ConnectionState

if TYPE_CHECKING:
    from ctsd.store import Store

log = structlog.get_logger("ctsd.cluster")

NAME = ".cluster-files"


class Kept(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What the data files held at a clean stop, at stream seq `seq`."""

    seq: int
    connections: list[Connection]
    state: list[ConnectionState]
    documents: dict[str, dict[str, Any]]


_decode = msgspec.json.Decoder(Kept).decode
_encode = msgspec.json.Encoder().encode


def keep(store: Store, seq: int) -> None:
    """At a clean stop, once the files hold every change: what they hold, for the next start
    (blocking: a write and an fsync)."""
    c = store.committed
    kept = Kept(
        seq=seq,
        connections=list(c.connections.values()),
        state=list(c.state.values()),
        documents=dict(c.documents),
    )
    write_files([(store.data_dir / NAME, zlib.compress(_encode(kept), 1))])


def take_back(store: Store, seq: int) -> list[str]:
    """At start, before the catch-up: the files edited while the daemon was stopped, with
    memory and each file's base set back to what the file held at the stop (so taking the
    file in sees the edit). Reads the kept copy once: it is removed here."""
    path = store.data_dir / NAME
    try:
        raw, _ = safefile.read_data_file(path, NAME)
    except FileNotFoundError:
        return []
    except (Invalid, OSError) as e:
        log.warning("cluster.kept_files_unreadable", file=NAME, reason=str(e))
        path.unlink(missing_ok=True)
        return []
    path.unlink(missing_ok=True)
    try:
        kept = _decode(inflate(raw))
    except (zlib.error, msgspec.MsgspecError) as e:
        log.warning("cluster.kept_files_unreadable", file=NAME, reason=str(e))
        return []
    if kept.seq != seq:
        log.info("cluster.kept_files_stale", kept_seq=kept.seq, seq=seq)
        return []
    c, disk, invalid = store.committed, store.disk, set(store.problems)
    edited: list[str] = []

    def set_back(file: str, content: Any) -> None:
        od = disk.get(file)
        od.content = content
        od.frags = {}  # encoded again from memory when written
        od.ctime = None  # judged changed: taken in (the checkpointer too takes it in first)
        edited.append(file)

    if CONNECTIONS not in invalid and list(c.connections.values()) != kept.connections:
        c.connections = {x.id: x for x in kept.connections}
        set_back(CONNECTIONS, dict(c.connections))
    if STATE not in invalid and list(c.state.values()) != kept.state:
        c.state = {x.connection_id: x for x in kept.state}
        set_back(STATE, dict(c.state))
    for name in sorted({*c.documents, *kept.documents}):
        before = kept.documents.get(name)
        if c.documents.get(name) == before:
            continue
        try:
            file = files.document_file(name)
        except KeyError:
            continue
        if file in invalid:
            continue
        if before is None:
            c.documents.pop(name, None)
        else:
            c.documents[name] = before
        set_back(file, before)
    if edited:
        c.refresh_settings()
        c.version += 1
        store.checkpointer.seed()
        log.warning("cluster.edited_while_stopped", files=edited)
    return edited
