"""The lifecycle end to end: the real daemon process, its bus, its files, a fake exchange.

Settings are hand-edited in settings.json and taken in with SIGHUP (the contract's reload),
so nothing here depends on the watcher's timing. Every wait polls with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bus import bus as open_bus
from tests.daemon import Daemon, http_json, wait_until
from tests.datadir import write_connections, write_settings
from tests.exchange import PX_KEY, PX_TOKEN, FakeExchange, probe_connection, px_document

pytestmark = pytest.mark.anyio


def bus(d: Daemon) -> Any:
    """The tests' bus; changes are answered by the journal (no `sync`), as a frontend's are."""
    return open_bus(d, sync=None)


def write(data_dir: Path, conns: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    write_connections(data_dir, conns)
    base = {"server": {"rate_limit": {"requests": 1_000_000, "window_s": 1}}}
    write_settings(data_dir, {**base, **settings})


def state(d: Daemon) -> dict[str, dict[str, Any]]:
    try:
        rows = json.loads((d.data_dir / "connection-state.json").read_text())
    except ValueError:
        return {}
    return {r["connection_id"]: r for r in rows}


def log_actions(d: Daemon, cid: str) -> list[str]:
    rows = json.loads((d.data_dir / "connection-sync-log.json").read_text())
    return [e["action"] for e in rows if e["connection_id"] == cid]


def edit_settings(d: Daemon, **changes: Any) -> None:
    path = d.data_dir / "settings.json"
    settings = json.loads(path.read_text())
    settings.update(changes)
    path.write_text(json.dumps(settings, indent=2) + "\n")
    d.send_signal(signal.SIGHUP)


@pytest.fixture
def start(data_dir: Path) -> Iterator[Any]:
    daemons: list[Daemon] = []

    def go(conns: list[dict[str, Any]], settings: dict[str, Any]) -> Daemon:
        write(data_dir, conns, settings)
        d = Daemon(data_dir).start()
        daemons.append(d)
        return d

    yield go
    for d in daemons:
        d.close()


FAST = {"sweep_interval_s": 0.1, "heartbeat_flush_s": 0.5, "test_interval_s": 0}


async def test_stale_and_recovered_over_the_bus(start: Any):
    d = start(
        [probe_connection("c1", None), probe_connection("off", None, is_active=False)],
        {**FAST, "stale_after_s": 0.6},
    )
    async with bus(d) as b:
        await b.ok("subscribe")
        beat = await b.ok("connections.heartbeat", connection_id="c1")
        t0 = time.monotonic()
        assert beat["connection_id"] == "c1"
        stale = await b.wait_event("stale", "c1", timeout=5)
        took = time.monotonic() - t0
        assert 0.6 - 0.1 <= took <= 0.6 + 0.1 + 0.5, took
        assert stale["data"]["source"] == "sweep"
        wait_until(lambda: state(d)["c1"]["status"] == "stale", 5, what="stale on disk")
        await b.ok("connections.heartbeat", connection_id="c1")
        recovered = await b.wait_event("recovered", "c1", timeout=5)
        assert recovered["data"]["reason"] == "heartbeat"
        wait_until(lambda: state(d)["c1"]["status"] == "active", 5, what="active on disk")
        assert "stale" not in log_actions(d, "off")
        assert state(d)["off"]["status"] == "inactive"
        err = await b.call("connections.heartbeat", connection_id="ghost")
        assert err["success"] is False and err["error"]["code"] == "not_found"


async def test_heartbeats_over_the_bus_are_coalesced(start: Any):
    flush = 0.5
    d = start(
        [probe_connection(f"c{i}", None) for i in range(10)], {**FAST, "heartbeat_flush_s": flush}
    )
    path = d.data_dir / "connection-state.json"
    async with bus(d) as b:
        await b.ok("connections.heartbeat", connection_id="c0")
        wait_until(lambda: state(d).get("c0", {}).get("last_heartbeat_at"), 5, what="flush")
        rev = (await b.ok("status"))["revision"]
        inodes = {os.stat(path).st_ino}
        t0 = time.monotonic()
        sent = 0
        while time.monotonic() - t0 < 2.0:
            # pipelined: 50 heartbeats per round trip
            for i in range(50):
                await b.send("connections.heartbeat", connection_id=f"c{i % 10}")
            last = await b.ok("connections.heartbeat", connection_id="c3")
            sent += 51
            inodes.add(os.stat(path).st_ino)  # atomic replace: a new inode per write
        elapsed = time.monotonic() - t0
        wait_until(
            lambda: state(d)["c3"]["last_heartbeat_at"] == last["timestamp"], 5, what="last beat"
        )
        inodes.add(os.stat(path).st_ino)
        total = time.monotonic() - t0
        assert sent > 1000
        writes = len(inodes) - 1
        assert 1 <= writes <= total / flush + 1, (writes, sent, elapsed)
        assert (await b.ok("status"))["revision"] == rev  # no sync-log entry per heartbeat


async def test_connection_test_and_periodic_tests(start: Any, fake: FakeExchange):
    d = start(
        [
            probe_connection("good", fake.base("ok"), exchange="binance", api_type="spot"),
            probe_connection("bad", fake.base("err500")),
            probe_connection("off", fake.base("ok"), is_enabled=False),
        ],
        {**FAST, "stale_after_s": 60, "test_timeout_s": 2},
    )
    async with bus(d) as b:
        result = await b.ok("connections.test", connection_id="good")
        assert result["success"] is True and result["latency"] > 0
        assert fake.requests[-1][1] == "/ok/api/v3/time"
        result = await b.ok("connections.test", connection_id="bad")
        assert result["success"] is False and "HTTP 500" in result["error"]
        wait_until(lambda: state(d).get("bad", {}).get("test_results") == result, 5, what="disk")
        # periodic tests switched on by a hand edit, live
        n = len(fake.requests)
        edit_settings(d, test_interval_s=0.4)
        wait_until(lambda: len(fake.requests) >= n + 4, 10, what="periodic tests")
        paths = {p for _, p, _ in fake.requests[n:]}
        # both enabled ones tested; the disabled one (bybit at /ok) never
        assert paths == {"/ok/api/v3/time", "/err500/v5/market/time"}, paths
        assert state(d)["off"]["test_results"] is None
        edit_settings(d, test_interval_s=0)
        time_off = time.monotonic()
        wait_until(lambda: time.monotonic() - time_off > 0.3, 2)  # in-flight tests finish
        n = len(fake.requests)
        status = await b.ok("status")  # the daemon is alive and answering
        assert status is not None
        wait_until(lambda: time.monotonic() - time_off > 1.5, 3)
        assert len(fake.requests) == n, "tests ran after test_interval_s was set to 0"


async def test_a_connection_test_cut_by_a_stop_is_answered_503_json(start: Any, fake: FakeExchange):
    # The exchange answers later than the daemon waits for open requests at a stop.
    fake.slow_s = 5.0
    d = start([probe_connection("slow", fake.base("slow"))], {**FAST, "test_timeout_s": 10})
    answer: list[tuple[int, Any]] = []
    asking = threading.Thread(
        target=lambda: answer.append(http_json(d, "POST", "/api/connections/slow/test", None))
    )
    asking.start()
    wait_until(lambda: fake.in_flight == 1, 10, what="the test at the exchange")
    assert d.stop() == 0
    asking.join(10)
    status, body = answer[0]
    assert status == 503 and body["error"]["code"] == "io_error", answer
    assert "stopped before this request finished" in body["error"]["message"]


async def test_settings_hand_edit_changes_stale_after(start: Any):
    d = start([probe_connection("c1", None)], {**FAST, "stale_after_s": 60})
    async with bus(d) as b:
        await b.ok("connections.heartbeat", connection_id="c1")
        await b.ok("subscribe")
        edit_settings(d, stale_after_s=0.3)
        await b.wait_event("stale", "c1", timeout=5)


async def test_projectx_in_server_status(data_dir: Path, start: Any, fake: FakeExchange):
    data_dir.mkdir(parents=True, mode=0o700)
    (data_dir / "connection.json").write_text(json.dumps(px_document(fake.base("projectx"))))
    d = start([], FAST)

    def connected() -> Any:
        code, body = d.http("/api/trading/server-status")
        assert code == 200, body
        return body if body["projectx"]["state"] == "connected" else None

    body = wait_until(connected, 10, what="Project X connected")
    async with bus(d) as b:
        result = await b.ok("trading.test_connection")
        assert result["success"] is True
        status = await b.ok("status")
    blob = json.dumps([body, result, status]) + d.stdout() + d.stderr()
    for secret in (PX_KEY, PX_TOKEN):
        assert secret not in blob
    assert status["projectx"]["state"] == "connected"
    assert status["projectx"]["credentials_set"] is True
    assert status["projectx"]["last_test"]["success"] is True


async def test_sigterm_flushes_heartbeats_not_yet_on_disk(start: Any):
    # A long flush interval: without the flush at shutdown the heartbeat would be lost.
    d = start([probe_connection("c0", None)], {**FAST, "heartbeat_flush_s": 3600})
    async with bus(d) as b:
        beat = await b.ok("connections.heartbeat", connection_id="c0")
    assert state(d).get("c0", {}).get("last_heartbeat_at") != beat["timestamp"]
    assert d.stop() == 0
    assert state(d)["c0"]["last_heartbeat_at"] == beat["timestamp"]
