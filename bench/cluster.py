"""Cluster benchmark: raw JetStream floors and the ctsd cluster engine, one 3-node cluster.

    .venv/bin/python bench/cluster.py                  # ~1 minute
    .venv/bin/python bench/cluster.py --rounds 500 --seconds 5 --dir /var/tmp

Starts a 3-node nats-server JetStream cluster (tests/nats_cluster.py: loopback ports, file
storage under a temp dir in the current directory or `--dir`) and one stream per part with 3
replicas. Clients run in this process, on the same 2 cores as the three servers.

Floors (raw nats-py, no ctsd code):
  (a) publish → ack        one publisher, sequential, p50/p99
  (b) publish → consumer   the time from publish to receipt on another connection through
                           a push consumer (ack none, flow control), sequential, p50/p99
  (c) acked publishes/s    64 concurrent publishers on one connection, for `--seconds`

The engine (ctsd.cluster.engine.ClusterEngine, the store's future transport; payloads are
opaque bytes of `--size`, no store code yet):
  (d) commit on host A     `ClusterEngine.commit`: publish with the expected sequence, then
                           apply the own group at once (`apply_own`) — and, second row,
                           without it: wait until host A's consumer delivers it back. What
                           one change costs before the store adds its own work, p50/p99
  (e) A → B                the same commit, until host B's consumer applied it (target of
                           the full ctsd path: p99 ≤ 2 ms and ≤ 3 × floor (b))
  (f) changes/s            3 hosts, 64 clients spread over them; each host commits what its
                           clients queued as one group (group commit); an expected-sequence
                           conflict is answered by catching up and publishing again. Shows
                           groups/s, conflicts/s and one change's latency, with and without
                           `apply_own`: the ceiling of the optimistic-concurrency design
                           (target of the full ctsd path: ≥ 5,000 changes/s)

Not a test: numbers depend on the machine and on what else runs (the 1-minute load average
is printed before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "daemon")]

import nats  # noqa: E402
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig  # noqa: E402
from tests.nats_cluster import NatsCluster  # noqa: E402

from ctsd.cluster.config import ClusterSettings  # noqa: E402
from ctsd.cluster.engine import ClusterEngine  # noqa: E402
from ctsd.cluster.errors import Conflict  # noqa: E402
from ctsd.cluster.messages import Change  # noqa: E402

Row = tuple[str, str, str, str]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def ms(v: float) -> str:
    return f"{v * 1000:.2f} ms"


def lat_row(name: str, values: list[float], note: str = "") -> Row:
    return (name, ms(pct(values, 0.5)), ms(pct(values, 0.99)), note)


# --- floors ---------------------------------------------------------------------------------


async def floors(cluster: NatsCluster, rounds: int, seconds: float, size: int) -> list[Row]:
    payload = os.urandom(size)
    pub = await nats.connect(cluster.urls)
    sub_nc = await nats.connect(cluster.urls)
    js = pub.jetstream(timeout=5)
    await js.add_stream(StreamConfig(name="FLOOR", subjects=["floor.>"], num_replicas=3))
    # (a)
    for _ in range(20):
        await js.publish("floor.a", payload)
    acks = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await js.publish("floor.a", payload)
        acks.append(time.perf_counter() - t0)
    # (b)
    got: asyncio.Queue[float] = asyncio.Queue()

    async def on_msg(_msg: object) -> None:
        got.put_nowait(time.perf_counter())

    inbox = sub_nc.new_inbox()
    await sub_nc.subscribe(inbox, cb=on_msg)
    await sub_nc.jetstream().add_consumer(
        "FLOOR",
        ConsumerConfig(
            deliver_subject=inbox,
            deliver_policy=DeliverPolicy.NEW,
            ack_policy=AckPolicy.NONE,
            filter_subject="floor.b",
            flow_control=True,
            idle_heartbeat=1.0,
            mem_storage=True,
            num_replicas=1,
        ),
    )
    await sub_nc.flush()
    deliveries = []
    for i in range(rounds + 20):
        t0 = time.perf_counter()
        await js.publish("floor.b", payload)
        t1 = await asyncio.wait_for(got.get(), 5)
        if i >= 20:
            deliveries.append(t1 - t0)
    # (c)
    done = 0
    end = time.perf_counter() + seconds

    async def publisher() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await js.publish("floor.c", payload)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(publisher() for _ in range(64)))
    rate = done / (time.perf_counter() - t0)
    await pub.close()
    await sub_nc.close()
    return [
        lat_row("(a) raw publish → ack", acks),
        lat_row("(b) raw publish → consumer", deliveries, "other connection"),
        ("(c) raw acked publishes/s, 64 publishers", f"{rate:,.0f}/s", "", f"{done:,} acks"),
    ]


# --- the engine -----------------------------------------------------------------------------


class Host:
    """One simulated host: an engine plus the applied-seq bookkeeping a store would keep."""

    def __init__(self, cluster: NatsCluster, name: str, host: str) -> None:
        self.settings = ClusterSettings(
            nats_urls=tuple(cluster.urls), name=name, host_id=host, publish_timeout_s=10.0
        )
        self.engine = ClusterEngine(self.settings)
        self.applied_at: dict[int, float] = {}

    async def apply(self, change: Change) -> None:
        self.applied_at[change.seq] = time.perf_counter()

    async def apply_own(self, seq: int) -> None:
        self.applied_at[seq] = time.perf_counter()

    async def start(self) -> None:
        await self.engine.start(wait_s=10)
        self.engine.subscribe_from(0, self.apply)
        await self.engine.catch_up(timeout=10)

    async def commit(self, payload: bytes, own: bool) -> tuple[int, int]:
        """Publish against the applied state; on conflict catch up and publish again.

        Returns (seq, conflicts). `own`: apply the own group at once (`apply_own`), else wait
        until the consumer delivers it back."""
        conflicts = 0
        while True:
            try:
                seq = await self.engine.commit(
                    payload,
                    self.engine.applied_seq,
                    self.engine.new_local_id(),
                    self.apply_own if own else None,
                )
                return seq, conflicts
            except Conflict as exc:
                conflicts += 1
                await self.engine.wait_applied(exc.last_seq or 0, timeout=10)


async def engine_latency(cluster: NatsCluster, rounds: int, size: int) -> list[Row]:
    payload = os.urandom(size)
    a, b = Host(cluster, "benchlat", "host-a"), Host(cluster, "benchlat", "host-b")
    await a.start()
    await b.start()
    rows = []
    for own in (True, False):
        mine, cross = [], []
        for i in range(rounds + 20):
            t0 = time.perf_counter()
            seq, _ = await a.commit(payload, own)
            t1 = time.perf_counter()
            await b.engine.wait_applied(seq, timeout=10)
            if i >= 20:
                mine.append(t1 - t0)
                cross.append(b.applied_at[seq] - t0)
        how = "own group applied at once" if own else "own group via the consumer"
        rows.append(lat_row(f"(d) engine commit on A{'' if own else ', consumer'}", mine, how))
        if own:
            rows.append(lat_row("(e) engine commit on A → applied on B", cross))
    await a.engine.close()
    await b.engine.close()
    return rows


async def engine_rate(cluster: NatsCluster, seconds: float, size: int, own: bool) -> list[Row]:
    name = f"benchrate{int(own)}"
    hosts = [Host(cluster, name, f"host-{i}") for i in range(3)]
    for h in hosts:
        await h.start()
    payload = os.urandom(size)
    end = time.perf_counter() + seconds
    done = groups = conflicts = 0
    latencies: list[float] = []

    async def writer(h: Host, queue: asyncio.Queue[asyncio.Future[None]]) -> None:
        """Group commit: every change queued while the last group was in flight goes next."""
        nonlocal groups, conflicts
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            _, lost = await h.commit(payload * len(batch), own)
            groups += 1
            conflicts += lost
            for f in batch:
                f.set_result(None)

    queues: list[asyncio.Queue[asyncio.Future[None]]] = [asyncio.Queue() for _ in hosts]
    writers = [asyncio.create_task(writer(h, q)) for h, q in zip(hosts, queues, strict=True)]

    async def client(k: int) -> None:
        nonlocal done
        q = queues[k % len(hosts)]
        loop = asyncio.get_running_loop()
        while time.perf_counter() < end:
            f: asyncio.Future[None] = loop.create_future()
            t0 = time.perf_counter()
            q.put_nowait(f)
            await f
            latencies.append(time.perf_counter() - t0)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(64)))
    elapsed = time.perf_counter() - t0
    for w in writers:
        w.cancel()
    for h in hosts:
        await h.engine.close()
    how = "own applied at once" if own else "own via consumer"
    return [
        (
            f"(f) changes/s, 64 clients on 3 hosts, {'own' if own else 'consumer'}",
            f"{done / elapsed:,.0f}/s",
            "",
            f"{groups / elapsed:,.0f} groups/s, {conflicts / elapsed:,.0f} conflicts/s; {how}",
        ),
        lat_row("    one change in (f): queued → answered", latencies),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300, help="samples per latency (default 300)")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each rate run")
    ap.add_argument("--size", type=int, default=512, help="payload bytes per change (512)")
    ap.add_argument("--dir", help="where the servers keep their files (default: cwd)")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="ctsd-bench-nats-", dir=args.dir or os.getcwd()))
    cluster = NatsCluster(3, workdir=workdir).start()
    try:

        async def run() -> list[Row]:
            rows = await floors(cluster, args.rounds, args.seconds, args.size)
            rows += await engine_latency(cluster, args.rounds, args.size)
            rows += await engine_rate(cluster, args.seconds, args.size, own=True)
            rows += await engine_rate(cluster, args.seconds, args.size, own=False)
            return rows

        rows = asyncio.run(run())
    finally:
        cluster.close()
    print(f"ctsd cluster bench · Python {sys.version.split()[0]} · {os.cpu_count()} CPUs")
    print(f"3 nats-server nodes on loopback, stream replicas 3, payload {args.size} B")
    print(f"load average (1 min) before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    print()
    head = f"{'measure':<46} {'p50 / rate':>12} {'p99':>10}  note"
    print(head)
    print("-" * len(head))
    for name, a, b, note in rows:
        print(f"{name:<46} {a:>12} {b:>10}  {note}")


if __name__ == "__main__":
    main()
