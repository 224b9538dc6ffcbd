"""Store benchmark: a change through the real daemon's one door, beside its floors.

    .venv/bin/python bench/store.py                        # 1,000 and 10,000 connections
    .venv/bin/python bench/store.py --sizes 1000 --loop asyncio uvloop --dir /var/tmp

Starts `ctsd serve` on a fresh data dir (under the current directory or `--dir`, so fsync
costs what it costs on that disk) holding N connections, and talks to it over the bus.
Measured in the same run:

  floors   raw websockets echo round trip (its own process, as ctsd is), and a bare
           append + fdatasync of a journal-record-sized write on the same filesystem;
           "echo + append" adds the two sample by sample
  (a) ack  `connections.update`, sequential on one connection, p50/p99: the answer comes
           once the change is journalled (append + fdatasync)
  (b) rate durable changes/s with 64 clients, one change in flight each, for `--seconds`
           (group commit: changes queued while an append is in flight share the next one)
  (c) lag  `connections.update` with `"sync": "files"`: answered once the change is in
           `connections.json` too, so it bounds ack → in the data file. Measured twice:
           quiet (sequential), and by a 65th client under (b)'s load (run again: each of
           its changes ends the checkpointer's coalescing wait, so the writers' rate in
           that run, printed too, is lower than (b)'s). Since that is so, also:
  (d) file an ordinary change (no `sync`) under (b)'s load (run again, its rate not
           counted): from its ack until `connections.json` holds it (polled every ms), the
           lag every other change sees
Each run of the 64 writers sets values of its own (no update repeats an earlier one).

`--loop` runs the whole set once per event loop (CTSD_EVENT_LOOP for the daemon; the
daemon's own default, uvloop, unless told); the clients and the raw echo server (in their
own processes) run on the same kind of event loop as the daemon they are measured beside.
Targets on 2 cores: (a) p50 ≤ 0.8 ms and p99 ≤ 2 ms; (b) ≥ 10,000/s; (c) and (d) p99 ≤ 100 ms —
at 1,000 and at 10,000 connections. Hand edit → subscriber is bench/watch.py. Not a test:
numbers depend on the disk and on what else runs (the load average is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec
from websockets.asyncio.client import connect

from common import (
    HEADERS,
    Call,
    Row,
    auth_and,
    connections,
    daemon,
    metric,
    ms,
    open_many,
    pct,
    print_table,
    raw_floor,
    run_on,
    timed,
)
from ctsd import journal, models, ops
from ctsd.core import Committed, Context, Request, apply_group

VERDICTS: list[str] = []


def record_bytes() -> int:
    """The size of the journal frame of one `connections.update` of a bench record, made by
    the daemon's own core and journal encoder, so the floor appends what ctsd appends."""
    committed = Committed()
    ts = "2024-01-01T00:00:00.000Z"
    conn = msgspec.convert(
        {**connections(1)[0], "created_at": ts, "updated_at": ts}, models.Connection
    )
    committed.connections[conn.id] = conn
    request = Request(ops.update(conn.id, {"user_id": 123_456}), "bus", None)
    ctx = Context("2026-01-01T00:00:00.000Z", frozenset(), {})
    _, change = apply_group(committed, [request], ctx)
    return len(journal.frame(msgspec.json.encode(journal.Record(1, change))))


def append_floor(directory: Path, n: int, size: int) -> list[float]:
    """Bare append + fdatasync of `size` bytes, on a file that is cut back now and then like
    the journal is (a growing file: each append also moves its size)."""
    fd, name = tempfile.mkstemp(prefix="floor-", dir=directory)
    out = []
    try:
        data = b"x" * size
        end = 0
        for i in range(n):
            if i % 64 == 0:
                os.ftruncate(fd, 0)
                os.fdatasync(fd)
                end = 0
            t0 = time.perf_counter()
            os.pwrite(fd, data, end)
            os.fdatasync(fd)
            out.append(time.perf_counter() - t0)
            end += len(data)
    finally:
        os.close(fd)
        os.unlink(name)
    return out


