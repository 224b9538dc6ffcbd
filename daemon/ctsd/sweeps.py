"""Connection lifecycle: heartbeats, the stale sweep, periodic connection tests, Project X.

Heartbeats are the hot path (every bot sends them): `heartbeat()` only sets the time in
memory (`store.heartbeats`, which `store.state_view` overlays) and marks the connection for
the next flush; `connection-state.json` gets the coalesced heartbeats every
`heartbeat_flush_s` through the one door (`ops.flush_heartbeats`, FLUSH_SLICE a write), and never a
sync-log entry. Heartbeats lost in a crash are at most one flush interval old: they are
runtime data, and the stale sweep gives every connection a full `stale_after_s` of grace from
daemon start anyway.

The stale sweep must stay cheap at 10,000 connections, so it never scans them: active
connections sit in a min-heap keyed by the last heartbeat the sweep knew when it pushed them
(on the monotonic clock, see `monotonic_of`). A heartbeat only updates `last_beat` (no heap
work); a popped entry whose connection has beaten since is pushed back with its new time (a
lazy heap). A tick therefore costs the entries that came due, not the table. Membership
follows committed changes through `store.events_listeners`; `import`, `reset` and whole-file
hand edits trigger a rescan.

Every setting is read from `store.settings` on each iteration, which the store refreshes
on every committed settings change (bus, hand edit, SIGHUP), so a hand edit of
`settings.json` changes the sweep's behaviour without a restart.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import heapq
import math
import random
import time
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from ctsd import ops, probes
from ctsd.errors import CtsdError
from ctsd.files import CONNECTIONS, STATE
from ctsd.models import SyncEvent
from ctsd.probes import Prober
from ctsd.timeutil import beat_after, beat_since, now_iso

if TYPE_CHECKING:
    from ctsd.store import Store

log = structlog.get_logger("ctsd.sweeps")

MAX_IDLE_WAIT_S = 0.5  # longest sleep, so a shortened interval in settings.json applies soon
TICK_BUDGET = 1000  # due heap entries per slice of a tick: a few ms of work (bench/sweeps.py)
# Heartbeats per write of a flush: 10,000 bots' in one change held the event loop (and every
# bot's ack) for about 100 ms every heartbeat_flush_s; slices let the acks in between.
FLUSH_SLICE = 1000
RESCAN_SLICE = 1000  # connections learnt per slice (a few ms)
PERIODIC_JITTER = 0.1  # each next periodic test lands at interval × [0.9, 1.1]
# A connection's first periodic test (after a start, a create, a new interval) lands at
# interval × [0.5, 1.0]: spread, so 10,000 connections never fire at once, and never right
# away, so a daemon restarted in a loop does not send the exchanges a burst on every start.
FIRST_TEST_AFTER = 0.5


def iso_at(t: float) -> str:
    """Epoch seconds → the seeds' timestamp format (cheaper than datetime on the hot path)."""
    ms = int(t * 1000)
    return f"{_iso_second(ms // 1000)}.{ms % 1000:03d}Z"


@functools.lru_cache(maxsize=4)
def _iso_second(s: int) -> str:
    # Heartbeats come thousands a second: format each second once.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s))


def epoch_of(ts: str | None) -> float | None:
    if not ts:
        return None
    try:
        return dt.datetime.fromisoformat(ts).timestamp()
    except ValueError:
        return None


def monotonic_of(ts: str | None, *, clamp: bool = True) -> float:
    """A stored wall-clock timestamp on the monotonic clock the sweep runs on (-inf: never).

    The sweep measures silence on `time.monotonic()`, so a wall-clock step (NTP, a VM
    resumed) never turns every connection stale at once; only timestamps read from the
    files are converted, at the current offset between the clocks. One later than now (the
    clock stepped back since it was written, or a hand edit) counts as now (`clamp`): a
    heartbeat must not hold off `stale` by the length of the step.
    """
    wall = epoch_of(ts)
    if wall is None:
        return -math.inf
    mono = time.monotonic()
    at = wall - (time.time() - mono)
    return min(at, mono) if clamp else at


