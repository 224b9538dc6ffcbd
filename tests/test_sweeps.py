"""Heartbeats, the stale sweep, periodic tests and live settings, in-process.

A real `Store` on a tmp dir with `sweeps.run(app)` running as in the daemon; writes are
counted exactly (the store's stamp of connection-state.json changes on every write of it).
Every wait polls with a deadline; nothing sleeps blindly.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import structlog.testing

from ctsd import ops, sweeps
from ctsd.files import STATE
from ctsd.models import TestResult
from ctsd.timeutil import format_ts
from tests.daemon import wait_until_async
from tests.exchange import PX_KEY, PX_USER, FakeExchange, probe_connection
from tests.inprocess import open_app, state_file, sync_log

pytestmark = pytest.mark.anyio

FAST = {"sweep_interval_s": 0.05, "heartbeat_flush_s": 0.3, "test_interval_s": 0}


async def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    return await wait_until_async(cond, timeout, what=what)


class StateWrites:
    """Counts writes of connection-state.json by the checkpointer."""

    def __init__(self, store: Any) -> None:
        self.count = 0
        store.checkpointer.on_write.append(self._on_write)

    def _on_write(self, written: list[str]) -> None:
        self.count += STATE in written


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Any]:
    """Factory: an app over a fresh data dir with the sweeps running."""
    stack: list[tuple[Any, anyio.abc.TaskGroup]] = []
    n = 0

    async def make(conns: list[dict[str, Any]], settings: dict[str, Any] | None = None) -> Any:
        nonlocal n
        n += 1
        app = await open_app(tmp_path / f"d{n}", conns, {**FAST, **(settings or {})})
        sw = app.sweeper  # what run() uses; created here so tests can look at it
        tg = anyio.create_task_group()
        await tg.__aenter__()
        tg.start_soon(app.sweeper.run)
        stack.append((app, tg))
        await wait_for(lambda: not sw.rescan, 2, "first sweep")
        return app

    yield make
    for app, tg in stack:
        tg.cancel_scope.cancel()
        await tg.__aexit__(None, None, None)
        await app.store.close()


def status(app: Any, cid: str) -> str:
    return app.store.state[cid].status


def actions(app: Any, cid: str | None = None) -> list[str]:
    """The actions logged so far (committed memory; the file follows within milliseconds)."""
    return [e.action for e in app.store.log if cid is None or e.connection_id == cid]


async def test_stale_within_bound_then_recovered_by_heartbeat(running: Any):
    stale_after, interval = 0.4, 0.05
    app = await running(
        [probe_connection("c1", None), probe_connection("idle", None, is_active=False)],
        {"stale_after_s": stale_after, "sweep_interval_s": interval},
    )
    app.sweeper.heartbeat("c1")
    t_beat = time.monotonic()
    assert status(app, "c1") == "active"
    await wait_for(lambda: status(app, "c1") == "stale", 3, "c1 stale")
    took = time.monotonic() - t_beat
    # not before stale_after_s, and within stale_after_s + sweep_interval_s (+ write/poll slack)
    assert stale_after - 0.05 <= took <= stale_after + interval + 0.25, took
    on_disk = (await state_file(app))["c1"]
    assert on_disk["status"] == "stale"
    stale_events = [e for e in await sync_log(app) if e["action"] == "stale"]
    assert [e["connection_id"] for e in stale_events] == ["c1"]  # the inactive one never
    assert stale_events[0]["data"]["source"] == "sweep"
    assert status(app, "idle") == "inactive"

    app.sweeper.heartbeat("c1")
    await wait_for(lambda: status(app, "c1") == "active", 2, "c1 recovered")
    assert actions(app, "c1")[-2:] == ["stale", "recovered"]
    assert (await state_file(app))["c1"]["status"] == "active"
    # and it is watched again: silent once more, it goes stale again
    await wait_for(lambda: status(app, "c1") == "stale", 3, "c1 stale again")


async def test_successful_test_recovers_a_stale_connection(running: Any, fake: FakeExchange):
    app = await running([probe_connection("c1", fake.base("ok"))], {"stale_after_s": 0.2})
    await wait_for(lambda: status(app, "c1") == "stale", 3, "c1 stale")
    result, _ = await app.prober.test_connection("c1", "bus")
    assert result["success"] is True
    assert status(app, "c1") == "active"
    assert actions(app, "c1")[-2:] == ["test", "recovered"]
    # counted as a heartbeat: the sweep gives it a full stale_after_s again
    await wait_for(lambda: status(app, "c1") == "stale", 3, "c1 stale again")


async def test_heartbeats_coalesced_one_write_per_flush(running: Any):
    flush = 0.3
    app = await running(
        [probe_connection(f"c{i}", None) for i in range(20)],
        {"heartbeat_flush_s": flush, "stale_after_s": 60},
    )
    await wait_for(lambda: "c0" in app.sweeper.live, 2, "first sweep")
    writes = StateWrites(app.store)
    rev = app.store.revision
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < 1.5:
        for i in range(20):
            app.sweeper.heartbeat(f"c{i}")
            n += 1
        await anyio.sleep(0.005)
    elapsed = time.monotonic() - t0
    last = app.store.heartbeats["c7"]
    assert app.store.state_view("c7").last_heartbeat_at == last  # in memory at once
    await wait_for(lambda: app.store.state["c7"].last_heartbeat_at == last, 2, "flushed")
    assert (await state_file(app))["c7"]["last_heartbeat_at"] == last
    total = time.monotonic() - t0
    assert n > 1000
    assert 1 <= writes.count <= total / flush + 1, (writes.count, n, elapsed)
    assert app.store.revision == rev  # no sync-log entry per heartbeat


async def test_a_flush_of_many_heartbeats_goes_in_slices(
    running: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10,000 bots' heartbeats in one change held the event loop, and every bot's ack, for
    about 100 ms each flush: written FLUSH_SLICE at a time, others' changes go in between."""
    monkeypatch.setattr(sweeps, "FLUSH_SLICE", 4)
    app = await running(
        [probe_connection(f"c{i}", None) for i in range(10)],
        {"heartbeat_flush_s": 60, "stale_after_s": 60},
    )
    await wait_for(lambda: len(app.sweeper.live) == 10, 2, "first sweep")
    groups: list[int] = []
    app.store.on_commit.append(lambda _s, n: groups.append(n))
    for i in range(10):
        app.sweeper.heartbeat(f"c{i}")
    assert await app.sweeper.flush() == 10
    assert len(groups) == 3  # 4 + 4 + 2
    beats = app.store.heartbeats
    assert all(app.store.state[f"c{i}"].last_heartbeat_at == beats[f"c{i}"] for i in range(10))
    assert not app.sweeper.flush_plan()


