"""What the bus-level benchmarks share: the raw websockets floor server, the daemon, clients,
percentiles and the table.

    python bench/common.py --raw-server PORT    # the floor server (the benches start it)

The raw server runs as its own process, as ctsd does, so both sides pay the same process
boundary: it echoes every frame; `SUB` makes a connection a subscriber; `BCAST x` sends `x`
to every subscriber with `broadcast()`; `FILES DIR F…` names files to copy into DIR and
`WBCAST x` writes them durably (ctsd.atomic.write_files, in a worker thread) before the
broadcast — a bare durable change.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, broadcast, serve

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "daemon")]

from tests.daemon import TOKEN, Daemon, free_port, wait_until  # noqa: E402

from ctsd.atomic import write_files  # noqa: E402

T = TypeVar("T")

HEADERS = {"Authorization": f"Bearer {TOKEN}"}
Row = tuple[str, str, str, str]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def ms(v: float) -> str:
    return f"{v * 1000:.2f} ms"


def print_table(rows: list[Row], verdicts: list[str], load0: float) -> None:
    head = ("measure", "p50 / rate", "p99", "ratio / note")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    print()
    for line in verdicts:
        print(line)
    load1 = os.getloadavg()[0]
    print(f"\nload average (1 min): {load0:.2f} before, {load1:.2f} after; {os.cpu_count()} cores")


# --- the raw websockets server ----------------------------------------------------------


async def raw_server(port: int) -> None:
    subs: set[ServerConnection] = set()
    plan: list[tuple[Path, bytes]] = []  # the files a durable change writes (FILES)

    async def handler(ws: ServerConnection) -> None:
        async for msg in ws:
            if isinstance(msg, str) and msg.startswith("BCAST "):
                broadcast(subs, msg[6:].encode(), text=True)
            elif isinstance(msg, str) and msg.startswith("WBCAST "):
                await asyncio.to_thread(write_files, plan)
                broadcast(subs, msg[7:].encode(), text=True)
            elif isinstance(msg, str) and msg.startswith("FILES "):
                target, *sources = msg.split()[1:]
                plan[:] = [(Path(target) / Path(f).name, Path(f).read_bytes()) for f in sources]
                await ws.send("ok")
            elif msg == "SUB":
                subs.add(ws)
            else:
                await ws.send(msg)
        subs.discard(ws)

    async with serve(handler, "127.0.0.1", port, compression=None, max_size=None):
        print("ready", flush=True)
        await asyncio.Future()


@contextlib.contextmanager
def raw_floor(loop: str = "asyncio") -> Iterator[str]:
    """The raw server in its own process (on `loop`) while the block runs; yields its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--raw-server", str(port), "--loop", loop],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield f"ws://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


# --- the daemon ---------------------------------------------------------------------------


@contextlib.contextmanager
def daemon(
    where: Path, env: dict[str, str] | None = None, files: dict[str, Any] | None = None
) -> Iterator[Daemon]:
    """`ctsd serve` on a fresh data dir under `where` (so fsync costs what it costs on that
    disk), rate limit out of the way and no periodic exchange probes; removed afterwards.
    `files`: data files written before the start (name → JSON value), e.g. a table too big
    for one bus frame."""
    os.umask(0o077)  # data files as the unit makes them (UMask=0077): the daemon refuses wider
    base = Path(tempfile.mkdtemp(prefix="ctsd-bench-", dir=where))
    data = base / "data"
    data.mkdir(mode=0o700)
    settings = {
        "server": {"rate_limit": {"requests": 10_000_000, "window_s": 1}},
        "test_interval_s": 0,
    }
    (data / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    for name, value in (files or {}).items():
        (data / name).write_text(json.dumps(value, indent=2) + "\n")
    d = Daemon(data, args=["--log-level", "warning"], env=env)
    try:
        d.start()
        wait_until(lambda: d.http("/health", token=None)[0] == 200, 10)
        yield d
    finally:
        d.close()
        shutil.rmtree(base, ignore_errors=True)


def metric(base_url: str, name: str) -> float:
    """One sample of the daemon's /metrics (`base_url`: http://host:port)."""
    req = urllib.request.Request(base_url + "/metrics", headers=HEADERS)
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def connections(n: int) -> list[dict[str, Any]]:
    """Records shaped like the seeds' (about 1 KB each once indented)."""
    return [
        {
            "id": f"b{i}",
            "name": f"Bybit account {i}",
            "exchange": ("bybit", "binance", "okx")[i % 3],
            "api_key": f"key-{i:08d}-" + "k" * 40,
            "api_secret": f"secret-{i:08d}-" + "s" * 56,
            "connection_settings": '{"recvWindow": 5000}',
        }
        for i in range(n)
    ]


# --- clients ------------------------------------------------------------------------------


async def open_many(url: str, n: int, headers: dict[str, str] | None) -> list[ClientConnection]:
    out: list[ClientConnection] = []
    for start in range(0, n, 50):  # batches: the listen backlog is small
        batch = await asyncio.gather(
            *(
                connect(url, additional_headers=headers, compression=None, max_size=None)
                for _ in range(start, min(n, start + 50))
            )
        )
        out.extend(batch)
    return out


async def auth_and(ws: ClientConnection, frame: dict[str, Any] | None) -> None:
    first = json.loads(await ws.recv())
    assert first["type"] == "auth_ok", first
    if frame is not None:
        await ws.send(json.dumps(frame))
        reply = json.loads(await ws.recv())
        assert reply.get("success") is True, reply


class Call:
    """Sequential request/reply on one connection (ids increase; events are skipped)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.id = 100

    async def __call__(self, type_: str, **args: Any) -> Any:
        self.id += 1
        await self.ws.send(json.dumps({"id": self.id, "type": type_, **args}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("type") == "result" and msg.get("id") == self.id:
                if not msg["success"]:
                    raise RuntimeError(f"{type_}: {msg['error']}")
                return msg["result"]


async def timed(call: Call, type_: str, **args: Any) -> float:
    t0 = time.perf_counter()
    await call(type_, **args)
    return time.perf_counter() - t0


def run_on(loop: str, main: Coroutine[Any, Any, T]) -> T:
    """`main` on a fresh event loop: "uvloop" (the daemon's default) or "asyncio"."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw-server", type=int, required=True)
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    cli = ap.parse_args()
    run_on(cli.loop, raw_server(cli.raw_server))
