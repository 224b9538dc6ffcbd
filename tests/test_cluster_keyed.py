"""Keyed change groups (`ctsd.cluster.keyed`): which groups may skip the whole-stream check,
and the check every host makes instead. Pure: real ops through the core, no files, no loop."""

from __future__ import annotations

import copy
from typing import Any

import msgspec
import pytest

from ctsd import ops
from ctsd.cluster import keyed, shared
from ctsd.core import Change, Committed, Context, RecordChange, Request, apply_group
from ctsd.models import Connection, SyncEvent
from ctsd.secretbox import SecretBox, new_key_text, parse_key
from ctsd.secretfields import seal_connection
from tests.datadir import connection

T = "2024-01-01T00:00:00.000Z"


def group(c: Committed, *op_list: Any) -> Change:
    """One group computed on `c` (not installed)."""
    outcomes, change = apply_group(c, [Request(op, "bus") for op in op_list], Context(T))
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
    return change


def landed(c: Committed, change: Change, seq: int) -> None:
    """Install `change` as the stream's message `seq` is installed on every host."""
    keyed.stamp(change.events, c.revision, seq)
    c.apply(change)


def seeded(*ids: str) -> Committed:
    c = Committed()
    landed(c, group(c, *(ops.create({"id": i, "name": i, "exchange": "bybit"}) for i in ids)), 1)
    return c


# --- which groups are keyed ---------------------------------------------------------------------


def applies(c: Committed, change: Change, base: int, seq: int) -> bool:
    names = keyed.keys(change)
    assert names is not None
    return keyed.still_applies(c.log, c.revision, names, base, change.events[0].id, seq)


def test_connection_ops_are_keyed_by_the_connections_they_name() -> None:
    c = seeded("a", "b")
    assert keyed.keys(group(c, ops.update("a", {"name": "x"}))) == {"c:a"}
    assert keyed.keys(group(c, ops.set_volume("a", live=2.0))) == {"c:a"}
    assert keyed.keys(group(c, ops.set_active("b", False))) == {"c:b"}
    assert keyed.keys(group(c, ops.delete("b"))) == {"c:b"}
    two = group(c, ops.update("a", {"name": "x"}), ops.update("b", {"name": "y"}))
    assert keyed.keys(two) == {"c:a", "c:b"}
    new = group(c, ops.create({"id": "n", "name": "n", "exchange": "bybit"}))
    assert keyed.keys(new) == {"c:n"}


def test_groups_that_change_more_than_they_name_are_not_keyed() -> None:
    c = seeded("a", "b")
    assert keyed.keys(group(c, ops.reset())) is None
    imported = group(c, ops.import_data({"connections.json": []}, "replace"))
    assert keyed.keys(imported) is None
    # documents: their checks read other documents (an instance names an algorithm)
    assert keyed.keys(group(c, ops.set_document("settings", {"theme": "dark"}))) is None
    update = group(c, ops.update("a", {"name": "x"}))
    assert keyed.keys(Change(connections=update.connections, events=update.events)) == {"c:a"}
    for extra in ({"order": ["a"]}, {"log": []}, {"touched": ["connections.json"]}):
        assert (
            keyed.keys(Change(connections=update.connections, events=update.events, **extra))
            is None
        )
    # a record no event of the group names: b's, in a group whose events name a only
    other = group(c, ops.update("b", {"name": "y"}))
    unnamed = Change(connections=[*update.connections, *other.connections], events=update.events)
    assert keyed.keys(unnamed) is None
    volume = group(c, ops.set_volume("b", live=2.0))
    assert volume.state and not volume.connections
    assert keyed.keys(Change(state=volume.state, events=update.events)) is None
    rekeyed = SyncEvent(
        id=9, connection_id=None, action="document_update", data={"file": "x"}, created_at=T
    )
    assert (
        keyed.keys(Change(connections=update.connections, events=[*update.events, rekeyed])) is None
    )


# --- the check every host makes ----------------------------------------------------------------


def test_a_keyed_group_applies_unless_its_connections_changed_since_its_base() -> None:
    c = seeded("a", "b")  # seq 1
    mine = group(c, ops.update("a", {"name": "mine"}))  # computed at seq 1
    later = group(c, ops.update("b", {"name": "z"}))  # also at seq 1, to come after `mine`
    assert applies(c, mine, base=1, seq=2)  # nothing in between
    landed(c, group(c, ops.update("b", {"name": "other"})), 2)
    landed(c, group(c, ops.set_document("settings", {"theme": "dark"})), 3)
    assert applies(c, mine, base=1, seq=4)  # others' records only: read from the log
    landed(c, group(c, ops.set_volume("a", live=3.0)), 4)
    assert not applies(c, mine, base=1, seq=5)  # `a` changed at 4
    assert not applies(c, later, base=1, seq=5)  # `b` changed at 2
    again = group(c, ops.update("a", {"name": "again"}))  # computed at 4
    landed(c, group(c, ops.update("b", {"name": "b5"})), 5)
    assert applies(c, again, base=4, seq=6)
    landed(c, group(c, ops.set_active("a", False)), 6)
    assert not applies(c, again, base=4, seq=7)


