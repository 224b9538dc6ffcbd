"""The pure core (`ctsd.core` with the ops of `ctsd.ops`): committed state and ops in, the
change, its events and its revisions out — no files, no clock but the one given, no event loop.

Every test here is a plain function: if one ever needs a file or a loop, the core is no
longer pure.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import msgspec
import pytest

from ctsd import core, files, ops
from ctsd.cluster import shared
from ctsd.core import (
    STREAM_SEQ,
    Change,
    Committed,
    Context,
    Outcome,
    RecordChange,
    Request,
    apply_group,
    document_key,
    loaded_files,
    merge_document,
    merge_table,
    record_key,
    replayed,
)
from ctsd.files import CONNECTIONS, STATE, SYNC_LOG
from ctsd.models import Connection, ConnectionState, SyncEvent, TestResult
from ctsd.redact import MASK, mask_record

T0 = "2024-01-01T00:00:00.000Z"
T1 = "2024-01-01T00:00:01.000Z"
T2 = "2024-01-01T00:00:02.000Z"
T3 = "2024-01-01T00:00:03.000Z"
T4 = "2024-01-01T00:00:04.000Z"


def body(cid: str, name: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"id": cid, "name": name or cid, "exchange": "bybit", **kw}


def run(
    c: Committed, *reqs: Request | Any, now: str = T1, invalid: dict[str, str] | None = None
) -> tuple[list[Outcome], Change]:
    """Apply one group (an op alone counts as a bus request) and install its change."""
    requests = [r if isinstance(r, Request) else Request(r, "bus") for r in reqs]
    outcomes, change = apply_group(c, requests, Context(now, invalid or {}))
    c.apply(change)
    return outcomes, change


def ok(outcomes: list[Outcome]) -> list[Any]:
    for i, o in enumerate(outcomes):
        assert o.error is None, (i, o.error)
    return [o.result for o in outcomes]


def probe_result(success: bool, at: str) -> TestResult:
    return TestResult(success=success, latency=5 if success else None, timestamp=at)


def seeded(*ids: str) -> Committed:
    c = Committed()
    ok(run(c, *(ops.create(body(cid)) for cid in ids), now=T0)[0])
    return c


def snapshot(c: Committed) -> Any:
    """Everything a reader of `c` can see, deep-copied."""
    return copy.deepcopy(
        (
            list(c.connections.items()),
            list(c.state.items()),
            c.documents,
            list(c.log),
            c.revision,
            c.record_revs,
            c.settings,
            c.version,
        )
    )


def by_key(rcs: list[RecordChange]) -> dict[str, RecordChange]:
    return {rc.key: rc for rc in rcs}


# --- one change: records, events, revisions ---------------------------------------------------


def test_a_create_puts_the_record_its_state_and_one_event_stamped_with_the_given_time() -> None:
    c = Committed()
    (out,), change = run(c, ops.create(body("conn_a", "A")), now=T1)
    assert out.error is None and out.result.id == "conn_a"
    assert [rc.key for rc in change.connections] == ["conn_a"]
    assert change.connections[0].fields is None  # a new record goes whole
    (st,) = change.state
    assert st.key == "conn_a" and st.fields is None
    assert st.value.last_sync_at == T1  # with the event that moves it, in the same change
    assert st.value.created_at == T1 and st.value.status == "inactive"
    (event,) = change.events
    assert (event.id, event.action, event.connection_id) == (1, "create", "conn_a")
    assert event.created_at == T1 and event.data["source"] == "bus"
    assert event.data["values"]["name"] == "A"
    assert out.events == change.events and out.files == {CONNECTIONS, STATE, SYNC_LOG}
    assert change.files() == {CONNECTIONS, STATE, SYNC_LOG}
    # installed: every reader sees it, at revision 1
    assert c.connections["conn_a"].created_at == T1 == c.connections["conn_a"].updated_at
    assert c.state["conn_a"].last_sync_at == T1
    assert (c.revision, c.revision_of(record_key("conn_a")), list(c.log)) == (1, 1, change.events)


def test_an_update_journals_only_the_fields_it_changed() -> None:
    c = seeded("conn_a")
    _, change = run(c, ops.update("conn_a", {"name": "B", "margin_type": "isolated"}), now=T2)
    (rc,) = change.connections
    assert sorted(rc.fields or []) == ["margin_type", "name", "updated_at"]
    assert rc.value.name == "B" and rc.value.updated_at == T2
    (event,) = change.events
    assert event.action == "update" and sorted(event.data["fields"]) == ["margin_type", "name"]
    assert event.data["values"] == {"name": "B", "margin_type": "isolated"}
    # the state record only gets the time of the event
    (st,) = change.state
    assert st.fields == ["last_sync_at"] and st.value.last_sync_at == T2
    assert change.files() == {CONNECTIONS, STATE, SYNC_LOG}
    assert c.connections["conn_a"].created_at == T0  # server-managed, untouched


def test_an_update_that_changes_nothing_is_no_change_and_no_revision() -> None:
    c = seeded("conn_a")
    before = snapshot(c)
    (out,), change = apply_group(
        c, [Request(ops.update("conn_a", {"name": "conn_a"}), "bus")], Context(T2)
    )
    assert out.error is None and change.empty and out.events == [] and out.files == set()
    assert change.files() == set()
    c.apply(change)
    assert snapshot(c)[:6] == before[:6]  # records, log, revision all as they were


def test_a_delete_removes_the_record_and_its_state_and_logs_the_name() -> None:
    c = seeded("conn_a", "conn_b")
    (out,), change = run(c, ops.delete("conn_a"), now=T2)
    assert out.result == {"deleted": "conn_a"}
    assert change.connections == [RecordChange("conn_a")]  # value None: deleted
    assert change.state == [RecordChange("conn_a")]
    (event,) = change.events
    assert (event.action, event.connection_id, event.data["name"]) == ("delete", "conn_a", "conn_a")
    assert list(c.connections) == ["conn_b"] and list(c.state) == ["conn_b"]
    assert c.revision_of(record_key("conn_a")) == event.id


def test_a_volume_change_touches_the_state_file_only_and_moves_last_sync_at() -> None:
    c = seeded("conn_a")
    _, change = run(c, ops.set_volume("conn_a", live=2.5), now=T2)
    assert change.connections == []
    (st,) = change.state
    assert st.value.volume_factor_live == 2.5 and st.value.volume_factor_preset == 1.0
    assert st.value.last_sync_at == T2 and st.value.updated_at == T2
    assert "last_sync_at" in (st.fields or [])
    assert [e.action for e in change.events] == ["update_volume"]
    assert change.files() == {STATE, SYNC_LOG}
    assert c.state["conn_a"].volume_factor_live == 2.5


@pytest.mark.parametrize(
    "op",
    [
        ops.update("conn_a", {"name": "x"}),
        ops.set_active("conn_a", True),
        ops.set_volume("conn_a", preset=3),
        ops.record_test("conn_a", probe_result(True, T3)),
    ],
    ids=["update", "set_active", "set_volume", "test"],
)
def test_every_event_on_a_connection_moves_its_last_sync_at_in_the_same_change(op: Any) -> None:
    c = seeded("conn_a")
    _, change = run(c, op, now=T3)
    assert change.events and all(e.connection_id == "conn_a" for e in change.events)
    (st,) = by_key(change.state).values()
    assert st.value.last_sync_at == T3  # the state record is written whole and current
    assert c.state["conn_a"].last_sync_at == T3


def test_an_import_keeps_the_last_sync_at_it_brings() -> None:
    """An archive restored or an export imported had each state's `last_sync_at` replaced
    by the time of the import (an offline restore kept it: the two disagreed)."""
    c = seeded("conn_a")
    run(c, ops.set_volume("conn_a", preset=3), now=T2)
    exported = msgspec.to_builtins(c.state["conn_a"])
    assert exported["last_sync_at"] == T2
    run(c, ops.reset(), now=T3)
    sent = {"connections.json": [msgspec.to_builtins(seeded("conn_a").connections["conn_a"])]}
    sent["connection-state.json"] = [{**exported, "last_sync_at": T1}]
    ok(run(c, ops.import_data({"files": sent}, "replace"), now=T3)[0])
    assert c.state["conn_a"].last_sync_at == T1
    # the same one sent back with its connection renamed: kept too
    sent["connections.json"][0]["name"] = "renamed"
    ok(run(c, ops.import_data({"files": sent}, "merge"), now=T3)[0])
    assert c.state["conn_a"].last_sync_at == T1
    # an import that sends no state: the connection's change moves it, as any change does
    sent.pop("connection-state.json")
    sent["connections.json"][0]["name"] = "again"
    ok(run(c, ops.import_data({"files": sent}, "merge"), now=T3)[0])
    assert c.state["conn_a"].last_sync_at == T3
    # a merge that sends one connection's state: another's, only stored, moves as ever
    run(c, ops.create({"id": "conn_b", "name": "b", "exchange": "x"}), now=T2)
    only_a = {
        "connections.json": [{"id": "conn_b", "name": "renamed b", "exchange": "x"}],
        "connection-state.json": [{**exported, "last_sync_at": T1}],
    }
    ok(run(c, ops.import_data({"files": only_a}, "merge"), now=T4)[0])
    assert c.state["conn_a"].last_sync_at == T1 and c.state["conn_b"].last_sync_at == T4
    # a state without an id (or with a list for one) is refused as invalid, not a crash of
    # the whole group (KeyError, unhashable)
    for bad in ({"last_sync_at": T1}, {"connection_id": ["x"], "last_sync_at": T1}):
        for mode in ("merge", "replace"):
            (out,), _ = run(c, ops.import_data({"files": {"connection-state.json": [bad]}}, mode))
            assert out.error is not None and out.error.code == "invalid", (bad, mode, out.error)


@pytest.mark.parametrize("local_status", [False, True], ids=["one host", "cluster"])
def test_a_successful_test_recovers_a_stale_connection(local_status: bool) -> None:
    """In cluster mode the stale it recovers from was this host's own (its sweep's, with no
    event): the `recovered` event would reach every host's log and subscribers, for a
    connection active where its bot heartbeats. The status moves all the same."""
    c = seeded("conn_a")
    c.state["conn_a"] = msgspec.structs.replace(c.state["conn_a"], status="stale")
    op = ops.record_test("conn_a", probe_result(True, T3))
    outcomes, change = apply_group(
        c, [Request(op, "probe")], Context(T3, local_status=local_status)
    )
    ok(outcomes)
    c.apply(change)
    actions = [e.action for e in change.events]
    assert actions == (["test"] if local_status else ["test", "recovered"])
    assert c.state["conn_a"].status == "active"


def test_a_heartbeat_flush_logs_nothing_and_leaves_last_sync_at() -> None:
    c = seeded("conn_a")
    rev = c.revision
    (out,), change = run(c, ops.flush_heartbeats({"conn_a": T2}), now=T3)
    assert out.result == 1 and change.events == [] and c.revision == rev
    (st,) = change.state
    assert st.fields == ["last_heartbeat_at"] and st.value.last_heartbeat_at == T2
    assert c.state["conn_a"].last_sync_at == T0
    assert change.files() == {STATE}
    # never backwards
    (out,), change = run(c, ops.flush_heartbeats({"conn_a": T1}), now=T3)
    assert out.result == 0 and change.empty


# --- revisions ---------------------------------------------------------------------------------


def test_revisions_are_consecutive_across_ops_groups_and_refusals() -> None:
    c = Committed()
    seen: list[int] = []
    groups = [
        [ops.create(body("conn_a")), ops.create(body("conn_b"))],
        [ops.update("conn_a", {"name": "a2"}), ops.update("missing", {"name": "x"})],
        [ops.delete("conn_b"), ops.set_volume("conn_a", live=2), ops.set_active("conn_a", True)],
        [ops.set_document("ui-config", {"theme": "dark"}), ops.create("not an object")],
        [ops.record_test("conn_a", probe_result(False, T2))],
    ]
    for group in groups:
        outcomes, change = run(c, *group)
        for o in outcomes:
            ids = [e.id for e in o.events]
            assert ids == list(range(ids[0], ids[0] + len(ids))) if ids else o.error or o.files
        seen += [e.id for e in change.events]
    assert seen == list(range(1, len(seen) + 1))  # strictly +1, no gap where an op failed
    assert [e.id for e in c.log] == seen and c.revision == seen[-1]


def test_a_replayed_change_is_not_logged_twice() -> None:
    """The journal is replayed onto files that may already hold part of it: events the sync
    log has are skipped, records are set again (the same values)."""
    c = seeded("conn_a")
    _, change = run(c, ops.update("conn_a", {"name": "B"}), now=T2)
    before = snapshot(c)
    c.apply(change)
    after = snapshot(c)
    assert after[:6] == before[:6]  # the same records, log, revision and record revisions


def test_a_replayed_sync_log_edit_keeps_the_events_logged_after_it() -> None:
    """A crash after a checkpoint wrote every file but before the journal was cut: the
    journal replays onto files that hold it all. A hand edit of the sync log in it sets the
    history back to what the edit left; the events logged after the edit must come back on
    top of it, not be skipped as already held."""
    c = seeded("conn_a", "conn_b")
    kept = list(c.log)[1:]  # the operator removes the oldest entry
    journal = [run(c, Request(ops.take_in(SYNC_LOG, kept, list(c.log)), "file"), now=T2)[1]]
    journal.append(run(c, ops.update("conn_a", {"name": "A2"}), now=T3)[1])
    journal.append(run(c, ops.update("conn_b", {"name": "B2"}), now=T3)[1])
    files_now = snapshot(c)
    replay = loaded_files(c)
    replay.load_log(list(c.log))
    for change in journal:
        replay.apply(replayed(change, c, frozenset()))
    assert [e.id for e in replay.log] == [e.id for e in c.log]
    assert snapshot(replay)[:5] == files_now[:5]


def test_a_sync_log_edited_to_an_id_past_the_revision_is_refused() -> None:
    """Ids are the daemon's to give: a made-up one past its revision would make the next
    change's event older than the log's newest, sent to subscribers but left out of the log."""
    c = seeded("conn_a")
    forged = [*c.log, SyncEvent(id=999_999, connection_id=None, action="reset", data={},
                                created_at=T1)]  # fmt: skip
    raw = files.encode_table(forged)
    (out,), change = run(c, Request(ops.take_in(SYNC_LOG, forged, list(c.log), raw), "file"))
    assert out.error is not None and out.error.code == "invalid"
    assert "999999 is past the daemon's revision 1" in out.error.message
    assert out.error.path == "$[1].id" and change.empty and c.revision == 1
    (out,), _ = run(c, ops.update("conn_a", {"name": "next"}))
    assert out.events[0].id == 2 and c.log[-1].id == 2


def test_a_sync_log_edited_by_hand_keeps_the_stream_seqs_the_daemon_gave() -> None:
    """In cluster mode `stream_seq` tells which changes the files hold: one written by hand
    (past the stream, say) made the host skip the stream's next changes as held already.
    The edit's entries keep the daemon's (none where it gave none)."""
    c = seeded("conn_a", "conn_b", "conn_c")
    for e, seq in zip(c.log, (5, 6, 7), strict=True):
        e.data[STREAM_SEQ] = seq
    edited = [
        msgspec.structs.replace(c.log[1], data={**c.log[1].data, STREAM_SEQ: 10**9}),
        msgspec.structs.replace(
            c.log[2], data={k: v for k, v in c.log[2].data.items() if k != STREAM_SEQ}
        ),
    ]
    (out,), _ = run(c, Request(ops.take_in(SYNC_LOG, edited, list(c.log)), "file"))
    assert out.error is None
    assert [(e.id, e.data.get(STREAM_SEQ)) for e in c.log][:2] == [(2, 6), (3, 7)]


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda log: [log[0], *log[2:]], "entries between ids 1 and 4 were gone (id 2)"),
        (lambda log: log[:3], "its newest entries (after id 3, up to 4) were gone"),
        (
            lambda log: [*log[:2], msgspec.structs.replace(log[2], action="delete"), log[3]],
            "entry id 3 was not the event logged as 3",
        ),
    ],
)
def test_a_sync_log_edited_by_hand_may_lose_its_oldest_entries_only(edit: Any, says: str) -> None:
    """A bot resuming after an entry removed from the middle or the newest end (or changed)
    would miss it, or misread it, without a word: not taken, the file written back whole
    (refused, the file invalid, every change would wait for it: `cp backup/*.json` makes
    exactly such an edit)."""
    c = seeded("conn_a", "conn_b", "conn_c", "conn_d")
    before = list(c.log)
    (out,), change = run(c, Request(ops.take_in(SYNC_LOG, edit(before), before), "file"))
    assert out.error is None and out.result and says in out.result[0], out
    # (journalled as the history it keeps: a crash before the write replays it)
    assert not change.events and change.log == before and list(c.log) == before
    for trimmed in (before[2:], []):  # the oldest removed, or all: taken in
        (out,), _ = run(c, Request(ops.take_in(SYNC_LOG, trimmed, list(c.log)), "file"))
        assert out.error is None and not out.result
        assert c.log[-1].action == "document_update"
        assert c.log[-1].data["entries"] == len(trimmed)


def test_a_sync_log_trimmed_by_hand_counts_the_entries_still_on_their_way_to_the_file() -> None:
    """`entries` is how many the log holds after the edit: with the events the file had not
    received yet, which stay."""
    c = seeded("conn_a", "conn_b", "conn_c", "conn_d")
    log = list(c.log)
    (out,), _ = run(c, Request(ops.take_in(SYNC_LOG, log[1:3], log[:3]), "file"))
    assert out.error is None and [e.id for e in c.log] == [2, 3, 4, 5]
    assert c.log[-1].data["entries"] == 3
    # ... and as its limit leaves it (this event takes a place): the file held 3, memory
    # holds 2 more; the edit keeps 2 of the file's, so 4 before the limit
    ok(run(c, ops.set_document("settings", {"sync_log_limit": 3}))[0])
    file = list(c.log)  # (3 entries)
    ok(run(c, ops.update("conn_a", {"name": "x"}), ops.update("conn_a", {"name": "y"}))[0])
    (out,), _ = run(c, Request(ops.take_in(SYNC_LOG, file[1:], file), "file"))
    assert out.error is None and len(c.log) == 3 and c.log[-1].data["entries"] == 2


# --- If-Match ----------------------------------------------------------------------------------


def test_the_revisions_of_records_removed_go_once_their_events_leave_the_log() -> None:
    """Bots that make and remove connections all day: each id's revision was kept for good,
    the dict growing without end. A record still there keeps its exact revision."""
    c = seeded("kept")
    c.settings = msgspec.structs.replace(c.settings, sync_log_limit=5)
    for i in range(50):
        ok(run(c, ops.create(body(f"conn_{i}")))[0])
        ok(run(c, ops.delete(f"conn_{i}"))[0])
    assert len(c.log) == 5
    retained = {record_key(e.connection_id) for e in c.log if e.connection_id}  # 47's delete on
    assert set(c.record_revs) == {record_key("kept"), *retained} and len(retained) == 3
    assert c.revision_of(record_key("kept")) == 1  # (its event long trimmed: still exact)
    ok(run(c, Request(ops.update("kept", {"name": "K"}), "bus", if_match=1))[0])


def test_if_match_refuses_a_change_to_a_record_changed_after_the_given_revision() -> None:
    c = seeded("conn_a", "conn_b")  # revisions 1 and 2
    ok(run(c, ops.update("conn_a", {"name": "A3"}))[0])  # revision 3
    before = snapshot(c)
    (out,), change = run(c, Request(ops.update("conn_a", {"name": "lost"}), "bus", if_match=2))
    assert out.error is not None and out.error.code == "precondition_failed"
    assert "conn_a" in out.error.message and "3" in out.error.message
    assert change.empty and out.events == []
    assert snapshot(c)[:6] == before[:6]
    # at the record's own revision (or later) it goes through; another record's revision
    # does not matter
    ok(run(c, Request(ops.update("conn_a", {"name": "A4"}), "bus", if_match=3))[0])
    ok(run(c, Request(ops.update("conn_b", {"name": "B5"}), "bus", if_match=2))[0])
    assert (c.connections["conn_a"].name, c.connections["conn_b"].name) == ("A4", "B5")


def test_if_match_on_a_document() -> None:
    c = Committed()
    ok(run(c, ops.set_document("ui-config", {"a": 1}))[0])  # revision 1
    ok(run(c, ops.set_document("ui-config", {"a": 2}))[0])  # revision 2
    assert c.revision_of(document_key("ui-config")) == 2
    (out,), _ = run(c, Request(ops.set_document("ui-config", {"a": 3}), "bus", if_match=1))
    assert out.error is not None and out.error.code == "precondition_failed"
    assert c.documents["ui-config"] == {"a": 2}


def test_an_import_moves_the_revision_of_what_it_changed_only() -> None:
    """An import that leaves a document as it was (an export imported back) moved its
    revision all the same: an If-Match read before it failed with 412 for no change. Each
    record and document an import changes has its own event; the import's names them all."""
    c = Committed()
    ok(run(c, ops.set_document("ui-config", {"a": 1}), ops.set_document("watchlists", {"w": 1}))[0])
    read_at = c.revision
    sent = {"ui-config.json": {"a": 1}, "watchlists.json": {"w": 2}}
    ok(run(c, ops.import_data({"files": sent}, "merge"))[0])
    assert c.revision_of(document_key("ui-config")) < read_at < c.revision
    assert c.revision_of(document_key("watchlists")) > read_at
    ok(run(c, Request(ops.set_document("ui-config", {"a": 3}), "bus", if_match=read_at))[0])
    (out,), _ = run(c, Request(ops.set_document("watchlists", {"w": 3}), "bus", if_match=read_at))
    assert out.error is not None and out.error.code == "precondition_failed"
    ok(run(c, ops.reset())[0])
    assert c.revision_of(document_key("ui-config")) == c.revision  # a reset changes all


