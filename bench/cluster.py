"""Cluster benchmark: raw JetStream floors and the ctsd cluster engine, one 3-node cluster.

    .venv/bin/python bench/cluster.py                  # ~1 minute
    .venv/bin/python bench/cluster.py --rounds 500 --seconds 5 --dir /var/tmp

Starts a 3-node nats-server JetStream cluster (tests/nats_cluster.py: loopback ports, file
storage under a temp dir in the current directory or `--dir`) and one stream per part with 3
replicas. Clients run in this process, on the same 2 cores as the three servers, on the
daemon's own event loop (uvloop) unless `--loop asyncio`.

Floors (raw nats-py, no ctsd code):
  (a) publish → ack        one publisher, sequential, p50/p99
  (b) publish → consumer   the time from publish to receipt on another connection through
                           a push consumer (ack none, flow control), sequential, p50/p99;
                           second row, with three such consumers (as (g) has, one per
                           host), timed at one: what the servers' fan-out to 3 costs
  (c) acked publishes/s    64 concurrent publishers on one connection, for `--seconds`

The engine alone (ctsd.cluster.engine.ClusterEngine, the store's transport; here its
payloads are opaque bytes of `--size` and no store code runs):
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
                           `apply_own`: the ceiling of the whole-stream check; third row,
                           keyed groups (`keyed=True`: no stream check, the hosts check
                           them): the engine's ceiling for the groups most changes make
                           (target of the full ctsd path: ≥ 5,000 changes/s)

The full ctsd path: three `ctsd serve` daemons (own data dirs and ports) in cluster mode on
the same NATS cluster, clients on the bus:
  (g) floor: relays        the same path through three bare relays instead (bench/relay.py:
                           one process each, a websockets server and nats-py, no ctsd code):
                           what Python on these libraries costs before ctsd does anything
  (g) ctsd A → B           `connections.update` sent to daemon A until the event reaches a
                           subscriber on daemon B, sequential, p50/p99, × floor (b),
                           × (b) with 3 consumers and × the relays (targets: p99 ≤ 2 ms
                           and ≤ 3 × floor (b))
                           Under each (g) row, what the 2 cores did meanwhile: CPU per
                           round of each part (relays or daemons, servers, this client
                           process) and the cores busy on average. The closer to 2, the
                           more a round waits for a core rather than for code.
  (h) ctsd changes/s       64 bus clients spread over the 3 daemons, each updating its own
                           connection for `--seconds`: acknowledged changes/s (target
                           ≥ 5,000/s), and how many were answered `conflict`. Run twice:
                           with the websockets library's client, and with a lean one
                           (bench/leanws.py: prebuilt frames, replies cut by hand) that
                           leaves more of the 2 cores to the daemons and the servers; each
                           row says how much of a core the clients took

Not a test: numbers depend on the machine and on what else runs (the 1-minute load average
is printed before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "daemon"), str(ROOT / "bench")]

import nats  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig  # noqa: E402
from nats.js.client import JetStreamContext  # noqa: E402
from tests.daemon import free_port  # noqa: E402
from tests.nats_cluster import NatsCluster  # noqa: E402
from websockets.asyncio.client import ClientConnection  # noqa: E402

from common import HEADERS, Call, auth_and, daemon, open_many, run_on  # noqa: E402
from ctsd.cluster.config import ClusterSettings  # noqa: E402
from ctsd.cluster.engine import ClusterEngine  # noqa: E402
from ctsd.cluster.errors import Conflict  # noqa: E402
from ctsd.cluster.messages import Change  # noqa: E402
from leanws import LeanClient  # noqa: E402

Row = tuple[str, str, str, str]
WARM_UP = 20  # (g)'s first rounds, not kept
FLOOR: dict[str, float] = {}  # floor (b), alone and with 3 consumers, and the relays: (g)'s ratios


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
    # (b), then with as many consumers as (g) has hosts
    deliveries = await _deliveries(cluster, js, "floor.b", 1, rounds, payload)
    deliveries3 = await _deliveries(cluster, js, "floor.b3", 3, rounds, payload)
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
    FLOOR["b50"], FLOOR["b99"] = pct(deliveries, 0.5), pct(deliveries, 0.99)
    FLOOR["3b50"], FLOOR["3b99"] = pct(deliveries3, 0.5), pct(deliveries3, 0.99)
    return [
        lat_row("(a) raw publish → ack", acks),
        lat_row("(b) raw publish → consumer", deliveries, "other connection"),
        lat_row(
            "(b) the same, 3 consumers",
            deliveries3,
            "one per connection, as (g) has one per host; timed at one of them",
        ),
        ("(c) raw acked publishes/s, 64 publishers", f"{rate:,.0f}/s", "", f"{done:,} acks"),
    ]


async def _deliveries(
    cluster: NatsCluster,
    js: JetStreamContext,
    subject: str,
    consumers: int,
    rounds: int,
    payload: bytes,
) -> list[float]:
    """Sequential publishes to `subject`, each timed until the first connection's consumer
    receives it, with `consumers` push consumers in all (each on a connection of its own; ack
    none, flow control)."""
    got: asyncio.Queue[float] = asyncio.Queue()
    connections = [await nats.connect(cluster.urls) for _ in range(consumers)]
    for i, nc in enumerate(connections):

        async def on_msg(msg: Msg, timed: bool = i == 0) -> None:
            if msg.headers and msg.headers.get("Status") == "100":
                # The server's flow control (answered, or delivery stalls after a few MB) and
                # its idle heartbeats: not deliveries.
                if msg.reply:
                    await msg.respond(b"")
                return
            if timed:
                got.put_nowait(time.perf_counter())

        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=on_msg)
        await nc.jetstream().add_consumer(
            "FLOOR",
            ConsumerConfig(
                deliver_subject=inbox,
                deliver_policy=DeliverPolicy.NEW,
                ack_policy=AckPolicy.NONE,
                filter_subject=subject,
                flow_control=True,
                idle_heartbeat=1.0,
                mem_storage=True,
                num_replicas=1,
            ),
        )
        await nc.flush()
    out = []
    for i in range(rounds + 20):
        t0 = time.perf_counter()
        await js.publish(subject, payload)
        t1 = await asyncio.wait_for(got.get(), 5)
        if i >= 20:
            out.append(t1 - t0)
    for nc in connections:
        await nc.close()
    return out


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

    async def commit(self, payload: bytes, own: bool, keyed: bool = False) -> tuple[int, int]:
        """Publish against the applied state; on conflict catch up and publish again.

        Returns (seq, conflicts). `own`: apply the own group at once (`apply_own`), else wait
        until the consumer delivers it back. `keyed`: no stream check (never a conflict)."""
        conflicts = 0
        while True:
            try:
                seq = await self.engine.commit(
                    payload,
                    self.engine.applied_seq,
                    self.engine.new_local_id(),
                    self.apply_own if own else None,
                    keyed=keyed,
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


async def engine_rate(
    cluster: NatsCluster, seconds: float, size: int, own: bool, keyed: bool = False
) -> list[Row]:
    name = f"benchrate{int(own)}{int(keyed)}"
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
            _, lost = await h.commit(payload * len(batch), own, keyed)
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
    kind = "keyed" if keyed else "own" if own else "consumer"
    return [
        (
            f"(f) changes/s, 64 clients on 3 hosts, {kind}",
            f"{done / elapsed:,.0f}/s",
            "",
            f"{groups / elapsed:,.0f} groups/s, {conflicts / elapsed:,.0f} conflicts/s; {how}",
        ),
        lat_row("    one change in (f): queued → answered", latencies),
    ]


# --- the full ctsd path ----------------------------------------------------------------------


async def ctsd_path(cluster: NatsCluster, rounds: int, seconds: float, where: Path) -> list[Row]:
    rows = await relay_floor(cluster, rounds)
    with contextlib.ExitStack() as stack:
        daemons = [
            stack.enter_context(
                daemon(
                    where,
                    {
                        "CTSD_CLUSTER_NATS_URLS": ",".join(cluster.urls),
                        "CTSD_CLUSTER_NAME": "bench",
                        "CTSD_HOST_ID": f"bench-{i + 1}",
                    },
                )
            )
            for i in range(3)
        ]
        urls = [d.ws_url for d in daemons]
        parts = {
            "daemons": [d.proc.pid for d in daemons if d.proc is not None],
            "servers": server_pids(cluster),
        }
        return rows + await _latency(urls, rounds, parts) + await _rate(urls, seconds)


def server_pids(cluster: NatsCluster) -> list[int]:
    return [n.proc.pid for n in cluster.nodes if n.proc is not None]


def cpu_s(pid: int) -> float:
    """A process's CPU time so far (user + system), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def busy(
    timed: Awaitable[list[float]], parts: dict[str, list[int]], rounds: int
) -> tuple[list[float], str]:
    """`timed`'s samples, and what the 2 cores did meanwhile: each part's CPU per round (its
    processes' user + system time; "client": this process) and the cores busy on average. A
    sequential latency run that keeps the cores busy measures queueing as much as code."""
    parts = {**parts, "client": [os.getpid()]}
    before = {k: sum(map(cpu_s, pids)) for k, pids in parts.items()}
    t0 = time.perf_counter()
    out = await timed
    wall = time.perf_counter() - t0
    used = {k: sum(map(cpu_s, pids)) - before[k] for k, pids in parts.items()}
    per = ", ".join(f"{k} {v / rounds * 1e3:.2f}" for k, v in used.items())
    return out, f"CPU ms per round: {per}; {sum(used.values()) / wall:.1f} cores busy"


