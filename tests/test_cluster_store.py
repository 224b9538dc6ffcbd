"""Two stores in cluster mode, in-process, on a real 3-node NATS cluster: the moment two hosts
change one record at once, made deterministic by holding back one host's applying."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog.testing
from nats.aio.msg import Msg

from ctsd import ops
from ctsd.cluster import boots
from ctsd.cluster.committer import ClusterCommitter
from ctsd.cluster.config import ClusterSettings
from ctsd.cluster.engine import ClusterEngine
from ctsd.cluster.errors import ApplyFailed
from ctsd.cluster.messages import Change
from ctsd.core import Request
from ctsd.errors import CtsdError
from ctsd.files import CONNECTIONS, SETTINGS, SYNC_LOG
from ctsd.metrics import Metrics
from ctsd.secretbox import SecretBox, new_key_text, parse_key
from ctsd.store import Store
from tests.daemon import wait_until_async
from tests.inprocess import loaded_with_copies
from tests.nats_cluster import NatsCluster, nats_servers, require_nats_server

pytestmark = pytest.mark.anyio

require_nats_server()

_names = itertools.count(1)


@pytest.fixture(scope="module", name="nats", params=nats_servers())
def nats_cluster(request: pytest.FixtureRequest) -> Iterator[NatsCluster]:
    with NatsCluster(3, binary=request.param) as c:
        yield c


@asynccontextmanager
async def host(data_dir: Path, settings: ClusterSettings) -> AsyncIterator[ClusterCommitter]:
    store, _ = loaded_with_copies(data_dir)  # (copies kept, as the daemon keeps them)
    await store.start()
    committer = ClusterCommitter(store, ClusterEngine(settings))
    store.committer = committer
    await committer.engine.start()
    try:
        yield committer
    finally:
        await store.close()


@asynccontextmanager
async def new_hosts(
    nats: NatsCluster, tmp_path: Path, **settings: Any
) -> AsyncIterator[tuple[ClusterCommitter, ClusterCommitter]]:
    """Hosts x and y of a cluster of their own (`settings`: more of its ClusterSettings),
    started, not applying the stream yet: a test may gate one first."""
    name = f"s{os.getpid()}x{next(_names)}"

    def of(host_id: str) -> ClusterSettings:
        return ClusterSettings(nats_urls=tuple(nats.urls), name=name, host_id=host_id, **settings)

    async with host(tmp_path / "x", of("x")) as x, host(tmp_path / "y", of("y")) as y:
        yield x, y


@asynccontextmanager
async def two_hosts(
    nats: NatsCluster, tmp_path: Path
) -> AsyncIterator[tuple[ClusterCommitter, ClusterCommitter]]:
    """Hosts x and y of a cluster of their own, each applying the stream, caught up."""
    async with new_hosts(nats, tmp_path) as (x, y):
        for c in (x, y):
            c.subscribe()
            await c.engine.catch_up(timeout=20)
        yield x, y


async def test_same_record_on_two_hosts_one_wins_the_other_gets_conflict(
    nats: NatsCluster, tmp_path: Path
) -> None:
    async with new_hosts(nats, tmp_path) as (x, y):
        # Host y applies the stream through a gate, so it can be held behind host x.
        gate = asyncio.Event()
        gate.set()
        apply = y._apply

        async def gated(change: Change) -> None:
            await gate.wait()
            await apply(change)

        y._apply = gated  # type: ignore[method-assign]
        for c in (x, y):
            c.subscribe()
            await c.engine.catch_up(timeout=20)
        await x.store.submit(ops.create({"id": "c1", "name": "one", "exchange": "bybit"}), "bus")
        await x.store.submit(ops.create({"id": "c2", "name": "two", "exchange": "bybit"}), "bus")
        await y.engine.wait_applied(2, timeout=10)

        gate.clear()  # y does not see what x does next
        await x.store.submit(ops.update("c1", {"name": "from x"}), "bus")
        on_y = [
            asyncio.create_task(y.store.submit(ops.update("c1", {"volume_factor": 3.0}), "bus")),
            asyncio.create_task(y.store.submit(ops.update("c2", {"name": "from y"}), "bus")),
            # A second change of c2 in the same group: computed again after the conflict, it
            # was refused `conflict` for the first one's revision, this host's own change.
            asyncio.create_task(y.store.submit(ops.update("c2", {"volume_factor": 2.0}), "bus")),
        ]
        # y's group, computed at seq 2, is in the stream after x's (keyed: the stream takes
        # it); y answers only once it has applied x's change and checked its own against it.
        await wait_until_async(
            lambda: (y.engine.status().stream_last_seq or 0) >= 4, 10, what="y's group published"
        )
        assert not any(t.done() for t in on_y) and y.conflicts == 0
        gate.set()
        with pytest.raises(CtsdError) as refused:
            await on_y[0]
        assert refused.value.code == "conflict", refused.value
        assert (await on_y[1]).name == "from y"  # a record nobody else changed goes through
        assert (await on_y[2]).volume_factor == 2.0
        assert y.conflicts >= 1
        await x.engine.wait_applied(y.engine.applied_seq, timeout=10)
        for c in (x, y):
            assert c.store.connections["c1"].name == "from x"
            assert c.store.connections["c1"].volume_factor == 1.0  # never silently merged
            assert c.store.connections["c2"].name == "from y"
            assert c.store.connections["c2"].volume_factor == 2.0
        assert [e.id for e in x.store.log] == [e.id for e in y.store.log] == [1, 2, 3, 4, 5]


async def test_different_records_on_two_hosts_both_go_through_in_stream_order(
    nats: NatsCluster, tmp_path: Path
) -> None:
    """Both hosts compute a change on the same state, neither having seen the other's: keyed
    groups of different records are not refused; both get their revisions in stream order,
    the same on both hosts."""
    async with new_hosts(nats, tmp_path) as (x, y):
        gates = {}
        for c in (x, y):
            gate = gates[c.host] = asyncio.Event()
            gate.set()

            async def gated(change: Change, gate: asyncio.Event = gate, apply=c._apply) -> None:
                if not change.own:
                    await gate.wait()
                await apply(change)

            c._apply = gated  # type: ignore[method-assign]
            c.subscribe()
            await c.engine.catch_up(timeout=20)
        for cid in ("c1", "c2"):
            await x.store.submit(ops.create({"id": cid, "name": cid, "exchange": "bybit"}), "bus")
        await y.engine.wait_applied(2, timeout=10)
        for gate in gates.values():
            gate.clear()  # neither sees the other's change
        on_x = asyncio.create_task(x.store.submit(ops.update("c1", {"name": "from x"}), "bus"))
        on_y = asyncio.create_task(y.store.submit(ops.update("c2", {"name": "from y"}), "bus"))
        await wait_until_async(
            lambda: min(c.engine.status().stream_last_seq or 0 for c in (x, y)) >= 4,
            10,
            what="both groups published",
        )
        for gate in gates.values():
            gate.set()
        assert (await on_x).name == "from x" and (await on_y).name == "from y"
        await x.engine.wait_applied(4, timeout=10)
        await y.engine.wait_applied(4, timeout=10)
        assert x.conflicts == y.conflicts == 0
        for c in (x, y):
            assert c.store.connections["c1"].name == "from x"
            assert c.store.connections["c2"].name == "from y"
        logs = [
            [(e.id, e.connection_id, e.data["stream_seq"]) for e in c.store.log] for c in (x, y)
        ]
        assert logs[0] == logs[1] and [e[0] for e in logs[0]] == [1, 2, 3, 4], logs
        assert [e[2] for e in logs[0]] == [1, 2, 3, 4]


async def test_a_write_that_changes_nothing_answers_the_revision_its_answer_shows(
    nats: NatsCluster, tmp_path: Path
) -> None:
    """y's group (a change of c1, then a write of c2 that changes nothing) is computed before
    y has applied x's change of c2: its answer shows c2 without x's change, so it is answered
    with the revision the group was computed at. Given the revision after x's (as the group's
    events are stamped once x's change is applied), an If-Match passed over x's change (a
    review found it)."""
    async with new_hosts(nats, tmp_path) as (x, y):
        gate = asyncio.Event()
        gate.set()
        apply = y._apply

        async def gated(change: Change) -> None:
            if not change.own:
                await gate.wait()
            await apply(change)

        y._apply = gated  # type: ignore[method-assign]
        for c in (x, y):
            c.subscribe()
            await c.engine.catch_up(timeout=20)
        for cid in ("c1", "c2"):
            await x.store.submit(ops.create({"id": cid, "name": cid, "exchange": "bybit"}), "bus")
        await y.engine.wait_applied(2, timeout=10)
        gate.clear()  # y does not see what x does next
        await x.store.submit(ops.update("c2", {"name": "from x"}), "bus")  # revision 3
        on_y = asyncio.gather(
            y.store.submit_answer(ops.update("c1", {"name": "from y"}), "bus"),
            y.store.submit_answer(ops.update("c2", {"name": "c2"}), "http"),  # changes nothing
        )
        await wait_until_async(
            lambda: (y.engine.status().stream_last_seq or 0) >= 4, 10, what="y's group published"
        )
        gate.set()
        (_, changed), (shown, noop) = await on_y
        assert shown.name == "c2" and changed == 4
        assert noop == 2, noop  # (3 is x's change, which its answer does not show)
        with pytest.raises(CtsdError) as refused:  # so an If-Match on it sees x's change
            await y.store.submit(ops.update("c2", {"name": "over x"}), "http", if_match=noop)
        assert refused.value.code == "precondition_failed"
        assert y.store.connections["c2"].name == "from x"


async def test_a_large_change_of_another_host_is_decoded_off_the_event_loop(
    nats: NatsCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An import of thousands of records reaches the other host: decoded and checked on a
    thread (the loop serves meanwhile), applied in the stream's order all the same."""
    from ctsd.cluster import committer

    threads: list[str] = []
    decoded = committer._decoded

    def watched(payload: bytes) -> Any:
        threads.append(threading.current_thread().name)
        return decoded(payload)

    monkeypatch.setattr(committer, "_decoded", watched)
    monkeypatch.setattr(committer, "DECODE_ON_THREAD_BYTES", 10_000)
    async with two_hosts(nats, tmp_path) as (x, y):
        big = [{"id": f"c{i}", "name": f"n{i}", "exchange": "bybit"} for i in range(200)]
        await x.store.submit(ops.import_data({"files": {CONNECTIONS: big}}, "merge"), "bus")
        await x.store.submit(ops.update("c1", {"name": "small, after"}), "bus")
        await y.engine.wait_applied(2, timeout=10)
        assert len(y.store.connections) == 200
        assert y.store.connections["c1"].name == "small, after"
    main = threading.main_thread().name
    assert threads[0] != main and threads[-1] == main, threads  # large on a thread, small not