def test_if_match_never_refuses_a_record_created_under_an_id_made_for_it() -> None:
    """An If-Match older than the kept log finds every record changed at the oldest kept
    revision minus one (it cannot know better): but a connection created under an id the
    daemon made for it did not exist before, so nothing of it changed after any revision. A
    create naming its id may name one deleted after it, and is still checked."""
    c = seeded("conn_a")
    ok(run(c, ops.set_document("settings", {"sync_log_limit": 2}))[0])
    for i in range(3):
        ok(run(c, ops.update("conn_a", {"name": f"n{i}"}))[0])
    assert c.oldest_revision() > 3
    fresh = {"name": "fresh", "exchange": "bybit"}
    (made,) = ok(run(c, Request(ops.create(fresh), "bus", if_match=1))[0])
    assert made.id in c.connections
    named = {"id": "conn_named", "name": "named", "exchange": "bybit"}
    (out,), _ = run(c, Request(ops.create(named), "bus", if_match=1))
    assert out.error is not None and out.error.code == "precondition_failed"
    (out,), _ = run(c, Request(ops.update("conn_a", {"name": "x"}), "bus", if_match=1))
    assert out.error is not None and out.error.code == "precondition_failed"


def test_if_match_holds_between_two_changes_of_one_group() -> None:
    """Two clients read revision N and both send If-Match N: whichever comes second must be
    refused, also when the group commit puts both in one group (else one overwrites the
    other's change unseen — the lost update If-Match exists to prevent)."""
    c = seeded("conn_a")
    rev = c.revision
    first = Request(ops.update("conn_a", {"name": "first"}), "bus", if_match=rev)
    second = Request(ops.update("conn_a", {"name": "second"}), "bus", if_match=rev)
    (o1, o2), change = run(c, first, second)
    assert o1.error is None
    assert o2.error is not None and o2.error.code == "precondition_failed"
    assert [e.data["values"] for e in change.events] == [{"name": "first"}]
    assert c.connections["conn_a"].name == "first"
    # the same holds for a document, and a third request on another record still goes
    d = Committed()
    ok(run(d, ops.set_document("ui-config", {"a": 0}))[0])
    (o1, o2, o3), _ = run(
        d,
        Request(ops.set_document("ui-config", {"a": 1}), "bus", if_match=1),
        Request(ops.set_document("ui-config", {"a": 2}), "bus", if_match=1),
        Request(ops.set_document("watchlists", {"w": 1}), "bus", if_match=1),
    )
    assert o1.error is None and o3.error is None
    assert o2.error is not None and o2.error.code == "precondition_failed"
    assert d.documents["ui-config"] == {"a": 1}