async def echo_floor(url: str, n: int) -> list[float]:
    ws = await connect(url, compression=None)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await ws.send(f'{{"id":{i},"type":"ping"}}')
        await ws.recv()
        out.append(time.perf_counter() - t0)
    await ws.close()
    return out


async def measure(
    d_url: str, raw_url: str, n: int, args: argparse.Namespace, data_dir: Path
) -> tuple[list[Row], dict[str, float]]:
    rows: list[Row] = []
    bus = (await open_many(d_url, 1, HEADERS))[0]
    await auth_and(bus, None)
    call = Call(bus)
    echo = await echo_floor(raw_url, args.updates)
    size = record_bytes()
    append = append_floor(data_dir, args.updates, size)
    floor = [e + a for e, a in zip(echo, append, strict=True)]
    for k in range(50):  # warm up
        await call("connections.update", connection_id=f"b{k}", changes={"user_id": k + 2})

    ack = [
        await timed(
            call, "connections.update", connection_id=f"b{k % n}", changes={"user_id": k + 3}
        )
        for k in range(args.updates)
    ]
    quiet_lag = [
        await timed(
            call,
            "connections.update",
            connection_id=f"b{(k * 7) % n}",
            changes={"user_id": k + 5},
            sync="files",
        )
        for k in range(args.lag_samples)
    ]

    clients = await open_many(d_url, 64, HEADERS)
    await asyncio.gather(*(auth_and(ws, None) for ws in clients))
    calls = [Call(ws) for ws in clients]
    runs = 0

    async def under_load(extra: Callable[[float], Awaitable[None]] | None) -> tuple[int, float]:
        """The 64 writers for `--seconds` (with `extra`, given the end): (changes, seconds).
        Each run sets values of its own, so no update repeats one of an earlier run (a no-op
        change would cost the daemon nothing)."""
        nonlocal runs
        runs += 1
        done = 0
        end = time.perf_counter() + args.seconds

        async def writer(w: int) -> None:
            nonlocal done
            c = calls[w]
            k = 0
            while time.perf_counter() < end:
                cid = f"b{(w * 7919 + k) % n}"
                value = (runs * 64 + w) * 1_000_000 + k
                await c("connections.update", connection_id=cid, changes={"user_id": value})
                k += 1
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(64)), *([extra(end)] if extra else []))
        return done, time.perf_counter() - t0

    # (b) the 64 writers alone
    http_url = d_url.replace("ws://", "http://").removesuffix("/ws")
    commits0 = metric(http_url, "ctsd_write_seconds_count")
    changes, took = await under_load(None)
    rate = changes / took
    commits = metric(http_url, "ctsd_write_seconds_count") - commits0

    # (c) the same load again, with a 65th client waiting for the files each time
    loaded_lag: list[float] = []

    async def prober(end: float) -> None:
        k = 0
        while time.perf_counter() < end:
            loaded_lag.append(
                await timed(
                    call,
                    "connections.update",
                    connection_id=f"b{(k * 13) % n}",
                    changes={"user_id": 9_000_000_000 + k},
                    sync="files",
                )
            )
            k += 1

    probed, took = await under_load(prober)
    probed_rate = probed / took

    # (d) the same load again (its rate not counted: the file polling costs this process CPU)
    file_lag: list[float] = []

    async def file_prober(end: float) -> None:
        path = data_dir / "connections.json"
        k = 0
        while time.perf_counter() < end:
            # A field the writers leave alone, so no later change hides this one in the file.
            name = f"lag probe {k}"
            await call(
                "connections.update", connection_id=f"b{(k * 17) % n}", changes={"name": name}
            )
            acked = time.perf_counter()
            if await until_in_file(path, f'"name": "{name}"'.encode(), acked + 10):
                file_lag.append(time.perf_counter() - acked)
            k += 1

    await under_load(file_prober)
    await asyncio.gather(*(ws.close() for ws in [*clients, bus]), return_exceptions=True)

    tag = f"@{n:,}"
    rows += [
        (f"floor: raw echo round trip {tag}", ms(pct(echo, 0.5)), ms(pct(echo, 0.99)), ""),
        (
            f"floor: append+fdatasync {size} B {tag}",
            ms(pct(append, 0.5)),
            ms(pct(append, 0.99)),
            "",
        ),
        (f"floor: echo + append {tag}", ms(pct(floor, 0.5)), ms(pct(floor, 0.99)), ""),
        (
            f"(a) connections.update ack {tag}",
            ms(pct(ack, 0.5)),
            ms(pct(ack, 0.99)),
            f"{pct(ack, 0.5) / pct(floor, 0.5):.2f}/{pct(ack, 0.99) / pct(floor, 0.99):.2f}"
            " × echo+append (p50/p99)",
        ),
        (
            f"(b) 64 clients {tag}",
            f"{rate:,.0f}/s",
            "",
            f"{changes:,} changes in {commits:,.0f} journal appends",
        ),
        (
            f"(b) 64 clients + (c)'s 65th waiting for the files {tag}",
            f"{probed_rate:,.0f}/s",
            "",
            "the 64 writers' rate in (c)'s run",
        ),
        (f"(c) sync=files ack, quiet {tag}", ms(pct(quiet_lag, 0.5)), ms(pct(quiet_lag, 0.99)), ""),
        (
            f"(c) sync=files ack under (b)'s load {tag}",
            ms(pct(loaded_lag, 0.5)),
            ms(pct(loaded_lag, 0.99)),
            f"{len(loaded_lag)} samples",
        ),
        (
            f"(d) ordinary change: ack → in the file, under (b)'s load {tag}",
            ms(pct(file_lag, 0.5)),
            ms(pct(file_lag, 0.99)),
            f"{len(file_lag)} samples (the file polled every ms)",
        ),
    ]
    figures = {
        "ack50": pct(ack, 0.5),
        "ack99": pct(ack, 0.99),
        "rate": rate,
        "lag99": max(pct(quiet_lag, 0.99), pct(loaded_lag, 0.99)),
        "file99": pct(file_lag, 0.99),
    }
    return rows, figures


