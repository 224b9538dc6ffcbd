"""Store benchmark: one change through the store against the floor of one durable file write.

    .venv/bin/python bench/store.py                 # 1,000 and 10,000 connections
    .venv/bin/python bench/store.py --sizes 1000 --dir /var/tmp

For each size it measures, in the same run and on the same filesystem:

  (a) floor   msgspec encode + msgspec.json.format(indent=2) + durable atomic write
              (temp file, fsync, rename, fsync dir) of the same connections.json, p50/p99
  (b) change  one `await store.submit(ops.update(...))`, sequential, p50/p99
  (c) group   durable changes per second with 64 concurrent changers
  (d) naive   changes per second when each change rewrites the whole file (as (a))

and prints the ratios (b)/(a) and (c)/(d). Targets at 1,000 connections on 2 cores:
(b) p50 ≤ 1.5 × (a); (c) ≥ 5,000/s and ≥ 10 × (d). Not a test: numbers depend on the disk
and on what else runs; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import structlog

from ctsd import files, ops
from ctsd.models import Connection
from ctsd.store import Store


def make_connections(n: int) -> list[Connection]:
    """Records shaped like the seed's, about 1 KB each once indented."""
    ts = "2024-01-01T00:00:00.000Z"
    return [
        Connection(
            id=f"conn_{i:012x}",
            name=f"Bybit account {i}",
            exchange=("bybit", "binance", "okx")[i % 3],
            exchange_id=i % 3 + 1,
            api_key=f"key-{i:08d}-" + "k" * 40,
            api_secret=f"secret-{i:08d}-" + "s" * 56,
            is_enabled=True,
            is_live_trade=i % 2 == 0,
            is_active=i % 4 != 0,
            volume_factor=1.0 + (i % 10) / 10,
            connection_settings='{"recvWindow": 5000}',
            created_at=ts,
            updated_at=ts,
        )
        for i in range(n)
    ]


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def durable_write(path: Path, body: bytes) -> None:
    """The floor's write, written out by hand: temp → fsync → rename → fsync dir."""
    tmp = path.with_name(f".bench-tmp-{path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def floor(directory: Path, records: list[Connection], iterations: int) -> list[float]:
    encoder = msgspec.json.Encoder()
    path = directory / "connections.json"
    out = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        body = msgspec.json.format(encoder.encode(records), indent=2) + b"\n"
        durable_write(path, body)
        out.append(time.perf_counter() - t0)
    return out


def naive_rate(directory: Path, records: list[Connection], seconds: float) -> float:
    """One change = change the record in memory, re-encode everything, write it durably."""
    encoder = msgspec.json.Encoder()
    path = directory / "connections.json"
    records = list(records)
    n = 0
    end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < end:
        i = n % len(records)
        records[i] = msgspec.structs.replace(records[i], name=f"naive {n}")
        durable_write(path, msgspec.json.format(encoder.encode(records), indent=2) + b"\n")
        n += 1
    return n / (time.perf_counter() - t0)


def seed_dir(directory: Path, records: list[Connection]) -> None:
    directory.mkdir(mode=0o700)
    (directory / files.CONNECTIONS).write_bytes(files.encode_table(records))


async def store_bench(
    directory: Path, records: list[Connection], iterations: int, seconds: float
) -> tuple[list[float], float, int, int]:
    store = Store(directory)
    store.open()
    store.start()
    ids = [r.id for r in records]
    try:
        # Warm up (first writes create the sync log and fill the page cache).
        for k in range(20):
            await store.submit(ops.update(ids[k], {"name": f"warm {k}"}), "bench")
        single = []
        for k in range(iterations):
            t0 = time.perf_counter()
            await store.submit(ops.update(ids[k % len(ids)], {"name": f"one {k}"}), "bench")
            single.append(time.perf_counter() - t0)

        writes = 0

        def count(_s: float, _n: int) -> None:
            nonlocal writes
            writes += 1

        store.on_commit.append(count)
        done = 0
        end = time.perf_counter() + seconds

        async def changer(w: int) -> None:
            nonlocal done
            k = 0
            while time.perf_counter() < end:
                cid = ids[(w * 7919 + k) % len(ids)]
                await store.submit(ops.update(cid, {"name": f"w{w} {k}"}), "bench")
                k += 1
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(changer(w) for w in range(64)))
        rate = done / (time.perf_counter() - t0)
        return single, rate, done, writes
    finally:
        await store.close()


def ms(x: float) -> str:
    return f"{x * 1e3:7.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir in .)")
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of (c) and (d)")
    args = ap.parse_args()
    # The store logs its start (created_defaults, loaded): keep the table readable.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    load_before = os.getloadavg()[0]

    root = Path(tempfile.mkdtemp(prefix="ctsd-bench-", dir=args.dir or os.getcwd()))
    rows = []
    try:
        for n in args.sizes:
            records = make_connections(n)
            iterations = 300 if n <= 1000 else 60
            work = root / f"n{n}"
            work.mkdir()
            size = len(files.encode_table(records))
            a = floor(work, records, iterations)
            d = naive_rate(work, records, args.seconds)
            seed_dir(work / "store", records)
            b, c, done, writes = asyncio.run(
                store_bench(work / "store", records, iterations, args.seconds)
            )
            rows.append((n, size, a, b, c, d, done, writes))
            shutil.rmtree(work)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"ctsd store bench · Python {sys.version.split()[0]} · {os.cpu_count()} CPUs")
    print(f"filesystem: {os.path.realpath(args.dir or os.getcwd())}")
    print(f"load average (1 min) before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    print()
    head = (
        "connections   file MB | (a) floor p50   p99 | (b) change p50   p99 | (b)/(a) |"
        " (c) 64 changers/s | (d) naive/s | (c)/(d) | writes in (c)"
    )
    print(head)
    print("-" * len(head))
    for n, size, a, b, c, d, done, writes in rows:
        print(
            f"{n:11,d} {size / 1e6:9.2f} |"
            f"    {ms(pct(a, 0.5))} {ms(pct(a, 0.99))} |"
            f"     {ms(pct(b, 0.5))} {ms(pct(b, 0.99))} |"
            f" {pct(b, 0.5) / pct(a, 0.5):7.2f} |"
            f" {c:17,.0f} | {d:11,.0f} | {c / d:7.1f} |"
            f" {writes:,} for {done:,} changes"
        )
    print()
    print("times in ms; (b) includes the sync-log write the floor does not have.")
    if rows and rows[0][0] == 1000:
        _, _, a, b, c, d, _, _ = rows[0]
        verdict = [
            ("(b) p50 <= 1.5 x (a)", pct(b, 0.5) <= 1.5 * pct(a, 0.5)),
            ("(c) >= 5,000/s", c >= 5000),
            ("(c) >= 10 x (d)", c >= 10 * d),
        ]
        marks = [f"{t}: {'met' if ok else 'MISSED'}" for t, ok in verdict]
        print("targets at 1,000: " + ", ".join(marks))


if __name__ == "__main__":
    main()