# --- a group: each op alone --------------------------------------------------------------------


def test_a_failing_op_fails_alone_and_the_others_see_each_other() -> None:
    c = seeded("conn_a")
    before = c.connections["conn_a"]
    outcomes, change = run(
        c,
        ops.create(body("conn_n", "new")),
        ops.update("conn_missing", {"name": "x"}),
        ops.update("conn_n", {"name": "renamed"}),  # sees the create before it in the group
        ops.create(body("conn_a")),  # exists: conflict
        ops.update("conn_a", {"volume_factor": -1}),  # invalid
        ops.set_volume("conn_n", live=4),
    )
    codes = [o.error.code if o.error else None for o in outcomes]
    assert codes == [None, "not_found", None, "conflict", "invalid", None]
    assert all(o.events == [] and o.files == set() for o in outcomes if o.error)
    assert c.connections["conn_a"] == before  # the refused ops left nothing behind
    assert c.connections["conn_n"].name == "renamed"
    assert c.state["conn_n"].volume_factor_live == 4
    assert by_key(change.connections)["conn_n"].fields is None  # created in this group: whole
    assert [e.action for e in change.events] == ["create", "update", "update_volume"]


def test_an_op_refused_half_way_leaves_none_of_its_own_puts() -> None:
    """A batch whose second item is invalid: its first item must not slip into the group."""
    c = seeded("conn_a", "conn_b")
    (bad, good), change = run(
        c,
        ops.batch_update([{"id": "conn_a", "name": "half"}, {"id": "conn_b", "volume_factor": 0}]),
        ops.update("conn_b", {"name": "B"}),
    )
    assert bad.error is not None and bad.error.code == "invalid"
    assert bad.error.path is not None and bad.error.path.startswith("$.updates[1]")
    assert good.error is None
    assert c.connections["conn_a"].name == "conn_a"
    assert [rc.key for rc in change.connections] == ["conn_b"]
    assert [e.connection_id for e in change.events] == ["conn_b"]


def test_applying_a_group_changes_nothing_until_the_change_is_installed() -> None:
    c = seeded("conn_a", "conn_b")
    ok(run(c, ops.set_document("ui-config", {"a": {"b": 1}}))[0])
    before = snapshot(c)
    outcomes, _ = apply_group(
        c,
        [
            Request(ops.update("conn_a", {"name": "X"}), "bus"),
            Request(ops.delete("conn_b"), "bus"),
            Request(ops.create(body("conn_c")), "bus"),
            Request(ops.set_document("ui-config", {"a": {"b": 2}}), "bus"),
            Request(ops.set_volume("conn_a", live=9), "bus"),
            Request(ops.reset(), "bus"),
        ],
        Context(T2),
    )
    ok(outcomes)
    assert snapshot(c) == before  # the committed state is only ever changed by apply


def test_the_same_input_gives_the_same_change() -> None:
    """No clock, no randomness the caller did not ask for: the change is a function of the
    committed state, the ops and the context."""

    def once() -> bytes:
        c = seeded("conn_a", "conn_b")
        _, change = apply_group(
            c,
            [
                Request(ops.update("conn_a", {"name": "X"}), "bus"),
                Request(ops.set_volume("conn_b", preset=2), "http"),
                Request(ops.set_document("watchlists", {"w": [1, 2]}), "cli"),
            ],
            Context(T3),
        )
        return msgspec.json.encode(change)

    assert once() == once()


def test_a_file_invalid_on_disk_refuses_the_changes_that_would_write_it() -> None:
    c = seeded("conn_a")
    invalid = {CONNECTIONS: f"{CONNECTIONS}:3:1: expected ','"}
    (upd, vol), change = run(
        c, ops.update("conn_a", {"name": "x"}), ops.set_volume("conn_a", live=2), invalid=invalid
    )
    assert upd.error is not None and upd.error.code == "file_invalid"
    assert upd.error.extra == {"file": CONNECTIONS}
    assert "(connections.json:3:1: expected ',')" in upd.error.message  # says why
    assert vol.error is None  # the state file and the sync log are fine
    assert change.connections == [] and c.connections["conn_a"].name == "conn_a"


# --- documents and settings -------------------------------------------------------------------


def test_a_document_journals_the_top_level_keys_that_changed() -> None:
    c = Committed()
    (out,), change = run(c, ops.set_document("ui-config", {"a": 1, "b": {"c": 2}}), now=T1)
    assert out.error is None
    (rc,) = change.documents
    assert (rc.key, rc.fields) == ("ui-config", None)  # new: whole
    assert change.files() == {"ui-config.json", SYNC_LOG}
    _, change = run(c, ops.set_document("ui-config", {"a": 1, "b": {"c": 3}, "d": None}))
    (rc,) = change.documents
    assert rc.fields == ["b", "d"]  # a key set to null is a change too
    (event,) = change.events
    assert (event.action, event.connection_id) == ("document_update", None)
    assert event.data["keys"] == ["b", "d"] and event.data["file"] == "ui-config.json"
    assert c.revision_of(document_key("ui-config")) == event.id
    # the same content again: no change at all
    _, change = run(c, ops.set_document("ui-config", {"a": 1, "b": {"c": 3}, "d": None}))
    assert change.empty