def test_a_change_of_everything_or_a_log_that_cannot_tell_supersedes_it() -> None:
    c = seeded("a", "b")
    mine = group(c, ops.update("a", {"name": "mine"}))
    landed(c, group(c, ops.reset()), 2)
    assert not applies(c, mine, base=1, seq=3)
    c = seeded("a", "b")
    mine = group(c, ops.update("a", {"name": "mine"}))
    c.settings.sync_log_limit = 1  # the log keeps only the newest event
    landed(c, group(c, ops.update("b", {"name": "x"})), 2)
    landed(c, group(c, ops.update("b", {"name": "y"})), 3)
    assert [e.data["stream_seq"] for e in c.log] == [3]
    assert not applies(c, mine, base=1, seq=4)  # 2 is gone: cannot tell
    c = seeded("a", "b")
    mine = group(c, ops.update("a", {"name": "mine"}))
    hand = SyncEvent(id=3, connection_id="b", action="update", data={}, created_at=T)
    c.apply(Change(events=[hand]))  # no stream seq: not from the stream
    assert not applies(c, mine, base=1, seq=3)


def test_a_host_whose_log_is_not_the_one_the_group_was_computed_on_says_so() -> None:
    c = seeded("a", "b")  # revision 2 at seq 1
    mine = group(c, ops.update("a", {"name": "mine"}))
    elsewhere = seeded("a", "b")
    elsewhere.revision = 5  # its log took other events
    with pytest.raises(keyed.LogsDiffer, match="computed at revision 2"):
        applies(elsewhere, mine, base=1, seq=2)
    landed(c, group(c, ops.update("b", {"name": "x"})), 2)
    shifted = copy.deepcopy(c)
    for e in shifted.log:
        e.id += 10
    shifted.revision += 10
    with pytest.raises(keyed.LogsDiffer, match="sync log is at revision 12 there"):
        applies(shifted, mine, base=1, seq=3)
    empty = Committed()
    empty.revision = 3
    with pytest.raises(keyed.LogsDiffer):
        applies(empty, mine, base=1, seq=3)
    assert applies(c, mine, base=1, seq=3)


def test_stamp_gives_revisions_in_stream_order_and_held_seq_reads_them_back() -> None:
    c = seeded("a")
    assert keyed.held_seq(c.log) == 1
    change = group(c, ops.update("a", {"name": "x"}), ops.set_volume("a", live=2.0))
    c.revision = 7  # others' changes came first
    keyed.stamp(change.events, c.revision, 12)
    assert [(e.id, e.data["stream_seq"]) for e in change.events] == [(8, 12), (9, 12)]
    c.apply(change)
    assert keyed.held_seq(c.log) == 12 and c.revision == 9
    assert keyed.held_seq([]) is None
    assert (
        keyed.held_seq([SyncEvent(id=1, connection_id=None, action="reset", data={}, created_at=T)])
        is None
    )


# --- secrets across hosts (`shared.foreign_secret`, `shared.same_data`) ----------------------


def _box(name: str) -> SecretBox:
    return SecretBox(parse_key(new_key_text(), name))


def test_a_secret_sealed_under_another_hosts_key_is_named() -> None:
    mine, theirs = _box("mine"), _box("theirs")
    conn = msgspec.convert(connection("c1", api_key="AKIA1"), Connection)
    foreign = seal_connection(theirs, conn)
    problem = shared.foreign_secret(mine.key_ids, [RecordChange("c1", foreign)], [])
    assert problem is not None and "connection 'c1': api_key is sealed under" in problem
    assert theirs.key_ids[0] in problem and mine.key_ids[0] in problem
    # what this host can open, plain text (sealed here), and a change that does not set the
    # secret (a rename carries the whole record, but only `name` is applied) all pass
    assert (
        shared.foreign_secret(mine.key_ids, [RecordChange("c1", seal_connection(mine, conn))], [])
        is None
    )
    assert shared.foreign_secret(mine.key_ids, [RecordChange("c1", conn)], []) is None
    assert shared.foreign_secret(mine.key_ids, [RecordChange("c1", foreign, ["name"])], []) is None
    assert shared.foreign_secret(mine.key_ids, [RecordChange("c1", None)], []) is None
    # a host without a key cannot open a sealed value either
    assert shared.foreign_secret((), [RecordChange("c1", foreign)], []) is not None


def test_the_same_data_sealed_twice_is_the_same_data() -> None:
    """A host that sealed the founding host's plain data with fresh nonces holds the same
    data: the join check must not refuse it."""
    box = _box("k")
    conn = msgspec.convert(connection("c1", api_key="AKIA1"), Connection)
    c = Committed()
    c.connections = {"c1": seal_connection(box, conn)}
    state = shared.SharedState(
        cluster="x", seq=1, connections=[seal_connection(box, conn)], state=[], documents={}, log=[]
    )
    assert c.connections["c1"].api_key != state.connections[0].api_key  # fresh nonces
    assert shared.same_data(c, state, box)
    other = msgspec.structs.replace(conn, api_key="AKIA2")
    state.connections = [seal_connection(box, other)]
    assert not shared.same_data(c, state, box)
