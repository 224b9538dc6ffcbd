"""Another host's change as it comes from the stream: decoded and checked whole, into this
host's record types, before any of it is applied."""

from __future__ import annotations

import asyncio
import re
import zlib
from datetime import UTC, datetime

import msgspec
import pytest

from ctsd.cluster import messages, shared
from ctsd.cluster.committer import _decoded
from ctsd.cluster.engine import HEADER_ROOM
from ctsd.cluster.errors import BadMessage, InvalidChange, SnapshotInvalid, SnapshotTooLarge
from ctsd.cluster.messages import inflate
from ctsd.cluster.shared import change_problem
from ctsd.core import STREAM_SEQ, Change, Committed, RecordChange, replayed
from ctsd.files import CONNECTIONS
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


def test_a_hand_edits_tags_go_in_a_header_for_the_host_that_took_it_in_only() -> None:
    """`taken` names the publishing host's files: never in the payload (an older host would
    refuse a field it does not know), in a header that only that host reads back; a header
    not as ctsd writes it counts as none."""
    tag = "ab" * 32
    data, headers = messages.encode(
        b"{}", cluster="c", host="h1", msg_id="h1:x-1", expected_seq=0, taken={CONNECTIONS: tag}
    )

    def read(host_id: str, header: str | None = None) -> messages.Change:
        sent = {**headers, messages.H_TAKEN: header} if header is not None else headers
        return messages.decode(
            sent, data, seq=1, published_at=datetime.now(UTC), cluster="c", host_id=host_id
        )

    assert read("h1").taken == {CONNECTIONS: tag}
    assert read("h2").taken == {}
    hostile = ["[1]", "{", '{"a": "not a tag"}', '{"a": 1}', "[" * 500, "x" * 100_000]
    for text in hostile:
        assert read("h1", text).taken == {}
    # Many files (a checkout of the algorithms dir in one group): as many as fit the room
    # kept for the headers, the others left out.
    many = {f"algorithms/a{i:02}.json": tag for i in range(20)}
    _, headers = messages.encode(
        b"{}", cluster="c", host="h1", msg_id="h1:x-1", expected_seq=0, taken=many
    )
    assert 0 < len(headers[messages.H_TAKEN]) <= messages.TAKEN_MAX_BYTES
    kept = read("h1", headers[messages.H_TAKEN]).taken
    assert 0 < len(kept) < len(many)
    # ... the shared tables first: an algorithm's edit taken in again costs least
    _, headers = messages.encode(
        b"{}",
        cluster="c",
        host="h1",
        msg_id="h1:x-1",
        expected_seq=0,
        taken={**many, CONNECTIONS: tag},
    )
    assert CONNECTIONS in read("h1", headers[messages.H_TAKEN]).taken


def test_the_headers_fit_the_room_the_engine_keeps_for_them() -> None:
    """Every header at the largest value its checks allow, as nats-py puts them on the wire
    (with the `Nats-Expected-Stream` it adds): within `HEADER_ROOM`, which `_check_size`
    keeps of `max_payload` (past it the server drops the connection)."""
    host = "h" * 64
    _, headers = messages.encode(
        b"x" * 4096,
        cluster="c" * 32,
        host=host,
        msg_id=f"{host}:{'b' * 16}-{10**20 - 1}",
        expected_seq=10**20 - 1,
        taken={f"algorithms/{'a' * 100}{i}.json": "ab" * 32 for i in range(50)},
    )
    headers["Nats-Expected-Stream"] = "CTSD_" + "c" * 32
    wire = len("NATS/1.0\r\n") + sum(len(f"{k}: {v}\r\n") for k, v in headers.items()) + 2
    assert wire <= HEADER_ROOM, wire
    sent = Change(connections=[RecordChange("c1", hand=True)], taken={CONNECTIONS: "ab:cd"})
    assert _decoded(_payload(sent)).taken == {}  # (sent by no ctsd of this version)


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
    problem = change_problem(Committed(), _decoded(_payload(change)), 1)
    assert problem is not None and says in problem, problem


def event(eid: int, **data: object) -> SyncEvent:
    return SyncEvent(
        id=eid,
        connection_id="c1",
        action="update",
        data=dict(data),
        created_at="2026-12-06T10:00:00.000Z",
    )