def test_an_invalid_document_is_refused_with_the_field_named() -> None:
    c = Committed()
    (out,), change = run(c, ops.set_document("settings", {"sync_log_limit": "many"}))
    assert out.error is not None and out.error.code == "invalid"
    assert out.error.path == "$.content.sync_log_limit"
    (out,), _ = run(c, ops.set_document("no-such-doc", {}))
    assert out.error is not None and out.error.code == "not_found"
    assert change.empty and c.documents == {}


def test_settings_take_effect_with_the_change_that_sets_them() -> None:
    c = seeded("conn_a")
    for i in range(5):
        ok(run(c, ops.update("conn_a", {"name": f"n{i}"}))[0])  # revisions 2..6
    ok(run(c, ops.set_document("settings", {"sync_log_limit": 3}))[0])  # revision 7
    assert c.settings.sync_log_limit == 3
    assert [e.id for e in c.log] == [5, 6, 7]
    assert c.oldest_revision() == 5
    # a record whose last event was trimmed changed at the latest just before the oldest kept
    assert c.revision_of(document_key("watchlists")) == 4
    # and the events from before stay readable by id
    assert [e.id for e in c.events_since(5)] == [6, 7]


def test_the_sync_log_keeps_its_newest_events_within_its_byte_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """However large `sync_log_limit` is, the log (so its file) holds no more than
    LOG_MAX_BYTES of events: a file past the read limit would be invalid at the next start.
    The same on every replay of the same changes (hosts of a cluster agree on the log)."""
    monkeypatch.setattr(core, "LOG_MAX_BYTES", 4000)
    c = seeded("conn_a")
    ok(run(c, ops.set_document("settings", {"sync_log_limit": 1_000_000}))[0])
    for i in range(60):
        ok(run(c, ops.update("conn_a", {"name": f"name-{i}-" + "x" * 100}))[0])
    assert 0 < c.log_bytes <= 4000 and c.log_bytes == sum(core.event_bytes(e) for e in c.log)
    assert c.log[-1].id == c.revision and len(c.log) < 60
    again = Committed()
    again.load_log(list(c.log))
    assert again.log_bytes == c.log_bytes
    # One event larger than the bound is still kept: the newest always is.
    ok(run(c, ops.update("conn_a", {"name": "y" * 200, "connection_settings": "{}"}))[0])
    big = {"connection_settings": msgspec.json.encode({"k": "z" * 5000}).decode()}
    ok(run(c, ops.update("conn_a", big))[0])
    assert [e.id for e in c.log] == [c.revision]


def test_a_change_that_would_make_a_file_too_large_is_refused_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """connections.json and a document stay within CONTENT_MAX_BYTES (the file must be
    readable at the next start): the request that would pass it is refused `too_large`, the
    others of its group land, and the count kept across changes is the table's."""
    monkeypatch.setattr(core, "CONTENT_MAX_BYTES", 7000)
    c = seeded("conn_a", "conn_b")
    pad = "p" * 1500
    outs, _ = run(
        c,
        ops.update("conn_a", {"connection_settings": f'{{"a": "{pad}"}}'}),
        ops.update("conn_b", {"connection_settings": f'{{"b": "{pad}"}}'}),
        ops.create(body("conn_c", connection_settings=f'{{"c": "{pad}"}}')),
        ops.create(body("conn_d", connection_settings=f'{{"d": "{pad}"}}')),
        ops.update("conn_a", {"name": "small again"}),
    )
    assert [o.error.code if o.error else None for o in outs] == [
        None, None, None, "too_large", None
    ]  # fmt: skip
    assert "connections.json" in outs[3].error.message and "conn_d" not in c.connections
    assert c.connections_bytes() == sum(len(msgspec.json.encode(v)) for v in c.connections.values())
    # Deleting makes room again; the kept count follows the delete.
    ok(run(c, ops.delete("conn_c"))[0])
    ok(run(c, ops.create(body("conn_d", connection_settings=f'{{"d": "{pad}"}}')))[0])
    assert c.connections_bytes() == sum(len(msgspec.json.encode(v)) for v in c.connections.values())
    # A document: the same limit on its own file.
    (out,), _ = run(c, ops.set_document("ui-config", {"k": "v" * 7000}))
    assert out.error is not None and out.error.code == "too_large"
    assert "ui-config.json" in out.error.message
    # A hand edit is taken in whatever its size: the file was read.
    settings = msgspec.json.encode({"q": "q" * files.MAX_SETTINGS_CHARS}).decode()
    big = Connection(id="conn_x", name="x", exchange="bybit", connection_settings=settings)
    hand = [*c.connections.values(), big]
    (out,), _ = run(c, Request(ops.take_in(CONNECTIONS, hand, dict(c.connections)), "file"))
    assert out.error is None and "conn_x" in c.connections
    # Past the bound now: what makes it smaller is taken, what makes it larger is not.
    (out,), _ = run(c, ops.update("conn_a", {"name": "a" * 150}))
    assert out.error is not None and out.error.code == "too_large"
    ok(run(c, ops.update("conn_a", {"name": "a"}))[0])
    ok(run(c, ops.delete("conn_x"))[0])


def test_a_connection_added_by_hand_is_logged_as_a_whole_record_as_one_made_by_a_command() -> None:
    """A create's `values` are the new record, `updated_at` with `created_at` (an update's
    leaves it out: it is the event's own time)."""
    c = seeded("conn_a")
    (made,), _ = run(c, ops.create({"id": "conn_b", "name": "b", "exchange": "okx"}))
    hand = [*c.connections.values(), Connection(id="conn_c", name="c", exchange="okx")]
    (out,), _ = run(c, Request(ops.take_in(CONNECTIONS, hand, dict(c.connections)), "file"))
    by_command, by_hand = made.events[0].data, out.events[0].data
    assert by_hand["fields"] == by_command["fields"] and "updated_at" in by_hand["fields"]
    assert by_hand["values"].keys() == by_command["values"].keys()
    assert by_hand["values"]["updated_at"] == c.connections["conn_c"].updated_at


def test_a_document_written_larger_than_the_read_limit_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Small as compact JSON, huge indented: values 60 levels down are written with 120
    spaces each."""
    monkeypatch.setattr(core, "MAX_FILE_BYTES", 10_000)
    c = seeded()
    deep: Any = [0] * 100
    for _ in range(60):
        deep = [deep]
    (out,), _ = run(c, ops.set_document("ui-config", {"deep": deep}))
    assert out.error is not None and out.error.code == "too_large", out.error
    assert "as written (indented)" in out.error.message
    ok(run(c, ops.set_document("ui-config", {"flat": [0] * 100}))[0])
    # Smaller than the document before it as compact JSON, but larger as written: refused.
    ok(run(c, ops.set_document("ui-config", {"flat": "f" * 3000}))[0])
    (out,), _ = run(c, ops.set_document("ui-config", {"deep": deep}))
    assert out.error is not None and out.error.code == "too_large", out.error


@pytest.mark.parametrize("settings", ['{"x": NaN}', '{"x": Infinity}', '{"x": 1e999}'])
def test_connection_settings_the_readers_cannot_decode_are_refused_at_the_door(
    settings: str,
) -> None:
    """Taken by json.loads, refused by what reads it back (masking showed the whole field as
    ********, and the record read back was refused). A file holding one still loads."""
    c = seeded("conn_a")
    for op in (ops.create(body("conn_b", connection_settings=settings)),
               ops.update("conn_a", {"connection_settings": settings})):  # fmt: skip
        (out,), _ = run(c, op)
        assert out.error is not None and out.error.code == "invalid", out.error
        assert out.error.path.endswith(".connection_settings")
    rows = [{"id": "a", "name": "a", "exchange": "x", "connection_settings": settings}]
    loaded = files.decode_file(CONNECTIONS, msgspec.json.encode(rows))
    assert loaded[0].connection_settings == settings
    # Such a record, loaded, is never trapped: other changes to it, the record sent back as
    # shown (the value shows as the mask), an import of an export of it.
    c.connections["a"] = loaded[0]
    ok(run(c, ops.update("a", {"is_enabled": False}))[0])
    shown = mask_record(c.connections["a"])
    assert shown["connection_settings"] == MASK
    ok(run(c, ops.update("a", {k: v for k, v in shown.items() if k != "updated_at"}))[0])
    assert c.connections["a"].connection_settings == settings
    ok(run(c, ops.import_data({"files": {CONNECTIONS: [shown]}}, "merge"))[0])
    assert c.connections["a"].connection_settings == settings
    # By hand: brought in, refused as by the other doors (the file stays invalid); kept
    # where the record held it already and another field changed.
    fresh = Connection(id="conn_h", name="h", exchange="x", connection_settings=settings)
    hand = [*c.connections.values(), fresh]
    (out,), _ = run(c, Request(ops.take_in(CONNECTIONS, hand, dict(c.connections)), "file"))
    assert out.error is not None and out.error.path == "$[2].connection_settings", out.error
    hand = [*(r if r.id != "a" else msgspec.structs.replace(r, name="b") for r in hand[:2])]
    ok(run(c, Request(ops.take_in(CONNECTIONS, hand, dict(c.connections)), "file"))[0])
    assert c.connections["a"].name == "b"


def test_answers_stay_as_small_as_their_requests_allow() -> None:
    """Every answer and event about a connection holds its settings, and a batch is answered
    with each record it names: settings over 64 KiB, or a record named twice in a batch, are
    refused (a 100-byte request answered with megabytes)."""
    c = seeded("conn_a")
    big = msgspec.json.encode({"k": "v" * files.MAX_SETTINGS_CHARS}).decode()
    (out,), _ = run(c, ops.update("conn_a", {"connection_settings": big}))
    assert out.error is not None and "the limit is 65536" in out.error.message
    (out,), _ = run(c, ops.batch_update([{"id": "conn_a", "name": "x"}] * 3))
    assert out.error is not None and out.error.path == "$.updates[1]"
    assert "twice in one batch" in out.error.message
    (out,), _ = run(c, ops.batch_update([{"id": {"x": 1}}, {"id": ["a"]}]))  # never a crash
    assert out.error is not None and out.error.code in ("invalid", "not_found")


def test_an_empty_batch_changes_nothing_and_is_answered_empty() -> None:
    """A frontend's "save all" with nothing edited sends []: it was refused as invalid."""
    c = seeded("conn_a")
    (out,), change = run(c, ops.batch_update([]))
    assert out.error is None and out.result == []
    assert not change.events
    (out,), _ = run(c, ops.batch_update({"id": "conn_a"}))
    assert out.error is not None and out.error.message == "updates must be an array"


