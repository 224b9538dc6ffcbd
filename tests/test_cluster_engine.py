"""The cluster engine against a real 3-node NATS JetStream cluster (tests/nats_cluster.py)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import os
import subprocess
import time
import traceback
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
import structlog
from nats.js.api import ObjectMeta, StreamInfo

from ctsd.cluster import engine as engine_module
from ctsd.cluster import streamid
from ctsd.cluster.config import ClusterSettings, Credentials
from ctsd.cluster.engine import ClusterEngine, StreamId
from ctsd.cluster.errors import (
    ApplyFailed,
    BadMessage,
    Conflict,
    InvalidChange,
    PublishRefused,
    StreamMismatch,
    StreamTrimmed,
    Unavailable,
)
from ctsd.cluster.messages import H_CLUSTER, H_HOST, H_MSG_ID, H_SCHEMA, SCHEMA_VERSION, Change
from ctsd.cluster.snapshots import SnapshotInvalid, Snapshots
from tests.daemon import wait_until_async
from tests.nats_cluster import NatsCluster, nats_servers, require_nats_server, stream_leader

pytestmark = pytest.mark.anyio

require_nats_server()

_names = itertools.count(1)


SERVERS = nats_servers()


@pytest.fixture(scope="module", params=SERVERS)
def cluster(request: pytest.FixtureRequest) -> Iterator[NatsCluster]:
    with NatsCluster(3, binary=request.param) as c:
        yield c


@pytest.fixture(params=SERVERS)
def own_cluster(request: pytest.FixtureRequest) -> Iterator[NatsCluster]:
    """A cluster of its own, for tests that kill nodes."""
    with NatsCluster(3, binary=request.param) as c:
        yield c


def make_settings(
    cluster: NatsCluster, name: str | None = None, host: str = "host-a", **kw: object
) -> ClusterSettings:
    return ClusterSettings(
        nats_urls=tuple(cluster.urls),
        name=name or f"t{os.getpid()}x{next(_names)}",
        host_id=host,
        **{"replicas": cluster.size, "publish_timeout_s": 3.0, **kw},  # type: ignore[arg-type]
    )


class Recorder:
    """An apply callback that records what it applied; refuses what `refuse` says."""

    def __init__(self, refuse: Callable[[Change], bool] = lambda c: False) -> None:
        self.changes: list[Change] = []
        self.refuse = refuse

    async def __call__(self, change: Change) -> None:
        if self.refuse(change):
            raise InvalidChange("payload is not a change group")
        self.changes.append(change)

    @property
    def seqs(self) -> list[int]:
        return [c.seq for c in self.changes]

    @property
    def payloads(self) -> list[bytes]:
        return [c.payload for c in self.changes]


@asynccontextmanager
async def running(
    settings: ClusterSettings,
    applied: int = 0,
    recorder: Recorder | None = None,
    wait_s: float = 10,
    **attrs: Any,
) -> AsyncIterator[tuple[ClusterEngine, Recorder]]:
    """`attrs`: set on the engine before it starts (what the app sets: `data_stream`...)."""
    engine = ClusterEngine(settings, heartbeat_s=0.5, refresh_s=0.5)
    for name, value in attrs.items():
        setattr(engine, name, value)
    rec = recorder or Recorder()
    try:
        await engine.start(wait_s=wait_s)
        engine.subscribe_from(applied, rec)
        yield engine, rec
    finally:
        await engine.close()


@asynccontextmanager
async def two_hosts(
    cluster: NatsCluster, recorder_a: Recorder | None = None
) -> AsyncIterator[tuple[ClusterEngine, Recorder, ClusterEngine, Recorder]]:
    """Hosts `host-a` and `host-b` of one new cluster, both caught up."""
    s = make_settings(cluster)
    async with (
        running(s, recorder=recorder_a) as (a, rec_a),
        running(make_settings(cluster, s.name, host="host-b")) as (b, rec_b),
    ):
        await a.catch_up(timeout=10)
        await b.catch_up(timeout=10)
        yield a, rec_a, b, rec_b


async def commit(engine: ClusterEngine, payload: bytes) -> int:
    """What the store does per group: publish against the applied seq, wait until applied."""
    seq = await engine.publish(payload, engine.applied_seq, engine.new_local_id())
    await engine.wait_applied(seq, timeout=10)
    return seq


async def commit_through_faults(
    engine: ClusterEngine,
    payload: bytes,
    apply_own: Callable[[int], Awaitable[None]] | None = None,
    give_up_s: float = 60.0,
) -> int:
    """What a client does through a leader election (which can take nats-server 20 s when
    the votes split): a write answered `unavailable` is sent again, against the same seq and
    with the same id, so one that did reach the stream is found there, never stored twice; a
    write that met another host's is computed again."""
    local_id = engine.new_local_id()
    expected = engine.applied_seq
    retry = False
    deadline = time.monotonic() + give_up_s
    while True:
        try:
            return await engine.commit(payload, expected, local_id, apply_own, retry=retry)
        except Conflict as exc:
            # Catching up may wait for this host's consumer to be made again on the new
            # leader: the same election, so the same deadline.
            left = max(1.0, deadline - time.monotonic())
            await engine.wait_applied(exc.last_seq or 0, timeout=left)
            expected = engine.applied_seq
        except Unavailable as exc:
            if time.monotonic() > deadline:
                raise
            retry = retry or exc.outcome_unknown
            await asyncio.sleep(0.1)  # a client's back-off before it tries again


async def raw_publish(cluster: NatsCluster, subject: str, data: bytes, headers: dict) -> int:
    nc = await nats.connect(cluster.urls)
    try:
        ack = await nc.jetstream().publish(subject, data, headers=headers)
        return ack.seq
    finally:
        await nc.close()


# --- order, dedup, conflicts ------------------------------------------------------------------


async def test_every_host_applies_every_group_in_stream_order(cluster: NatsCluster) -> None:
    async with two_hosts(cluster) as (a, rec_a, b, rec_b):
        seqs = []
        for i in range(5):
            writer = a if i % 2 == 0 else b
            await writer.wait_applied(max(seqs, default=0), timeout=10)
            seqs.append(await commit(writer, f"group {i}".encode()))
        assert seqs == [1, 2, 3, 4, 5]
        await b.wait_applied(5, timeout=10)
        await a.wait_applied(5, timeout=10)
        for rec in (rec_a, rec_b):
            assert rec.seqs == [1, 2, 3, 4, 5]
            assert rec.payloads == [f"group {i}".encode() for i in range(5)]
            assert [c.host for c in rec.changes] == ["host-a", "host-b"] * 2 + ["host-a"]
        assert [c.own for c in rec_a.changes] == [True, False, True, False, True]
        assert a.status().lag == 0 and b.status().applied_seq == 5
        assert a.status().state == "connected" and a.status().ok
        assert msgspec.json.decode(msgspec.json.encode(a.status()))["host_id"] == "host-a"


async def test_a_retried_publish_is_stored_and_applied_once(cluster: NatsCluster) -> None:
    async with running(make_settings(cluster)) as (a, rec):
        await a.catch_up(timeout=10)
        local_id = a.new_local_id()
        first = await a.publish(b"once", 0, local_id)
        again = await a.publish(b"once", 0, local_id)  # the ack was "lost": same id, retried
        assert first == again == 1
        await a.wait_applied(1, timeout=10)
        await commit(a, b"next")
        assert rec.seqs == [1, 2]
        assert rec.payloads == [b"once", b"next"]
        assert rec.changes[0].msg_id == f"host-a:{local_id}"
        # the same host after a restart, publishing a group it kept (the stream has moved
        # on since): found, not stored again, whichever check the stream makes first
        async with running(a.settings) as (restarted, _):
            await restarted.catch_up(timeout=10)
            assert await restarted.publish(b"once", 0, local_id, retry=True) == 1
        assert rec.seqs == [1, 2]