async def test_idle_sweeps_write_nothing(running: Any):
    app = await running([probe_connection(f"c{i}", None) for i in range(50)], {"stale_after_s": 60})
    sw = await wait_for(lambda: app.sweeper, 2, "sweeper")
    await wait_for(lambda: len(sw.live) == 50, 2, "first sweep")
    # let the first flush persist whatever start-up produced, then watch an idle stretch
    await wait_for(lambda: not sw.flush_plan(), 2, "settled")
    commits: list[int] = []
    app.store.on_commit.append(lambda _s, n: commits.append(n))
    ticks = len(sw.tick_times)
    await wait_for(lambda: len(sw.tick_times) >= ticks + 15, 5, "15 sweep ticks")
    await wait_for(lambda: len(sw.tick_times) >= ticks + 20, 5, "20 sweep ticks (3 flushes)")
    assert commits == []


async def test_inactive_and_disabled_read_inactive_and_never_stale(running: Any):
    app = await running(
        [probe_connection("a", None), probe_connection("off", None, is_enabled=False)],
        {"stale_after_s": 0.3},
    )
    assert status(app, "off") == "inactive"
    await app.store.submit(ops.set_active("a", False), "cli")
    assert status(app, "a") == "inactive"
    sw = app.sweeper
    await wait_for(lambda: len(sw.tick_times) > 20, 5, "sweeps ran past stale_after_s")
    assert "stale" not in actions(app)
    # activated again: a full stale_after_s of grace from activation, then stale
    t0 = time.monotonic()
    await app.store.submit(ops.set_active("a", True), "cli")
    assert status(app, "a") == "active"
    await wait_for(lambda: status(app, "a") == "stale", 3, "a stale")
    assert time.monotonic() - t0 >= 0.3 - 0.05