def test_an_import_takes_algorithms_before_the_instances_that_name_them() -> None:
    c = seeded()
    inst = {"instances": [{"id": "i1", "name": "x", "symbol": "ES", "algorithmName": "trend"}]}
    files_sent = {"instances.json": inst, "algorithms/trend.json": {"name": "trend"}}
    (out,), _ = run(c, ops.import_data({"files": files_sent}, "merge"))
    assert out.error is None, out.error
    assert c.documents["instances"]["instances"][0]["algorithmName"] == "trend"


@pytest.mark.parametrize("mode", ["merge", "replace"])
def test_an_import_sorted_by_name_keeps_the_state_of_the_connections_it_creates(
    mode: str,
) -> None:
    """`jq -S` (or sort_keys) puts connection-state.json before connections.json: the state
    of a connection the import creates was dropped, its volumes and test results lost."""
    c = seeded()
    conn = body("conn_x", id="conn_x")
    state = {"connection_id": "conn_x", "volume_factor_live": 2.5, "volume_factor_preset": 3.0}
    sent = {"connection-state.json": [state], "connections.json": [conn]}
    assert list(sent) == sorted(sent)
    (out,), _ = run(c, ops.import_data({"files": sent}, mode))
    assert out.error is None, out.error
    got = c.state["conn_x"]
    assert (got.volume_factor_live, got.volume_factor_preset) == (2.5, 3.0)


def test_a_merge_import_lays_a_partial_record_over_the_stored_one() -> None:
    """A merge import of `{"id", "name"}` replaced the whole record: `created_at` became
    now, `is_active` false, a state record lost its test results. Now what it leaves out
    keeps its stored value, as in an update; replace mode still replaces."""
    c = seeded("m1")
    ok(run(c, ops.set_active("m1", True), ops.update("m1", {"api_key": "k" * 16}))[0])
    ok(run(c, ops.record_test("m1", probe_result(True, T1)))[0])
    created = c.connections["m1"].created_at
    sent = {
        CONNECTIONS: [{"id": "m1", "name": "M3", "exchange": "bybit"}],
        STATE: [{"connection_id": "m1", "volume_factor_live": 2.0}],
    }
    (out,), change = run(c, ops.import_data({"files": sent}, "merge"), now=T2)
    assert out.error is None, out.error
    conn, state = c.connections["m1"], c.state["m1"]
    assert (conn.name, conn.created_at, conn.is_active, conn.api_key) == (
        "M3",
        created,
        True,
        "k" * 16,
    )
    assert state.volume_factor_live == 2.0 and state.test_results
    fields = [(e.data["file"], e.data["fields"]) for e in change.events if e.action == "update"]
    assert fields == [(CONNECTIONS, ["name"]), (STATE, ["volume_factor_live"])], fields
    (out,), _ = run(c, ops.import_data({"files": sent}, "replace"), now=T2)
    assert out.error is None and not c.connections["m1"].is_active


@pytest.mark.parametrize("mode", ["merge", "replace"])
def test_an_import_of_masked_secrets_where_none_is_stored_unsets_and_names_them(
    mode: str,
) -> None:
    """An export moved to a daemon that has none of its secrets: they come in unset (never
    as the placeholder), a masked URL password as the URL without it, each named."""
    settings = json.dumps({"proxy": f"http://u:{MASK}@proxy:8080", "token": MASK})
    rows = [{**body("conn_x", api_key="…abcd", connection_settings=settings)}]
    c = Committed()
    (out,), _ = run(c, ops.import_data({"files": {CONNECTIONS: rows}}, mode))
    assert out.error is None, out.error
    assert sorted(out.result["secrets_unset"]) == [
        "$.data.files.connections.json[0].api_key",
        "$.data.files.connections.json[0].connection_settings.proxy",
        "$.data.files.connections.json[0].connection_settings.token",
    ]
    stored = c.connections["conn_x"]
    assert stored.api_key is None
    assert json.loads(stored.connection_settings or "") == {
        "proxy": "http://u@proxy:8080",
        "token": None,
    }


def test_an_import_error_names_the_place_in_what_was_sent() -> None:
    """The bare form ({FILE: CONTENT}) was reported at `$.data.files.FILE`, a place not in
    it; an export's fields without `files` were taken for file names."""
    c = seeded()
    (out,), _ = run(c, ops.import_data({"nope.json": {}}, "merge"))
    assert out.error is not None and out.error.path == "$.data.nope.json", out.error.path
    (out,), _ = run(c, ops.import_data({"version": 1}, "merge"))
    assert out.error is not None and out.error.path == "$.data.files", out.error.path
    (out,), _ = run(c, ops.import_data({"files": {"nope.json": {}}}, "merge"))
    assert out.error is not None and out.error.path == "$.data.files.nope.json"
    for key, value in (("revision", {}), ("version", "1"), ("exported_at", 5), ("revision", True)):
        (out,), _ = run(c, ops.import_data({"files": {}, key: value}, "merge"))
        assert out.error is not None and out.error.path == f"$.data.{key}", (key, out.error)
    # A state record for no connection: where it was sent, not where a merge put it.
    c = seeded("conn_a", "conn_b")
    for mode in ("merge", "replace"):
        sent = {STATE: [{"connection_id": "conn_a"}, {"connection_id": "conn_z"}]}
        (out,), _ = run(c, ops.import_data({"files": sent}, mode))
        assert out.error is not None and "'conn_z' names no connection" in out.error.message
        assert out.error.path == f"$.data.files.{STATE}[1].connection_id", (mode, out.error)


def test_a_state_record_for_no_connection_waits_while_connections_json_is_invalid() -> None:
    """connections.json invalid (its new connection half typed) and its state record saved
    meanwhile: the record was taken and broadcast for a connection no bot knew, before the
    connection's own `create`. Now the state edit waits (re-judged once the fix is in);
    records of known connections are still kept as the file says."""
    c = seeded("conn_a")
    base = dict(c.state)
    hand = [
        msgspec.structs.replace(base["conn_a"], volume_factor_live=2.0),
        msgspec.convert({"connection_id": "conn_n", "volume_factor_live": 3.0}, ConnectionState),
    ]
    broken = {CONNECTIONS: "connections.json:3:5: trailing comma"}
    (out,), change = run(c, Request(ops.take_in(STATE, hand, base), "file"), invalid=broken)
    assert out.error is not None and out.error.path == "$[1].connection_id"
    assert "'conn_n' names no connection" in out.error.message
    assert "judged again once it is fixed" in out.error.message
    assert change.empty and list(c.state) == ["conn_a"]
    (out,), _ = run(c, Request(ops.take_in(STATE, hand[:1], base), "file"), invalid=broken)
    assert out.error is None and c.state["conn_a"].volume_factor_live == 2.0


def test_a_live_connections_status_set_by_hand_is_put_back() -> None:
    """`status` of an active, enabled connection is the sweep's (its heartbeats): one set by
    hand was taken and broadcast, then undone by the next heartbeat or sweep."""
    c = Committed()
    ok(run(c, ops.create(body("conn_a", is_active=True, is_enabled=True)), now=T0)[0])
    assert c.state["conn_a"].status == "active"
    for was, typed in (("active", "stale"), ("stale", "active"), ("stale", "inactive")):
        if c.state["conn_a"].status != was:
            ok(run(c, ops.set_status({"conn_a": (was, None)}))[0])
        base = dict(c.state)
        hand = [msgspec.structs.replace(base["conn_a"], status=typed, volume_factor_live=2.5)]
        (out,), change = run(c, Request(ops.take_in(STATE, hand, base), "file"))
        assert out.error is None
        assert c.state["conn_a"].status == was, (was, typed)
        assert c.state["conn_a"].volume_factor_live == 2.5  # the rest of the edit is kept
        assert all("status" not in e.data.get("fields", []) for e in change.events)
        ok(run(c, ops.set_volume("conn_a", live=1.0))[0])
    # Only what is put back edited (`is_active`, `status`): no change, no event (it was an
    # update of `updated_at`, the put-back's own stamp).
    base = dict(c.state)
    hand = [msgspec.structs.replace(base["conn_a"], is_active=False, status="inactive")]
    (out,), change = run(c, Request(ops.take_in(STATE, hand, base), "file"), now=T4)
    assert out.error is None and change.events == [] and c.state["conn_a"] == base["conn_a"]


def test_an_instance_naming_an_algorithm_file_invalid_on_disk_says_so() -> None:
    """`algorithms/Beta.json` is there (`ls` shows it) but invalid: the refusal said it
    names no file."""
    c = seeded()
    doc = {"instances": [{"id": "i1", "name": "n", "symbol": "NQ", "algorithmName": "Beta"}]}
    broken = {"algorithms/Beta.json": "algorithms/Beta.json:1:2: invalid JSON"}
    (out,), _ = run(c, ops.set_document("instances", doc), invalid=broken)
    assert out.error is not None and out.error.path == "$.content.instances[0].algorithmName"
    assert "names algorithms/Beta.json, which is invalid on disk" in out.error.message
    (out,), _ = run(c, ops.set_document("instances", doc))
    assert out.error is not None and "names no file in algorithms/" in out.error.message


def test_connection_settings_with_nan_says_so_where() -> None:
    """Said as "JSON is malformed: invalid character (byte 13)" before."""
    c = seeded("conn_a")
    (out,), _ = run(c, ops.update("conn_a", {"connection_settings": '{"fee": NaN}'}))
    assert out.error is not None and out.error.path == "$.changes.connection_settings"
    assert "NaN is not a JSON value" in out.error.message
    assert "(character 9 of its text)" in out.error.message