async def until_in_file(path: Path, needle: bytes, deadline: float) -> bool:
    """Poll `path` (its stamp every ms; read again when it moved) until it holds `needle`.
    False at `deadline`."""
    seen = None
    while time.perf_counter() < deadline:
        st = os.stat(path)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != seen:
            seen = stamp
            if needle in await asyncio.to_thread(path.read_bytes):
                return True
        await asyncio.sleep(0.001)
    return False


def judge(loop: str, n: int, f: dict[str, float]) -> None:
    checks = [
        (f"(a) p50 {f['ack50'] * 1e3:.2f} ms ≤ 0.8", f["ack50"] <= 0.0008),
        (f"(a) p99 {f['ack99'] * 1e3:.2f} ms ≤ 2", f["ack99"] <= 0.002),
        (f"(b) {f['rate']:,.0f}/s ≥ 10,000", f["rate"] >= 10_000),
        (f"(c) p99 {f['lag99'] * 1e3:.1f} ms ≤ 100", f["lag99"] <= 0.1),
        (f"(d) p99 {f['file99'] * 1e3:.1f} ms ≤ 100", f["file99"] <= 0.1),
    ]
    marks = ", ".join(f"{t}: {'met' if ok else 'NOT met'}" for t, ok in checks)
    VERDICTS.append(f"{loop} @{n:,}: {marks}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--loop", nargs="+", default=["uvloop"], choices=["asyncio", "uvloop"])
    ap.add_argument("--dir", type=Path, default=Path.cwd(), help="where the data dir goes")
    ap.add_argument("--updates", type=int, default=1000)
    ap.add_argument("--lag-samples", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    rows: list[Row] = []
    for loop in args.loop:
        with raw_floor(loop) as raw_url:
            for n in args.sizes:
                table = {"connections.json": connections(n)}
                with daemon(args.dir, {"CTSD_EVENT_LOOP": loop}, table) as d:
                    measured = measure(d.ws_url, raw_url, n, args, d.data_dir)
                    part, figures = run_on(loop, measured)
                    rows += [(f"[{loop}] {r[0]}", *r[1:]) for r in part]
                    judge(loop, n, figures)
    print_table(rows, VERDICTS, load0)


if __name__ == "__main__":
    main()