async def test_settings_hand_edit_applies_live(running: Any):
    app = await running([probe_connection("c1", None)], {"stale_after_s": 60})
    sw = await wait_for(lambda: app.sweeper, 2, "sweeper")
    await wait_for(lambda: len(sw.tick_times) > 10, 3, "sweeps running")
    assert status(app, "c1") == "active"
    # a hand edit of settings.json, taken in as the watcher/SIGHUP does
    path = app.data_dir / "settings.json"
    settings = json.loads(path.read_text())
    settings["stale_after_s"] = 0.2
    path.write_text(json.dumps(settings, indent=2) + "\n")
    assert await app.store.ingest("settings.json")
    assert app.store.settings.stale_after_s == 0.2
    await wait_for(lambda: status(app, "c1") == "stale", 2, "stale under the new setting")


async def test_last_sync_at_moves_with_the_change_of_its_event(running: Any):
    app = await running(
        [probe_connection("c1", None)], {"stale_after_s": 60, "heartbeat_flush_s": 0.2}
    )
    for op in (ops.update("c1", {"name": "renamed"}), ops.set_active("c1", False)):
        await app.store.submit(op, "cli")
        event = app.store.log[-1]
        # written whole and current: the state record carries its latest event's time
        assert app.store.state["c1"].last_sync_at == event.created_at
        assert (await state_file(app))["c1"]["last_sync_at"] == event.created_at
    await app.store.submit(ops.set_volume("c1", 2.0, 3.0), "cli")
    event = (await sync_log(app))[-1]
    assert event["action"] == "update_volume"
    assert event["data"]["live"] == 2.0 and event["data"]["preset"] == 3.0
    assert (await state_file(app))["c1"]["last_sync_at"] == event["created_at"]


async def test_periodic_tests_for_enabled_connections(running: Any, fake: FakeExchange):
    app = await running(
        [
            probe_connection("ok", fake.base("ok")),
            probe_connection("down", fake.base("err500"), is_active=False),
            probe_connection("off", fake.base("ok"), is_enabled=False),
        ],
        {"test_interval_s": 0.3, "stale_after_s": 60},
    )

    def tested() -> bool:
        st = app.store.state
        return st["ok"].test_results is not None and st["down"].test_results is not None

    await wait_for(tested, 5, "periodic tests")
    assert app.store.state["ok"].test_results.success is True
    assert app.store.state["down"].test_results.success is False
    assert "HTTP 500" in app.store.state["down"].test_results.error
    assert app.store.state["off"].test_results is None
    count = sum(1 for a in actions(app, "ok") if a == "test")
    await wait_for(lambda: sum(1 for a in actions(app, "ok") if a == "test") > count, 3, "again")
    # switched off live: no more tests
    await app.store.submit(
        ops.set_document("settings", {**app.store.documents["settings"], "test_interval_s": 0}),
        "cli",
    )
    await wait_for(lambda: not app.sweeper.testing, 3, "in-flight tests done")
    n = len(actions(app))
    sw = app.sweeper
    ticks = len(sw.tick_times)
    await wait_for(lambda: len(sw.tick_times) > ticks + 15, 3, "sweeps")
    assert [a for a in actions(app)[n:] if a == "test"] == []


async def test_first_periodic_tests_wait_half_an_interval(running: Any):
    """After a start and after a create, the first test of each connection is spread over the
    second half of the interval: a daemon restarted in a loop never sends a burst at once."""
    interval = 1000.0
    t0 = time.monotonic()
    app = await running(
        [probe_connection(f"c{i}", None) for i in range(50)], {"test_interval_s": interval}
    )
    sw = app.sweeper
    await wait_for(lambda: len(sw.test_due) == 50, 3, "first tests scheduled")
    due = sorted(sw.test_due.values())
    assert t0 + interval / 2 <= due[0] and due[-1] <= time.monotonic() + interval
    t1 = time.monotonic()
    await app.store.submit(ops.create(probe_connection("new", None)), "cli")
    await wait_for(lambda: "new" in sw.test_due, 3, "the new one scheduled")
    assert t1 + interval / 2 <= sw.test_due["new"] <= time.monotonic() + interval