def deep(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("change", "says"),
    [
        # a name out of the data dir: written or "deleted by hand" there, it reached the token
        (Change(touched=["../.token"]), "'../.token' as a file to write, which is no data file"),
        (Change(touched=["/etc/passwd"]), "'/etc/passwd'"),
        (Change(touched=["notes.txt"]), "'notes.txt'"),
        (
            Change(
                connections=[RecordChange("c1", msgspec.convert(connection(id="c2"), Connection))]
            ),
            "connection 'c1' holds a record of id 'c2'",
        ),
        (
            Change(state=[RecordChange("c1", ConnectionState(connection_id="c2"))]),
            "the state of 'c1' is a record of connection 'c2'",
        ),
        (Change(log=[event(5), event(3)]), r"log\[1\]: sync-log ids must strictly increase"),
        (Change(log=[event(5), event(5)]), "strictly increase"),
        # past this message's seq: every host would skip the stream's next changes as held
        (Change(log=[event(1, stream_seq=10**9)]), r"log\[0\]: stream_seq 1000000000 is no seq"),
        (Change(log=[event(1, stream_seq="7")]), "stream_seq 7 is no seq of this stream up to 7"),
        (Change(log=[event(1, stream_seq=True)]), "stream_seq True"),
        (Change(log=[event(1, stream_seq=0)]), "stream_seq 0"),
        (Change(log=[event(1, x=deep(63))]), r"log\[0\]: data nested deeper than 62"),
        (Change(events=[event(1, x=deep(63))]), r"events\[0\]: data nested deeper than 62"),
    ],
)
def test_a_change_unlike_what_the_files_hold_is_named_before_it_applies(
    change: Change, says: str
) -> None:
    """What the files' own checks refuse at start, or what would steer this host wrong: a
    file name, a record under another's id, a sync log out of order or past the stream."""
    problem = change_problem(Committed(), _decoded(_payload(change)), 7)
    assert problem is not None and re.search(says, problem), problem


def test_a_log_of_this_stream_up_to_the_change_has_no_problem() -> None:
    change = Change(
        log=[event(1), event(2, stream_seq=3), event(4, stream_seq=7)],
        events=[event(9, stream_seq=99, x=deep(61))],  # (its id and seq are given on applying)
        touched=["connections.json", "algorithms/a1.json", "settings.json"],
    )
    assert change_problem(Committed(), _decoded(_payload(change)), 7) is None


def test_a_change_the_files_can_hold_has_no_problem() -> None:
    c = Committed()
    c.documents["algorithms/a1"] = {"name": "a1"}
    change = Change(
        documents=[
            RecordChange("settings", {"sync_log_limit": 50}),
            RecordChange("instances", {"instances": [instance("a1")]}),
        ]
    )
    assert change_problem(c, _decoded(_payload(change)), 1) is None


def test_a_snapshot_no_host_could_inflate_is_refused_before_it_is_stored() -> None:
    c = Committed()
    c.documents["algorithms/a1"] = {"name": "a1", "notes": "x" * 5000}
    state = shared.capture(c, "desk", 7)
    assert shared.decode(shared.encode(state), cluster="desk", seq=7, what="it") == state
    with pytest.raises(SnapshotTooLarge, match=r"at seq 7 is 5,\d+ bytes, more than the 5,000"):
        shared.encode(state, limit=5000)


def test_a_snapshot_whose_log_claims_a_later_stream_seq_is_refused() -> None:
    """A host installing it would skip the stream's next changes as held already."""
    c = Committed()
    for rev, at in ((1, 3), (2, 7)):
        c.log.append(
            SyncEvent(
                id=rev,
                connection_id=None,
                action="document_update",
                data={STREAM_SEQ: at},
                created_at="2026-12-06T10:00:00.000Z",
            )
        )
    packed = shared.encode(shared.capture(c, "desk", 7))
    assert shared.decode(packed, cluster="desk", seq=7, what="it").log == list(c.log)
    c.log[-1].data[STREAM_SEQ] = 8
    packed = shared.encode(shared.capture(c, "desk", 7))
    with pytest.raises(
        SnapshotInvalid, match=r"log\[1\]: stream_seq 8 is no seq of this stream up"
    ):
        shared.decode(packed, cluster="desk", seq=7, what="it")


def test_a_compressed_message_is_inflated_whole_and_alone() -> None:
    packed = zlib.compress(b'{"touched": []}')
    assert inflate(packed) == b'{"touched": []}'
    for bad in (packed[:-3], packed + b"junk", b"junk"):
        with pytest.raises(zlib.error):
            inflate(bad)


def _message(payload: bytes) -> messages.Change:
    return messages.Change(
        seq=9,
        host="h2",
        msg_id="h2:1",
        payload=payload,
        published_at=datetime.now(UTC),
        own=False,
        compressed=True,
    )


async def _inflated_and_ticks(payload: bytes) -> tuple[bytes, int]:
    """The message inflated, and how often another task ran on the loop meanwhile."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)  # (started)
    ticks = 0
    try:
        change = await messages.inflated(_message(payload))
    finally:
        task.cancel()
    return change.payload, ticks


@pytest.mark.anyio
async def test_a_large_or_hostile_compressed_message_is_inflated_off_the_event_loop() -> None:
    """The first MiB inflates on the loop (nearly every change: no thread hop); the rest on
    a thread, so a 256 MB bomb of a few hundred KB holds no client of the host meanwhile."""
    small = b'{"touched": []}' * 100
    assert await _inflated_and_ticks(zlib.compress(small)) == (small, 0)
    large = b'{"touched": []}' * 200_000  # 3 MB
    got, ticks = await _inflated_and_ticks(zlib.compress(large))
    assert got == large and ticks > 0
    bomb = zlib.compress(b"\0" * (messages.MAX_INFLATED + 1))
    with pytest.raises(BadMessage, match=r"seq 9 \('h2:1'\) does not inflate \(truncated, or larg"):
        await _inflated_and_ticks(bomb)
    for bad, why in ((large[:-3], "header"), (zlib.compress(large) + b"x", "bytes after")):
        with pytest.raises(BadMessage, match=why):
            await messages.inflated(_message(bad))