async def relay_floor(cluster: NatsCluster, rounds: int) -> list[Row]:
    """(g)'s path through three bare relays (bench/relay.py) instead of three daemons."""
    nc = await nats.connect(cluster.urls)
    js = nc.jetstream(timeout=5)
    await js.add_stream(StreamConfig(name="RELAY", subjects=["relay.>"], num_replicas=3))
    ports = [free_port() for _ in range(3)]
    relays = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "relay.py"),
                ",".join(cluster.urls),
                str(p),
                "RELAY",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for p in ports
    ]
    try:
        for r in relays:
            assert r.stdout is not None and r.stdout.readline().strip() == "ready"
        ws_a, ws_b = [(await open_many(f"ws://127.0.0.1:{p}", 1, None))[0] for p in ports[:2]]
        await asyncio.gather(auth_and(ws_a, None), auth_and(ws_b, None))
        await Call(ws_b)("subscribe")
        out, cores = await busy(
            _a_to_b(Call(ws_a), ws_b, 1, rounds),
            {"relays": [r.pid for r in relays], "servers": server_pids(cluster)},
            rounds + WARM_UP,
        )
        await asyncio.gather(ws_a.close(), ws_b.close())
    finally:
        for r in relays:
            r.kill()
            r.wait()
        await js.delete_stream("RELAY")
        await nc.close()
    FLOOR["r50"], FLOOR["r99"] = pct(out, 0.5), pct(out, 0.99)
    return [
        lat_row("(g) floor: bare relays A → B", out, "websockets + nats-py, no ctsd code"),
        ("    the cores meanwhile", "", "", cores),
    ]