def test_an_id_past_what_clients_hold_exactly_is_refused_at_the_doors() -> None:
    """2**70 as user_id was taken from a hand edit and broadcast (past int64, past
    JavaScript's exact numbers). Refused where it comes in; a value an earlier version
    stored (in a file, in the journal) still loads and never blocks its record."""
    huge = 2**70
    c = seeded("conn_a")
    (out,), _ = run(c, ops.update("conn_a", {"user_id": huge}))
    assert out.error is not None and out.error.path == "$.changes.user_id", out.error
    (out,), _ = run(c, ops.create(body("conn_b", exchange_id=-huge)))
    assert out.error is not None and out.error.path == "$.connection.exchange_id", out.error
    base = dict(c.connections)
    hand = [msgspec.structs.replace(base["conn_a"], user_id=huge)]
    (out,), _ = run(c, Request(ops.take_in(CONNECTIONS, hand, base), "file"))
    assert out.error is not None and out.error.path == "$[0].user_id", out.error
    # as an earlier version stored it: loaded as it is, and other changes of it go through
    c.connections["conn_a"] = hand[0]
    ok(run(c, ops.update("conn_a", {"name": "still"}))[0])
    assert c.connections["conn_a"].user_id == huge


@pytest.mark.parametrize("sent_id", [None, ""])
def test_a_create_with_an_empty_id_gets_one_made(sent_id: str | None) -> None:
    c = seeded()
    (conn,) = ok(run(c, ops.create(body("x", id=sent_id)))[0])
    assert conn.id and conn.id in c.connections


def test_a_client_replacing_settings_keeps_the_daemons_own_keys_it_leaves_out() -> None:
    """A frontend saving `{"defaultLeverage": 20}` wiped `server` (its auth: the frontend
    was locked out at once; its port: moved at the next start)."""
    c = seeded()
    own = {"server": {"auth": "loopback", "port": 3600}, "stale_after_s": 60}
    ok(run(c, ops.set_document("settings", {**own, "defaultLeverage": 10}))[0])
    (doc,) = ok(run(c, ops.set_document("settings", {"defaultLeverage": 20}))[0])
    assert doc == {**own, "defaultLeverage": 20}
    # sent, they are replaced: `{}` is the defaults
    (doc,) = ok(run(c, ops.set_document("settings", {"server": {}, "stale_after_s": 60}))[0])
    assert doc == {"server": {}, "stale_after_s": 60}
    # an import (replace) keeps them as well
    ok(run(c, ops.set_document("settings", own))[0])
    sent = {"files": {"settings.json": {"defaultLeverage": 5}}}
    ok(run(c, ops.import_data(sent, "replace"))[0])
    assert c.documents["settings"] == {**own, "defaultLeverage": 5}


def test_instances_saved_by_a_client_are_stamped_when_they_change() -> None:
    """`instances.json` is `{"instances": [...], "lastSaved": ts}`: a client's save (seed 003
    sends none) left the file without `lastSaved`."""
    c = seeded()
    algo = {"name": "trend"}
    ok(run(c, ops.set_document("algorithms/trend", algo))[0])
    inst = {"instances": [{"id": "i1", "name": "x", "symbol": "ES", "algorithmName": "trend"}]}
    (doc,) = ok(run(c, ops.set_document("instances", inst), now=T1)[0])
    assert doc == {**inst, "lastSaved": T1}
    # the same instances again: no change, no event
    (doc,), change = run(c, ops.set_document("instances", {**inst, "lastSaved": None}), now=T2)
    assert doc.result == {**inst, "lastSaved": T1} and not change.events
    moved = {"instances": [{**inst["instances"][0], "symbol": "NQ"}]}
    (doc,) = ok(run(c, ops.set_document("instances", moved), now=T2)[0])
    assert doc["lastSaved"] == T2
    # one the client sends is kept (seed 003's app stamps its own)
    (doc,) = ok(run(c, ops.set_document("instances", {**inst, "lastSaved": T1}), now=T2)[0])
    assert doc["lastSaved"] == T1


def test_a_document_of_thousands_of_keys_makes_a_small_event() -> None:
    """Every changed key was named: 9,000 keys made an 80 KB sync-log entry, the log (which
    every change rewrites) tens of MiB."""
    c = seeded()
    _, change = run(c, ops.set_document("ui-config", {f"k{j}": j for j in range(9000)}))
    (event,) = change.events
    assert event.data["keys"] == sorted(f"k{j}" for j in range(9000))[: ops.KEYS_SHOWN]
    assert event.data["keys_truncated"] is True and event.data["keys_count"] == 9000
    long_keys = {"x" * 3000: 1, "y" * 3000: 2}
    _, change = run(c, ops.set_document("watchlists", long_keys))
    assert change.events[0].data["keys"] == ["x" * 3000]
    assert change.events[0].data["keys_count"] == 2
    _, change = run(c, ops.set_document("watchlists", {**long_keys, "a": 1}))
    assert change.events[0].data["keys"] == ["a"]
    assert "keys_truncated" not in change.events[0].data


def test_a_restore_drops_state_records_of_no_connection_and_names_them() -> None:
    """A stopped daemon's file may hold one its start dropped, and its backup takes it: a
    restore through the running daemon was refused for it (review)."""
    c = seeded("conn_a")
    conns = [msgspec.to_builtins(c.connections["conn_a"])]
    states = [msgspec.to_builtins(c.state["conn_a"]), {"connection_id": "ghost"}]
    content = {"connections.json": conns, "connection-state.json": states}
    (out,), _ = run(c, ops.restore(content, 7))
    assert out.error is None, out.error
    assert out.result["state_dropped"] == ["ghost"] and set(c.state) == {"conn_a"}


def test_reset_writes_every_file_even_unchanged_and_keeps_history() -> None:
    c = seeded("conn_a")
    (out,), change = run(c, ops.reset(), now=T2)
    assert out.error is None
    assert {CONNECTIONS, STATE, *(f for f, _ in files.DOCUMENTS.values())} <= set(change.touched)
    assert change.files() >= set(change.touched) | {SYNC_LOG}
    assert c.connections == {} and c.state == {}
    assert c.documents["connection"] == files.default_document("connection")
    assert [e.action for e in c.log] == ["create", "reset"]  # history stays


# --- the journalled form of a change ----------------------------------------------------------


def test_a_change_through_the_journal_encoding_installs_the_same_state() -> None:
    """What a replay installs (the change as decoded from the journal) is what the live
    daemon installed: records as typed structs, documents, order, events, settings."""
    live = seeded("conn_a", "conn_b", "conn_c")
    replay = seeded("conn_a", "conn_b", "conn_c")
    replay.connections = {k: v for k, v in live.connections.items()}  # the same starting point
    hand = [live.connections[k] for k in ("conn_c", "conn_a", "conn_b")]  # reordered by hand
    hand[1] = msgspec.structs.replace(hand[1], margin_type="isolated")
    base = dict(live.connections)
    groups = [
        [ops.update("conn_a", {"name": "A"}), ops.set_volume("conn_b", live=3)],
        [Request(ops.take_in(CONNECTIONS, hand, base), "file")],
        [ops.set_document("settings", {"sync_log_limit": 5, "extra": {"k": [1]}})],
        [ops.delete("conn_c"), ops.create(body("conn_d"))],
    ]
    for group in groups:
        _, change = run(live, *group)
        decoded = msgspec.json.decode(msgspec.json.encode(change), type=Change)
        replay.apply(decoded)
    assert list(replay.connections.items()) == list(live.connections.items())
    assert list(replay.state.items()) == list(live.state.items())
    assert replay.documents == live.documents and replay.settings == live.settings
    assert list(replay.log) == list(live.log) and replay.revision == live.revision
    assert all(type(v) is Connection for v in replay.connections.values())
    assert all(type(v) is ConnectionState for v in replay.state.values())


def test_a_change_applied_on_a_record_that_moved_sets_only_its_own_fields() -> None:
    """Replayed onto a record a hand edit changed meanwhile (or another host's change): the
    fields the change did not set keep the newer values."""
    c = seeded("conn_a")
    _, change = run(c, ops.update("conn_a", {"name": "bus"}), now=T2)
    moved = Committed()
    moved.connections = {
        "conn_a": msgspec.structs.replace(c.connections["conn_a"], name="old", margin_type="hand")
    }
    moved.state = {"conn_a": msgspec.structs.replace(c.state["conn_a"], volume_factor_live=7.0)}
    moved.apply(msgspec.json.decode(msgspec.json.encode(change), type=Change))
    conn, st = moved.connections["conn_a"], moved.state["conn_a"]
    assert (conn.name, conn.margin_type, conn.updated_at) == ("bus", "hand", T2)
    assert (st.volume_factor_live, st.last_sync_at) == (7.0, T2)


def test_change_files_names_every_file_a_change_writes() -> None:
    assert Change().files() == set() and Change().empty
    assert Change(order=["a"]).files() == {CONNECTIONS}
    assert Change(log=[]).files() == {SYNC_LOG}
    assert Change(touched=["watchlists.json"]).files() == {"watchlists.json"}
    assert Change(documents=[RecordChange("algorithms/x", None)]).files() == {"algorithms/x.json"}
    assert Change(state=[RecordChange("a")]).files() == {STATE}
    assert not Change(order=[]).empty and not Change(log=[]).empty


# --- three-way merges of hand edits -----------------------------------------------------------


def conn(cid: str, **kw: Any) -> Connection:
    return Connection(id=cid, name=cid, exchange="bybit", created_at=T0, updated_at=T0, **kw)