class Sweeper:
    """The lifecycle state of every connection: heartbeats, the stale sweep, the flush, and
    the periodic connection tests."""

    def __init__(self, store: Store, prober: Prober) -> None:
        self.store = store
        self.prober = prober
        # Stale sweep: live = enabled and is_active; the heap holds (beat time, cid).
        self.live: set[str] = set()
        self.last_beat: dict[str, float] = {}
        self.heap: list[tuple[float, str]] = []
        self.in_heap: set[str] = set()
        self.changed: set[str] = set()  # connections touched by commits since the last tick
        self.rescan = True
        self._rescan_todo: list[str] | None = None
        self._rescan_pos = 0
        self.backlog = False  # a budgeted tick stopped with entries still due
        self.recovering: set[str] = set()
        # Recoveries refused (connection-state.json invalid on disk, say): tried again at the
        # ticks once the file is valid, not only at a heartbeat that may not come again.
        self.recover_again: set[str] = set()
        # Coalesced flush.
        self.beats_dirty: set[str] = set()
        # One flush at a time; a flush asked for meanwhile (shutdown) waits, then writes what
        # is left, instead of returning with heartbeats still only in memory.
        self._flush_lock = anyio.Lock()
        # Periodic tests: the enabled connections, each due once per interval, jittered.
        self.enabled: set[str] = set()
        self.test_due: dict[str, float] = {}
        self.test_heap: list[tuple[float, str]] = []
        self.test_interval: float | None = None
        self.testing: set[str] = set()
        self.test_wake = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        # Tick durations in seconds (tests count ticks by them).
        self.tick_times: deque[float] = deque(maxlen=4096)
        self._warned: dict[str, str] = {}  # what → last message: a refusal is logged once
        self.store.events_listeners.append(self._on_events)
        self.store.replaced_listeners.append(self._on_replaced)

    # --- inputs -------------------------------------------------------------------------------

    def beat(self, cid: str, t: float) -> None:
        """A heartbeat at monotonic time `t` (already in `store.heartbeats`): O(1), no I/O."""
        self.last_beat[cid] = t
        self.beats_dirty.add(cid)
        if cid in self.live and cid not in self.in_heap:
            heapq.heappush(self.heap, (t, cid))  # it had gone stale: watch it again
            self.in_heap.add(cid)
        st = self.store.state.get(cid)
        if st is not None and st.status == "stale":
            self._recover(cid)

    def _on_events(self, events: list[SyncEvent]) -> None:
        """Committed changes (called synchronously by the store; must not block)."""
        for e in events:
            cid = e.connection_id
            if cid is None:
                if e.action in ("import", "reset") or e.data.get("file") in (CONNECTIONS, STATE):
                    self.rescan = True
                    self._rescan_todo = None  # start over: a half-done pass saw the old table
                continue
            self.changed.add(cid)

    def _on_replaced(self, _gap: bool) -> None:
        """The state replaced from a cluster snapshot: its events need not name every
        connection that changed."""
        self.rescan = True
        self._rescan_todo = None

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)  # keep a reference: the loop holds tasks only weakly
        task.add_done_callback(self.tasks.discard)
        return task

    # --- membership ---------------------------------------------------------------------------

    def _refresh(self, cid: str, now: float) -> None:
        conn = self.store.connections.get(cid)
        if conn is None:
            self.live.discard(cid)
            self.enabled.discard(cid)
            self.last_beat.pop(cid, None)
            self.test_due.pop(cid, None)
            self.beats_dirty.discard(cid)
            return
        if conn.is_enabled and conn.is_active:
            st = self.store.state_view(cid)
            hb = monotonic_of(st.last_heartbeat_at, clamp=False) if st is not None else -math.inf
            if cid in self.live:
                # One stamped after now (a hand edit, the clock stepped back) is no beat: taken
                # as now at every event, it held `stale` off for as long as events came.
                last = self.last_beat.get(cid, -math.inf)
                if hb <= now:
                    last = max(last, hb)
            else:
                # Just became active, or the daemon just started: it gets a full
                # stale_after_s from now (nobody could heartbeat while it was off or down).
                self.live.add(cid)
                last = now
            self.last_beat[cid] = last
            if cid not in self.in_heap:
                heapq.heappush(self.heap, (last, cid))
                self.in_heap.add(cid)
        else:
            self.live.discard(cid)  # its heap entry is dropped when popped
        if conn.is_enabled:
            if cid not in self.enabled:
                self.enabled.add(cid)
                interval = self.store.settings.test_interval_s
                if interval > 0 and self.test_interval is not None:
                    self._schedule_first_test(cid, now, interval)
        else:
            self.enabled.discard(cid)
            self.test_due.pop(cid, None)

    def _rescan(self, now: float, budget: int | None) -> bool:
        """Learn every connection again (start, import, reset, whole-file edits), `budget`
        connections per call; True once done."""
        if self._rescan_todo is None:
            conns = self.store.connections
            self.changed.clear()  # everything is looked at anyway
            gone = [c for c in self.live | self.enabled if c not in conns]
            self._rescan_todo, self._rescan_pos = [*gone, *conns], 0
        todo, pos = self._rescan_todo, self._rescan_pos
        end = len(todo) if budget is None else min(len(todo), pos + budget)
        for cid in todo[pos:end]:
            self._refresh(cid, now)
        if end < len(todo):
            self._rescan_pos = end
            return False
        self._rescan_todo = None
        self.rescan = False
        return True

    # --- the stale sweep ----------------------------------------------------------------------

    def tick(self, now: float, budget: int | None = None) -> dict[str, tuple[str, str | None]]:
        """One sweep at monotonic time `now`: the transitions to `stale` that are due (the
        caller applies them). With `budget`, at most that many due heap entries are looked at;
        `self.backlog` then says whether more are due (the caller yields to the loop and
        calls again with the same `now`)."""
        if self.rescan:
            # Changes committed between slices land in `changed`, handled next tick.
            if not self._rescan(now, None if budget is None else RESCAN_SLICE):
                self.backlog = True
                return {}
        elif self.changed:
            changed, self.changed = self.changed, set()
            for cid in changed:
                self._refresh(cid, now)
        if self.recover_again and STATE not in self.store.problems:
            for cid in list(self.recover_again):
                self._recover(cid)
        threshold = now - self.store.settings.stale_after_s
        heap = self.heap
        state = self.store.state
        out: dict[str, tuple[str, str | None]] = {}
        left = budget if budget is not None else -1
        while heap and heap[0][0] <= threshold:
            if left == 0:
                self.backlog = True
                return out
            left -= 1
            beat, cid = heapq.heappop(heap)
            self.in_heap.discard(cid)
            if cid not in self.live:
                continue
            last = self.last_beat.get(cid, beat)
            if last > beat:  # it has beaten since it was pushed
                heapq.heappush(heap, (last, cid))
                self.in_heap.add(cid)
                continue
            st = state.get(cid)
            if st is None or st.status != "active":
                continue  # already stale: a heartbeat or a good test puts it back
            out[cid] = ("stale", self.store.heartbeats.get(cid) or st.last_heartbeat_at)
        self.backlog = False
        return out

    async def _apply_stale(self, transitions: dict[str, tuple[str, str | None]]) -> None:
        try:
            n = await self.store.submit(ops.set_status(transitions), "sweep")
        except CtsdError as e:
            self._warn("stale_sweep_failed", e, connections=len(transitions))
            for cid in transitions:  # try again next tick
                self._watch(cid)
            return
        self._warned.pop("stale_sweep_failed", None)
        if n:
            log.info("connections_stale", count=n)
        for cid, (_, hb) in transitions.items():
            st = self.store.state.get(cid)
            latest = self.store.heartbeats.get(cid)
            if st is None:
                continue
            if st.status == "stale" and beat_since(latest, hb):
                self._recover(cid)  # a heartbeat landed while the write was in flight
            elif st.status != "stale":
                self._watch(cid)

    def _warn(self, what: str, e: CtsdError, **kw: Any) -> None:
        # Retried every tick or flush while, say, a file stays invalid: say it once per cause.
        if self._warned.get(what) != e.message:
            self._warned[what] = e.message
            log.warning(what, error=e.message, code=e.code, **kw)

    def _watch(self, cid: str) -> None:
        if cid in self.live and cid not in self.in_heap:
            heapq.heappush(self.heap, (self.last_beat.get(cid, time.monotonic()), cid))
            self.in_heap.add(cid)

    def _recover(self, cid: str) -> None:
        if cid in self.recovering:
            return
        self.recovering.add(cid)
        self.spawn(self._apply_recover(cid), f"ctsd-recover-{cid}")

    async def _apply_recover(self, cid: str) -> None:
        try:
            hb = self.store.heartbeats.get(cid)
            n = await self.store.submit(ops.set_status({cid: ("active", hb)}), "sweep")
            if n:
                log.info("connection_recovered", connection_id=cid, reason="heartbeat")
        except CtsdError as e:
            self.recover_again.add(cid)
            self._warn("recover_failed", e, connection_id=cid)  # (once per cause, not per beat)
        else:
            self.recover_again.discard(cid)
            if not self.recover_again:
                self._warned.pop("recover_failed", None)
        finally:
            self.recovering.discard(cid)

    # --- the coalesced flush ------------------------------------------------------------------

    def flush_plan(self) -> dict[str, str]:
        """What the flush would write: only heartbeats newer than the committed ones."""
        state, beats_mem = self.store.state, self.store.heartbeats
        beats: dict[str, str] = {}
        now = now_iso()
        for cid in self.beats_dirty:
            hb, st = beats_mem.get(cid), state.get(cid)
            if hb is not None and st is not None and beat_after(hb, st.last_heartbeat_at, now):
                beats[cid] = hb
        return beats

    @property
    def flushing(self) -> bool:
        return self._flush_lock.locked()

    async def flush(self) -> int:
        """Every heartbeat and last_sync_at not yet on disk, in writes of FLUSH_SLICE; none if
        none."""
        async with self._flush_lock:
            return await self._flush()

    async def _flush(self) -> int:
        beats = list(self.flush_plan().items())
        self.beats_dirty = set()
        n = 0
        for at in range(0, len(beats), FLUSH_SLICE):
            part = dict(beats[at : at + FLUSH_SLICE])
            try:
                n += int(await self.store.submit(ops.flush_heartbeats(part), "sweep"))
            except CtsdError as e:
                # e.g. connection-state.json invalid on disk: keep them for the next flush
                self.beats_dirty.update(cid for cid, _ in beats[at:])
                self._warn("heartbeat_flush_failed", e)
                return n
        self._warned.pop("heartbeat_flush_failed", None)
        return n

    # --- periodic connection tests ------------------------------------------------------------

    def _schedule_test(self, cid: str, due: float) -> None:
        self.test_due[cid] = due
        heapq.heappush(self.test_heap, (due, cid))

    def _schedule_first_test(self, cid: str, now: float, interval: float) -> None:
        self._schedule_test(cid, now + interval * random.uniform(FIRST_TEST_AFTER, 1.0))

    def _reschedule_all(self, interval: float, now: float) -> None:
        self.test_interval = interval
        self.test_due.clear()
        self.test_heap = []
        if interval > 0:
            for cid in self.enabled:
                self._schedule_first_test(cid, now, interval)

    def due_tests(self, now: float, room: int) -> list[str]:
        out: list[str] = []
        heap = self.test_heap
        while heap and heap[0][0] <= now and len(out) < room:
            due, cid = heapq.heappop(heap)
            if self.test_due.get(cid) != due:
                continue  # superseded or dropped
            del self.test_due[cid]
            if cid not in self.enabled:
                continue
            if cid in self.testing:
                self._schedule_test(cid, now + (self.test_interval or 0))
                continue
            later_due = self._after_last_test(cid, now)
            if later_due is not None:
                self._schedule_test(cid, later_due)
                continue
            out.append(cid)
        return out

    def _after_last_test(self, cid: str, now: float) -> float | None:
        """When the connection was tested less than an interval ago (a test asked for on the
        bus or HTTP, or, in a cluster, another host's periodic one: results are shared), its
        next periodic test is due an interval after that one, not now: each connection is
        tested about once per interval however many hosts run it. None: test it now."""
        st = self.store.state.get(cid)
        interval = self.test_interval or 0
        if st is None or st.test_results is None or interval <= 0:
            return None
        last = monotonic_of(st.test_results.timestamp, clamp=False)
        # Within half an interval: this host's own last test (an interval × [0.9, 1.1] ago)
        # is never taken for a recent one. A timestamp in the future (a clock ahead, a hand
        # edit) must not hold tests off.
        if not now - interval / 2 < last <= now:
            return None
        return last + interval * random.uniform(1 - PERIODIC_JITTER, 1 + PERIODIC_JITTER)

    async def _periodic_test(self, cid: str) -> None:
        self.testing.add(cid)
        try:
            conn = self.store.connections.get(cid)
            if conn is None:
                return
            before = self.store.state.get(cid)
            result = await self.prober.run_test(conn)
            if cid not in self.store.connections:
                return  # deleted while the request was out
            await self.store.submit(ops.record_test(cid, result), "probe")
            was = before.test_results.success if before and before.test_results else None
            if was != result.success:
                log.info(
                    "connection_test",
                    connection_id=cid,
                    success=result.success,
                    latency=result.latency,
                    error=result.error,
                )
        except CtsdError as e:
            log.warning("connection_test_not_recorded", connection_id=cid, error=e.message)
        except Exception:  # a test must never take the sweep down
            log.exception("connection_test_failed", connection_id=cid)
        finally:
            self.testing.discard(cid)
            interval = self.store.settings.test_interval_s
            if cid in self.enabled and interval > 0 and cid not in self.test_due:
                jitter = random.uniform(1 - PERIODIC_JITTER, 1 + PERIODIC_JITTER)
                self._schedule_test(cid, time.monotonic() + interval * jitter)
            self.test_wake.set()

    # --- the loops ----------------------------------------------------------------------------

    async def sweep_loop(self) -> None:
        last_flush = time.monotonic()
        last_sweep = -float("inf")  # the first sweep (learning the connections) runs at once
        while True:
            s = self.store.settings
            mono = time.monotonic()
            if mono >= last_sweep + s.sweep_interval_s:
                last_sweep = mono
                t0 = time.perf_counter()
                transitions = self.tick(mono, TICK_BUDGET)
                self.tick_times.append(time.perf_counter() - t0)
                while self.backlog:
                    # Everything came due at once (all connections learnt at the same moment,
                    # at start or after an import): finish in slices, never blocking the loop
                    # (heartbeats, the bus) for more than one slice.
                    await anyio.sleep(0)
                    t0 = time.perf_counter()
                    transitions.update(self.tick(mono, TICK_BUDGET))
                    self.tick_times.append(time.perf_counter() - t0)
                if transitions:
                    self.spawn(self._apply_stale(transitions), "ctsd-stale")
            if mono >= last_flush + s.heartbeat_flush_s:
                last_flush = mono
                if not self.flushing:
                    self.spawn(self.flush(), "ctsd-flush")
            wake = min(last_sweep + s.sweep_interval_s, last_flush + s.heartbeat_flush_s)
            await anyio.sleep(min(max(wake - time.monotonic(), 0.0), MAX_IDLE_WAIT_S))

    async def test_loop(self) -> None:
        while True:
            interval = self.store.settings.test_interval_s
            now = time.monotonic()
            if self.rescan and self.test_interval is None:
                await anyio.sleep(0.05)  # let the first sweep learn the connections
                continue
            if interval != self.test_interval:
                self._reschedule_all(interval, now)
            room = probes.MAX_CONCURRENT_TESTS - len(self.testing)
            if interval > 0 and room > 0:
                for cid in self.due_tests(now, room):
                    self.spawn(self._periodic_test(cid), f"ctsd-test-{cid}")
            wait = MAX_IDLE_WAIT_S
            if self.test_heap and len(self.testing) < probes.MAX_CONCURRENT_TESTS:
                wait = min(wait, max(self.test_heap[0][0] - time.monotonic(), 0.0))
            self.test_wake.clear()
            with anyio.move_on_after(wait):
                await self.test_wake.wait()

    async def projectx_loop(self) -> None:
        """With `projectX.autoConnect`: test at start, every test_interval_s, and at once
        whenever the Project X settings in connection.json change."""
        seen: tuple[Any, ...] | None = None
        next_due = 0.0
        while True:
            px = self.prober.projectx_config().projectX
            current = (px.autoConnect, px.apiUrl, px.username, px.apiKey)
            interval = self.store.settings.test_interval_s
            if px.autoConnect and (
                current != seen or (interval > 0 and time.monotonic() >= next_due)
            ):
                try:
                    await self.prober.test_projectx()
                except CtsdError as e:  # not tested now (no free slot): at its next turn
                    log.warning("projectx_test_not_run", error=e.message)
                except Exception:  # never let Project X take the sweeps down
                    log.exception("projectx_test_failed")
                next_due = time.monotonic() + interval
            seen = current
            await anyio.sleep(MAX_IDLE_WAIT_S)

    # --- heartbeats ---------------------------------------------------------------------------

    def heartbeat(self, cid: str) -> str:
        """`connections.heartbeat`: in memory at once, on disk with the next flush; returns
        its timestamp. A stale connection is turned back to active (scheduled, not awaited)."""
        if not isinstance(cid, str):
            raise CtsdError("invalid", "connection_id must be a string", path="$.connection_id")
        if cid not in self.store.connections:
            raise CtsdError("not_found", f"no connection {cid!r}", path="$.connection_id")
        ts = iso_at(time.time())
        self.store.heartbeats[cid] = ts
        self.beat(cid, time.monotonic())
        return ts

    # --- running ---------------------------------------------------------------------------

    async def run(self) -> None:
        """The long-running part: stale sweep + flush, periodic tests, Project X."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.sweep_loop, name="ctsd-sweep")
                tg.start_soon(self.test_loop, name="ctsd-tests")
                tg.start_soon(self.projectx_loop, name="ctsd-projectx")
        finally:
            for task in list(self.tasks):
                task.cancel()
