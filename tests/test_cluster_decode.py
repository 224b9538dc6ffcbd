"""Another host's change as it comes from the stream: decoded and checked whole, into this
host's record types, before any of it is applied."""

from __future__ import annotations

import msgspec
import pytest

from ctsd.cluster import shared
from ctsd.cluster.committer import _decoded
from ctsd.cluster.errors import InvalidChange, SnapshotTooLarge
from ctsd.cluster.shared import change_problem
from ctsd.core import Change, Committed, RecordChange, replayed
from ctsd.models import Connection, ConnectionState, SyncEvent
from tests.datadir import connection


def _payload(change: Change) -> bytes:
    return msgspec.json.encode(change)


def test_records_come_typed_and_events_whole() -> None:
    conn = msgspec.convert(connection(id="c1"), Connection)
    state = msgspec.convert({"connection_id": "c1"}, ConnectionState)
    event = SyncEvent(
        id=3,
        connection_id="c1",
        action="update",
        data={"a": 1},
        created_at="2026-12-05T10:00:00.000Z",
    )
    sent = Change(
        connections=[RecordChange("c1", conn, ["name"])],
        state=[RecordChange("c1", state)],
        documents=[RecordChange("settings", {"theme": "dark"}), RecordChange("gone")],
        order=["c1"],
        events=[event],
    )
    got = _decoded(_payload(sent))
    assert got == sent
    assert isinstance(got.connections[0].value, Connection)
    assert isinstance(got.state[0].value, ConnectionState)


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (b'{"connections": [["c9", {"id": 5}]]}', "a record is not valid"),
        (b'{"state": [["c9", {"connection_id": "c9", "is_active": "yes"}]]}', "not valid"),
        (b'{"documents": [["settings", [1, 2]]]}', "a record is not valid"),
        (b'{"connections": [["c9"]], "surprise": 1}', "not valid"),
        (b'{"connections": ', "does not decode"),
        (b"\xff\xfe", "does not decode"),
        (b"[]", "not valid"),
        (b'{"documents": [["d", {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]]}", "deeply"),
    ],
)
def test_a_change_that_is_not_valid_names_why(payload: bytes, says: str) -> None:
    with pytest.raises(InvalidChange, match=says):
        _decoded(payload)


def test_a_hand_edit_of_another_host_is_not_one_of_this_hosts_files() -> None:
    """Replayed here after a crash (before this host wrote its files), another host's hand
    deletion stays a deletion: it must not take the record back from this host's file, which
    never saw that edit."""
    sent = Change(connections=[RecordChange("c1", hand=True)])
    got = _decoded(_payload(sent))
    assert got.connections == [RecordChange("c1")]
    on_disk = Committed()
    on_disk.connections = {"c1": msgspec.convert(connection(id="c1"), Connection)}
    assert replayed(got, on_disk, frozenset()).connections == [RecordChange("c1")]
    # (As sent, the journal would have brought c1 back.)
    assert replayed(sent, on_disk, frozenset()).connections[0].value is not None


def test_the_stream_form_has_every_field_of_a_change() -> None:
    from ctsd.cluster.committer import _TypedChange

    assert _TypedChange.__struct_fields__ == Change.__struct_fields__


def instance(algorithm: str) -> dict[str, str]:
    return {"id": "i1", "name": "i", "symbol": "BTCUSDT", "algorithmName": algorithm}


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (Change(documents=[RecordChange("settings", {"sync_log_limit": "x"})]), "sync_log_limit"),
        (Change(documents=[RecordChange("bogus", {})]), "unknown document 'bogus'"),
        (
            Change(
                connections=[
                    RecordChange(
                        "c9",
                        msgspec.convert(connection(id="c9", connection_settings="[1]"), Connection),
                    )
                ]
            ),
            "connection 'c9'",
        ),
        (
            Change(documents=[RecordChange("instances", {"instances": [instance("nowhere")]})]),
            "nowhere",
        ),
    ],
)
def test_a_change_the_files_could_not_hold_is_named_before_it_applies(
    change: Change, says: str
) -> None:
    """Typed right, yet what the data files refuse at start: named by `change_problem`, which
    the committer asks before anything of the change is journalled."""
    problem = change_problem(Committed(), _decoded(_payload(change)))
    assert problem is not None and says in problem, problem


def test_a_change_the_files_can_hold_has_no_problem() -> None:
    c = Committed()
    c.documents["algorithms/a1"] = {"name": "a1"}
    change = Change(
        documents=[
            RecordChange("settings", {"sync_log_limit": 50}),
            RecordChange("instances", {"instances": [instance("a1")]}),
        ]
    )
    assert change_problem(c, _decoded(_payload(change))) is None


def test_a_snapshot_no_host_could_inflate_is_refused_before_it_is_stored() -> None:
    c = Committed()
    c.documents["algorithms/a1"] = {"name": "a1", "notes": "x" * 5000}
    state = shared.capture(c, "desk", 7)
    assert shared.decode(shared.encode(state), cluster="desk", seq=7, what="it") == state
    with pytest.raises(SnapshotTooLarge, match=r"at seq 7 is 5,\d+ bytes, more than the 5,000"):
        shared.encode(state, limit=5000)