def test_merge_table_the_hand_edit_goes_on_top_of_pending_changes() -> None:
    base = {k: conn(k) for k in ("a", "b", "c", "d", "e")}
    memory = dict(base)
    memory["a"] = msgspec.structs.replace(base["a"], name="pending")  # not in the file yet
    memory["b"] = msgspec.structs.replace(base["b"], volume_factor=2.0)
    memory["d"] = msgspec.structs.replace(base["d"], name="pending-d")
    memory["new"] = conn("new")  # created by a change the file has not seen
    hand = {
        "a": msgspec.structs.replace(base["a"], margin_type="isolated"),  # another field
        "b": msgspec.structs.replace(base["b"], volume_factor=3.0),  # the same field
        # "c" deleted by hand (unchanged in memory); "d" deleted by hand (changed in memory)
        "e": base["e"],
        "typed": conn("typed"),  # added by hand
    }
    merged = merge_table(base, hand, memory)
    out = merged.records
    assert (out["a"].name, out["a"].margin_type) == ("pending", "isolated")  # nothing lost
    assert out["b"].volume_factor == 3.0  # both touched it: the hand edit wins ...
    assert ("b", ["volume_factor"]) in merged.conflicts  # ... and it is said
    assert "c" not in out and "d" not in out  # a deletion by hand is a deletion
    assert ("d", ["(deleted by hand)"]) in merged.conflicts
    assert out["e"] is memory["e"] and out["typed"] == hand["typed"]
    assert out["new"] is memory["new"]
    assert list(out) == ["a", "b", "e", "typed", "new"]  # the hand edit's order first
    assert {k for k, _ in merged.conflicts} == {"b", "d"}


def test_merge_table_with_nothing_pending_is_the_hand_edit() -> None:
    base = {k: conn(k) for k in ("a", "b")}
    hand = {"b": msgspec.structs.replace(base["b"], name="B"), "a": base["a"]}
    merged = merge_table(base, hand, base)
    assert merged.records == hand and list(merged.records) == ["b", "a"]
    assert merged.conflicts == []


def test_merge_table_a_record_added_by_both_goes_to_the_hand_edit_and_is_said() -> None:
    merged = merge_table({}, {"x": conn("x", margin_type="hand")}, {"x": conn("x")})
    assert merged.records["x"].margin_type == "hand"
    assert merged.conflicts == [("x", ["margin_type"])]


def test_merge_document_per_top_level_key() -> None:
    base = {"a": 1, "b": 1, "c": 1, "gone": 1}
    memory = {"a": 2, "b": 2, "c": 1, "gone": 1, "added": True}  # pending: a, b, added
    hand = {"a": 1, "b": 9, "c": 5}  # hand: b, c, and deleted "gone"
    merged = merge_document(base, hand, memory)
    assert merged.records == {"a": 2, "b": 9, "c": 5, "added": True}
    assert merged.conflicts == [("", ["b"])]
    # memory deleting a key the hand edit did not touch: deleted
    merged = merge_document({"k": 1, "x": 1}, {"k": 1, "x": 2}, {"x": 1})
    assert merged.records == {"x": 2}
    # nothing pending: exactly the hand edit
    assert merge_document(base, hand, dict(base)).records == hand


def test_take_in_merges_a_hand_save_over_changes_still_on_their_way() -> None:
    c = seeded("conn_a", "conn_b")
    file_base = dict(c.connections)  # what the file holds: the changes below are not in it
    ok(run(c, ops.update("conn_a", {"name": "pending-a"}), ops.update("conn_b", {"name": "pb"}))[0])
    ok(run(c, ops.set_volume("conn_a", live=5))[0])
    hand = [
        msgspec.structs.replace(file_base["conn_a"], margin_type="isolated"),
        msgspec.structs.replace(file_base["conn_b"], name="typed-b"),
    ]
    (out,), change = run(c, Request(ops.take_in(CONNECTIONS, hand, file_base), "file"), now=T3)
    assert out.error is None
    assert out.result == [("conn_b", ["name"])]  # the field both changed, for the log
    a, b = c.connections["conn_a"], c.connections["conn_b"]
    assert (a.name, a.margin_type) == ("pending-a", "isolated")  # nothing acknowledged lost
    assert b.name == "typed-b"  # nothing the user typed lost
    assert c.state["conn_a"].volume_factor_live == 5  # the other file's pending change stays
    assert {e.data["source"] for e in change.events} == {"file"}
    fields = {e.connection_id: e.data["fields"] for e in change.events}
    assert fields == {"conn_a": ["margin_type"], "conn_b": ["name"]}
    assert all(st.value.last_sync_at == T3 for st in change.state)
    # what the file says is kept as typed: the hand edit left `updated_at` as it was
    assert by_key(change.connections)["conn_a"].fields == ["margin_type"]


def test_take_in_is_never_refused_for_a_file_invalid_on_disk() -> None:
    """Taking in the very file that was invalid is how it becomes valid again."""
    c = seeded("conn_a")
    hand = [msgspec.structs.replace(c.connections["conn_a"], name="fixed")]
    (out,), _ = run(
        c,
        Request(ops.take_in(CONNECTIONS, hand, dict(c.connections)), "file"),
        invalid=frozenset({CONNECTIONS, STATE}),
    )
    assert out.error is None and c.connections["conn_a"].name == "fixed"


def test_take_in_of_a_document_keeps_pending_keys() -> None:
    c = Committed()
    ok(run(c, ops.set_document("watchlists", {"a": 1, "b": 1}))[0])
    base = dict(c.documents["watchlists"])
    ok(run(c, ops.set_document("watchlists", {"a": 2, "b": 1}))[0])  # pending: a
    (out,), change = run(
        c, Request(ops.take_in("watchlists.json", {"a": 1, "b": 7, "c": 0}, base), "file")
    )
    assert out.error is None and out.result == []
    assert c.documents["watchlists"] == {"a": 2, "b": 7, "c": 0}
    (rc,) = change.documents
    assert rc.fields == ["b", "c"]


def test_take_in_of_the_unchanged_file_is_no_change() -> None:
    c = seeded("conn_a")
    hand = list(c.connections.values())
    (out,), change = run(c, Request(ops.take_in(CONNECTIONS, hand, dict(c.connections)), "file"))
    assert out.error is None and change.empty


# --- replaying hand edits -------------------------------------------------------------------


def test_records_a_hand_edit_set_in_its_own_file_are_marked_for_the_replay() -> None:
    c = seeded("conn_a", "conn_b", "conn_c")
    base = dict(c.connections)
    hand = [
        msgspec.structs.replace(base["conn_a"], margin_type="isolated", is_active=True),
        base["conn_b"],
    ]  # conn_c deleted by hand
    _, change = run(
        c,
        Request(ops.take_in(CONNECTIONS, hand, base), "file"),
        Request(ops.set_document("ui-config", {"k": 1}), "bus"),
    )
    marks = {rc.key: rc.hand for rc in change.connections}
    assert marks == {"conn_a": True, "conn_c": True}
    # the state records it mirrored are another file's: not the hand edit's own
    assert {rc.key: rc.hand for rc in change.state} == {"conn_a": False, "conn_c": False}
    assert [rc.hand for rc in change.documents] == [False]
    # the mark survives the journal's encoding
    decoded = msgspec.json.decode(msgspec.json.encode(change), type=Change)
    assert {rc.key: rc.hand for rc in decoded.connections} == marks
    assert not any(rc.hand for rc in decoded.state)
    # a bus change to the same record in the same group: no longer the hand edit's alone
    base = dict(c.connections)
    hand = [msgspec.structs.replace(base["conn_a"], name="by-hand"), base["conn_b"]]
    _, change = run(
        c,
        Request(ops.take_in(CONNECTIONS, hand, base), "file"),
        Request(ops.update("conn_a", {"margin_type": "cross"}), "bus"),
    )
    assert [(rc.key, rc.hand) for rc in change.connections] == [("conn_a", False)]


def test_a_replayed_hand_edit_takes_what_its_file_holds_now() -> None:
    """The file moved on after the edit was taken in (saved again by hand, the daemon killed
    before it took that in): replaying the older edit must not undo the newer one."""
    c = seeded("conn_a", "conn_b")
    ok(run(c, ops.set_document("ui-config", {"theme": "0", "panel": "0"}))[0])
    base, doc0 = dict(c.connections), dict(c.documents["ui-config"])
    hand = [msgspec.structs.replace(base["conn_a"], margin_type="edit-1")]  # conn_b deleted
    _, change = run(
        c,
        Request(ops.take_in(CONNECTIONS, hand, base), "file"),
        Request(ops.take_in("ui-config.json", {"theme": "1", "panel": "1"}, doc0), "file"),
        Request(ops.set_volume("conn_a", live=7), "bus"),  # acknowledged with it
    )
    # The files as loaded at the restart: edited again by hand since.
    on_disk = Committed()
    on_disk.connections = {
        "conn_a": msgspec.structs.replace(base["conn_a"], margin_type="edit-2"),
        "conn_b": base["conn_b"],  # back again
    }
    on_disk.state = dict(c.state) | {"conn_b": seeded("conn_b").state["conn_b"]}
    on_disk.documents = {"ui-config": {"theme": "2", "panel": "1"}}
    replay = loaded_files(on_disk)
    assert (
        replay.connections == on_disk.connections and replay.connections is not on_disk.connections
    )
    out = replayed(change, on_disk, frozenset())
    replay.apply(out)
    assert replay.connections["conn_a"].margin_type == "edit-2"
    assert "conn_b" in replay.connections and "conn_b" in replay.state  # with its state
    assert replay.documents["ui-config"] == {"theme": "2", "panel": "1"}
    assert replay.state["conn_a"].volume_factor_live == 7  # the acknowledged change stays
    assert [e.id for e in replay.log] == [e.id for e in change.events]  # all logged
    # a file that did not load is no evidence: the change is replayed as journalled
    assert replayed(change, on_disk, frozenset({CONNECTIONS, "ui-config.json"})) == change
    # a change with nothing by hand comes back as it was
    _, bus_only = run(c, ops.update("conn_a", {"name": "x"}))
    assert replayed(bus_only, on_disk, frozenset()) is bus_only