async def test_another_hosts_change_is_synced_in_the_journal_before_a_file_holds_it(
    nats: NatsCluster, tmp_path: Path
) -> None:
    """Another host's change is journalled without an fdatasync of its own (the stream holds
    it durably). Before a round writes a file holding it, the journal is synced: a power cut
    must never leave the sync log ahead of the journal, or the next start would take the
    changes the other files lack for held."""
    async with two_hosts(nats, tmp_path) as (x, y):
        # Whether the journal held unsynced records as each round's files reached the disk
        # (before the journal is cut: a cut is synced, but a round may leave it for later).
        unsynced: list[bool] = []
        y.store.checkpointer.on_write.append(
            lambda _files: unsynced.append(y.store.journal.written_unsynced)
        )
        await x.store.submit(ops.create({"id": "c1", "name": "one", "exchange": "bybit"}), "bus")
        await y.engine.wait_applied(1, timeout=10)
        await y.store.checkpointer.flush()
        assert [c["id"] for c in json.loads((tmp_path / "y" / CONNECTIONS).read_text())] == ["c1"]
        assert unsynced and not any(unsynced), unsynced


async def test_a_founding_message_its_host_never_applied_is_applied_from_the_stream(
    nats: NatsCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data dir from an earlier cluster founds a new one; the host dies after the founding
    message is in the stream, before it applied it. At its next start the stream's seq 1 is
    applied, and so is every later change: the stream seqs its sync log carried from the
    earlier cluster never make it take another host's change for one it holds."""
    async with two_hosts(nats, tmp_path) as (x, y):
        for cid in ("c1", "c2", "c3"):
            await x.store.submit(ops.create({"id": cid, "name": cid, "exchange": "bybit"}), "bus")
        await y.engine.wait_applied(3, timeout=10)
    old = tmp_path / "x"
    (old / ".journal").unlink()  # its files hold everything; the journal is of the old cluster
    new = f"s{os.getpid()}x{next(_names)}"

    def settings(host_id: str) -> ClusterSettings:
        return ClusterSettings(nats_urls=tuple(nats.urls), name=new, host_id=host_id)

    store = Store(old)
    store.open()
    await store.start()
    store.checkpointer.stop()  # no round writes a file before the kill below
    assert store._checkpoints is not None
    await store._checkpoints
    founder = ClusterCommitter(store, ClusterEngine(settings("x")))
    store.committer = founder
    await founder.engine.start()
    founder.subscribe()

    async def killed(own: object, seq: int) -> None:
        raise RuntimeError("killed before it applied its own founding message")

    monkeypatch.setattr(founder, "_apply_own", killed)
    with pytest.raises(Exception, match="killed before"):
        await founder.found()
    await store.abandon()  # as kill -9 leaves it: the journal, no file written
    assert store._writer is not None
    store._writer.cancel()
    monkeypatch.undo()
    async with host(old, settings("x")) as x, host(tmp_path / "z", settings("z")) as z:
        for c in (x, z):
            c.subscribe()
            await c.catch_up(timeout=20)
        assert z.store.connections.keys() == {"c1", "c2", "c3"}
        await z.store.submit(ops.update("c1", {"name": "from z"}), "bus")
        await x.engine.wait_applied(2, timeout=10)
        assert x.store.connections["c1"].name == "from z"
        assert [e.id for e in x.store.log] == [e.id for e in z.store.log] == [1, 2, 3, 4]


async def test_a_host_whose_sync_log_differs_stops_instead_of_going_its_own_way(
    nats: NatsCluster, tmp_path: Path
) -> None:
    """A keyed group carries the revisions it was computed with: a host whose log is not the
    one it was computed on stalls (and refuses writes) rather than applying it on its own
    terms."""
    async with two_hosts(nats, tmp_path) as (x, y):
        await x.store.submit(ops.create({"id": "c1", "name": "one", "exchange": "bybit"}), "bus")
        await y.engine.wait_applied(1, timeout=10)
        y.store.committed.revision += 3  # as if y's log had taken events the others did not
        await x.store.submit(ops.update("c1", {"name": "from x"}), "bus")
        await wait_until_async(lambda: y.engine.state == "stalled", 10, what="y stalled")
        assert "the hosts' sync logs differ" in (y.engine.status().reason or "")
        assert y.store.connections["c1"].name == "one" and y.engine.applied_seq == 1
        with pytest.raises(CtsdError) as refused:
            await y.store.submit(ops.update("c1", {"name": "from y"}), "bus")
        assert refused.value.code == "unavailable"


@pytest.fixture(scope="module")
def small_nats() -> Iterator[NatsCluster]:
    """NATS servers that take at most 64 KB in one message."""
    with NatsCluster(3, max_payload=64 * 1024) as c:
        yield c


async def test_a_request_too_large_for_one_message_fails_alone(
    small_nats: NatsCluster, tmp_path: Path
) -> None:
    """A group more than the servers take in one message: its requests are committed one by
    one, so the large one (an import) is refused `too_large` and the small one in the same
    group goes through."""
    settings = ClusterSettings(
        nats_urls=tuple(small_nats.urls), name=f"s{os.getpid()}x{next(_names)}", host_id="x"
    )
    async with host(tmp_path / "x", settings) as x:
        x.subscribe()
        await x.engine.catch_up(timeout=20)
        rows = [
            {"id": f"n{i}", "name": os.urandom(90).hex(), "exchange": "bybit"} for i in range(1000)
        ]
        big = ops.import_data({"files": {"connections.json": rows}}, "merge")
        small = ops.create({"id": "small", "name": "small", "exchange": "bybit"})
        outcomes, lsn = await x.commit([Request(big, "bus"), Request(small, "bus")])
        assert outcomes[0].error is not None and outcomes[0].error.code == "too_large"
        assert "max_payload" in outcomes[0].error.message
        assert outcomes[1].error is None and lsn is not None
        assert list(x.store.connections) == ["small"]


async def test_a_hand_edit_of_own_settings_keys_stays_local_in_a_group_with_shared_changes(
    nats: NatsCluster, tmp_path: Path
) -> None:
    """A hand edit of a host's own settings keys stays on the host (no event in the shared
    sync log) even when a bus change of a connection came in the same group."""
    async with two_hosts(nats, tmp_path) as (x, y):
        base = x.store.documents.get("settings") or {}
        hand = {**base, "server": {"rate_limit": {"requests": 7, "window_s": 1}}}
        edit = ops.take_in(SETTINGS, hand, base, json.dumps(hand).encode())
        create = ops.create({"id": "c1", "name": "one", "exchange": "bybit"})
        outcomes, _ = await x.commit([Request(edit, "file", file=SETTINGS), Request(create, "bus")])
        assert [o.error for o in outcomes] == [None, None]
        assert x.store.settings.server.rate_limit.requests == 7
        assert [(e.id, e.connection_id) for e in x.store.log] == [(1, "c1")]
        await y.engine.wait_applied(x.engine.applied_seq, timeout=10)
        assert [(e.id, e.connection_id) for e in y.store.log] == [(1, "c1")]
        assert "server" not in (y.store.documents.get("settings") or {})


async def test_a_hosts_metrics_count_its_own_hand_edits_those_that_stay_local_too(
    nats: NatsCluster, tmp_path: Path
) -> None:
    """`ctsd_hand_edits_total{result="taken_in"}` counts the hand edits taken in on its own
    host: one of its own settings keys (no event), one of a shared file; not another
    host's, which comes as events."""
    async with two_hosts(nats, tmp_path) as (x, y):
        counted = {c.host: Metrics(c.store, dict) for c in (x, y)}

        def taken_in(c: ClusterCommitter) -> float:
            family = counted[c.host].hand_edits.collect()[0]
            [n] = [
                s.value
                for s in family.samples
                if s.name.endswith("_total") and s.labels == {"result": "taken_in"}
            ]
            return n

        path = x.store.path(SETTINGS)
        doc = json.loads(path.read_text())
        path.write_text(json.dumps({**doc, "watch": {"polling": True}}, indent=2) + "\n")
        assert await x.store.ingest(SETTINGS)
        path = x.store.path(CONNECTIONS)
        path.write_text(json.dumps([{"id": "c1", "name": "c1", "exchange": "bybit"}]) + "\n")
        assert await x.store.ingest(CONNECTIONS)
        await y.engine.wait_applied(x.engine.applied_seq, timeout=10)
        assert "c1" in y.store.connections
        assert (taken_in(x), taken_in(y)) == (2, 0)


async def test_a_sync_log_edit_of_the_history_on_a_cluster_host_is_put_back_unpublished(
    nats: NatsCluster, tmp_path: Path
) -> None:
    """An entry removed from the middle of the shared sync log by hand on host x is no trim:
    not taken, said in the log, and the file written back from memory with the whole
    history; nothing goes to the stream (every host holds that history already)."""
    async with two_hosts(nats, tmp_path) as (x, y):
        for i in (1, 2, 3):
            conn = {"id": f"c{i}", "name": f"c{i}", "exchange": "bybit"}
            await x.store.submit(ops.create(conn), "bus", sync="files")
        await y.engine.wait_applied(x.engine.applied_seq, timeout=10)
        last = await x.engine.stream_last_seq()
        path = x.store.path(SYNC_LOG)
        whole = json.loads(path.read_text())
        path.write_text(json.dumps([whole[0], whole[2]], indent=2) + "\n")
        with structlog.testing.capture_logs() as logs:
            assert await x.store.ingest(SYNC_LOG)
            await x.store.checkpointer.flush()
        (kept,) = [e for e in logs if e["event"] == "sync_log_edit_not_kept"]
        assert "2" in kept["why"], kept
        assert [e["id"] for e in json.loads(path.read_text())] == [1, 2, 3]
        assert [e.id for e in x.store.log] == [e.id for e in y.store.log] == [1, 2, 3]
        assert await x.engine.stream_last_seq() == last
        assert SYNC_LOG not in x.store.problems


@pytest.fixture
def own_nats() -> Iterator[NatsCluster]:
    """A NATS cluster of its own, for a test that stops it."""
    with NatsCluster(3) as c:
        yield c


async def test_a_late_in_place_write_waits_for_the_cluster_instead_of_being_set_aside(
    own_nats: NatsCluster, tmp_path: Path
) -> None:
    """An in-place writer writes into connections.json after the daemon's rename replaced it,
    while the cluster cannot take changes: the write is tried again once it can (on one host
    it is taken in at once), not set aside as `<file>.late-*` for the operator to find."""
    settings = ClusterSettings(
        nats_urls=tuple(own_nats.urls),
        name=f"s{os.getpid()}x{next(_names)}",
        host_id="x",
        publish_timeout_s=1.0,
    )
    async with host(tmp_path / "x", settings) as x:
        x.subscribe()
        await x.engine.catch_up(timeout=20)
        s = x.store
        for cid in ("c1", "c2"):
            conn = {"id": cid, "name": cid, "exchange": "bybit"}
            await s.submit(ops.create(conn), "bus", sync="files")
        path = s.path("connections.json")
        with open(path, "r+b") as fh:  # the "editor" keeps it open across the change
            rows = json.loads(fh.read())
            await s.submit(ops.update("c1", {"name": "Bus"}), "bus", sync="files")
            assert s.displaced
            for i in range(3):
                own_nats.stop(i)
            rows[1]["name"] = "late by hand"
            fh.seek(0)
            fh.truncate(0)
            fh.write((json.dumps(rows, indent=2) + "\n").encode())
        await s.take_in_late(0)  # the cluster refuses it: kept for later
        assert s.displaced and not list(s.data_dir.glob("connections.json.late-*"))
        for i in range(3):
            own_nats.start_node(i, wait=False)

        async with asyncio.timeout(60):  # the late write taken in once the cluster is back
            while s.connections["c2"].name != "late by hand":
                await asyncio.sleep(0.1)
                await s.take_in_late(0)
        assert s.connections["c1"].name == "Bus" and not s.displaced
        assert not list(s.data_dir.glob("connections.json.late-*"))


@pytest.mark.parametrize("crash", [False, True], ids=["running", "killed, then started"])
async def test_a_hand_edit_whose_answer_was_lost_is_not_taken_in_again_over_newer_changes(
    nats: NatsCluster, tmp_path: Path, crash: bool
) -> None:
    """Host x's hand edit reaches the stream, but x, held behind another host's change, gives
    up waiting and answers `unavailable`. Once x has applied it after all, and host y changed
    the same field since, taking the file in again must not undo y's change: while x runs,
    nor at its next start when it was killed before a round wrote the file (the journal
    record the stream's copy of the edit got names the bytes it was taken in from)."""
    async with new_hosts(nats, tmp_path, publish_timeout_s=1.0) as (x, y):
        # x receives the stream through a gate (before it applies anything: as a host whose
        # connection is slow, not one stuck applying).
        gate = asyncio.Event()
        gate.set()
        handle = x.engine._handle

        async def gated(msg: Any) -> None:
            await gate.wait()
            await handle(msg)

        x.engine._handle = gated  # type: ignore[method-assign]
        for c in (x, y):
            c.subscribe()
            await c.engine.catch_up(timeout=20)
        for cid in ("c1", "c2"):
            conn = {"id": cid, "name": cid, "exchange": "bybit"}
            await x.store.submit(ops.create(conn), "bus", sync="files")
        await y.engine.wait_applied(2, timeout=10)

        gate.clear()  # x is held behind y's next change
        await y.store.submit(ops.update("c2", {"name": "from y"}), "bus")
        path = x.store.path("connections.json")
        rows = json.loads(path.read_text())
        rows[0]["name"] = "by hand"
        path.write_text(json.dumps(rows, indent=2) + "\n")
        assert not await x.store.ingest("connections.json")  # gave up waiting: unavailable
        if crash:
            x.store.checkpointer.stop()  # no round takes the file in before the kill
            assert x.store._checkpoints is not None
            await x.store._checkpoints
        gate.set()
        await y.engine.wait_applied(4, timeout=10)  # x's edit is in the stream after all
        assert y.store.connections["c1"].name == "by hand"
        await y.store.submit(ops.update("c1", {"name": "from y, later"}), "bus")
        await x.engine.wait_applied(5, timeout=10)
        if crash:
            crashed = tmp_path / "x-crashed"
            shutil.copytree(x.store.data_dir, crashed)  # the disk as kill -9 leaves it
            async with started_as_the_daemon_starts(crashed, x.engine.settings) as x2:
                await x2.engine.wait_applied(5, timeout=10)
                assert x2.store.connections["c1"].name == "from y, later"
                assert x2.store.revision == y.store.revision
            return
        await x.store.ingest("connections.json")  # the file still holds the edit
        await x.engine.wait_applied(y.engine.applied_seq, timeout=10)
        await y.engine.wait_applied(x.engine.applied_seq, timeout=10)
        for c in (x, y):
            assert c.store.connections["c1"].name == "from y, later", c.host


@asynccontextmanager
async def started_as_the_daemon_starts(
    data_dir: Path, settings: ClusterSettings, box: SecretBox | None = None
) -> AsyncIterator[ClusterCommitter]:
    """A host started as `ctsd serve` starts one: copies judged, the journal replayed, the
    stream caught up with, then the files edited while it was down taken in."""
    store, edited = loaded_with_copies(data_dir, box)
    engine = ClusterEngine(settings)
    engine.earlier_boots = boots.remember(data_dir, engine.boot)
    committer = ClusterCommitter(store, engine)
    store.committer = committer
    await engine.start()
    try:
        committer.subscribe()
        await committer.catch_up(timeout=20)
        await store.start()
        await store.take_in_edited(edited)
        yield committer
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("again", "keyed"),
    [(False, False), (False, True), (True, False)],
    ids=["left as it was", "left as it was, secrets key", "saved again"],
)
async def test_a_hand_edit_in_the_stream_before_a_crash_is_not_taken_in_again_at_the_start(
    nats: NatsCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, again: bool, keyed: bool
) -> None:
    """Host x publishes a hand edit and dies before it applies it (nothing of it in its
    journal, its file's copy the old one); host y then changes the same field. At x's next
    start the stream brings the edit back: the file, still as the operator left it, is not
    an edit made while x was down, and taking it in again would undo y's change. Saved again
    while x was down, it is one, taken in over y's."""
    name = f"s{os.getpid()}x{next(_names)}"

    def of(host_id: str) -> ClusterSettings:
        return ClusterSettings(nats_urls=tuple(nats.urls), name=name, host_id=host_id)

    crashed = tmp_path / "x-crashed"
    box = SecretBox(parse_key(new_key_text(), "test")) if keyed else None
    async with host(tmp_path / "y", of("y")) as y:
        y.subscribe()
        await y.catch_up(timeout=20)
        async with started_as_the_daemon_starts(tmp_path / "x", of("x"), box) as x:
            conn = {"id": "c1", "name": "c1", "exchange": "bybit"}
            await x.store.submit(ops.create(conn), "bus", sync="files")
            await wait_until_async(lambda: (tmp_path / "x/.bases/connections.json").exists(), 10)

            async def killed(own: object, seq: int) -> None:
                shutil.copytree(x.store.data_dir, crashed)  # the disk as kill -9 leaves it
                raise RuntimeError("killed before it applied its own hand edit")

            monkeypatch.setattr(x, "_apply_own", killed)
            path = x.store.path("connections.json")
            rows = json.loads(path.read_text())
            rows[0]["name"] = "by hand"
            path.write_text(json.dumps(rows, indent=2) + "\n")
            with contextlib.suppress(Exception):
                await x.store.ingest("connections.json")
            assert crashed.exists()
            await y.engine.wait_applied(2, timeout=10)
            assert y.store.connections["c1"].name == "by hand"
            await y.store.submit(ops.update("c1", {"name": "from y, later"}), "bus")
        monkeypatch.undo()
        if again:
            path = crashed / "connections.json"
            rows = json.loads(path.read_text())
            rows[0]["name"] = "by hand, again"
            path.write_text(json.dumps(rows, indent=2) + "\n")
        async with started_as_the_daemon_starts(crashed, of("x"), box) as x2:
            last = await x2.engine.stream_last_seq()
            for c in (x2, y):
                await c.engine.wait_applied(last, timeout=10)
            for c in (x2, y):
                want = "by hand, again" if again else "from y, later"
                assert c.store.connections["c1"].name == want, c.host
            assert [e.id for e in x2.store.log] == [e.id for e in y.store.log]


