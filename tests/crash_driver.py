"""Crash tests' drivers: offline operations killed part-way, and a write storm on a daemon.

    python -m tests.crash_driver rekey DATA NEW_KEY_FILE KILL_AT
    python -m tests.crash_driver restore DATA ARCHIVE KILL_AT

The current key comes from the environment, as for the CLI. KILL_AT > 0: the process sends
itself SIGKILL just before its KILL_AT-th step — every write, fsync, rename, link, unlink,
mkdir and directory swap counts — so a test can crash it at each step in turn. KILL_AT = 0:
it prints `ready`, waits for a line on stdin, runs, and prints `steps N` (the test kills it
at a random moment, or counts the steps).

`kill_at_every_step` and `kill_at_random` are the two ways the tests use it.

`storm` is the load of the daemon's kill -9 cycles (tests/test_crash.py): bus writers with
changes in flight and a hand editor, and the `Ledger` of what was acknowledged (or written by
hand) before the kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctsd import atomic, backup, rekey
from ctsd.secretbox import configured_key, load_key_file

STEPPED = ("write", "writev", "fsync", "replace", "rename", "link", "unlink", "mkdir", "rmdir")


def main() -> None:
    op, data_dir, arg, kill_at_text = sys.argv[1:5]
    kill_at = int(kill_at_text)
    steps = 0

    def stepped(real: Any) -> Any:
        def call(*args: Any, **kw: Any) -> Any:
            nonlocal steps
            steps += 1
            if steps == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kw)

        return call

    if kill_at == 0:
        print("ready", flush=True)
        sys.stdin.readline()
    for name in STEPPED:
        setattr(os, name, stepped(getattr(os, name)))
    atomic._exchange = stepped(atomic._exchange)  # type: ignore[attr-defined]
    if op == "rekey":
        rekey.rekey_offline(Path(data_dir), configured_key(), load_key_file(Path(arg)))
    elif op == "restore":
        backup.restore_offline(Path(data_dir), Path(arg), None)
    else:
        raise SystemExit(f"unknown operation {op}")
    # Plain write: os.write is stepped, and this must not count.
    sys.stdout.write(f"steps {steps}\n")
    sys.stdout.flush()


KILL_CYCLES = int(os.environ.get("CTSD_KILL_CYCLES", "50"))
ROOT = Path(__file__).parent.parent


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.crash_driver", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, cwd=ROOT, start_new_session=True,
    )  # fmt: skip


def kill_at_every_step(
    prepare: Callable[[], list[str]], env: dict[str, str], check: Callable[[], str]
) -> list[str]:
    """Count the steps of one whole run, then run it again killed before each step in turn;
    `prepare` makes a fresh copy and returns the driver's arguments (KILL_AT appended here),
    `check` asserts the promise and returns the outcome ("old"/"new")."""
    p = spawn([*prepare(), "0"], env)
    out, err = p.communicate("go\n", timeout=60)
    assert p.returncode == 0, err
    total = int(out.split("steps ")[1])
    outcomes = []
    for kill_at in range(1, total + 1):
        p = spawn([*prepare(), str(kill_at)], env)
        _, err = p.communicate(timeout=60)
        assert p.returncode == -signal.SIGKILL, (kill_at, err)
        outcomes.append(check())
    # Early kills leave the old content, late ones the new, with one switch-over point.
    assert outcomes[0] == "old" and outcomes[-1] == "new", outcomes
    assert outcomes == sorted(outcomes, key=lambda o: o == "new"), outcomes
    return outcomes


def kill_at_random(
    prepare: Callable[[], list[str]], env: dict[str, str], check: Callable[[], str], seed: int
) -> dict[str, int]:
    """Time one whole run, then KILL_CYCLES runs killed at a uniformly random moment of it
    (imports done: the clock starts when the driver is told to go)."""

    def start() -> subprocess.Popen[str]:
        p = spawn([*prepare(), "0"], env)
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        return p

    p = start()
    t0 = time.monotonic()
    p.communicate("go\n", timeout=60)
    duration = time.monotonic() - t0
    assert p.returncode == 0
    rng = random.Random(int(os.environ.get("CTSD_KILL_SEED", str(seed))))
    outcomes = {"old": 0, "new": 0}
    for _ in range(KILL_CYCLES):
        p = start()
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
        time.sleep(rng.uniform(0, duration * 1.1))
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        outcomes[check()] += 1
    # Both outcomes occur, or the kill window missed the writes entirely.
    assert outcomes["old"] and outcomes["new"], outcomes
    return outcomes


# --- a write storm on a running daemon, killed part-way ------------------------------------

HAND_DOC = "ui-config.json"  # the hand editor's file (no bus writer touches it)


def conn_id(writer: int, k: int) -> str:
    return f"w{writer}c{k}"


@dataclass
class Ledger:
    """What the daemon acknowledged (and the hand editor wrote), across kill cycles. Every
    value grows: a file may hold a newer one (journalled, the ack lost in the kill), never an
    older one."""

    writers: int
    conns_per_writer: int
    next_value: dict[int, int] = field(default_factory=dict)  # writer → its next value
    names: dict[str, int] = field(default_factory=dict)  # connection → highest acked `v<N>`
    lives: dict[str, int] = field(default_factory=dict)  # connection → highest acked live
    # (connection, name) of each acked rename of the current cycle (cleared before a storm)
    acked_names: list[tuple[str, str]] = field(default_factory=list)
    hand: int = 0  # the hand editor's last value on disk (written, fsync'ed, renamed)
    acks: int = 0  # every ack received, all cycles

    def connections(self) -> list[dict[str, Any]]:
        return [
            {"id": conn_id(w, k), "name": "v0", "exchange": "bybit", "api_secret": "crash-canary"}
            for w in range(self.writers)
            for k in range(self.conns_per_writer)
        ]


async def _writer(url: str, token: str, w: int, ledger: Ledger, window: int) -> None:
    """Pipelined changes (`window` in flight) on this writer's own connections until the
    socket dies: a rename (connections.json) or, every third, a live volume factor
    (connection-state.json); each with a value no change had before."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    sent: dict[int, tuple[str, str, int]] = {}
    with contextlib.suppress(ConnectionClosed, OSError):
        headers = {"Authorization": f"Bearer {token}"}
        async with connect(url, additional_headers=headers, compression=None) as ws:
            assert json.loads(await ws.recv())["type"] == "auth_ok"
            msg_id = 0

            async def send_one() -> None:
                nonlocal msg_id
                msg_id += 1
                value = ledger.next_value.get(w, 1)
                ledger.next_value[w] = value + 1
                cid = conn_id(w, value % ledger.conns_per_writer)
                cmd: dict[str, Any] = {"id": msg_id, "connection_id": cid}
                if value % 3 == 0:
                    cmd.update(type="connections.set_volume", live=value)
                    sent[msg_id] = (cid, "live", value)
                else:
                    cmd.update(type="connections.update", changes={"name": f"v{value}"})
                    sent[msg_id] = (cid, "name", value)
                await ws.send(json.dumps(cmd))

            for _ in range(window):
                await send_one()
            async for frame in ws:
                msg = json.loads(frame)
                if msg.get("type") != "result":
                    continue
                assert msg["success"], msg
                cid, what, value = sent.pop(msg["id"])
                ledger.acks += 1
                if what == "name":
                    ledger.names[cid] = max(ledger.names.get(cid, 0), value)
                    ledger.acked_names.append((cid, f"v{value}"))
                else:
                    ledger.lives[cid] = max(ledger.lives.get(cid, 0), value)
                await send_one()


