"""Keyed change groups: published without the whole-stream check, checked by every host alike.

Most groups touch only connections whose own sync-log events they carry: a bot updating its
connection, a test result, a volume. Such a group is *keyed*. It goes to the stream with its
base (the stream seq its state was computed at) instead of `Nats-Expected-Last-Sequence`, so
hosts changing different connections never refuse each other's groups. Every host applying
the stream decides at the same point, from what every host holds identically, whether it still
applies: it does unless an event applied after its base touched one of its connections, or
changed everything (an import, a reset, a re-key, a hand edit of the sync log), or the sync
log no longer reaches back to its base (its oldest events were trimmed). A group that no
longer applies is skipped on every host, and the host that made it computes it again.

What is read is the sync log, the same on every host: every event a change of the stream
added carries its `stream_seq`. Events get their revisions where the stream puts them, not
where the group was computed (`stamp`); the revisions a group was computed with tell whether
this host's log is the one its host had (`LogsDiffer`). Everything else goes with the
whole-stream check: documents (their checks read other documents: an instance names an
algorithm), a reorder, the log replaced, files written unchanged, a record no event of the
group names.

Pure: no I/O, no event loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Reversible

import msgspec

from ctsd.core import STREAM_SEQ, Change, event_keys, record_key
from ctsd.models import SyncEvent


class LogsDiffer(Exception):
    """This host's sync log is not the one the group's host had: the hosts' states differ."""


def touches_all(e: SyncEvent) -> bool:
    """Does the event stand for a change of more than the records it names?"""
    if e.action in ("import", "reset"):
        return True
    # A document update without a name: a hand edit of the sync log, or a re-key of every
    # connection's secrets.
    return e.action == "document_update" and "name" not in e.data


def keys(change: Change) -> frozenset[str] | None:
    """The revision keys of a keyed group's connections; None when the group is not keyed."""
    if not change.events or change.log is not None or change.order is not None:
        return None
    if change.touched or change.documents:
        return None
    named: set[str] = set()
    for e in change.events:
        if touches_all(e):
            return None
        named.update(event_keys(e))
    records = {record_key(rc.key) for rc in (*change.connections, *change.state)}
    return frozenset(named) if records <= named else None


def still_applies(
    log: Reversible[SyncEvent],
    revision: int,
    names: frozenset[str],
    base: int,
    first_id: int,
    seq: int,
) -> bool:
    """Does a keyed group computed at stream seq `base`, its first event numbered `first_id`
    there, apply at `seq`, on a host whose sync log and revision are `log` and `revision` (the
    state at `seq - 1`)? Conservative: when the log cannot tell, it does not. Raises
    LogsDiffer when this host's log cannot be the one the group was computed on."""
    at_base = first_id - 1  # the revision at `base`
    if revision == at_base:
        return True  # no event since: no change of a connection, nothing that changed all
    if seq == base + 1 or revision < at_base or not log:
        raise LogsDiffer(
            f"computed at revision {at_base} (stream seq {base}), but this host is at "
            f"revision {revision} at stream seq {seq - 1}: the hosts' sync logs differ"
        )
    for e in reversed(log):
        at = e.data.get(STREAM_SEQ)
        if type(at) is not int:
            return False  # an event from outside the stream (a hand edit, an older ctsd)
        if at <= base:
            if e.id != at_base:
                raise LogsDiffer(
                    f"computed at revision {at_base} (stream seq {base}), but this host's "
                    f"sync log is at revision {e.id} there: the hosts' sync logs differ"
                )
            return True  # everything after the base is in the log, and none of it touched it
        if touches_all(e) or not names.isdisjoint(event_keys(e)):
            return False
    return False  # the log was trimmed past the base


def stamp(events: Iterable[SyncEvent], revision: int, seq: int) -> None:
    """Give a group's events their revisions after `revision`, and the stream seq they came
    with (in place: the answers to the group's requests hold the same events)."""
    for i, e in enumerate(events, start=1):
        e.id = revision + i
        e.data[STREAM_SEQ] = seq


def unstamped(log: Iterable[SyncEvent]) -> list[SyncEvent]:
    """`log` without stream seqs: those of another stream (the data of an earlier cluster, a
    new one is founded with) mean nothing in this one."""
    return [
        msgspec.structs.replace(e, data={k: v for k, v in e.data.items() if k != STREAM_SEQ})
        if STREAM_SEQ in e.data
        else e
        for e in log
    ]


def held_seq(log: Reversible[SyncEvent]) -> int | None:
    """The stream seq of the newest change the sync log has events of (None: it cannot say)."""
    for e in reversed(log):
        at = e.data.get(STREAM_SEQ)
        return at if type(at) is int else None
    return None
