"""Bus benchmark: the real daemon against raw `websockets` floors measured in the same run.

    .venv/bin/python bench/bus.py                    # everything, ~1 minute
    .venv/bin/python bench/bus.py --dir /var/tmp --rounds 30

Starts `ctsd serve` (a subprocess, on a temporary data dir under the current directory or
`--dir`, so fsync costs what it costs on that disk) and a raw websockets server (another
subprocess: echo, and `broadcast()` of given bytes to its subscribers). Clients run in this
process, all on the same 2 cores, as the floors are measured; clients and raw server on
uvloop, the daemon's default event loop.

  (a) round trip   `ping` on the bus vs the same frame echoed by raw websockets, p50/p99
  (b) update ack   `connections.update` at 1,000 connections, sequential, p50/p99 — the ack
                   comes after the durable write; floor: raw echo + one durable write of the
                   same-size connections.json (ctsd.atomic.write_files) in this process
  (c) fan-out      one change to 100 and 1,000 subscribers, p50/p99, against two floors
                   measured in the same run, rounds interleaved: raw `broadcast()` of the
                   very same frame bytes, and a bare durable change (raw server writes the
                   same two files ctsd writes, connections.json and the sync log, with
                   ctsd.atomic.write_files in a worker thread, then `broadcast()`s).
                   "trigger → last receipt" is from sending the command (raw: the trigger
                   message) to the last subscriber receiving its frame, so ctsd's includes
                   the durable write the contract requires before publishing; "first → last
                   receipt" is the fan-out itself, the spread between the first and the last
                   subscriber.
  (d) heartbeats   `connections.heartbeat` acks per second, 50 clients, 16 in flight each,
                   for `--seconds`; floor: raw echo of the same frames. Also shows how many
                   store changes (disk writes) happened meanwhile: heartbeats are in memory
                   and reach disk only with the periodic coalesced flush.

Targets on 2 cores: (c) last receipt ≤ 1.2 × raw; (d) ≥ 20,000/s. Not a test: numbers depend
on the machine and on what else runs (the 1-minute load average is printed before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    HEADERS,
    Call,
    Daemon,
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
)
from ctsd.atomic import write_files
from ctsd.files import CONNECTIONS, SYNC_LOG

VERDICTS: list[str] = []  # the targets, judged from the rows' own numbers


async def round_trips(
    send: Callable[[int], Awaitable[None]], ws: ClientConnection, n: int
) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await send(i)
        await ws.recv()
        out.append(time.perf_counter() - t0)
    return out


class Receivers:
    """N connections; `await round(trigger)` = (trigger → last receipt, first → last receipt)."""

    def __init__(self, conns: list[ClientConnection], marker: str) -> None:
        self.conns = conns
        self.marker = marker
        self.count = 0
        self.done: asyncio.Future[float] | None = None
        self.sample = ""
        self.first = 0.0
        self.tasks = [asyncio.create_task(self._loop(ws)) for ws in conns]

    async def _loop(self, ws: ClientConnection) -> None:
        try:
            async for msg in ws:
                if isinstance(msg, str) and msg.startswith(self.marker):
                    self.sample = msg
                    self.count += 1
                    if self.count == 1:
                        self.first = time.perf_counter()
                    if self.count == len(self.conns) and self.done and not self.done.done():
                        self.done.set_result(time.perf_counter())
        except Exception:
            pass

    async def round(self, trigger: Callable[[], Awaitable[None]]) -> tuple[float, float]:
        self.count = 0
        self.done = asyncio.get_running_loop().create_future()
        t0 = time.perf_counter()
        await trigger()
        last = await asyncio.wait_for(self.done, 60)
        return last - t0, last - self.first

    async def close(self) -> None:
        await asyncio.gather(*(ws.close() for ws in self.conns), return_exceptions=True)
        for t in self.tasks:
            t.cancel()


async def pipelined(
    conns: list[ClientConnection], frame: Callable[[int, int], str], seconds: float, window: int
) -> tuple[int, float, int]:
    """(acks, seconds, failures) with `window` requests in flight on every connection."""
    stop = time.perf_counter() + seconds
    total = 0
    failures = 0

    async def one(k: int, ws: ClientConnection) -> None:
        nonlocal total, failures
        next_id = 1_000_000
        inflight = 0
        for _ in range(window):
            next_id += 1
            await ws.send(frame(k, next_id))
            inflight += 1
        while inflight:
            msg = await ws.recv()
            inflight -= 1
            total += 1
            if '"success":false' in msg:
                failures += 1
            if time.perf_counter() < stop:
                next_id += 1
                await ws.send(frame(k, next_id))
                inflight += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k, ws) for k, ws in enumerate(conns)))
    return total, time.perf_counter() - t0, failures


# --- the benchmark ------------------------------------------------------------------------


async def bench(d: Daemon, raw_url: str, args: argparse.Namespace, base: Path) -> list[Row]:
    rows: list[Row] = []
    n_rt = args.round_trips

    # (a) round trip
    raw = await connect(raw_url, compression=None)
    frame = '{"id":%d,"type":"ping"}'
    raw_rt = await round_trips(lambda i: raw.send(frame % i), raw, n_rt)
    bus = await connect(d.ws_url, additional_headers=HEADERS, compression=None, max_size=None)
    await auth_and(bus, None)
    bus_rt = await round_trips(lambda i: bus.send(frame % (i + 1)), bus, n_rt)
    rows.append(("(a) raw echo round trip", ms(pct(raw_rt, 0.5)), ms(pct(raw_rt, 0.99)), ""))
    rows.append(
        (
            "(a) ctsd ping round trip",
            ms(pct(bus_rt, 0.5)),
            ms(pct(bus_rt, 0.99)),
            f"{pct(bus_rt, 0.5) / pct(raw_rt, 0.5):.2f} × raw",
        )
    )

    # (b) update ack at 1,000 connections
    call = Call(bus)
    call.id = n_rt + 10
    conns = connections(args.connections)
    await call(
        "data.import", data={"files": {"connections.json": conns}}, mode="replace", sync="files"
    )
    body = (d.data_dir / CONNECTIONS).read_bytes()
    floor_dir = Path(tempfile.mkdtemp(prefix="floor-", dir=base))
    target = floor_dir / "connections.json"
    write_s = []
    for _ in range(args.updates):
        t0 = time.perf_counter()
        await asyncio.to_thread(write_files, [(target, body)])
        write_s.append(time.perf_counter() - t0)
    upd = []
    for i in range(args.updates):
        t0 = time.perf_counter()
        await call(
            "connections.update", connection_id=f"b{i % len(conns)}", changes={"user_id": i + 2}
        )
        upd.append(time.perf_counter() - t0)
    floor = [w + pct(raw_rt, 0.5) for w in write_s]
    rows.append(
        (
            f"(b) floor: echo + durable write {len(body) // 1024} KB",
            ms(pct(floor, 0.5)),
            ms(pct(floor, 0.99)),
            "",
        )
    )
    rows.append(
        (
            f"(b) ctsd connections.update ack @{len(conns)}",
            ms(pct(upd, 0.5)),
            ms(pct(upd, 0.99)),
            f"{pct(upd, 0.5) / pct(floor, 0.5):.2f} × floor",
        )
    )

    # (c) fan-out, against two floors: raw broadcast() of the same bytes, and a bare durable
    # change (write the same two files as ctsd, then broadcast()). Rounds are interleaved so
    # all three see the same machine (load drifts during a run).
    await raw.send(f"FILES {floor_dir} {d.data_dir / CONNECTIONS} {d.data_dir / SYNC_LOG}")
    assert await raw.recv() == "ok"
    sizes = (
        f"{(d.data_dir / CONNECTIONS).stat().st_size // 1024} + "
        f"{(d.data_dir / SYNC_LOG).stat().st_size // 1024} KB"
    )
    for n in args.subscribers:
        subs = await open_many(d.ws_url, n, HEADERS)
        await asyncio.gather(
            *(auth_and(ws, {"id": 1, "type": "subscribe", "connection_ids": ["b1"]}) for ws in subs)
        )
        rx = Receivers(subs, '{"type":"events"')
        rsubs = await open_many(raw_url, n, None)
        for ws in rsubs:
            await ws.send("SUB")
            await ws.send("x")
        for ws in rsubs:
            assert await ws.recv() == "x"  # frames on one socket are handled in order
        rrx = Receivers(rsubs, '{"type":"events"')
        k = 0

        async def change() -> None:
            nonlocal k
            k += 1
            call.id += 1
            await bus.send(
                json.dumps(
                    {
                        "id": call.id,
                        "type": "connections.update",
                        "connection_id": "b1",
                        "changes": {"user_id": 10_000 + k},
                    }
                )
            )

        async def ctsd_round(rx: Receivers = rx) -> tuple[float, float]:
            t = await rx.round(change)
            while json.loads(await bus.recv()).get("type") != "result":
                pass  # the change's ack, after its events
            return t

        await ctsd_round()  # warm-up; its frame is the floors' payload
        payload = rx.sample

        async def bcast(msg: str = "BCAST " + payload) -> None:
            await raw.send(msg)

        async def write_bcast(msg: str = "WBCAST " + payload) -> None:
            await raw.send(msg)

        await rrx.round(bcast)
        await rrx.round(write_bcast)
        times: dict[str, list[tuple[float, float]]] = {"ctsd": [], "raw": [], "write": []}
        for _ in range(args.rounds):
            times["ctsd"].append(await ctsd_round())
            times["raw"].append(await rrx.round(bcast))
            times["write"].append(await rrx.round(write_bcast))
        await rx.close()
        await rrx.close()
        floors = (
            ("raw", f"raw broadcast() to {n}", f"{len(payload)} B frame"),
            ("write", f"raw write 2 files + broadcast() to {n}", sizes),
        )
        for label, i in (("trigger → last receipt", 0), ("first → last receipt", 1)):
            c = [t[i] for t in times["ctsd"]]
            notes = []
            for key, name, note in floors:
                r = [t[i] for t in times[key]]
                rows.append((f"(c) {name}, {label}", ms(pct(r, 0.5)), ms(pct(r, 0.99)), note))
                p50, p99 = pct(c, 0.5) / pct(r, 0.5), pct(c, 0.99) / pct(r, 0.99)
                notes.append(f"{p50:.2f}/{p99:.2f} × {key}")
                VERDICTS.append(
                    f"(c) {n} subscribers, {label}, vs {name.rsplit(' to ', 1)[0]}: "
                    f"p50 {p50:.2f} ×, p99 {p99:.2f} × ≤ 1.2: "
                    f"{'met' if max(p50, p99) <= 1.2 else 'NOT met'}"
                )
            rows.append(
                (
                    f"(c) ctsd change to {n} subscribers, {label}",
                    ms(pct(c, 0.5)),
                    ms(pct(c, 0.99)),
                    ", ".join(notes) + " (p50/p99)",
                )
            )

    # (d) heartbeats
    hb = await open_many(d.ws_url, args.clients, HEADERS)
    await asyncio.gather(*(auth_and(ws, None) for ws in hb))
    raw_hb = await open_many(raw_url, args.clients, None)

    def hb_frame(k: int, i: int) -> str:
        return f'{{"id":{i},"type":"connections.heartbeat","connection_id":"b{k}"}}'

    raw_n, raw_s, _ = await pipelined(raw_hb, hb_frame, args.seconds, args.window)
    rows.append((f"(d) raw echo, {args.clients} clients", f"{raw_n / raw_s:,.0f}/s", "", ""))
    try:
        await Call(hb[0])("connections.heartbeat", connection_id="b0")
        unavailable = ""
    except RuntimeError as e:  # ctsd.sweeps.heartbeat missing: say so, fake nothing
        unavailable = str(e)
    if unavailable:
        rows.append(("(d) ctsd heartbeats", "unavailable", "", unavailable))
        VERDICTS.append("(d) heartbeats: unavailable in this build")
    else:
        changes0 = metric(d.url, "ctsd_changes_total")
        n_ok, secs, failures = await pipelined(hb, hb_frame, args.seconds, args.window)
        changes = metric(d.url, "ctsd_changes_total") - changes0
        rows.append(
            (
                f"(d) ctsd heartbeats, {args.clients} clients",
                f"{n_ok / secs:,.0f}/s",
                f"{failures} failed",
                f"{(n_ok / secs) / (raw_n / raw_s):.2f} × raw; {changes:.0f} store "
                f"changes in {secs:.1f} s",
            )
        )
        rate = n_ok / secs
        VERDICTS.append(
            f"(d) {rate:,.0f} heartbeats/s ≥ 20,000/s: {'met' if rate >= 20_000 else 'NOT met'}"
        )
    await asyncio.gather(*(ws.close() for ws in [*hb, *raw_hb, raw, bus]), return_exceptions=True)
    shutil.rmtree(floor_dir, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dir", type=Path, default=Path.cwd(), help="where the data dir goes")
    ap.add_argument("--round-trips", type=int, default=2000)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--updates", type=int, default=300)
    ap.add_argument("--subscribers", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    # The clients and the raw server run on uvloop, as the daemon does by default.
    with raw_floor("uvloop") as raw_url, daemon(args.dir) as d:
        base = Path(tempfile.mkdtemp(prefix="floor-", dir=args.dir))
        try:
            rows = run_on("uvloop", bench(d, raw_url, args, base))
        finally:
            shutil.rmtree(base, ignore_errors=True)
    print_table(rows, VERDICTS, load0)


if __name__ == "__main__":
    main()