async def _hand_editor(data_dir: Path, ledger: Ledger, rng: random.Random) -> None:
    """Save HAND_DOC by hand every few milliseconds: mostly as editors do (temp file, fsync,
    rename), every third time in place (truncate and write, as `>` in a shell does)."""
    path = data_dir / HAND_DOC
    while True:
        value = ledger.hand + 1
        body = json.dumps({"crash_hand": value, "pad": "x" * rng.randrange(0, 2000)}).encode()
        if value % 3:
            tmp = path.with_name(f".{HAND_DOC}.edit")
            with open(tmp, "wb") as f:
                f.write(body)
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with open(path, "r+b") as f:
                f.truncate(0)
                f.write(body)
                os.fsync(f.fileno())
        ledger.hand = value
        await asyncio.sleep(rng.uniform(0.002, 0.03))


async def storm(
    proc: subprocess.Popen[bytes],
    url: str,
    token: str,
    data_dir: Path,
    ledger: Ledger,
    kill_after_s: float,
    rng: random.Random,
    window: int = 8,
) -> None:
    """Writers and the hand editor against the daemon `proc`; SIGKILL it after
    `kill_after_s`, then let the writers drain what the dead socket still delivers."""
    tasks = [
        asyncio.create_task(_writer(url, token, w, ledger, window)) for w in range(ledger.writers)
    ]
    editor = asyncio.create_task(_hand_editor(data_dir, ledger, rng))
    await asyncio.sleep(kill_after_s)
    proc.send_signal(signal.SIGKILL)
    # The editor's write in progress completes (it is not the one killed); then it stops.
    editor.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await editor
    done, _ = await asyncio.wait(tasks, timeout=30)
    assert len(done) == len(tasks), "a writer hung after the kill"
    for t in done:
        t.result()  # a refused change is a failure of the test, not noise


if __name__ == "__main__":
    main()
