"""kill -9 cycles: the real daemon under a write storm, killed at random moments, restarted.

Each cycle starts the daemon on the same data dir, runs `crash_driver.storm` (bus writers with
changes in flight, and a hand editor saving a document by temp-and-rename or in place),
SIGKILLs the daemon at a random moment, then checks what the kill left and what the next
start makes of it:

- straight after the kill, every data file is valid JSON of its kind;
- after the restart (READY), every acknowledged change is in the data files (a file may hold
  a newer value, journalled before the kill and its ack lost, never an older one), and every
  acknowledged change is in the sync log;
- the sync log agrees with the files (the last logged name and live volume factor of each
  connection are the ones the files hold), its ids are gap-free and the daemon resumes at
  its last one;
- the hand editor's last save is what the file holds and what the daemon serves;
- the journal stays small (cut after each checkpoint).

The default cycle count keeps the file under a minute on two busy cores. The long run:

    CTSD_CRASH_CYCLES=1000 .venv/bin/pytest tests/test_crash.py -x -q

CTSD_CRASH_SEED picks the kill moments (the seed is printed on failure).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
from pathlib import Path
from typing import Any

from ctsd import files, journal
from tests.crash_driver import HAND_DOC, Ledger, storm
from tests.daemon import Daemon, wait_until

CYCLES = int(os.environ.get("CTSD_CRASH_CYCLES", "10"))
SEED = int(os.environ.get("CTSD_CRASH_SEED", "20261204"))
WRITERS = 3
CONNS_PER_WRITER = 4
KILL_WINDOW_S = (0.05, 0.6)  # after the storm starts
# Cut by appending until it passes REWRITE_ABOVE, then rewritten: that, and a checkpoint's
# worth of changes with room to spare.
JOURNAL_BOUND = journal.REWRITE_ABOVE + 4 * 1024 * 1024

DATA_FILES = [
    files.CONNECTIONS,
    files.STATE,
    files.SYNC_LOG,
    *(f for f, _ in files.DOCUMENTS.values()),
]


def read(data_dir: Path, name: str) -> Any:
    return json.loads((data_dir / name).read_text())


def all_files_valid(data_dir: Path, where: str) -> None:
    for name in DATA_FILES:
        raw = (data_dir / name).read_bytes()
        try:
            files.decode_file(name, raw)
        except files.Invalid as e:
            raise AssertionError(f"{where}: {name} invalid: {e.problem.format()}") from None


def check_restarted(d: Daemon, ledger: Ledger, where: str) -> None:
    """The promises, read from the files of a daemon just READY (no writer running)."""
    data_dir = d.data_dir
    all_files_valid(data_dir, where)
    conns = {c["id"]: c for c in read(data_dir, files.CONNECTIONS)}
    states = {s["connection_id"]: s for s in read(data_dir, files.STATE)}
    log = read(data_dir, files.SYNC_LOG)
    # Every acknowledged change is in the data files (or a newer one is).
    for cid, value in ledger.names.items():
        assert int(conns[cid]["name"][1:]) >= value, (where, cid, conns[cid]["name"], value)
    for cid, value in ledger.lives.items():
        assert states[cid]["volume_factor_live"] >= value, (where, cid, states[cid], value)
    # ... and in the sync log; its ids gap-free, the daemon carrying on from the last one.
    ids = [e["id"] for e in log]
    assert ids == list(range(ids[0], ids[0] + len(ids))) if ids else not ledger.acks, (
        where,
        "sync log ids",
        ids[-20:],
    )
    logged = {
        (e["connection_id"], e["data"]["values"]["name"])
        for e in log
        if e["action"] == "update" and "name" in e["data"].get("values", {})
    }
    missing = [a for a in ledger.acked_names if a not in logged]  # this cycle's
    assert not missing, (where, "acked but not in the sync log", missing[:10])
    # The sync log agrees with the files: each connection's last logged value is the file's.
    last_name: dict[str, str] = {}
    last_live: dict[str, float] = {}
    for e in log:
        cid = e["connection_id"]
        if e["action"] == "update" and "name" in e["data"].get("values", {}):
            last_name[cid] = e["data"]["values"]["name"]
        elif e["action"] == "update_volume":
            last_live[cid] = e["data"]["live"]
    for cid, name in last_name.items():
        assert conns[cid]["name"] == name, (where, cid, conns[cid]["name"], name)
    for cid, live in last_live.items():
        assert states[cid]["volume_factor_live"] == live, (where, cid, states[cid], live)
    status, health = d.http("/health", token=None)
    assert status == 200 and health["status"] == "ok", (where, health)
    # The hand editor's last save is the file, untouched by the daemon, and the daemon's view.
    if ledger.hand:
        hand = read(data_dir, HAND_DOC)
        assert hand["crash_hand"] == ledger.hand, (where, "hand edit", hand["crash_hand"])
    size = (data_dir / journal.NAME).stat().st_size
    assert size <= JOURNAL_BOUND, (where, "journal bytes", size)


def last_logged(data_dir: Path) -> int:
    log = read(data_dir, files.SYNC_LOG)
    return log[-1]["id"] if log else 0


def bus_revision(d: Daemon) -> tuple[int, Any]:
    """The revision the daemon announces, and its ui-config document."""
    from websockets.asyncio.client import connect

    async def go() -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {d.token}"}
        async with connect(d.ws_url, additional_headers=headers, compression=None) as ws:
            hello = json.loads(await ws.recv())
            await ws.send(json.dumps({"id": 1, "type": "documents.get", "name": "ui-config"}))
            while True:
                msg = json.loads(await ws.recv())
                if msg.get("type") == "result":
                    assert msg["success"], msg
                    return hello["revision"], msg["result"]

    return asyncio.run(go())


def test_kill_9_cycles_under_a_write_storm(data_dir: Path) -> None:
    rng = random.Random(SEED)
    ledger = Ledger(WRITERS, CONNS_PER_WRITER)
    data_dir.mkdir(parents=True)
    settings = {
        "sync_log_limit": 20_000,  # well over a cycle's events: each acked one is looked for
        "server": {"rate_limit": {"requests": 10_000_000, "window_s": 1}},
    }
    (data_dir / "settings.json").write_text(json.dumps(settings))
    (data_dir / files.CONNECTIONS).write_text(json.dumps(ledger.connections()))
    mid_storm = 0
    for cycle in range(CYCLES + 1):
        where = f"cycle {cycle} (seed {SEED})"
        d = Daemon(data_dir).start(timeout=30)
        try:
            check_restarted(d, ledger, where)
            # The daemon carries on from the file's last revision, never below it (ids would
            # be reused); above it only by a change of its own since READY (a connection
            # test), which reaches the file with the next checkpoint.
            revision, ui_config = bus_revision(d)
            assert revision >= last_logged(data_dir), (where, revision, last_logged(data_dir))
            wait_until(
                lambda rev=revision: last_logged(data_dir) >= rev, 5, what=f"{where}: {revision}"
            )
            if ledger.hand:
                assert ui_config["crash_hand"] == ledger.hand, (where, ui_config)
            if cycle == CYCLES:
                break
            before = ledger.acks
            ledger.acked_names.clear()
            kill_after = rng.uniform(*KILL_WINDOW_S)
            assert d.proc is not None
            asyncio.run(storm(d.proc, d.ws_url, d.token or "", data_dir, ledger, kill_after, rng))
            assert d.proc.wait(10) == -signal.SIGKILL
            mid_storm += ledger.acks > before
            print(f"{where}: {ledger.acks - before} acks before the kill", flush=True)
        finally:
            d.close()
        all_files_valid(data_dir, f"{where}, straight after the kill")
        size = (data_dir / journal.NAME).stat().st_size
        assert size <= JOURNAL_BOUND, (where, "journal bytes after the kill", size)
        hand = read(data_dir, HAND_DOC)["crash_hand"]
        assert hand == ledger.hand, (where, "hand edit overwritten before the kill", hand)
    # The kills landed with changes acknowledged in the cycle, not before the storm began.
    assert mid_storm >= CYCLES * 3 // 4, (mid_storm, CYCLES)
    print(f"{CYCLES} kill -9 cycles, {ledger.acks} acknowledged changes, seed {SEED}")