async def test_a_hand_edit_refused_while_the_host_is_stalled_is_taken_in_once_it_resumes(
    nats: NatsCluster, tmp_path: Path
) -> None:
    """A stall (the stream trimmed past the host, say) refuses writes like an outage: a file
    saved meanwhile is taken in when the host applies the stream again, not left on disk
    until it happens to be saved again."""
    settings = ClusterSettings(
        nats_urls=tuple(nats.urls), name=f"s{os.getpid()}x{next(_names)}", host_id="x"
    )
    async with host(tmp_path / "x", settings) as x:
        x.subscribe()
        await x.engine.catch_up(timeout=20)
        x.started()
        s = x.store
        await s.submit(
            ops.create({"id": "c1", "name": "c1", "exchange": "bybit"}), "bus", sync="files"
        )
        x.engine.stall(ApplyFailed("held for the test", seq=x.engine.applied_seq + 1))
        path = s.path("connections.json")
        rows = json.loads(path.read_bytes())
        rows[0]["name"] = "by hand"
        tmp = path.with_name("connections.json.tmp")
        tmp.write_text(json.dumps(rows, indent=2) + "\n")
        os.replace(tmp, path)
        assert not await s.ingest("connections.json")  # refused: the host is stalled
        x.engine.resume()
        async with asyncio.timeout(10):
            while s.connections["c1"].name != "by hand":
                await asyncio.sleep(0.05)