async def test_a_recent_test_postpones_the_periodic_one(tmp_path: Path):
    """A connection tested less than half an interval ago (a test asked for on the bus, or
    another cluster host's periodic one: results are shared) is not tested again when its
    own turn comes: its next test is an interval after that one. An old result, none, or one
    dated in the future (a clock ahead) does not hold the test off."""
    interval = 1000.0
    names = ("fresh", "old", "future", "never")
    app = await open_app(
        tmp_path, [probe_connection(c, None) for c in names], {"test_interval_s": interval}
    )
    try:
        wall = time.time()
        for cid, ago in (("fresh", 100), ("old", 600), ("future", -100)):
            result = TestResult(success=True, latency=1, timestamp=sweeps.iso_at(wall - ago))
            await app.store.submit(ops.record_test(cid, result), "probe")
        sw = app.sweeper
        now = time.monotonic()
        sw.tick(now)  # learns the connections
        sw._reschedule_all(interval, now)
        for cid in names:
            sw._schedule_test(cid, now)
        assert sorted(sw.due_tests(now, 10)) == ["future", "never", "old"]
        last = now - 100
        assert last + 0.9 * interval - 1 <= sw.test_due["fresh"] <= last + 1.1 * interval + 1
    finally:
        await app.store.close()


async def test_heartbeat_unknown_connection(running: Any):
    app = await running([probe_connection("c1", None)])
    with pytest.raises(Exception) as e:
        app.sweeper.heartbeat("ghost")
    assert getattr(e.value, "code", None) == "not_found"


async def test_projectx_auto_connect_at_start(tmp_path: Path, fake: FakeExchange):
    data = tmp_path / "px"
    data.mkdir()
    (data / "connection.json").write_text(
        json.dumps(
            {
                "projectX": {
                    "apiUrl": fake.base("projectx"),
                    "username": PX_USER,
                    "apiKey": PX_KEY,
                    "autoConnect": True,
                },
                "server": {"port": 3587},
                "trading": {"simulationMode": True},
            }
        )
    )
    app = await open_app(data, [], FAST)
    async with anyio.create_task_group() as tg:
        tg.start_soon(app.sweeper.run)
        await wait_for(lambda: app.prober.projectx_status()["state"] == "connected", 5, "px")
        tg.cancel_scope.cancel()
    await app.store.close()
    assert any(p == "/projectx/api/Auth/loginKey" for _, p, _ in fake.requests)


async def test_a_heartbeat_stamped_later_than_now_does_not_hold_off_stale(tmp_path: Path):
    """A heartbeat an hour ahead of the clock (it stepped back since, or a hand edit) counts
    as now: the connection still goes stale after stale_after_s of silence, and stays stale
    (the write checked it against the clock again, and took it for a newer beat)."""
    app = await open_app(tmp_path / "d", [probe_connection("c1", None)], {"stale_after_s": 1})
    try:
        sw = app.sweeper
        ahead = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        app.store.heartbeats["c1"] = format_ts(ahead)
        now = time.monotonic()
        assert sweeps.monotonic_of(format_ts(ahead)) <= time.monotonic()
        assert sw.tick(now) == {}  # learns c1
        transitions = sw.tick(now + 2)
        assert list(transitions) == ["c1"]
        await sw._apply_stale(transitions)
        assert status(app, "c1") == "stale"
        assert actions(app, "c1")[-1:] == ["stale"]
        assert "c1" not in sw.recovering
    finally:
        await app.store.close()


