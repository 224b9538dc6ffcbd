"""Benchmark of the connection lifecycle at 10,000 connections.

    .venv/bin/python bench/sweeps.py [--connections 10000] [--starts 5]

Measures, on a generated data dir (10,000 enabled and active connections, their state with
heartbeats, a full sync log):

- cold start to READY: the real daemon as a subprocess, READY=1 read from a NOTIFY_SOCKET;
- resident memory (VmRSS) of that process after READY and after the first sweeps;
- writes per idle tick: every data file's (inode, size, mtime) watched over many sweep ticks
  of the real daemon with nothing happening;
- sweep tick p50/p99: the daemon's own `Sweeper.tick` in-process on the same data, idle and
  under heartbeat load (every connection beating every 10 s, ticks 1 s apart, simulated
  time), plus the first tick (learning every connection).

Periodic connection tests are off (`test_interval_s: 0`): a bench never contacts an exchange.
Targets: start ≤ 1 s, RSS ≤ 150 MB, tick ≤ 5 ms, 0 writes when idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "daemon")]

from tests.daemon import free_port  # noqa: E402

from ctsd import sweeps  # noqa: E402
from ctsd.probes import Prober  # noqa: E402
from ctsd.store import Store  # noqa: E402
from ctsd.sweeps import iso_at  # noqa: E402

DATA_FILES = ("connections.json", "connection-state.json", "connection-sync-log.json")


def make_data(data_dir: Path, n: int) -> None:
    data_dir.mkdir(parents=True, mode=0o700)
    now = time.time()
    ts = iso_at(now)
    conns, states = [], []
    for i in range(n):
        cid = f"conn_{i:012x}"
        conns.append(
            {
                "id": cid,
                "user_id": 1,
                "name": f"Bench {i}",
                "exchange": ("bybit", "binance", "okx", "bingx")[i % 4],
                "exchange_id": i % 4 + 1,
                "api_type": "perpetual_futures",
                "connection_method": "rest",
                "connection_library": "rest",
                "api_key": f"key-{i:08d}-abcdefgh",
                "api_secret": f"secret-{i:08d}",
                "api_passphrase": None,
                "margin_type": "cross",
                "position_mode": "hedge",
                "is_testnet": False,
                "is_enabled": True,
                "is_live_trade": True,
                "is_preset_trade": False,
                "is_active": True,
                "is_predefined": False,
                "volume_factor": 1.0,
                "connection_settings": "{}",
                "created_at": ts,
                "updated_at": ts,
            }
        )
        states.append(
            {
                "connection_id": cid,
                "is_active": True,
                "volume_factor_live": 1.0,
                "volume_factor_preset": 1.0,
                "test_results": {"success": True, "latency": 45, "timestamp": ts},
                "last_sync_at": ts,
                "created_at": ts,
                "updated_at": ts,
                "last_heartbeat_at": iso_at(now - random.uniform(0, 10)),
                "status": "active",
            }
        )
    log = [
        {
            "id": k + 1,
            "connection_id": conns[k % n]["id"],
            "action": "update_volume",
            "data": {"live": 1.5, "preset": 2.0, "timestamp": ts, "source": "bus"},
            "created_at": ts,
        }
        for k in range(1000)
    ]
    settings = {
        "sweep_interval_s": 0.1,
        "heartbeat_flush_s": 0.5,
        "stale_after_s": 3600,
        "test_interval_s": 0,
    }
    for name, content in (
        ("connections.json", conns),
        ("connection-state.json", states),
        ("connection-sync-log.json", log),
        ("settings.json", settings),
    ):
        (data_dir / name).write_text(json.dumps(content, indent=2) + "\n")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Daemon:
    def __init__(self, data_dir: Path, workdir: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = workdir / f"notify-{time.monotonic_ns()}.sock"
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CTSD_", "NOTIFY_"))}
        env.update({"NOTIFY_SOCKET": str(path), "CTSD_TOKEN": "bench-token-0123456789abcdef"})
        cmd = [
            sys.executable, "-m", "ctsd", "serve", "--data-dir", str(data_dir),
            "--port", str(free_port()), "--log-format", "json", "--log-level", "warning",
        ]  # fmt: skip
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT
        )

    def wait_ready(self, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.sock.recv(65536).decode()
            except TimeoutError:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"daemon exited: {err}") from None
                continue
            if "READY=1" in msg.split("\n"):
                return time.perf_counter() - self.t0
        raise RuntimeError("no READY=1")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()


def stamps(data_dir: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for p in sorted(data_dir.glob("*.json")):
        st = p.stat()
        out[p.name] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def bench_process(data_dir: Path, starts: int, idle_s: float) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="ctsd-bench-"))
    times = []
    for _ in range(starts):
        d = Daemon(data_dir, workdir)
        times.append(d.wait_ready())
        d.stop()
    d = Daemon(data_dir, workdir)
    d.wait_ready()
    rss_ready = rss_mb(d.proc.pid)
    # the first sweep learns every connection and the first flush may persist what start-up
    # derived; then watch an idle stretch of many ticks
    time.sleep(1.5)
    before = stamps(data_dir)
    changes = 0
    t0 = time.monotonic()
    last = before
    while time.monotonic() - t0 < idle_s:
        time.sleep(0.005)  # poll interval far below the 0.5 s flush and 0.1 s sweep
        now = stamps(data_dir)
        changes += sum(1 for k in now if now[k] != last.get(k))
        last = now
    rss_after = rss_mb(d.proc.pid)
    d.stop()
    return {
        "start_s": times,
        "rss_ready_mb": rss_ready,
        "rss_after_mb": rss_after,
        "idle_writes": changes,
        "idle_ticks": int(idle_s / 0.1),
    }


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def bench_tick(data_dir: Path) -> dict[str, Any]:
    store = Store(data_dir)
    store.open()
    sw = sweeps.Sweeper(store, Prober(store))
    now = time.monotonic()  # the sweep's clock
    first: list[float] = []  # the first sweep learns every connection, in slices
    while True:
        t0 = time.perf_counter()
        sw.tick(now, sweeps.TICK_BUDGET)
        first.append(time.perf_counter() - t0)
        if not sw.backlog:
            break
    ids = list(store.connections)
    n = len(ids)
    idle = []
    for _ in range(2000):
        t0 = time.perf_counter()
        out = sw.tick(now)
        idle.append(time.perf_counter() - t0)
        assert not out
    # heartbeat load, simulated time: each connection beats every ~10 s, ticks 1 s apart,
    # stale_after_s 30 (the default): entries keep coming due and being pushed back.
    store.settings.stale_after_s = 30.0
    rng = random.Random(1)
    sim = now
    loaded = []
    beats_per_tick = n // 10
    for _ in range(300):
        sim += 1.0
        for _ in range(beats_per_tick):
            cid = ids[rng.randrange(n)]
            store.heartbeats[cid] = iso_at(time.time())
            sw.beat(cid, sim)
        t0 = time.perf_counter()
        out = sw.tick(sim, sweeps.TICK_BUDGET)
        loaded.append(time.perf_counter() - t0)
        while sw.backlog:  # as the daemon's loop does: the rest in further slices
            t0 = time.perf_counter()
            out.update(sw.tick(sim, sweeps.TICK_BUDGET))
            loaded.append(time.perf_counter() - t0)
    sw.beats_dirty.clear()
    return {"first": first, "idle": idle, "loaded": loaded, "stale_under_load": len(out)}


def main() -> None:
    os.umask(0o077)  # data files as the unit makes them (UMask=0077): the daemon refuses wider
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--starts", type=int, default=5)
    ap.add_argument("--idle-s", type=float, default=5.0)
    args = ap.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="ctsd-bench-")) / "data"
    make_data(data_dir, args.connections)
    size = sum(p.stat().st_size for p in data_dir.glob("*.json")) / 1e6
    proc = bench_process(data_dir, args.starts, args.idle_s)
    tick = asyncio.run(bench_tick(data_dir))
    ms = 1e3
    rows = [
        ("cold start to READY, median", f"{statistics.median(proc['start_s']):.3f} s", "≤ 1 s"),
        ("cold start to READY, max", f"{max(proc['start_s']):.3f} s", "≤ 1 s"),
        ("RSS after READY", f"{proc['rss_ready_mb']:.1f} MB", "≤ 150 MB"),
        ("RSS after idle sweeps", f"{proc['rss_after_mb']:.1f} MB", "≤ 150 MB"),
        (
            "first sweep (learns all): slice max",
            f"{max(tick['first']) * ms:.2f} ms ({len(tick['first'])} slices, "
            f"{sum(tick['first']) * ms:.1f} ms in all)",
            "≤ 5 ms",
        ),
        ("idle tick p50", f"{pct(tick['idle'], 0.5) * ms:.4f} ms", "≤ 5 ms"),
        ("idle tick p99", f"{pct(tick['idle'], 0.99) * ms:.4f} ms", "≤ 5 ms"),
        ("tick under heartbeats p50", f"{pct(tick['loaded'], 0.5) * ms:.3f} ms", "≤ 5 ms"),
        ("tick under heartbeats p99", f"{pct(tick['loaded'], 0.99) * ms:.3f} ms", "≤ 5 ms"),
        (
            "tick under heartbeats max",
            f"{max(tick['loaded']) * ms:.3f} ms",
            f"(worst of {len(tick['loaded'])} slices)",
        ),
        (
            "writes while idle",
            f"{proc['idle_writes']} in {proc['idle_ticks']} ticks",
            "0",
        ),
    ]
    print(f"\nctsd sweeps bench: {args.connections} connections, data {size:.1f} MB, ")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, starts={args.starts}\n")
    w = max(len(r[0]) for r in rows)
    print(f"| {'measure'.ljust(w)} | result | target |")
    print(f"| {'-' * w} | --- | --- |")
    for name, value, target in rows:
        print(f"| {name.ljust(w)} | {value} | {target} |")
    print("\nstarts (s):", ", ".join(f"{t:.3f}" for t in proc["start_s"]))


if __name__ == "__main__":
    main()