async def _a_to_b(a: Call, ws_b: ClientConnection, first: int, rounds: int) -> list[float]:
    """Sequential updates sent through `a` until each one's event (revision `first`, then one
    more each round) reaches `ws_b`; the first WARM_UP are not kept."""

    async def event_at_b(revision: int) -> float:
        while True:
            msg = json.loads(await ws_b.recv())
            if msg.get("type") == "events" and any(e["id"] == revision for e in msg["events"]):
                return time.perf_counter()

    out = []
    for k in range(rounds + WARM_UP):
        t0 = time.perf_counter()
        seen = asyncio.ensure_future(event_at_b(first + k))
        await a("connections.update", connection_id="lat", changes={"user_id": k + 2})
        t1 = await asyncio.wait_for(seen, 10)
        if k >= WARM_UP:
            out.append(t1 - t0)
    return out


async def _latency(urls: list[str], rounds: int, parts: dict[str, list[int]]) -> list[Row]:
    ws_a = (await open_many(urls[0], 1, HEADERS))[0]
    ws_b = (await open_many(urls[1], 1, HEADERS))[0]
    await asyncio.gather(auth_and(ws_a, None), auth_and(ws_b, None))
    a, b = Call(ws_a), Call(ws_b)
    await a("connections.create", connection={"id": "lat", "name": "lat", "exchange": "bybit"})
    # Subscribed once B has applied the create, and each round waits for its own event (by
    # revision): a late event of an earlier change must not pass for this round's.
    start = (await a("ping"))["revision"]
    while (await b("ping"))["revision"] < start:
        await asyncio.sleep(0.01)
    await b("subscribe", connection_ids=["lat"])
    out, cores = await busy(_a_to_b(a, ws_b, start + 1, rounds), parts, rounds + WARM_UP)
    await asyncio.gather(ws_a.close(), ws_b.close())
    p50, p99 = pct(out, 0.5), pct(out, 0.99)
    ratios = [
        f"{p50 / FLOOR[f'{k}50']:.2f}/{p99 / FLOOR[f'{k}99']:.2f} × {name}"
        for k, name in (("b", "floor (b)"), ("3b", "(b) with 3 consumers"), ("r", "relays"))
        if f"{k}50" in FLOOR
    ]
    note = "; ".join(ratios) + " (p50/p99)" if ratios else ""
    return [
        lat_row("(g) ctsd update on A → subscriber on B", out, note),
        ("    the cores meanwhile", "", "", cores),
    ]