async def test_a_change_answered_with_an_unknown_outcome_is_known_to_land_later(
    nats: NatsCluster, tmp_path: Path
) -> None:
    """Host x's change is in the stream, but x stalls before applying it (applying y's change
    before it failed): answered with its msg id. Once x applies again, `landed` says it got
    in (a hand edit's take-in asks before taking the file in again), however many changes x
    makes next."""
    async with new_hosts(nats, tmp_path) as (x, y):
        gate = asyncio.Event()
        gate.set()
        held: list[Change] = []
        fail = [False]
        apply = x._apply

        async def gated(change: Change) -> None:
            held.append(change)
            await gate.wait()
            if fail[0]:
                fail[0] = False
                raise OSError(28, "No space left on device")
            await apply(change)

        x._apply = gated  # type: ignore[method-assign]
        for c in (x, y):
            c.subscribe()
            await c.engine.catch_up(timeout=20)
        await x.store.submit(ops.create({"id": "c1", "name": "one", "exchange": "bybit"}), "bus")
        await y.engine.wait_applied(1, timeout=10)
        gate.clear()
        held.clear()
        await y.store.submit(ops.create({"id": "c2", "name": "two", "exchange": "bybit"}), "bus")
        await wait_until_async(lambda: held, 10, what="x holding y's change")
        mine = asyncio.create_task(x.store.submit(ops.update("c1", {"name": "from x"}), "bus"))
        await wait_until_async(
            lambda: (x.engine.status().stream_last_seq or 0) >= 3, 10, what="x's change sent"
        )
        fail[0] = True
        gate.set()
        with pytest.raises(CtsdError) as info:
            await mine
        assert "msg_id" in info.value.extra, info.value
        msg_id = info.value.extra["msg_id"]
        assert x.engine.stalled_by is not None and not x.landed(msg_id)
        x.engine.resume()  # (the disk has room again)
        await wait_until_async(lambda: x.store.connections["c1"].name == "from x", 10)
        assert x.landed(msg_id)
        for i in range(1100):  # more than it remembers of its own changes
            await x.store.submit(ops.update("c1", {"volume_factor": 1.0 + i / 1000}), "bus")
        assert x.landed(msg_id)