async def test_a_stored_heartbeat_in_the_future_is_replaced_and_holds_nothing_off(
    tmp_path: Path,
) -> None:
    """last_heartbeat_at set a month ahead by hand: every event of the connection (a volume
    set, a test) took it as now again, so it never went stale while they came; and each real
    heartbeat was older than it, so none reached the file or the reads."""
    app = await open_app(tmp_path / "d", [probe_connection("c1", None)], {"stale_after_s": 1})
    try:
        sw = app.sweeper
        ahead = format_ts(dt.datetime.now(dt.UTC) + dt.timedelta(days=30))
        rows = [msgspec.to_builtins(app.store.state["c1"])]
        rows[0]["last_heartbeat_at"] = ahead
        (app.data_dir / STATE).write_text(json.dumps(rows))
        assert await app.store.ingest(STATE)
        assert app.store.state["c1"].last_heartbeat_at == ahead
        assert sw.tick(time.monotonic()) == {}  # learns c1
        gone_stale = False
        with anyio.fail_after(5):
            while not gone_stale:  # events keep coming, no heartbeat
                await app.store.submit(ops.set_volume("c1", live=2.0 + time.time() % 1), "bus")
                transitions = sw.tick(time.monotonic())
                if transitions:
                    await sw._apply_stale(transitions)
                    gone_stale = status(app, "c1") == "stale"
                await anyio.sleep(0.1)
        sw.heartbeat("c1")  # a real one replaces the month-ahead stamp
        beat = app.store.heartbeats["c1"]
        assert app.store.state_view("c1").last_heartbeat_at == beat  # type: ignore[union-attr]
        assert sw.flush_plan() == {"c1": beat}
    finally:
        await app.store.close()


async def test_the_stale_event_names_the_heartbeat_the_state_keeps(tmp_path: Path):
    """The event named the heartbeat held in memory, the state record the later one a test
    had stamped: they disagreed."""
    app = await open_app(tmp_path / "d", [probe_connection("c1", None)], {"stale_after_s": 1})
    try:
        sw = app.sweeper
        now = time.monotonic()
        assert sw.tick(now) == {}
        sw.heartbeat("c1")
        ok = TestResult(success=True, latency=1.0, timestamp=format_ts(dt.datetime.now(dt.UTC)))
        await app.store.submit(ops.record_test("c1", ok), "probe")
        transitions = sw.tick(now + 5)
        assert list(transitions) == ["c1"]
        await sw._apply_stale(transitions)
        (event,) = [e for e in app.store.log if e.action == "stale"]
        kept = app.store.state["c1"].last_heartbeat_at
        assert event.data["last_heartbeat_at"] == kept == ok.timestamp, (event.data, kept)
    finally:
        await app.store.close()


async def test_a_recovery_refused_while_the_state_file_is_invalid_comes_once_it_is_fixed(
    tmp_path: Path,
) -> None:
    """connection-state.json invalid: each heartbeat of a stale connection logged its own
    `recover_failed` (a line per beat of every bot), and once the file was fixed the
    connection stayed stale, as no heartbeat came again."""
    app = await open_app(tmp_path / "d", [probe_connection("c1", None)], {"stale_after_s": 1})
    try:
        sw = app.sweeper
        now = time.monotonic()
        assert sw.tick(now) == {}
        await sw._apply_stale(sw.tick(now + 5))
        assert status(app, "c1") == "stale"
        good = json.dumps([msgspec.to_builtins(app.store.state["c1"])])
        (app.data_dir / STATE).write_text("[{")
        assert not await app.store.ingest(STATE)
        with structlog.testing.capture_logs() as logs:
            for _ in range(5):
                sw.heartbeat("c1")
                await wait_until_async(lambda: not sw.recovering, 5)
        assert "c1" in sw.recover_again and status(app, "c1") == "stale"
        assert [e["event"] for e in logs].count("recover_failed") == 1, logs
        (app.data_dir / STATE).write_text(good)
        assert await app.store.ingest(STATE)
        sw.tick(time.monotonic())  # no heartbeat since: the tick tries again
        await wait_until_async(lambda: status(app, "c1") == "active", 5, what="recovered")
        assert not sw.recover_again
    finally:
        await app.store.close()