async def _rate(urls: list[str], seconds: float) -> list[Row]:
    clients = []
    for w in range(64):
        clients += await open_many(urls[w % 3], 1, HEADERS)
    await asyncio.gather(*(auth_and(ws, None) for ws in clients))
    for w, ws in enumerate(clients):
        conn = {"id": f"r{w}", "name": f"r{w}", "exchange": "bybit"}
        await Call(ws)("connections.create", connection=conn)

    async def websockets_client(w: int, k: int) -> str:
        frame = {"id": k, "type": "connections.update", "connection_id": f"r{w}"}
        await clients[w].send(json.dumps({**frame, "changes": {"user_id": k + 1}}))
        while True:
            msg = json.loads(await clients[w].recv())
            if msg.get("type") == "result" and msg.get("id") == k:
                return "ok" if msg["success"] else msg["error"]["code"]

    rows = [await _rate_run("websockets clients", websockets_client, seconds, 1_000)]
    await asyncio.gather(*(ws.close() for ws in clients), return_exceptions=True)

    lean = [await LeanClient.open(urls[w % 3], HEADERS) for w in range(64)]
    for c in lean:
        assert (await c.next_frame())["type"] == "auth_ok"

    async def lean_client(w: int, k: int) -> str:
        msg = await lean[w].call(
            "connections.update", connection_id=f"r{w}", changes={"user_id": k + 1}
        )
        return "ok" if msg["success"] else msg["error"]["code"]

    # Values of their own: an update that repeats an earlier value changes nothing.
    rows.append(await _rate_run("lean clients", lean_client, seconds, 10_000_000))
    for c in lean:
        c.close()
    return rows


async def _rate_run(
    kind: str, change: Callable[[int, int], Awaitable[str]], seconds: float, first: int
) -> Row:
    """64 writers, each `change(writer, value)` in a loop for `seconds`; the load generator's
    own CPU (this process) is shown too: it shares the 2 cores with what it measures."""
    counts = {"ok": 0}
    end = time.perf_counter() + seconds

    async def writer(w: int) -> None:
        k = first
        while time.perf_counter() < end:
            k += 1
            key = await change(w, k)
            counts[key] = counts.get(key, 0) + 1

    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(writer(w) for w in range(64)))
    elapsed = time.perf_counter() - t0
    load = (time.process_time() - cpu0) / elapsed
    refused = ", ".join(f"{v:,} {k}" for k, v in counts.items() if k != "ok") or "none refused"
    return (
        f"(h) ctsd 64 {kind} over 3 daemons",
        f"{counts['ok'] / elapsed:,.0f}/s",
        "",
        f"{counts['ok']:,} acknowledged; {refused}; the clients took {load:.0%} of a core",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300, help="samples per latency (default 300)")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each rate run")
    ap.add_argument("--size", type=int, default=512, help="payload bytes per change (512)")
    ap.add_argument("--dir", help="where the servers keep their files (default: cwd)")
    ap.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="uvloop",
        help="the clients' event loop (default uvloop, the daemon's own)",
    )
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
            rows += await engine_rate(cluster, args.seconds, args.size, own=True, keyed=True)
            rows += await ctsd_path(cluster, args.rounds, args.seconds, workdir)
            return rows

        rows = run_on(args.loop, run())
    finally:
        cluster.close()
    print(f"ctsd cluster bench · Python {sys.version.split()[0]} · {os.cpu_count()} CPUs")
    print(f"3 nats-server nodes on loopback, stream replicas 3, payload {args.size} B")
    print(f"clients on {args.loop}")
    print(f"load average (1 min) before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    print()
    head = f"{'measure':<46} {'p50 / rate':>12} {'p99':>10}  note"
    print(head)
    print("-" * len(head))
    for name, a, b, note in rows:
        print(f"{name:<46} {a:>12} {b:>10}  {note}")


if __name__ == "__main__":
    main()