async def test_a_change_applied_just_as_its_wait_gives_up_is_answered_as_done(
    nats: NatsCluster, tmp_path: Path
) -> None:
    """Host x's change is in the stream behind y's, which x holds back, so x waits to apply
    it in order; the wait times out just as x applies it after all (here: the timeout comes
    right after). It is x's and applied: the answer is success, not `unavailable`. While x
    still holds y's change back when the wait gives up, the answer says the outcome is
    unknown and gives the msg id, which `landed` answers for once x has applied it."""
    async with new_hosts(nats, tmp_path) as (x, y):
        gate = asyncio.Event()
        gate.set()
        held: list[Msg] = []
        handle = x.engine._handle

        async def gated(msg: Msg) -> None:
            # Held before the engine takes it up (as a message still on its way would be):
            # x's own commit is not held up behind it, as by one being applied.
            if msg.data:
                held.append(msg)
                await gate.wait()
            await handle(msg)

        x.engine._handle = gated  # type: ignore[method-assign]
        wait_applied = x.engine.wait_applied
        late = [False]  # the wait for x's own change: let it apply, then time out anyway

        async def gives_up(seq: int, timeout: float | None = None) -> None:
            if late[0]:
                late[0] = False
                gate.set()
                await wait_applied(seq, 10)
                raise TimeoutError
            await wait_applied(seq, timeout)

        x.engine.wait_applied = gives_up  # type: ignore[method-assign]
        try:
            await _gave_up_and_unknown(x, y, gate, held, late)
        finally:
            gate.set()  # (a failure must not leave x's applying held at the close)