async def test_stale_decision_yields_to_a_newer_heartbeat(tmp_path: Path):
    """The sweep decides, a heartbeat lands, then the write applies: no false `stale`."""
    app = await open_app(tmp_path / "d", [probe_connection("c1", None)], {"stale_after_s": 1})
    try:
        sw = app.sweeper
        now = time.monotonic()  # the sweep's clock
        assert sw.tick(now) == {}  # learns c1, a full stale_after_s from now
        transitions = sw.tick(now + 2)
        assert list(transitions) == ["c1"]
        app.sweeper.heartbeat("c1")  # arrives before the transition is written
        await sw._apply_stale(transitions)
        assert status(app, "c1") == "active"
        assert "stale" not in actions(app)
        assert "c1" in sw.in_heap  # still watched
        # without the heartbeat the same decision does apply
        transitions = sw.tick(time.monotonic() + 5)
        assert list(transitions) == ["c1"]
        await sw._apply_stale(transitions)
        assert status(app, "c1") == "stale"
    finally:
        await app.store.close()


async def test_invalid_state_file_holds_the_flush_until_fixed(running: Any):
    app = await running(
        [probe_connection("c1", None)], {"stale_after_s": 60, "heartbeat_flush_s": 0.1}
    )
    sw = app.sweeper
    await wait_for(lambda: not sw.flush_plan(), 2, "settled")
    await app.store.checkpointer.flush()
    path = app.data_dir / "connection-state.json"
    good = path.read_text()
    path.write_text('[{"connection_id": "c1", "is_activ": true}]\n')
    assert not await app.store.ingest("connection-state.json")
    ts = app.sweeper.heartbeat("c1")  # still taken, in memory
    assert app.store.state_view("c1").last_heartbeat_at == ts
    ticks = len(sw.tick_times)
    await wait_for(lambda: len(sw.tick_times) > ticks + 10, 3, "flushes tried")
    assert '"is_activ"' in path.read_text()  # never overwritten
    assert sw.flush_plan() == {"c1": ts}  # kept for later
    path.write_text(good)
    assert await app.store.ingest("connection-state.json")
    await wait_for(lambda: app.store.state["c1"].last_heartbeat_at == ts, 3, "flushed")
    assert (await state_file(app))["c1"]["last_heartbeat_at"] == ts


async def test_a_burst_of_due_connections_is_swept_in_slices(tmp_path: Path):
    """All learnt at one moment (start, import) → all due at once: slices, none lost."""
    n = 3000
    app = await open_app(tmp_path / "d", [probe_connection(f"c{i}", None) for i in range(n)], {})
    try:
        sw = app.sweeper
        now = time.monotonic()
        learn = 1
        assert sw.tick(now, budget=1000) == {}
        while sw.backlog:  # learning 3,000 connections: slices of RESCAN_SLICE
            assert sw.tick(now, budget=1000) == {}
            learn += 1
        assert learn == -(-n // sweeps.RESCAN_SLICE) and len(sw.live) == n
        later = now + app.store.settings.stale_after_s + 1
        out = sw.tick(later, budget=1000)
        assert sw.backlog and len(out) == 1000
        slices = 1
        while sw.backlog:
            out.update(sw.tick(later, budget=1000))
            slices += 1
        assert slices == 3 and len(out) == n
        assert sw.tick(later, budget=1000) == {} and not sw.backlog
    finally:
        await app.store.close()


async def test_flush_asked_during_a_flush_waits_and_writes_the_rest(running: Any):
    # Shutdown flushes while a periodic flush may be in flight: it must not return early and
    # leave the heartbeats that arrived meanwhile only in memory.
    app = await running(
        [probe_connection("c0", None), probe_connection("c1", None)], {"heartbeat_flush_s": 3600}
    )
    sw = app.sweeper
    app.sweeper.heartbeat("c0")
    async with anyio.create_task_group() as tg:
        tg.start_soon(sw.flush)
        await anyio.sleep(0)  # the first flush has taken its plan and waits on its write
        assert sw.flushing
        beat = app.sweeper.heartbeat("c1")
        await sw.flush()
    assert (await state_file(app))["c1"]["last_heartbeat_at"] == beat