def test_a_replayed_reorder_by_hand_takes_the_order_its_file_holds_now() -> None:
    """Reordered by hand and taken in, reordered by hand again, the daemon killed before it
    took that in: the replay must not put the older order back."""
    c = seeded("conn_a", "conn_b", "conn_c")
    base = dict(c.connections)
    hand = [base["conn_c"], base["conn_a"], base["conn_b"]]
    _, change = run(c, Request(ops.take_in(CONNECTIONS, hand, base), "file"))
    assert change.order == ["conn_c", "conn_a", "conn_b"] and change.events == []
    assert any(rc.hand for rc in change.connections)  # says it came from the file
    assert list(c.connections) == ["conn_c", "conn_a", "conn_b"]
    on_disk = Committed()
    on_disk.connections = {k: base[k] for k in ("conn_b", "conn_c", "conn_a")}  # saved again
    on_disk.state = dict(c.state)
    replay = loaded_files(on_disk)
    replay.apply(replayed(change, on_disk, frozenset()))
    assert list(replay.connections) == ["conn_b", "conn_c", "conn_a"]
    assert replay.connections == on_disk.connections
    # a file that did not load is no evidence: the journalled order stands
    assert replayed(change, on_disk, frozenset({CONNECTIONS})).order == change.order


# --- secrets sent back as shown, server-managed fields sent back ------------------------------

CANARY_SECRET = "canary-secret-7f3a9c1d"
CANARY_KEY = "canary-apikey-0123456789"


def test_placeholders_sent_back_keep_the_stored_secrets_and_no_event_carries_them() -> None:
    c = Committed()
    settings = {"apiKey": "inner-key-000", "region": "eu"}
    secret_body = body(
        "conn_s",
        api_key=CANARY_KEY,
        api_secret=CANARY_SECRET,
        connection_settings=msgspec.json.encode(settings).decode(),
    )
    ok(run(c, ops.create(secret_body))[0])
    # The record as a client is shown it (secrets masked), edited in one field, sent back whole.
    shown = {
        **msgspec.to_builtins(c.connections["conn_s"]),
        "api_key": "…" + CANARY_KEY[-4:],
        "api_secret": MASK,
        "connection_settings": msgspec.json.encode({**settings, "apiKey": MASK}).decode(),
        "name": "renamed",
    }
    (out,), change = run(c, ops.update("conn_s", shown), now=T2)
    assert out.error is None
    conn = c.connections["conn_s"]
    assert (conn.api_key, conn.api_secret, conn.name) == (CANARY_KEY, CANARY_SECRET, "renamed")
    assert msgspec.json.decode(conn.connection_settings) == settings  # kept byte for byte
    (rc,) = change.connections
    assert sorted(rc.fields or []) == ["name", "updated_at"]  # the secrets did not "change"
    # No event a client or the sync log sees holds a secret, not even the create's.
    for e in c.log:
        text = msgspec.json.encode(e).decode()
        assert CANARY_SECRET not in text and CANARY_KEY not in text and "inner-key" not in text


def test_a_placeholder_where_nothing_or_something_else_is_stored_is_refused() -> None:
    c = seeded("conn_a")  # no secrets stored
    before = snapshot(c)
    (new, upd), change = run(
        c,
        ops.create(body("conn_b", api_secret=MASK)),
        ops.update("conn_a", {"api_secret": MASK}),
    )
    for out, path in ((new, "$.connection.api_secret"), (upd, "$.changes.api_secret")):
        assert out.error is not None and out.error.code == "invalid"
        assert out.error.path == path and "placeholder" in out.error.message
    assert change.empty and snapshot(c)[:6] == before[:6]
    # a "…abcd" tail that is not the stored key's last four is refused too, the secret kept
    d = Committed()
    ok(run(d, ops.create(body("conn_k", api_key=CANARY_KEY)))[0])
    (out,), _ = run(d, ops.update("conn_k", {"api_key": "…zzzz"}))
    assert out.error is not None and out.error.path == "$.changes.api_key"
    assert CANARY_KEY not in out.error.message
    assert d.connections["conn_k"].api_key == CANARY_KEY


@pytest.mark.parametrize(
    "slipped", ["******** ", "*******", "**********", " …abcd", "...abcd", "…abc", "…a", "****"]
)
def test_a_placeholder_copied_with_a_slip_is_refused_never_stored(slipped: str) -> None:
    """A placeholder copied with a slip (a space, a star too many, `...` for `…`) was stored
    as the secret, replacing the real one, and still read masked: the loss did not show."""
    d = Committed()
    ok(run(d, ops.create(body("conn_k", api_key=CANARY_KEY, api_secret=CANARY_KEY)))[0])
    for field in ("api_key", "api_secret"):
        (out,), change = run(d, ops.update("conn_k", {field: slipped}))
        assert out.error is not None and out.error.code == "invalid", (field, out)
        assert out.error.path == f"$.changes.{field}" and "slip" in out.error.message
        assert change.empty
    (out,), _ = run(d, ops.create(body("conn_n", api_secret=slipped)))
    assert out.error is not None and out.error.path == "$.connection.api_secret"
    assert d.connections["conn_k"].api_key == CANARY_KEY
    assert d.connections["conn_k"].api_secret == CANARY_KEY


def test_a_placeholder_in_a_document_keeps_the_stored_secret() -> None:
    c = Committed()
    ok(run(c, ops.set_document("ui-config", {"token": CANARY_SECRET, "theme": "dark"}))[0])
    (out,), change = run(c, ops.set_document("ui-config", {"token": MASK, "theme": "light"}))
    assert out.error is None
    assert c.documents["ui-config"] == {"token": CANARY_SECRET, "theme": "light"}
    (rc,) = change.documents
    assert rc.fields == ["theme"]


def test_server_managed_fields_sent_by_a_client_are_ignored() -> None:
    c = Committed()
    forged = body(
        "conn_a", created_at="1999-01-01T00:00:00.000Z", updated_at="2999-01-01T00:00:00.000Z"
    )
    ok(run(c, ops.create(forged), now=T1)[0])
    assert c.connections["conn_a"].created_at == T1 == c.connections["conn_a"].updated_at
    # A record read back and sent whole, with stamps of its own: only what differs counts.
    sent = {
        **msgspec.to_builtins(c.connections["conn_a"]),
        "created_at": "1999-01-01T00:00:00.000Z",
        "updated_at": "1999-01-01T00:00:00.000Z",
    }
    (out,), change = run(c, ops.update("conn_a", sent), now=T2)
    assert out.error is None and change.empty  # nothing the client may set changed
    (out,), change = run(c, ops.update("conn_a", {**sent, "name": "B"}), now=T3)
    assert out.error is None
    conn = c.connections["conn_a"]
    assert (conn.name, conn.created_at, conn.updated_at) == ("B", T1, T3)
    assert change.events[0].data["fields"] == ["name"]
    # the id is not server-managed in an update: it names the record and may not change
    (out,), _ = run(c, ops.update("conn_a", {"id": "conn_other"}))
    assert (
        out.error is not None and out.error.code == "invalid" and out.error.path == "$.changes.id"
    )
    # and server-managed fields of the state record are not the client's either
    (out,), _ = run(c, ops.update("conn_a", {"last_sync_at": T0}))
    assert out.error is not None and out.error.code == "invalid"


def test_a_hosts_own_settings_keys_change_only_by_a_hand_edit_of_its_file() -> None:
    """Cluster mode (`Context.own_settings`): a reset, an import or a set of the settings
    document keeps this host's `server`, `cluster` and `watch` (a data dir on NFS polls,
    the others need not); a hand edit of settings.json sets them. On one host (no own keys)
    a reset empties them, as always."""
    own = shared.LOCAL_SETTINGS_KEYS
    mine = {
        "server": {"port": 4000},
        "cluster": {"name": "desk"},
        "watch": {"polling": True},
        "theme": "dark",
    }
    assert set(own) == {"server", "cluster", "watch"}

    def group(*reqs: Request, own_settings: tuple[str, ...] = own) -> Any:
        c = Committed()
        c.documents["settings"] = copy.deepcopy(mine)
        outcomes, change = apply_group(c, list(reqs), Context(T1, own_settings=own_settings))
        ok(outcomes)
        c.apply(change)
        return c.documents["settings"]

    assert group(Request(ops.reset(), "bus")) == {k: mine[k] for k in own}
    other = {"server": {"port": 1}, "cluster": {"name": "elsewhere"}, "theme": "light"}
    assert group(Request(ops.set_document("settings", other), "http")) == {
        **other,
        **{k: mine[k] for k in own},
    }
    files_ = {"settings.json": other}
    assert group(Request(ops.import_data({"files": files_}, "replace"), "bus"))["server"] == {
        "port": 4000
    }
    assert group(Request(ops.set_document("settings", other), "file")) == other
    # One host too: the daemon's own configuration is kept, the trading app's keys reset.
    assert group(Request(ops.reset(), "bus"), own_settings=()) == {k: mine[k] for k in own}


def test_a_state_replaced_by_a_snapshot_compares_if_match_with_its_log() -> None:
    """A host's own history (c1 changed at revision 1) replaced by a snapshot's, in which c1
    changed at revision 90 and the log starts at 60: If-Match compares 90 for c1, and for a
    record whose events the snapshot's log no longer has, the revision before its oldest.
    The same when the replacement is replayed from the journal (`Committed.apply`)."""

    def event(rev: int, cid: str) -> SyncEvent:
        return SyncEvent(id=rev, connection_id=cid, action="update", data={}, created_at=T0)

    c = seeded("c1", "c2")
    assert (c.revision_of(record_key("c1")), c.revision_of(record_key("c2"))) == (1, 2)
    snap_log = [event(60, "c9"), event(90, "c1")]
    change = Change(log=snap_log, replaces=True)
    decoded = msgspec.json.decode(msgspec.json.encode(change), type=Change)  # as journalled
    assert decoded.replaces
    c.apply(decoded)
    assert c.revision == 90
    assert c.revision_of(record_key("c1")) == 90
    # ... the revision before the oldest the log holds whole: 61..89 are missing from it, so
    # c2 may have changed in them (`Committed.whole_from`).
    assert c.revision_of(record_key("c2")) == 89
    # A sync log edited by hand is the same history: the revisions it no longer shows stay.
    h = seeded("c1", "c2")
    h.apply(Change(log=[event(2, "c2")]))
    assert h.revision_of(record_key("c1")) == 1