async def _gave_up_and_unknown(
    x: ClusterCommitter,
    y: ClusterCommitter,
    gate: asyncio.Event,
    held: list[Msg],
    late: list[bool],
) -> None:
    for c in (x, y):
        c.subscribe()
        await c.engine.catch_up(timeout=20)
    await x.store.submit(ops.create({"id": "c1", "name": "one", "exchange": "bybit"}), "bus")
    await y.engine.wait_applied(1, timeout=10)

    async def behind_y(change: dict[str, Any], arm: bool) -> asyncio.Task[Any]:
        """x's update of c1 committed while x holds y's create of `change` back."""
        gate.clear()
        held.clear()
        await y.store.submit(ops.create(change), "bus")
        await wait_until_async(lambda: held, 10, what="x holding y's change")
        late[0] = arm
        return asyncio.create_task(
            x.store.submit(ops.update("c1", {"name": change["name"]}), "bus")
        )

    done = await behind_y({"id": "c2", "name": "two", "exchange": "bybit"}, arm=True)
    assert (await asyncio.wait_for(done, 20)).name == "two"
    assert x.store.connections["c1"].name == "two" and not late[0]

    x.engine.settings = msgspec.structs.replace(x.engine.settings, publish_timeout_s=0.5)
    unknown = await behind_y({"id": "c3", "name": "three", "exchange": "bybit"}, arm=False)
    with pytest.raises(CtsdError) as info:
        await asyncio.wait_for(unknown, 20)
    assert info.value.code == "unavailable" and "msg_id" in info.value.extra, info.value
    msg_id = info.value.extra["msg_id"]
    assert not x.landed(msg_id)
    gate.set()
    await wait_until_async(lambda: x.store.connections["c1"].name == "three", 10)
    assert x.landed(msg_id)