async def test_a_retry_that_cannot_tell_whether_it_was_stored_is_no_conflict(
    cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry meets a message after the expected one, and the stream cannot be read to tell
    whether it is its own (the outage that lost the first answer goes on): the outcome is
    unknown (`unavailable`), never a `conflict` for a change that may be stored."""
    # The server's duplicate window short, so the retry meets the sequence check.
    monkeypatch.setattr(engine_module, "DUPLICATE_WINDOW_S", 0.2)
    async with running(make_settings(cluster, publish_timeout_s=1.0)) as (a, _):
        await a.catch_up(timeout=10)
        local_id = a.new_local_id()
        assert await a.publish(b"once", 0, local_id) == 1
        await asyncio.sleep(0.5)  # the window passes (nothing to poll: the server's clock)
        assert a._js is not None

        async def unreadable(*_args: object, **_kw: object) -> None:
            raise nats.errors.TimeoutError

        monkeypatch.setattr(a._js, "get_msg", unreadable)  # the server's answer, not ctsd's
        deadline = time.monotonic() + 30
        while True:
            with pytest.raises(Unavailable) as info:
                await a.publish(b"once", 0, local_id, retry=True)
            assert info.value.outcome_unknown, info.value
            if "cannot be read now" in str(info.value):
                break
            # An overloaded machine's cluster may not answer the retry in time at all: another
            # unknown outcome, not the one this test is about. Again, once it answers.
            assert time.monotonic() < deadline, str(info.value)
            await asyncio.sleep(0.2)
        with pytest.raises(Conflict):  # a group never sent meets another's: a conflict
            await a.publish(b"other", 0, a.new_local_id())


async def test_a_retry_sent_while_the_first_attempt_is_being_stored_gets_its_seq(
    cluster: NatsCluster,
) -> None:
    """Both attempts on the wire at once: the second meets the first still being stored
    (nats-server 2.10.14 and later answer that apart from a plain duplicate), or already
    stored. Either way it is answered with the first one's seq, and stored once."""
    async with running(make_settings(cluster)) as (a, rec):
        await a.catch_up(timeout=10)
        for i in range(20):
            local_id = a.new_local_id()
            attempts = await asyncio.gather(
                a.publish(b"%d" % i, i, local_id), a.publish(b"%d" % i, i, local_id, retry=True)
            )
            assert attempts == [i + 1, i + 1]
        await a.wait_applied(20, timeout=10)
        assert rec.seqs == list(range(1, 21))
        assert rec.payloads == [b"%d" % i for i in range(20)]


async def test_the_writer_applies_its_own_group_once_others_through_the_stream(
    cluster: NatsCluster,
) -> None:
    async with two_hosts(cluster) as (a, rec_a, b, rec_b):
        own: list[int] = []

        async def apply_own(seq: int) -> None:
            own.append(seq)

        for i in range(3):
            seq = await a.commit(f"g{i}".encode(), a.applied_seq, a.new_local_id(), apply_own)
            assert a.applied_seq == seq
        await b.wait_applied(3, timeout=10)
        await commit(b, b"from b")  # a gets it through its consumer
        await a.wait_applied(4, timeout=10)
        await asyncio.sleep(0)
        # each group applied once on a: its own ones by apply_own (unless the consumer was
        # first), b's by the consumer; never both, never out of order
        assert sorted(own + rec_a.seqs) == [1, 2, 3, 4] and 4 in rec_a.seqs
        assert rec_b.payloads == [b"g0", b"g1", b"g2", b"from b"]

        async def failing(seq: int) -> None:
            raise OSError(5, "Input/output error")

        with pytest.raises(ApplyFailed, match="own change seq") as info:
            while True:  # until the own path (not the consumer) gets to apply one
                await a.commit(b"x", a.applied_seq, a.new_local_id(), failing)
        failed = info.value.seq
        assert failed is not None and a.applied_seq == failed - 1
        assert a.status().stalled == "apply_failed"
        await b.wait_applied(failed, timeout=10)  # it is in the stream: the other host has it


async def test_a_host_behind_gets_conflict_then_writes_after_catching_up(
    cluster: NatsCluster,
) -> None:
    async with two_hosts(cluster) as (a, _, b, rec_b):
        assert await a.publish(b"from a", 0, a.new_local_id()) == 1
        with pytest.raises(Conflict) as info:
            await b.publish(b"from b, computed at seq 0", 0, b.new_local_id())
        assert info.value.expected_seq == 0 and info.value.last_seq == 1
        assert "another host" in str(info.value)
        await b.wait_applied(1, timeout=10)
        assert await b.publish(b"from b, computed at seq 1", 1, b.new_local_id()) == 2
        await b.wait_applied(2, timeout=10)
        assert rec_b.payloads == [b"from a", b"from b, computed at seq 1"]


async def test_of_many_concurrent_writers_at_one_seq_exactly_one_wins(cluster: NatsCluster) -> None:
    s = make_settings(cluster)
    engines = [ClusterEngine(make_settings(cluster, s.name, host=f"h{i}")) for i in range(8)]
    try:
        for e in engines:
            assert await e.start(wait_s=10)
        results = await asyncio.gather(
            *(e.publish(f"w{i}".encode(), 0, e.new_local_id()) for i, e in enumerate(engines)),
            return_exceptions=True,
        )
        wins = [r for r in results if isinstance(r, int)]
        conflicts = [r for r in results if isinstance(r, Conflict)]
        assert wins == [1] and len(conflicts) == 7, results
    finally:
        for e in engines:
            await e.close()


# --- validation: nothing invalid is applied, nothing crashes --------------------------------


@pytest.mark.parametrize(
    ("headers", "expect"),
    [
        ({H_CLUSTER: "other", H_SCHEMA: SCHEMA_VERSION}, "belongs to cluster 'other'"),
        ({H_SCHEMA: "4"}, "schema version '4'; this ctsd applies versions 1, 2, 3 only"),
        ({"Ctsd-Base": "7"}, "has Ctsd-Base '7': not a stream seq before its own"),
        ({"Ctsd-Base": "-1"}, "has Ctsd-Base '-1'"),
        ({"Ctsd-Base": "١"}, "has Ctsd-Base"),
        ({H_SCHEMA: None}, "schema version None"),
        ({"Ctsd-Encoding": "zlib"}, "does not inflate"),
        ({"Ctsd-Encoding": "zstd"}, "unknown encoding 'zstd'"),
        ({H_HOST: None}, "no Nats-Msg-Id or Ctsd-Host header"),
        ({H_HOST: "h" * 5000}, "has Ctsd-Host 'hhhh"),  # shown short, in every status
        ({H_MSG_ID: "x:" + "1" * 5000}, "has Nats-Msg-Id 'x:111"),
        ({H_HOST: "a b"}, "has Ctsd-Host 'a b': not one ctsd writes"),
        # another host's id: its dedup and "has it landed" are by host
        ({H_MSG_ID: "other:1"}, "has Nats-Msg-Id 'other:1': not one ctsd writes"),
        ({"Ctsd-Founding": "founding-x-1"}, "only the stream's first message founds"),
    ],
)
async def test_a_message_of_another_cluster_or_schema_is_refused(
    cluster: NatsCluster, headers: dict, expect: str
) -> None:
    s = make_settings(cluster)
    async with running(s) as (a, rec):
        await a.catch_up(timeout=10)
        await commit(a, b"good")
        base = {
            H_CLUSTER: s.name,
            H_SCHEMA: SCHEMA_VERSION,
            H_HOST: "intruder",
            H_MSG_ID: "intruder:1",
        }
        bad = {k: v for k, v in {**base, **headers}.items() if v is not None}
        seq = await raw_publish(cluster, s.subject, b"not compressed", bad)
        await wait_until_async(lambda: a.state == "stalled", timeout=10, what="stalled")
        status = a.status()
        assert status.stalled == "bad_message" and f"message seq {seq}" in (status.reason or "")
        assert expect in (status.reason or "")
        assert "not applied" in (status.reason or "") and len(status.reason or "") < 500
        assert rec.payloads == [b"good"] and a.applied_seq == 1
        with pytest.raises(Unavailable, match="stopped applying"):
            await a.publish(b"later", 1, a.new_local_id())
        with pytest.raises(BadMessage):
            await a.wait_applied(seq, timeout=5)


async def test_a_message_the_callback_refuses_stops_the_applying_until_resumed(
    cluster: NatsCluster,
) -> None:
    refusing = True
    rec = Recorder(refuse=lambda c: refusing and c.payload == b"garbage")
    async with two_hosts(cluster, recorder_a=rec) as (a, _, b, rec_b):
        await commit(b, b"one")
        await commit(b, b"garbage")
        await commit(b, b"three")
        await wait_until_async(lambda: a.state == "stalled", timeout=10, what="stalled")
        reason = a.status().reason or ""
        assert "message seq 2" in reason and "host-b" in reason
        assert "payload is not a change group" in reason
        assert rec.payloads == [b"one"] and a.applied_seq == 1  # nothing after it either
        assert rec_b.payloads == [b"one", b"garbage", b"three"]
        refusing = False  # e.g. this host was upgraded
        a.resume()
        assert await a.catch_up(timeout=10) == 3
        assert rec.payloads == [b"one", b"garbage", b"three"]
        assert a.status().state == "connected"


async def test_a_host_stalled_from_outside_the_consumer_applies_nothing_until_resumed(
    cluster: NatsCluster,
) -> None:
    """A stall raised by a write (its own group failed to apply) or by the committer stops the
    applying as one the consumer met does: nothing counted as applied under a stall."""
    async with two_hosts(cluster) as (a, rec_a, b, rec_b):
        await b.wait_applied(await commit(a, b"a1"), timeout=10)
        a.stall(ApplyFailed("held for the test", seq=a.applied_seq + 1))
        seq = await commit(b, b"b1")
        await wait_until_async(lambda: (a.status().stream_last_seq or 0) >= seq, timeout=10)
        assert a.applied_seq == seq - 1 and rec_a.payloads == [b"a1"]
        assert a.status().state == "stalled"
        a.resume()
        await a.wait_applied(seq, timeout=10)
        assert rec_a.payloads == rec_b.payloads == [b"a1", b"b1"]


async def test_a_callback_that_crashes_is_reported_not_fatal(cluster: NatsCluster) -> None:
    async def explode(change: Change) -> None:
        raise OSError(28, "No space left on device")

    async with two_hosts(cluster) as (a, _, b, r):
        a._apply = explode  # the store's apply failing on this host only
        await commit(b, b"x")
        await wait_until_async(lambda: a.state == "stalled", timeout=10, what="stalled")
        assert a.status().stalled == "apply_failed"
        assert "No space left on device" in (a.status().reason or "")
        assert a.applied_seq == 0 and r.seqs == [1]


async def test_an_apply_slower_than_the_heartbeat_window_is_not_silence(
    cluster: NatsCluster,
) -> None:
    """The consumer is given up after 3 heartbeats without a message; the time a message
    takes to apply does not count. A slow apply that then fails still stalls the host (its
    error is not lost to a restart), and nothing is applied twice."""
    calls: list[bytes] = []

    async def slow(change: Change) -> None:
        calls.append(change.payload)
        await asyncio.sleep(4 * 0.5)  # 4 heartbeats of running()'s 0.5 s
        if change.payload == b"bad":
            raise OSError(5, "Input/output error")

    async with two_hosts(cluster) as (a, _, b, _r):
        a._apply = slow
        await commit(b, b"slow")
        await wait_until_async(lambda: a.applied_seq == 1, timeout=10, what="applied")
        await commit(b, b"bad")
        await wait_until_async(lambda: a.state == "stalled", timeout=15, what="stalled")
        assert a.status().stalled == "apply_failed"
        assert "Input/output error" in (a.status().reason or "")
        assert calls == [b"slow", b"bad"] and a.applied_seq == 1


# --- catch-up, trimming, history ------------------------------------------------------------


async def history(cluster: NatsCluster, groups: int, **kw: object) -> ClusterSettings:
    """A new cluster whose stream holds `groups` groups b"g0", b"g1", … written by host-a."""
    s = make_settings(cluster, **kw)
    async with running(s) as (a, _):
        await a.catch_up(timeout=10)
        for i in range(groups):
            await commit(a, f"g{i}".encode())
    return make_settings(cluster, s.name, host="late", **kw)


async def test_a_host_far_behind_refuses_writes_until_it_has_caught_up(
    cluster: NatsCluster,
) -> None:
    """A host that finds itself far behind the stream while running (back from a partition,
    a slow disk) refuses writes at once, as a start that did not catch up does: one published
    now would wait for the whole backlog and be answered `unavailable` as it lands."""
    gate = asyncio.Event()

    class Held(Recorder):
        async def __call__(self, change: Change) -> None:
            await gate.wait()
            await super().__call__(change)

    s = make_settings(cluster)
    b_engine = ClusterEngine(
        make_settings(cluster, s.name, host="host-b"), heartbeat_s=0.5, refresh_s=0.2, far_behind=5
    )
    async with running(s) as (a, _):
        await a.catch_up(timeout=10)
        try:
            await b_engine.start(wait_s=10)
            b_engine.subscribe_from(0, Held())
            for i in range(8):
                await commit(a, f"a{i}".encode())
            await wait_until_async(
                lambda: b_engine.status().state == "catching_up",
                timeout=10,
                what="b finding itself far behind",
            )
            t0 = time.monotonic()
            with pytest.raises(Unavailable, match="catching up"):
                await b_engine.publish(b"b", b_engine.applied_seq, b_engine.new_local_id())
            assert time.monotonic() - t0 < 0.5  # at once, nothing sent
            gate.set()
            await b_engine.wait_applied(8, timeout=10)
            await commit(b_engine, b"b after")
            assert b_engine.status().state == "connected"
        finally:
            gate.set()
            await b_engine.close()


async def test_catch_up_applies_everything_after_the_given_seq(cluster: NatsCluster) -> None:
    late = await history(cluster, 6)
    async with running(late, applied=3) as (c, rec):
        assert await c.catch_up(timeout=10) == 6
        assert rec.seqs == [4, 5, 6]
        assert rec.payloads == [b"g3", b"g4", b"g5"]
        assert c.status().lag == 0


async def test_a_host_behind_a_trimmed_stream_is_told_to_take_a_snapshot(
    cluster: NatsCluster,
) -> None:
    late = await history(cluster, 6, max_msgs=3)
    async with running(late, applied=1) as (c, rec):
        with pytest.raises(StreamTrimmed) as info:
            await c.catch_up(timeout=10)
        assert (info.value.applied_seq, info.value.first_seq) == (1, 4)
        assert "snapshot" in str(info.value)
        assert c.status().state == "stalled" and c.status().stalled == "stream_trimmed"
        with pytest.raises(Unavailable):
            await c.publish(b"x", 1, c.new_local_id())
        c.resume(from_seq=5)  # a snapshot of the state at seq 5 was installed
        assert await c.catch_up(timeout=10) == 6
        assert rec.payloads == [b"g5"]


async def test_a_snapshot_installed_while_the_consumer_looks_at_the_stream_is_judged_from(
    cluster: NatsCluster,
) -> None:
    """The consumer asked for the stream's description with the applied seq from before a
    snapshot was installed; its answer comes after the `resume`: judged from the old seq,
    it stalled the engine again as trimmed past (it must look again from the new one)."""
    late = await history(cluster, 6, max_msgs=3)
    engine = ClusterEngine(late, heartbeat_s=0.5, refresh_s=0.5)
    real, held, asked = engine._stream_info, asyncio.Event(), asyncio.Event()

    async def consumer_held() -> Any:
        info = await real()
        if not asked.is_set() and "_consume" in {f.name for f in traceback.extract_stack()}:
            asked.set()
            await held.wait()
        return info

    engine._stream_info = consumer_held  # type: ignore[method-assign]
    rec = Recorder()
    try:
        await engine.start(wait_s=10)
        engine.subscribe_from(1, rec)
        await asyncio.wait_for(asked.wait(), 10)
        with pytest.raises(StreamTrimmed):
            await engine.catch_up(timeout=10)
        engine.resume(from_seq=5)  # a snapshot of the state at seq 5 was installed
        held.set()
        assert await engine.catch_up(timeout=10) == 6
        assert rec.payloads == [b"g5"] and engine.status().state == "connected"
    finally:
        await engine.close()


async def test_a_host_behind_a_trimmed_stream_starts_from_the_snapshot(
    cluster: NatsCluster,
) -> None:
    late = await history(cluster, 6, max_msgs=3)
    async with running(make_settings(cluster, late.name, max_msgs=3), applied=6) as (a, _):
        await a.catch_up(timeout=10)
        snapshots = Snapshots(a)
        assert await snapshots.latest() is None
        assert await snapshots.put(5, b"state at 5" * 100_000)  # several chunks
        assert not await snapshots.put(4, b"older")  # a newer one is kept
    async with running(late, applied=1) as (c, rec):
        with pytest.raises(StreamTrimmed):
            await c.catch_up(timeout=10)
        snap = await Snapshots(c).latest()
        assert snap is not None and (snap.seq, snap.host) == (5, "host-a")
        assert snap.data == b"state at 5" * 100_000
        c.resume(from_seq=snap.seq)  # the store installed it
        assert await c.catch_up(timeout=10) == 6
        assert rec.payloads == [b"g5"]


async def bucket_messages(cluster: NatsCluster, bucket: str) -> int:
    nc = await nats.connect(cluster.urls)
    try:
        return (await nc.jetstream().stream_info(f"OBJ_{bucket}")).state.messages
    finally:
        await nc.close()


async def test_hosts_putting_snapshots_at_once_leave_the_newest_alone(
    cluster: NatsCluster,
) -> None:
    """Each put while another host's is under way: the newest snapshot wins whatever the
    order, and the bucket holds it alone (its 3 chunks and its entry), nothing of the others:
    a bucket that kept every raced snapshot would fill the servers' disks in the end."""
    async with two_hosts(cluster) as (a, _, b, _):
        sa, sb = Snapshots(a), Snapshots(b)
        await sa.ensure()  # the bucket, made once before the race
        for seq_a, seq_b in ((3, 4), (6, 5), (8, 8), (9, 12), (14, 13)):
            put = await asyncio.gather(sa.put(seq_a, b"a" * 300_000), sb.put(seq_b, b"b" * 300_000))
            assert any(put)
        snap = await sa.latest()
        assert snap is not None and snap.seq == 14 and snap.data == b"a" * 300_000
        assert not await sb.put(14, b"same seq again")
        assert not await sb.put(13, b"older")
        assert await bucket_messages(cluster, sa.bucket) == 3 + 1


async def test_a_start_that_did_not_catch_up_in_time_refuses_writes_until_it_has(
    cluster: NatsCluster,
) -> None:
    """The catch-up at start gave up (a long backlog): the host serves on, but it is not
    `connected` and refuses writes at once until it has applied what the stream held, since
    a write would wait for all of it before its answer."""
    s = make_settings(cluster)
    async with running(s) as (a, _):
        await a.catch_up(timeout=10)
        for i in range(5):
            await commit(a, f"m{i}".encode())
    gate = asyncio.Event()

    class Slow(Recorder):
        async def __call__(self, change: Change) -> None:
            await gate.wait()
            await super().__call__(change)

    async with running(make_settings(cluster, s.name, host="host-b"), recorder=Slow()) as (b, rec):
        with pytest.raises(Unavailable, match="applied seq 0 of 5 within"):
            await b.catch_up(timeout=0.3)
        st = b.status()
        assert (st.state, st.ok, st.lag) == ("catching_up", False, 5), st
        assert "applied seq 0 of 5" in (st.reason or "")
        with pytest.raises(Unavailable, match="catching up with the change stream"):
            b.check_writable()
        gate.set()
        await wait_until_async(lambda: b.status().ok, timeout=10, what="caught up")
        assert rec.seqs == [1, 2, 3, 4, 5] and b.status().state == "connected"
        b.check_writable()
        await commit(b, b"now")


async def test_two_daemons_with_one_host_id_stop_applying_and_say_so(cluster: NatsCluster) -> None:
    """A cloned VM keeps its hostname (the default host id): the second daemon's changes would
    be taken for the first's own. The history a restart applies is no twin; a change the
    other publishes after this one started is, and nothing of it is applied."""
    s = make_settings(cluster)
    async with running(s) as (a, rec_a):
        await a.catch_up(timeout=10)
        await commit(a, b"a1")
        async with running(s) as (twin, rec_twin):  # the same host id
            await twin.catch_up(timeout=10)
            assert rec_twin.payloads == [b"a1"] and twin.status().ok  # history: its own
            await twin.publish(b"t1", twin.applied_seq, twin.new_local_id())
            await wait_until_async(lambda: a.state == "stalled", timeout=10, what="stalled")
            st = a.status()
            assert st.stalled == "duplicate_host" and "message seq 2" in (st.reason or "")
            assert "two daemons run as one host" in (st.reason or ""), st
            assert rec_a.payloads == [b"a1"] and a.applied_seq == 1
            with pytest.raises(Unavailable, match="stopped applying"):
                a.check_writable()


async def test_a_host_knows_its_earlier_starts_and_applies_a_gone_twins_as_anothers(
    cluster: NatsCluster,
) -> None:
    """A message of this data dir's previous start that lands after this one began (sent as
    the quorum was lost, stored once it was back) is its own, no twin. A twin's message from
    before this start (the twin since given an id of its own) is applied as another host's."""
    s = make_settings(cluster)
    async with running(s) as (old, _):
        await old.catch_up(timeout=10)
        await commit(old, b"old1")
        async with running(s) as (new, rec_new):
            new.earlier_boots = frozenset({old.boot})  # as `boots.remember` gives it
            await new.catch_up(timeout=10)
            await old.publish(b"late", old.applied_seq, old.new_local_id())
            await wait_until_async(lambda: new.applied_seq == 2, timeout=10, what="applied")
            assert new.status().ok and [c.own for c in rec_new.changes] == [True, True]
    async with running(s) as (again, rec):  # a start that knows nothing of `old`'s boot
        await again.catch_up(timeout=10)
        assert rec.payloads == [b"old1", b"late"] and again.status().ok
        assert [c.own for c in rec.changes] == [False, False]


@pytest.fixture
def one_node(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(1, workdir=tmp_path) as c:
        yield c


async def test_a_start_that_never_reached_the_stream_catches_up_before_writes(
    one_node: NatsCluster,
) -> None:
    """The catch-up at start gave up before it saw the stream (NATS down): once it is back,
    the backlog it then finds is applied before writes are taken."""
    one = one_node
    s = make_settings(one, replicas=1)
    async with running(s) as (a, _):
        await a.catch_up(timeout=10)
        for i in range(3):
            await commit(a, f"m{i}".encode())
    one.kill(0)  # (at once: a clean stop takes seconds)
    gate = asyncio.Event()

    class Slow(Recorder):
        async def __call__(self, change: Change) -> None:
            await gate.wait()
            await super().__call__(change)

    b_settings = make_settings(one, s.name, host="host-b", replicas=1)
    async with running(b_settings, recorder=Slow(), wait_s=0.1) as (b, rec):
        with pytest.raises(Unavailable):
            await b.catch_up(timeout=0.3)
        await asyncio.to_thread(one.start_node, 0)
        await wait_until_async(
            lambda: b.status().state == "catching_up", timeout=20, what="catching up"
        )
        with pytest.raises(Unavailable, match="applied seq 0 of 3"):
            b.check_writable()
        gate.set()
        await wait_until_async(lambda: b.status().ok, timeout=10, what="caught up")
        assert rec.seqs == [1, 2, 3]


async def test_chunks_of_an_upload_cut_short_are_removed_once_old(cluster: NatsCluster) -> None:
    """A host killed while it put a snapshot leaves chunks no entry names: a later put removes
    them once they are old enough that no upload can still be under way, and only then."""
    async with running(make_settings(cluster)) as (a, _):
        await a.catch_up(timeout=10)
        snapshots = Snapshots(a)
        assert await snapshots.put(2, b"x" * 1000)
        nc = await nats.connect(cluster.urls)
        try:
            for _ in range(2):  # an upload cut after two chunks: no entry written
                await nc.jetstream().publish(f"$O.{snapshots.bucket}.C.cutshort", b"c" * 1000)
        finally:
            await nc.close()
        assert await snapshots.put(3, b"y" * 1000)  # too fresh: may be an upload under way
        assert await bucket_messages(cluster, snapshots.bucket) == 1 + 1 + 2
        assert await Snapshots(a, orphan_after_s=0.0).put(4, b"z" * 1000)
        assert await bucket_messages(cluster, snapshots.bucket) == 1 + 1
        snap = await snapshots.latest()
        assert snap is not None and (snap.seq, snap.data) == (4, b"z" * 1000)


async def test_a_snapshot_removed_while_read_is_unavailable_not_a_hang(
    cluster: NatsCluster,
) -> None:
    """Chunks that stop coming (removed by a newer put, or by hand): the reader gives up in
    bounded time with `unavailable`, and reads a snapshot put afterwards."""
    async with running(make_settings(cluster)) as (a, _):
        await a.catch_up(timeout=10)
        snapshots = Snapshots(a, timeout_s=0.3)
        assert await snapshots.put(2, b"x" * 300_000)
        nc = await nats.connect(cluster.urls)
        try:
            chunks = f"$O.{snapshots.bucket}.C.>"
            await nc.jetstream().purge_stream(f"OBJ_{snapshots.bucket}", subject=chunks)
        finally:
            await nc.close()
        started = time.monotonic()
        with pytest.raises(Unavailable, match="stopped coming"):
            await snapshots.latest()
        assert time.monotonic() - started < 5
        assert await snapshots.put(3, b"y" * 1000)
        snap = await snapshots.latest()
        assert snap is not None and (snap.seq, snap.data) == (3, b"y" * 1000)
        # A newer entry whose data are gone (a put that failed once its entry was stored):
        # read in vain twice, then the next newest is used.
        store = await a.jetstream().object_store(snapshots.bucket)
        info = await store.put("snapshot-4-x", b"z" * 1000, meta=snapshots._meta("snapshot-4-x", 4))
        await a.jetstream().purge_stream(
            f"OBJ_{snapshots.bucket}", subject=f"$O.{snapshots.bucket}.C.{info.nuid}"
        )
        snap = await snapshots.latest()
        assert snap is not None and (snap.seq, snap.data) == (3, b"y" * 1000)


async def test_a_bucket_entry_that_does_not_decode_is_named_then_removed(
    cluster: NatsCluster,
) -> None:
    async with running(make_settings(cluster)) as (a, _):
        await a.catch_up(timeout=10)
        snapshots = Snapshots(a)
        assert await snapshots.put(2, b"good")
        nc = await nats.connect(cluster.urls)
        try:
            name = base64.urlsafe_b64encode(b"snapshot-9-x").decode()
            await nc.jetstream().publish(f"$O.{snapshots.bucket}.M.{name}", b"{not json")
        finally:
            await nc.close()
        with pytest.raises(SnapshotInvalid, match=r"snapshot-9-x .* is not a valid object entry"):
            await snapshots.latest()
        assert await snapshots.put(3, b"newer")  # ... and removed by the next put
        snap = await snapshots.latest()
        assert snap is not None and snap.data == b"newer"
        assert await bucket_messages(cluster, snapshots.bucket) == 1 + 1


async def test_a_snapshot_of_a_stream_deleted_and_created_again_is_refused(
    cluster: NatsCluster,
) -> None:
    """The bucket outlives a stream deleted by hand: its snapshots count seqs of that stream,
    so a host of the new one refuses them (a put on the new stream then removes them)."""
    s = make_settings(cluster)
    async with running(s) as (a, _):
        await a.catch_up(timeout=10)
        await commit(a, b"old stream")
        assert await Snapshots(a).put(1, b"state of the old stream")
        nc = await nats.connect(cluster.urls)
        try:
            await nc.jetstream().delete_stream(a.stream)
        finally:
            await nc.close()
    async with running(s) as (b, _):  # creates the stream again, same name
        await b.catch_up(timeout=10)
        snapshots = Snapshots(b)
        with pytest.raises(SnapshotInvalid, match="created again"):
            await snapshots.latest()
        assert await snapshots.put(1, b"state of the new stream")
        snap = await snapshots.latest()
        assert snap is not None and snap.data == b"state of the new stream"


async def test_a_snapshot_whose_seq_is_no_number_is_refused_not_a_crash(
    cluster: NatsCluster,
) -> None:
    s = make_settings(cluster)
    nc = await nats.connect(cluster.urls)
    store = await nc.jetstream().create_object_store(f"ctsd_{s.name}_snapshots")
    headers = {H_CLUSTER: s.name, H_SCHEMA: "1", "Ctsd-Seq": "9" * 5000}
    await store.put("snapshot-9-x", b"x", meta=ObjectMeta(name="snapshot-9-x", headers=headers))
    await nc.close()
    async with running(s) as (a, _):
        await a.catch_up(timeout=10)
        with pytest.raises(SnapshotInvalid, match="no valid Ctsd-Seq header"):
            await Snapshots(a).latest()


async def test_a_snapshot_of_another_schema_is_refused(cluster: NatsCluster) -> None:
    s = make_settings(cluster)
    nc = await nats.connect(cluster.urls)
    store = await nc.jetstream().create_object_store(f"ctsd_{s.name}_snapshots")
    headers = {H_CLUSTER: s.name, H_SCHEMA: "2", "Ctsd-Seq": "3"}
    await store.put("latest", b"x", meta=ObjectMeta(name="latest", headers=headers))
    await nc.close()
    async with running(s) as (a, _):
        await a.catch_up(timeout=10)
        with pytest.raises(SnapshotInvalid, match="schema version '2'"):
            await Snapshots(a).latest()


async def test_a_host_ahead_of_the_stream_refuses_it(cluster: NatsCluster) -> None:
    s = make_settings(cluster)
    async with running(s, applied=100) as (a, rec):
        with pytest.raises(StreamMismatch, match="ends at seq 0"):
            await a.catch_up(timeout=10)
        assert a.status().stalled == "stream_mismatch" and rec.changes == []


async def test_a_data_dir_of_another_stream_never_applies_a_longer_one(
    cluster: NatsCluster,
) -> None:
    """A data dir that applied another cluster's stream, or this stream before it was deleted
    and made again, up to a seq the configured stream has passed: continuing from that seq
    would fork the hosts. Refused, nothing applied; the stream a host applies is kept before
    any of it, and the same stream is applied on."""
    late = await history(cluster, 3)
    for known in (
        StreamId("CTSD_another", "2026-01-02T03:04:05+00:00"),
        StreamId(late.stream, "2020-01-02T03:04:05+00:00"),
    ):
        async with running(late, applied=1, data_stream=known) as (a, rec):
            with pytest.raises(StreamMismatch, match="belongs to another cluster") as e:
                await a.catch_up(timeout=10)
            assert known.stream in str(e.value) and a.stream_created in str(e.value)
            assert a.status().stalled == "stream_mismatch" and rec.changes == []
    kept: list[StreamId] = []
    async with running(late, keep_stream_id=kept.append) as (a, rec):
        assert await a.catch_up(timeout=10) == 3
        assert kept == [StreamId(late.stream, a.stream_created)] and a.stream_created
    async with running(late, applied=3, data_stream=kept[0], keep_stream_id=kept.append) as (
        b,
        _,
    ):
        assert await b.catch_up(timeout=10) == 3 and len(kept) == 1
    # An older ctsd's data dir says nothing: the stream it applies is kept from now on.
    async with running(late, applied=2, keep_stream_id=kept.append) as (c, rec):
        assert await c.catch_up(timeout=10) == 3 and rec.seqs == [3]
        assert kept[1:] == kept[:1]


async def test_a_stream_made_again_while_a_host_runs_is_not_applied(cluster: NatsCluster) -> None:
    """The stream deleted and made again (same name) while a host runs, and longer than what
    the host applied by the time it looks again: it applies none of it."""
    s = make_settings(cluster)
    async with running(s, keep_stream_id=lambda _sid: None) as (a, rec):
        await a.catch_up(timeout=10)
        for i in range(2):
            await commit(a, f"g{i}".encode())
        nc = await nats.connect(cluster.urls)
        js = nc.jetstream()
        config = (await js.stream_info(s.stream)).config
        await js.delete_stream(s.stream)
        await js.add_stream(config)
        for n in range(1, 5):
            headers = {
                H_CLUSTER: s.name,
                H_SCHEMA: SCHEMA_VERSION,
                H_HOST: "host-z",
                H_MSG_ID: f"host-z:{n}",
            }
            await js.publish(s.subject, f"new{n}".encode(), headers=headers)
        await nc.close()
        await wait_until_async(lambda: a.state == "stalled", timeout=15, what="stalled")
        assert a.status().stalled == "stream_mismatch", a.status()
        assert "made again" in (a.status().reason or "")
        assert rec.payloads == [b"g0", b"g1"]


def test_the_stream_of_a_data_dir_is_kept_on_disk(tmp_path: Path) -> None:
    assert streamid.read(tmp_path) is None
    sid = StreamId("CTSD_desk", "2026-01-02T03:04:05+00:00")
    streamid.write(tmp_path, sid)
    assert streamid.read(tmp_path) == sid
    (tmp_path / streamid.NAME).write_text("{not json")
    assert streamid.read(tmp_path) is None  # (logged: only the check is lost)


async def test_messages_deleted_from_the_stream_by_hand_are_skipped(cluster: NatsCluster) -> None:
    late = await history(cluster, 3)
    nc = await nats.connect(cluster.urls)
    await nc.jetstream().delete_msg(late.stream, 2)
    await nc.close()
    async with running(late) as (c, rec):
        assert await c.catch_up(timeout=10) == 3
        assert rec.seqs == [1, 3]


async def test_a_stream_of_the_same_name_with_other_subjects_is_not_used(
    cluster: NatsCluster,
) -> None:
    s = make_settings(cluster)
    nc = await nats.connect(cluster.urls)
    await nc.jetstream().add_stream(name=s.stream, subjects=[f"other.{s.name}"])
    await nc.close()
    async with running(s) as (a, _):
        with pytest.raises(StreamMismatch, match="not this cluster's change stream"):
            await a.catch_up(timeout=10)
        assert a.status().state == "stalled"
        assert "not this cluster's change stream" in (a.status().reason or "")


# --- payloads ---------------------------------------------------------------------------------


async def test_groups_are_compressed_and_too_big_ones_refused(cluster: NatsCluster) -> None:
    s = make_settings(cluster)
    async with running(s) as (a, rec):
        await a.catch_up(timeout=10)
        big = b'{"id": "conn-0001", "name": "a connection"}\n' * 200_000  # ~9 MB, compresses
        small = b'{"id": "conn-0001"}'
        usual = b'{"id": "conn-0001", "name": "a connection"}\n' * 50  # a few connections
        stored = []
        nc = await nats.connect(cluster.urls)
        try:
            random = os.urandom(4096)  # does not shrink
            for payload in (big, small, usual, random):
                seq = await commit(a, payload)
                assert rec.changes[-1].seq == seq and rec.changes[-1].payload == payload
                msg = await nc.jetstream().get_msg(s.stream, seq=seq)
                stored.append(((msg.headers or {}).get("Ctsd-Encoding"), len(msg.data or b"")))
        finally:
            await nc.close()
        assert stored[0][0] == "zlib" and stored[0][1] < len(big) // 10
        assert stored[1] == (None, len(small))  # not worth it
        assert stored[2][0] == "zlib" and stored[2][1] < len(usual) // 2
        assert stored[3] == (None, len(random))
        noise = os.urandom(9 * 1024 * 1024)
        with pytest.raises(PublishRefused, match="max_payload"):
            await a.publish(noise, a.applied_seq, a.new_local_id())


# --- faults -----------------------------------------------------------------------------------


async def test_the_stream_leader_killed_writes_go_on(own_cluster: NatsCluster) -> None:
    s = make_settings(own_cluster, publish_timeout_s=10.0)
    async with running(s) as (a, rec):
        await a.catch_up(timeout=10)
        await commit(a, b"before")
        index = await stream_leader(own_cluster, s.stream)
        own_cluster.kill(index)
        await commit_through_faults(a, b"leader down")  # a new leader is elected meanwhile
        await asyncio.to_thread(own_cluster.start_node, index)  # the engines run meanwhile
        await commit(a, b"leader back")
        assert rec.payloads == [b"before", b"leader down", b"leader back"]
        assert a.status().state == "connected"


@asynccontextmanager
async def split_hosts(
    cluster: NatsCluster, publish_timeout_s: float
) -> AsyncIterator[tuple[ClusterEngine, Recorder, ClusterEngine, Recorder]]:
    """host-a given only node n1's URL, host-b the other two; a has committed b"a1"."""
    s = make_settings(cluster, publish_timeout_s=publish_timeout_s)
    only_n1 = msgspec.structs.replace(s, nats_urls=(cluster.nodes[0].url,))
    others = msgspec.structs.replace(
        s, host_id="host-b", nats_urls=tuple(n.url for n in cluster.nodes[1:])
    )
    async with running(only_n1) as (a, rec_a), running(others) as (b, rec_b):
        await a.catch_up(timeout=10)
        await b.catch_up(timeout=10)
        await commit(a, b"a1")
        await b.wait_applied(1, timeout=10)
        yield a, rec_a, b, rec_b


async def test_a_host_whose_node_dies_moves_to_another_and_misses_nothing(
    own_cluster: NatsCluster,
) -> None:
    async with split_hosts(own_cluster, 10.0) as (a, rec_a, b, rec_b):
        own_cluster.kill(0)  # a's server; a learned the others' URLs from it
        for i in range(5):
            await commit(b, f"b{i}".encode())
        await a.wait_applied(6, timeout=20)  # reconnected elsewhere, consumer made again
        assert a.status().server != own_cluster.nodes[0].url
        await commit(a, b"a2")
        await b.wait_applied(7, timeout=10)
        expected = [b"a1", *(f"b{i}".encode() for i in range(5)), b"a2"]
        assert rec_a.payloads == rec_b.payloads == expected


@pytest.fixture
def cut_cluster() -> Iterator[NatsCluster]:
    """A cluster whose clients learn no other node: a client whose node is down is cut off."""
    with NatsCluster(3, no_advertise=True) as c:
        yield c


async def test_a_host_cut_off_refuses_writes_then_catches_up_when_healed(
    cut_cluster: NatsCluster,
) -> None:
    async with split_hosts(cut_cluster, 1.0) as (a, rec_a, b, rec_b):
        cut_cluster.stop(0)
        await wait_until_async(lambda: a.state == "disconnected", timeout=10)
        with pytest.raises(Unavailable):
            await a.publish(b"while cut", a.applied_seq, a.new_local_id())
        for i in range(3):
            await commit(b, f"b{i}".encode())
        assert a.applied_seq == 1 and rec_a.payloads == [b"a1"]  # reads: what it had
        await asyncio.to_thread(cut_cluster.start_node, 0)
        await a.wait_applied(4, timeout=20)
        await wait_until_async(lambda: a.state == "connected", timeout=10)
        await commit(a, b"a2")
        await b.wait_applied(5, timeout=10)
        expected = [b"a1", b"b0", b"b1", b"b2", b"a2"]
        assert rec_a.payloads == rec_b.payloads == expected


async def test_a_host_stalled_while_cut_off_takes_writes_once_resumed(
    cut_cluster: NatsCluster,
) -> None:
    """A host cut off for longer than the publish timeout, stalled before it saw the stream
    answer again (a running host finding the stream trimmed past it as it reconnects), then
    resumed once a snapshot is installed: it writes at once, not only after another outage."""
    async with split_hosts(cut_cluster, 1.0) as (a, rec_a, _, _):
        cut_cluster.stop(0)
        await wait_until_async(lambda: a.state == "disconnected", timeout=10)

        def refused_at_once() -> bool:
            try:
                a.check_writable()
            except Unavailable:
                return True
            return False

        await wait_until_async(refused_at_once, timeout=10)  # down past the publish timeout
        a.stall(StreamTrimmed(applied_seq=1, first_seq=3))
        await asyncio.to_thread(cut_cluster.start_node, 0)
        await wait_until_async(lambda: a.status().server is not None, timeout=20)
        a.resume()
        assert a.state == "connected"
        a.check_writable()
        await commit(a, b"a2")
        assert rec_a.payloads == [b"a1", b"a2"]


async def test_three_hosts_writing_at_once_converge_through_a_leader_kill(
    own_cluster: NatsCluster,
) -> None:
    """A storm of commits from 3 hosts (4 writers each, conflicts and refusals retried), the
    stream leader killed and restarted in the middle: every host applies the same groups in
    the same order, every acknowledged group exactly once at the seq it was acknowledged
    with, no gap."""
    s = make_settings(own_cluster, publish_timeout_s=10.0)
    recs = [Recorder() for _ in range(3)]
    engines = [
        ClusterEngine(make_settings(own_cluster, s.name, host=f"h{i}", publish_timeout_s=10.0))
        for i in range(3)
    ]
    acked: dict[bytes, int] = {}
    own_applied: dict[int, list[int]] = {i: [] for i in range(3)}

    async def writer(i: int, w: int, count: int) -> None:
        e = engines[i]

        async def apply_own(seq: int) -> None:
            own_applied[i].append(seq)

        for k in range(count):
            payload = f"h{i} w{w} #{k}".encode()
            seq = await commit_through_faults(e, payload, apply_own if w % 2 else None)
            assert payload not in acked
            acked[payload] = seq

    try:
        for i, e in enumerate(engines):
            assert await e.start(wait_s=10)
            e.subscribe_from(0, recs[i])
            await e.catch_up(timeout=10)
        storm = [asyncio.create_task(writer(i, w, 15)) for i in range(3) for w in range(4)]
        await wait_until_async(lambda: len(acked) >= 40, timeout=30, what="40 acks")
        index = await stream_leader(own_cluster, s.stream)
        own_cluster.kill(index)
        await wait_until_async(lambda: len(acked) >= 100, timeout=60, what="100 acks")
        own_cluster.start_node(index, wait=False)
        await asyncio.wait_for(asyncio.gather(*storm), 90)
        last = max(acked.values())
        for e in engines:
            await e.wait_applied(last, timeout=20)
    finally:
        for e in engines:
            await e.close()
    assert len(acked) == 3 * 4 * 15
    assert sorted(acked.values()) == list(range(1, last + 1))  # no gap, nothing unacked
    by_seq = {seq: payload for payload, seq in acked.items()}
    for i, rec in enumerate(recs):
        applied = sorted(rec.seqs + own_applied[i])
        assert applied == list(range(1, last + 1)), f"host h{i}"
        assert rec.seqs == sorted(rec.seqs)  # in order
        assert all(c.payload == by_seq[c.seq] for c in rec.changes)
        assert not set(rec.seqs) & set(own_applied[i])  # never applied twice


async def test_a_leader_left_alone_is_not_taken_for_a_quorum(own_cluster: NatsCluster) -> None:
    """The stream's leader, its two replicas killed, goes on calling them `current` for about
    ten seconds; the host (connected to that leader, so it sees no disconnect) must say it
    cannot write well before that, and stay so after a write failed, until they are back."""
    s = make_settings(own_cluster)
    async with running(s) as (a, _rec):
        await a.catch_up(timeout=10)
        await commit(a, b"before")
        index = await stream_leader(own_cluster, s.stream)
    alone = msgspec.structs.replace(s, nats_urls=(own_cluster.urls[index],))
    async with running(alone) as (a, _rec):
        await a.catch_up(timeout=10)
        assert a.status().ok
        killed_at = time.monotonic()
        for i in range(3):
            if i != index:
                own_cluster.kill(i)
        await wait_until_async(lambda: not a.status().ok, timeout=20, what="not healthy")
        assert time.monotonic() - killed_at < 8, "taken for healthy as long as NATS says current"
        assert "replicas current" in (a.status().reason or ""), a.status()
        with pytest.raises(Unavailable):
            await a.publish(b"alone", a.applied_seq, a.new_local_id())
        until = time.monotonic() + 3  # the leader still calls its replicas current meanwhile
        while time.monotonic() < until:
            assert not a.status().ok, a.status()
            await asyncio.sleep(0.1)
        for i in range(3):
            if i != index:
                own_cluster.start_node(i, wait=False)
        for i in range(3):
            if i != index:
                await asyncio.to_thread(own_cluster.wait_node, i)
        await wait_until_async(lambda: a.status().ok, timeout=30, what="healthy again")
        # The refused write may have been stored once the replicas were back (its outcome
        # was unknown): the next one is computed on what the stream holds, as the store's is.
        await a.catch_up(timeout=30)
        await commit(a, b"after")


async def test_a_description_without_a_leader_is_not_taken_for_another_stream(
    cluster: NatsCluster,
) -> None:
    """When two of three nodes die, the one left answers a description of the stream without
    a leader, from its own copy: behind what the host applied if it had fallen behind (seen
    in a run that paused one node: "applied up to seq 6, but the stream ends at seq 2"). That
    is no other stream, nor a trimmed one: the host waits for a leader, never stalled (which
    lasts until a restart). The answer is the real server's, made as such a node's is."""
    async with running(make_settings(cluster)) as (a, rec):
        await a.catch_up(timeout=10)
        for i in range(3):
            await commit(a, f"c{i}".encode())
        js = a._js
        assert js is not None
        described = js.stream_info

        async def left_behind(*args: object, **kw: object) -> StreamInfo:
            info = await described(*args, **kw)  # type: ignore[arg-type]
            assert info.cluster is not None
            return dataclasses.replace(
                info,
                cluster=dataclasses.replace(info.cluster, leader=None),
                state=dataclasses.replace(info.state, first_seq=2, last_seq=1),
            )

        js.stream_info = left_behind  # type: ignore[method-assign]
        try:
            with pytest.raises(Unavailable, match="no leader"):
                await a.catch_up(timeout=1.0)
            with pytest.raises(Unavailable, match="no leader"):
                await a.stream_bounds()
            await wait_until_async(lambda: "no leader" in (a.status().reason or ""), timeout=5)
            assert a.stalled_by is None
        finally:
            js.stream_info = described  # type: ignore[method-assign]
        assert await a.catch_up(timeout=10) == 3
        await commit(a, b"after")
        assert a.stalled_by is None and rec.payloads == [b"c0", b"c1", b"c2", b"after"]


async def test_all_nodes_down_writes_are_unavailable_then_recover(own_cluster: NatsCluster) -> None:
    s = make_settings(own_cluster, publish_timeout_s=1.0)
    async with running(s) as (a, rec):
        await a.catch_up(timeout=10)
        await commit(a, b"before")
        outages = a.outages
        for i in range(3):
            own_cluster.kill(i)
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as info:
            await a.publish(b"while down", a.applied_seq, a.new_local_id())
        assert time.monotonic() - t0 < 2.5
        assert info.value.reason
        await wait_until_async(lambda: a.state == "disconnected", timeout=10, what="down")
        assert a.status().server is None and a.status().reason and not a.status().ok
        t0 = time.monotonic()
        with pytest.raises(Unavailable):  # down longer than the timeout: refused at once
            await a.publish(b"still down", a.applied_seq, a.new_local_id())
        assert time.monotonic() - t0 < 0.5
        for i in range(3):
            own_cluster.start_node(i, wait=False)
        for i in range(3):
            await asyncio.to_thread(own_cluster.wait_node, i)
        await wait_until_async(lambda: a.state == "connected", timeout=20, what="reconnected")
        deadline = time.monotonic() + 20
        while True:  # the stream may need a moment to elect its leader again
            try:
                await commit(a, b"after")
                break
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
        assert rec.payloads[0] == b"before" and rec.payloads[-1] == b"after"
        assert b"still down" not in rec.payloads
        assert a.outages == outages + 1  # one outage, however many states it went through


async def test_a_connection_the_client_gave_up_is_made_again(one_node: NatsCluster) -> None:
    """nats-py gives a connection up for good, reconnecting no more, after some errors from
    the server. Here: a message over a max_payload lowered (and reloaded) since the connection
    was made, which makes the server drop it. The engine connects again, learns the new limit
    (that group is refused, never sent again to be dropped again) and goes on."""
    c = one_node
    async with running(make_settings(c, replicas=1)) as (a, rec):
        await a.catch_up(timeout=10)
        await commit(a, b"before")
        snapshots = Snapshots(a)
        assert await snapshots.put(1, b"snapshot at 1")
        c.max_payload = 4096
        await asyncio.to_thread(c.reload, 0)
        with structlog.testing.capture_logs() as logs:
            # refused as too large (the server refuses such a message whole: not stored)
            with pytest.raises(PublishRefused, match="at most 3072"):
                await a.publish(os.urandom(20_000), a.applied_seq, a.new_local_id())
            await wait_until_async(lambda: a.state == "connected", timeout=15)
        closed = [e for e in logs if e["event"] == "cluster.connection_closed"]
        assert closed and "maximum payload" in closed[0]["reason"].lower(), logs  # its reason
        seq = await commit(a, b"after")
        assert rec.payloads == [b"before", b"after"]
        assert await snapshots.put(seq, b"snapshot after")  # the bucket's handle made anew
        snap = await snapshots.latest()
        assert snap is not None and snap.data == b"snapshot after"
        with pytest.raises(PublishRefused, match="at most"):  # TooLarge, before sending
            await a.publish(os.urandom(20_000), a.applied_seq, a.new_local_id())
        await commit(a, b"last")
        assert rec.payloads == [b"before", b"after", b"last"]


async def test_an_unreachable_engine_at_start_is_a_state_not_a_crash() -> None:
    s = ClusterSettings(
        nats_urls=("nats://127.0.0.1:1",), name="nowhere", host_id="h", publish_timeout_s=0.5
    )
    engine = ClusterEngine(s, connect_timeout_s=0.5)
    try:
        assert await engine.start(wait_s=1.0) is False
        status = engine.status()
        assert status.state == "disconnected" and "cannot connect" in (status.reason or "")
        engine.subscribe_from(0, Recorder())
        with pytest.raises(Unavailable):
            await engine.catch_up(timeout=0.5)
        with pytest.raises(Unavailable):
            await engine.publish(b"x", 0, engine.new_local_id())
    finally:
        await engine.close()
    assert engine.state == "closed"


# --- credentials ------------------------------------------------------------------------------

CANARY = "canary-password-5f2b9c"


@pytest.fixture(scope="module")
def auth_server() -> Iterator[NatsCluster]:
    with NatsCluster(1, auth={"user": "ctsd", "password": CANARY}) as c:
        yield c


async def test_credentials_connect_and_wrong_ones_are_named_never_shown(
    auth_server: NatsCluster,
) -> None:
    good = Credentials(kind="user_password", source="/creds", user="ctsd", password=CANARY)
    s = make_settings(auth_server, credentials=good, replicas=1)
    async with running(s) as (a, rec):
        assert await a.catch_up(timeout=10) == 0
        await commit(a, b"ok")
        assert rec.payloads == [b"ok"]
    bad = Credentials(kind="user_password", source="/creds", user="ctsd", password="wrong-pw")
    shown = repr(good) + str(bad)
    # wrong credentials name the file they came from; none at all say where they are looked for
    for creds, hint in ((bad, "from /creds"), (None, "CTSD_CLUSTER_CREDS_FILE")):
        with structlog.testing.capture_logs() as logs:
            engine = ClusterEngine(make_settings(auth_server, credentials=creds, replicas=1))
            try:
                assert await engine.start(wait_s=1.5) is False
                await wait_until_async(
                    lambda e=engine: "Authorization" in (e.status().reason or ""), timeout=10
                )
                assert hint in (engine.status().reason or ""), engine.status()
                with pytest.raises(Unavailable) as info:
                    await engine.publish(b"x", 0, engine.new_local_id())
                assert hint in str(info.value)
            finally:
                await engine.close()
        shown += repr(logs) + repr(engine.status()) + str(info.value)
    assert CANARY not in shown and "wrong-pw" not in shown


async def test_the_close_after_a_refusal_does_not_hide_it() -> None:
    """The server refuses the credentials, then closes the connection; each retry may see
    the close (a reset) as its error: the refusal, the one thing the operator can act on,
    stays the reason. (The engine is not started: errors come as nats-py reports them.)"""
    creds = Credentials(kind="user_password", source="/creds", user="ctsd", password="x")
    settings = ClusterSettings(nats_urls=("nats://127.0.0.1:1",), name="t", host_id="a")
    engine = ClusterEngine(msgspec.structs.replace(settings, credentials=creds))
    await engine._on_error(nats.errors.Error("nats: 'Authorization Violation'"))
    for _ in range(2):
        await engine._on_error(ConnectionResetError(104, "Connection reset by peer"))
        assert "'Authorization Violation' (with the user/password from /creds)" in (
            engine.status().reason or ""
        ), engine.status()
    await engine._on_error(OSError(111, "Connect call failed"))  # another error: shown
    assert "Connect call failed" in (engine.status().reason or "")


async def test_a_refusal_while_reconnecting_is_the_reason_shown() -> None:
    """Connected once, then the servers stop taking the credentials (a rotation done in the
    wrong order): each reconnect is refused, and the state says so, not the EOF that cut the
    connection. (The engine is not started: the callbacks come as nats-py calls them.)"""
    creds = Credentials(kind="user_password", source="/creds", user="ctsd", password="x")
    settings = ClusterSettings(nats_urls=("nats://127.0.0.1:1",), name="t", host_id="a")
    engine = ClusterEngine(msgspec.structs.replace(settings, credentials=creds))
    engine._nc = types.SimpleNamespace(is_connected=False, connected_url=None)  # (once made)
    await engine._on_error(nats.errors.UnexpectedEOF())
    await engine._on_disconnected()
    assert "unexpected EOF" in (engine.status().reason or ""), engine.status()
    await engine._on_error(nats.errors.Error("nats: 'Authorization Violation'"))
    reason = engine.status().reason or ""
    assert "'Authorization Violation' (with the user/password from /creds)" in reason, reason


async def test_a_consumer_that_keeps_failing_retries_less_often_and_says_it_once(
    cluster: NatsCluster,
) -> None:
    """The stream deleted by hand (or the servers' storage lost): the consumer cannot be
    made again; tried less and less often, one log line for the one reason (it was ten a
    second)."""
    s = make_settings(cluster)
    async with running(s) as (a, _):
        await a.catch_up(timeout=10)
        nc = await nats.connect(cluster.urls)
        try:
            with structlog.testing.capture_logs() as logs:
                await nc.jetstream().delete_stream(a.stream)
                await asyncio.sleep(2)  # (the retries over a window: what is measured)
        finally:
            await nc.close()
    retries = [e for e in logs if e["event"] == "cluster.consumer_retry"]
    assert 1 <= len(retries) <= 2, retries


@pytest.mark.parametrize("binary", SERVERS)
def test_the_example_server_config_is_valid(binary: str) -> None:
    conf = Path(__file__).resolve().parents[1] / "systemd" / "nats-server.conf.example"
    res = subprocess.run([binary, "-c", str(conf), "-t"], capture_output=True, text=True)
    assert res.returncode == 0 and "is valid" in res.stdout + res.stderr, res
